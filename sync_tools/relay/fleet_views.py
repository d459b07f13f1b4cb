"""The relay's fleet endpoints and the glue between the fleet and the outbox.

Endpoints (see docs/rollouts.md and the contract in docs/decisions.md):

- ``POST /report`` (agent token bound to an id): record an agent's report durably; 202.
- ``GET /rollout/<subsystem>/<build>`` (agent token): may this agent install that build?
- ``GET /rollout/<subsystem>`` (agent or operator token): the subsystem's current rollouts.
- ``POST /rollout/<subsystem>/promote|halt|resume`` (operator token): a person's hand on a rollout.
- ``GET /fleet`` (agent or operator token; Bearer, or Basic with the token as password for a
  browser): JSON, or the server-rendered page when the client prefers ``text/html``.

Glue: :func:`install` wires a :class:`~sync_tools.relay.fleet.Fleet` into a relay: the fan-out job
hands it every verified manifest (rollouts are created, a due first wave opened before the release
event goes out), a ``rollout`` outbox job is the timer that opens the next wave when a settle time or
a minimum age has passed (it waits as a deferred job in the worker threads; nothing polls), and a
wave opened later is announced with a normal ``release.updated`` event through the outbox.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, Response, jsonify, render_template, request
from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sync_tools.manifest import MANIFEST_NAME, parse_manifest
from sync_tools.relay import webhook as wh
from sync_tools.relay.app import _error  # the relay's one JSON error shape
from sync_tools.relay.fanout import AgentEvent
from sync_tools.relay.fleet import BadReport, Fleet, FleetStore, TokenBuckets, is_text, parse_report
from sync_tools.relay.outbox import Job, NewJob, OutboxError
from sync_tools.relay.worker import Deferred
from sync_tools.rollout import COMPLETE, HALTED, RolloutStatus

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sync_tools.relay.app import Relay

log = logging.getLogger(__name__)

EXTENSION = "sync_tools.fleet"
_HEX64 = "0123456789abcdef"
MAX_ACTION_BODY = 4096
ACTIONS = ("promote", "halt", "resume")

fleet_bp = Blueprint("fleet", __name__, template_folder="../data")


class FleetRelay:
    """A relay's fleet and what it needs of the relay: outbox, pusher, broker, worker, store."""

    def __init__(self, relay: Relay):
        self.relay = relay
        settings = relay.settings
        path = settings.fleet_db_path or settings.db_path.with_suffix(".fleet.db")
        self.fleet = Fleet(FleetStore(path, max_report_rows=settings.max_report_rows), now=relay.outbox.now,
                           silent_after=settings.silent_after)
        self.buckets = TokenBuckets(settings.report_burst, settings.report_rate)
        self.reports = Counter("sync_tools_relay_reports", "Agent reports by outcome and result.",
                               ["outcome", "result"], registry=relay.metrics.registry)
        relay.metrics.registry.register(_FleetCollector(self.fleet))
        self._scheduled: set[str] = set()
        self._lock = threading.Lock()
        known = [agent for agent, _ in settings.agent_ids.values()]
        if known:
            self.fleet.store.register_agents(known, relay.outbox.now())

    # ------------------------------------------------------------------------------------ glue

    def on_manifest(self, data: bytes) -> None:
        """The fan-out job read and verified *data*: create rollouts, open the first waves that are
        due (before the release event goes out, so it announces them), and set their timers."""
        for record in self.fleet.on_manifest(parse_manifest(data)):
            judged, _ = self.fleet.advance(record.subsystem, record.build)
            if judged is not None:
                self.schedule(record.subsystem, record.build, judged.status)

    def schedule(self, subsystem: str, build: str, st: RolloutStatus, tag: str = "") -> None:
        """Make sure a ``rollout`` job runs when *st*'s next step is due (now or later). One job per
        rollout, wave and due time (the outbox's dedupe), and once per process without a write."""
        due = st.due if st.due is not None else st.recheck  # waiting for reports: judged again when one falls silent
        if due is None or st.state in (HALTED, COMPLETE):
            return
        dedupe = f"rollout:{subsystem}:{build}:{st.wave}:{due:.3f}{tag}"
        with self._lock:
            if dedupe in self._scheduled:
                return
            if len(self._scheduled) > 10_000:
                self._scheduled.clear()
        self.relay.outbox.add_jobs([NewJob(kind="rollout", payload={"subsystem": subsystem, "build": build},
                                           lane=f"rollout:{subsystem}:{build[:16]}", dedupe=dedupe)])
        with self._lock:
            self._scheduled.add(dedupe)
        self.relay.worker.wake()

    def rollout_job(self, job: Job) -> list[NewJob]:
        """The timer: open the waves that are due, announce them, and wait (deferred, in the outbox)
        until the next step is due, or end when the next step waits for reports."""
        sub, build = str(job.payload.get("subsystem")), str(job.payload.get("build"))
        judged, opened = self.fleet.advance(sub, build)
        if opened:
            self.announce(sub)
        if judged is None:
            return []
        st = judged.status
        due = st.due if st.due is not None else st.recheck
        if due is not None and st.state not in (HALTED, COMPLETE) and not st.open_next:
            raise Deferred(f"{sub} build {build[:12]}: {st.reason}", until=due)
        return []

    def announce(self, subsystem: str) -> int:
        """A normal ``release.updated`` event naming *subsystem*, through the outbox (SSE and pushes),
        so agents held by the rollout reconcile and ask again. Returns the event id."""
        relay = self.relay
        serial = int(self.fleet.store.get_state("manifest_serial") or 0)
        event = AgentEvent(release=relay.config.release.tag, subsystems=(subsystem,), serial=serial,
                           manifest=relay.store_factory().asset_url(MANIFEST_NAME))
        body = event.to_json()
        event_id = relay.outbox.append_event(event.type, body, jobs=lambda eid: relay.pusher.jobs_for(eid, body))
        log.info("release event %d: rollout of %s moved on", event_id, subsystem)
        relay.broker.notify()
        relay.worker.wake()
        return event_id

    def track(self, stream: Iterator[bytes]) -> Iterator[bytes]:
        """*stream* (an agent's SSE body), marking its agent connected while it is iterated. Call in
        the request (the token is read now)."""
        agent = self.agent_of(self.token())
        if agent is None:
            return stream

        def tracked() -> Iterator[bytes]:
            self.fleet.connected(agent)
            try:
                yield from stream
            finally:
                self.fleet.disconnected(agent)

        return tracked()

    # ------------------------------------------------------------------------------------ auth

    def token(self) -> bytes | None:
        """The token of this request: ``Authorization: Bearer T``, or, for a GET, Basic with T as the
        password (what a browser sends after the fleet page's 401). A browser sends the Basic
        credentials it keeps with any request to this origin, a form another site posts included, so
        nothing that changes state takes them: a POST needs the Bearer header, which no cross-site
        form can set."""
        auth = request.headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip().encode()
        if request.method not in ("GET", "HEAD"):
            return None
        basic = request.authorization
        if basic is not None and basic.type == "basic" and basic.password:
            return basic.password.encode()
        return None

    def agent_of(self, token: bytes | None) -> str | None:
        """The agent id a bound token (``ID=TOKEN``) belongs to, else None."""
        if token is None:
            return None
        hit = self.relay.settings.agent_ids.get(hashlib.sha256(token).digest())
        if hit is not None and hmac.compare_digest(hit[1], token):
            return hit[0]
        return None

    def is_operator(self, token: bytes | None) -> bool:
        op = self.relay.settings.operator_token
        return token is not None and op is not None and hmac.compare_digest(op, token)

    def is_agent(self, token: bytes | None) -> bool:
        if token is None:
            return False
        ok = False
        for t in self.relay.settings.agent_tokens:  # every one, so timing tells nothing
            ok |= hmac.compare_digest(token, t)
        return ok


