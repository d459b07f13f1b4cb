"""The plat-telemetry fixture (tests/platform_fixture.py) has the real repository's traits, shown
with the real ``task`` (PyPI go-task-bin), the real ``git`` and the fixture's served upstreams."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import signal
import subprocess
import tarfile
import urllib.request
from datetime import datetime

import pytest
import yaml

from tests.platform_fixture import (
    INCLUDES,
    MANIFEST_VERSIONS,
    PlatTelemetry,
    make_plat_telemetry,
    plat_telemetry_fixture,  # noqa: F401 -- the `plat_telemetry` fixture
)
from tests.support import wait_for

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="the fixture's Taskfiles run git")


def src_head(pt: PlatTelemetry, sub: str) -> str:
    return subprocess.run(["git", "-C", str(pt.root / sub / ".src"), "rev-parse", "HEAD"], env=pt.env(),
                          capture_output=True, text=True, timeout=30, check=True).stdout.strip()


def ls_remote_tags(pt: PlatTelemetry, url: str) -> dict[str, str]:
    """`git ls-remote --tags URL` as {tag: sha}, peeled lines (``tag^{}``) included."""
    out = subprocess.run(["git", "ls-remote", "--tags", url], capture_output=True, text=True, timeout=30,
                         check=True, env=pt.env()).stdout
    lines = (line.split("\t") for line in out.splitlines())
    return {ref.removeprefix("refs/tags/"): sha for sha, ref in lines}


# ------------------------------------------------------------------------------------------------ nats


def test_nats_builds_its_pin_and_the_status_guard_skips_a_rebuild_after_a_version_change(plat_telemetry):
    pt = plat_telemetry
    nats = pt.upstreams["nats"]
    pt.task("nats:src:update", "nats:bin:build")
    built = pt.run_binary("nats")
    assert built == {"name": "nats-server", "commit": nats.commit_of("v2.10.24"), "version": "v2.10.24",
                     "platform": built["platform"]}
    record = (pt.root / "nats/.bin/.version").read_text().splitlines()
    assert [line.split(": ")[0] for line in record] == ["commit", "timestamp", "checksum"]
    fields = pt.version_file("nats")
    assert fields["commit"] == nats.commit_of("v2.10.24")[:7]
    assert fields["checksum"] == hashlib.sha256(pt.binary("nats").read_bytes()).hexdigest()
    assert datetime.strptime(fields["timestamp"], "%Y-%m-%dT%H:%M:%SZ")

    # a new pin: the source moves, but bin:build's `status: test -f <binary>` keeps the old binary
    before = pt.binary("nats").read_bytes()
    proc = pt.task("nats:src:update", "nats:bin:build", NATS_VERSION="v2.10.25")
    assert src_head(pt, "nats") == nats.commit_of("v2.10.25")
    assert 'Task "nats:bin:build" is up to date' in proc.stderr
    assert pt.binary("nats").read_bytes() == before
    assert pt.run_binary("nats")["commit"] == nats.commit_of("v2.10.24")


def test_force_is_no_way_round_the_guard_but_removing_the_binary_is(plat_telemetry):
    pt = plat_telemetry
    pt.task("nats:src:update", "nats:bin:build")
    released = pt.tag("nats", "v2.10.30")  # upstream releases after the checkout
    # --force also forces the src:clone dependency, whose `git clone` then finds .src in the way
    forced = pt.task("--force", "nats:bin:build", NATS_VERSION="v2.10.30", check=False)
    assert forced.returncode != 0 and "already exists and is not an empty directory" in forced.stderr
    assert pt.run_binary("nats")["version"] == "v2.10.24"

    pt.binary("nats").unlink()
    pt.task("nats:src:update", "nats:bin:build", NATS_VERSION="v2.10.30")
    assert pt.run_binary("nats") | {"platform": ""} == {"name": "nats-server", "commit": released,
                                                        "version": "v2.10.30", "platform": ""}
    assert pt.version_file("nats")["commit"] == released[:7]


def test_the_stand_in_go_builds_for_the_platform_it_is_given(plat_telemetry):
    pt = plat_telemetry
    goos, goarch = subprocess.run([str(pt.tool_bin / "go"), "env", "GOOS", "GOARCH"], capture_output=True,
                                  text=True, timeout=30, check=True, env=pt.env()).stdout.split()
    pt.task("nats:src:update", "nats:bin:build")
    assert pt.run_binary("nats")["platform"] == f"{goos}/{goarch}"
    pt.binary("nats").unlink()
    pt.task("nats:bin:build", GOOS="darwin", GOARCH="arm64")
    assert pt.run_binary("nats")["platform"] == "darwin/arm64"

    outside = subprocess.run([str(pt.tool_bin / "go"), "build", "-o", "x", "."], cwd=pt.root / "nats",
                             capture_output=True, text=True, timeout=30, env=pt.env())
    assert outside.returncode == 1 and "no Go files in" in outside.stderr


# ------------------------------------------------------------------------------------------ liftbridge


def test_liftbridge_builds_its_fork_and_the_environment_overrides_the_template_default(plat_telemetry):
    pt = plat_telemetry
    canonical, fork = pt.upstreams["liftbridge"], pt.upstreams["liftbridge-fork"]
    taskfile = yaml.safe_load((pt.root / "liftbridge/Taskfile.yml").read_text())
    manifest = yaml.safe_load((pt.root / "manifest.yaml").read_text())["subsystems"]["liftbridge"]
    assert taskfile["vars"]["LB_UPSTREAM_REPO"] == fork.url != manifest["upstream"] == canonical.url
    assert taskfile["vars"]["LB_VERSION"] == '{{.LB_VERSION | default "master"}}'
    assert manifest["version"] == "v1.10.0" and "v1.10.0" not in canonical.tags()
    stable = [t for t in canonical.tags() if re.fullmatch(r"v\d+\.\d+\.\d+", t)]
    assert max(stable, key=lambda t: tuple(map(int, t[1:].split(".")))) == "v1.9.0"

    pt.task("liftbridge:src:update", "liftbridge:bin:build")  # the default: the fork's master
    assert pt.run_binary("liftbridge")["commit"] == fork.commit_of("master") != canonical.commit_of("master")

    pt.binary("liftbridge").unlink()
    pt.task("liftbridge:src:update", "liftbridge:bin:build", LB_VERSION="v1.9.0")
    assert pt.run_binary("liftbridge") | {"platform": ""} == {
        "name": "liftbridge", "commit": canonical.commit_of("v1.9.0"), "version": "v1.9.0", "platform": ""}


# ---------------------------------------------------------------------------------------------- grafana


def test_grafana_lands_in_bin_bin_and_only_a_command_line_var_moves_its_version(plat_telemetry):
    pt = plat_telemetry
    grafana = pt.upstreams["grafana"]
    assert "does not exist" in pt.task("grafana:src:update", check=False).stderr  # not a root include
    pt.task("-d", "grafana", "src:update")
    assert pt.binary("grafana") == pt.root / "grafana/.bin/bin/grafana-server"
    assert pt.run_binary("grafana")["commit"] == grafana.commit_of("v11.4.0")
    assert (pt.root / "grafana/.bin/.version").read_text() == "11.4.0\n"
    assert not (pt.root / "grafana/.src").exists()

    pt.task("-d", "grafana", "src:update", GF_VERSION="11.5.0")  # GF_VERSION has no `default`
    assert pt.run_binary("grafana")["version"] == "v11.4.0"
    pt.task("-d", "grafana", "src:update", "GF_VERSION=11.5.0")
    assert pt.run_binary("grafana")["commit"] == grafana.commit_of("v11.5.0")
    assert pt.version_file("grafana") == {"version": "11.5.0"}


# ------------------------------------------------------------------------------------ arc and telegraf


def test_branch_pins_build_their_branch_and_src_update_never_advances_it(plat_telemetry):
    pt = plat_telemetry
    arc, telegraf = pt.upstreams["arc"], pt.upstreams["telegraf"]
    assert arc.tags() == [] and telegraf.tags() == []
    pt.task("arc:src:update", "arc:bin:build", "telegraf:src:update", "telegraf:bin:build")
    assert pt.run_binary("arc")["commit"] == arc.commit_of("main")
    assert pt.run_binary("telegraf")["commit"] == telegraf.commit_of("master")  # via make build + cp
    assert pt.version_file("telegraf")["commit"] == telegraf.commit_of("master")[:7]

    old, new = arc.commit_of("main"), pt.advance("arc")
    pt.task("arc:src:update")  # fetch origin main moves origin/main; checkout main stays put
    assert src_head(pt, "arc") == old != new
    pt.task("arc:src:update", ARC_VERSION=new)  # a commit pin does move it
    assert src_head(pt, "arc") == new


# ---------------------------------------------------------------------------------- workspace and files


def test_root_taskfile_manifest_and_non_subsystem_includes(plat_telemetry):
    pt = plat_telemetry
    root = yaml.safe_load((pt.root / "Taskfile.yml").read_text())
    assert tuple(root["includes"]) == INCLUDES and "grafana" not in root["includes"]
    assert root["vars"]["SUBSYSTEMS_RELEASE"] == "arc gh liftbridge nats pc sync telegraf"
    assert root["vars"]["SUBSYSTEMS_BUILD"] == "arc docs gh liftbridge nats pc sync telegraf"
    manifest = yaml.safe_load((pt.root / "manifest.yaml").read_text())["subsystems"]
    assert {name: entry["version"] for name, entry in manifest.items()} == MANIFEST_VERSIONS
    assert {name: entry["upstream"] for name, entry in manifest.items()} == {
        name: pt.upstreams[name].url for name in MANIFEST_VERSIONS}

    # every include resolves, and each Taskfile names its vars with its own prefix
    listing = pt.task("--list-all").stdout
    for include in INCLUDES:
        assert f"* {include}:" in listing
    versions = {sub: pt.task(f"{sub}:config:version").stdout.strip()
                for sub in ("nats", "liftbridge", "arc", "telegraf", "pc", "gh", "sync")}
    assert versions == {"nats": "v2.10.24", "liftbridge": "master", "arc": "main", "telegraf": "master",
                        "pc": "v1.85.0", "gh": "latest", "sync": "latest"}
    subs = ("nats", "liftbridge", "arc", "telegraf", "grafana", "gh", "sync")
    taskfiles = {sub: yaml.safe_load((pt.root / sub / "Taskfile.yml").read_text()) for sub in subs}
    prefixes = {sub: {var.split("_")[0] for var in taskfile["vars"]} for sub, taskfile in taskfiles.items()}
    assert prefixes == {"nats": {"NATS"}, "liftbridge": {"LB"}, "arc": {"ARC"}, "telegraf": {"TG"},
                        "grafana": {"GF"}, "gh": {"GH"}, "sync": {"SYNC"}}

    restart = yaml.safe_load((pt.root / "pc/Taskfile.yml").read_text())["tasks"]["restart"]["cmds"]
    assert [c.split()[0] for c in restart] == ["{{.PC_BIN_PATH}}", "sleep", "{{.PC_BIN_PATH}}"]
    assert "process stop" in restart[0] and "process start" in restart[2]
    assert pt.task("--dry", "reload", "PROC=arc").stderr.count("process ") == 2


def test_the_workspace_is_committed_and_ignores_build_output_but_not_the_version_manifest(plat_telemetry):
    pt = plat_telemetry

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *args], cwd=pt.root, capture_output=True, text=True, timeout=30,
                              env=pt.env())

    tracked = set(git("ls-files").stdout.split())
    assert {"nats/nats.conf", "liftbridge/configs/standalone.yaml", "process-compose.yaml", "manifest.yaml",
            ".gitignore", "grafana/Taskfile.yml", "test-reload/Taskfile.yml"} <= tracked
    pt.task("nats:src:update", "nats:bin:build")
    assert git("status", "--porcelain").stdout == ""  # .src and .bin are ignored
    assert git("check-ignore", "-q", ".version-manifest.json").returncode == 1

    compose = yaml.safe_load((pt.root / "process-compose.yaml").read_text())["processes"]
    assert set(compose) == set(MANIFEST_VERSIONS)
    for name, proc in compose.items():
        assert proc["command"] == f"task {name}:run"
        assert proc["readiness_probe"]["exec"]["command"] == f"task {name}:health"


def test_bin_download_writes_the_release_name_as_a_one_line_version(plat_telemetry):
    pt = plat_telemetry
    goos, goarch = subprocess.run(["go", "env", "GOOS", "GOARCH"], capture_output=True, text=True, timeout=30,
                                  check=True, env=pt.env()).stdout.split()
    store = pt.root / ".releases/latest"
    store.mkdir(parents=True)
    program = b"#!/bin/sh\necho released\n"
    with tarfile.open(store / f"nats-server-{goos}-{goarch}.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("nats-server")
        info.size, info.mode = len(program), 0o755
        tar.addfile(info, io.BytesIO(program))
    pt.task("nats:bin:download")
    assert pt.binary("nats").read_bytes() == program
    assert (pt.root / "nats/.bin/.version").read_text() == "latest\n"


# ------------------------------------------------------------------------------------------- services


def test_services_run_under_task_and_answer_health_with_the_binary_they_run(tmp_path):
    with make_plat_telemetry(tmp_path) as pt:
        pt.task("nats:src:update", "nats:bin:build", "telegraf:src:update", "telegraf:bin:build")
        # like process-compose: each in its own process group, stopped as a group (a SIGTERM to
        # `task` alone leaves the service running)
        procs = {sub: subprocess.Popen([str(pt.tool_bin / "task"), f"{sub}:run"], cwd=pt.root, env=pt.env(),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                       start_new_session=True)
                 for sub in ("nats", "telegraf")}

        def healthy(sub: str) -> bool:
            return pt.task(f"{sub}:health", check=False).returncode == 0

        try:
            for sub in procs:
                wait_for(lambda sub=sub: healthy(sub), what=f"{sub} healthy")
            with urllib.request.urlopen(f"http://127.0.0.1:{pt.ports['nats']}/healthz", timeout=10) as r:
                served = dict(line.split(": ", 1) for line in r.read().decode().splitlines())
            assert served == pt.run_binary("nats")
        finally:
            for p in procs.values():
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=10)
        for sub in procs:
            wait_for(lambda sub=sub: not healthy(sub), what=f"{sub} stopped")


# ---------------------------------------------------------------------------------- upstreams, serving


def test_upstream_tag_sets_are_realistic(plat_telemetry):
    pt = plat_telemetry
    nats = ls_remote_tags(pt, pt.upstreams["nats"].url)
    names = [t for t in nats if not t.endswith("^{}")]
    assert len(names) >= 300
    assert {"v2.0.0", "v2.10.24", "v2.10.29", "v2.11.0", "v2.10.24-binary", "nightly-20241215"} <= set(names)
    assert any("-RC." in t for t in names) and any("-beta." in t for t in names)
    assert nats["v2.10.24^{}"] == nats["v2.10.24-binary"] == pt.upstreams["nats"].commit_of("v2.10.24")
    assert nats["v2.10.24-RC.1"] == pt.upstreams["nats"].commit_of("v2.10.24-RC.1")  # lightweight: no ^{}
    for tag in ("v2.0.0", "v2.10.24-RC.2", "v2.12.2"):
        shown = subprocess.run(["git", "--git-dir", str(pt.upstreams["nats"].path), "show", f"{tag}:VERSION"],
                               capture_output=True, text=True, timeout=30, check=True, env=pt.env()).stdout
        assert shown == f"{tag}\n"
    grafana = ls_remote_tags(pt, pt.upstreams["grafana"].url)
    assert {"v11.4.0", "v11.4.1", "v11.5.0"} <= set(grafana) and "11.4.0" not in grafana
    assert ls_remote_tags(pt, pt.upstreams["arc"].url) == {}


@pytest.mark.parametrize("serve", ["file", "daemon"])
def test_served_upstreams_build_through_the_taskfiles(tmp_path, serve):
    with make_plat_telemetry(tmp_path, serve=serve) as pt:
        assert pt.upstreams["nats"].url.startswith({"file": "file://", "daemon": "git://127.0.0.1:"}[serve])
        pt.task("nats:src:update", "nats:bin:build")
        assert pt.run_binary("nats")["commit"] == pt.upstreams["nats"].commit_of("v2.10.24")
        sha = pt.tag("nats", "v2.10.30")  # seen at once through the server
        pt.task("nats:src:update", NATS_VERSION="v2.10.30")
        assert src_head(pt, "nats") == sha


def test_smart_http_serves_listings_and_clones(tmp_path):
    with make_plat_telemetry(tmp_path, serve="http") as pt:
        url = pt.upstreams["nats"].url
        assert url.startswith("http://127.0.0.1:")
        assert len([t for t in ls_remote_tags(pt, url) if not t.endswith("^{}")]) >= 300
        subprocess.run(["git", "clone", "-q", "--branch", "v2.10.24", url, str(tmp_path / "clone")],
                       timeout=60, check=True, env=pt.env())
        assert (tmp_path / "clone/VERSION").read_text() == "v2.10.24\n"


@pytest.mark.xfail(strict=True, reason="dulwich's upload-pack server rejects a fetch into a shallow clone "
                                       "(`shallow` lines without `deepen`): HTTP 500 on src:update")
def test_smart_http_serves_the_taskfiles_shallow_clone_then_fetch(tmp_path):
    with make_plat_telemetry(tmp_path, serve="http") as pt:
        pt.task("nats:src:update")


def test_a_service_port_can_be_set_to_a_clash_candidate(tmp_path):
    with make_plat_telemetry(tmp_path, ports={"arc": 8080}) as pt:  # process-compose's and the relay's default
        assert pt.ports["arc"] == 8080 and 8080 not in (pt.ports["nats"], pt.ports["grafana"])
        assert "port = 8080\n" in (pt.root / "arc/arc.toml").read_text()
        assert "http://127.0.0.1:8080/health" in pt.task("--dry", "arc:health").stderr
        assert f"http_port: {pt.ports['nats']}\n" in (pt.root / "nats/nats.conf").read_text()
