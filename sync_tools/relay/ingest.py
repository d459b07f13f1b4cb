"""The relay's optional ingest server: ``POST /webhook`` alone, as an ASGI application for granian
(``sync-tools relay --production --ingest``), beside the relay process that holds the SSE streams and
runs the outbox worker, on the same database (relay/README.md, "Two servers, one outbox").

Why a second server: under gunicorn + gevent every request runs on one core in gunicorn's
pure-Python HTTP parser, so the relay took about half the verified deliveries per second of Debian's
``webhook`` (docs/benchmarks.md, section 2). Here the HTTP layer is granian's (Rust), the webhook's
checks run on the event loop, and the durable commit runs on the outbox's committer thread, which
group-commits the deliveries of every waiting request and resolves each with one thread-safe call: no
thread per request, no thread hop for the checks. The same :meth:`Relay.prepare` and
:meth:`Relay.recorded` decide every answer, so both servers answer a delivery alike.

This process never runs jobs: after a commit that made new work it rings the outbox's doorbell
(:mod:`sync_tools.relay.doorbell`), and the relay process's worker takes the jobs at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from sync_tools.config import load_config
from sync_tools.errors import ConfigError, SyncToolsError
from sync_tools.relay import webhook as wh
from sync_tools.relay.app import Answer, Relay, ToRecord, create_app, get_relay
from sync_tools.relay.connections import DEADLINE
from sync_tools.relay.cpus import ingest_cpus, pin_worker
from sync_tools.relay.doorbell import Bell
from sync_tools.relay.outbox import OutboxError, Recorded

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

COMMIT_WAIT = 8.0  # GitHub gives up after 10 s; a commit slower than this is answered 503 (the
# delivery may still be committed: a redelivery is then answered "duplicate")
HEALTH_WAIT = 5.0
#: prometheus_client's multiprocess mode: each worker keeps its counters in files there, /metrics sums them
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
_JSON = [(b"content-type", b"application/json")]


class Ingest:
    """The ASGI application. *relay* is built but not started: its worker and broker run in the
    relay process."""

    def __init__(self, relay: Relay, *, deadline: float = DEADLINE) -> None:
        self.relay = relay
        self.deadline = deadline
        self.bell = Bell(relay.outbox.path)
        relay.on_accepted.append(self.bell.ring)
        # /metrics: every worker's counters, as prometheus_client's multiprocess mode keeps them in
        # METRICS_ENV (set by ingest_command); without it, this process's own
        shared = os.environ.get(METRICS_ENV)
        if shared:
            self.registry = CollectorRegistry()
            MultiProcessCollector(self.registry, path=shared)
        else:
            self.registry = relay.metrics.registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/webhook" or (path.startswith("/webhook/") and len(path) > 9 and "/" not in path[9:]):
            if method != "POST":
                await _answer(send, (405, _error("method not allowed"), {"Allow": "POST"}))
                return
            await _answer(send, await self._webhook(scope, receive, path[9:] or None))
        elif path == "/health" and method in ("GET", "HEAD"):
            # the probe may wait on the outbox's write lock: in a thread, never on the event loop
            try:
                async with asyncio.timeout(HEALTH_WAIT):
                    problem = await asyncio.to_thread(self.relay.outbox.problem)
            except TimeoutError:
                problem = f"the database's write lock was not free within {HEALTH_WAIT:.0f} s"
            if problem is None:
                await _answer(send, (200, {"status": "ok", "role": "ingest"}, {}))
            else:
                await _answer(send, (503, _error(f"deliveries cannot be recorded: {problem}"), {}))
        elif path == "/metrics" and method in ("GET", "HEAD"):
            data = await asyncio.to_thread(generate_latest, self.registry)  # reads each worker's file
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", CONTENT_TYPE_LATEST.encode()), (b"content-length", str(len(data)).encode())]})
            await send({"type": "http.response.body", "body": b"" if method == "HEAD" else data})
        else:
            await _answer(send, (404, _error("not found: this is the relay's ingest server, for POST /webhook; "
                                              "every other path is served by the relay"), {}))

    async def _webhook(self, scope: Scope, receive: Receive, subsystem: str | None) -> Answer:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        try:
            async with asyncio.timeout(self.deadline):  # GitHub sends a delivery in one go
                raw = await self._body(receive, headers.get("content-length"))
        except TimeoutError:
            raw = wh.RequestTimeout(f"the request body did not arrive within {self.deadline:.0f} s")
        except wh.WebhookError as e:
            raw = e

        def body() -> bytes:
            if isinstance(raw, Exception):
                raise raw
            return raw

        step = self.relay.prepare(
            event=headers.get("x-github-event"), delivery=headers.get("x-github-delivery"),
            signature=headers.get("x-hub-signature-256"), signature_sha1=headers.get("x-hub-signature"),
            content_type=headers.get("content-type"), body=body, subsystem=subsystem)
        if not isinstance(step, ToRecord):
            return step
        return self.relay.recorded(step, await self._commit(step))

    async def _body(self, receive: Receive, length: str | None) -> bytes:
        cap = self.relay.settings.max_body
        if length is not None:
            if not length.isdigit():
                raise wh.BadRequest("malformed Content-Length")
            if int(length) > cap:
                raise wh.TooLarge(f"body of {length} bytes is over the limit of {cap}")
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise wh.UnreadableBody("the connection closed before the body's end")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > cap:
                raise wh.TooLarge(f"body over the limit of {cap} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                if length is not None and size != int(length):  # cut short: the relay's servers say 400 too
                    raise wh.UnreadableBody(f"the body ended after {size} of its {length} bytes")
                return b"".join(chunks)

    async def _commit(self, step: ToRecord) -> Recorded | OutboxError:
        loop = asyncio.get_running_loop()
        committed = loop.create_future()

        def settle() -> None:
            if not committed.done():
                committed.set_result(None)

        def notify() -> None:  # on the committer thread
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (shutting down)
                loop.call_soon_threadsafe(settle)

        try:
            item = self.relay.outbox.submit(step.delivery, step.event, step.summary, step.jobs, digest=step.digest,
                                            notify=notify)
        except OutboxError as e:
            return e
        try:
            async with asyncio.timeout(COMMIT_WAIT):
                await committed
        except TimeoutError:
            return OutboxError(f"the outbox did not commit delivery {step.delivery} within {COMMIT_WAIT:.0f} s")
        return item.outcome()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def close(self) -> None:
        self.bell.close()
        with contextlib.suppress(OutboxError):
            self.relay.outbox.close()


def _error(message: str) -> dict[str, Any]:
    return {"status": "error", "error": message}


async def _answer(send: Send, answer: Answer) -> None:
    status, body, extra = answer
    data = orjson.dumps(body)
    headers = [*_JSON, (b"content-length", str(len(data)).encode())]
    headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


def build() -> Ingest:
    """uvicorn's ``--factory`` entry (``sync_tools.relay.ingest:build``): the config from
    ``SYNC_TOOLS_CONFIG``, secrets from the environment, as :mod:`sync_tools.relay.wsgi` does; a
    start-up error is one line on stderr and exit 1. The worker takes a core of its own
    (:mod:`sync_tools.relay.cpus`) before granian starts its threads."""
    try:
        cpus = ingest_cpus(os.environ)
        shared = os.environ.get(METRICS_ENV)
        if shared:  # made (and emptied) by `relay --production --ingest`; made here for other starts
            try:
                Path(shared).mkdir(mode=0o700, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"cannot make {shared} for the workers' metrics: {e.strerror or e}") from e
        relay = get_relay(create_app(load_config()))
        pin_worker(relay.outbox.path, cpus)
        return Ingest(relay)
    except SyncToolsError as e:
        print(f"sync-tools relay (ingest): {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def metrics_dir(db: Path) -> Path:
    """Where the ingest server's workers keep their counters (METRICS_ENV): beside the database."""
    return Path(f"{db}.ingest-metrics")
