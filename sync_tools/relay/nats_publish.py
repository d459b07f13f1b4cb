"""The relay's NATS side (``relay.nats``): each release event published to a JetStream stream.

A release event appended to the relay's event log also becomes an outbox job of kind ``nats``
(:meth:`NatsPublisher.jobs_for`, in the same transaction), so publishing has the at-least-once
guarantee of every other job: retried with backoff while the hub is away, dead-lettered after the
retry limit. Jobs share one lane, and one waits while an earlier one is unfinished (in its backoff
after a failed publish, say), so events go out in the order they were made: the stream's last
message, what every agent's catch-up reads, is the newest event.

A publish carries the event's key (:func:`~sync_tools.agent.nats_transport.event_key`, with a nonce
made with the job) as ``Nats-Msg-Id``: a publish retried after its ack was lost is stored once (the
stream's ``duplicate_window`` is a day). The stream keeps only the newest :data:`KEEP_PER_SUBJECT` messages
per subject and answers direct gets (``allow_direct``), which is all an agent's catch-up needs.

The stream is made when it does not exist (:func:`ensure_stream`); one made by an operator is used
as it is, with a warning when it has no ``allow_direct``, and refused (a retried error) when it does
not take the release's subject, keeps no message for the agents' catch-up, or acknowledges no publish.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sync_tools.agent.nats_transport import (
    MSG_ID,
    STREAM_SUBJECTS,
    check_credentials,
    connect_options,
    describe_credentials,
    event_key,
    explain,
    is_auth_error,
    subject_for,
)
from sync_tools.config import NatsConfig
from sync_tools.errors import ConfigError, DataError, RemoteError
from sync_tools.relay.outbox import Job, NewJob, Outbox
from sync_tools.relay.worker import Deferred

log = logging.getLogger(__name__)

KIND = "nats"
LANE = "nats"
KEEP_PER_SUBJECT = 5
DUPLICATE_WINDOW = 24 * 3600.0


class StreamUnusable(Exception):
    """The stream the relay would publish into cannot serve the agents (:func:`ensure_stream`)."""


def subject_matches(pattern: str, subject: str) -> bool:
    """Whether the NATS subject *pattern* (``*`` one token, ``>`` one or more at the end) takes *subject*."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


async def ensure_stream(js: Any, name: str, subject: str | None = None, domain: str | None = None) -> None:
    """Make stream *name* for ``sync.release.>`` when there is none. Raises :class:`StreamUnusable` when
    no JetStream answers (*domain* names none), or for an existing stream that does not take *subject*,
    keeps a message only until consumers have it (retention interest or workqueue: the agents' catch-up
    finds nothing, as no agent consumes) or acknowledges no publish (``no_ack``); warns when it has no
    ``allow_direct`` (agents could not catch up from it, live messages still reach them). Raises
    nats-py's errors."""
    import nats.errors
    import nats.js.errors
    from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

    try:
        info = await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        await js.add_stream(StreamConfig(
            name=name, subjects=[STREAM_SUBJECTS], storage=StorageType.FILE, discard=DiscardPolicy.OLD,
            max_msgs_per_subject=KEEP_PER_SUBJECT, allow_direct=True, duplicate_window=DUPLICATE_WINDOW,
            description="sync-tools release events (docs/nats.md)"))
        log.info("made JetStream stream %s (%s, newest %d per subject, direct get)", name, STREAM_SUBJECTS,
                 KEEP_PER_SUBJECT)
        return
    except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError) as e:
        if getattr(e, "description", None):  # the server's own words: "JetStream not enabled for account"
            raise
        where = f"in domain {domain!r} (relay.nats.domain: the hub's jetstream {{ domain }})" if domain else \
            "without a domain (relay.nats.domain names the hub's, when it has one)"
        raise StreamUnusable(f"no JetStream answered {where} for the relay's account") from e
    config = info.config
    problems = []
    if subject is not None and not any(subject_matches(p, subject) for p in config.subjects or ()):
        problems.append(f"its subjects ({', '.join(config.subjects or ()) or 'none'}) do not take {subject}")
    retention = str(getattr(config.retention, "value", config.retention) or RetentionPolicy.LIMITS.value)
    if retention != RetentionPolicy.LIMITS.value:  # (nats-py leaves the server's string here)
        problems.append(f"retention {retention}: it keeps a message only until consumers take it, "
                        "so the agents' catch-up (no consumer) finds none")
    if config.no_ack:
        problems.append("no_ack: it acknowledges no publish, so the relay cannot know one was stored")
    if problems:
        raise StreamUnusable(f"JetStream stream {name} cannot carry release events: {'; '.join(problems)} "
                             f"(make it as docs/nats.md shows: subjects {STREAM_SUBJECTS}, retention limits)")
    if not config.allow_direct:
        log.warning("JetStream stream %s has no allow_direct: agents cannot catch up from it "
                    "(nats stream edit %s --allow-direct)", name, name)


