"""Release fan-out: agent events built from the verified manifest, streamed and pushed.

- :func:`release_event` turns the store's signed ``manifest.json`` into an :class:`AgentEvent`
  naming the subsystems whose entries differ from the last manifest fanned out. It never follows a
  URL taken from a webhook payload: the store comes from the config, the key is the pinned one.
- :class:`Broker` hands new events from the SQLite event log to every connected SSE subscriber.
  One thread reads the log (woken at once in-process, and every ``poll`` seconds so events written
  by another process are seen too); each subscriber has a bounded queue, and a client too slow to
  drain it is cut off (it reconnects with ``Last-Event-ID`` and loses nothing).
- :class:`AgentPusher` POSTs an event to a registered agent URL, signed with Standard Webhooks
  headers; it runs as an outbox job, so pushes get the same retries and dead-lettering.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from standardwebhooks import Webhook

from sync_tools.config import AgentTarget
from sync_tools.errors import ConfigError, SignatureError
from sync_tools.manifest import MANIFEST_NAME, Manifest, parse_manifest, verify_manifest
from sync_tools.relay.dispatch import check_response, post, watch_session
from sync_tools.relay.outbox import Event, NewJob, Outbox
from sync_tools.stores.base import Store

log = logging.getLogger(__name__)

EVENT_TYPE = "release.updated"
HEARTBEAT_SPREAD = 0.8  # a stream's quiet gap before a heartbeat: 80-100 % of the relay's heartbeat


@dataclass(frozen=True)
class AgentEvent:
    """What agents are told: ``{"type", "release", "subsystems", "serial", "manifest"}``."""

    release: str
    subsystems: tuple[str, ...]
    serial: int
    manifest: str
    type: str = EVENT_TYPE

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "release": self.release, "subsystems": list(self.subsystems),
                "serial": self.serial, "manifest": self.manifest}


def changed_subsystems(previous: Manifest | None, current: Manifest) -> tuple[str, ...]:
    """Names whose entry was added, changed or removed between *previous* and *current*, sorted."""
    before = {} if previous is None else {n: e.to_json() for n, e in previous.subsystems.items()}
    after = {n: e.to_json() for n, e in current.subsystems.items()}
    return tuple(sorted(n for n in before.keys() | after.keys() if before.get(n) != after.get(n)))


def state_key(tag: str) -> str:
    return f"fanout:{tag}:manifest"


def release_event(store: Store, public_key: Ed25519PublicKey, tag: str, previous: bytes | None,
                  *, now: datetime | None = None) -> tuple[AgentEvent | None, bytes | None]:
    """The agent event for the store's current manifest, and the manifest bytes to remember.

    Returns ``(None, None)`` when there is no manifest yet or its serial is the one already fanned
    out, and ``(None, bytes)`` when the serial moved but no entry changed. Raises SignatureError or
    ManifestError (a bad, expired or rolled-back manifest is never announced) and whatever the store
    raises when it cannot be read (RemoteError: retried).
    """
    snap = store.read_manifest()
    if snap.data is None:
        log.info("no manifest in the store yet; nothing to fan out")
        return None, None
    if snap.signature is None:
        raise SignatureError("the store has manifest.json but no manifest.json.sig")
    prev = parse_manifest(previous) if previous is not None else None
    manifest = verify_manifest(snap.data, snap.signature, public_key, min_serial=prev.serial if prev else 0,
                               now=now or datetime.now(UTC))
    if prev is not None and manifest.serial == prev.serial:
        return None, None
    changed = changed_subsystems(prev, manifest)
    if not changed:
        return None, snap.data
    event = AgentEvent(release=tag, subsystems=changed, serial=manifest.serial,
                       manifest=store.asset_url(MANIFEST_NAME))
    return event, snap.data


def format_sse(event: Event) -> bytes:
    """One SSE message: ``id:`` then the JSON on one ``data:`` line."""
    return f"id: {event.id}\ndata: {json.dumps(event.data, sort_keys=True)}\n\n".encode()


class Subscriber:
    """One SSE connection's queue. ``None`` in the queue means: you were cut off, close."""

    def __init__(self, maxsize: int):
        self.queue: queue.Queue[tuple[int, bytes] | None] = queue.Queue(maxsize=maxsize)
        self.dropped = False

    def offer(self, item: tuple[int, bytes]) -> bool:
        try:
            self.queue.put_nowait(item)
            return True
        except queue.Full:
            self.dropped = True
            return False


