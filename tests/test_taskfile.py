"""The root Taskfile.yml, run with the real ``task`` binary (PyPI go-task-bin) on a temp workspace."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sync_tools import signing
from sync_tools.manifest import verify_manifest
from tests.workspace import make_workspace

REPO = Path(__file__).resolve().parent.parent
TASKFILE = REPO / "Taskfile.yml"
TASK = str(Path(sys.executable).parent / "task")
REQUIRED = ("sync:check", "sync:update", "sync:build", "sync:release", "bin:verify", "relay:run", "agent:run",
            "test", "demo")


def _task(ws, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = ws.env()
    env.pop("SYNC_TOOLS_CONFIG")  # the tasks must find ./sync-tools.yaml in the caller's directory
    proc = subprocess.run([TASK, "-t", str(TASKFILE), *args], cwd=ws.root, env=env, capture_output=True,
                          text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("taskfile") / "ws", git=False)


def test_lists_every_required_task(ws) -> None:
    out = _task(ws, "--list-all", "--json").stdout
    names = {t["name"] for t in json.loads(out)["tasks"]}
    assert set(REQUIRED) <= names


def test_sync_update_builds_packages_releases_and_verifies_only_that_subsystem(ws) -> None:
    proc = _task(ws, "sync:update", "SUBSYSTEM=nats", "PLATFORM=linux/amd64")
    assert "released nats v1.0.0" in proc.stdout
    data = (ws.release_dir / "manifest.json").read_bytes()
    sig = (ws.release_dir / "manifest.json.sig").read_bytes()
    m = verify_manifest(data, sig, signing.load_public_key(str(ws.public_key)))
    assert set(m.subsystems) == {"nats"}
    assert not (ws.root / "arc" / ".bin").exists()
    assert "ok" in _task(ws, "bin:verify", "SUBSYSTEM=nats").stdout


def test_sync_build_with_version_then_sync_release(ws) -> None:
    ws.release_upstream("arc", "v1.2.0")
    _task(ws, "sync:build", "SUBSYSTEM=arc", "VERSION=v1.2.0", "PLATFORM=linux/amd64")
    assert ws.config().subsystems["arc"].current == "v1.2.0"
    assert "released arc v1.2.0" in _task(ws, "sync:release", "SUBSYSTEM=arc", "PLATFORM=linux/amd64").stdout


def test_required_subsystem_and_failing_verify(ws, tmp_path) -> None:
    proc = _task(ws, "sync:build", check=False)
    assert proc.returncode != 0 and "SUBSYSTEM" in proc.stderr
    bad = make_workspace(tmp_path / "ws", ["solo"], git=False)
    bad.binary_path("solo").parent.mkdir(parents=True)
    bad.binary_path("solo").write_bytes(b"not built by sync-tools")
    proc = _task(bad, "bin:verify", check=False)
    assert proc.returncode != 0 and "solo: missing-version" in proc.stderr


def test_sync_check_passes_cli_args(ws) -> None:
    report = json.loads(_task(ws, "sync:check", "--", "nats", "--json").stdout)
    assert report["nats"]["current"] == "v1.0.0" and report["nats"]["latest"] == "v1.0.0"


@pytest.mark.parametrize("args,expected", [
    (("relay:run", "PORT=9999"), "sync-tools relay --host 127.0.0.1 --port 9999"),
    (("agent:run", "--", "--once"), "sync-tools agent --once"),
    (("demo",), "sync-tools demo"),
    (("test", "--", "-q"), "python3 run.py test -q"),
    (("sync:update", "SUBSYSTEM=nats"), "sync-tools build --only nats"),
])
def test_command_lines(ws, args, expected) -> None:
    proc = _task(ws, "--dry", *args)
    assert expected in proc.stdout + proc.stderr
