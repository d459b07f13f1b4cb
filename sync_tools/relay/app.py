"""The relay's Flask app factory: one blueprint per concern (hooks, events, health).

``create_app(config)`` builds the app and its :class:`Relay` (outbox, worker threads, SSE broker,
dispatcher, metrics), stored in ``app.extensions["sync_tools.relay"]``. Threads are started by
:meth:`Relay.start` (``server.serve`` and ``relay/wsgi.py`` do it), never at import, so a test can
drive the request logic alone.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import IO, TYPE_CHECKING, Any

import orjson
import requests
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from werkzeug.exceptions import ClientDisconnected
from werkzeug.wsgi import get_content_length, get_input_stream

from sync_tools.config import Config
from sync_tools.errors import ConfigError
from sync_tools.relay import webhook as wh
from sync_tools.relay.dispatch import GitHubDispatcher, LocalDispatcher, watch_session
from sync_tools.relay.doorbell import Listener
from sync_tools.relay.fanout import AgentPusher, Broker, release_event, state_key
from sync_tools.relay.metrics import Metrics
from sync_tools.relay.nats_publish import KIND as NATS_KIND
from sync_tools.relay.nats_publish import NatsPublisher
from sync_tools.relay.outbox import Job, NewJob, Outbox, OutboxError, Recorded
from sync_tools.relay.settings import Settings, load_settings
from sync_tools.relay.worker import Backoff, Deferred, Worker
from sync_tools.signing import load_public_key
from sync_tools.stores.base import Store, open_store
from sync_tools.versions import later, parse_version

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

log = logging.getLogger(__name__)

EXTENSION = "sync_tools.relay"
_DELIVERY_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_EVENT_RE = re.compile(r"^[a-z_]{1,64}$")
_CHUNK = 64 * 1024


class _Throttled:
    """Log refusals at WARNING at most once per *window* seconds, counting the rest: a flood of bad
    requests must not become a flood of log lines (and disk writes)."""

    def __init__(self, window: float = 10.0):
        self.window = window
        self._lock = threading.Lock()
        self._next = 0.0
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._suppressed += 1
                log.debug(msg, *args)
                return
            suppressed, self._suppressed, self._next = self._suppressed, 0, now + self.window
        if suppressed:
            msg += f" (and {suppressed} more refusals in the last {self.window:.0f} s)"
        log.warning(msg, *args)


DISPATCHED_TTL = 0.5  # seconds a delivery's "older than dispatched" check may trust an earlier read
Answer = tuple[int, dict[str, Any], dict[str, str]]  # HTTP status, JSON body, extra headers


@dataclass(frozen=True)
class ToRecord:
    """A verified delivery with jobs, between :meth:`Relay.prepare` and its commit."""

    delivery: str
    event: str
    summary: str
    jobs: list[NewJob]
    digest: str


@dataclass
class Relay:
    """The running parts of one relay. Build with :func:`create_app`."""

    config: Config
    settings: Settings
    outbox: Outbox
    broker: Broker
    pusher: AgentPusher
    metrics: Metrics
    dispatcher: Any
    store_factory: Callable[[], Store]
    worker: Worker = field(init=False)
    refusals: _Throttled = field(default_factory=_Throttled)
    nats: NatsPublisher | None = None  # relay.nats: release events also go to NATS JetStream (docs/nats.md)
    _public_key: Any = None
    _doorbell: Listener | None = None
    _dispatched_seen: dict[str, tuple[float, str | None]] = field(default_factory=dict)
    _last_dispatch: float = float("-inf")  # time.monotonic() of the last repository_dispatch sent
    fleet: Any = None  # sync_tools.relay.fleet_views.FleetRelay: reports, rollouts, the fleet view
    manifest_hooks: list[Callable[[bytes], None]] = field(default_factory=list)  # each verified manifest fanned out
    on_accepted: list[Callable[[], None]] = field(default_factory=list)  # after a delivery's jobs are committed

    def __post_init__(self) -> None:
        if self.nats is None:
            self.nats = NatsPublisher(self.config.relay.nats, root=self.config.root, outbox=self.outbox)
        self.worker = Worker(
            self.outbox,
            {"dispatch": self._dispatch_job, "fanout": self._fanout_job, "push": self._push_job,
             NATS_KIND: self.nats.handle},
            max_attempts=self.settings.max_attempts,
            backoff=Backoff(base=self.settings.backoff_base, cap=self.settings.backoff_cap),
            threads=self.settings.workers,
            observe=self._observe,
        )

    # -------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Resume interrupted jobs and start the worker and broker threads. Idempotent."""
        missing = self.pusher.missing_secrets()
        if missing:
            log.warning("agent secrets not set: %s (pushes to those agents will be dead-lettered)",
                        ", ".join(missing))
        start = getattr(self.dispatcher, "start", None)
        if callable(start):
            start()  # a dispatcher stopped by an earlier stop() runs builds again
        self.broker.start()
        self.worker.start()
        if self._doorbell is None:  # the ingest server (relay/ingest.py) rings it after each commit
            self._doorbell = Listener(self.outbox.path, self.worker.wake)
            self._doorbell.start()

    def stop(self) -> None:
        """Stop the worker and broker threads and close the outbox. A local build still running is
        stopped first (its process group, SIGTERM then SIGKILL): left running, it would go on writing
        the workspace and the store while the next start runs its job again."""
        self.worker.request_stop()  # first: no thread takes a new job once the builds are stopped
        stop = getattr(self.dispatcher, "stop", None)
        if callable(stop):
            stop()
        self.worker.stop()
        self.broker.stop()
        if self._doorbell is not None:
            self._doorbell.stop()
            self._doorbell = None
        self.outbox.close()
        if self.fleet is not None:
            self.fleet.fleet.store.close()

    # --------------------------------------------------------------------------------- handlers

    def _observe(self, job: Job, outcome: str, seconds: float) -> None:
        self.metrics.jobs.labels(kind=job.kind, outcome=outcome).inc()
        self.metrics.dispatch_seconds.labels(kind=job.kind).observe(seconds)

    def _dispatch_job(self, job: Job) -> list[NewJob]:
        sub, version = job.payload.get("subsystem"), job.payload.get("version")
        # this job is running: the next delivery of its subsystem reads the running version afresh
        # (first thing, so the window after the claim is as short as can be; the rest reads the database)
        self._dispatched_seen.pop(str(sub), None)
        key = f"dispatched:{sub}"
        tracked = self.config.subsystems.get(sub) if isinstance(sub, str) else None
        if tracked is not None and tracked.strategy == "commits":
            # shas have no order of their own: the order of arrival is the branch's order. A push
            # waits for the earlier pushes still queued (one in its backoff after a failed dispatch),
            # so the branch's newest head goes out last; and an older push that comes back after a
            # later one went out (retried by hand) is not dispatched: it would roll the build back
            earlier = self.outbox.earlier_unfinished(job, f"dispatch:{sub}:")
            if earlier is not None:
                soon = self.outbox.now() + (1.0 if earlier.status == "running" else 0.05)
                until = max(earlier.next_attempt + 0.001, soon)  # never a spin, whatever holds it up
                raise Deferred(f"{sub}: the push of job {earlier.id} arrived first and goes out first",
                               until=until)
            arrival_key = f"dispatched-arrival:{sub}"
            last = self.outbox.get_state(arrival_key)
            if last is not None and last.isdigit() and int(last) > job.id:
                log.info("dispatch of %s %s (delivery %s) skipped: a push that arrived after it went out "
                         "first", sub, version, job.delivery)
                return []
            self._pace()
            self._send(job)
            self.outbox.set_state(arrival_key, str(job.id))
            return self._dispatched(job)
        ordered = tracked is not None and isinstance(version, str)
        newest = self.outbox.get_state(key) if ordered else None
        if newest is not None and later(newest, version):
            # a retry that came due after a newer version of the subsystem went out must not roll it back
            log.info("dispatch of %s %s (delivery %s) skipped: %s went out after it", sub, version, job.delivery,
                     newest)
            return []
        if ordered:
            # a job back in the queue (paced, in backoff) while a newer version was queued beside it: the
            # newer one goes out, this one would be a build replaced at once
            queued = [p.get("version") for p in self.outbox.pending_in_slot(f"dispatch:{sub}:", job.id)]
            ahead = [v for v in queued if isinstance(v, str) and later(v, str(version))]
            if ahead:
                log.info("dispatch of %s %s (delivery %s) skipped: %s is queued after it", sub, version,
                         job.delivery, ahead[0])
                return []
        self._pace()
        self._send(job)
        if ordered and (newest is None or later(version, newest)):
            self.outbox.set_state(key, version)
            self._dispatched_seen.pop(str(sub), None)
        return self._dispatched(job)

    def _pace(self) -> None:
        """GitHub asks integrators to leave a second between mutative requests (its REST API best
        practices; secondary rate limits otherwise): a dispatch due sooner goes back to the queue,
        due when the interval is over, holding no thread. The lane keeps one dispatch in flight, and
        newer versions replace a pending one (:meth:`jobs_for`), so the wait never builds a backlog."""
        if not isinstance(self.dispatcher, GitHubDispatcher) or self.settings.dispatch_interval <= 0:
            return
        now = time.monotonic()
        wait = self._last_dispatch + self.settings.dispatch_interval - now
        if wait > 0:
            raise Deferred(f"{wait:.2f} s to go before the next repository_dispatch", until=self.outbox.now() + wait,
                           quiet=True)
        self._last_dispatch = now

    def _send(self, job: Job) -> None:
        """Send the dispatch; the pace's second then counts from its end too. A request whose connection
        took long to open (a new TLS session) arrives late, and the next one, on the kept connection,
        would otherwise reach GitHub less than a second after it."""
        try:
            self.dispatcher.dispatch(job.payload)
        finally:
            self._last_dispatch = max(self._last_dispatch, time.monotonic())

    def _dispatched(self, job: Job) -> list[NewJob]:
        log.info("dispatched %s %s (delivery %s) via %s", job.payload.get("subsystem"),
                 job.payload.get("version"), job.delivery, self.dispatcher.name)
        if isinstance(self.dispatcher, LocalDispatcher):
            # the local release finished: agents hear about it from the store, as with a GitHub release
            return [self.fanout_job("local")]
        return []

    def fanout_job(self, source: str) -> NewJob:
        return NewJob(kind="fanout", payload={"tag": self.config.release.tag, "source": source}, lane="fanout")

    def public_key(self) -> Any:
        if self._public_key is None:
            value = self.config.release.public_key
            if not value:
                raise ConfigError("release.public_key is not set: the relay only announces manifests it "
                                  "can verify", path=self.config.path)
            self._public_key = load_public_key(str(self.config.resolve(value)))
        return self._public_key

    def _fanout_job(self, job: Job) -> list[NewJob]:
        tag = str(job.payload.get("tag") or self.config.release.tag)
        key = state_key(tag)
        previous = self.outbox.get_state(key)
        event, data = release_event(self.store_factory(), self.public_key(), tag,
                                    previous.encode() if previous is not None else None)
        for hook in self.manifest_hooks if data is not None else ():
            hook(data)  # rollouts are set up (a due first wave opened) before the event announces them
        if event is None:
            if data is not None:
                self.outbox.set_state(key, data.decode())
            log.info("fan-out (%s): no changed subsystem in %s", job.payload.get("source"), tag)
            return []
        body = event.to_json()
        nats = self.nats
        assert nats is not None
        event_id = self.outbox.append_event(event.type, body,
                                            jobs=lambda eid: self.pusher.jobs_for(eid, body) + nats.jobs_for(eid, body),
                                            state={key: (data or b"").decode()})
        log.info("release event %d: serial %d, subsystems %s", event_id, event.serial, ",".join(event.subsystems))
        self.broker.notify()
        self.worker.wake()
        return []

    def _push_job(self, job: Job) -> list[NewJob]:
        p = job.payload
        self.pusher.push(str(p["url"]), int(p["event_id"]), p["event"])
        return []

    # ----------------------------------------------------------------------------------- ingest

    def accept(self, *, event: str | None, delivery: str | None, signature: str | None,
               signature_sha1: str | None, content_type: str | None, body: Callable[[], bytes],
               subsystem: str | None) -> Answer:
        """One ``POST /webhook[/<subsystem>]``: verify, classify, record durably. Returns the HTTP
        status, the JSON answer and extra headers. *body* reads the raw body (and may raise
        TooLarge); nothing is parsed before the signature over those bytes is checked, and 202
        comes only after the delivery's commit is on disk."""
        step = self.prepare(event=event, delivery=delivery, signature=signature, signature_sha1=signature_sha1,
                            content_type=content_type, body=body, subsystem=subsystem)
        if not isinstance(step, ToRecord):
            return step
        try:
            rec: Recorded | OutboxError = self.outbox.record(step.delivery, step.event, step.summary, step.jobs,
                                                             digest=step.digest)
        except OutboxError as e:
            rec = e
        return self.recorded(step, rec)

    def prepare(self, *, event: str | None, delivery: str | None, signature: str | None,
                signature_sha1: str | None, content_type: str | None, body: Callable[[], bytes],
                subsystem: str | None) -> Answer | ToRecord:
        """The CPU part of :meth:`accept`, before the commit: the final answer of a delivery that is
        refused, a ping or ignored, or what to record. An asynchronous front awaits the commit
        (:meth:`Outbox.submit`) and then answers with :meth:`recorded`."""
        deliveries = self.metrics.delivery
        try:
            raw = body()
            wh.verify_signature(self.settings.webhook_secret, raw, signature, signature_sha1)
            if not event or not _EVENT_RE.match(event):
                raise wh.BadRequest("missing or malformed X-GitHub-Event")
            if not delivery or not _DELIVERY_RE.match(delivery):
                raise wh.BadRequest("missing or malformed X-GitHub-Delivery")
            payload = wh.decode_body(raw, content_type)
            results = wh.classify(self.config, event, payload, delivery, subsystem)
        except wh.WebhookError as e:
            result = {401: "unauthorized", 413: "too_large"}.get(e.status, "bad_request")
            deliveries(result).inc()
            self.refusals.warning("refused delivery %s (%s): %s", _safe_id(delivery), result, e)
            # a 413 leaves the unread rest of the body on the connection, and a body that could not
            # be read leaves the connection out of step: close it
            close = isinstance(e, (wh.TooLarge, wh.RequestTimeout, wh.UnreadableBody))
            return e.status, _error_body(str(e)), {"Connection": "close"} if close else {}

        results = [self._not_older(r) for r in results]
        if any(isinstance(r, wh.Ping) for r in results):
            deliveries("ping").inc()
            return 200, {"status": "pong", "delivery": delivery}, {}
        jobs = self.jobs_for(results)
        if not jobs:
            deliveries("ignored").inc()
            reasons = [r.reason for r in results if isinstance(r, wh.Ignored)]
            log.info("ignored delivery %s (%s): %s", delivery, event, "; ".join(reasons))
            return 200, {"status": "ignored", "delivery": delivery, "reasons": reasons}, {}
        summary = "; ".join(f"{j.kind} {j.payload.get('subsystem', '')} {j.payload.get('version', '')}".strip()
                            for j in jobs)
        assert event is not None  # checked above, with the delivery id
        return ToRecord(delivery, event, summary, jobs, hashlib.sha256(raw).hexdigest())

    def recorded(self, step: ToRecord, rec: Recorded | OutboxError) -> Answer:
        """The answer to a delivery whose commit finished (*rec*) or failed."""
        deliveries = self.metrics.delivery
        delivery, event, digest, jobs, summary = step.delivery, step.event, step.digest, step.jobs, step.summary
        if isinstance(rec, OutboxError):
            e = rec
            deliveries("error").inc()
            self.refusals.warning("cannot record delivery %s: %s", delivery, e)  # a full disk: once in a while
            # 503: GitHub shows the failure and a person can redeliver; nothing was accepted
            return 503, _error_body("the relay cannot record deliveries right now"), {}
        if rec.duplicate:
            deliveries("duplicate").inc()
            if rec.digest is not None and rec.digest != digest:  # a redelivery repeats its body exactly
                log.warning("delivery %s repeated with a different body (sha256 %s, first %s); "
                            "not acting on it", delivery, digest[:12], rec.digest[:12])
            else:
                log.info("delivery %s already recorded; not acting on it again", delivery)
            return 200, {"status": "duplicate", "delivery": delivery}, {}
        deliveries("accepted").inc()
        if len(rec.jobs) > rec.replaced:  # new work; a job that only took a pending one's place is known
            self.worker.wake(lanes=[j.lane for j in jobs])
            for ring in self.on_accepted:
                ring()
        log.info("accepted delivery %s (%s): %s", delivery, event, summary)
        return 202, {"status": "accepted", "delivery": delivery, "jobs": list(rec.jobs),
                     "coalesced": rec.coalesced}, {}

    def _not_older(self, r: wh.Classification) -> wh.Classification:
        """An upstream version older than the one already dispatched is ignored (200 with the reason):
        accepted, it would only be dropped by the worker (:meth:`_dispatch_job`), unseen by whoever
        looks at GitHub's "Recent Deliveries". Commits have no order of their own; they are left alone."""
        if not isinstance(r, wh.UpstreamChange):
            return r
        tracked = self.config.subsystems.get(r.subsystem)
        if tracked is None or tracked.strategy == "commits":
            return r
        try:
            newest = self._newest_dispatched(r.subsystem)
        except OutboxError:
            return r  # the worker still refuses to roll the build back
        if newest is not None and later(newest, r.version):
            return wh.Ignored(r.delivery, r.event,
                              f"{r.subsystem} {r.version} is older than {newest}, which was already dispatched")
        if newest is not None and newest == r.version and not self._known_delivery(r.delivery):
            # the same version again (its tag, then its release page an hour later): one dispatch is
            # enough. A redelivery of the same delivery is answered "duplicate" by the record step
            return wh.Ignored(r.delivery, r.event, f"{r.subsystem} {r.version} was already dispatched")
        return r

    def _known_delivery(self, delivery: str) -> bool:
        try:
            return self.outbox.has_delivery(delivery)
        except OutboxError:
            return True  # the record step decides, as before

    def _newest_dispatched(self, subsystem: str) -> str | None:
        """The newest version of *subsystem* dispatched, as of at most DISPATCHED_TTL seconds ago: a
        burst of deliveries reads it once, not once each (the worker of another process moves it).
        Stale, it only lets an older version through to the worker, which drops it."""
        now = time.monotonic()
        hit = self._dispatched_seen.get(subsystem)
        if hit is not None and now - hit[0] < DISPATCHED_TTL:
            return hit[1]
        newest = self.outbox.get_state(f"dispatched:{subsystem}")
        # a dispatch on its way out counts too: its state is written only once GitHub has answered, and
        # an older version accepted meanwhile would be dropped by the worker, unseen
        prefix = f"dispatch:{subsystem}:"
        for key in self.outbox.running_dedupes(prefix):
            going = key[len(prefix):]
            if newest is None or later(going, newest):
                newest = going
        self._dispatched_seen[subsystem] = (now, newest)
        return newest

    def jobs_for(self, results: list[wh.Classification]) -> list[NewJob]:
        jobs = []
        for r in results:
            if isinstance(r, wh.UpstreamChange):
                # one dispatch in flight at a time: a SIGKILL between GitHub's 204 and the job's
                # completion then repeats at most one dispatch (a workflow run), not one per thread
                lane = f"local:{r.subsystem}" if isinstance(self.dispatcher, LocalDispatcher) else "dispatch"
                tracked = self.config.subsystems.get(r.subsystem)
                ordered = tracked is not None and tracked.strategy != "commits"
                # versions have an order: one pending dispatch per subsystem, of the newest version (a
                # build of an older one would be replaced at once); pushes go out one by one, in order
                jobs.append(NewJob(kind="dispatch", payload=r.client_payload(), lane=lane,
                                   dedupe=f"dispatch:{r.subsystem}:{r.version}",
                                   supersedes=f"dispatch:{r.subsystem}:" if ordered else None,
                                   newer=_newer_than(r.version) if ordered else None))
            elif isinstance(r, wh.OwnRelease):
                jobs.append(self.fanout_job(f"release {r.action} {r.tag}"))
        return jobs