class Broker:
    """Delivers events appended to the outbox's log to the connected subscribers, in id order."""

    def __init__(self, outbox: Outbox, *, queue_size: int = 1000, poll: float = 1.0):
        self.outbox = outbox
        self.queue_size = queue_size
        self.poll = poll
        self._subs: set[Subscriber] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_id = 0

    @property
    def connected(self) -> int:
        return len(self._subs)

    def start(self) -> None:
        if self._thread is not None:
            return
        self.last_id = self.outbox.last_event_id()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="relay-broker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        with self._lock:
            subs = list(self._subs)
        for s in subs:
            self._cut(s)

    def notify(self) -> None:
        """An event was appended: deliver it now."""
        self._wake.set()

    def subscribe(self) -> Subscriber:
        sub = Subscriber(self.queue_size)
        with self._lock:
            self._subs.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._lock:
            self._subs.discard(sub)

    def _cut(self, sub: Subscriber) -> None:
        self.unsubscribe(sub)
        try:
            sub.queue.put_nowait(None)
        except queue.Full:
            # the reader sees ``dropped`` at its next get; make room for the close marker
            try:
                sub.queue.get_nowait()
                sub.queue.put_nowait(None)
            except (queue.Empty, queue.Full):
                pass

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll)
            self._wake.clear()
            try:
                events = self.outbox.events_since(self.last_id)
            except Exception:  # noqa: BLE001 - keep serving through a database hiccup
                log.exception("cannot read the event log")
                continue
            for ev in events:
                self.publish(ev)

    def publish(self, event: Event) -> None:
        """Offer *event* to every subscriber (non-blocking); slow ones are cut off. The SSE bytes are
        made once, not once per subscriber."""
        item = (event.id, format_sse(event))
        with self._lock:
            subs = list(self._subs)
        for s in subs:
            if not s.offer(item):
                log.warning("an SSE subscriber fell %d events behind; closing it (it resumes with "
                            "Last-Event-ID)", self.queue_size)
                self._cut(s)
        self.last_id = max(self.last_id, event.id)

    def _logged(self, after: int, before: int | None = None, batch: int = 500) -> Iterator[Event]:
        """The logged events after *after* (and before *before*), read *batch* at a time until the log
        has no more. A batch may come back short of *batch* with more behind it: a row that does not
        decode is skipped (:meth:`Outbox.events_since`), so only an empty one ends the reading."""
        while before is None or after < before - 1:
            rows = self.outbox.events_since(after, limit=batch)
            if not rows:
                if self.outbox.last_event_id() <= after + batch:
                    return
                # a whole batch of damaged rows (ids above *after*, each at least one apart): past it
                after += batch
                continue
            for ev in rows:
                if before is not None and ev.id >= before:
                    return
                yield ev
                after = ev.id

    def stream(self, sub: Subscriber | None, last_event_id: int, heartbeat: float,
               on_close: Callable[[], None] | None = None) -> Iterator[bytes]:
        """The SSE byte stream for one subscriber: what was missed since *last_event_id* (from the
        log), then live events, with a comment line when a quiet spell reaches a time drawn between
        ``HEARTBEAT_SPREAD`` x *heartbeat* and *heartbeat* (so never more than *heartbeat* apart). The
        draw keeps the streams' heartbeats apart: a release reaches every stream at once, and equal
        gaps would have every one of them write its next heartbeat in the same instant.
        *sub* None: the stream subscribes when it starts, before it reads the log (so nothing falls
        between log and live, and a stream never started holds no subscription); a given *sub* must
        be registered already."""
        try:
            if sub is None:
                sub = self.subscribe()
            yield b"retry: 3000\n: connected\n\n"
            sent = last_event_id
            for ev in self._logged(sent):
                yield format_sse(ev)
                sent = ev.id
            while True:
                try:
                    item = sub.queue.get(timeout=heartbeat * random.uniform(HEARTBEAT_SPREAD, 1.0))
                except queue.Empty:
                    yield b": heartbeat\n\n"
                    continue
                if item is None:
                    return
                event_id, data = item
                if event_id <= sent:
                    continue
                if event_id > sent + 1:
                    # events were appended faster than the live queue saw them: read the gap from the log
                    for missed in self._logged(sent, before=event_id):
                        yield format_sse(missed)
                yield data
                sent = event_id
        finally:
            self.unsubscribe(sub)
            if on_close is not None:
                on_close()


class AgentPusher:
    """POST an agent event to a registered agent, signed with Standard Webhooks headers
    (``webhook-id``, ``webhook-timestamp``, ``webhook-signature: v1,<base64 HMAC>``).

    The secret is read from the environment variable the config names, in the Standard Webhooks
    form (``whsec_`` + base64, or bare base64). Raises ConfigError when it is not set (dead-letter),
    RemoteError for 5xx/429/timeouts, DispatchRefused for other 4xx.
    """

    def __init__(self, targets: tuple[AgentTarget, ...], *, environ: Mapping[str, str] | None = None,
                 session: requests.Session | None = None, timeout: tuple[float, float] = (5.0, 30.0),
                 now: Callable[[], float] = time.time):
        self.targets = {t.url: t for t in targets}
        self._env = os.environ if environ is None else environ
        self._session = session or watch_session(requests.Session())
        self._timeout = timeout
        self._now = now

    def missing_secrets(self) -> list[str]:
        return [t.secret_env for t in self.targets.values() if not self._env.get(t.secret_env)]

    def jobs_for(self, event_id: int, event: dict[str, Any]) -> list[NewJob]:
        return [NewJob(kind="push", payload={"url": url, "event_id": event_id, "event": event})
                for url in self.targets]

    def push(self, url: str, event_id: int, event: dict[str, Any]) -> None:
        target = self.targets.get(url)
        if target is None:
            raise ConfigError(f"agent {url} is no longer in relay.agents; not pushing")
        secret = self._env.get(target.secret_env)
        if not secret:
            raise ConfigError(f"{target.secret_env} (the secret for agent {url}) is not set")
        try:
            wh = Webhook(secret)
        except Exception as e:  # noqa: BLE001 - the library raises bare Exceptions for bad secrets
            raise ConfigError(f"{target.secret_env} is not a Standard Webhooks secret (whsec_<base64>)") from e
        msg_id = f"evt_{event_id}"
        ts = datetime.fromtimestamp(int(self._now()), UTC)
        body = json.dumps(event, sort_keys=True)
        headers = {"Content-Type": "application/json", "User-Agent": "sync-tools-relay",
                   "webhook-id": msg_id, "webhook-timestamp": str(int(ts.timestamp())),
                   "webhook-signature": wh.sign(msg_id, ts, body)}
        what = f"push to agent {url}"
        # never redirected: the signed event goes to the URL the config names, nowhere else
        resp, answer = post(self._session, url, data=body.encode(), headers=headers, timeout=self._timeout,
                            what=what, allow_redirects=False)
        check_response(resp, what, self._now(), answer)