def _fr() -> FleetRelay:
    from flask import current_app

    return current_app.extensions[EXTENSION]




def _unauthorized(message: str, *, basic: bool = False) -> Response:
    challenge = 'Basic realm="sync-tools fleet", charset="UTF-8"' if basic else 'Bearer realm="sync-tools-relay"'
    return _error(401, message, WWW_Authenticate=challenge)


def _limited(fr: FleetRelay, agent: str) -> Response | None:
    wait = fr.buckets.take(agent)
    if wait <= 0:
        return None
    fr.reports.labels(outcome="-", result="throttled").inc()
    fr.relay.refusals.warning("agent %s is sending too fast; refused (429)", agent)
    return _error(429, "too many requests from this agent; slow down", Retry_After=str(max(1, int(wait + 0.999))))


# --------------------------------------------------------------------------------------- reports


@fleet_bp.post("/report")
def report() -> Response | tuple[Response, int]:
    """An agent's report: 202 once it is on disk; 401 unknown token or another agent's id, 400
    malformed, 413 over 16 KiB, 429 when one agent floods."""
    from sync_tools.relay.app import read_capped

    fr = _fr()
    agent = fr.agent_of(fr.token())
    if agent is None:
        fr.reports.labels(outcome="-", result="unauthorized").inc()
        fr.relay.refusals.warning("refused report: no agent token bound to an id (ID=TOKEN)")
        return _unauthorized("an agent token bound to an agent id is required: Authorization: Bearer <token>")
    limited = _limited(fr, agent)
    if limited is not None:
        return limited
    try:
        body = read_capped(request.stream, request.content_length, 16 * 1024)
        r = parse_report(body, agent)
    except wh.WebhookError as e:
        fr.reports.labels(outcome="-", result="too_large" if e.status == 413 else "bad_request").inc()
        resp = _error(e.status, str(e))
        resp.headers["Connection"] = "close"
        return resp
    except BadReport as e:
        fr.reports.labels(outcome="-", result="unauthorized" if e.status == 401 else "bad_request").inc()
        fr.relay.refusals.warning("refused report from %s: %s", agent, e)
        return _unauthorized(str(e)) if e.status == 401 else _error(e.status, str(e))
    try:
        known = fr.fleet.record(r)
    except BadReport as e:
        fr.reports.labels(outcome=r.outcome, result="bad_request").inc()
        fr.relay.refusals.warning("refused report from %s: %s", agent, e)
        return _error(e.status, str(e))
    except OutboxError as e:
        log.error("cannot record a report from %s: %s", agent, e)
        return _error(503, "the relay cannot record reports right now")
    fr.reports.labels(outcome=r.outcome, result="recorded" if known else "unknown_build").inc()
    if r.outcome != "held":
        log.info("report from %s: %s %s %s%s", agent, r.subsystem, r.outcome, (r.to_sha or "-")[:12],
                 "" if known or r.to_sha is None else " (a build no verified manifest named)")
    if known and r.to_sha is not None:
        record = fr.fleet.store.rollout(r.subsystem, r.to_sha)
        if record is not None:
            try:
                fr.schedule(r.subsystem, r.to_sha, fr.fleet.judge(record).status)
            except OutboxError as e:  # recorded; the next report or the timer sets it
                log.error("cannot schedule the rollout of %s: %s", r.subsystem, e)
    return jsonify(status="recorded", known=known), 202