def get_relay(app: Flask | None = None) -> Relay:
    return (app or current_app).extensions[EXTENSION]


# --------------------------------------------------------------------------------------- helpers


def _newer_than(version: str) -> Callable[[dict[str, Any]], bool]:
    """Whether *version* should take a pending dispatch's place: when it is later, or when either
    cannot be ordered (a `latest` or `nightly-*` tag; a sha left by a change of strategy), where the
    order of arrival is the only order there is."""
    def newer(pending: dict[str, Any]) -> bool:
        held = pending.get("version")
        if not isinstance(held, str) or parse_version(held) is None or parse_version(version) is None:
            return True
        return later(version, held)
    return newer


def _error(status: int, message: str, **headers: str) -> Response:
    resp = jsonify(status="error", error=message)
    resp.status_code = status
    for k, v in headers.items():
        resp.headers[k.replace("_", "-")] = v
    return resp


def read_capped(stream: IO[bytes], length: int | None, max_body: int) -> bytes:
    """The raw request body from *stream*, refusing (TooLarge) from Content-Length before reading and
    while reading a chunked body, so an oversized body is never held in memory. A body that stops
    arriving until the server's socket times out is a RequestTimeout (408); one cut short (shorter than
    its Content-Length, under every server) or badly chunked is a BadRequest (400)."""
    if length is not None and length > max_body:
        raise wh.TooLarge(f"body of {length} bytes is over the {max_body}-byte cap")
    parts: list[bytes] = []
    total = 0
    while True:
        try:
            chunk = stream.read(_CHUNK)
        except TimeoutError as e:  # the server's socket timeout: a client that stopped sending
            raise wh.RequestTimeout("the request body stopped arriving") from e
        except ClientDisconnected as e:
            if isinstance(e.__context__, TimeoutError):  # werkzeug's stream hides the timeout in here
                raise wh.RequestTimeout("the request body stopped arriving") from e
            raise wh.UnreadableBody(f"the request body could not be read: {type(e).__name__}") from e
        except (OSError, ValueError) as e:
            # werkzeug's server: a body shorter than its Content-Length (ClientDisconnected), a bad
            # chunk header (OSError, ValueError); the connection is unusable, the client at fault
            raise wh.UnreadableBody(f"the request body could not be read: {type(e).__name__}") from e
        if not chunk:
            break
        total += len(chunk)
        if total > max_body:
            raise wh.TooLarge(f"body is over the {max_body}-byte cap")
        parts.append(chunk)
    # gunicorn's reader ends quietly at a half-closed connection: a body shorter than its
    # Content-Length is truncated, whatever the bytes that did arrive are signed over
    if length is not None and total != length:
        raise wh.UnreadableBody(f"the request body ended after {total} of its {length} bytes")
    return b"".join(parts)


