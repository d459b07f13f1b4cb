"""Child processes: stopping one together with everything it started."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from typing import Any

TERM_GRACE = 10.0  # seconds a process group has between SIGTERM and SIGKILL
#: Seconds :func:`stop_and_collect` still reads a stopped process's pipes before closing them.
DRAIN_WAIT = 5.0


def signal_group(pgid: int, sig: int) -> bool:
    """Signal the group; False when it has no member left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed its uid: it is still there
        return True
    return True


def stop_group(proc: subprocess.Popen[Any], *, grace: float, poll: float = 0.05) -> None:
    """End *proc*'s process group (it was started with ``start_new_session``): SIGTERM, then SIGKILL to
    the whole group after *grace* seconds, or as soon as every member is gone; returns once *proc* is
    reaped.

    The SIGKILL goes to the group even when *proc* itself exited on the SIGTERM: a descendant that
    ignores SIGTERM would otherwise live on (holding the caller's pipes open).
    """
    deadline = time.monotonic() + grace
    signal_group(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    # the leader is gone (or ignored SIGTERM): the rest of its group gets what is left of the grace period
    while time.monotonic() < deadline and signal_group(proc.pid, 0):
        time.sleep(poll)
    signal_group(proc.pid, signal.SIGKILL)
    proc.wait()


def stop_and_collect(proc: subprocess.Popen[Any], *, grace: float,
                     drain: float = DRAIN_WAIT) -> tuple[Any, Any]:
    """:func:`stop_group`, then what is left on *proc*'s stdout/stderr pipes, read for at most *drain*
    seconds (a process that left the group can still hold them open); the pipes are closed after.
    Returns ``(stdout, stderr)`` as :meth:`~subprocess.Popen.communicate` would, or ``(None, None)``
    when the pipes stayed open."""
    stop_group(proc, grace=grace)
    try:
        return proc.communicate(timeout=drain)
    except subprocess.TimeoutExpired:
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        return None, None