# -------------------------------------------------------------------------------------- rollouts


def _is_build(value: str) -> bool:
    return len(value) == 64 and all(c in _HEX64 for c in value)


@fleet_bp.get("/rollout/<subsystem>/<build>")
def may_install(subsystem: str, build: str) -> Response:
    """``{"allowed", "state", "wave", "percent", "reason"}`` for the asking agent. Fails closed."""
    fr = _fr()
    token = fr.token()
    agent = fr.agent_of(token)
    if agent is None:
        return _unauthorized("an agent token bound to an agent id is required: Authorization: Bearer <token>")
    if not _is_build(build):
        return _error(400, "the build is the binary's sha256 (64 lower-case hex digits)")
    limited = _limited(fr, agent)
    if limited is not None:
        return limited
    try:
        decision = fr.fleet.decide(agent, subsystem, build)
    except OutboxError as e:
        log.error("cannot judge a rollout: %s", e)
        return jsonify(allowed=False, state="unknown", wave=0, percent=None,
                       reason="the relay cannot read its fleet database; try again later")
    return jsonify(decision.to_json())


def _current(fr: FleetRelay, subsystem: str, build: str | None) -> list[Any]:
    records = fr.fleet.store.rollouts(current=True, subsystem=subsystem)
    if build is not None:
        records = [r for r in records if r.build == build]
    return records


