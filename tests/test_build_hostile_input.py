"""build, plan, check and release against the shapes the real platform and its upstreams take (found
by a review; each test failed before its fix): a v-less pin fed a v-tag, a branch pin in a plain var,
a build that checked out another commit than asked, a failed build's .version, a stale branch
release, pins moved halfway, a manifest without subsystems, a tool's *_BIN_PATH, Taskfile.yaml,
shell operators in build commands, a trickling GitHub API. Real git repositories, the real ``task``, the plat-telemetry fixture's stand-in
``go``; nothing of the code under test is mocked."""

from __future__ import annotations

from pathlib import Path

import pytest

from sync_tools.build import build
from sync_tools.check import check
from sync_tools.config import load_config
from sync_tools.errors import ConfigError, DataError, SyncToolsError
from sync_tools.package import package
from sync_tools.plan import make_plan
from sync_tools.release import release
from sync_tools.signing import write_keypair
from tests.platform_fixture import PlatTelemetry, make_plat_telemetry
from tests.workspace import make_workspace

PLAT = "linux/amd64"


@pytest.fixture
def pt(tmp_path) -> PlatTelemetry:
    with make_plat_telemetry(tmp_path / "pt") as pt:
        yield pt


def _grafana_buildable(pt: PlatTelemetry, *, flow: bool = False) -> Path:
    """The fix doctor suggests for grafana (the root Taskfile does not include it): its own build
    commands, written into manifest.yaml, block style or (flow=True) as a flow mapping."""
    manifest = pt.root / "manifest.yaml"
    text = manifest.read_text()
    up = pt.upstreams["grafana"].url
    block = (f'  grafana:\n    version: "11.4.0"\n    upstream: {up}\n'
             "    description: Observability and visualization platform\n")
    assert block in text
    if flow:
        new = f'  grafana: {{version: "11.4.0", upstream: {up}, build: ["task -d grafana src:update", "task -d grafana bin:build"]}}\n'
    else:
        new = block + '    build: ["task -d grafana src:update", "task -d grafana bin:build"]\n'
    manifest.write_text(text.replace(block, new))
    return manifest


# ---------------------------------------------------------------------------------------------------
# 1. grafana: check/plan hand the build the upstream's tag name (v11.6.0), and build writes it as is
#    into GF_VERSION, whose convention is v-less ("11.4.0"; the Taskfile clones v{{.GF_VERSION}}).


def test_grafana_update_from_check_builds_the_tag_in_the_pins_v_less_form(pt: PlatTelemetry) -> None:
    cfg = load_config(_grafana_buildable(pt))
    [result] = check(cfg, ["grafana"]).results
    assert result.error is None and result.update_available and result.latest == "v11.6.0"
    plan = make_plan(cfg, ["grafana"], [PLAT], versions={"grafana": result.latest})
    [item] = plan.items
    assert item.version == "v11.6.0"
    # what the upstream workflow runs for that matrix leg: build --version <item.version> --no-pin
    build(cfg, ["grafana"], platform=PLAT, version=item.version, update_pin=False, env=pt.env())
    assert pt.run_binary("grafana")["version"] == "v11.6.0"


# ---------------------------------------------------------------------------------------------------
# 2. a branch pin read from a PLAIN Taskfile var: the head commit that branch_head() finds goes only
#    into the environment, which task ignores for a plain var; `git checkout main` in the existing
#    clone stays on the old local branch, so the "rebuild" silently builds the old commit again.


def test_branch_pin_with_a_plain_taskfile_var_builds_the_new_head(pt: PlatTelemetry) -> None:
    taskfile = pt.root / "arc" / "Taskfile.yml"
    text = taskfile.read_text()
    template = "  ARC_VERSION: '{{.ARC_VERSION | default \"main\"}}'\n"
    assert template in text
    taskfile.write_text(text.replace(template, "  ARC_VERSION: main\n"))  # as grafana writes GF_VERSION
    cfg = load_config(pt.root / "manifest.yaml")
    assert cfg.subsystems["arc"].current == "main" and cfg.subsystems["arc"].version_var == "ARC_VERSION"

    build(cfg, ["arc"], platform=PLAT, env=pt.env())
    assert pt.run_binary("arc")["commit"] == pt.upstreams["arc"].commit_of("main")

    new_head = pt.advance("arc")
    [r] = check(cfg, ["arc"]).results
    assert r.update_available and r.latest == new_head
    [built] = build(cfg, ["arc"], platform=PLAT, env=pt.env())
    # reported as a successful build of arc main, yet it is the old commit again
    assert built.info.commit == new_head
    assert pt.run_binary("arc")["commit"] == new_head


