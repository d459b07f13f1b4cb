"""sync-tools on plat-telemetry as it stands (tests/platform_fixture.py has every trait of the real
repository): one test per point of the adoption issue, each failing without its fix. Real `task`, real
git upstreams with hundreds of tags, and a stand-in `go` whose binary says which commit it was built
from, so a test can tell what was really built."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sync_tools.config import load_config
from tests.platform_fixture import PlatTelemetry, make_plat_telemetry


@pytest.fixture(scope="module")
def pt_module(tmp_path_factory) -> PlatTelemetry:
    """One fixture for the read-only tests (check, config, plan, doctor); tests that build get their own."""
    with make_plat_telemetry(tmp_path_factory.mktemp("plat")) as pt:
        yield pt


@pytest.fixture
def pt(tmp_path) -> PlatTelemetry:
    with make_plat_telemetry(tmp_path) as pt:
        yield pt


def st(pt: PlatTelemetry, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The real CLI in the workspace (its manifest.yaml found as a new user's would be)."""
    return subprocess.run([sys.executable, "-m", "sync_tools", *args], cwd=pt.root, env=pt.env(**env),
                          capture_output=True, text=True, timeout=300)


def check_json(pt: PlatTelemetry, *names: str) -> tuple[int, dict, str]:
    p = st(pt, "check", "--json", *names)
    return p.returncode, json.loads(p.stdout), p.stderr


def upstream_commit(pt: PlatTelemetry, name: str, ref: str) -> str:
    return pt.upstreams[name].commit_of(ref)


# ------------------------------------------------------------------------ 1. branch pins


def test_1_a_branch_pin_follows_the_branch_against_the_installed_commit(pt: PlatTelemetry) -> None:
    code, out, err = check_json(pt, "arc", "telegraf")
    assert code == 0, err
    head = upstream_commit(pt, "arc", "main")
    assert out["arc"]["latest"] == head and out["arc"]["update_available"] is True  # nothing installed
    assert out["arc"]["branch"] == "main" and out["telegraf"]["branch"] == "master"

    p = st(pt, "build", "--only", "arc", "--platform", "linux/amd64")
    assert p.returncode == 0, p.stderr
    assert pt.run_binary("arc")["commit"] == head  # built from the branch head

    code, out, err = check_json(pt, "arc")
    assert code == 0 and out["arc"]["update_available"] is False and out["arc"]["current_commit"] == head
    record = json.loads((pt.root / ".version-manifest.json").read_text())["subsystems"]["arc"]
    assert record["current_commit"] == head and record["latest_commit"] == head and record["branch"] == "main"

    new_head = pt.advance("arc")
    code, out, err = check_json(pt, "arc")
    assert out["arc"]["latest"] == new_head and out["arc"]["update_available"] is True
    assert out["arc"]["current_commit"] == head
    # the build follows the branch too: its Taskfile's `git checkout main` alone would stay behind
    assert st(pt, "build", "--only", "arc", "--platform", "linux/amd64").returncode == 0
    assert pt.run_binary("arc")["commit"] == new_head
    assert check_json(pt, "arc")[1]["arc"]["update_available"] is False
    assert load_config(pt.root / "manifest.yaml").subsystems["arc"].current == "main"  # still a branch pin
    head = new_head
    new_head = pt.advance("arc")
    # a short sha in a hand-written .version (the Taskfile's own format) names the same commit
    version_file = pt.root / "arc" / ".bin" / ".version"
    version_file.write_text(version_file.read_text().replace(f"commit: {head}", f"commit: {new_head[:7]}"))
    code, out, err = check_json(pt, "arc")
    assert out["arc"]["update_available"] is False


# ------------------------------------------------------------------------ 2. a pin not upstream


def test_2_a_pin_that_is_not_upstream_is_an_error_and_a_v_less_pin_matches(pt_module: PlatTelemetry) -> None:
    p = st(pt_module, "check", "--json")
    out = json.loads(p.stdout)
    assert p.returncode == 1
    assert "pinned v1.10.0 is not a tag or branch" in out["liftbridge"]["error"]
    assert "newest: v1.9.0" in out["liftbridge"]["error"]
    assert "Error: liftbridge: pinned v1.10.0" in p.stderr
    # grafana's pin 11.4.0 is the upstream's v11.4.0: checked, with newer releases found
    assert "error" not in out["grafana"] and out["grafana"]["latest"] == "v11.6.0"
    assert out["grafana"]["update_available"] is True
    # nats: hundreds of tags, RCs, betas, -binary and nightly-* tags: the newest v2 release
    assert out["nats"]["latest"] == "v2.12.2" and "major_available" not in out["nats"]


