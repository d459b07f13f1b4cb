"""The relay as a WSGI application for gunicorn: ``gunicorn -c relay/gunicorn.conf.py relay.wsgi:app``.

The config comes from ``SYNC_TOOLS_CONFIG`` (or ./sync-tools.yaml), secrets from the environment
(``SYNC_TOOLS_WEBHOOK_SECRET`` is required: importing this module fails without it, so gunicorn
refuses to boot rather than serve unsigned webhooks). The worker and SSE broker threads are started
by gunicorn.conf.py's ``post_worker_init`` hook, inside the worker process, never in the master.
"""

from __future__ import annotations

from sync_tools.config import load_config
from sync_tools.relay.app import create_app

app = create_app(load_config())