# ---------------------------------------------------------------------------------------------------
# 3. a root Taskfile named Taskfile.yaml (go-task reads it like Taskfile.yml): plan finds "no such
#    task" for every subsystem and plans nothing, though `task nats:bin:build` works.


def test_root_taskfile_yaml_is_a_taskfile_for_plan(tmp_path) -> None:
    ws = make_workspace(tmp_path / "ws", git=False)
    (ws.root / "Taskfile.yml").rename(ws.root / "Taskfile.yaml")
    cfg = ws.config()
    [built] = build(cfg, ["nats"], platform=PLAT, env=ws.env())  # go-task itself finds Taskfile.yaml
    assert built.binary.is_file()
    plan = make_plan(cfg, ["nats", "arc"], [PLAT])
    assert plan.notices == ()
    assert plan.subsystems == ("nats", "arc")


# ---------------------------------------------------------------------------------------------------
# 4. build labels a binary with the version it was asked for without checking that the source it
#    built is that version: a liftbridge Taskfile that also pins its Go toolchain (GO_VERSION, a
#    common shape) leaves no version var chosen, LB_VERSION keeps its default `master`, and the
#    binary built from master is recorded (and would be packaged, signed, released) as v1.9.0.


def test_build_never_labels_another_commit_with_the_asked_version(pt: PlatTelemetry) -> None:
    taskfile = pt.root / "liftbridge" / "Taskfile.yml"
    text = taskfile.read_text()
    taskfile.write_text(text.replace("  LB_SRC:", "  GO_VERSION: '{{.GO_VERSION | default \"1.23.4\"}}'\n  LB_SRC:", 1))
    cfg = load_config(pt.root / "manifest.yaml")
    tag_commit = pt.upstreams["liftbridge"].commit_of("v1.9.0")
    try:
        [built] = build(cfg, ["liftbridge"], platform=PLAT, version="v1.9.0", update_pin=False, env=pt.env())
    except SyncToolsError:  # refusing (one clear error) is fine; a wrong label is not
        return
    ran = pt.run_binary("liftbridge")
    assert (built.info.version, built.info.commit) == ("v1.9.0", ran["commit"])
    assert ran["version"] == "v1.9.0" and ran["commit"] == tag_commit, (
        f".version says v1.9.0 but the binary is {ran['version']} @ {ran['commit'][:12]}")


# ---------------------------------------------------------------------------------------------------
# 5. a pin update that fails after a successful build leaves the Taskfile var written for the build
#    in place: GF_VERSION says 11.5.0 while manifest.yaml still pins 11.4.0.


def test_a_failed_pin_update_puts_the_taskfile_var_back(pt: PlatTelemetry) -> None:
    manifest = _grafana_buildable(pt, flow=True)
    cfg = load_config(manifest)
    assert cfg.subsystems["grafana"].current == "11.4.0"
    taskfile = pt.root / "grafana" / "Taskfile.yml"
    taskfile_before, manifest_before = taskfile.read_bytes(), manifest.read_bytes()
    with pytest.raises(ConfigError):  # the flow mapping cannot be edited in place: a clear error, fine
        build(cfg, ["grafana"], platform=PLAT, version="11.5.0", env=pt.env())
    assert manifest.read_bytes() == manifest_before
    # ...but the Taskfile's GF_VERSION was left at the new version: the two pins now disagree
    assert taskfile.read_bytes() == taskfile_before, "GF_VERSION left at 11.5.0 while the pin is 11.4.0"


# ---------------------------------------------------------------------------------------------------
# 6. a branch pin's releases carry the version "main" on both sides, so refuse_older cannot order
#    them: a late (stale) release job puts an older commit back over a newer one without
#    --allow-downgrade.


def test_a_stale_release_of_a_branch_pin_does_not_roll_agents_back(pt: PlatTelemetry, tmp_path) -> None:
    key, _ = write_keypair(tmp_path / "keys")
    cfg = load_config(pt.root / "manifest.yaml")
    old_dist, new_dist = tmp_path / "dist-old", tmp_path / "dist-new"

    build(cfg, ["arc"], platform=PLAT, env=pt.env())
    old = package(cfg, "arc", platform=PLAT, dist=old_dist)
    new_head = pt.advance("arc")
    build(cfg, ["arc"], platform=PLAT, env=pt.env())
    new = package(cfg, "arc", platform=PLAT, dist=new_dist)
    assert new.commit == new_head and old.commit != new_head

    assert release(cfg, "arc", dist=new_dist, signing_key=str(key)).commit == new_head
    # the older job's release arrives late
    with pytest.raises(DataError, match="older"):
        release(cfg, "arc", dist=old_dist, signing_key=str(key))


