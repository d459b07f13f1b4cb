"""Child processes: stopping one together with everything it started."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

TERM_GRACE = 10.0  # seconds a process group has between SIGTERM and SIGKILL


def stop_group(proc: subprocess.Popen[Any], *, grace: float) -> None:
    """End *proc*'s process group (it was started with ``start_new_session``): SIGTERM, then SIGKILL
    after *grace* seconds; returns once *proc* is reaped."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