def _safe_id(value: str | None) -> str:
    """A header value fit for a log line (never a whole payload or a secret)."""
    if value and _DELIVERY_RE.match(value):
        return value
    return "<invalid>" if value else "<none>"


# ----------------------------------------------------------------------------------------- hooks

hooks = Blueprint("hooks", __name__)


@hooks.post("/notify")
def notify() -> Response | tuple[Response, int]:
    """The release job's "I released": signed like a webhook with the notify secret. Only makes the
    relay read (and verify) the store's manifest; the body cannot point anywhere else."""
    relay = get_relay()
    try:
        body = read_capped(request.stream, request.content_length, 64 * 1024)
        wh.verify_signature(relay.settings.notify_secret, body, request.headers.get("X-Hub-Signature-256"),
                            request.headers.get("X-Hub-Signature"))
        if body.strip():
            payload = wh.decode_body(body, request.content_type or "application/json")
            tag = payload.get("release", relay.config.release.tag)
            if tag != relay.config.release.tag:
                raise wh.BadRequest(f"this relay announces release {relay.config.release.tag!r}, not {tag!r}")
    except wh.WebhookError as e:
        relay.metrics.delivery("unauthorized" if e.status == 401 else "bad_request").inc()
        relay.refusals.warning("refused notify: %s", e)
        return _error(e.status, str(e))
    delivery = request.headers.get("X-GitHub-Delivery") or request.headers.get("X-Sync-Tools-Delivery")
    if delivery is not None and not _DELIVERY_RE.match(delivery):
        return _error(400, "malformed delivery id")
    delivery = delivery or f"notify-{uuid.uuid4()}"
    # "look again" says nothing a look not yet taken will not see: while one waits in the queue (or in
    # its backoff, the store unreachable) a notify joins it, so a body sent again and again (it carries
    # no id or time of its own) costs a row, not a read of the store each. A look already running may
    # have read the store before the release landed: the next notify queues one after it
    job = replace(relay.fanout_job("notify"), dedupe=f"{_NOTIFY_SLOT}{delivery}", supersedes=_NOTIFY_SLOT,
                  newer=_joins_the_pending_look)
    try:
        rec = relay.outbox.record(delivery, "notify", "fanout", [job])
    except OutboxError as e:
        log.error("cannot record notify %s: %s", delivery, e)
        return _error(503, "the relay cannot record deliveries right now")
    if rec.duplicate:
        return jsonify(status="duplicate", delivery=delivery)
    if rec.jobs:
        relay.worker.wake()
    return jsonify(status="accepted", delivery=delivery, jobs=list(rec.jobs), coalesced=rec.coalesced), 202