# ---------------------------------------------------------------------------------------------------
# 7. a build command that chains its tasks in the shell (`task a && task b`, `task x 2>&1`) is read
#    by has_task() as a list of task names: `&&` is "a task the root Taskfile does not reach", so
#    plan leaves the subsystem out although its build works.


def test_plan_keeps_a_build_command_with_shell_operators(tmp_path) -> None:
    ws = make_workspace(tmp_path / "ws", {"nats": {"build": '["task nats:src:update && task nats:bin:build"]'}},
                        git=False)
    cfg = ws.config()
    [built] = build(cfg, ["nats"], platform=PLAT, env=ws.env())
    assert built.binary.is_file()
    plan = make_plan(cfg, ["nats"], [PLAT])
    assert plan.notices == () and plan.subsystems == ("nats",)


# ---------------------------------------------------------------------------------------------------
# 8. strategy `releases`: the GitHub API call has only a per-read timeout. An API endpoint that
#    trickles its answer a byte at a time (each read well inside the timeout) holds `check` for ever;
#    the git listings of the same check are cut at a total deadline (listing_deadline), this is not.


def test_check_of_a_releases_subsystem_ends_against_a_trickling_api(tmp_path, monkeypatch) -> None:
    import threading
    import time

    from sync_tools.sources import Sources
    from tests.test_check_hardening import TrickleServer

    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n")
    body = b'[{"tag_name": "v1.0.0", "draft": false, "prerelease": false, "target_commitish": "main"}' + b" " * 64
    with TrickleServer(head, body, every=0.2) as server:
        monkeypatch.setenv("GITHUB_API_URL", f"http://127.0.0.1:{server.port}")
        (tmp_path / "sync-tools.yaml").write_text(
            "subsystems:\n  nats:\n    upstream: nats-io/nats-server\n    strategy: releases\n    current: v0.9.0\n")
        cfg = load_config(tmp_path / "sync-tools.yaml")
        done: list[object] = []
        t = threading.Thread(target=lambda: done.append(check(cfg, sources=Sources(timeout=1.0))), daemon=True)
        started = time.monotonic()
        t.start()
        t.join(15)  # ls-remote would have given up after listing_deadline(1.0) = 2 s
        assert done, f"check still waiting on the API after {time.monotonic() - started:.0f}s (no total deadline)"
        [r] = done[0].results  # type: ignore[attr-defined]
        assert r.error is not None and "timed out" in r.error


# ---------------------------------------------------------------------------------------------------
# 9. a failed build puts the old binary back but not its .version: grafana's src:update starts with
#    `rm -rf .bin` (the real platform's shape), so after a failed update the old binary is back with
#    no .version beside it: verify fails, package refuses it, the verified record is lost.


def test_a_failed_build_keeps_the_old_binarys_version_file(pt: PlatTelemetry) -> None:
    from sync_tools.build import verify_installed
    from sync_tools.errors import BuildError

    cfg = load_config(_grafana_buildable(pt))
    [first] = build(cfg, ["grafana"], platform=PLAT, env=pt.env())
    version_file = first.binary.parent / ".version"
    binary_before, version_before = first.binary.read_bytes(), version_file.read_bytes()
    assert [r.status for r in verify_installed(cfg, ["grafana"])] == ["ok"]

    with pytest.raises(BuildError):  # no such upstream version: the build fails, as it should
        build(cfg, ["grafana"], platform=PLAT, version="11.9.9", update_pin=False, env=pt.env())
    assert first.binary.read_bytes() == binary_before  # the old binary is put back...
    assert [r.status for r in verify_installed(cfg, ["grafana"])] == ["ok"]  # ...but not its .version
    assert version_file.read_bytes() == version_before


# ---------------------------------------------------------------------------------------------------
# 10. manifest.yaml without subsystems (no key, `subsystems:` or `subsystems: {}`) while the root
#     Taskfile declares them: load_plat_telemetry's stand-in _LineDict() has no .lines, so every
#     command (check, build, doctor) dies with an AttributeError traceback.


@pytest.mark.parametrize("manifest", ["description: plat-telemetry\n", "subsystems:\n", "subsystems: {}\n"])
def test_a_manifest_without_subsystems_reads_the_taskfiles(tmp_path, manifest) -> None:
    import subprocess
    import sys

    root = tmp_path / "ws"
    (root / "nats").mkdir(parents=True)
    (root / "Taskfile.yml").write_text("version: '3'\nincludes:\n  nats: ./nats\n")
    (root / "nats" / "Taskfile.yml").write_text(
        "version: '3'\nvars:\n  NATS_UPSTREAM_REPO: /nowhere/nats.git\n  NATS_VERSION: v2.10.24\n")
    (root / "manifest.yaml").write_text(manifest)
    p = subprocess.run([sys.executable, "-m", "sync_tools", "doctor", "--offline"], cwd=root,
                       capture_output=True, text=True, timeout=120)
    assert "Traceback" not in p.stderr, p.stderr[-400:]
    cfg = load_config(root / "manifest.yaml")
    assert cfg.subsystems["nats"].current == "v2.10.24"


