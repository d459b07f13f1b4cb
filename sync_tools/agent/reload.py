"""Reload backends: restart exactly one process after its binary was swapped, and read its state.

- ``process-compose``: its REST API (``POST /process/restart/{name}``, ``GET /process/{name}``) over a
  unix socket or TCP, with ``X-PC-Token-Key`` when ``PC_API_TOKEN`` is set. With ``restart:
  stop-start`` it stops the process (``PATCH /process/stop/{name}``), waits until it is no longer
  running, then starts it (``POST /process/start/{name}``): plat-telemetry's own way, since a restart
  started the new process while the old one still held its ports.
- ``supervisor``: supervisord's XML-RPC (``supervisor.stopProcess`` + ``supervisor.startProcess`` of that
  one program) over a unix socket or http.
- ``command``: a shell command template, ``{process}`` replaced (e.g. ``task reload PROC={process}``).
- ``none``: nothing to restart (something else picks the binary up).

Every call has a timeout on each read and a total :class:`~sync_tools.deadline.Deadline` (a manager
that trickles its answer cannot hold a restart); failures become :class:`ReloadError` (a RemoteError:
the same call may work later), or :class:`StartError` when the manager ran the process and it did not
come up (the binary's failure, not the manager's).
"""

from __future__ import annotations

import abc
import http.client
import json
import logging
import os
import shlex
import socket
import subprocess
import tempfile
import time
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit
from xml.parsers.expat import ExpatError

from sync_tools.deadline import Deadline, on_deadline, shutdown
from sync_tools.errors import ConfigError, RemoteError
from sync_tools.procs import stop_group

from .install import crash_point

log = logging.getLogger(__name__)

PC_TOKEN_ENV = "PC_API_TOKEN"
PC_TOKEN_HEADER = "X-PC-Token-Key"


class ReloadError(RemoteError):
    """The process manager could not be reached or refused the restart."""


class StartError(ReloadError):
    """The process manager started the process and it did not come up (it exited, could not be run,
    or never reported running): a failure of the binary, unlike the manager's own errors."""


#: supervisord's startProcess Faults that say the program itself failed to start (supervisor.xmlrpc.Faults:
#: NO_FILE, NOT_EXECUTABLE, ABNORMAL_TERMINATION, SPAWN_ERROR)
_START_FAULTS = frozenset({20, 21, 40, 50})


@dataclass(frozen=True)
class ProcessStatus:
    """What the process manager says about one process."""

    name: str
    running: bool | None  # None: the backend cannot tell
    status: str
    pid: int | None = None
    ready: bool | None = None
    restarts: int | None = None  # how often the manager restarted it (process-compose), when it says

    def to_json(self) -> dict[str, Any]:
        return {"running": self.running, "status": self.status, "pid": self.pid, "ready": self.ready,
                "restarts": self.restarts}


class Reloader(abc.ABC):
    name = "reloader"

    @abc.abstractmethod
    def restart(self, process: str) -> None:
        """Restart *process* so it runs the binary now on disk. Raises ReloadError."""

    @abc.abstractmethod
    def status(self, process: str) -> ProcessStatus:
        """The process's state. Raises ReloadError."""


class NoReloader(Reloader):
    name = "none"

    def restart(self, process: str) -> None:
        log.info("reload backend 'none': %s not restarted", process)

    def status(self, process: str) -> ProcessStatus:
        return ProcessStatus(process, None, "unknown")


