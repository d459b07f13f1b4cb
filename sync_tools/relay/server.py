"""Running the relay under a real threaded WSGI server (werkzeug's), for ``sync-tools relay``,
the demo and the end-to-end tests. Production can use gunicorn instead (``relay/``).

A thread per connection: a slow client or a long SSE stream holds only its own thread, so
``/health`` keeps answering through bursts. Sockets time out after ``timeout`` seconds of
silence (SSE streams write a heartbeat well within that), so a stalled client is dropped; a request
must be done within a deadline, and connections are bounded (:mod:`.connections`).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType
from typing import Any

from flask import Flask
from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

from sync_tools.errors import ConfigError
from sync_tools.relay.app import get_relay
from sync_tools.relay.connections import ConnectionTable, StreamLimit, raise_nofile

log = logging.getLogger(__name__)

SWITCH_INTERVAL = 0.001
#: Connections served at once (SSE streams included); fewer when the open-files limit allows fewer.
MAX_CONNECTIONS = 4096


class _Handler(WSGIRequestHandler):
    timeout = 60  # seconds a socket may stay silent (slowloris); SSE heartbeats are far more frequent
    server: _Server

    def handle_one_request(self) -> None:
        super().handle_one_request()
        self.server.table.answered(self.connection)  # keep-alive: the next request's clock starts

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Per-request lines cost throughput and say nothing /metrics does not; failures are logged
        # by the app with the delivery id.
        return


class _Server(ThreadedWSGIServer):
    request_queue_size = 4096  # a burst of connections queues in the kernel instead of being refused
    daemon_threads = True
    table: ConnectionTable

    def process_request(self, request: Any, client_address: Any) -> None:
        self.table.opened(request)  # at the limit, the oldest connection not streaming is cut
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        self.table.closed(request)
        super().shutdown_request(request)


class RelayServer:
    """The app on ``host:port`` (port 0: any free port; read ``.port``/``.url``) in a thread.

    ``start()`` also starts the relay's worker and broker; ``stop()`` stops everything.
    Raises ConfigError when the address cannot be bound.
    """

    def __init__(self, app: Flask, host: str = "127.0.0.1", port: int = 9191, *,
                 max_connections: int = MAX_CONNECTIONS):
        self.app = app
        # raises ConfigError when the open-files limit leaves too little room
        self.table = ConnectionTable(raise_nofile(max_connections))
        try:
            self.server = _Server(host, port, StreamLimit(app, self.table), handler=_Handler)
        except (OSError, SystemExit) as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e}") from e
        self.server.table = self.table
        if getattr(self.server, "socket", None) is None or self.server.socket.fileno() < 0:
            raise ConfigError(f"cannot listen on {host}:{port}")
        self.host = host
        self.port = self.server.server_port
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> RelayServer:
        get_relay(self.app).start()
        self.table.start()
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="relay-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.table.stop()
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        get_relay(self.app).stop()

    def __enter__(self) -> RelayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(app: Flask, host: str = "127.0.0.1", port: int = 9191, *, ready: threading.Event | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then stop cleanly (jobs not finished stay in the outbox and
    are resumed at the next start)."""
    # A delivery's answer waits for the committer thread, and the committer for the GIL: a shorter
    # switch interval (default 5 ms) keeps those hand-offs from adding up in the latency tail.
    sys.setswitchinterval(SWITCH_INTERVAL)
    server = RelayServer(app, host, port)
    stop = threading.Event()

    def _signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, _signal) for s in (signal.SIGTERM, signal.SIGINT)}
    server.start()
    log.warning("relay listening on %s (dispatch: %s)", server.url, get_relay(app).config.relay.dispatch)
    if ready is not None:
        ready.set()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        server.stop()
