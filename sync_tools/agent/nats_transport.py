"""Release events over NATS (``agent.transport: nats``): the agent's side of docs/nats.md.

The relay publishes each release event to a JetStream stream on subject ``sync.release.<tag>``. An
agent, typically connected to its own machine's nats-server (a leaf node of the hub), holds:

- a core subscription on that subject for live events (no JetStream consumer: one durable consumer
  per agent does not scale, nats-server#5609), and
- a catch-up: on every (re)connect, and every ``catchup_seconds`` besides, one JetStream *direct get*
  of the subject's last message (``allow_direct`` on the stream), so an agent that was offline for
  days, or whose leaf node was cut off from the hub while a release went out, hears of the newest
  release at once.

Every message goes through :func:`~sync_tools.agent.events.parse_agent_event`, as an SSE message
does; one that is not an event is logged and ignored. Events carry no trust either way: they only
make the agent fetch and verify the signed manifest.

The connection policy is the agent's own, not the client library's: a lost connection closes the
client, and :class:`NatsSubscriber` connects anew after a full-jitter exponential backoff (so the
agents of a restarted leaf node do not come back all at once), subscribes, and catches up. Refused
credentials (a token, a JWT, or a TLS client certificate the server requires or does not accept) are
one clear ERROR line, then retried with the same backoff; each kind of connect error is logged once
until a connection is up again, also when two kinds alternate.

:func:`connect_options` turns a :class:`~sync_tools.config.NatsConfig` into nats-py connect options; the
relay's publisher (``sync_tools.relay.nats_publish``) uses it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import random
import re
import ssl
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sync_tools.errors import ConfigError, DataError

from .events import MAX_EVENT_BYTES, AgentEvent, parse_agent_event

if TYPE_CHECKING:
    from sync_tools.config import NatsConfig

log = logging.getLogger(__name__)

SUBJECT_PREFIX = "sync.release."
STREAM_SUBJECTS = SUBJECT_PREFIX + ">"
CREDS_ENV = "SYNC_TOOLS_NATS_CREDS"
MSG_ID = "Nats-Msg-Id"
LOOP_ENV = "SYNC_TOOLS_NATS_LOOP"
NATS_CONNECT_WAIT = 5.0
# Reconnect backoff cap. Low, because an agent's server is its own machine's (or its site's) leaf node,
# where a connect attempt costs next to nothing, and an agent must not sit out a minute after its leaf
# is back; the full jitter still spreads a site's agents over these seconds (bench/nats: catch-up).
BACKOFF_MAX = 5.0  # serve: seconds to wait for the first connect before the start-up reconcile
_TAG_RE = re.compile(r"[A-Za-z0-9_.+-]{1,128}")


def loop_factory(name: str | None = None) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop the subscription runs in: uvloop's when it is installed (a dependency on Linux
    and macOS), else asyncio's own (None). It spends less CPU per message on the loop and the
    socket (docs/benchmarks.md section 5). *name* (default ``$SYNC_TOOLS_NATS_LOOP``) picks one:
    ``uvloop``, ``asyncio`` or ``auto``; ConfigError for another name or a uvloop that is not there."""
    name = (name if name is not None else os.environ.get(LOOP_ENV, "")).strip().lower() or "auto"
    if name not in ("auto", "uvloop", "asyncio"):
        raise ConfigError(f"${LOOP_ENV} is {name!r}: 'uvloop', 'asyncio' or 'auto'")
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError as e:
        if name == "uvloop":
            raise ConfigError(f"${LOOP_ENV} is 'uvloop' but uvloop is not installed "
                              "(pip install uvloop)") from e
        return None
    return uvloop.new_event_loop


def subject_for(tag: str) -> str:
    """The subject a release tag's events go to. Raises ConfigError for a tag no subject can carry
    (wildcards, spaces, empty tokens)."""
    if not _TAG_RE.fullmatch(tag) or ".." in tag or tag.startswith(".") or tag.endswith("."):
        raise ConfigError(f"release tag {tag!r} cannot be a NATS subject token (letters, digits, _ . + -)")
    return SUBJECT_PREFIX + tag


def event_key(tag: str, serial: Any, event_id: int, nonce: str | None = None) -> str:
    """The event's ``Nats-Msg-Id``: the same for every retry of one publish (JetStream keeps one), and
    never the same for two events, even from a relay whose database was made anew (its ids restart).
    The *nonce* (random, made with the publish job) keeps anyone else from guessing the next event's
    key: a message stored first under it would make the real publish a duplicate, never stored."""
    return f"{tag}:{serial}:{event_id}" + (f":{nonce}" if nonce else "")


