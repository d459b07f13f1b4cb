"""gunicorn settings for a source checkout (``gunicorn -c relay/gunicorn.conf.py relay.wsgi:app``):
the packaged :mod:`sync_tools.relay.gunicorn_conf`, which ``sync-tools relay --production`` uses."""

from sync_tools.relay.gunicorn_conf import *  # noqa: F401,F403
from sync_tools.relay.gunicorn_conf import on_starting, worker_exit  # noqa: F401 - hooks, named for clarity
