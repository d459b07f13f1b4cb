"""``build``: a subsystem's own commands via the real ``task``, GOOS/GOARCH, streamed output, .version,
failures naming the command and exit code, depends_on order, and nothing of another subsystem touched."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from sync_tools.build import build, build_order, host_platform, parse_platform
from sync_tools.cli import cli
from sync_tools.config import load_config
from sync_tools.errors import BuildError, ConfigError
from sync_tools.fsutil import sha256_file
from sync_tools.versionfile import read_version
from tests.workspace import BIN_DIR, make_workspace


def _tree(path: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under *path*: bytes and mtime."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*")) if p.is_file() and ".git" not in p.parts}


@pytest.fixture
def ws(tmp_path):
    return make_workspace(tmp_path / "ws", git=False)


def test_build_runs_task_writes_version_and_touches_nothing_else(ws, capfd) -> None:
    cfg = ws.config()
    arc_before = _tree(ws.root / "arc")
    [result] = build(cfg, ["nats"], platform="linux/arm64", env=ws.env())
    binary = ws.binary_path("nats")
    assert result.binary == binary
    assert b"nats v1.0.0 linux/arm64" in binary.read_bytes()  # GOOS/GOARCH reached the build
    assert binary.stat().st_mode & 0o777 == 0o755
    info = read_version(binary.parent)
    from dulwich.repo import Repo

    with Repo(str(ws.upstreams["nats"])) as up:
        tag_commit = up[up.refs[b"refs/tags/v1.0.0"]].object[1].decode()
    assert info.commit == tag_commit
    assert info.checksum == sha256_file(binary)
    assert info.version == "v1.0.0"
    assert _tree(ws.root / "arc") == arc_before
    out = capfd.readouterr()
    # The commands' output went straight to our stdout (streamed, not collected).
    assert "bin:build .bin/nats-server for linux/arm64" in out.out


def test_version_flag_builds_that_upstream_version_and_bumps_only_the_pin_line(ws) -> None:
    new_commit = ws.release_upstream("nats", "v1.1.0")
    config_before = ws.config_path.read_bytes()
    [result] = build(ws.config(), ["nats"], platform="linux/amd64", version="v1.1.0", env=ws.env())
    assert result.pin_updated
    assert b"nats v1.1.0" in ws.binary_path("nats").read_bytes()
    assert read_version(ws.binary_path("nats").parent).commit == new_commit
    after = ws.config_path.read_bytes()
    assert after == config_before.replace(b"    current: v1.0.0\n    binary: nats-server",
                                          b"    current: v1.1.0\n    binary: nats-server")
    assert ws.config().subsystems["arc"].current == "v1.0.0"


def test_a_new_major_under_major_manual_needs_allow_major(ws) -> None:
    new_commit = ws.release_upstream("nats", "v2.0.0")
    config_before = ws.config_path.read_bytes()
    assert ws.config().subsystems["nats"].major == "manual"
    result = CliRunner().invoke(cli, ["build", "--only", "nats", "--version", "v2.0.0",
                                      "--config", str(ws.config_path)], env=ws.env())
    assert result.exit_code == 1
    assert "v2.0.0 is a new major over the pinned v1.0.0" in result.output and "--allow-major" in result.output
    assert ws.config_path.read_bytes() == config_before and not ws.binary_path("nats").exists()

    result = CliRunner().invoke(cli, ["build", "--only", "nats", "--version", "v2.0.0", "--allow-major",
                                      "--config", str(ws.config_path)], env=ws.env())
    assert result.exit_code == 0, result.output
    assert read_version(ws.binary_path("nats").parent).commit == new_commit
    assert ws.config().subsystems["nats"].current == "v2.0.0"


def test_failing_command_stops_the_build_naming_command_and_exit_code(tmp_path) -> None:
    ws = make_workspace(tmp_path / "ws", {"nats": {"build": '["echo one > first.txt", "exit 3", '
                                                          '"echo never > never.txt"]'},
                                          "arc": {"depends_on": ["nats"]}}, git=False)
    with pytest.raises(BuildError) as e:
        build(ws.config(), ["arc", "nats"], env=ws.env())
    assert "'exit 3'" in str(e.value) and "exit code 3" in str(e.value)
    assert (ws.root / "first.txt").exists()
    assert not (ws.root / "never.txt").exists()
    assert not (ws.root / "nats" / ".bin" / ".version").exists()
    assert not (ws.root / "arc" / ".bin").exists()  # arc comes after nats and never ran


def test_missing_binary_after_the_build_is_a_clear_error(tmp_path) -> None:
    ws = make_workspace(tmp_path / "ws", {"nats": {"build": '["true"]'}}, git=False)
    with pytest.raises(BuildError, match="wrote no binary at .*nats-server"):
        build(ws.config(), ["nats"], env=ws.env())


def test_depends_on_order(tmp_path) -> None:
    def cmd(name: str) -> str:
        return f'["mkdir -p {name}/.bin && echo {name} > {name}/.bin/{name} && echo {name} >> order.log"]'

    subs = {"a": {"build": cmd("a"), "depends_on": ["c"]}, "b": {"build": cmd("b")},
            "c": {"build": cmd("c"), "depends_on": ["b"]}}
    ws = make_workspace(tmp_path / "ws", subs, git=False)
    results = build(ws.config(), ["a", "c", "b"], env=ws.env())
    assert [r.subsystem for r in results] == ["b", "c", "a"]
    assert (ws.root / "order.log").read_text().split() == ["b", "c", "a"]
    assert [s.name for s in build_order(ws.config(), ["a"])] == ["a"]  # deps are ordered, not added
    for r in results:
        assert read_version(r.binary.parent).commit == "unknown"  # no .src checkout


def test_commit_from_env_when_there_is_no_source_checkout(tmp_path) -> None:
    ws = make_workspace(tmp_path / "ws", {"x": {"build": '["mkdir -p x/.bin && echo hi > x/.bin/x"]'}}, git=False)
    build(ws.config(), ["x"], env=ws.env(SYNC_TOOLS_COMMIT="abc123"))
    assert read_version(ws.root / "x" / ".bin").commit == "abc123"


def test_timeout_kills_the_command(tmp_path) -> None:
    ws = make_workspace(tmp_path / "ws", {"x": {"build": '["sleep 30"]'}}, git=False)
    started = time.monotonic()
    with pytest.raises(BuildError, match="timed out"):
        build(ws.config(), ["x"], env=ws.env(), timeout=0.5)
    assert time.monotonic() - started < 10


def test_platforms() -> None:
    assert parse_platform("linux/arm64") == ("linux", "arm64")
    assert parse_platform(None) == tuple(host_platform().split("/"))
    for bad in ("linux", "Linux/amd64", "linux/amd64/v8", "../x"):
        with pytest.raises(ConfigError):
            parse_platform(bad)


def test_bad_arguments(ws) -> None:
    cfg = ws.config()
    with pytest.raises(ConfigError, match="unknown subsystem 'nope'"):
        build(cfg, ["nope"], env=ws.env())
    with pytest.raises(ConfigError, match="exactly one"):
        build(cfg, ["nats", "arc"], version="v2", env=ws.env())


def test_cli_json_keeps_stdout_for_json(ws) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["build", "--only", "nats", "--platform", "darwin/arm64", "--json",
                                 "--config", str(ws.config_path)], env=ws.env())
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.stdout)
    assert row["subsystem"] == "nats" and row["platform"] == "darwin/arm64" and row["version"] == "v1.0.0"
    assert row["checksum"] == sha256_file(ws.binary_path("nats"))


def test_cli_failure_is_one_line_exit_1(tmp_path) -> None:
    ws = make_workspace(tmp_path / "ws", {"nats": {"build": '["exit 7"]'}}, git=False)
    result = CliRunner().invoke(cli, ["build", "--only", "nats", "--config", str(ws.config_path)], env=ws.env())
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == ["Error: build command 'exit 7' failed with exit code 7"]


def _plat_telemetry(root: Path, var: str) -> Path:
    """A plat-telemetry style workspace: manifest.yaml without versions, the pin in x/Taskfile.yml."""
    root.mkdir()
    (root / "manifest.yaml").write_text("subsystems:\n  x:\n    upstream: https://example.invalid/x\n")
    (root / "Taskfile.yml").write_text("version: '3'\nincludes:\n  x:\n    taskfile: ./x/Taskfile.yml\n    dir: ./x\n")
    (root / "x").mkdir()
    taskfile = root / "x" / "Taskfile.yml"
    taskfile.write_text(
        "version: '3'\n"
        "vars:\n"
        f"  X_VERSION: {var}  # the pin\n"
        "tasks:\n"
        "  src:update:\n"
        "    cmds: ['true']\n"
        "  bin:build:\n"
        "    cmds:\n"
        "      - 'test \"{{.X_VERSION}}\" != v9 || exit 9'\n"
        "      - mkdir -p .bin && echo 'built {{.X_VERSION}}' > .bin/x\n")
    return taskfile


@pytest.mark.parametrize("var,pinned", [("v1.0.0", "v1.0.0"), ("'{{.X_VERSION | default \"v1.0.0\"}}'", "v1.0.0")])
def test_taskfile_pins_plain_or_template_build_the_asked_version(tmp_path, var, pinned) -> None:
    env = {**os.environ, "PATH": BIN_DIR + os.pathsep + os.environ["PATH"]}
    taskfile = _plat_telemetry(tmp_path / "ws", var)
    original = taskfile.read_bytes()
    cfg = load_config(tmp_path / "ws" / "manifest.yaml")
    assert cfg.subsystems["x"].current == pinned
    binary = tmp_path / "ws" / "x" / ".bin" / "x"

    # (a new major: --allow-major, which this test is not about)
    build(cfg, ["x"], version="v2.0.0", update_pin=False, allow_major=True, env=env)  # CI: build it, leave the pin
    assert binary.read_text() == "built v2.0.0\n"
    assert taskfile.read_bytes() == original

    with pytest.raises(BuildError, match="task x:bin:build.* failed with exit code"):
        build(cfg, ["x"], version="v9", allow_major=True, env=env)
    assert taskfile.read_bytes() == original  # a failed build keeps the old pin

    [result] = build(cfg, ["x"], version="v2.0.0", allow_major=True, env=env)
    assert result.pin_updated and binary.read_text() == "built v2.0.0\n"
    assert taskfile.read_bytes() == original.replace(b"v1.0.0", b"v2.0.0")
    assert load_config(tmp_path / "ws" / "manifest.yaml").subsystems["x"].current == "v2.0.0"
