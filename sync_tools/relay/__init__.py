"""The relay: verified GitHub webhooks -> durable outbox -> repository_dispatch or a local build,
and release fan-out to agents (SSE and signed pushes).

Entry points: :func:`sync_tools.relay.app.create_app` (the Flask app) and
:class:`sync_tools.relay.server.RelayServer` / :func:`sync_tools.relay.server.serve`.
"""

from sync_tools.relay.app import Relay, create_app, get_relay
from sync_tools.relay.settings import Settings, load_settings

__all__ = ["Relay", "Settings", "create_app", "get_relay", "load_settings"]
