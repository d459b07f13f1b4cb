"""Health that means something: the check passes, then keeps passing for a settle window, with the
process never restarted in between.

The first 2xx is not enough: a build that crashes a few seconds after it starts answers its health URL
first, and a process manager that restarts it (supervisord's ``autorestart``, process-compose's restart
policy) hides the crash loop behind a new pid that answers again. :func:`wait_settled` waits for the first
pass (:func:`.health.wait_healthy`), notes the process's identity (pid, and the manager's restart count
where it gives one), then for ``settle_seconds`` checks again every *interval*: any failed check, any new
pid or restart, or the process no longer running ends it as unhealthy, naming which and when.

With neither a health check nor a backend that reports the process, there is nothing to watch and the
window is skipped. A backend that cannot be reached for a moment inside the window is not a crash: the
pid is compared again at the next tick that reaches it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from .health import HealthResult, check_once, wait_healthy
from .httpclient import Client
from .reload import ProcessStatus, Reloader, ReloadError

log = logging.getLogger(__name__)

#: Seconds between two looks inside the settle window.
SETTLE_INTERVAL = 0.25


def _status(reloader: Reloader, process: str) -> ProcessStatus | None:
    try:
        return reloader.status(process)
    except ReloadError as e:
        log.debug("%s: status unavailable inside the settle window: %s", process, e)
        return None


def restarted(before: ProcessStatus, now: ProcessStatus) -> str | None:
    """Why *now* is not the process *before* described (it exited, or is another process), or None."""
    if not before.running:
        return None  # the backend cannot tell (command, none), or had no running process to compare with
    if now.running is False:
        return f"it is no longer running ({now.status})"
    if before.pid is not None and now.pid is not None and now.pid != before.pid:
        return f"it was restarted (pid {before.pid} -> {now.pid})"
    if before.restarts is not None and now.restarts is not None and now.restarts > before.restarts:
        return f"it was restarted ({now.restarts - before.restarts} restart(s))"
    return None


def wait_settled(spec: str | None, *, reloader: Reloader, process: str, health_timeout: float,
                 settle_seconds: float, cwd: Path | None = None, interval: float = SETTLE_INTERVAL,
                 attempt_timeout: float = 5.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> HealthResult:
    """Healthy when *spec* (a URL or command; with none, the backend's "running") passes within
    *health_timeout* seconds and then keeps passing, with *process* neither restarted nor stopped, for
    *settle_seconds*. ``seconds`` of the result covers both. Never raises."""
    def backend_says() -> HealthResult:
        st = _status(reloader, process)
        if st is None:
            return HealthResult(False, f"{reloader.name}: status unavailable")
        return HealthResult(st.running is not False, f"{reloader.name}: {st.status}")

    start = clock()
    first = wait_healthy(spec, deadline_s=health_timeout, cwd=cwd, fallback=backend_says,
                         attempt_timeout=attempt_timeout, clock=clock, sleep=sleep)
    if not first.ok or settle_seconds <= 0:
        return first
    before = _status(reloader, process)
    watch_process = before is not None and before.running is True
    if not spec and not watch_process:
        return first  # nothing to watch: "no health check configured", backend cannot tell
    client = Client() if spec and spec.startswith(("http://", "https://")) else None
    try:
        return _watch(spec, first, before if watch_process else None, reloader=reloader, process=process,
                      settle_seconds=settle_seconds, cwd=cwd, interval=interval,
                      attempt_timeout=attempt_timeout, clock=clock, sleep=sleep, start=start, client=client)
    finally:
        if client is not None:
            client.close()


def _watch(spec: str | None, first: HealthResult, before: ProcessStatus | None, *, reloader: Reloader,
           process: str, settle_seconds: float, cwd: Path | None, interval: float, attempt_timeout: float,
           clock: Callable[[], float], sleep: Callable[[float], None], start: float,
           client: Client | None) -> HealthResult:
    passed_at = clock()
    deadline = passed_at + settle_seconds
    attempts = first.attempts
    while True:
        sleep(min(interval, max(0.0, deadline - clock())))
        after = clock() - passed_at
        if before is not None:
            now = _status(reloader, process)
            why = restarted(before, now) if now is not None else None
            if why:
                return HealthResult(False, f"{process} passed its health check, then {why} {after:.1f}s later "
                                           f"(inside the {settle_seconds:g}s settle window)",
                                    attempts, clock() - start)
        if spec:
            attempts += 1
            res = check_once(spec, timeout=attempt_timeout, cwd=cwd, client=client)
            if not res.ok:
                return HealthResult(False, f"{res.detail} {after:.1f}s after it first passed (inside the "
                                           f"{settle_seconds:g}s settle window)", attempts, clock() - start)
        if clock() >= deadline:
            return HealthResult(True, f"{first.detail}; settled for {settle_seconds:g}s", attempts,
                                clock() - start)
