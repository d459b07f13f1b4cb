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

import contextlib
import email.utils
import fcntl
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from http.client import HTTPException
from pathlib import Path
from typing import Any

import orjson
import requests
from requests.adapters import HTTPAdapter

from sync_tools import errtext
from sync_tools.deadline import Deadline, pool_classes, shutdown
from sync_tools.errors import BuildError, RemoteError, SyncToolsError
from sync_tools.procs import TERM_GRACE
from sync_tools.relay.worker import Interrupted

log = logging.getLogger(__name__)

EVENT_TYPE = "upstream-release"
# GitHub's limits of POST /repos/{owner}/{repo}/dispatches, from its REST description
# (tests/fixtures/github-openapi/: event_type maxLength 100, client_payload maxProperties 10, "the
# total size of the JSON payload must be less than 64KB"). A request over them is refused here,
# before it is sent: GitHub would answer 422 and no retry would change that.
MAX_EVENT_TYPE = 100
MAX_PAYLOAD_KEYS = 10
MAX_PAYLOAD_BYTES = 64 * 1024
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
        if re.fullmatch(r"[0-9]+(\.[0-9]+)?", value):
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
        if re.fullmatch(r"[0-9]+", reset):  # ASCII digits: str.isdigit() also takes "²"
            return max(0.0, float(reset) - now)
    return None


SECONDARY_RATE_LIMIT_WAIT = 60.0
MAX_ANSWER = 64 << 10  # bytes of an answer's body read: GitHub's errors and agents' replies are far smaller