_NOTIFY_SLOT = "notify-fanout:"  # the supersede slot of /notify's fan-outs: at most one pending


def _joins_the_pending_look(pending: dict[str, Any]) -> bool:
    return False  # never replaces the pending look (its attempts and backoff stay): it is dropped, coalesced


# ---------------------------------------------------------------------------------- webhook front

_STATUS = {200: "200 OK", 202: "202 Accepted", 400: "400 Bad Request", 401: "401 Unauthorized",
           405: "405 Method Not Allowed", 408: "408 Request Timeout", 413: "413 Content Too Large", 503: "503 Service Unavailable"}
_JSON_OPTS = orjson.OPT_SORT_KEYS | orjson.OPT_APPEND_NEWLINE


def _error_body(message: str) -> dict[str, Any]:
    return {"status": "error", "error": message}


class WebhookFront:
    """``POST /webhook`` and ``POST /webhook/<subsystem>`` as a plain WSGI handler in front of the
    Flask app; every other request goes on to Flask.

    The webhook is the relay's one hot endpoint, and Flask's request and response objects, context
    locals and routing cost more CPU than verifying, classifying and recording a delivery
    (bench/relay). The logic is :meth:`Relay.accept`; this class only moves bytes and headers.
    """

    def __init__(self, relay: Relay, app: WSGIApplication):
        self.relay = relay
        self.app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO") or ""
        if path == "/webhook":
            subsystem = None
        elif path.startswith("/webhook/") and len(path) > 9 and "/" not in path[9:]:
            # PATH_INFO carries the URL's bytes as latin-1 (PEP 3333); names are UTF-8
            subsystem = path[9:].encode("latin-1").decode("utf-8", "replace")
        else:
            return self.app(environ, start_response)
        if environ.get("REQUEST_METHOD") != "POST":
            return _respond(start_response, 405, _error_body("method not allowed"), {"Allow": "POST"})
        max_body = self.relay.settings.max_body
        status, body, headers = self.relay.accept(
            event=environ.get("HTTP_X_GITHUB_EVENT"),
            delivery=environ.get("HTTP_X_GITHUB_DELIVERY"),
            signature=environ.get("HTTP_X_HUB_SIGNATURE_256"),
            signature_sha1=environ.get("HTTP_X_HUB_SIGNATURE"),
            content_type=environ.get("CONTENT_TYPE"),
            body=lambda: read_capped(get_input_stream(environ), get_content_length(environ), max_body),
            subsystem=subsystem,
        )
        return _respond(start_response, status, body, headers)


