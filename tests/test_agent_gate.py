"""The wave gate (issue 15): before downloading a build whose manifest entry carries a rollout policy,
the real agent asks ``GET /rollout/<subsystem>/<build>`` of a real loopback server implementing the
contract; not allowed, or no answer, holds the build back with no download."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sync_tools import signing
from sync_tools.agent.gate import Gate, has_rollout
from sync_tools.agent.report import Reporter
from sync_tools.agent.state import load_state
from sync_tools.fsutil import atomic_write_bytes
from sync_tools.manifest import MANIFEST_NAME, SIGNATURE_NAME, Entry
from tests.agent_support import PLATFORM, World, close_world, make_world
from tests.support import free_port
from tests.test_agent_report import AGENT_ID, TOKEN, ContractRelay

POLICY = {"waves": [1, 10, 50, 100], "min_healthy": 1, "settle_seconds": 60, "max_failures": 1,
          "min_age_seconds": 0}
BUILD = "b" * 64


@pytest.fixture
def relay() -> Iterator[ContractRelay]:
    r = ContractRelay()
    try:
        yield r
    finally:
        r.close()


# --------------------------------------------------------------------------------- the decision


def test_an_entry_without_a_policy_is_never_gated(relay: ContractRelay) -> None:
    for gate in (Gate(relay.url, TOKEN), Gate(None, None)):
        d = gate.decide("nats", BUILD, has_policy=False)
        assert d.allowed and not d.retry
    assert relay.asks == []


def test_the_relay_decides_with_the_agents_token(relay: ContractRelay) -> None:
    gate = Gate(relay.url, TOKEN)
    relay.allow("nats", BUILD)
    d = gate.decide("nats", BUILD, has_policy=True)
    assert d.allowed and (d.state, d.wave, d.percent) == ("active", 1, 10)
    assert relay.asks == [("nats", BUILD, f"Bearer {TOKEN}")]

    relay.allow("nats", BUILD, allowed=False, state="waiting", wave=2, percent=50,
                reason="wave 2 opens after 1 healthy report\nand 60 s")
    d = gate.decide("nats", BUILD, has_policy=True)
    assert not d.allowed and not d.retry
    assert "not allowed yet (rollout waiting, wave 2, 50%)" in d.reason
    assert d.reason.endswith("wave 2 opens after 1 healthy report and 60 s")  # one line

    d = gate.decide("nats", "c" * 64, has_policy=True)  # a build the relay does not know: fails closed
    assert not d.allowed and "unknown build" in d.reason


def test_no_answer_holds_the_build_and_a_transient_one_asks_for_a_retry(relay: ContractRelay) -> None:
    d = Gate(f"http://127.0.0.1:{free_port()}", TOKEN).decide("nats", BUILD, has_policy=True)
    assert not d.allowed and d.retry and "cannot be reached" in d.reason
    gate = Gate(relay.url, TOKEN)
    relay.allow("nats", BUILD)
    for status, retry in ((500, True), (503, True), (429, True), (401, False), (404, False)):
        relay.rollout_status = status
        d = gate.decide("nats", BUILD, has_policy=True)
        assert (d.allowed, d.retry) == (False, retry) and f"HTTP {status}" in d.reason
    relay.rollout_status = None
    d = Gate(relay.url, "not-a-token").decide("nats", BUILD, has_policy=True)
    assert not d.allowed and "HTTP 401" in d.reason


def test_an_answer_that_is_not_a_decision_holds_the_build(tmp_path: Path) -> None:
    import threading

    from flask import Flask
    from werkzeug.serving import make_server

    answers = iter([b'{"allowed": "yes"}', b"[true]", b"not json", b'{"allowed": true, "pad": "' + b"x" * 70000
                    + b'"}'])
    app = Flask(__name__)
    app.add_url_rule("/rollout/<s>/<b>", "r", lambda s, b: (next(answers), 200, {"Content-Type": "application/json"}))
    srv = make_server("127.0.0.1", 0, app, threaded=True)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        gate = Gate(f"http://127.0.0.1:{srv.server_port}", TOKEN)
        for _ in range(4):
            d = gate.decide("nats", BUILD, has_policy=True)
            assert not d.allowed and not d.retry and "not a rollout decision" in d.reason
    finally:
        srv.shutdown()
        t.join(5)


def test_a_policy_without_agent_relay_is_held_with_a_clear_reason() -> None:
    d = Gate(None, TOKEN).decide("nats", BUILD, has_policy=True)
    assert not d.allowed and not d.retry
    assert "agent.relay is not set" in d.reason and "nats" in d.reason


def test_the_policy_is_read_defensively_from_the_entry() -> None:
    entry = Entry(version="v1", commit="c", built="2024-01-01T00:00:00Z")
    assert not has_rollout(entry)  # an Entry that predates the key, or an entry without a policy
    assert has_rollout(_RolloutEntry(version="v1", commit="c", built="2024-01-01T00:00:00Z", rollout=POLICY))


# ----------------------------------------------------------------------------- through the agent


@dataclasses.dataclass(frozen=True)
class _RolloutEntry(Entry):
    """An entry carrying a policy, until ``Entry.rollout`` (the relay side's) is merged."""

    rollout: Any = None


def _with_policy(entry: Entry) -> _RolloutEntry:
    return _RolloutEntry(**{f.name: getattr(entry, f.name) for f in dataclasses.fields(Entry) if f.name != "rollout"},
                         rollout=POLICY)


def _world(base: Path, relay_url: str | None, monkeypatch: pytest.MonkeyPatch) -> World:
    monkeypatch.setenv("SYNC_TOOLS_AGENT_TOKEN", TOKEN)
    extra = f"  relay: {relay_url}\n  id: {AGENT_ID}\n" if relay_url else ""
    return make_world(base, {"nats": "nats-server", "arc": "arc"}, agent_extra=extra)


def test_a_held_build_is_not_downloaded_then_installed_once_its_wave_opens(
        tmp_path: Path, relay: ContractRelay, monkeypatch: pytest.MonkeyPatch) -> None:
    world = _world(tmp_path, relay.url, monkeypatch)
    try:
        v1 = world.sha("nats")
        data = world.publish("nats", "v2")
        build = hashlib.sha256(data).hexdigest()
        plain = world.store.manifest().subsystems["nats"]
        entry = _with_policy(plain)
        agent = world.agent()
        sub = agent.config.subsystem("nats")
        world.server.reset()

        res = agent._apply(sub, entry)
        assert (res.action, res.old_sha, res.new_sha) == ("held", v1, build) and res.ok
        assert "unknown build" in res.error and world.server.requests == []  # nothing was downloaded
        assert world.sha("nats") == v1 and world.health("nats").startswith("nats-v1")
        assert relay.asks == [("nats", build, f"Bearer {TOKEN}")]
        assert dict(load_state(world.root).held["nats"]) == {"build": build, "reason": res.error}
        assert agent.status()["nats"]["held"] == {"build": build, "reason": res.error}

        relay.rollout_status = 503  # relay trouble: held, and the reconcile would be retried
        res = agent._apply(sub, entry)
        assert res.action == "held" and res.retry and world.server.requests == []

        relay.rollout_status = None
        relay.allow("nats", build)
        res = agent._apply(sub, entry)
        assert res.action == "updated" and world.sha("nats") == build
        assert world.health("nats").startswith("nats-v2")
        assert "nats" not in load_state(world.root).held and agent.status()["nats"]["held"] is None
        assert set(res.times) == {"download", "install", "health"}

        # the same build again: installed, so the gate is not asked
        asks = len(relay.asks)
        assert agent._apply(sub, entry).action == "unchanged" and len(relay.asks) == asks
    finally:
        close_world(world)


def test_held_without_agent_relay_names_the_missing_setting(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    world = _world(tmp_path, None, monkeypatch)
    try:
        data = world.publish("nats", "v2")
        plain = world.store.manifest().subsystems["nats"]
        entry = _with_policy(plain)
        agent = world.agent()
        world.server.reset()
        res = agent._apply(agent.config.subsystem("nats"), entry)
        assert res.action == "held" and "agent.relay is not set" in res.error and not res.retry
        assert world.server.requests == [] and world.sha("nats") != hashlib.sha256(data).hexdigest()
    finally:
        close_world(world)


# ----------------------------------------------- a signed manifest with the key (after the relay side)


def _entry_knows_rollout() -> bool:
    return "rollout" in {f.name for f in dataclasses.fields(Entry)}


def _publish_with_policy(world: World, name: str, version: str, policy: dict[str, Any] | None) -> str:
    """Publish *version* of *name*, then re-sign the manifest with *policy* as its entry's ``rollout``."""
    data = world.publish(name, version)
    d = world.store.dir
    obj = json.loads((d / MANIFEST_NAME).read_bytes())
    if policy is not None:
        obj["subsystems"][name]["rollout"] = policy
    raw = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    atomic_write_bytes(d / MANIFEST_NAME, raw)
    atomic_write_bytes(d / SIGNATURE_NAME, signing.sign(raw, world.store.key))
    return hashlib.sha256(data).hexdigest()


@pytest.mark.skipif(not _entry_knows_rollout(), reason="Entry.rollout comes with the relay side of issue 15")
def test_reconcile_holds_a_signed_rollout_build_until_the_relay_allows_it(
        tmp_path: Path, relay: ContractRelay, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole path: the signed manifest's entry carries a policy, the start-up style reconcile asks,
    is held (reported ``held``), and installs after the relay opens the wave (reported ``updated``)."""
    world = _world(tmp_path, relay.url, monkeypatch)
    try:
        build = _publish_with_policy(world, "nats", "v2", POLICY)
        agent = world.agent()
        world.server.reset()
        report = agent.reconcile()
        assert report.result("nats").action == "held" and report.ok and not report.retry
        assert not any(name.startswith("nats-server-") for name, _ in world.server.requests)
        assert relay.outcomes("nats") == ["held"] and relay.reports[0]["to"] == build
        assert "unknown build" in relay.reports[0]["error"]

        relay.allow("nats", build)
        report = agent.reconcile()
        assert report.result("nats").action == "updated" and world.sha("nats") == build
        assert relay.outcomes("nats") == ["held", "updated"]
    finally:
        close_world(world)


def test_reporter_and_gate_come_from_the_agent_config(tmp_path: Path, relay: ContractRelay,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    world = _world(tmp_path, relay.url, monkeypatch)
    try:
        agent = world.agent()
        assert isinstance(agent.reporter, Reporter)
        assert (agent.gate.relay, agent.gate.token) == (relay.url, TOKEN)
        assert (agent.reporter.url, agent.reporter.agent, agent.reporter.platform) == (
            f"{relay.url}/report", AGENT_ID, PLATFORM)
    finally:
        close_world(world)