class WatchedAdapter(HTTPAdapter):
    """requests' adapter whose connections let :func:`post`'s deadline reach the socket while the
    status line and headers arrive (before there is a response to close)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = pool_classes()


def watch_session(session: requests.Session) -> requests.Session:
    """Mount :class:`WatchedAdapter` on *session* for http and https where requests' default adapter
    is (an adapter of the caller's own is left alone); returns *session*. Call before the session is
    shared between threads."""
    for prefix in ("http://", "https://"):
        if type(session.adapters.get(prefix)) is HTTPAdapter:
            session.mount(prefix, WatchedAdapter())
    return session


def post(session: requests.Session, url: str, *, timeout: tuple[float, float], what: str,
         **kwargs: Any) -> tuple[requests.Response, bytes]:
    """POST and read at most MAX_ANSWER bytes of the answer, within the read timeout overall: an
    endpoint that streams or trickles its answer cannot hold a worker. Returns the (closed) response
    and the body read (what came within the read timeout). A hard deadline of connect + read timeout
    covers the rest, status line and headers included (:mod:`sync_tools.deadline`; on a session of
    :func:`watch_session`): past it the connection is shut down. Raises RemoteError naming *what*
    (and the deadline, when that was the cause)."""
    reading_ends = time.monotonic() + timeout[1]  # reading the body stops here, keeping what came
    limit = timeout[0] + timeout[1]  # the connection is cut here, whatever phase it is in
    resp: requests.Response | None = None
    try:
        with Deadline(limit) as deadline:
            resp = session.post(url, timeout=timeout, stream=True, **kwargs)
            # any adapter: the body's socket, from the response
            deadline.add(shutdown(getattr(getattr(resp.raw, "_connection", None), "sock", None)))
            body = bytearray()
            for chunk in resp.iter_content(8192):
                body += chunk
                if len(body) >= MAX_ANSWER or time.monotonic() > reading_ends:
                    break
    except (requests.RequestException, OSError, HTTPException) as e:
        if deadline.expired:
            raise RemoteError(f"{what}: no complete answer within {limit:g} s") from e
        raise RemoteError(f"{what}: {errtext.describe(e)}") from e
    finally:
        if resp is not None:
            resp.close()  # after the deadline: a cut never reaches a connection back in the pool
    if deadline.expired:
        raise RemoteError(f"{what}: no complete answer within {limit:g} s")
    return resp, bytes(body[:MAX_ANSWER])


def check_response(resp: requests.Response, what: str, now: float, body: bytes = b"") -> None:
    """Turn a non-2xx answer into RemoteError (retry: 5xx, 408, 429, a spent rate limit or any
    answer with Retry-After) or DispatchRefused (other 4xx). *body* is the answer read (see post)."""
    if 200 <= resp.status_code < 300:
        return
    wait = retry_after_seconds(resp.headers, now)
    message = f"{what}: HTTP {resp.status_code}"
    try:
        # orjson: nesting past its limit is a ValueError too, where json raises RecursionError
        parsed = orjson.loads(body) if resp.headers.get("Content-Type", "").startswith("application/json") else None
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


def dispatch_body(event_type: str, client_payload: Mapping[str, Any], *, repo: str = "") -> bytes:
    """The JSON body of a repository_dispatch (compact, as measured). Raises DispatchRefused naming
    the limit when *event_type* or *client_payload* is outside GitHub's documented limits."""
    where = f"repository_dispatch to {repo}: " if repo else "repository_dispatch: "
    if not isinstance(event_type, str) or not 1 <= len(event_type) <= MAX_EVENT_TYPE:
        length = len(event_type) if isinstance(event_type, str) else "no"
        raise DispatchRefused(f"{where}event_type must be 1 to {MAX_EVENT_TYPE} characters, not {length}")
    if not isinstance(client_payload, Mapping):
        raise DispatchRefused(f"{where}client_payload must be an object, not {type(client_payload).__name__}")
    if len(client_payload) > MAX_PAYLOAD_KEYS:
        raise DispatchRefused(f"{where}client_payload has {len(client_payload)} top-level keys; GitHub takes at "
                              f"most {MAX_PAYLOAD_KEYS}")
    payload = orjson.dumps(dict(client_payload))
    # GitHub does not say how it measures; json.dumps' spaced, ASCII-escaped form is the largest of
    # the usual encodings, so a payload under the limit by it is under by any of them
    size = len(json.dumps(dict(client_payload)))
    if size >= MAX_PAYLOAD_BYTES:
        raise DispatchRefused(f"{where}client_payload is {size} bytes of JSON; GitHub takes less than "
                              f"{MAX_PAYLOAD_BYTES}")
    return b'{"event_type":' + orjson.dumps(event_type) + b',"client_payload":' + payload + b"}"


class GitHubDispatcher:
    """``POST {api}/repos/{repo}/dispatches`` with event_type ``upstream-release``."""

    name = "github"

    def __init__(self, repo: str, api_url: str, token: str | None, *, session: requests.Session | None = None,
                 timeout: tuple[float, float] = (5.0, 30.0), now: Callable[[], float] = time.time):
        self.repo = repo
        self.url = f"{api_url.rstrip('/')}/repos/{repo}/dispatches"
        self._token = token
        self._session = session or watch_session(requests.Session())
        self._timeout = timeout
        self._now = now

    def __repr__(self) -> str:
        return f"GitHubDispatcher({self.url!r})"

    def dispatch(self, client_payload: dict[str, Any]) -> None:
        """Send one repository_dispatch. Raises RemoteError or DispatchRefused (also, without sending
        anything, for a payload over GitHub's limits: see :func:`dispatch_body`)."""
        body = dispatch_body(EVENT_TYPE, client_payload, repo=self.repo)
        headers = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28",
                   "User-Agent": "sync-tools-relay", "Content-Type": "application/json"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        what = f"repository_dispatch to {self.repo}"
        resp, answer = post(self._session, self.url, data=body, headers=headers, timeout=self._timeout, what=what)
        check_response(resp, what, self._now(), answer)


# a step's time between SIGTERM and SIGKILL: longer than the TERM_GRACE `sync-tools build` itself gives
# its build commands, so its own SIGKILL reaches them first
STEP_GRACE = TERM_GRACE + 5.0


class LocalDispatcher:
    """Build, package and release one subsystem here, with ``sync-tools`` in a subprocess.

    Runs are serialised per subsystem by the outbox lane (``local:<name>``), not here. Each run's
    output goes to ``<logs_dir>/<subsystem>/<UTC time>-<delivery>.log``. The child's environment is
    the relay's without the relay's secrets and the names in *drop_env* (the agents' push secrets).

    :meth:`stop` (the relay stopping) ends the steps running, each with its process group, and
    refuses new ones until :meth:`start`.
    """

    name = "local"
    STEPS = ("build", "package", "release")

    def __init__(self, config_path: Path, logs_dir: Path, *, timeout: float = 3600.0,
                 command: tuple[str, ...] = (sys.executable, "-m", "sync_tools"),
                 env: Mapping[str, str] | None = None, cwd: Path | None = None,
                 drop_env: Iterable[str] = (), stop_grace: float | None = None):
        self.config_path = Path(config_path)
        self.logs_dir = Path(logs_dir)
        self.timeout = timeout
        self.command = command
        self.cwd = cwd or self.config_path.parent
        base = dict(os.environ if env is None else env)
        drop = {*_CHILD_ENV_DROP, *drop_env}
        self.env = {k: v for k, v in base.items() if k not in drop}
        self.stop_grace = stop_grace
        self._lock = threading.Lock()
        self._running: set[subprocess.Popen[bytes]] = set()
        self._stopped = False

    def start(self) -> None:
        """Accept builds again after :meth:`stop`."""
        with self._lock:
            self._stopped = False

    def stop(self) -> None:
        """Stop every step running (SIGTERM to its process group, SIGKILL after the grace period,
        then SIGKILL to whatever of the group is left) and refuse new steps. The interrupted
        dispatches raise Interrupted, so their jobs go back to the queue for the next start."""
        from sync_tools.procs import signal_group, stop_group

        with self._lock:
            self._stopped = True
            procs = list(self._running)
        if not procs:
            return
        grace = STEP_GRACE if self.stop_grace is None else self.stop_grace
        log.warning("stopping %d local build step(s) still running", len(procs))
        for proc in procs:  # all of them at once: the grace periods run side by side
            signal_group(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in procs:  # SIGKILL to what is left of each group, the step's children included
            stop_group(proc, grace=max(0.0, deadline - time.monotonic()))

    def log_path(self, subsystem: str, delivery: str) -> Path:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", delivery)[:80]
        return self.logs_dir / subsystem / f"{stamp}-{safe}.log"

    def dispatch(self, client_payload: dict[str, Any]) -> None:
        """Run build (at the announced version), package and release for ``client_payload['subsystem']``, stopping at the first
        failure. Raises BuildError naming the step, its exit code and the log file. The pin the build
        moved is put back when a later step fails or is stopped: it names only released versions."""
        from sync_tools.relay.pinback import put_back, saved_pins

        sub = str(client_payload["subsystem"])
        with self._subsystem_lock(sub) as lock_fd:
            pinned = saved_pins(self.config_path, sub)
            try:
                self._build_package_release(client_payload, lock_fd)
            except BaseException:
                for moved in put_back(pinned):
                    log.warning("%s: pin put back (%s): its build was not released", sub, moved)
                raise

    @contextlib.contextmanager
    def _subsystem_lock(self, sub: str) -> Iterator[int]:
        """Hold ``<logs_dir>.locks/<sub>.lock`` (flock) for a run, and yield its descriptor, which every
        step inherits: a step outlives a relay killed with SIGKILL (it runs in its own session), and
        the lock with it, so the job the next relay resumes waits for it instead of building beside it
        (the outbox lane serialises runs within one relay only). Waits up to the build timeout;
        Interrupted when the relay stops meanwhile."""
        where = self.logs_dir.with_name(self.logs_dir.name + ".locks")  # beside the logs, not among them
        where.mkdir(parents=True, exist_ok=True)
        fd = os.open(where / f"{sub}.lock", os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            until = time.monotonic() + self.timeout
            waited = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waited:
                        log.warning("%s: an earlier local build still runs (left by a relay that stopped); "
                                    "waiting for it", sub)
                        waited = True
                    if self._stopped:
                        raise Interrupted(f"{sub}: the relay is stopping") from None
                    if time.monotonic() > until:
                        raise BuildError(f"{sub}: an earlier local build still held its lock after "
                                         f"{self.timeout:.0f} s") from None
                    time.sleep(0.5)
            yield fd
        finally:
            os.close(fd)  # the lock goes with the last descriptor: a step still running keeps it

    def _build_package_release(self, client_payload: dict[str, Any], lock_fd: int) -> None:
        from sync_tools.procs import stop_group

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
                with self._lock:  # registered before stop() can look, or not started at all
                    if self._stopped:
                        raise Interrupted(f"sync-tools {step} --only {sub} not started: the relay is stopping")
                    try:
                        # its own process group: on a timeout the step and whatever it started are stopped
                        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, cwd=self.cwd, env=env,
                                                start_new_session=True, pass_fds=(lock_fd,))
                    except OSError as e:
                        raise BuildError(f"cannot run sync-tools {step}: {e} (log: {path})") from e
                    self._running.add(proc)
                try:
                    proc.wait(timeout=self.timeout)
                except BaseException as e:
                    # SIGTERM first: `sync-tools build` then stops its build commands' own process
                    # groups (SIGKILL after its own TERM_GRACE) and puts back a pin it wrote; this step
                    # gets longer than that, or its SIGKILL would come first and leave a command that
                    # ignores SIGTERM running in its own session
                    stop_group(proc, grace=STEP_GRACE)
                    if isinstance(e, subprocess.TimeoutExpired):
                        raise BuildError(f"sync-tools {step} --only {sub} timed out after {self.timeout:.0f} s "
                                         f"(log: {path})") from e
                    raise
                finally:
                    with self._lock:
                        self._running.discard(proc)
                logf.write(f"# exit {proc.returncode} after {time.monotonic() - started:.1f} s\n".encode())
                logf.flush()
                with self._lock:
                    stopped = self._stopped
                if stopped and proc.returncode != 0:
                    # not the build's failure: the relay stopped it; the job runs again at the next start
                    raise Interrupted(f"sync-tools {step} --only {sub} stopped: the relay is stopping (log: {path})")
                if proc.returncode != 0:
                    raise BuildError(f"sync-tools {step} --only {sub} exited {proc.returncode} (log: {path})")
        log.info("local build, package and release of %s done (log: %s)", sub, path)

