"""How release events reach the agent: the relay's SSE stream, or POSTs to the agent's own receiver.

- :class:`SSEClient` holds ``GET <relay>/events`` open (``Authorization: Bearer <token>``), hands every
  event to a callback, and reconnects with exponential backoff and full jitter, sending
  ``Last-Event-ID`` so the relay replays what was missed. A stream that ends soon after it opened, or
  an answer that is no event stream, counts as a failure (the backoff grows); a 429/503's
  ``Retry-After`` is honoured (capped, with jitter); an id that could not be sent back is not kept,
  and a resume point the relay refuses (400) is dropped.
- :class:`WebhookVerifier` checks pushed deliveries: Standard Webhooks (``webhook-id``,
  ``webhook-timestamp`` within 5 minutes, ``webhook-signature``) via the ``standardwebhooks`` package,
  or GitHub's own ``X-Hub-Signature-256`` for a release webhook pointed straight at the agent; a
  repeated delivery id is accepted once.
- :func:`create_receiver` is the small Flask app: ``POST /webhook`` and ``GET /health``.

Events carry no trust: an event only makes the agent fetch and verify the signed manifest itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sync_tools.agent.httpclient import Client, HTTPError, Response
from sync_tools.errors import ConfigError, DataError

if TYPE_CHECKING:
    from sync_tools.config import Config

log = logging.getLogger(__name__)

EVENT_TYPE = "release.updated"
HEARTBEAT_READ_TIMEOUT = 90.0  # the relay sends a comment at least every 30 s
MAX_EVENT_BYTES = 1 << 20
#: Seconds a stream must have stayed open for its end to be a new outage (the backoff starts over):
#: a stream that ends sooner is a failure, or a relay (or a page in its place) that closes at once
#: would be reconnected to, and the release looked at, every half second.
STABLE_STREAM_SECONDS = 30.0
#: The longest ``Retry-After`` of a 429/503 the client honours, in seconds.
RETRY_AFTER_MAX = 300.0
#: The longest event id kept as the resume point; it goes back to the relay as a header.
MAX_EVENT_ID = 128


def _sendable_id(value: str) -> bool:
    """Whether *value* can go back as ``Last-Event-ID``: visible ASCII, not too long. The SSE standard
    ignores an id with NUL; a CR, a character latin-1 lacks, or a line past the server's header limit
    would fail every reconnect."""
    return 0 < len(value) <= MAX_EVENT_ID and all("!" <= c <= "~" for c in value)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None when absent or nonsense."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    import email.utils

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class StreamRefused(HTTPError):
    """The relay answered /events with a status other than 200, or with no event stream."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True)
class AgentEvent:
    """A hint that the release changed; ``subsystems`` empty means "look at everything"."""

    type: str = EVENT_TYPE
    release: str = "latest"
    subsystems: tuple[str, ...] = ()
    serial: int | None = None
    manifest: str | None = None
    id: str | None = None
    source: str = "sse"
    repo: str | None = None  # the repository a GitHub delivery came from (DEV watch maps it to subsystems)


def parse_agent_event(obj: Any, *, event_id: str | None = None, source: str = "sse") -> AgentEvent:
    """An AgentEvent from the relay's JSON payload. Raises DataError when it is not one."""
    if not isinstance(obj, dict):
        raise DataError("event payload must be a JSON object")
    etype = obj.get("type", EVENT_TYPE)
    subs = obj.get("subsystems") or []
    serial = obj.get("serial")
    if not isinstance(etype, str) or not isinstance(subs, list) or not all(isinstance(s, str) for s in subs):
        raise DataError("event payload: bad 'type' or 'subsystems'")
    if serial is not None and (isinstance(serial, bool) or not isinstance(serial, int)):
        raise DataError("event payload: 'serial' must be an integer")
    manifest = obj.get("manifest")
    return AgentEvent(type=etype, release=str(obj.get("release", "latest")), subsystems=tuple(subs),
                      serial=serial, manifest=manifest if isinstance(manifest, str) else None,
                      id=event_id, source=source)


# ----------------------------------------------------------------------------------------------- SSE


