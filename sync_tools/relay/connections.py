"""Bounds on the connections of ``sync-tools relay``'s threaded server (issue #20).

A thread and a file descriptor per connection, and nothing else bounding them, let idle sockets and
clients trickling a request run the process out of descriptors: accept() then fails and real deliveries
are never read. :class:`ConnectionTable` keeps every connection's state, and

- a reaper thread cuts a connection that has not finished its request (headers, body and answer)
  within ``deadline`` seconds of its start, or of the previous answer on a keep-alive connection (an
  idle one too); an SSE stream (``GET /events``) is exempt while it streams;
- at ``limit`` open connections, a new one makes room by cutting the oldest that is not streaming,
  so a burst of new deliveries always gets in;
- SSE streams may hold at most ``limit - reserve`` of them (``503`` beyond), keeping room for
  ``/health`` and deliveries.

:func:`raise_nofile` raises the soft open-files limit to what ``limit`` needs, or refuses. gunicorn's
worker (:mod:`.gevent_worker`) keeps its connections in the same table.
"""

from __future__ import annotations

import logging
import resource
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sync_tools.errors import ConfigError

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger(__name__)

#: Seconds a request may take from its first byte (or the previous answer) to its answer: GitHub
#: gives up on a delivery after 10 s, so a request still unread after this is not a real delivery.
DEADLINE = 15.0
#: Connections kept free of SSE streams, for /health and deliveries.
RESERVE = 64
#: Descriptors the process needs besides connections (the database, logs, outgoing HTTP, builds).
SPARE_FDS = 128


def deadline_from(environ: Mapping[str, str]) -> float:
    """``RELAY_REQUEST_DEADLINE`` (seconds, default DEADLINE) from *environ*; ConfigError when it is not
    a number from 1 to 3600."""
    raw = environ.get("RELAY_REQUEST_DEADLINE", "").strip()
    if not raw:
        return DEADLINE
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 1.0 <= value <= 3600.0:
        raise ConfigError(f"RELAY_REQUEST_DEADLINE={raw!r}: expected seconds from 1 to 3600")
    return value


@dataclass
class _Conn:
    since: float
    streaming: bool = False


def raise_nofile(connections: int) -> int:
    """Raise the soft RLIMIT_NOFILE so that *connections* sockets plus SPARE_FDS fit (up to the hard
    limit) and return how many connections the limit allows (at most *connections*).
    Raises ConfigError when fewer than RESERVE * 2 would fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + SPARE_FDS
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(hard, want)
        if new > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
    room = connections if soft == resource.RLIM_INFINITY else min(connections, soft - SPARE_FDS)
    if room < RESERVE * 2:
        raise ConfigError(f"the open-files limit ({soft}, hard {hard}) leaves room for {max(room, 0)} "
                          f"connections; the relay needs at least {RESERVE * 2} (raise it: ulimit -n)")
    if room < connections:
        log.warning("the open-files limit (hard %s) allows %d connections, not %d", hard, room, connections)
    return room


class ConnectionTable:
    """The open connections of one server; thread-safe."""

    def __init__(self, limit: int, *, deadline: float = DEADLINE, reserve: int = RESERVE,
                 clock: Callable[[], float] = time.monotonic,
                 shutdown: Callable[[socket.socket], None] = lambda s: s.shutdown(socket.SHUT_RDWR)):
        self.limit, self.deadline, self.reserve, self.clock = limit, deadline, reserve, clock
        self.shutdown = shutdown  # how a connection is cut: its reader or writer must see the end, not an error
        self._conns: dict[socket.socket, _Conn] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self.cut = 0  # connections cut (deadline or room), for the log and tests

    def __len__(self) -> int:
        return len(self._conns)

    def opened(self, sock: socket.socket) -> None:
        """A connection was accepted: make room when at the limit (cut the oldest not streaming)."""
        with self._lock:
            victim = None
            if len(self._conns) >= self.limit:
                idle = [(c.since, s) for s, c in self._conns.items() if not c.streaming]
                if idle:
                    victim = min(idle, key=lambda x: x[0])[1]
                    del self._conns[victim]
            self._conns[sock] = _Conn(self.clock())
        if victim is not None:
            self._shut(victim)

    def closed(self, sock: socket.socket) -> None:
        with self._lock:
            self._conns.pop(sock, None)

    def answered(self, sock: socket.socket) -> None:
        """A request's answer is out: the connection's clock restarts (keep-alive) and it streams no more."""
        with self._lock:
            c = self._conns.get(sock)
            if c is not None:
                c.since, c.streaming = self.clock(), False

    def start_stream(self, sock: socket.socket) -> bool:
        """Mark *sock* as an SSE stream; False when streams already hold ``limit - reserve`` slots."""
        with self._lock:
            streams = sum(c.streaming for c in self._conns.values())
            c = self._conns.get(sock)
            if c is None or streams >= self.limit - self.reserve:
                return False
            c.streaming = True
            return True

    def reap(self) -> int:
        """Cut every connection past its deadline; returns how many."""
        now = self.clock()
        with self._lock:
            late = [s for s, c in self._conns.items() if not c.streaming and now - c.since > self.deadline]
            for s in late:
                del self._conns[s]
        for s in late:
            self._shut(s)
        return len(late)

    def _shut(self, sock: socket.socket) -> None:
        self.cut += 1
        try:
            self.shutdown(sock)  # its thread's read or write fails now; the thread closes it
        except OSError:
            pass

    def start(self, every: float = 0.5) -> None:
        def loop() -> None:
            while not self._stop.wait(every):
                self.reap()

        self._reaper = threading.Thread(target=loop, name="relay-reaper", daemon=True)
        self._reaper.start()

    def stop(self) -> None:
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(timeout=5)


class StreamLimit:
    """WSGI middleware (werkzeug's server or gunicorn's): a ``GET /events`` is marked as a stream
    (exempt from the deadline) or, with the streams' share of the connections taken, answered 503."""

    def __init__(self, app: WSGIApplication, table: ConnectionTable):
        self.app, self.table = app, table

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        sock: Any = environ.get("werkzeug.socket") or environ.get("gunicorn.socket")
        if environ.get("PATH_INFO") == "/events" and sock is not None and not self.table.start_stream(sock):
            body = b'{"error": "too many event streams; try again later", "status": "error"}\n'
            start_response("503 Service Unavailable", [("Content-Type", "application/json"),
                                                       ("Content-Length", str(len(body))), ("Retry-After", "30")])
            return [body]
        return self.app(environ, start_response)
