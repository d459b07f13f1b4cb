"""CLI errors are one line on stderr, once (issue #18): what a person can act on, never a connection
pool's repr or an exception class; "release refused" only for a release that does not verify."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sync_tools.signing import write_keypair
from tests.cli_support import SYNC_TOOLS, cli_workspace, closed_port


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNC_TOOLS_")}
    return subprocess.run([SYNC_TOOLS, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _one_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for noise in ("Traceback", "MaxRetryError", "HTTPConnectionPool", "NewConnectionError", "FileNotFoundError",
                  "[Errno", "nothing configured"):
        assert noise not in proc.stderr, proc.stderr
    return lines[0]


def test_an_unreachable_source_is_a_network_error_not_a_refused_release(tmp_path: Path) -> None:
    port = closed_port()
    cli_workspace(tmp_path, f"http://127.0.0.1:{port}/rel")
    proc = _run(tmp_path, "agent", "--once")
    assert proc.returncode == 1
    assert _one_line(proc) == (f"cannot fetch the release: http://127.0.0.1:{port}/rel/manifest.json: "
                               "connection refused")


def test_a_missing_local_store_names_the_file(tmp_path: Path) -> None:
    cli_workspace(tmp_path, str(tmp_path / "no-such-store"))
    proc = _run(tmp_path, "agent", "--once")
    assert proc.returncode == 1
    assert _one_line(proc) == (f"cannot fetch the release: {tmp_path}/no-such-store/latest/manifest.json: "
                               "no such file or directory")


def test_a_release_that_does_not_verify_is_refused(tmp_path: Path) -> None:
    store = tmp_path / "store" / "latest"
    store.mkdir(parents=True)
    (store / "manifest.json").write_text("{}")
    (store / "manifest.json.sig").write_text("not a signature")
    cli_workspace(tmp_path, str(tmp_path / "store"))
    proc = _run(tmp_path, "agent", "--once")
    assert proc.returncode == 1
    assert _one_line(proc).startswith("release refused: ")


@pytest.mark.parametrize("exc, expected", [
    (ConnectionRefusedError(111, "Connection refused"), "connection refused"),
    (socket.gaierror(-2, "Name or service not known"), "host not found"),
    (FileNotFoundError(2, "No such file or directory", "/x/manifest.json"), "/x/manifest.json: no such file or directory"),
    (TimeoutError("timed out"), "timed out"),
])
def test_describe_names_the_cause(exc: BaseException, expected: str) -> None:
    import urllib3

    from sync_tools.errtext import describe

    assert describe(exc) == expected
    # urllib3 wraps the cause twice (MaxRetryError -> NewConnectionError -> the OSError)
    try:
        try:
            raise exc
        except BaseException as inner:
            raise urllib3.exceptions.NewConnectionError(None, f"failed: {inner}") from inner  # type: ignore[arg-type]
    except urllib3.exceptions.NewConnectionError as wrapped:
        outer = urllib3.exceptions.MaxRetryError(None, "/manifest.json", wrapped)  # type: ignore[arg-type]
    if not isinstance(exc, FileNotFoundError):
        assert describe(outer) == expected


# ------------------------------------------------------------------- a failed reload is not forgotten


def test_a_failed_restart_is_tried_again_until_it_works(world) -> None:  # type: ignore[no-untyped-def]
    """A first install whose restart fails has nothing to roll back to: the binary stays in place, not
    running. The next run used to call it `unchanged` (exit 0); now it restarts it again."""
    import json

    from click.testing import CliRunner

    from sync_tools.agent.state import load_state
    from sync_tools.cli import cli

    def once() -> tuple[int, dict]:
        r = CliRunner().invoke(cli, ["agent", "--once", "--json", "--source", world.server.url,
                                     "--config", str(world.config_path)])
        return r.exit_code, json.loads(r.stdout)

    world.supervisor.rpc().supervisor.stopProcess("nats", True)
    bin_dir = world.root / "nats" / ".bin"
    for p in sorted(bin_dir.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    good = world.config_path.read_text()
    assert world.supervisor.url in good
    world.config_path.write_text(good.replace(world.supervisor.url, f"http://127.0.0.1:{closed_port()}"))

    code, report = once()
    assert code == 1 and report["subsystems"]["nats"]["action"] == "failed"
    assert "reload failed" in report["subsystems"]["nats"]["error"]
    assert "nats" in load_state(world.root).reload_failed

    code, report = once()  # still failing: said so, not "unchanged"
    assert code == 1 and report["subsystems"]["nats"]["action"] == "failed"
    assert "failed before and still does" in report["subsystems"]["nats"]["error"]

    world.config_path.write_text(good)  # the supervisor is reachable again
    code, report = once()
    assert code == 0 and report["subsystems"]["nats"]["action"] == "recovered"
    assert world.health("nats").startswith("nats-v1")
    assert load_state(world.root).reload_failed == {} and "nats" not in load_state(world.root).failed
    code, report = once()
    assert code == 0 and report["subsystems"]["nats"]["action"] == "unchanged"


# ------------------------------------------------------------------------ status shows what is true


def _cli(world, *args: str):  # type: ignore[no-untyped-def]
    from click.testing import CliRunner

    from sync_tools.cli import cli

    r = CliRunner().invoke(cli, [*args, "--config", str(world.config_path)])
    return r.exit_code, r.stdout, r.stderr


def test_status_of_a_root_that_does_not_exist_is_an_error(world, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, out, err = _cli(world, "status", "--root", str(tmp_path / "nope"))
    assert code == 1 and out == ""
    assert err == f"Error: install root {tmp_path / 'nope'} does not exist (--root, or agent.root in the config)\n"


def test_status_after_an_automatic_rollback_and_rollback_says_there_is_nothing_to_undo(world) -> None:  # type: ignore[no-untyped-def]
    import json

    world.publish("nats", "v2", mode="crash")
    world.config_path.write_text(world.config_path.read_text().replace("health_timeout: 5.0", "health_timeout: 3"))
    code, out, _ = _cli(world, "agent", "--once", "--source", world.server.url)
    assert code == 1 and "rolled_back" in out
    code, out, err = _cli(world, "status")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["SUBSYSTEM", "VERSION", "SHA256", "STATE", "RUNS"]
    assert any(line.startswith("nats: held back: build ") and line.endswith("failed its health check")
               for line in lines), out
    st = json.loads(_cli(world, "status", "--json")[1])["nats"]
    assert st["held_back"]["reason"] == "failed its health check" and st["interrupted"] is None
    # .previous is the build running now: a rollback would swap it with itself
    code, out, err = _cli(world, "rollback", "nats")
    assert code == 1 and "nothing to roll back to" in err and len(err.strip().splitlines()) == 1
    assert world.health("nats").startswith("nats-v1")


def test_after_a_rollback_by_hand_the_skip_names_the_rollback(world) -> None:  # type: ignore[no-untyped-def]
    import json

    world.publish("nats", "v2")
    assert _cli(world, "agent", "--once", "--source", world.server.url)[0] == 0
    code, out, err = _cli(world, "rollback", "nats")
    assert code == 0, err
    code, out, err = _cli(world, "agent", "--once", "--json", "--source", world.server.url)
    assert code == 0, err
    nats = json.loads(out)["subsystems"]["nats"]
    assert nats["action"] == "skipped"
    assert nats["error"] == ("held back: this build was rolled back by hand (sync-tools rollback); "
                             "waiting for a new one")
    st = json.loads(_cli(world, "status", "--json")[1])["nats"]
    assert st["held_back"]["reason"] == "was rolled back by hand (sync-tools rollback)"


def test_status_shows_an_interrupted_install(world) -> None:  # type: ignore[no-untyped-def]
    import json

    from sync_tools.agent.install import CRASH_ENV

    world.publish("nats", "v2")
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    crashed = subprocess.run([sys.executable, "-m", "sync_tools", "agent", "--once", "--source", world.server.url,
                              "--config", str(world.config_path)], env={**env, CRASH_ENV: "swapped"},
                             capture_output=True, text=True, timeout=60)
    assert crashed.returncode == -9
    st = json.loads(_cli(world, "status", "--json")[1])["nats"]
    assert st["interrupted"]["kind"] == "update" and st["interrupted"]["new_sha256"]
    out = _cli(world, "status")[1]
    assert "nats: interrupted update of " in out and "the next agent run finishes it" in out


def test_the_running_executable_is_read_from_proc(tmp_path: Path) -> None:
    """This test's own process: /proc/<pid>/exe is the interpreter, whatever its path is called."""
    import hashlib

    from sync_tools.agent.statusinfo import process_exe

    exe = Path(os.readlink(f"/proc/{os.getpid()}/exe"))
    sha = hashlib.sha256(exe.read_bytes()).hexdigest()
    assert process_exe(os.getpid(), sha) == {"path": str(exe), "sha256": sha, "is_installed": True}
    other = process_exe(os.getpid(), "0" * 64)
    assert other is not None and other["is_installed"] is False
    script = tmp_path / "svc"
    script.write_text("#!/bin/sh\nexec sleep 1\n")
    assert process_exe(os.getpid(), "0" * 64, installed=script)["is_installed"] is None  # type: ignore[index]
    assert process_exe(None, sha) is None


