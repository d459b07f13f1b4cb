"""The relay as a WSGI application for gunicorn: ``gunicorn -c relay/gunicorn.conf.py relay.wsgi:app``.

The config comes from ``SYNC_TOOLS_CONFIG`` (or ./sync-tools.yaml), secrets from the environment
(``SYNC_TOOLS_WEBHOOK_SECRET`` is required: importing this module fails without it, so the server
refuses to boot rather than serve unsigned webhooks).

The outbox worker and SSE broker threads start here, at import, which gunicorn (``preload_app =
False``) and granian do in the worker process: after the fork and after gevent has patched
threading, never in a master process.
"""

from __future__ import annotations

import sys

from sync_tools.config import load_config
from sync_tools.relay.app import create_app, get_relay
from sync_tools.relay.server import SWITCH_INTERVAL

sys.setswitchinterval(SWITCH_INTERVAL)  # see sync_tools.relay.server.serve
app = create_app(load_config())
get_relay(app).start()
