"""Dispatchers: what the relay does with an accepted upstream change.

- :class:`GitHubDispatcher` asks GitHub to run the release repository's ``upstream-release``
  workflow (``repository_dispatch``).
- :class:`LocalDispatcher` (a DEV machine) runs ``sync-tools build``, ``package`` and ``release``
  for the one subsystem in a subprocess, keeping each run's log.

Both raise :class:`~sync_tools.errors.RemoteError` for "try again later" (carrying ``retry_after``
when the other side said how long to wait) and :class:`DispatchRefused` or
:class:`~sync_tools.errors.BuildError` for failures a retry of the same request will not fix.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from sync_tools.errors import BuildError, RemoteError, SyncToolsError

log = logging.getLogger(__name__)

EVENT_TYPE = "upstream-release"
# Secrets of the relay itself never reach a build: the child gets the rest of the environment.
_CHILD_ENV_DROP = ("SYNC_TOOLS_WEBHOOK_SECRET", "SYNC_TOOLS_NOTIFY_SECRET", "SYNC_TOOLS_AGENT_TOKENS")


class DispatchRefused(SyncToolsError):
    """The target refused the request for a reason a retry will not fix (bad token, unknown repo,
    invalid payload). The job is dead-lettered; fix the cause and retry it by hand."""

    def __init__(self, message: str, *, status_code: int | None = None):
        self.status_code = status_code
        super().__init__(message)


def retry_after_seconds(headers: Mapping[str, str], now: float) -> float | None:
    """How long the server asked us to wait: ``Retry-After`` (seconds or an HTTP date), else, when
    the rate limit is spent (``X-RateLimit-Remaining: 0``), until ``X-RateLimit-Reset``."""
    value = headers.get("Retry-After")
    if value:
        value = value.strip()
        if re.fullmatch(r"\d+(\.\d+)?", value):
            return float(value)
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            when = None
        if when is not None:
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            return max(0.0, when.timestamp() - now)
    if headers.get("X-RateLimit-Remaining", "").strip() == "0":
        reset = headers.get("X-RateLimit-Reset", "").strip()
        if reset.isdigit():
            return max(0.0, float(reset) - now)
    return None


SECONDARY_RATE_LIMIT_WAIT = 60.0
MAX_ANSWER = 64 << 10  # bytes of an answer's body read: GitHub's errors and agents' replies are far smaller


def post(session: requests.Session, url: str, *, timeout: tuple[float, float], what: str,
         **kwargs: Any) -> tuple[requests.Response, bytes]:
    """POST and read at most MAX_ANSWER bytes of the answer, within the read timeout overall: an
    endpoint that streams or trickles its answer cannot hold a worker. Returns the (closed)
    response and the body read. Raises RemoteError naming *what*."""
    deadline = time.monotonic() + timeout[1]
    try:
        resp = session.post(url, timeout=timeout, stream=True, **kwargs)
        with resp:
            body = bytearray()
            for chunk in resp.iter_content(8192):
                body += chunk
                if len(body) >= MAX_ANSWER or time.monotonic() > deadline:
                    break
    except requests.RequestException as e:
        raise RemoteError(f"{what}: {type(e).__name__}") from e
    return resp, bytes(body[:MAX_ANSWER])


def check_response(resp: requests.Response, what: str, now: float, body: bytes = b"") -> None:
    """Turn a non-2xx answer into RemoteError (retry: 5xx, 408, 429, a spent rate limit or any
    answer with Retry-After) or DispatchRefused (other 4xx). *body* is the answer read (see post)."""
    if 200 <= resp.status_code < 300:
        return
    wait = retry_after_seconds(resp.headers, now)
    message = f"{what}: HTTP {resp.status_code}"
    try:
        parsed = json.loads(body) if resp.headers.get("Content-Type", "").startswith("application/json") else None
        detail = parsed.get("message") if isinstance(parsed, dict) else None
    except ValueError:
        detail = None
    if isinstance(detail, str):
        message += f" ({detail[:200]})"
        if wait is None and resp.status_code == 403 and "secondary rate limit" in detail.lower():
            wait = SECONDARY_RATE_LIMIT_WAIT  # GitHub sends no header then, and asks for a minute or more
    if resp.status_code >= 500 or resp.status_code in (408, 429) or wait is not None:
        raise RemoteError(message, status_code=resp.status_code, retry_after=wait)
    raise DispatchRefused(message, status_code=resp.status_code)


class GitHubDispatcher:
    """``POST {api}/repos/{repo}/dispatches`` with event_type ``upstream-release``."""

    name = "github"

    def __init__(self, repo: str, api_url: str, token: str | None, *, session: requests.Session | None = None,
                 timeout: tuple[float, float] = (5.0, 30.0), now: Callable[[], float] = time.time):
        self.repo = repo
        self.url = f"{api_url.rstrip('/')}/repos/{repo}/dispatches"
        self._token = token
        self._session = session or requests.Session()
        self._timeout = timeout
        self._now = now

    def __repr__(self) -> str:
        return f"GitHubDispatcher({self.url!r})"

    def dispatch(self, client_payload: dict[str, Any]) -> None:
        """Send one repository_dispatch. Raises RemoteError or DispatchRefused."""
        headers = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28",
                   "User-Agent": "sync-tools-relay"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        body = {"event_type": EVENT_TYPE, "client_payload": client_payload}
        what = f"repository_dispatch to {self.repo}"
        resp, answer = post(self._session, self.url, json=body, headers=headers, timeout=self._timeout, what=what)
        check_response(resp, what, self._now(), answer)


class LocalDispatcher:
    """Build, package and release one subsystem here, with ``sync-tools`` in a subprocess.

    Runs are serialised per subsystem by the outbox lane (``local:<name>``), not here. Each run's
    output goes to ``<logs_dir>/<subsystem>/<UTC time>-<delivery>.log``.
    """

    name = "local"
    STEPS = ("build", "package", "release")

    def __init__(self, config_path: Path, logs_dir: Path, *, timeout: float = 3600.0,
                 command: tuple[str, ...] = (sys.executable, "-m", "sync_tools"),
                 env: Mapping[str, str] | None = None, cwd: Path | None = None):
        self.config_path = Path(config_path)
        self.logs_dir = Path(logs_dir)
        self.timeout = timeout
        self.command = command
        self.cwd = cwd or self.config_path.parent
        base = dict(os.environ if env is None else env)
        self.env = {k: v for k, v in base.items() if k not in _CHILD_ENV_DROP}

    def log_path(self, subsystem: str, delivery: str) -> Path:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", delivery)[:80]
        return self.logs_dir / subsystem / f"{stamp}-{safe}.log"

    def dispatch(self, client_payload: dict[str, Any]) -> None:
        """Run build (at the announced version), package and release for ``client_payload['subsystem']``, stopping at the first
        failure. Raises BuildError naming the step, its exit code and the log file."""
        from sync_tools.procs import TERM_GRACE, stop_group

        sub = str(client_payload["subsystem"])
        path = self.log_path(sub, str(client_payload.get("delivery") or "manual"))
        path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(self.env)
        with open(path, "ab") as logf:
            for step in self.STEPS:
                argv = [*self.command, step, "--config", str(self.config_path), "--only", sub]
                if step == "build" and client_payload.get("version"):
                    # build the version that was announced, not the pin (build updates the pin)
                    argv += ["--version", str(client_payload["version"])]
                logf.write(f"$ {' '.join(argv)}\n".encode())
                logf.flush()
                started = time.monotonic()
                try:
                    # its own process group: on a timeout the step and whatever it started are stopped
                    proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            cwd=self.cwd, env=env, start_new_session=True)
                except OSError as e:
                    raise BuildError(f"cannot run sync-tools {step}: {e} (log: {path})") from e
                try:
                    proc.wait(timeout=self.timeout)
                except BaseException as e:
                    # SIGTERM first: `sync-tools build` then stops its build commands' own process
                    # groups and puts back a pin it wrote; SIGKILL after the grace period
                    stop_group(proc, grace=TERM_GRACE)
                    if isinstance(e, subprocess.TimeoutExpired):
                        raise BuildError(f"sync-tools {step} --only {sub} timed out after {self.timeout:.0f} s "
                                         f"(log: {path})") from e
                    raise
                logf.write(f"# exit {proc.returncode} after {time.monotonic() - started:.1f} s\n".encode())
                logf.flush()
                if proc.returncode != 0:
                    raise BuildError(f"sync-tools {step} --only {sub} exited {proc.returncode} (log: {path})")
        log.info("local build, package and release of %s done (log: %s)", sub, path)