def connect_options(cfg: NatsConfig, *, root: Path, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """nats-py ``connect`` keywords for *cfg*: servers, and the credentials from files or the environment.

    ``creds`` (or ``$SYNC_TOOLS_NATS_CREDS``) names a .creds file (user JWT + NKey seed), ``nkey_seed``
    a file with an NKey seed, ``$<token_env>`` holds a token. ``tls_ca`` (or a ``tls://`` server, or a
    client certificate) gives the connection TLS settings, and ``tls_cert`` with ``tls_key`` a client
    certificate for servers that verify clients (mutual TLS). nats-py switches to TLS when the server
    says it requires TLS, so the server's config is what makes TLS mandatory (docs/nats.md). Relative
    paths are read from *root* (the config's folder). Raises ConfigError for a named file that cannot
    be read, a certificate without its key, or a certificate and key that do not load (an encrypted
    key among them: there is no passphrase to give it).
    """
    env = os.environ if environ is None else environ
    opts: dict[str, Any] = {"servers": list(cfg.servers)}

    def readable(value: str, what: str) -> str:
        path = (root / os.path.expanduser(value)).resolve()
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise ConfigError(f"the NATS {what} {path} cannot be read: {e.strerror or e}") from e
        return str(path)

    creds = cfg.creds or env.get(CREDS_ENV)
    if creds:
        opts["user_credentials"] = readable(creds, "credentials file")
    elif cfg.nkey_seed:
        opts["nkeys_seed"] = readable(cfg.nkey_seed, "NKey seed file")
    token = env.get(cfg.token_env, "").strip()
    if token:
        opts["token"] = token
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ConfigError("tls_cert and tls_key go together: a client certificate and its private key")
    if cfg.tls_ca or cfg.tls_cert or any(s.startswith("tls://") for s in cfg.servers):
        ca = readable(cfg.tls_ca, "TLS CA file") if cfg.tls_ca else None
        try:
            ctx = ssl.create_default_context(cafile=ca)
        except ssl.SSLError as e:
            raise ConfigError(f"the NATS TLS CA file {ca} is not a PEM certificate: {e.reason or e}") from e
        if cfg.tls_cert and cfg.tls_key:  # (one without the other was refused above)
            cert, key = readable(cfg.tls_cert, "TLS client certificate"), readable(cfg.tls_key, "TLS client key")
            try:
                # an empty passphrase: an encrypted key fails here instead of prompting on a terminal
                ctx.load_cert_chain(cert, key, password=b"")
            except (ssl.SSLError, OSError, ValueError) as e:
                why = getattr(e, "reason", None) or e
                raise ConfigError(f"the NATS TLS client certificate {cert} and key {key} do not load together "
                                  f"(PEM, the key unencrypted): {why}") from e
        opts["tls"] = ctx
    return opts


_SEED_KINDS = {"U": "a user", "A": "an account", "O": "an operator", "N": "a server", "C": "a cluster"}


def check_credentials(opts: Mapping[str, Any]) -> None:
    """Read the credentials files named in *opts* (:func:`connect_options`) the way nats-py will at
    connect, and raise ConfigError, naming the file and never its secret, for one it cannot use.

    nats-py reads them only when the server asks for a signature, and fails there badly: a .creds file
    without its JWT block makes it loop for ever (``while True: readline()``, at full CPU, inside the
    connect: no timeout ends it), one without its seed is a TypeError, a file with no seed in it an
    ErrInvalidSeed at every attempt. An account's (or operator's) seed where a user's belongs is only
    "refused" by the server; it is named here."""
    creds = opts.get("user_credentials")
    if isinstance(creds, str):
        what = f"the NATS credentials file {creds}"
        lines = io.BytesIO(_read_secret(creds, what)).readlines()  # split at \n alone, as nats-py reads it

        def after(marker: bytes) -> bytes | None:  # the line after the marker's, as nats-py takes it
            for i, line in enumerate(lines):
                if marker in line:
                    return lines[i + 1][:-1] if i + 1 < len(lines) else b""
            return None

        jwt = after(b"BEGIN NATS USER JWT")
        if not jwt or not jwt.strip() or not jwt.isascii():
            raise ConfigError(f"{what} has no user JWT (a .creds file, as nsc makes it: the user's JWT block, then "
                              "its NKey seed block; a bare NKey seed goes in nkey_seed)")
        seed = after(b"BEGIN USER NKEY SEED")
        if seed is None:
            raise ConfigError(f"{what} has no user NKey seed (the block after the JWT's)")
        _check_seed(seed, f"{what}: the line after BEGIN USER NKEY SEED")
    seed_file = opts.get("nkeys_seed")
    if isinstance(seed_file, str):
        what = f"the NATS NKey seed file {seed_file}"
        _check_seed(_read_secret(seed_file, what).strip(), what)


def _read_secret(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except OSError as e:
        raise ConfigError(f"{what} cannot be read: {e.strerror or e}") from e


def _check_seed(seed: bytes, what: str) -> None:
    import nkeys

    try:
        nkeys.from_seed(bytearray(seed)).wipe()
    except Exception:  # noqa: BLE001 - nkeys fails in several ways; none names the seed
        raise ConfigError(f"{what} is not an NKey seed (one line, S followed by letters and digits)") from None
    kind = chr(seed[1])
    if kind != "U":
        raise ConfigError(f"{what} holds {_SEED_KINDS.get(kind, 'another kind of')} seed (S{kind}...), not a user "
                          "seed (SU...): the server takes users' keys")


def describe_credentials(opts: Mapping[str, Any], cfg: NatsConfig) -> str:
    """Which credentials were offered, for an error line (never the secret itself)."""
    cert = f"the TLS client certificate {cfg.tls_cert}" if cfg.tls_cert else None
    if "user_credentials" in opts:
        offered = f"the credentials file {opts['user_credentials']}"
    elif "nkeys_seed" in opts:
        offered = f"the NKey seed file {opts['nkeys_seed']}"
    elif "token" in opts:
        offered = f"the token in ${cfg.token_env}"
    else:
        return cert or f"no credentials (set creds, nkey_seed, tls_cert, ${CREDS_ENV} or ${cfg.token_env})"
    return f"{offered} and {cert}" if cert else offered


def explain(e: BaseException) -> str:
    """One line for a NATS failure; refused credentials are named as such."""
    import nats.errors

    if isinstance(e, nats.errors.AuthorizationError) or "authorization violation" in str(e).lower():
        return "the server refused the credentials (Authorization Violation)"
    if isinstance(e, ssl.SSLError):  # the TLS handshake: which side refused what, in words
        text = str(e).upper()
        if "CERTIFICATE_REQUIRED" in text:
            return "the server refused the credentials (it requires a TLS client certificate: tls_cert, tls_key)"
        if any(k in text for k in ("ALERT_UNKNOWN_CA", "ALERT_BAD_CERTIFICATE", "ALERT_CERTIFICATE_UNKNOWN",
                                   "ALERT_CERTIFICATE_EXPIRED", "ALERT_CERTIFICATE_REVOKED", "ALERT_DECRYPT_ERROR",
                                   "ALERT_UNSUPPORTED_CERTIFICATE", "ALERT_ACCESS_DENIED")):
            return "the server refused the credentials (it did not accept the TLS client certificate)"
        if isinstance(e, ssl.SSLCertVerificationError):
            return (f"the server's TLS certificate was not accepted here ({e.verify_message}; tls_ca names a "
                    "private CA to trust)")
    if "authentication expired" in str(e).lower():
        return "the server refused the credentials (authentication expired)"
    text = str(e).strip() or type(e).__name__
    return f"{type(e).__name__}: {text}" if text != type(e).__name__ else text


def is_auth_error(e: BaseException) -> bool:
    return explain(e).startswith("the server refused the credentials")


class NatsSubscriber:
    """One agent's subscription to ``sync.release.<tag>`` until :meth:`stop`.

    *on_event* gets each valid event (from a live message or a catch-up), once per ``Nats-Msg-Id`` in
    a row. Run it in a thread with :meth:`run`, or many in one event loop with :meth:`run_async`
    (bench/nats). ``connected`` is set while a connection is up; ``connects`` counts them.

    *options* are nats-py's connect keywords, or a function that makes them (:func:`connect_options`),
    called before every connect attempt: a certificate or credentials file renewed on disk is used
    at the next reconnect, without a restart; one that does not load then is a failed attempt.
    """

    def __init__(self, cfg: NatsConfig, tag: str, on_event: Callable[[AgentEvent], None], *,
                 options: Mapping[str, Any] | Callable[[], Mapping[str, Any]], name: str | None = None, backoff_base: float = 1.0,
                 backoff_max: float = BACKOFF_MAX, connect_timeout: float = 5.0, request_timeout: float = 5.0,
                 ping_interval: float = 60.0, rng: random.Random | None = None,
                 on_connect: Callable[[int], None] | None = None, loop: str | None = None):
        self.cfg = cfg
        self.loop_factory = loop_factory(loop)  # ConfigError here, not in run()'s thread
        self.subject = subject_for(tag)
        self.on_event = on_event
        self.on_connect = on_connect
        self._make_options = options if callable(options) else None
        self.options = dict(options()) if callable(options) else dict(options)  # the last ones made
        check_credentials(self.options)  # a file that cannot work stops serve_nats at start
        self.name = name
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.ping_interval = ping_interval
        self.rng = rng or random.Random()
        self.connected = threading.Event()
        self.connects = 0
        self.failures = 0  # connect attempts that failed, in all
        self.last_key: str | None = None  # the Nats-Msg-Id last handed to on_event
        self.ignored = 0  # messages that were not events
        self._stopped = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._last_error: str | None = None
        self._errors_seen: set[str] = set()  # the connect errors logged since the last connection
        self._catchup_failures: set[str] = set()  # why the catch-up had no answer, logged since the last one

    # ---------------------------------------------------------------------------------- control

    def stop(self) -> None:
        """Stop from any thread; :meth:`run` returns soon after."""
        self._stopped.set()
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop already ended
                loop.call_soon_threadsafe(wake.set)

    def backoff(self, failures: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**failures)]."""
        return self.rng.uniform(0, min(self.backoff_max, self.backoff_base * (2 ** min(failures, 30))))

    def run(self) -> None:
        """Subscribe until :meth:`stop` in this thread's own event loop (uvloop's when installed, see
        :func:`loop_factory`, chosen at construction). Never raises."""
        with asyncio.Runner(loop_factory=self.loop_factory) as runner:
            runner.run(self.run_async())

    async def run_async(self) -> None:
        """Subscribe until :meth:`stop`: connect, subscribe, catch up; on any loss, back off and again."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        failures = 0
        while not self._stopped.is_set():
            closed = asyncio.Event()
            try:
                nc = await self._connect(closed)
            except Exception as e:  # noqa: BLE001 - every connect failure is retried
                self.failures += 1
                delay = self.backoff(failures)
                failures += 1
                self._report(e, delay)
                await self._sleep(delay)
                continue
            before = self.connects
            broken: Exception | None = None
            try:
                await self._session(nc, closed)
            except Exception as e:  # noqa: BLE001 - a broken session is reconnected
                broken = e
            finally:
                self.connected.clear()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.close(), self.connect_timeout)
            if self._stopped.is_set():
                break
            # a session that was up: come back soon (jittered, not all at once); one that failed before
            # it subscribed counts as a failed attempt, so a server that keeps refusing is not hammered
            up = self.connects > before
            failures = 0 if up else failures + 1
            delay = self.backoff(failures)
            if broken is not None and up:
                log.warning("NATS %s: %s; reconnecting", self.subject, explain(broken))
            elif broken is not None:  # connected, then lost before subscribing: a failed attempt like any
                self.failures += 1
                self._report(broken, delay)
            await self._sleep(delay)

    async def _sleep(self, seconds: float) -> None:
        assert self._wake is not None
        self._wake.clear()
        if self._stopped.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    def _report(self, e: BaseException, delay: float) -> None:
        why = explain(e)
        if is_auth_error(e):
            why += f"; offered {describe_credentials(self.options, self.cfg)}"
        if why not in self._errors_seen:  # each kind once per outage, also when two kinds alternate
            if len(self._errors_seen) >= 64:
                self._errors_seen.clear()
            self._errors_seen.add(why)
            level = logging.ERROR if is_auth_error(e) else logging.WARNING
            log.log(level, "NATS %s: cannot connect: %s; retrying with backoff (next in %.1f s)",
                    ", ".join(self.cfg.servers), why, delay)
            self._last_error = why
        else:
            log.debug("NATS %s: still cannot connect: %s; next try in %.1f s", ", ".join(self.cfg.servers), why,
                      delay)

    async def _connect(self, closed: asyncio.Event) -> Any:
        import nats

        async def quiet(e: Exception) -> None:  # the failure reaches run_async as an exception too
            log.debug("NATS client: %s", explain(e))

        async def on_closed() -> None:  # the connection was lost (or closed by stop)
            closed.set()
            if self._wake is not None:
                self._wake.set()

        # the client's own reconnect is off: this class reconnects, with jitter, and catches up each time
        if self._make_options is not None:
            self.options = dict(self._make_options())  # files renewed since: read again
        check_credentials(self.options)  # a renewal half done: a failed attempt, retried
        return await nats.connect(**self.options, name=self.name, allow_reconnect=False, max_reconnect_attempts=1,
                                  reconnect_time_wait=0.1, connect_timeout=self.connect_timeout,
                                  ping_interval=int(self.ping_interval), max_outstanding_pings=2, error_cb=quiet,
                                  closed_cb=on_closed)

    async def _session(self, nc: Any, closed: asyncio.Event) -> None:
        assert self._wake is not None
        async def on_msg(msg: Any) -> None:
            self._handle(msg.data, msg.headers, "live")

        await nc.subscribe(self.subject, cb=on_msg)
        inbox = nc.new_inbox()
        answers = await nc.subscribe(inbox + ".*")  # the catch-up's answers (catch_up)
        await nc.flush(timeout=self.request_timeout)  # the subscription is in place before the catch-up
        self.connects += 1
        self.connected.set()
        if self._last_error is not None:
            log.info("NATS %s: connected again (%s)", self.subject, nc.connected_url.netloc if nc.connected_url
                     else "?")
            self._last_error = None
        self._errors_seen.clear()
        if self.on_connect is not None:
            self.on_connect(self.connects)
        unanswered = 0
        asked = 0
        while True:
            self._wake.clear()  # set by stop() and by the connection's loss, whichever comes
            asked += 1
            if await self.catch_up(nc, answers, f"{inbox}.{asked}"):
                unanswered = 0
                every = self.cfg.catchup_seconds
                wait = every * self.rng.uniform(0.5, 1.5) if every > 0 else None
            else:
                # no answer (the leaf's own link to the hub not up yet after a restart, the hub away):
                # ask again soon rather than at the next period, or never when catch-up is only at connect
                wait = self.backoff(unanswered) + self.backoff_base / 2
                unanswered += 1
            if self._stopped.is_set() or closed.is_set() or nc.is_closed:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)
            if self._stopped.is_set() or closed.is_set() or nc.is_closed:
                return

    @property
    def direct_get_subject(self) -> str:
        """Where the stream answers a direct get of the subject's last message (``allow_direct``)."""
        api = f"$JS.{self.cfg.domain}.API" if self.cfg.domain else "$JS.API"
        return f"{api}.DIRECT.GET.{self.cfg.stream}.{self.subject}"

    async def catch_up(self, nc: Any, answers: Any, reply: str) -> bool:
        """One direct get of the subject's last message, its answer awaited on *answers* (a subscription
        on the session's inbox) as *reply*; hands the message on when it is new. Returns whether the
        stream answered (a missing message, no release yet, is an answer).

        The answer is read here rather than by nats-py's ``get_last_msg``, which raised from a stored
        message with no body and a ``Status`` header of its own (anyone who may publish on the subject
        can store one: its KeyError broke the session, so every agent reconnected about once a second
        for as long as it was the last message) and from an answer without JetStream's headers (from
        anything else in the account that answers on the direct-get subject), and handed on a message
        of another subject as this one's. Here a stored message of the subject is a message, whatever
        headers it carries (:meth:`_handle` judges it); anything else is no answer, asked again."""
        import nats.errors

        try:
            await nc.publish(self.direct_get_subject, b"", reply=reply)
            deadline = asyncio.get_running_loop().time() + self.request_timeout
            while True:  # an answer to an earlier, timed-out request may come first: not this one's
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    raise nats.errors.TimeoutError
                msg = await answers.next_msg(timeout=left)
                if msg.subject == reply:
                    break
        except (nats.errors.TimeoutError, TimeoutError) as e:
            return self._unanswered(explain(e))
        headers = msg.headers or {}
        stream, subject, seq = headers.get("Nats-Stream"), headers.get("Nats-Subject"), headers.get("Nats-Sequence")
        status = str(headers.get("Status") or "")
        if stream is None and seq is None:  # not a stored message: a status from the server, or no JetStream's
            if status == "404":  # no message on the subject: no release yet
                self._catchup_failures.clear()
                return True
            if status == "503":  # no responders: the hub, or its link to this leaf, is away; or no allow_direct
                return self._unanswered("NoRespondersError: nats: no responders available for request")
            what = (f"status {status[:8]} {str(headers.get('Description') or '')[:80]}".rstrip() if status
                    else "no JetStream headers")
            return self._unanswered(f"the answer is not a stored message ({what})", logging.WARNING)
        if subject != self.subject or stream != self.cfg.stream:
            return self._unanswered(f"the answer is a message of {str(subject)[:140]!r} in stream {str(stream)[:64]!r}, "
                                    f"not of {self.subject} in {self.cfg.stream}", logging.WARNING)
        self._catchup_failures.clear()
        self._handle(msg.data, headers, "catch-up", seq=int(seq) if seq and seq.isdigit() else None)
        return True

    def _unanswered(self, why: str, level: int = logging.INFO) -> bool:
        """Log (each reason once until the stream answers) that the catch-up had no answer; False."""
        if why in self._catchup_failures:
            level = logging.DEBUG
        elif len(self._catchup_failures) < 64:
            self._catchup_failures.add(why)
        # the hub (or its link to this leaf) is away, or the stream has no allow_direct: the next
        # catch-up, or a live message once the link is back, brings the release
        log.log(level, "NATS %s: no catch-up answer from stream %s (%s); trying again later", self.subject,
                self.cfg.stream, why)
        return False

    def _handle(self, data: bytes | None, headers: Mapping[str, str] | None, via: str,
                seq: int | None = None) -> None:
        key = (headers or {}).get(MSG_ID)
        ident = key or (f"seq:{seq}" if seq else None)
        if ident is not None and ident == self.last_key:
            # the catch-up found what the live subscription already handed over (or the reverse), or
            # the same message that was not an event: logged once, not at every catch-up
            return
        self.last_key = ident
        try:
            if not data or len(data) > MAX_EVENT_BYTES:
                raise DataError(f"payload of {len(data or b'')} bytes (an event is 1 to {MAX_EVENT_BYTES})")
            event = parse_agent_event(json.loads(data), event_id=key, source="nats")
        except (ValueError, DataError, RecursionError) as e:  # RecursionError: JSON nested past the limit
            self.ignored += 1
            log.warning("NATS %s: ignoring a %s message that is not a release event: %s", self.subject, via,
                        str(e)[:200])
            return
        log.info("NATS %s: release event %s (%s)", self.subject, key or "-", via)
        self.on_event(event)


