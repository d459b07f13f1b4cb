"""Staged rollouts and agent reports end to end: the real relay under a real WSGI server on loopback,
real SQLite, real signed manifests in a local store, and 22 simulated agents that follow the HTTP
contract (GET /rollout before installing, POST /report after)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from sync_tools.cli import cli
from sync_tools.relay.app import get_relay
from tests.fleet_support import (
    AGENTS,
    Agent,
    Clock,
    fleet_relay,
    last_event,
    members,
    notify,
    operator,
    publish,
    relay_env,
    rollout_of,
    token,
    wait_for,
)

POLICY = {"waves": [5, 25, 50, 100], "min_healthy": 1, "settle_seconds": 60, "max_failures": 2,
          "min_age_seconds": 0}


def _agents(server, session: requests.Session) -> dict[str, Agent]:  # type: ignore[no-untyped-def]
    return {a: Agent(server.url, a, session) for a in AGENTS}


def _allowed(agents: dict[str, Agent], build: str) -> set[str]:
    return {a for a, ag in agents.items() if ag.ask(build)["allowed"]}


def _events(server, after: int) -> list[dict]:  # type: ignore[no-untyped-def]
    return [e.data for e in get_relay(server.app).outbox.events_since(after)]


def test_a_healthy_build_goes_wave_by_wave(tmp_path: Path) -> None:
    clock = Clock()
    session = requests.Session()
    with fleet_relay(tmp_path, clock) as server:
        config = get_relay(server.app).config
        old = publish(config, "nats", "v1", rollout=None, built=clock())
        notify(server)
        wait_for("the first release event", lambda: last_event(server) >= 1)
        agents = _agents(server, session)
        # at start every agent says what it runs (the old build, released without a rollout: all allowed)
        assert all(ag.ask(old)["allowed"] for ag in agents.values())
        for ag in agents.values():
            assert ag.report("running", old).status_code == 202

        build = publish(config, "nats", "v2", rollout=POLICY, built=clock())
        before = last_event(server)
        notify(server)
        wait_for("the release event", lambda: last_event(server) > before)
        # the first wave opened before the release event went out, so that one event announces it
        first = rollout_of(server)
        assert (first["state"], first["wave"], first["build"], first["fleet"]) == ("active", 1, build, 22)
        assert _events(server, before)[-1]["subsystems"] == ["nats"]

        expected_sizes = {1: 2, 2: 6, 3: 11, 4: 22}  # max(1, ceil(p * 22 / 100)) for 5, 25, 50, 100 %
        for wave, percent in enumerate(POLICY["waves"], 1):
            allowed = _allowed(agents, build)
            assert allowed == set(members(build, percent)), f"wave {wave}"
            assert len(allowed) == expected_sizes[wave]
            # those not allowed are told why, and which wave they are in
            held = next(ag for a, ag in agents.items() if a not in allowed) if wave < 4 else None
            if held is not None:
                answer = held.ask(build)
                assert answer["state"] == "active" and answer["wave"] == wave and answer["agent_wave"] > wave
                assert held.report("held", build, error=answer["reason"]).status_code == 202
            for a in sorted(allowed):
                if agents[a].runs != build:
                    assert agents[a].report("updated", build, version="v2").status_code == 202
            status = rollout_of(server)
            assert status["wave"] == wave and status["healthy"] >= 1
            if wave == 4:
                break
            # healthy; the next wave waits for the settle time, then the timer in the worker opens it
            assert status["next"] is not None and status["state"] == "active"
            before = last_event(server)
            assert _allowed(agents, build) == allowed  # nothing moves before the settle time
            clock.advance(61)
            wait_for(f"wave {wave + 1}", lambda w=wave: rollout_of(server)["wave"] == w + 1)
            # the opening was fanned out as a normal release event naming the subsystem
            wait_for("the wave's release event", lambda b=before: last_event(server) > b)
            event = _events(server, before)[-1]
            assert event["type"] == "release.updated" and event["subsystems"] == ["nats"]
        clock.advance(61)
        wait_for("completion", lambda: rollout_of(server)["state"] == "complete")
        assert _allowed(agents, build) == set(AGENTS)

        fleet = operator(server, "GET", "/fleet").json()
        nats = fleet["subsystems"]["nats"]
        assert nats["builds"][0] == {"sha256": build, "version": "v2", "platform": "linux/amd64",
                                     "agents": 22, "known": True, "current": True}
        assert nats["rollout"]["state"] == "complete" and nats["rollout"]["waves"] == [5, 25, 50, 100]
        assert nats["rollout"]["failed"] == 0
        assert [a["id"] for a in fleet["agents"]] == sorted(AGENTS)
        assert not any(a["silent"] for a in fleet["agents"])
        assert fleet["agents"][0]["subsystems"]["nats"]["sha256"] == build


def test_failures_halt_the_rollout_and_a_new_build_rolls_out(tmp_path: Path) -> None:
    clock = Clock()
    session = requests.Session()
    policy = {**POLICY, "waves": [10, 50, 100], "settle_seconds": 0, "min_healthy": 3}
    with fleet_relay(tmp_path, clock) as server:
        config = get_relay(server.app).config
        agents = _agents(server, session)
        bad = publish(config, "nats", "v2", rollout=policy, built=clock())
        notify(server)
        wait_for("the rollout", lambda: rollout_of(server))
        wave1 = members(bad, 10)
        assert _allowed(agents, bad) == set(wave1) and len(wave1) == 3
        # one installs it and keeps it, two fail their health check and roll back: max_failures is 2
        keeps, fails = wave1[0], wave1[1:]
        assert agents[keeps].report("updated", bad, version="v2").status_code == 202
        for a in fails:
            assert agents[a].report("rolled_back", bad, error="health check failed: exit 1").status_code == 202
        status = rollout_of(server)
        assert status["state"] == "halted" and status["failed"] == 2 and "max_failures 2" in status["reason"]
        # no agent that does not run it may install it; the one that runs it is not told to drop it
        for a, ag in agents.items():
            answer = ag.ask(bad)
            assert answer["allowed"] is (a == keeps), a
            assert answer["state"] == "halted"
        # the relay says so in /health, /metrics, relay --status and the fleet view
        health = requests.get(server.url + "/health", timeout=5).json()
        assert [(h["subsystem"], h["build"]) for h in health["rollouts_halted"]] == [("nats", bad)]
        metrics = requests.get(server.url + "/metrics", timeout=5).text
        assert f'sync_tools_relay_rollout_halted{{build="{bad[:12]}",subsystem="nats",version="v2"}} 1.0' in metrics
        assert "sync_tools_relay_rollouts_halted 1.0" in metrics
        assert 'sync_tools_relay_reports_total{outcome="rolled_back",result="recorded"} 2.0' in metrics
        out = CliRunner().invoke(cli, ["relay", "--status", "--config", str(tmp_path / "sync-tools.yaml")],
                                 env=relay_env(tmp_path), catch_exceptions=False)
        assert out.exit_code == 0, out.output
        assert [h["build"] for h in json.loads(out.output)["rollouts_halted"]] == [bad]
        fleet = operator(server, "GET", "/fleet").json()
        assert [h["build"] for h in fleet["halted"]] == [bad]
        failed = {a["id"] for a in fleet["agents"] if a["subsystems"].get("nats", {}).get("outcome") == "rolled_back"}
        assert failed == set(fails)
        # the timer has nothing to open while halted: the wave does not move, whatever the clock says
        clock.advance(3600)
        assert rollout_of(server)["wave"] == 1 and _allowed(agents, bad) == {keeps}

        # the fix is released: a new build, a new rollout, its own first wave
        good = publish(config, "nats", "v3", rollout=policy, built=clock())
        notify(server)
        wait_for("the new rollout", lambda: (rollout_of(server) or {}).get("build") == good)
        assert rollout_of(server)["state"] == "active"
        assert _allowed(agents, good) == set(members(good, 10))
        for a in members(good, 10):
            assert agents[a].report("updated", good, version="v3").status_code == 202
        wait_for("wave 2 of the new build", lambda: rollout_of(server)["wave"] == 2)
        # the halted build is no longer current: /health names no halted rollout
        assert requests.get(server.url + "/health", timeout=5).json()["rollouts_halted"] == []


def test_operator_promote_halt_resume(tmp_path: Path) -> None:
    clock = Clock()
    session = requests.Session()
    policy = {**POLICY, "waves": [5, 50, 100], "settle_seconds": 600, "max_failures": 1}
    with fleet_relay(tmp_path, clock) as server:
        config = get_relay(server.app).config
        agents = _agents(server, session)
        build = publish(config, "nats", "v2", rollout=policy, built=clock())
        notify(server)
        wait_for("the rollout", lambda: rollout_of(server))
        # only the operator token moves a rollout
        for headers in ({}, {"Authorization": f"Bearer {token(AGENTS[0])}"}, {"Authorization": "Bearer nope"}):
            r = requests.post(server.url + "/rollout/nats/halt", headers=headers, timeout=5)
            assert r.status_code == 401
        assert operator(server, "POST", "/rollout/nats/explode").status_code == 404
        assert operator(server, "POST", "/rollout/nope/halt").status_code == 404
        assert operator(server, "POST", "/rollout/nats/halt", data=b"[1").status_code == 400

        r = operator(server, "POST", "/rollout/nats/halt", json={"reason": "looks wrong on the dashboards"})
        assert r.status_code == 200
        assert r.json()["rollouts"][0]["state"] == "halted"
        assert "looks wrong on the dashboards" in r.json()["rollouts"][0]["reason"]
        assert _allowed(agents, build) == set()
        assert operator(server, "POST", "/rollout/nats/promote").status_code == 409  # resume first

        before = last_event(server)
        r = operator(server, "POST", "/rollout/nats/resume")
        assert r.status_code == 200 and r.json()["rollouts"][0]["state"] == "active"
        assert r.json()["event"] > before  # held agents are told to ask again
        assert _allowed(agents, build) == set(members(build, 5))

        # promote opens the next wave now: no healthy report, no settle time
        r = operator(server, "POST", "/rollout/nats/promote", json={"build": build})
        assert r.status_code == 200 and r.json()["rollouts"][0]["wave"] == 2
        assert _allowed(agents, build) == set(members(build, 50))

        # a failure halts it (max_failures 1); a resume forgives it and the rollout goes on
        victim = members(build, 50)[-1]
        agents[victim].report("failed", build, error="download: sha256 mismatch")
        assert rollout_of(server)["state"] == "halted"
        r = operator(server, "POST", "/rollout/nats/resume")
        assert r.json()["rollouts"][0]["state"] == "active" and r.json()["rollouts"][0]["failed"] == 0
        r = operator(server, "POST", "/rollout/nats/promote")
        assert r.json()["rollouts"][0]["wave"] == 3
        assert _allowed(agents, build) == set(AGENTS)


def test_state_survives_a_relay_restart(tmp_path: Path) -> None:
    clock = Clock()
    session = requests.Session()
    policy = {**POLICY, "waves": [10, 100], "settle_seconds": 300}
    with fleet_relay(tmp_path, clock) as server:
        config = get_relay(server.app).config
        build = publish(config, "nats", "v2", rollout=policy, built=clock())
        notify(server)
        wait_for("the rollout", lambda: rollout_of(server))
        agents = _agents(server, session)
        wave1 = members(build, 10)
        for a in wave1:
            assert agents[a].report("updated", build, version="v2").status_code == 202
        assert agents[AGENTS[0]].report("held", build).status_code == 202
        before = rollout_of(server)
        assert before["healthy"] == len(wave1) and before["next"] is not None
    # a new process: the rollout, its reports, the agents' last-seen times and the settle timer (a
    # deferred job in the outbox) are all still there
    with fleet_relay(tmp_path, clock) as server:
        after = rollout_of(server)
        assert {k: after[k] for k in ("build", "state", "wave", "healthy", "next", "opened")} == {
            k: before[k] for k in ("build", "state", "wave", "healthy", "next", "opened")}
        agents = _agents(server, session)
        assert _allowed(agents, build) == set(wave1)
        fleet = operator(server, "GET", "/fleet").json()
        seen = {a["id"]: a for a in fleet["agents"]}
        assert all(seen[a]["last_report"] is not None for a in wave1)
        clock.advance(301)
        wait_for("the last wave, opened by the timer set before the restart",
                 lambda: rollout_of(server)["wave"] == 2)
        assert _allowed(agents, build) == set(AGENTS)


def test_min_release_age(tmp_path: Path) -> None:
    clock = Clock()
    session = requests.Session()
    policy = {**POLICY, "waves": [50, 100], "min_age_seconds": 3600}
    with fleet_relay(tmp_path, clock) as server:
        config = get_relay(server.app).config
        build = publish(config, "nats", "v2", rollout=policy, built=clock())
        notify(server)
        status = wait_for("the rollout", lambda: rollout_of(server))
        assert (status["state"], status["wave"]) == ("waiting", 0)
        agents = _agents(server, session)
        answer = agents[AGENTS[0]].ask(build)
        assert answer["allowed"] is False and answer["state"] == "waiting" and "min_age_seconds" in answer["reason"]
        assert _allowed(agents, build) == set()
        before = last_event(server)
        clock.advance(3601)
        wait_for("the first wave", lambda: rollout_of(server)["wave"] == 1)
        wait_for("its release event", lambda: last_event(server) > before)
        assert _allowed(agents, build) == set(members(build, 50))


def test_reports_are_untrusted(tmp_path: Path) -> None:
    clock = Clock()
    session = requests.Session()
    with fleet_relay(tmp_path, clock, report_burst=40, report_rate=0.001, max_report_rows=5) as server:
        config = get_relay(server.app).config
        build = publish(config, "nats", "v2", rollout={**POLICY, "waves": [5, 100]}, built=clock())
        notify(server)
        wait_for("the rollout", lambda: rollout_of(server))
        url = server.url + "/report"
        a0, a1 = AGENTS[0], AGENTS[1]
        good = {"agent": a0, "subsystem": "nats", "platform": "linux/amd64", "from": None, "to": build,
                "version": "v2", "serial": 1, "outcome": "held", "error": None, "times": {}, "patch": None}

        def post(body: object, tok: str | None = token(a0), raw: bytes | None = None) -> requests.Response:
            headers = {"Content-Type": "application/json"}
            if tok is not None:
                headers["Authorization"] = f"Bearer {tok}"
            data = raw if raw is not None else json.dumps(body).encode()
            return session.post(url, data=data, headers=headers, timeout=5)

        # unknown token, no token, a bare token (SSE only), the operator's, another agent's id: 401
        assert post(good, tok=None).status_code == 401
        assert post(good, tok="not-a-token").status_code == 401
        assert post(good, tok="bare-sse-token").status_code == 401
        assert post(good, tok="operator-token-0123456789").status_code == 401
        r = post({**good, "agent": a1})
        assert r.status_code == 401 and "not the id this token belongs to" in r.json()["error"]
        assert session.get(f"{server.url}/rollout/nats/{build}", timeout=5).status_code == 401
        # malformed: 400 with one clear line; oversized: 413
        for bad in ({**good, "outcome": "exploded"}, {**good, "to": "ABC"}, {**good, "subsystem": "../x"},
                    {**good, "serial": -1}, {**good, "times": {"download": "fast"}}, {**good, "agent": None}, [good]):
            r = post(bad)
            assert r.status_code == 400, bad
            assert "\n" not in r.json()["error"]
        assert post(None, raw=b"{not json").status_code == 400
        assert post(None, raw=b'{"agent": "' + b"x" * 20000 + b'"}').status_code == 413
        assert session.get(f"{server.url}/rollout/nats/not-a-sha", headers={"Authorization": f"Bearer {token(a0)}"},
                           timeout=5).status_code == 400

        # a report naming a build no verified manifest named is recorded as such, and never counts
        first = next(a for a in members(build, 5) if a != a0)  # a0's own counts are checked below
        stranger = "f" * 64
        r = Agent(server.url, first, session).report("updated", stranger, version="v9")
        assert r.status_code == 202 and r.json() == {"status": "recorded", "known": False}
        status = rollout_of(server)
        assert (status["wave"], status["healthy"], status["next"]) == (1, 0, None)
        fleet = operator(server, "GET", "/fleet").json()
        builds = fleet["subsystems"]["nats"]["builds"]
        assert {"sha256": stranger, "version": "v9", "platform": None, "agents": 1, "known": False,
                "current": False} in builds

        # a flood from one agent is refused with 429 (others are not affected), and its rows are bounded
        codes = [post(good).status_code for _ in range(45)]
        assert 429 in codes and codes.count(202) <= 40
        r = post(good)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert Agent(server.url, a1, session).report("held", build).status_code == 202
        db = get_relay(server.app).fleet.fleet.store.path
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT COUNT(*) FROM reports WHERE agent = ?", (a0,)).fetchone()[0] == 5
            total = conn.execute("SELECT reports FROM agents WHERE id = ?", (a0,)).fetchone()[0]
        assert total == codes.count(202)


@pytest.mark.parametrize("tokens, message", [
    ("a=tok1,a=tok2", "agent 'a' is given two different tokens"),
    ("a=same,b=same", "share a token"),
    ("a=", "empty token"),
])
def test_token_map_errors(tmp_path: Path, tokens: str, message: str) -> None:
    from sync_tools.errors import ConfigError
    from sync_tools.relay.settings import load_settings
    from tests.relay_support import env, write_config

    config = write_config(tmp_path)
    with pytest.raises(ConfigError, match=message):
        load_settings(config, env(tmp_path, SYNC_TOOLS_AGENT_TOKENS=tokens))


def test_tokens_file_and_bare_tokens(tmp_path: Path) -> None:
    from sync_tools.errors import ConfigError
    from sync_tools.relay.settings import load_settings
    from tests.relay_support import env, write_config

    config = write_config(tmp_path)
    f = tmp_path / "tokens"
    f.write_text("# fleet\nhost-1=abc123\n\n host-2 = def456 \n")
    s = load_settings(config, env(tmp_path, SYNC_TOOLS_AGENT_TOKENS="bare==,c=ghi789",
                                  SYNC_TOOLS_AGENT_TOKENS_FILE=str(f)))
    assert sorted(a for a, _ in s.agent_ids.values()) == ["c", "host-1", "host-2"]
    # every token still opens the SSE stream; a base64 token ending in = stays bare
    assert set(s.agent_tokens) == {b"bare==", b"ghi789", b"abc123", b"def456"}
    f.write_text("host-1=abc\nno token here\n")
    with pytest.raises(ConfigError, match=r"tokens:2: expected ID=TOKEN"):
        load_settings(config, env(tmp_path, SYNC_TOOLS_AGENT_TOKENS_FILE=str(f)))
