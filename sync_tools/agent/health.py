"""Health checks: a shell command that exits 0, or an http(s) URL that answers 2xx.

:func:`wait_healthy` retries until the check passes or the deadline passes; every single attempt has
its own timeout, so a hung service cannot hang the agent.
"""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sync_tools.agent.httpclient import Client, HTTPError
from sync_tools.procs import stop_and_collect

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HealthResult:
    ok: bool
    detail: str
    attempts: int = 1
    seconds: float = 0.0


def check_once(spec: str, *, timeout: float = 5.0, cwd: Path | None = None,
               client: Client | None = None) -> HealthResult:
    """One attempt of *spec* (a URL or a shell command). Never raises: failures are a result."""
    if spec.startswith(("http://", "https://")):
        try:
            # only the status counts: the body is never read (a health URL that streams cannot hold us),
            # and its redirects get no more than the attempt's time
            resp = (client or Client()).get(spec, timeout=(min(timeout, 2.0), timeout), stream=True,
                                            deadline=time.monotonic() + timeout)
        except HTTPError as e:
            from sync_tools.errtext import describe

            return HealthResult(False, f"{spec}: {describe(e)}")
        resp.close()
        ok = 200 <= resp.status < 300
        return HealthResult(ok, f"{spec}: HTTP {resp.status}")
    try:
        # its own process group: on a timeout the command and what it started (a hung curl) are stopped
        # output is only shown in the detail: a byte that is not UTF-8 must not turn into an exception
        proc = subprocess.Popen(spec, shell=True, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, errors="replace", start_new_session=True)
    except OSError as e:
        return HealthResult(False, f"{spec}: {e}")
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # the whole group is killed and the pipes read for a bounded time: a descendant that ignores
        # SIGTERM or left the group cannot hold the agent here
        stop_and_collect(proc, grace=1.0)
        return HealthResult(False, f"{spec}: timed out after {timeout}s")
    if proc.returncode == 0:
        return HealthResult(True, f"{spec}: exit 0")
    tail = (stderr or stdout).strip().splitlines()[-1:] or [""]
    return HealthResult(False, f"{spec}: exit {proc.returncode} {tail[0]}".rstrip())


def wait_healthy(spec: str | None, *, deadline_s: float = 30.0, interval: float = 0.1,
                 attempt_timeout: float = 5.0, cwd: Path | None = None,
                 fallback: Callable[[], HealthResult] | None = None,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 ) -> HealthResult:
    """Retry the health check until it passes or *deadline_s* is spent.

    With no *spec*, *fallback* (e.g. "the process manager says it is running") is the check, and with
    neither the result is healthy by definition. Never raises.
    """
    start = clock()
    client = Client() if spec and spec.startswith("http") else None
    attempts = 0
    delay = interval
    try:
        while True:
            attempts += 1
            if spec:
                left = max(0.1, deadline_s - (clock() - start))
                res = check_once(spec, timeout=min(attempt_timeout, left), cwd=cwd, client=client)
            elif fallback is not None:
                res = fallback()
            else:
                return HealthResult(True, "no health check configured", attempts, clock() - start)
            elapsed = clock() - start
            if res.ok:
                return HealthResult(True, res.detail, attempts, elapsed)
            if elapsed >= deadline_s:
                log.warning("health check failed after %d attempts: %s", attempts, res.detail)
                return HealthResult(False, res.detail, attempts, elapsed)
            sleep(min(delay, max(0.0, deadline_s - elapsed)))
            delay = min(delay * 1.5, 1.0)
    finally:
        if client is not None:
            client.close()