# ------------------------------------------------------------------------ 3. honest builds


def test_3_a_build_over_an_existing_binary_really_builds(pt: PlatTelemetry) -> None:
    assert st(pt, "build", "--only", "nats", "--platform", "linux/amd64").returncode == 0
    assert pt.run_binary("nats")["version"] == "v2.10.24"
    # task alone skips: the status guard sees a binary (the trap)
    assert "up to date" in (pt.task("nats:bin:build").stdout + pt.task("nats:bin:build").stderr)

    p = st(pt, "build", "--only", "nats", "--version", "v2.10.26", "--platform", "linux/amd64")
    assert p.returncode == 0, p.stderr
    built = pt.run_binary("nats")
    assert built["version"] == "v2.10.26" and built["commit"] == upstream_commit(pt, "nats", "v2.10.26")
    assert pt.version_file("nats")["version"] == "v2.10.26"
    assert st(pt, "verify", "nats").returncode == 0
    assert not (pt.root / "nats" / ".nats-server.before-build").exists()

    before = pt.binary("nats").read_bytes()
    version_before = (pt.root / "nats" / ".bin" / ".version").read_text()
    p = st(pt, "build", "--only", "nats", "--version", "v2.10.99", "--platform", "linux/amd64")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert pt.binary("nats").read_bytes() == before  # the old binary is back
    assert (pt.root / "nats" / ".bin" / ".version").read_text() == version_before
    assert load_config(pt.root / "manifest.yaml").subsystems["nats"].current == "v2.10.26"


def test_3_a_build_that_writes_no_binary_is_refused(pt: PlatTelemetry) -> None:
    """A build task that does nothing (its status guard, or a no-op) leaves nothing to label."""
    assert st(pt, "build", "--only", "nats", "--platform", "linux/amd64").returncode == 0
    taskfile = pt.root / "nats" / "Taskfile.yml"
    text = taskfile.read_text()
    taskfile.write_text(text.replace("go build", "true go build"))  # a build that builds nothing
    before = pt.binary("nats").read_bytes()
    p = st(pt, "build", "--only", "nats", "--platform", "linux/amd64")
    assert p.returncode == 1 and "wrote no binary" in p.stderr and "old binary is put back" in p.stderr
    assert pt.binary("nats").read_bytes() == before


# ------------------------------------------------------------------------ 4. the version reaches the build


def test_4_the_version_reaches_the_taskfile_var_the_build_reads(pt: PlatTelemetry) -> None:
    """liftbridge's Taskfile reads LB_VERSION (default master); LIFTBRIDGE_VERSION built master."""
    cfg = load_config(pt.root / "manifest.yaml")
    assert cfg.subsystems["liftbridge"].version_var == "LB_VERSION"
    assert cfg.subsystems["grafana"].version_var == "GF_VERSION"
    p = st(pt, "build", "--only", "liftbridge", "--version", "v1.9.0", "--platform", "linux/amd64")
    assert p.returncode == 0, p.stderr
    built = pt.run_binary("liftbridge")
    assert built["version"] == "v1.9.0" and built["commit"] == upstream_commit(pt, "liftbridge", "v1.9.0")


def test_4_version_var_from_config_wins(tmp_path) -> None:
    ws = tmp_path / "ws"
    (ws / "nats").mkdir(parents=True)
    (ws / "sync-tools.yaml").write_text("subsystems:\n  nats:\n    upstream: /x\n    current: v1.0.0\n"
                                        "    version_var: SERVER_REL\n")
    (ws / "nats" / "Taskfile.yml").write_text(
        "version: '3'\nvars:\n  NATS_VERSION: v1.0.0\n  SERVER_REL: '{{.SERVER_REL | default \"v1.0.0\"}}'\n")
    assert load_config(ws / "sync-tools.yaml").subsystems["nats"].version_var == "SERVER_REL"


