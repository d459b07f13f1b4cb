"""Reports to the relay (issue 15): after each install attempt and at start, the real agent POSTs
``/report`` to a real loopback server implementing the contract's two agent-facing routes; a relay that
is down or refuses never fails or blocks an install."""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, jsonify, request
from werkzeug.serving import make_server

from sync_tools.agent.report import MAX_REPORT_BYTES, Report, Reporter, agent_id, reports_for
from sync_tools.agent.runner import SubsystemResult, UpdateReport, serve
from sync_tools.config import load_config
from sync_tools.errors import ConfigError
from tests.agent_support import PLATFORM, World, close_world, make_world
from tests.support import free_port, wait_for

TOKEN = "agent-token-a"
AGENT_ID = "agent-a"
OUTCOMES = ("updated", "rolled_back", "failed", "held", "running")
REPORT_KEYS = {"agent", "subsystem", "platform", "from", "to", "version", "serial", "outcome", "error", "times",
               "patch"}


class ContractRelay:
    """``POST /report`` and ``GET /rollout/<subsystem>/<build>`` as the issue 15 contract words them, in a
    small Flask app on a real loopback server (werkzeug, in a thread), recording what it got.

    Tokens are bound to agent ids (*tokens*: token -> id); a report is checked for the contract's shape
    (400 otherwise, recorded in ``rejected``). ``decisions[(subsystem, build)]`` is the rollout answer
    (default: not allowed, state unknown, as the relay fails closed); ``report_status`` /
    ``rollout_status`` make the routes answer that HTTP status instead.
    """

    def __init__(self, tokens: dict[str, str] | None = None):
        self.tokens = dict(tokens or {TOKEN: AGENT_ID})
        self.reports: list[dict[str, Any]] = []
        self.report_auth: list[str | None] = []
        self.rejected: list[str] = []
        self.asks: list[tuple[str, str, str | None]] = []
        self.decisions: dict[tuple[str, str], dict[str, Any]] = {}
        self.report_status: int | None = None
        self.rollout_status: int | None = None
        app = Flask(__name__)

        def agent_of() -> str | None:
            auth = request.headers.get("Authorization", "")
            return self.tokens.get(auth.removeprefix("Bearer ")) if auth.startswith("Bearer ") else None

        @app.post("/report")
        def report() -> Any:
            self.report_auth.append(request.headers.get("Authorization"))
            if self.report_status is not None:
                return jsonify(error="told to fail"), self.report_status
            if request.content_length is None or request.content_length > MAX_REPORT_BYTES:
                return jsonify(error="too large"), 413
            body = request.get_json(silent=True)
            problem = _contract_problem(body)
            if problem:
                self.rejected.append(problem)
                return jsonify(error=problem), 400
            who = agent_of()
            if who is None or who != body["agent"]:
                return jsonify(error="unknown token or agent id"), 401
            self.reports.append(body)
            return jsonify(status="recorded"), 202

        @app.get("/rollout/<subsystem>/<build>")
        def rollout(subsystem: str, build: str) -> Any:
            self.asks.append((subsystem, build, request.headers.get("Authorization")))
            if self.rollout_status is not None:
                return jsonify(error="told to fail"), self.rollout_status
            if agent_of() is None:
                return jsonify(error="unknown token"), 401
            return jsonify(self.decisions.get((subsystem, build), {
                "allowed": False, "state": "unknown", "wave": 0, "percent": 0, "reason": "unknown build"}))

        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_port}"

    def allow(self, subsystem: str, build: str, allowed: bool = True, **kw: Any) -> None:
        self.decisions[(subsystem, build)] = {"allowed": allowed, "state": "active", "wave": 1, "percent": 10,
                                              "reason": "", **kw}

    def outcomes(self, subsystem: str | None = None) -> list[str]:
        return [r["outcome"] for r in self.reports if subsystem in (None, r["subsystem"])]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def _contract_problem(body: Any) -> str | None:
    """What makes *body* not a report as the contract words it, or None."""
    if not isinstance(body, dict) or set(body) != REPORT_KEYS:
        return f"keys {sorted(body) if isinstance(body, dict) else type(body).__name__}"
    if body["outcome"] not in OUTCOMES:
        return f"outcome {body['outcome']!r}"
    if not all(isinstance(body[k], str) and body[k] for k in ("agent", "subsystem", "platform")):
        return "agent/subsystem/platform"
    for k in ("from", "to"):
        if body[k] is not None and not (isinstance(body[k], str) and len(body[k]) == 64):
            return f"{k} is not a sha256"
    if body["serial"] is not None and not isinstance(body["serial"], int):
        return "serial"
    if body["error"] is not None and (not isinstance(body["error"], str) or "\n" in body["error"]):
        return "error is not one line"
    times = body["times"]
    if not isinstance(times, dict) or not all(k in ("download", "install", "health") and isinstance(v, int | float)
                                              and v >= 0 for k, v in times.items()):
        return f"times {times!r}"
    return None


