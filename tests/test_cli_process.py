"""The console entry point as a real process (`python -m sync_tools`, i.e. sync_tools.cli.main): its
output, exit codes, files and log lines all arrive, although main() freezes the garbage collector's
objects as the process ends (so the interpreter's last collection does not walk them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.gitrepos import GitRepo


def sync_tools(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SYNC_TOOLS_CONFIG"}
    return subprocess.run([sys.executable, "-m", "sync_tools", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def workspace(tmp_path: Path) -> Path:
    up = GitRepo.create(tmp_path / "up" / "a.git")
    up.commit("one")
    up.tag("v1.0.0")
    up.commit("two")
    up.tag("v1.1.0", annotated=True)
    up.close()
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "sync-tools.yaml").write_text(yaml.safe_dump({"subsystems": {
        "a": {"upstream": "../up/a.git", "current": "v1.0.0"},
        "b": {"upstream": "../up/a.git", "current": "v1.1.0"},
        "gone": {"upstream": "../up/gone.git", "current": "v1.0.0"},
    }}))
    return ws


def test_check_process_output_exit_codes_and_record(tmp_path):
    ws = workspace(tmp_path)
    p = sync_tools("check", "a", "b", "--json", cwd=ws)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["a"]["latest"] == "v1.1.0" and out["a"]["update_available"] is True
    assert out["b"]["update_available"] is False
    record = json.loads((ws / ".version-manifest.json").read_text())
    assert record["subsystems"]["a"]["latest_tag"] == "v1.1.0"

    p = sync_tools("check", "a", "--exit-code", cwd=ws)
    assert p.returncode == 10 and "update available" in p.stdout

    p = sync_tools("-v", "check", "--exit-code", cwd=ws)
    assert p.returncode == 1  # an upstream failed: errors win over --exit-code
    assert "INFO sync_tools.check: check gone failed" in p.stderr  # log lines are flushed at exit
    assert "Error: gone:" in p.stderr and "Traceback" not in p.stderr
    assert "a " in p.stdout and "up to date" in p.stdout


def test_errors_still_exit_1_with_one_line(tmp_path):
    ws = workspace(tmp_path)
    p = sync_tools("check", "nope", cwd=ws)
    assert p.returncode == 1
    assert p.stderr.strip().count("\n") == 0 and "nope" in p.stderr and "Traceback" not in p.stderr