def _respond(start_response: StartResponse, status: int, body: dict[str, Any],
             headers: dict[str, str]) -> list[bytes]:
    data = orjson.dumps(body, option=_JSON_OPTS)
    start_response(_STATUS.get(status, f"{status} Error"),
                   [("Content-Type", "application/json"), ("Content-Length", str(len(data))), *headers.items()])
    return [data]


# ---------------------------------------------------------------------------------------- events

events = Blueprint("events", __name__)


_EVENT_ID = re.compile(r"[0-9]{1,18}")


def _authorised(tokens: tuple[bytes, ...]) -> bool:
    auth = request.headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return False
    given = value.strip().encode()
    ok = False
    for t in tokens:  # compare with every token, so timing does not tell which one nearly matched
        ok |= hmac.compare_digest(given, t)
    return ok


@events.get("/events")
def stream() -> Response:
    relay = get_relay()
    if not _authorised(relay.settings.agent_tokens):
        relay.metrics.delivery("sse_unauthorized").inc()
        return _error(401, "an agent token is required: Authorization: Bearer <token>",
                      WWW_Authenticate='Bearer realm="sync-tools-relay"')
    raw = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    tail = relay.outbox.last_event_id()
    if raw is None or raw.strip() == "":
        last = tail
    elif _EVENT_ID.fullmatch(raw.strip()):
        # an id past the log's end was given by another database (recreated, or moved): this log is
        # new to the agent, so all of it is sent rather than nothing until its ids catch up
        last = int(raw.strip())
        last = 0 if last > tail else last
    else:
        return _error(400, "Last-Event-ID must be an event id (a non-negative integer)")
    # the subscription is made by the stream when it starts (before it reads the log): a response that
    # is never iterated (HEAD) leaves no subscriber behind
    body = relay.broker.stream(None, last, relay.settings.heartbeat)
    if relay.fleet is not None:  # an agent with a stream open is not silent
        body = relay.fleet.track(body)
    resp = Response(body, mimetype="text/event-stream", direct_passthrough=True)
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"  # proxies must not buffer the stream
    return resp