@pytest.fixture
def relay() -> Iterator[ContractRelay]:
    r = ContractRelay()
    try:
        yield r
    finally:
        r.close()


def _world(base: Path, relay_url: str, monkeypatch: pytest.MonkeyPatch, **kw: Any) -> World:
    monkeypatch.setenv("SYNC_TOOLS_AGENT_TOKEN", TOKEN)
    return make_world(base, {"nats": "nats-server", "arc": "arc"},
                      agent_extra=f"  relay: {relay_url}\n  id: {AGENT_ID}\n", **kw)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ------------------------------------------------------------------------------ after each attempt


def test_an_update_and_a_rollback_are_reported_with_their_step_times(tmp_path: Path, relay: ContractRelay,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    world = _world(tmp_path, relay.url, monkeypatch)
    try:
        v1 = world.sha("nats")
        v2 = world.publish("nats", "v2")
        report = world.agent().reconcile()
        assert report.result("nats").action == "updated" and report.result("arc").action == "unchanged"
        assert relay.rejected == [] and len(relay.reports) == 1  # arc made no attempt: nothing to report
        got = relay.reports[0]
        assert {k: got[k] for k in ("agent", "subsystem", "platform", "from", "to", "version", "serial",
                                    "outcome", "error", "patch")} == {
            "agent": AGENT_ID, "subsystem": "nats", "platform": PLATFORM, "from": v1, "to": _sha(v2),
            "version": "v2", "serial": report.serial, "outcome": "updated", "error": None, "patch": None}
        assert set(got["times"]) == {"download", "install", "health"}
        assert relay.report_auth == [f"Bearer {TOKEN}"]

        bad = world.publish("nats", "v3", mode="unhealthy")
        report = world.agent(health_timeout=1.0).reconcile()
        assert report.result("nats").action == "rolled_back"
        got = relay.reports[-1]
        assert (got["outcome"], got["from"], got["to"], got["version"]) == ("rolled_back", _sha(v2), _sha(bad), "v3")
        assert "unhealthy" in got["error"] and "HTTP 500" in got["error"]
        assert set(got["times"]) == {"download", "install", "health"}

        world.agent().reconcile()  # nothing to do: nothing reported
        assert relay.outcomes() == ["updated", "rolled_back"] and relay.rejected == []
    finally:
        close_world(world)


def test_at_start_the_agent_reports_what_runs(tmp_path: Path, relay: ContractRelay,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """``serve`` reports ``running`` per installed subsystem before its start-up reconcile, whose update
    is reported after it."""
    world = _world(tmp_path, relay.url, monkeypatch)
    agent = world.agent()
    try:
        installed = {n: world.sha(n) for n in ("nats", "arc")}
        v2 = world.publish("nats", "v2")
        t = threading.Thread(target=serve, kwargs={"agent": agent}, daemon=True)
        t.start()
        wait_for(lambda: "updated" in relay.outcomes(), what="the start-up reconcile's report")
        agent.stop()
        t.join(10)
        running = [r for r in relay.reports if r["outcome"] == "running"]
        assert {r["subsystem"]: (r["from"], r["to"], r["version"]) for r in running} == {
            n: (sha, sha, "v1") for n, sha in installed.items()}
        assert relay.outcomes() == ["running", "running", "updated"]  # what ran at start came first
        assert relay.reports[-1]["to"] == _sha(v2) and relay.rejected == []
    finally:
        agent.stop()
        close_world(world)


# ------------------------------------------------------------------------- a relay that fails


def test_a_relay_that_is_down_or_refuses_never_fails_an_install_and_is_logged_once(
        tmp_path: Path, relay: ContractRelay, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    world = _world(tmp_path, f"http://127.0.0.1:{free_port()}", monkeypatch)  # nothing listens there
    try:
        with caplog.at_level(logging.WARNING, logger="sync_tools.agent.report"):
            for v in ("v2", "v3"):
                data = world.publish("nats", v)
                agent = world.agent()
                assert agent.reconcile().result("nats").action == "updated"
                assert world.bin_path("nats").read_bytes() == data and agent.reporter.failed == 1
        # each agent object logs its first failure; this one saw one failing batch
        assert len([r for r in caplog.records if "report to" in r.getMessage()]) == 2

        # one agent, a relay that keeps refusing: logged once, then again only after one got through
        agent = world.agent()
        agent.reporter.relay = relay.url
        relay.report_status = 503
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sync_tools.agent.report"):
            for v in ("v4", "v5"):
                world.publish("nats", v)
                assert agent.reconcile().result("nats").action == "updated"
            assert len([r for r in caplog.records if "report to" in r.getMessage()]) == 1
            relay.report_status = None
            world.publish("nats", "v6")
            assert agent.reconcile().ok and relay.outcomes() == ["updated"]
            relay.report_status = 401
            world.publish("nats", "v7")
            assert agent.reconcile().result("nats").action == "updated"
            assert len([r for r in caplog.records if "report to" in r.getMessage()]) == 2
        assert world.health("nats").startswith("nats-v7")
    finally:
        close_world(world)


def test_a_relay_that_accepts_but_never_answers_does_not_hold_the_install(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The report's read timeout ends the wait; the install was done before it."""
    srv = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])  # read nothing, answer nothing
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    world = _world(tmp_path, f"http://127.0.0.1:{srv.getsockname()[1]}", monkeypatch)
    try:
        data = world.publish("nats", "v2")
        agent = world.agent()
        agent.reporter.timeout = (0.5, 0.5)
        assert agent.reconcile().result("nats").action == "updated"
        assert world.bin_path("nats").read_bytes() == data and agent.reporter.failed == 1 and held
    finally:
        stop.set()
        t.join(5)
        for c in held:
            c.close()
        srv.close()
        close_world(world)


def test_without_agent_relay_nothing_is_sent(tmp_path: Path) -> None:
    world = make_world(tmp_path, {"nats": "nats-server"})
    try:
        world.publish("nats", "v2")
        agent = world.agent()
        assert agent.reporter.url is None
        assert agent.reconcile().result("nats").action == "updated"
        assert agent.reporter.sent == 0 and agent.reporter.failed == 0
    finally:
        close_world(world)


# ------------------------------------------------------------------------------- the bodies


def test_only_install_attempts_are_reported_each_as_its_outcome() -> None:
    sha = "a" * 64
    results = tuple(SubsystemResult(f"s-{a}", a, sha, "b" * 64, "v2", error="x\ny" if a == "failed" else None)
                    for a in ("unchanged", "updated", "rolled_back", "failed", "skipped", "missing", "recovered",
                              "held"))
    got = reports_for(UpdateReport(7, results), agent="a1", platform=PLATFORM)
    assert [(r.subsystem, r.outcome) for r in got] == [
        ("s-updated", "updated"), ("s-rolled_back", "rolled_back"), ("s-failed", "failed"),
        ("s-recovered", "updated"), ("s-held", "held")]
    body = got[2].to_json()
    assert set(body) == REPORT_KEYS and body["error"] == "x y" and body["serial"] == 7
    assert _contract_problem(body) is None


def test_an_oversized_report_is_cut_to_fit_and_still_sent(relay: ContractRelay) -> None:
    reporter = Reporter(relay.url, TOKEN, agent=AGENT_ID, platform=PLATFORM)
    big = Report(agent=AGENT_ID, subsystem="nats", platform=PLATFORM, outcome="failed", from_sha="a" * 64,
                 to_sha="b" * 64, version="v" * 20000, error="e" * 20000)
    assert reporter.send([big]) == 1
    assert relay.reports[0]["version"] is None and len(json.dumps(relay.reports[0])) <= MAX_REPORT_BYTES


# ------------------------------------------------------------------------------------ config


def test_agent_id_defaults_to_the_hostname_and_is_checked(tmp_path: Path) -> None:
    cfg = tmp_path / "sync-tools.yaml"
    cfg.write_text("agent:\n  relay: http://127.0.0.1:1\n")
    config = load_config(cfg)
    assert config.agent.id is None and agent_id(config) == socket.gethostname()
    assert config.agent.settle_seconds == 10.0
    cfg.write_text("agent:\n  id: web-01.eu\n  settle_seconds: 2.5\n")
    config = load_config(cfg)
    assert agent_id(config) == "web-01.eu" and config.agent.settle_seconds == 2.5
    for bad, key in (("id: 'two words'", "agent.id"), ("id: ''", "agent.id"), ("settle_seconds: -1", "agent.settle_seconds"),
                     ("settle_seconds: .inf", "agent.settle_seconds")):
        cfg.write_text(f"agent:\n  {bad}\n")
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(cfg)
