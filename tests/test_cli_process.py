"""The console entry point as a real process (`python -m sync_tools`, i.e. sync_tools.__main__): its
output, exit codes, files and log lines all arrive, although the garbage collector is paused for the
imports and the process ends without the interpreter's teardown (os._exit once atexit handlers ran and
the streams are flushed), unless a thread is still running, which is waited for as usual."""

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
    assert p.returncode == 10  # a's update is not hidden by gone's failure, which is still printed
    assert "INFO sync_tools.check: check gone failed" in p.stderr  # log lines are flushed at exit
    assert "Error: gone:" in p.stderr and "Traceback" not in p.stderr
    assert "a " in p.stdout and "up to date" in p.stdout

    p = sync_tools("check", "b", "gone", "--exit-code", cwd=ws)
    assert p.returncode == 1 and "Error: gone:" in p.stderr  # no update anywhere: the error exits 1


def test_errors_still_exit_1_with_one_line(tmp_path):
    ws = workspace(tmp_path)
    p = sync_tools("check", "nope", cwd=ws)
    assert p.returncode == 1
    assert p.stderr.strip().count("\n") == 0 and "nope" in p.stderr and "Traceback" not in p.stderr


def run_entry(code: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run sync_tools.__main__.main() with *args* after *code*, as the console script does."""
    script = f"import sys\n{code}\nsys.argv = ['sync-tools', *{list(args)!r}]\n" \
             "from sync_tools.__main__ import main\nmain()\n"
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_atexit_handlers_run_and_output_arrives_before_the_quick_exit(tmp_path):
    marker = tmp_path / "atexit-ran"
    p = run_entry(f"import atexit\natexit.register(lambda: open({str(marker)!r}, 'w').write('yes'))",
                  "--version", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "sync-tools, version" in p.stdout
    assert marker.read_text() == "yes"


def test_a_running_thread_is_waited_for_not_cut_off(tmp_path):
    marker = tmp_path / "thread-done"
    p = run_entry("import threading, time\n"
                  f"threading.Thread(target=lambda: (time.sleep(0.5), open({str(marker)!r}, 'w').write('done'))).start()",
                  "--version", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert marker.read_text() == "done"


def test_exit_codes_pass_through_the_quick_exit(tmp_path):
    ws = workspace(tmp_path)
    assert run_entry("", "check", "a", "--exit-code", cwd=ws).returncode == 10
    assert run_entry("", "check", "gone", cwd=ws).returncode == 1
    assert run_entry("", "no-such-command", cwd=ws).returncode == 2


def test_the_collector_paused_for_the_imports_runs_again_for_the_command(tmp_path):
    """A long-running command (relay, agent) must not run with the garbage collector off."""
    ws = workspace(tmp_path)
    p = run_entry("import gc\n"
                  "import sync_tools.cli.check as c\n"
                  "real = c.run_check\n"
                  "def spy(*a, **k):\n"
                  "    print('collector enabled:', gc.isenabled(), file=sys.stderr)\n"
                  "    return real(*a, **k)\n"
                  "c.run_check = spy\n", "check", "a", cwd=ws)
    assert p.returncode == 0, p.stderr
    assert "collector enabled: True" in p.stderr