class CommandReloader(Reloader):
    """Runs a shell command with ``{process}`` filled in; exit 0 is success.

    A non-zero exit is taken as the new binary's failure (:class:`StartError`), except where the exit
    itself says the manager was never asked (:data:`NOT_ASKED`: the shell could not run the command,
    126 and 127, or the command's own ``exit 75``, sysexits' EX_TEMPFAIL): then it is a
    :class:`ReloadError`, which holds nothing against the build and leaves the restart owed.

    The command runs in its own process group with its output going to a temporary file, so a command
    that starts a daemon (which keeps the inherited stdout open) is done when the shell exits; on a
    timeout the whole group is stopped.
    """

    name = "command"
    #: bytes of the command's output kept for the error message
    OUTPUT_TAIL = 4096
    #: exit statuses that say the manager was not asked: the shell's "found but not executable" and
    #: "not found", and EX_TEMPFAIL (sysexits.h), for a wrapper to say "the manager is away, try later"
    NOT_ASKED = {126: "the shell could not execute it", 127: "the shell did not find it",
                 75: "EX_TEMPFAIL: the command says the manager could not be asked"}

    def __init__(self, template: str, *, cwd: Path | None = None, timeout: float = 60.0, grace: float = 5.0):
        self.template = template
        self.cwd = cwd
        self.timeout = timeout
        self.grace = grace

    def restart(self, process: str) -> None:
        cmd = self.template.replace("{process}", shlex.quote(process))
        with tempfile.TemporaryFile() as out:
            try:
                proc = subprocess.Popen(cmd, shell=True, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=out,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as e:
                raise ReloadError(f"reload command failed to start: {cmd}: {e}") from e
            try:
                returncode = proc.wait(timeout=self.timeout)
            except subprocess.TimeoutExpired as e:
                stop_group(proc, grace=self.grace)
                # as a non-zero exit: most often the new binary not coming up (a unit that never says ready)
                raise StartError(f"reload command timed out after {self.timeout}s: {cmd}") from e
            if returncode == 0:
                return
            out.seek(max(0, out.seek(0, os.SEEK_END) - self.OUTPUT_TAIL))
            text = out.read(self.OUTPUT_TAIL).decode("utf-8", errors="replace")
        tail = text.strip().splitlines()[-1:] or [""]
        if returncode in self.NOT_ASKED:  # nothing was restarted: no verdict on the build
            raise ReloadError(f"reload command exited {returncode} ({self.NOT_ASKED[returncode]}): {cmd}: {tail[0]}")
        # otherwise the exit cannot say whether the manager or the new binary failed (`supervisorctl restart`
        # exits 1 for a program that does not start): taken as the binary's, so a bad build is held
        # as before rather than installed again at every run
        raise StartError(f"reload command exited {returncode}: {cmd}: {tail[0]}")

    def status(self, process: str) -> ProcessStatus:
        return ProcessStatus(process, None, "unknown")


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a unix domain socket, with the same timeout as TCP connections; its socket is cut by
    the thread's deadline (:func:`sync_tools.deadline.on_deadline`)."""

    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        on_deadline(shutdown(sock))
        try:
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _cut_by_deadline(address: tuple[str, int], *args: Any) -> socket.socket:
    """``socket.create_connection`` whose socket the calling thread's deadline cuts."""
    sock = socket.create_connection(address, *args)
    on_deadline(shutdown(sock))
    return sock


class _TCPConnection(http.client.HTTPConnection):
    """An HTTP connection whose socket is cut by the thread's deadline."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._create_connection = _cut_by_deadline


class _TLSConnection(http.client.HTTPSConnection):
    """An HTTPS connection whose socket is cut by the thread's deadline: the TCP one while the TLS
    handshake runs, then the TLS one (wrapping detaches the first, so cutting that no longer works)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._create_connection = _cut_by_deadline

    def connect(self) -> None:
        super().connect()
        on_deadline(shutdown(self.sock))


def _connection(target: str, timeout: float) -> http.client.HTTPConnection:
    """A connection for ``unix:///path``, a bare socket path, or ``http://host:port``; its socket is
    registered with the deadline of the calling thread's exchange, if there is one."""
    if target.startswith(("http://", "https://")):
        parts = urlsplit(target)
        cls = _TLSConnection if parts.scheme == "https" else _TCPConnection
        return cls(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    path = target[len("unix://"):] if target.startswith("unix://") else target
    return _UnixHTTPConnection(path, timeout)


class ProcessComposeReloader(Reloader):
    """process-compose's REST API (see ``process-compose-openapi.json``)."""

    name = "process-compose"

    def __init__(self, target: str, *, token: str | None = None, timeout: float = 10.0,
                 ready_timeout: float = 30.0, poll: float = 0.1, stop_start: bool = False):
        self.target = target
        self.token = token
        self.stop_start = stop_start
        self.timeout = timeout
        self.ready_timeout = ready_timeout
        self.poll = poll

    def _call(self, method: str, path: str) -> Any:
        """One request, answered within ``timeout`` seconds overall (the socket timeout bounds each
        read only). Raises ReloadError."""
        conn = _connection(self.target, self.timeout)
        headers = {"Accept": "application/json"}
        if self.token:
            headers[PC_TOKEN_HEADER] = self.token
        late = f"process-compose at {self.target}: {method} {path}: no complete answer within {self.timeout:g} s"
        with Deadline(self.timeout) as deadline:
            try:
                conn.request(method, path, headers=headers)
                resp = conn.getresponse()
                body = resp.read(1 << 20)
            except (OSError, http.client.HTTPException) as e:
                from sync_tools.errtext import describe

                if deadline.expired:
                    raise ReloadError(late) from e
                raise ReloadError(f"process-compose at {self.target}: {method} {path}: {describe(e)}") from e
            finally:
                conn.close()
        if deadline.expired:  # a cut answer can read as a short, complete one
            raise ReloadError(late)
        try:
            data = json.loads(body) if body else {}
        except ValueError as e:
            raise ReloadError(f"process-compose {method} {path}: HTTP {resp.status}, not JSON") from e
        if resp.status != 200:
            detail = data.get("error") if isinstance(data, dict) else None
            raise ReloadError(f"process-compose {method} {path}: HTTP {resp.status}: {detail or body[:200]!r}",
                              status_code=resp.status)
        return data

    def restart(self, process: str) -> None:
        before = self.status(process)
        old_pid = before.pid if before.running else None
        name = quote(process, safe="")
        if self.stop_start:
            if before.running:
                self._call("PATCH", f"/process/stop/{name}")
                self._wait(process, lambda st: not st.running, "stopped", "stop")
            self._call("POST", f"/process/start/{name}")
        else:
            self._call("POST", f"/process/restart/{name}")
        # A restart is asynchronous in process-compose: wait until it reports the process running, as
        # a new process (the old one may still be reported running for a moment after the answer; a
        # health check then would judge the old binary, not the new one).
        deadline = time.monotonic() + self.ready_timeout
        while True:
            st = self.status(process)
            if st.running and st.ready is not False and (old_pid is None or st.pid != old_pid):
                return
            if time.monotonic() >= deadline:  # it was asked to run and did not: the binary's failure
                raise StartError(f"process-compose: {process} not running {self.ready_timeout}s after "
                                 f"{'start' if self.stop_start else 'restart'} (status {st.status})")
            time.sleep(self.poll)

    def _wait(self, process: str, done: Any, what: str, step: str) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while True:
            st = self.status(process)
            if done(st):
                return
            if time.monotonic() >= deadline:
                raise ReloadError(f"process-compose: {process} not {what} {self.ready_timeout}s after "
                                  f"{step} (status {st.status})")
            time.sleep(self.poll)

    def status(self, process: str) -> ProcessStatus:
        data = self._call("GET", f"/process/{quote(process, safe='')}")
        if not isinstance(data, dict):
            raise ReloadError(f"process-compose GET /process/{process}: not a ProcessState object")
        status = str(data.get("status", "unknown"))
        ready_raw = data.get("is_ready")
        ready = None
        if data.get("has_ready_probe") and isinstance(ready_raw, str):
            ready = ready_raw.lower() == "ready"
        pid = data.get("pid") if isinstance(data.get("pid"), int) else None
        restarts = data.get("restarts")
        restarts = restarts if isinstance(restarts, int) and not isinstance(restarts, bool) else None
        return ProcessStatus(process, bool(data.get("is_running")), status, pid or None, ready, restarts)


class _TimeoutSupervisorTransport(xmlrpc.client.Transport):
    """supervisor's XML-RPC transport (unix socket or http) with a timeout on every read; its
    connections are cut by the calling thread's deadline (see SupervisorReloader._call)."""

    def __init__(self, serverurl: str, timeout: float):
        super().__init__()
        self.serverurl = serverurl
        self.timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        return _connection(self.serverurl, self.timeout)


def _late(method: str, message: str) -> ReloadError:
    """A call that ran out of time: startProcess waits for the program to be RUNNING, so its deadline
    passing is most likely the new binary not coming up (held as unhealthy); any other call's is the
    manager's."""
    return (StartError if method == "startProcess" else ReloadError)(message)


class SupervisorReloader(Reloader):
    """supervisord over XML-RPC; restarts one program (stop + start, waiting for RUNNING)."""

    name = "supervisor"

    def __init__(self, serverurl: str, *, timeout: float = 30.0):
        self.serverurl = serverurl
        self.timeout = timeout

    def _proxy(self) -> Any:
        transport = _TimeoutSupervisorTransport(self.serverurl, self.timeout)
        return xmlrpc.client.ServerProxy("http://localhost/RPC2", transport=transport, allow_none=True)

    def _call(self, method: str, *args: Any) -> Any:
        """One XML-RPC call, answered within ``timeout`` seconds overall (the socket timeout bounds
        each read only). Raises ReloadError (a Fault's faultString included)."""
        late = f"supervisor at {self.serverurl}: {method}: no complete answer within {self.timeout:g} s"
        with Deadline(self.timeout) as deadline:
            try:
                result = getattr(self._proxy().supervisor, method)(*args)
            except xmlrpc.client.Fault as e:
                failed_start = method == "startProcess" and e.faultCode in _START_FAULTS
                raise (StartError if failed_start else ReloadError)(
                    f"supervisor {method}{args}: {e.faultString}") from e
            except (OSError, xmlrpc.client.Error, http.client.HTTPException, ExpatError, ValueError) as e:
                # xmlrpc.client.Error: a ProtocolError or a ResponseError; ExpatError/ValueError: an answer
                # that is not XML-RPC (a proxy's HTML page with status 200)
                from sync_tools.errtext import describe

                if deadline.expired:
                    raise _late(method, late) from e
                raise ReloadError(f"supervisor at {self.serverurl}: {method}: {describe(e)}") from e
        if deadline.expired:  # a cut answer can read as a short, complete one
            raise _late(method, late)
        return result

    def restart(self, process: str) -> None:
        """Stop (when running) and start *process*. An agent killed between the two leaves the program
        stopped; the install's intent is still in the journal then, and the agent's start-up recovery
        restarts it (the agent itself runs under the supervisor, which starts it again)."""
        info = self._call("getProcessInfo", process)
        deadline = time.monotonic() + self.timeout
        while info.get("statename") == "STOPPING" and time.monotonic() < deadline:
            time.sleep(0.05)  # a stop another (killed) agent asked for: starting now would be refused
            info = self._call("getProcessInfo", process)
        if info.get("statename") in ("RUNNING", "STARTING", "BACKOFF"):
            try:
                self._call("stopProcess", process, True)
            except ReloadError as e:
                if "NOT_RUNNING" not in str(e):
                    raise
        crash_point("stopped")
        self._call("startProcess", process, True)

    def status(self, process: str) -> ProcessStatus:
        info = self._call("getProcessInfo", process)
        state = str(info.get("statename", "UNKNOWN"))
        pid = info.get("pid") or None
        return ProcessStatus(process, state == "RUNNING", state, pid)


def make_reloader(kind: str, *, root: Path, socket_path: str | None = None, url: str | None = None,
                  command: str | None = None, supervisor_url: str | None = None,
                  restart: str = "restart") -> Reloader:
    """The reloader an ``agent:`` section names. Raises ConfigError when a needed setting is missing."""
    if kind == "none":
        return NoReloader()
    if kind == "command":
        if not command:
            raise ConfigError("agent.command is required when agent.reload is 'command'")
        return CommandReloader(command, cwd=root)
    if kind == "process-compose":
        target = url or os.environ.get("PC_SOCKET_PATH") or socket_path
        if url is None and target and not target.startswith(("unix://", "http")):
            target = str((root / target).resolve()) if not os.path.isabs(target) else target
        if not target:
            target = "http://127.0.0.1:8080"
        return ProcessComposeReloader(target, token=os.environ.get(PC_TOKEN_ENV) or None,
                                      stop_start=restart == "stop-start")
    if kind == "supervisor":
        target = supervisor_url or (f"unix://{(root / socket_path).resolve()}" if socket_path else None) or url
        if not target:
            raise ConfigError("agent.supervisor_url (unix:///path or http://host:port) is required "
                              "when agent.reload is 'supervisor'")
        return SupervisorReloader(target)
    raise ConfigError(f"unknown reload backend {kind!r}")