class SSEClient:
    """Subscribes to ``<relay>/events`` until :meth:`stop`; reconnects forever with backoff + jitter."""

    def __init__(self, relay_url: str, token: str | None, on_event: Callable[[AgentEvent], None], *,
                 last_event_id: str | None = None, client: Client | None = None,
                 on_event_id: Callable[[str | None], None] | None = None,
                 on_connect: Callable[[int, str | None], None] | None = None, backoff_base: float = 0.5,
                 backoff_max: float = 60.0, read_timeout: float = HEARTBEAT_READ_TIMEOUT,
                 rng: random.Random | None = None, stable_after: float | None = None):
        self.url = relay_url.rstrip("/") + "/events"
        self.token = token
        self.on_event = on_event
        self.on_event_id = on_event_id
        self.on_connect = on_connect  # (connects so far, the Last-Event-ID sent) after each connect
        self.last_event_id = last_event_id
        self.client = client or Client()
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.read_timeout = read_timeout
        self.rng = rng or random.Random()
        self.stable_after = STABLE_STREAM_SECONDS if stable_after is None else stable_after
        self._opened: float | None = None  # time.monotonic() when the last stream opened
        self._stop = threading.Event()
        self._resp: Response | None = None
        self.connects = 0
        self.connected = threading.Event()

    def stop(self) -> None:
        self._stop.set()
        resp = self._resp
        if resp is not None:
            try:
                resp.shutdown()  # unblocks a read waiting for the next heartbeat
            except Exception:  # noqa: BLE001 - closing a dead connection may fail in any way
                pass

    def backoff(self, failures: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**failures)]."""
        return self.rng.uniform(0, min(self.backoff_max, self.backoff_base * (2 ** failures)))

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """The wait before the next connect: the backoff, or when the relay asked for more
        (``Retry-After``, capped at RETRY_AFTER_MAX) that plus up to half of it again, so a fleet told
        the same does not come back in step."""
        wait = self.backoff(failures)
        if retry_after is not None and retry_after > 0:
            asked = min(retry_after, RETRY_AFTER_MAX)
            wait = max(wait, asked + self.rng.uniform(0, asked / 2))
        return wait

    def run(self) -> None:
        """Subscribe until :meth:`stop`. Never raises: every failure is logged and retried."""
        failures = 0
        while not self._stop.is_set():
            self._opened = None
            error: Exception | None = None
            try:
                self._stream()
            except Exception as e:  # noqa: BLE001 - a closed or broken stream fails in many ways
                if self._stop.is_set():
                    break  # stop() closed the response under a blocked read
                error = e
            opened = self._opened
            lasted = None if opened is None else time.monotonic() - opened
            if lasted is not None and lasted >= self.stable_after:
                failures = 0  # the stream held: its end is a new outage, reconnect promptly
            delay = self.delay(failures, getattr(error, "retry_after", None))
            failures += 1
            if error is not None:
                from sync_tools.errtext import describe

                log.warning("SSE %s: %s; reconnecting in %.1fs", self.url, describe(error), delay)
            elif failures > 1:
                log.warning("SSE %s: the stream ended %.1fs after it opened; reconnecting in %.1fs",
                            self.url, lasted or 0.0, delay)
            self.connected.clear()
            self._stop.wait(delay)

    def _stream(self) -> None:
        headers = {"Accept": "text/event-stream", "Accept-Encoding": "identity", "Cache-Control": "no-cache"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        resp = self.client.get(self.url, headers=headers, stream=True, timeout=(10.0, self.read_timeout))
        with contextlib.closing(resp):
            self._resp = resp
            try:
                if resp.status != 200:
                    self._refused(resp, headers.get("Last-Event-ID"))
                ctype = (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()
                if ctype != "text/event-stream":
                    raise StreamRefused(f"HTTP 200 but {ctype or 'no content type'}, not text/event-stream")
                self._opened = time.monotonic()
                self.connects += 1
                self.connected.set()
                if self.on_connect is not None:
                    self.on_connect(self.connects, self.last_event_id)
                self._read(resp)
            finally:
                self._resp = None

    def _refused(self, resp: Response, sent_id: str | None) -> None:
        """Raise for a non-200 answer to /events (DataError for 401/403). A 400 to a request that carried
        a resume point drops it: the relay refuses an id it did not give (one from an older relay, a
        proxy, a damaged state file), and sending it again would be refused for good."""
        status = resp.status
        if status in (401, 403):
            raise DataError(f"HTTP {status}")
        if status == 400 and sent_id is not None and self.last_event_id == sent_id:
            log.warning("SSE %s: the relay refused Last-Event-ID %r (HTTP 400); subscribing from its tail",
                        self.url, sent_id[:MAX_EVENT_ID])
            self.last_event_id = None
            if self.on_event_id is not None:  # and from the state file: the next start would send it again
                try:
                    self.on_event_id(None)
                except Exception:  # noqa: BLE001 - the state file's trouble must not end the stream's loop
                    log.exception("SSE %s: cannot drop the refused Last-Event-ID from the agent state", self.url)
        retry_after = _retry_after(resp.headers.get("Retry-After")) if status in (429, 503) else None
        raise StreamRefused(f"HTTP {status}", status=status, retry_after=retry_after)

    def _read(self, resp: Response) -> None:
        buf = b""
        fields: dict[str, list[str]] = {}
        size = 0  # bytes of the fields collected for the event being read
        event_id: str | None = None
        while not self._stop.is_set():
            chunk = resp.read1(65536)
            if not chunk:
                return
            buf += chunk
            if len(buf) > MAX_EVENT_BYTES:
                raise DataError("SSE event larger than 1 MiB")
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                line = raw.rstrip(b"\r").decode("utf-8", "replace")
                if not line:
                    if "data" in fields:
                        self._dispatch(fields, event_id)
                    fields, size = {}, 0
                    continue
                if line.startswith(":"):
                    continue  # heartbeat comment
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "id":
                    if not value or _sendable_id(value):
                        event_id = value or None
                    else:
                        log.warning("SSE: ignoring an event id that could not be sent back to resume "
                                    "from: %r", value[:MAX_EVENT_ID])
                else:
                    size += len(raw)
                    if size > MAX_EVENT_BYTES:
                        raise DataError("SSE event larger than 1 MiB")
                    fields.setdefault(name, []).append(value)

    def _dispatch(self, fields: dict[str, list[str]], event_id: str | None) -> None:
        data = "\n".join(fields.get("data", []))
        etype = (fields.get("event") or ["message"])[-1]
        try:
            obj = json.loads(data)
            event = parse_agent_event(obj, event_id=event_id, source="sse")
        except (ValueError, RecursionError, DataError) as e:  # RecursionError: JSON nested too deep
            log.warning("SSE: ignoring a malformed %s event: %s", etype, e)
            return
        if event_id:
            self.last_event_id = event_id
        self.on_event(event)
        if event_id and self.on_event_id is not None:
            self.on_event_id(event_id)


# ------------------------------------------------------------------------------------------ webhooks


class _Seen:
    """The last *size* delivery ids, to accept each delivery once."""

    def __init__(self, size: int = 4096):
        self.size = size
        self.ids: OrderedDict[str, None] = OrderedDict()
        self.lock = threading.Lock()

    def first_time(self, key: str) -> bool:
        with self.lock:
            if key in self.ids:
                return False
            self.ids[key] = None
            while len(self.ids) > self.size:
                self.ids.popitem(last=False)
            return True


@dataclass(frozen=True)
class Delivery:
    """A verified push: the event, and whether this delivery id was seen before."""

    event: AgentEvent | None  # None: verified but nothing to act on (a ping, an unrelated event)
    duplicate: bool
    reason: str = ""


def _standard_webhook(secret: str) -> Any:
    """The ``standardwebhooks`` verifier for *secret*. Raises ConfigError when it is not ``whsec_<base64>``."""
    from standardwebhooks.webhooks import Webhook

    try:
        return Webhook(secret)
    except Exception as e:  # noqa: BLE001 - binascii.Error, or the library's bare Exception for an empty key
        raise ConfigError("the push secret must be whsec_<base64> (Standard Webhooks), "
                          "the form the relay signs with") from e


class WebhookVerifier:
    """Verifies pushed deliveries with the agent's secret; raises DataError for anything unverified."""

    def __init__(self, secret: str, *, clock: Callable[[], float] = time.time, upstream: Config | None = None):
        """Raises DataError for an empty *secret*, ConfigError (USER: no *upstream*) for one that is not
        ``whsec_<base64>``: the relay's pushes are Standard Webhooks. GitHub's HMAC (DEV) takes any text,
        so there the standard verifier is made only when such a delivery comes."""
        if not secret:
            raise DataError("empty webhook secret")
        self.secret = secret
        self._webhook = _standard_webhook(secret) if upstream is None else None
        self._seen = _Seen()
        self.clock = clock
        # DEV (watch): GitHub deliveries come from the upstream repos and are classified as the relay
        # classifies them; otherwise they are the release repo's own release events (USER)
        self.upstream = upstream

    def verify(self, body: bytes, headers: dict[str, str]) -> Delivery:
        """Check the signature and return the delivery. Raises DataError (unsigned, wrong signature,
        timestamp outside +-5 minutes, malformed payload)."""
        h = {k.lower(): v for k, v in headers.items()}
        if "webhook-signature" in h:
            return self._standard(body, h)
        if "x-hub-signature-256" in h:
            return self._github(body, h)
        raise DataError("unsigned delivery (no webhook-signature or X-Hub-Signature-256)")

    def _standard(self, body: bytes, h: dict[str, str]) -> Delivery:
        from standardwebhooks.webhooks import WebhookVerificationError

        from sync_tools.relay.webhook import BadRequest

        if self._webhook is None:
            try:
                self._webhook = _standard_webhook(self.secret)
            except ConfigError as e:
                raise DataError(f"webhook verification failed: {e}") from e
        try:
            self._webhook.verify(body, h, json_parse=False)
        except WebhookVerificationError as e:
            raise DataError(f"webhook verification failed: {e}") from e
        except (ValueError, TypeError, UnicodeDecodeError) as e:  # malformed headers or body
            raise DataError(f"webhook verification failed: malformed delivery ({type(e).__name__})") from e
        # signed by the secret's holder: from here on a bad body is a 400, not an unverified delivery
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than json can follow
            raise BadRequest(f"signed delivery is not JSON: {e}") from e
        try:
            event = parse_agent_event(obj, event_id=h["webhook-id"], source="webhook")
        except DataError as e:
            raise BadRequest(f"signed delivery is not an event: {e}") from e
        return Delivery(event, duplicate=not self._seen.first_time("sw:" + h["webhook-id"]))

    def _github(self, body: bytes, h: dict[str, str]) -> Delivery:
        expected = "sha256=" + hmac.new(self.secret.encode(), body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, h["x-hub-signature-256"].strip()):
            raise DataError("X-Hub-Signature-256 does not match")
        delivery = h.get("x-github-delivery", "").strip()
        if not delivery:
            # GitHub's signature has no timestamp: the delivery id is the only way to see a replay
            raise DataError("GitHub delivery without X-GitHub-Delivery (a replay could not be told apart)")
        kind = h.get("x-github-event", "")
        if self.upstream is not None:
            return self._upstream(kind, body, h, delivery)
        try:
            obj = json.loads(body)
        except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than json can follow
            from sync_tools.relay.webhook import BadRequest

            raise BadRequest("signed GitHub delivery is not JSON") from e
        duplicate = not self._seen.first_time("gh:" + delivery)
        if kind == "ping":
            return Delivery(None, duplicate, "ping")
        if kind != "release" or not isinstance(obj, dict):
            return Delivery(None, duplicate, f"ignored event {kind!r}")
        if obj.get("action") not in ("published", "released", "edited", "created"):
            return Delivery(None, duplicate, f"ignored release action {obj.get('action')!r}")
        release = obj.get("release") if isinstance(obj.get("release"), dict) else {}
        repo = obj.get("repository") if isinstance(obj.get("repository"), dict) else {}
        return Delivery(AgentEvent(release=str(release.get("tag_name") or "latest"), id=delivery or None,
                                   source="github", repo=repo.get("html_url") or repo.get("full_name")),
                        duplicate)

    def _upstream(self, kind: str, body: bytes, h: dict[str, str], delivery: str) -> Delivery:
        """An upstream repo's event on a DEV machine: the relay's rules (release, tag create, push to
        the tracked branch; include/exclude; only versions that replace the pin). Raises BadRequest
        (a DataError; 400) for a body or fields the relay would refuse."""
        from sync_tools.relay import webhook as wh

        assert self.upstream is not None
        obj = wh.decode_body(body, h.get("content-type"))
        results = wh.classify(self.upstream, kind, obj, delivery)
        duplicate = not self._seen.first_time("gh:" + delivery)
        changes = [r for r in results if isinstance(r, wh.UpstreamChange)]
        if not changes:
            reasons = [r.reason for r in results if isinstance(r, wh.Ignored)]
            return Delivery(None, duplicate, "ping" if kind == "ping" else "; ".join(reasons) or f"ignored {kind!r}")
        return Delivery(AgentEvent(release=changes[0].version, subsystems=tuple(c.subsystem for c in changes),
                                   id=delivery, source="github", repo=changes[0].upstream), duplicate)