# ------------------------------------------------------------------------ 5. one pin, kept in step


def test_5_a_taskfile_default_that_repeats_the_pin_moves_with_it(pt: PlatTelemetry) -> None:
    manifest = pt.root / "manifest.yaml"
    taskfile = pt.root / "nats" / "Taskfile.yml"
    m0, t0 = manifest.read_text().splitlines(), taskfile.read_text().splitlines()
    p = st(pt, "build", "--only", "nats", "--version", "v2.10.26", "--platform", "linux/amd64")
    assert p.returncode == 0, p.stderr
    m1, t1 = manifest.read_text().splitlines(), taskfile.read_text().splitlines()
    assert [(a, b) for a, b in zip(m0, m1, strict=True) if a != b] == [
        ("    version: v2.10.24", "    version: v2.10.26")]
    changed = [(a, b) for a, b in zip(t0, t1, strict=True) if a != b]
    assert len(changed) == 1 and "v2.10.24" in changed[0][0] and "v2.10.26" in changed[0][1]
    # `task nats:ensure` outside sync-tools now builds the same version
    pt.binary("nats").unlink()
    pt.task("nats:ensure")
    assert pt.run_binary("nats")["version"] == "v2.10.26"
    # liftbridge's LB_VERSION default (master) is not the pin: it is left alone
    lb_taskfile = (pt.root / "liftbridge" / "Taskfile.yml").read_text()
    assert st(pt, "build", "--only", "liftbridge", "--version", "v1.9.0", "--platform", "linux/amd64").returncode == 0
    assert (pt.root / "liftbridge" / "Taskfile.yml").read_text() == lb_taskfile


# ------------------------------------------------------------------------ 6. real layouts


def test_6_a_binary_in_a_subfolder_and_a_legacy_version_file(pt: PlatTelemetry) -> None:
    cfg = load_config(pt.root / "manifest.yaml")
    graf = cfg.subsystems["grafana"]
    assert graf.binary == "grafana-server" and graf.binary_path(pt.root) == pt.binary("grafana")
    pt.task("-d", "grafana", "src:update")  # grafana's own way in: not through the root Taskfile
    assert pt.version_file("grafana") == {"version": "11.4.0"}  # one line
    p = st(pt, "verify", "grafana")
    assert p.returncode == 0 and "unverified" in p.stdout, p.stdout + p.stderr
    p = st(pt, "package", "--only", "grafana", "--platform", "linux/amd64")
    assert p.returncode == 1 and "legacy" in p.stderr
    escape = pt.root / "sync-tools.yaml"
    escape.write_text("subsystems:\n  grafana:\n    upstream: /x\n    binary: ../../etc/passwd\n")
    p = st(pt, "--config", str(escape), "verify")
    assert p.returncode == 1 and "must stay inside" in p.stderr


# ------------------------------------------------------------------------ 7. which subsystems exist


def test_7_subsystems_come_from_the_manifest_and_the_root_taskfile(pt: PlatTelemetry) -> None:
    cfg = load_config(pt.root / "manifest.yaml")
    assert list(cfg.subsystems) == ["nats", "liftbridge", "arc", "telegraf", "grafana"]  # not gh, pc, sync
    # a new include with an upstream, listed in SUBSYSTEMS_RELEASE, is a subsystem without a manifest line
    extra = pt.root / "vector"
    extra.mkdir()
    (extra / "Taskfile.yml").write_text(
        "version: '3'\nvars:\n  VEC_UPSTREAM_REPO: " + str(pt.upstreams["nats"].path) + "\n"
        "  VEC_VERSION: '{{.VEC_VERSION | default \"v2.10.24\"}}'\n  VEC_BIN_NAME: vector\n"
        "tasks:\n  src:update: {cmds: [echo]}\n  bin:build: {cmds: [echo]}\n")
    root_tf = pt.root / "Taskfile.yml"
    data = yaml.safe_load(root_tf.read_text())
    data["includes"]["vector"] = {"taskfile": "./vector/Taskfile.yml", "dir": "./vector"}
    data["vars"]["SUBSYSTEMS_RELEASE"] += " vector"
    root_tf.write_text(yaml.safe_dump(data))
    cfg = load_config(pt.root / "manifest.yaml")
    vec = cfg.subsystems["vector"]
    assert vec.current == "v2.10.24" and vec.binary == "vector" and vec.version_var == "VEC_VERSION"
    assert vec.pin is not None and vec.pin.kind == "taskfile"
    # plan never plans a leg whose build tasks do not exist (grafana is not included by the root)
    p = st(pt, "plan", "--all", "--platform", "linux/amd64")
    planned = {i["subsystem"] for i in json.loads(p.stdout)["include"]}
    assert planned == {"nats", "liftbridge", "arc", "telegraf", "vector"}
    assert "notice: grafana: not planned" in p.stderr


