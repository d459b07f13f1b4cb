"""Which core each worker of the ingest server runs on (``RELAY_INGEST_CPUS``).

A delivery crosses three threads of one worker process, there and back: granian's I/O thread, the
event loop, the outbox's committer. Left to the scheduler, the two workers' threads wander over the cores
and every hand-off is a wake-up on another core; kept on one core per worker, a hand-off stays on its
core and the workers do not meet (the rate with and without: docs/benchmarks.md, section 2).

Each worker takes the first core of the allowed set that no other worker holds, by an ``flock`` on a
file per core beside the database (``<db>.ingest-cpu<N>.lock``), held for the worker's life: a worker
granian respawns takes the core its predecessor left. With more workers than cores, the rest run
where the scheduler puts them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path

from sync_tools.errors import ConfigError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

CPUS_ENV = "RELAY_INGEST_CPUS"
_held: list[int] = []  # the descriptor of this process's core lock, kept open for its life


def _allowed() -> list[int] | None:
    """The cores this process may run on, or None where the platform cannot pin."""
    if not hasattr(os, "sched_getaffinity") or fcntl is None:
        return None
    return sorted(os.sched_getaffinity(0))


def ingest_cpus(environ: Mapping[str, str]) -> list[int]:
    """The cores the ingest server's workers are spread over: ``RELAY_INGEST_CPUS`` unset or ``auto``,
    every core this process may use; ``off``, none (no pinning); else a list such as ``0,2`` or ``2-3``.
    Raises ConfigError for a list that does not parse or names a core this process may not use."""
    raw = environ.get(CPUS_ENV, "auto").strip().lower()
    allowed = _allowed()
    if raw in ("off", "none"):
        return []
    if raw in ("", "auto"):
        return allowed or []
    if allowed is None:
        raise ConfigError(f"{CPUS_ENV}={raw!r}: this platform cannot pin a process to a core; unset it")
    cpus: list[int] = []
    for part in raw.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ConfigError(f"{CPUS_ENV}={raw!r}: expected 'auto', 'off' or cores such as 0,1 or 0-3") from None
        if first < 0 or last < first:
            raise ConfigError(f"{CPUS_ENV}={raw!r}: {part.strip()!r} is not a range of cores")
        outside = [c for c in range(first, min(last, max(allowed) + 1) + 1) if c not in allowed]
        if outside or last > max(allowed):
            raise ConfigError(f"{CPUS_ENV}={raw!r}: this process may only run on cores "
                              f"{','.join(map(str, allowed))}, not {part.strip()}")
        cpus += [c for c in range(first, last + 1) if c not in cpus]
    return cpus


def pin_worker(db: Path, cpus: list[int]) -> int | None:
    """Pin this process (the calling thread, and every thread it starts later) to the first core of
    *cpus* that no other worker on the database *db* holds; returns the core, or None when every one
    is taken or *cpus* is empty. Call it before the server's threads start (they inherit it); the
    threads already running are pinned too."""
    if not cpus or fcntl is None or _held:
        return None
    for cpu in cpus:
        path = f"{db}.ingest-cpu{cpu}.lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError as e:
            log.warning("ingest server: cannot open %s (%s); the worker runs on any core", path, e.strerror or e)
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        try:
            _pin_threads(cpu)
        except OSError as e:  # the core left the allowed set since the start (a cgroup change)
            with contextlib.suppress(OSError):
                os.close(fd)
            log.warning("ingest server: cannot pin a worker to core %d (%s); it runs on any core", cpu,
                        e.strerror or e)
            return None
        _held.append(fd)
        log.info("ingest server: worker %d runs on core %d", os.getpid(), cpu)
        return cpu
    return None


def _pin_threads(cpu: int) -> None:
    """Pin every thread of this process to *cpu*, the calling one last."""
    me = threading.get_native_id()
    with contextlib.suppress(OSError):  # no /proc: the calling thread alone
        for tid in os.listdir("/proc/self/task"):
            if int(tid) != me:
                with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
                    os.sched_setaffinity(int(tid), {cpu})
    os.sched_setaffinity(0, {cpu})