def create_receiver(verifier: WebhookVerifier, on_event: Callable[[AgentEvent], None],
                    health: Callable[[], dict[str, Any]], *, max_body: int = 1 << 20) -> Any:
    """The agent's push receiver (Flask): ``POST /webhook`` and ``GET /health``.

    Answers 401 for an unverified delivery, 400 for a signed one whose body or fields no event has,
    413 over *max_body*, 200 for a duplicate or an ignored event, 202 when the event was queued. The
    update itself runs after the reply.
    """
    from flask import Flask, jsonify, request

    app = Flask("sync_tools.agent")
    app.config["MAX_CONTENT_LENGTH"] = max_body

    @app.post("/webhook")
    def webhook():  # type: ignore[no-untyped-def]
        body = request.get_data(cache=False)
        try:
            delivery = verifier.verify(body, dict(request.headers))
        except DataError as e:
            log.warning("refused a delivery: %s", e)
            status = getattr(e, "status", 401)  # 400: signed, but a body or fields no event has
            return jsonify(error="unverified delivery" if status == 401 else str(e)), status
        if delivery.duplicate:
            return jsonify(status="duplicate"), 200
        if delivery.event is None:
            return jsonify(status="ignored", reason=delivery.reason), 200
        on_event(delivery.event)
        return jsonify(status="queued"), 202

    @app.get("/health")
    def health_view():  # type: ignore[no-untyped-def]
        info = health()
        return jsonify(info), 200 if info.get("ready") else 503

    @app.errorhandler(413)
    def too_large(_e):  # type: ignore[no-untyped-def]
        return jsonify(error=f"body over {max_body} bytes"), 413

    return app