@fleet_bp.get("/rollout/<subsystem>")
def rollout_status(subsystem: str) -> Response:
    fr = _fr()
    token = fr.token()
    if not (fr.is_operator(token) or fr.is_agent(token)):
        return _unauthorized("an operator or agent token is required")
    return jsonify(subsystem=subsystem, rollouts=[j.to_json() for j in fr.fleet.judged(subsystem=subsystem)])


@fleet_bp.post("/rollout/<subsystem>/<action>")
def rollout_action(subsystem: str, action: str) -> Response:
    """promote: open the next wave now; halt: no agent not running the build installs it; resume:
    clear a halt and forgive the failures so far. Body (optional JSON): ``{"build": sha256,
    "reason": text}``; without a build, every current rollout of the subsystem."""
    from sync_tools.relay.app import read_capped

    fr = _fr()
    if action not in ACTIONS:
        return _error(404, f"unknown action {action!r} (expected one of: {', '.join(ACTIONS)})")
    if not fr.is_operator(fr.token()):
        return _unauthorized("the operator token is required (SYNC_TOOLS_OPERATOR_TOKEN)")
    try:
        raw = read_capped(request.stream, request.content_length, MAX_ACTION_BODY)
        body = json.loads(raw) if raw.strip() else {}
    except wh.WebhookError as e:
        return _error(e.status, str(e))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return _error(400, "the body must be JSON: {\"build\": sha256, \"reason\": text}")
    if not isinstance(body, dict):
        return _error(400, "the body must be a JSON object")
    build, reason = body.get("build"), body.get("reason", "")
    if build is not None and (not isinstance(build, str) or not _is_build(build)):
        return _error(400, "build must be a binary sha256")
    if not isinstance(reason, str) or len(reason) > 500 or not is_text(reason):
        return _error(400, "reason must be a short line of text")
    records = _current(fr, subsystem, build)
    if not records:
        return _error(404, f"no current rollout of {subsystem}" + (f" build {build}" if build else ""))
    fleet = fr.fleet
    announce = False
    if action == "promote":  # all or none: a 409 says nothing was done
        halted = [r for r in records if fleet.judge(r, fresh=True).status.state == HALTED]
        if halted:
            return _error(409, f"{subsystem} build {halted[0].build[:12]} is halted: resume it first")
    for record in records:
        st = fleet.judge(record, fresh=True).status
        if action == "promote":
            if st.state == HALTED:  # halted since the look above (another process): left as it is
                continue
            announce |= fleet.promote(record)
        elif action == "halt":
            fleet.halt(record, reason.strip().splitlines()[0] if reason.strip() else "")
        else:
            if st.state != HALTED:
                continue
            fleet.resume(record)
            announce = True
        judged, opened = fleet.advance(record.subsystem, record.build)
        announce |= opened > 0
        if judged is not None:
            fr.schedule(record.subsystem, record.build, judged.status, tag=f":{action}:{fleet.now():.3f}")
    event_id = fr.announce(subsystem) if announce else None
    return jsonify(subsystem=subsystem, action=action, event=event_id,
                   rollouts=[fleet.judge(r, fresh=True).to_json() for r in _current(fr, subsystem, build)])