# ---------------------------------------------------------------------------------------- health

health = Blueprint("health", __name__)


@health.get("/health")
def health_view() -> Response | tuple[Response, int]:
    relay = get_relay()
    problem = relay.outbox.problem()  # healthy means a delivery can be committed now
    if problem is not None:
        relay.refusals.warning("health: deliveries cannot be recorded: %s", problem)
        return jsonify(status="error", error=f"deliveries cannot be recorded: {problem}"), 503
    try:
        st = relay.outbox.stats()
    except Exception as e:  # noqa: BLE001 - health must answer, and say what is wrong
        why = str(e)
        try:
            relay.outbox.check_files()  # removed or replaced says more than "unable to open"
        except OutboxError as gone:
            why = str(gone)
        relay.refusals.warning("health: cannot read the outbox: %s", why)
        return jsonify(status="error", error=f"cannot read the relay database: {why}"), 503
    return jsonify(
        status="ok",
        dispatch=relay.config.relay.dispatch,
        queue_depth=st.queue_depth,
        running=st.running,
        oldest_pending_age=None if st.oldest_pending_age is None else round(st.oldest_pending_age, 3),
        dead_letters=st.dead,
        done=st.done,
        connected_agents=relay.broker.connected,
        last_event_id=st.last_event_id,
        rollouts_halted=relay.fleet.fleet.halted() if relay.fleet is not None else [],
    )


