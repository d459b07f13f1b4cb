"""gunicorn settings for the relay, packaged so that ``sync-tools relay --production`` works from any
workspace: it runs ``gunicorn -c python:sync_tools.relay.gunicorn_conf sync_tools.relay.wsgi:app``
(``relay/gunicorn.conf.py`` in the source tree re-exports this module).

Worker model: ONE worker process running gevent. Every SSE subscriber is a long-lived request; with
gevent each is a greenlet (a few KB), so one process holds ten thousand agents, and a release event
reaches all of them in well under a second (numbers in bench/relay/RESULTS.md). One process, because
the outbox worker threads and the SSE broker live in it; deliveries are cheap enough that one core
answers far more webhooks than GitHub will ever send (bench/relay/RESULTS.md). The worker is gunicorn's
gevent worker with the relay's connection bounds (:mod:`sync_tools.relay.gevent_worker`): a request
deadline (``RELAY_REQUEST_DEADLINE``, 15 s), the oldest connection cut at ``worker_connections``, and
room kept from SSE streams.

Without gevent installed (``pip install 'sync-tools[prod]'`` brings it), or with RELAY_WORKER=gthread,
the model is gthread with a thread per connection: RELAY_THREADS (default 1100) bounds the SSE subscribers plus in-flight
webhooks, each thread costing real memory (also measured).
"""

from __future__ import annotations

import os


def _has_gevent() -> bool:
    try:
        import gevent  # noqa: F401
    except ImportError:
        return False
    return True


#: gunicorn's gevent worker with the relay's connection bounds (a request deadline, room made at the limit)
GEVENT_WORKER = "sync_tools.relay.gevent_worker.RelayGeventWorker"
worker_class = os.environ.get("RELAY_WORKER") or ("gevent" if _has_gevent() else "gthread")
if worker_class == "gevent":
    worker_class = GEVENT_WORKER
if worker_class == GEVENT_WORKER:
    worker_connections = int(os.environ.get("RELAY_CONNECTIONS", "20000"))
else:
    threads = int(os.environ.get("RELAY_THREADS", "1100"))
    worker_connections = threads + 100



def _fit_open_files(connections: int) -> int:
    """Raise the soft open-files limit to what *connections* need and return how many fit (gevent
    then queues the rest in the backlog instead of failing accept() with EMFILE); stop, saying why,
    when too few fit. Inherited by the workers."""
    from sync_tools.errors import ConfigError
    from sync_tools.relay.connections import raise_nofile

    try:
        return raise_nofile(connections)
    except ConfigError as e:
        raise SystemExit(f"relay: {e}") from None


def _check_deadline() -> None:
    from sync_tools.errors import ConfigError
    from sync_tools.relay.connections import deadline_from

    try:
        deadline_from(os.environ)
    except ConfigError as e:
        raise SystemExit(f"relay: {e}") from None


worker_connections = _fit_open_files(worker_connections)
_check_deadline()
if worker_class != GEVENT_WORKER:
    threads = min(threads, max(1, worker_connections - 100))
bind = os.environ.get("RELAY_BIND", "127.0.0.1:9191")  # cloudflared connects here; never expose directly
workers = int(os.environ.get("RELAY_WORKERS", "1"))
preload_app = False  # the app (and its SQLite connections) is built in the worker, after the fork
timeout = 60  # a silent worker is restarted; SSE streams write a heartbeat within 25 s
graceful_timeout = 5  # SSE streams never finish on their own; agents reconnect with Last-Event-ID, and jobs
# cut short stay in the outbox and are resumed by the next worker (at-least-once delivery)
keepalive = 75  # gunicorn's own idle limit; the worker's request deadline (15 s) cuts idle connections first,
# so relay/cloudflared.yml keeps cloudflared's origin connections idle for at most 10 s
backlog = 4096
accesslog = None  # per-request lines add nothing /metrics does not have, and cost throughput
errorlog = "-"
loglevel = os.environ.get("RELAY_LOG_LEVEL", "info")
limit_request_field_size = 16384
# gunicorn >= 24 opens a control socket at ~/.gunicorn/gunicorn.ctl: one per user, so a second relay
# (or a test) on the machine would take it over; the relay is managed by signals, not by gunicornc
control_socket_disable = True


def on_starting(server):  # type: ignore[no-untyped-def]
    """In the master, before any worker is forked: check the config and the secrets, and end with one
    line on stderr (exit 1) when they are wrong, instead of a worker failing to boot with tracebacks."""
    from sync_tools.relay.production import preflight

    preflight()


def worker_exit(server, worker):  # type: ignore[no-untyped-def]
    app = getattr(worker, "wsgi", None)
    if app is None:  # the worker never loaded the app (its error is already on stderr): nothing to stop
        return
    from sync_tools.relay.app import get_relay
    from sync_tools.relay.connections import StreamLimit

    if isinstance(app, StreamLimit):  # the gevent worker's wrapper
        app = app.app
    try:
        get_relay(app).stop()
    except Exception:  # noqa: BLE001 - the process is going away; unfinished jobs stay in the outbox
        server.log.exception("relay did not stop cleanly")