# ------------------------------------------------------------------------------------------ view


def _wants_html() -> bool:
    best = request.accept_mimetypes.best_match(["application/json", "text/html"])
    return best == "text/html" and request.accept_mimetypes["text/html"] > request.accept_mimetypes[
        "application/json"]


@fleet_bp.get("/fleet")
def fleet_view() -> Response | tuple[str, int] | str:
    fr = _fr()
    html = _wants_html()
    token = fr.token()
    if not (fr.is_operator(token) or fr.is_agent(token)):
        return _unauthorized("an operator or agent token is required", basic=html)
    try:
        view = fr.fleet.view()
    except OutboxError as e:
        log.error("fleet view: %s", e)
        return _error(503, "cannot read the fleet database")
    if not html:
        return jsonify(view)
    return render_template("fleet.html", view=view, charts=list(_charts(view)))


def _charts(view: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Geometry of the rollout charts (inline SVG in the page): one bar per rollout, the fleet from
    0 to 100 %, wave marks, the open share and the healthy share."""
    for name, sub in view["subsystems"].items():
        for r in sub["rollouts"]:
            fleet = max(1, r["fleet"])
            open_pct = 100.0 * r["members"] / fleet if r["fleet"] else 0.0
            yield {"subsystem": name, "rollout": r, "open": round(open_pct, 2),
                   "marks": [{"percent": w, "x": round(6 * w, 1), "n": i + 1, "opened": i < r["wave"]}
                             for i, w in enumerate(r["waves"])],
                   "open_w": round(6 * open_pct, 1)}


# ---------------------------------------------------------------------------------------- metrics


class _FleetCollector(Collector):
    def __init__(self, fleet: Fleet):
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        try:
            judged = self.fleet.judged()
            agents = self.fleet.store.agents()
            live = self.fleet.live(agents)
        except Exception:  # noqa: BLE001 - a scrape must not fail because the database is busy
            log.exception("cannot read the fleet for /metrics")
            return
        halted = GaugeMetricFamily("sync_tools_relay_rollout_halted", "1 when the rollout of a build is halted.",
                                   labels=["subsystem", "build", "version"])
        wave = GaugeMetricFamily("sync_tools_relay_rollout_wave", "The open wave of a rollout (0: none yet).",
                                 labels=["subsystem", "build", "version"])
        for j in judged:
            labels = [j.record.subsystem, j.record.build[:12], j.record.version]
            halted.add_metric(labels, 1.0 if j.status.state == HALTED else 0.0)
            wave.add_metric(labels, float(j.status.wave))
        yield halted
        yield wave
        yield GaugeMetricFamily("sync_tools_relay_rollouts_halted", "Rollouts of current builds that are halted.",
                                value=sum(1 for j in judged if j.status.state == HALTED))
        fam = GaugeMetricFamily("sync_tools_relay_fleet_agents", "Known agents by liveness.", labels=["state"])
        fam.add_metric(["live"], float(len([a for a in agents if a.id in live])))
        fam.add_metric(["silent"], float(len([a for a in agents if a.id not in live])))
        yield fam


# ---------------------------------------------------------------------------------------- install


def install(app: Flask, relay: Relay) -> FleetRelay:
    """Wire the fleet into *relay* and its *app*: tables, routes, the fan-out hook, the timer job."""
    fr = FleetRelay(relay)
    relay.fleet = fr
    relay.manifest_hooks.append(fr.on_manifest)
    relay.worker.handlers["rollout"] = fr.rollout_job
    app.extensions[EXTENSION] = fr
    app.register_blueprint(fleet_bp)
    return fr