@health.get("/metrics")
def metrics_view() -> Response:
    return Response(generate_latest(get_relay().metrics.registry), mimetype=CONTENT_TYPE_LATEST)


# --------------------------------------------------------------------------------------- factory


def create_app(config: Config, settings: Settings | None = None, *, now: Callable[[], float] = time.time,
               http: requests.Session | None = None, store_factory: Callable[[], Store] | None = None,
               dispatcher: Any = None, environ: Mapping[str, str] | None = None) -> Flask:
    """The relay app for *config*. Settings come from the environment unless given.

    Raises ConfigError (no webhook secret, github dispatch without a token, no release.repo for
    github dispatch) and OutboxError (the database cannot be opened).
    """
    settings = settings or load_settings(config, environ)
    if not settings.webhook_secret:
        raise ConfigError("the webhook secret is empty; the relay refuses to start without one")
    session = watch_session(http or requests.Session())
    outbox = Outbox(settings.db_path, now=now, retention=settings.retention, prune_every=settings.prune_every)
    if dispatcher is None:
        if config.relay.dispatch == "github":
            if not config.release.repo:
                raise ConfigError("relay.dispatch is 'github' but release.repo is not set", path=config.path)
            dispatcher = GitHubDispatcher(config.release.repo, settings.github_api_url, settings.github_token,
                                          session=session, timeout=settings.http_timeout, now=now)
        else:
            # the agents' push secrets stay with the relay too: a build runs upstream code
            dispatcher = LocalDispatcher(config.path, settings.logs_dir, timeout=settings.build_timeout,
                                         env=environ, drop_env=[a.secret_env for a in config.relay.agents])
    broker = Broker(outbox, queue_size=settings.subscriber_queue)
    relay = Relay(
        config=config,
        settings=settings,
        outbox=outbox,
        broker=broker,
        pusher=AgentPusher(config.relay.agents, environ=settings.agent_secrets, session=session,
                           timeout=settings.http_timeout, now=now),
        metrics=Metrics(outbox, lambda: broker.connected),
        dispatcher=dispatcher,
        store_factory=store_factory or (lambda: open_store(config)),
        nats=NatsPublisher(config.relay.nats, root=config.root, environ=environ, outbox=outbox),
    )
    app = Flask("sync_tools.relay")
    app.extensions[EXTENSION] = relay
    app.wsgi_app = WebhookFront(relay, app.wsgi_app)  # type: ignore[method-assign]
    app.register_blueprint(hooks)
    app.register_blueprint(events)
    app.register_blueprint(health)
    from sync_tools.relay.fleet_views import install

    install(app, relay)

    @app.errorhandler(404)
    def _not_found(e: Exception) -> Response:
        return _error(404, "not found")

    @app.errorhandler(405)
    def _bad_method(e: Exception) -> Response:
        return _error(405, "method not allowed")

    @app.errorhandler(OutboxError)
    def _database(e: OutboxError) -> Response:
        relay.refusals.warning("cannot read the relay database: %s", e)
        return _error(503, "the relay database cannot be read right now")

    return app