RECEIVER_SOCKET_TIMEOUT = 60.0  # seconds a connection to a receiver may stay silent
RECEIVER_REQUEST_DEADLINE = 120.0  # seconds one request (headers and body) may take in all
RECEIVER_MAX_CONNECTIONS = 64  # connections served at once; more are closed at once


def make_receiver_server(app: Any, host: str, port: int) -> Any:
    """*app* under werkzeug's threaded server (a thread per connection), whose sockets time out after
    RECEIVER_SOCKET_TIMEOUT seconds of silence, and whose requests are cut after
    RECEIVER_REQUEST_DEADLINE seconds in all: a client that connects and sends nothing, or trickles
    its request, costs a thread for a while, not forever. At most RECEIVER_MAX_CONNECTIONS connections
    are served at once (a connection past them is closed unanswered), so idle sockets cannot take the
    threads the agent itself needs. ``server_port`` tells the port."""
    import socket

    from werkzeug.serving import ThreadedWSGIServer, WSGIRequestHandler

    class Handler(WSGIRequestHandler):
        timeout = RECEIVER_SOCKET_TIMEOUT

        def handle_one_request(self) -> None:
            timer = threading.Timer(RECEIVER_REQUEST_DEADLINE, self._cut)
            timer.daemon = True
            timer.start()
            try:
                super().handle_one_request()
            finally:
                timer.cancel()

        def _cut(self) -> None:
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)  # the blocked read ends; the thread goes

    class Server(ThreadedWSGIServer):
        slots = threading.BoundedSemaphore(RECEIVER_MAX_CONNECTIONS)
        full = False  # logged once per spell of refusals

        def process_request(self, request: Any, client_address: Any) -> None:
            if not self.slots.acquire(blocking=False):
                if not self.full:
                    self.full = True
                    log.warning("push receiver: %d connections open; closing new ones until one ends",
                                RECEIVER_MAX_CONNECTIONS)
                self.shutdown_request(request)
                return
            self.full = False
            try:
                super().process_request(request, client_address)
            except BaseException:
                self.slots.release()  # no thread was started to release it
                raise

        def process_request_thread(self, request: Any, client_address: Any) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.slots.release()

    return Server(host, port, app, handler=Handler)