class NatsPublisher:
    """Publishes release events for the relay. *cfg* None: ``relay.nats`` is not set, no jobs are made
    (and a job left from an earlier config is dead-lettered with that reason)."""

    def __init__(self, cfg: NatsConfig | None, *, root: Path, environ: Mapping[str, str] | None = None,
                 timeout: float = 10.0, outbox: Outbox | None = None):
        self.cfg = cfg
        self.outbox = outbox  # the jobs' own: a publish waits for the earlier ones of its lane
        self.root = root
        self._env = dict(os.environ if environ is None else environ)
        self.timeout = timeout
        self._stream_ready: set[str] = set()  # the subjects the stream was found to take

    @property
    def enabled(self) -> bool:
        return self.cfg is not None

    def jobs_for(self, event_id: int, event: dict[str, Any]) -> list[NewJob]:
        """The publish job for one release event (none when NATS is not configured)."""
        if self.cfg is None:
            return []
        return [NewJob(kind=KIND, payload={"event_id": event_id, "event": event, "nonce": secrets.token_hex(8)},
                       lane=LANE)]

    def handle(self, job: Job) -> list[NewJob]:
        """The outbox handler. Raises ConfigError or DataError (dead-letter: no config, a bad job) and
        RemoteError (retried: the servers are away, the credentials were refused, no ack in time)."""
        if self.cfg is None:
            raise ConfigError("relay.nats is no longer configured; not publishing")
        event, event_id = job.payload.get("event"), job.payload.get("event_id")
        if not isinstance(event, dict) or not isinstance(event_id, int):
            raise DataError(f"job {job.id}: not a release event")
        # after every earlier event: the stream's last message is what agents catch up from, so one
        # published before an older event (in its backoff after a failed publish) would leave them that
        earlier = self.outbox.earlier_in_lane(job) if self.outbox is not None else None
        if earlier is not None:
            soon = self.outbox.now() + (1.0 if earlier.status == "running" else 0.05)  # type: ignore[union-attr]
            raise Deferred(f"the release event of job {earlier.id} was made first and goes out first",
                           until=max(earlier.next_attempt + 0.001, soon), quiet=True)
        tag = str(event.get("release") or "")
        subject = subject_for(tag)
        nonce = job.payload.get("nonce")
        key = event_key(tag, event.get("serial"), event_id, nonce if isinstance(nonce, str) else None)
        body = json.dumps(event, sort_keys=True).encode()
        self.publish(subject, body, key)
        return []

    def publish(self, subject: str, body: bytes, key: str) -> None:
        """Publish *body* to *subject* with ``Nats-Msg-Id`` *key* and wait for the stream's ack.
        Raises RemoteError (with one clear line for refused credentials) and ConfigError."""
        assert self.cfg is not None
        servers = ", ".join(self.cfg.servers)
        try:
            opts = connect_options(self.cfg, root=self.root, environ=self._env)
            check_credentials(opts)
        except ConfigError as e:
            # a credentials file missing or half-renewed (a certificate rotated without its key yet) can
            # be mended while the job waits: retried with the job's backoff, dead-lettered if it is not
            raise RemoteError(f"cannot publish release event {key} to NATS {servers}: {e}") from e
        try:
            seq, duplicate = asyncio.run(asyncio.wait_for(self._publish(opts, subject, body, key), self.timeout * 3))
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - nats-py and asyncio fail in many ways; all are retried
            self._stream_ready.clear()  # a hub made anew may have lost the stream: look again next time
            why = str(e) if isinstance(e, StreamUnusable) else explain(e)
            if is_auth_error(e):
                why += f"; offered {describe_credentials(opts, self.cfg)}"
            raise RemoteError(f"cannot publish release event {key} to NATS {servers}: {why}") from e
        log.info("published release event %s to %s (stream %s seq %d%s)", key, subject, self.cfg.stream, seq,
                 ", a duplicate: already stored" if duplicate else "")

    async def _publish(self, opts: dict[str, Any], subject: str, body: bytes, key: str) -> tuple[int, bool]:
        import nats

        assert self.cfg is not None

        async def quiet(e: Exception) -> None:  # the failure is raised to publish() too
            log.debug("NATS client: %s", explain(e))

        nc = await nats.connect(**opts, name="sync-tools-relay", allow_reconnect=False, max_reconnect_attempts=1,
                                reconnect_time_wait=0.1, connect_timeout=self.timeout, error_cb=quiet)
        try:
            js = nc.jetstream(domain=self.cfg.domain, timeout=self.timeout)
            if subject not in self._stream_ready:
                await ensure_stream(js, self.cfg.stream, subject, self.cfg.domain)
                self._stream_ready.add(subject)
            ack = await js.publish(subject, body, headers={MSG_ID: key}, stream=self.cfg.stream)
            return ack.seq, bool(ack.duplicate)
        finally:
            await nc.close()
