"""Waiting for a process the test does not own (no Popen to wait on) to be gone."""

from __future__ import annotations

import os
import signal
import time


def assert_process_ends(pid: int, what: str, timeout: float = 10.0) -> None:
    """Fail (after killing it) unless process *pid* is gone within *timeout* seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    raise AssertionError(what)
