"""``relay.wsgi:app`` for a source checkout: the packaged :mod:`sync_tools.relay.wsgi` (what
``sync-tools relay --production`` runs)."""

from sync_tools.relay.wsgi import app

__all__ = ["app"]
