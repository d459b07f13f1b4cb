"""The relay: verified GitHub webhooks -> durable outbox -> repository_dispatch or a local build,
and release fan-out to agents (SSE and signed pushes).

Entry points: :func:`sync_tools.relay.app.create_app` (the Flask app) and
:class:`sync_tools.relay.server.RelayServer` / :func:`sync_tools.relay.server.serve`.

The names below are imported on first use: gunicorn's master reads
:mod:`sync_tools.relay.gunicorn_conf` and checks the settings, and must not import requests (and
ssl) before its gevent workers monkey-patch them.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {"Relay": "app", "create_app": "app", "get_relay": "app", "Settings": "settings",
         "load_settings": "settings"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"sync_tools.relay.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'sync_tools.relay' has no attribute {name!r}")