# ------------------------------------------------------------------------ 8. plan


def test_8_default_paths_are_build_inputs_not_runtime_config(pt_module: PlatTelemetry, tmp_path) -> None:
    def planned(*files: str) -> set[str]:
        (tmp_path / "changed").write_text("\n".join(files))
        p = st(pt_module, "plan", "--changed-files", str(tmp_path / "changed"), "--platform", "linux/amd64")
        assert p.returncode == 0, p.stderr
        return {i["subsystem"] for i in json.loads(p.stdout)["include"]}

    assert planned("nats/nats.conf", "liftbridge/configs/standalone.yaml", "arc/arc.toml") == set()
    assert planned("nats/Taskfile.yml") == {"nats"}


def test_8_a_dispatch_build_would_refuse_is_left_out(pt_module: PlatTelemetry, tmp_path) -> None:
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"action": "upstream-release", "client_payload": {
        "subsystem": "nats", "version": "v3.0.0", "commit": "abc", "upstream": "x", "delivery": "d"}}))
    p = st(pt_module, "plan", "--event", str(event))
    assert json.loads(p.stdout) == {"include": []}
    assert "notice: nats: not planned: v3.0.0 is a new major" in p.stderr


# ------------------------------------------------------------------------ 9. reload as the owner does it


def test_9_health_defaults_to_the_taskfiles_health_task(pt_module: PlatTelemetry) -> None:
    cfg = load_config(pt_module.root / "manifest.yaml")
    assert cfg.subsystems["nats"].health == "task nats:health"
    assert cfg.subsystems["liftbridge"].health == "task liftbridge:health"
    assert cfg.subsystems["grafana"].health is None  # the root Taskfile cannot run grafana's
    procs = yaml.safe_load((pt_module.root / "process-compose.yaml").read_text())["processes"]
    assert procs["nats"]["command"] == "task nats:run"  # process-compose's pid is task's


# ------------------------------------------------------------------------ 11. --config first, exit codes


def test_11_config_before_the_subcommand_and_exit_10_despite_a_failure(pt_module: PlatTelemetry, tmp_path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    p = subprocess.run([sys.executable, "-m", "sync_tools", "--config", str(pt_module.root / "manifest.yaml"),
                        "check", "--exit-code"], cwd=elsewhere, env=pt_module.env(), capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 10, p.stderr  # nats has an update; liftbridge's failure does not hide it
    assert "Error: liftbridge: pinned v1.10.0" in p.stderr
    p = subprocess.run([sys.executable, "-m", "sync_tools", "--config", str(pt_module.root / "manifest.yaml"),
                        "check", "liftbridge", "--exit-code"], cwd=elsewhere, env=pt_module.env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1


def test_11_a_config_after_the_subcommand_still_wins(pt_module: PlatTelemetry, tmp_path) -> None:
    other = tmp_path / "sync-tools.yaml"
    other.write_text(f"subsystems:\n  only:\n    upstream: {pt_module.upstreams['grafana'].path}\n"
                     "    current: v11.4.0\n")
    p = subprocess.run([sys.executable, "-m", "sync_tools", "--config", str(pt_module.root / "manifest.yaml"),
                        "check", "--json", "--config", str(other)], cwd=tmp_path, env=pt_module.env(),
                       capture_output=True, text=True, timeout=300)
    assert list(json.loads(p.stdout)) == ["only"]


def test_readme_has_the_adoption_section() -> None:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Adopting sync-tools in an existing platform repo", 1)[1].split("\n## ", 1)[0]
    assert "sync-tools doctor" in section.split("```")[1]  # doctor first
