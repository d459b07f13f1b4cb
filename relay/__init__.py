"""Production entry points for the relay: ``relay.wsgi:app`` under gunicorn (see README.md)."""
