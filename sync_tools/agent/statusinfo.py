"""What ``sync-tools status`` adds to the installed files: what is true of the running process and
of the agent's own bookkeeping.

- which binary the running process actually runs: the sha256 of ``/proc/<pid>/exe`` (readable even
  when the file it was started from has been replaced) against the installed one;
- the build held back as failed or rolled back, and why; an install a crash interrupted; a restart
  that failed and is still owed.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from sync_tools.agent.install import Journal
from sync_tools.agent.state import load_state
from sync_tools.errors import DataError, SyncToolsError
from sync_tools.versionfile import PREVIOUS_DIR

PROC = Path("/proc")


def process_exe(pid: int | None, installed_sha: str | None, *, installed: Path | None = None,
                proc: Path = PROC) -> dict[str, Any] | None:
    """The executable process *pid* runs: its path (`` (deleted)`` when replaced since it started),
    sha256 and whether that is the installed binary's (``is_installed``; None when the installed
    file is a ``#!`` script: the process is its interpreter). None when there is no pid or /proc
    cannot tell (another OS, another user's process)."""
    if not pid:
        return None
    exe = proc / str(pid) / "exe"
    try:
        path = os.readlink(exe)
        h = hashlib.sha256()
        with open(exe, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    except OSError:
        return None
    sha = h.hexdigest()
    is_installed: bool | None = installed_sha is not None and sha == installed_sha
    if not is_installed and installed is not None and _is_script(installed):
        is_installed = None
    return {"path": path, "sha256": sha, "is_installed": is_installed}


def _is_script(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(2) == b"#!"
    except OSError:
        return False


def bookkeeping(root: Path, name: str, installed_sha: str | None) -> dict[str, Any]:
    """The agent state and journal entries about *name*: ``held_back`` (a build kept away, and why),
    ``interrupted`` (an install a crash left, finished by the next agent run) and
    ``reload_failed`` (the error of a restart still owed)."""
    out: dict[str, Any] = {"held_back": None, "interrupted": None, "reload_failed": None}
    try:
        state = load_state(root)
    except DataError as e:
        out["state_error"] = str(e)
    else:
        sha = state.failed.get(name)
        if sha is not None and sha != installed_sha:
            out["held_back"] = {"build": sha, "reason": state.failed_because(name)}
        out["reload_failed"] = state.reload_failed.get(name)
    try:
        intent = next((i for i in Journal(root).pending() if i.subsystem == name), None)
    except SyncToolsError as e:
        out["interrupted"] = {"error": str(e)}
    else:
        if intent is not None:
            out["interrupted"] = {"kind": intent.kind, "new_sha256": intent.new_sha, "old_sha256": intent.old_sha}
    return out


def previous_is_current(bin_dir: Path, binary: str) -> bool:
    """``.previous`` holds the very build installed: after an automatic rollback (the failed update's
    binary was never kept), a rollback would swap a build with itself."""
    cur, prev = bin_dir / binary, bin_dir / PREVIOUS_DIR / binary
    try:
        return prev.is_file() and cur.is_file() and _sha(prev) == _sha(cur)
    except OSError:
        return False


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
