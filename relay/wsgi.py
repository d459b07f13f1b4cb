"""The relay as a WSGI application for gunicorn: ``gunicorn -c relay/gunicorn.conf.py relay.wsgi:app``.

The config comes from ``SYNC_TOOLS_CONFIG`` (or ./sync-tools.yaml), secrets from the environment
(``SYNC_TOOLS_WEBHOOK_SECRET`` is required: importing this module fails without it, so the server
refuses to boot rather than serve unsigned webhooks).

The outbox worker and SSE broker threads start here, at import, which gunicorn (``preload_app =
False``) and granian do in the worker process: after the fork and after gevent has patched
threading, never in a master process.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

from sync_tools.config import load_config
from sync_tools.errors import SyncToolsError
from sync_tools.relay.app import create_app, get_relay
from sync_tools.relay.server import SWITCH_INTERVAL

# Seconds a client's socket may block a read or a write. gunicorn bounds only the wait for a request's
# headers (keepalive): a body trickled byte by byte, or an SSE subscriber that stops reading, would
# hold its greenlet and socket forever. Longer than keepalive (75 s), so idle keep-alive connections
# still close on gunicorn's clock, not this one.
SOCKET_TIMEOUT = float(os.environ.get("RELAY_SOCKET_TIMEOUT", "90"))


class SocketTimeout:
    """WSGI middleware: give the request's socket (gunicorn's ``gunicorn.socket``) a timeout."""

    def __init__(self, app: Callable[..., Iterable[bytes]], seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        sock = environ.get("gunicorn.socket")
        if sock is not None:
            sock.settimeout(self.seconds)
        return self.app(environ, start_response)


sys.setswitchinterval(SWITCH_INTERVAL)  # see sync_tools.relay.server.serve
try:
    app = create_app(load_config())
except SyncToolsError as e:  # one clear line, and gunicorn's "App failed to load" exit (4), no traceback
    print(f"relay: {e}", file=sys.stderr, flush=True)
    sys.exit(4)
app.wsgi_app = SocketTimeout(app.wsgi_app, SOCKET_TIMEOUT)  # type: ignore[method-assign]
get_relay(app).start()