# --------------------------------------------------------------------- file modes follow the umask


@pytest.mark.parametrize("umask, expected", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_state_follows_the_umask_and_secrets_stay_private(tmp_path: Path, umask: int, expected: int) -> None:
    import stat

    from sync_tools.agent.state import AgentState, save_state, state_path
    from sync_tools.fsutil import atomic_write_text
    from sync_tools.versionfile import VERSION_FILE, VersionInfo, write_version

    old = os.umask(umask)
    try:
        write_version(tmp_path / "nats" / ".bin", VersionInfo(commit="abc", timestamp="2026-01-01T00:00:00Z",
                                                              checksum="0" * 64, version="v1"))
        save_state(tmp_path, AgentState(serial=3))
        atomic_write_text(tmp_path / "secret", "x", mode=0o600)
        priv, pub = write_keypair(tmp_path / "keys")
    finally:
        os.umask(old)

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    assert mode(tmp_path / "nats" / ".bin" / VERSION_FILE) == expected
    assert mode(state_path(tmp_path)) == expected
    assert mode(tmp_path / "secret") == 0o600 and mode(Path(priv)) == 0o600
    assert mode(Path(pub)) == 0o644


# ------------------------------------------------------------------------------------- config errors


@pytest.mark.parametrize("body, expected", [
    # a key indented one space short
    ("subsystems:\n  nats:\n    upstream: x\n   binary: y\n",
     "sync-tools.yaml:4: invalid YAML (column 4): expected <block end>, but found '<block mapping start>': check "
     "the indentation of this line and the one above: the keys of one mapping start in the same column"),
    # a regex in double quotes: \d is no YAML escape
    ('subsystems:\n  nats:\n    upstream: x\n    include: "^v\\d+"\n',
     "sync-tools.yaml:4: invalid YAML (column 18): found unknown escape character 'd': in \"double quotes\" a "
     "backslash starts an escape: write a regex such as ^v\\d+ in 'single quotes' (or unquoted)"),
    # ... and \b is one: a backspace, which would never match
    ('subsystems:\n  nats:\n    upstream: x\n    include: "^v\\b"\n',
     "sync-tools.yaml:4: subsystems.nats.include: regex '^v\\x08' holds a control character: write it in "
     "'single quotes'"),
    # a bad regex is shown as written, its backslashes not doubled
    ("subsystems:\n  nats:\n    upstream: x\n    include: '^v(\\d+'\n",
     "sync-tools.yaml:4: subsystems.nats.include: bad regex '^v(\\d+': missing ), unterminated subpattern at "
     "position 2"),
    ("subsystems:\n  nats:\n    upstream: x\n    include: [a\n",
     "sync-tools.yaml:5: invalid YAML (column 1): expected ',' or ']', but got '<stream end>': a [ list is not "
     "closed with ]"),
])
def test_config_errors_say_where_and_how_to_fix_them(tmp_path: Path, body: str, expected: str) -> None:
    (tmp_path / "sync-tools.yaml").write_text(body)
    proc = _run(tmp_path, "check")
    assert proc.returncode == 1
    assert _one_line(proc) == f"Error: {tmp_path}/{expected}"