def serve_nats(agent: Any, *, environ: Mapping[str, str] | None = None, listen: str | None = None,
               secret: str | None = None, on_report: Callable[[Any], None] | None = None,
               on_ready: Callable[[dict[str, Any]], None] | None = None) -> None:
    """:func:`sync_tools.agent.runner.serve` with release events from NATS (``agent.nats``) instead of
    the relay's SSE stream; pushes to *listen* are still taken when set. Subscribes before the start-up
    reconcile (the catch-up at connect covers a release in between). Raises ConfigError when
    ``agent.nats`` is not set, a credentials file cannot be read or ``$SYNC_TOOLS_NATS_LOOP`` names no
    event loop that is there."""
    from .runner import serve

    config = agent.config
    cfg = config.agent.nats
    if cfg is None:
        raise ConfigError("agent.transport is 'nats' but agent.nats is not set", path=config.path, key="agent.nats")
    env = os.environ if environ is None else environ
    # the options are made (and the files read) now, so a bad file stops the agent at start with a
    # ConfigError, and again before every connect, so renewed certificates and credentials are taken
    sub = NatsSubscriber(cfg, config.release.tag, agent.submit, name=config.agent.id,
                         options=lambda: connect_options(cfg, root=config.root, environ=env),
                         loop=env.get(LOOP_ENV, ""))
    thread = threading.Thread(target=sub.run, name="agent-nats", daemon=True)
    thread.start()
    if not sub.connected.wait(NATS_CONNECT_WAIT):
        log.warning("NATS %s not connected yet; reconciling anyway, it keeps retrying", ", ".join(cfg.servers))

    def ready(info: dict[str, Any]) -> None:
        info.update(nats=", ".join(cfg.servers), nats_subject=sub.subject, nats_connected=sub.connected,
                    nats_subscriber=sub)
        if on_ready is not None:
            on_ready(info)

    try:
        serve(agent, listen=listen, secret=secret, on_report=on_report, on_ready=ready)
    finally:
        sub.stop()
        thread.join(timeout=5)
