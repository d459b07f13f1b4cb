"""A total deadline for one network exchange.

A socket timeout bounds each read, not the whole answer: a server that trickles a byte every so
often never trips it, and would hold the caller for as long as it likes. A :class:`Deadline` runs a
timer; when it expires, every connection registered with it is cut (a socket shut down, a subprocess
killed), so the read blocked on it returns at once and the caller fails.

Connections register with the deadline of the thread they run in (:func:`on_deadline`): the
transports open and use their connections in the thread that makes the exchange. The urllib3 pools
of :func:`pool_classes` register every connection's socket when it waits for a response, which
covers the status line, the headers and the body, on new and reused connections alike.
"""

from __future__ import annotations

import functools
import socket
import threading
from collections.abc import Callable
from typing import Any

_current = threading.local()


class Deadline:
    """``with Deadline(seconds) as d:`` around one exchange; afterwards ``d.expired`` tells whether it
    was cut (a cut connection can read as a short, well-formed answer: do not trust it then)."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False
        self._lock = threading.Lock()
        self._cuts: list[Callable[[], None]] = []
        self._timer = threading.Timer(seconds, self.expire)
        self._timer.daemon = True

    def __enter__(self) -> Deadline:
        _current.deadline = self
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        _current.deadline = None
        self._timer.cancel()
        with self._lock:
            self._cuts.clear()  # before the connection goes back to a pool: later users are not cut
        self._timer.join()

    def add(self, cut: Callable[[], None]) -> None:
        """Run *cut* at expiry (at once when already expired)."""
        with self._lock:
            if not self.expired:
                self._cuts.append(cut)
                return
        _quietly(cut)

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            cuts, self._cuts = self._cuts, []
        for cut in cuts:
            _quietly(cut)


def on_deadline(cut: Callable[[], None]) -> None:
    """Register *cut* with the deadline of the exchange running in this thread, if there is one."""
    deadline = getattr(_current, "deadline", None)
    if deadline is not None:
        deadline.add(cut)


def shutdown(sock: socket.socket | None) -> Callable[[], None]:
    """A cut for *sock*: shutting it down wakes a read blocked on it in another thread (closing it
    would not)."""
    return lambda: sock.shutdown(socket.SHUT_RDWR) if sock is not None else None


def _quietly(cut: Callable[[], None]) -> None:
    try:
        cut()
    except OSError:
        pass  # already closed


class _RegistersSocket:
    """A urllib3 connection that registers its socket with the thread's deadline while it waits for
    a response (new and reused connections alike)."""

    sock: socket.socket | None

    def getresponse(self, *args: Any, **kwargs: Any) -> Any:
        on_deadline(shutdown(self.sock))
        return super().getresponse(*args, **kwargs)  # type: ignore[misc]


@functools.cache
def pool_classes() -> dict[str, type]:
    """urllib3 connection pools (``PoolManager.pool_classes_by_scheme``) whose connections register
    their socket with the thread's deadline while they wait for a response."""
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class DeadlineHTTPConnection(_RegistersSocket, HTTPConnection):
        pass

    class DeadlineHTTPSConnection(_RegistersSocket, HTTPSConnection):
        pass

    class DeadlineHTTPConnectionPool(HTTPConnectionPool):
        ConnectionCls = DeadlineHTTPConnection

    class DeadlineHTTPSConnectionPool(HTTPSConnectionPool):
        ConnectionCls = DeadlineHTTPSConnection

    return {"http": DeadlineHTTPConnectionPool, "https": DeadlineHTTPSConnectionPool}