# ---------------------------------------------------------------------------------------------------
# 11. any var ending in _BIN_PATH is taken for the subsystem's binary path: a Taskfile that also names
#     a tool (GO_BIN_PATH: /usr/local/go/bin/go) makes load_config fail for every command (check
#     included), and setting subsystems.nats.binary in the config does not get past it.


@pytest.mark.parametrize("override", [False, True])
def test_a_tools_bin_path_var_does_not_break_the_config(pt: PlatTelemetry, override: bool) -> None:
    taskfile = pt.root / "nats" / "Taskfile.yml"
    text = taskfile.read_text()
    taskfile.write_text(text.replace("vars:\n", "vars:\n  GO_BIN_PATH: /usr/local/go/bin/go\n", 1))
    manifest = pt.root / "manifest.yaml"
    if override:
        manifest.write_text(manifest.read_text().replace("    version: v2.10.24\n",
                                                         "    version: v2.10.24\n    binary: nats-server\n", 1))
    cfg = load_config(manifest)
    assert cfg.subsystems["nats"].binary_path(pt.root) == pt.binary("nats")


# ---------------------------------------------------------------------------------------------------
# 12. a Taskfile version var in double quotes (`"{{.NATS_VERSION | default \"v2.10.24\"}}"`, valid
#     YAML that config reads fine) cannot be edited by pins.update_pin. build --version moves
#     manifest.yaml's pin first, then fails on the Taskfile var: the command fails (with a multi-line
#     YAML parser message), yet the manifest pin has moved and the Taskfile var has not.


def test_build_version_moves_both_pins_or_neither(pt: PlatTelemetry) -> None:
    taskfile = pt.root / "nats" / "Taskfile.yml"
    text = taskfile.read_text()
    single = "  NATS_VERSION: '{{.NATS_VERSION | default \"v2.10.24\"}}'\n"
    assert single in text
    taskfile.write_text(text.replace(single, '  NATS_VERSION: "{{.NATS_VERSION | default \\"v2.10.24\\"}}"\n'))
    cfg = load_config(pt.root / "manifest.yaml")
    sub = cfg.subsystems["nats"]
    assert sub.current == "v2.10.24" and sub.version_pin is not None  # the var repeats the pin: moved with it
    from sync_tools import taskfiles

    problems = []
    try:
        build(cfg, ["nats"], platform=PLAT, version="v2.10.26", env=pt.env())
    except SyncToolsError as e:
        if len(str(e).splitlines()) != 1:
            problems.append(f"error of {len(str(e).splitlines())} lines")
    after = load_config(pt.root / "manifest.yaml").subsystems["nats"]
    var = taskfiles.subsystem_taskfile(pt.root, "nats").var("NATS_VERSION")
    if (after.current, var.value) not in (("v2.10.24", "v2.10.24"), ("v2.10.26", "v2.10.26")):
        problems.append(f"manifest pin {after.current} but NATS_VERSION {var.value}")
    assert not problems, problems


def test_a_branch_pins_sha_builds_in_a_fresh_checkout_when_its_taskfile_var_is_plain(pt: PlatTelemetry) -> None:
    """The sha plan gives a branch pin's head, in a fresh checkout (no .src), with ``ARC_VERSION: main``
    a plain var: the build writes the sha into the var, so the clone by the pin must name the branch
    on task's command line (the environment does not reach a plain var): `git clone --branch <sha>`
    failed (found by the final read of the fixes)."""
    taskfile = pt.root / "arc" / "Taskfile.yml"
    template = "  ARC_VERSION: '{{.ARC_VERSION | default \"main\"}}'\n"
    assert template in taskfile.read_text()
    taskfile.write_text(taskfile.read_text().replace(template, "  ARC_VERSION: main\n"))
    cfg = load_config(pt.root / "manifest.yaml")
    head = pt.advance("arc")
    assert not (pt.root / "arc" / ".src").exists()
    build(cfg, ["arc"], platform=PLAT, version=head, update_pin=False, env=pt.env())
    assert pt.run_binary("arc")["commit"] == head
    assert "  ARC_VERSION: main\n" in taskfile.read_text()  # the var written for the build is put back
