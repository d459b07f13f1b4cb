"""gunicorn's gevent worker with the relay's connection bounds (issue #20), as
:mod:`sync_tools.relay.gunicorn_conf` names it in ``worker_class``.

gunicorn bounds only the wait for a request's headers (``keepalive``, 75 s) and each socket read
(``RELAY_SOCKET_TIMEOUT``): a body trickled a byte a second resets the read timeout forever, and once
``worker_connections`` greenlets are busy gevent stops accepting, so idle sockets and tricklers keep
deliveries out. This worker keeps every connection in a
:class:`~sync_tools.relay.connections.ConnectionTable`, as ``sync-tools relay`` does:

- a request must be answered within ``RELAY_REQUEST_DEADLINE`` seconds (15) of the connection's
  start or of its previous answer, headers and body included, or its socket is cut (an idle
  keep-alive connection too); an SSE stream is exempt once it streams;
- at ``worker_connections``, a new connection cuts the oldest that is not streaming (the pool has one
  slot more, so gevent never stops accepting for want of a slot);
- SSE streams hold at most ``worker_connections - RESERVE`` of them (``503`` beyond).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from gevent.monkey import get_original
from gunicorn.workers.ggevent import GeventWorker

from sync_tools.relay.connections import ConnectionTable, StreamLimit, deadline_from

_RealSocket = get_original("socket", "socket")


def _shutdown(sock: Any) -> None:
    """Shut *sock* down under gevent's feet: its greenlet's read then ends (b"") or its write fails with
    EPIPE, which gunicorn takes as a client gone. (gevent's own ``shutdown`` wakes the greenlet with
    EBADF, which gunicorn logs as a socket error with a traceback.)"""
    fd = sock.fileno()
    if fd < 0:  # already closed by its greenlet
        return
    raw = _RealSocket(fileno=fd)
    try:
        raw.shutdown(socket.SHUT_RDWR)
    finally:
        raw.detach()  # the descriptor stays the greenlet's, which closes it


class RelayGeventWorker(GeventWorker):
    """gunicorn's ``gevent`` worker, each connection in a :class:`ConnectionTable`."""

    table: ConnectionTable

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the table cuts at cfg.worker_connections; the spare slot is where the connection that
        # makes room runs, so gevent's pool is never full while the table can still cut
        self.worker_connections = self.cfg.worker_connections + 1

    def run(self) -> None:
        # after the fork, gevent's patching and the app's load: the table's lock and reaper are gevent's
        # the config checked RELAY_REQUEST_DEADLINE in the master (gunicorn_conf)
        self.table = ConnectionTable(self.cfg.worker_connections, deadline=deadline_from(os.environ),
                                     shutdown=_shutdown)
        self.wsgi = StreamLimit(self.wsgi, self.table)
        self.table.start()
        try:
            super().run()
        finally:
            self.table.stop()

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        self.table.opened(client)  # at the limit, the oldest connection not streaming is cut
        try:
            super().handle(listener, client, addr)
        finally:
            self.table.closed(client)

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        try:
            return super().handle_request(listener_name, req, sock, addr)
        except TimeoutError as e:
            # the socket timeout (RELAY_SOCKET_TIMEOUT) cut a client that stopped reading, an SSE
            # subscriber most often: a client gone, as gunicorn takes EPIPE, not an error with a traceback
            # (gevent's timeout carries no errno). StopIteration ends the connection quietly.
            self.log.debug("closing a connection whose client stopped reading: %s", e)
            raise StopIteration("the client stopped reading") from e
        finally:
            self.table.answered(sock)  # keep-alive: the next request's clock starts; a stream has ended
