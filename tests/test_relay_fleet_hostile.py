"""The relay's fleet endpoints against hostile and unlucky input (found by a review, each test failed
before its fix): text that is no characters, an agent naming subsystems without end, a refused promote
that must change nothing, nesting past the recursion limit, a cross-site form riding the fleet page's
Basic login. The relay runs under its real threaded server on loopback
with a real SQLite fleet database and real signed manifests (tests/fleet_support.py)."""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
import requests

from sync_tools.config import Config
from sync_tools.relay.app import get_relay
from sync_tools.relay.fleet import MAX_AGENT_SUBSYSTEMS, Fleet, FleetStore
from sync_tools.relay.server import RelayServer
from tests.fleet_support import (
    AGENTS,
    OPERATOR,
    PLATFORM,
    Clock,
    fleet_relay,
    last_event,
    members,
    notify,
    operator,
    publish,
    publish_builds,
    rollout_of,
    token,
    wait_for,
)

POLICY = {"waves": [5, 25, 50, 100], "min_healthy": 1, "settle_seconds": 600, "max_failures": 1,
          "min_age_seconds": 0}


def _post_report(server: RelayServer, agent: str, body: dict[str, Any]) -> requests.Response:
    # json.dumps escapes a lone surrogate as \\udcff, as the agent's own reporter (json.dumps) does for
    # text decoded with errors="surrogateescape" (a file name that is not UTF-8, say)
    return requests.post(server.url + "/report", data=json.dumps(body).encode(), timeout=10,
                         headers={"Content-Type": "application/json", "Authorization": f"Bearer {token(agent)}"})


def _rolling_out(server: RelayServer, clock: Clock, policy: dict[str, Any]) -> str:
    """nats v2 released under *policy* and the relay told, once its rollout is there; returns the build."""
    build = publish(get_relay(server.app).config, "nats", "v2", rollout=policy, built=clock())
    notify(server)
    wait_for("the rollout", lambda: rollout_of(server))
    return build


def _report(agent: str, build: str | None, outcome: str, **extra: Any) -> dict[str, Any]:
    body = {"agent": agent, "subsystem": "nats", "platform": PLATFORM, "from": "d" * 64, "to": build,
            "version": "v2", "serial": 1, "outcome": outcome, "error": None, "times": {"health": 0.5},
            "patch": None}
    body.update(extra)
    return body


# ------------------------------------------------------------------------------------ POST /report


@pytest.mark.parametrize("field", ["error", "version"])
def test_a_report_with_a_lone_surrogate_is_a_clear_4xx_not_a_500_and_its_failure_is_not_lost(
        tmp_path: Path, field: str) -> None:
    """parse_report accepts any JSON string in ``error`` and ``version``; the stdlib json decodes
    ``\\udcff`` to a lone surrogate, which sqlite3 cannot encode (UnicodeEncodeError, not
    sqlite3.Error): the view answers a bare 500, and the rolled_back report of a wave-1 member is never
    recorded, so a bad build that should halt at max_failures=1 keeps rolling."""
    clock = Clock()
    with fleet_relay(tmp_path, clock) as server:
        build = _rolling_out(server, clock, POLICY)
        first = members(build, 5)[0]
        text = "health check failed: /srv/nats/\udcff.sock: no such file"
        body = _report(first, build, "rolled_back", error="health check failed")
        body[field] = text if field == "error" else "v2-\udcff"
        r = _post_report(server, first, body)
        assert r.headers.get("Content-Type") == "application/json", r.headers
        if field == "error":  # free text: kept with a replacement character, and the failure counts
            assert r.status_code == 202, r.text
            assert rollout_of(server)["state"] == "halted"
            stored = get_relay(server.app).fleet.fleet.store.reports(first)[0]["error"]
            assert stored == "health check failed: /srv/nats/?.sock: no such file"
        else:  # a version comes from a signed manifest: one that is no text is a malformed report
            assert (r.status_code, r.json()["error"]) == (400, "report: 'version' is malformed")


def test_an_agent_naming_new_subsystems_without_end_is_refused_past_a_bound(tmp_path: Path) -> None:
    """Reports are capped per agent (max_report_rows), but ``running`` keeps one row per (agent,
    subsystem) for good, each a section of GET /fleet: an agent that names a new subsystem in every
    report is refused (422, a reason) once it has MAX_AGENT_SUBSYSTEMS, and the rows stop there."""
    clock = Clock()
    with fleet_relay(tmp_path, clock, report_burst=200, report_rate=0.001, max_report_rows=5) as server:
        agent = AGENTS[0]
        answers = [_post_report(server, agent, _report(agent, None, "held", subsystem=f"bogus-{i:03d}"))
                   for i in range(MAX_AGENT_SUBSYSTEMS + 5)]
        assert [a.status_code for a in answers] == [202] * MAX_AGENT_SUBSYSTEMS + [422] * 5
        assert "already reports on 64 subsystems" in answers[-1].json()["error"]
        # a subsystem it already has is still taken
        assert _post_report(server, agent, _report(agent, None, "held", subsystem="bogus-000")).status_code == 202
        db = get_relay(server.app).fleet.fleet.store.path
        with sqlite3.connect(db) as conn:
            rows = conn.execute("SELECT COUNT(*) FROM running WHERE agent = ?", (agent,)).fetchone()[0]
            kept = conn.execute("SELECT COUNT(*) FROM reports WHERE agent = ?", (agent,)).fetchone()[0]
        assert (rows, kept) == (MAX_AGENT_SUBSYSTEMS, 5)
        assert len(operator(server, "GET", "/fleet").json()["subsystems"]) == MAX_AGENT_SUBSYSTEMS


# ------------------------------------------------------------------------------- operator actions


def _publish_two_platforms(config: Config, name: str, version: str, policy: dict[str, Any],
                           built: float) -> dict[str, str]:
    """One manifest entry with a linux/amd64 and a linux/arm64 build, both under *policy*: two
    current rollouts of one subsystem. Returns platform -> build."""
    builds = {"linux/amd64": secrets.token_hex(32), "linux/arm64": secrets.token_hex(32)}
    publish_builds(config, name, version, builds, rollout=policy, built=built)
    return builds


def _waves(server: RelayServer) -> dict[str, int]:
    r = operator(server, "GET", "/rollout/nats")
    assert r.status_code == 200, r.text
    return {x["platform"]: x["wave"] for x in r.json()["rollouts"]}


def test_a_promote_refused_409_leaves_every_rollout_as_it_was(tmp_path: Path) -> None:
    """POST /rollout/<sub>/promote without a build walks the subsystem's current rollouts (one per
    platform) and returns 409 at the first halted one, after it already opened the next wave of those
    before it: the operator is told "halted: resume it first" (nothing done), while linux/amd64 went to
    wave 2 with no release event (its new members are never told) and no timer."""
    clock = Clock()
    with fleet_relay(tmp_path, clock) as server:
        config = get_relay(server.app).config
        builds = _publish_two_platforms(config, "nats", "v2", POLICY, clock())
        notify(server)
        wait_for("both rollouts", lambda: len(_waves(server)) == 2)
        assert _waves(server) == {"linux/amd64": 1, "linux/arm64": 1}
        r = operator(server, "POST", "/rollout/nats/halt", json={"build": builds["linux/arm64"], "reason": "arm"})
        assert r.status_code == 200, r.text
        events_before = last_event(server)

        r = operator(server, "POST", "/rollout/nats/promote")
        after = _waves(server)
        if r.status_code == 409:
            assert after["linux/amd64"] == 1, (
                f"promote answered 409 ({r.json()['error']}) but the linux/amd64 rollout was moved to wave "
                f"{after['linux/amd64']} anyway, and {last_event(server) - events_before} release event(s) "
                "announced it")
        else:
            assert r.status_code == 200 and r.json()["event"] is not None and last_event(server) > events_before


def test_a_deeply_nested_action_body_is_a_400_not_a_500(tmp_path: Path) -> None:
    """rollout_action parses its body with json.loads and catches ValueError only: nesting deeper than
    the interpreter's recursion limit (2,000 brackets fit in the 4 KiB cap) raises RecursionError, a 500."""
    clock = Clock()
    with fleet_relay(tmp_path, clock) as server:
        r = requests.post(server.url + "/rollout/nats/halt", data=b"[" * 2000, timeout=10,
                          headers={"Authorization": f"Bearer {OPERATOR}", "Content-Type": "application/json"})
        assert r.status_code == 400, f"{r.status_code}: {r.text[:200]!r}"


def test_a_halt_reason_with_a_lone_surrogate_is_a_400_not_a_500(tmp_path: Path) -> None:
    """The halt reason is any JSON string up to 500 characters; a lone surrogate (``\\udcff``) reaches
    sqlite3 (UnicodeEncodeError) and the operator gets a 500 page instead of a reason."""
    clock = Clock()
    with fleet_relay(tmp_path, clock) as server:
        _rolling_out(server, clock, POLICY)
        r = requests.post(server.url + "/rollout/nats/halt", data=json.dumps({"reason": "bad \udcff"}).encode(),
                          timeout=10, headers={"Authorization": f"Bearer {OPERATOR}",
                                               "Content-Type": "application/json"})
        assert r.status_code < 500, f"{r.status_code}: {r.text[:200]!r}"


def test_a_cross_site_form_post_riding_the_fleet_pages_basic_login_cannot_resume_or_promote(tmp_path: Path) -> None:
    """The fleet page logs a person in with HTTP Basic (the operator token as the password), and the
    browser then sends those cached credentials with every request to the relay's origin, cross-site
    form submissions included. The rollout actions accept the same Basic credentials, any Content-Type
    and an empty body (every current rollout of the subsystem), and check no Origin: a page on any
    other site can auto-submit ``<form method=post action=https://relay/rollout/nats/resume>`` and
    then ``.../promote`` and push a halted bad build to the next wave."""
    clock = Clock()
    policy = {**POLICY, "max_failures": 1}
    with fleet_relay(tmp_path, clock) as server:
        build = _rolling_out(server, clock, policy)
        first = members(build, 5)[0]
        assert _post_report(server, first, _report(first, build, "rolled_back", error="exit 1")).status_code == 202
        assert rollout_of(server)["state"] == "halted"

        # what a browser sends for a cross-site <form method="post"> with no fields, after the operator
        # opened the fleet page in it (Basic credentials cached for the relay's origin)
        browser = {"Origin": "https://attacker.example", "Referer": "https://attacker.example/",
                   "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate",
                   "Content-Type": "application/x-www-form-urlencoded"}
        codes = []
        for action in ("resume", "promote"):
            r = requests.post(f"{server.url}/rollout/nats/{action}", data=b"", headers=browser,
                              auth=("operator", OPERATOR), timeout=10)
            codes.append(r.status_code)
        status = rollout_of(server)
        assert (status["state"], status["wave"]) == ("halted", 1), (
            f"cross-site form posts answered {codes}: the halted build is now {status['state']} at wave "
            f"{status['wave']}")


# ------------------------------------------------------------------------------------ SSE streams


def test_a_stream_whose_last_seen_cannot_be_written_goes_on_and_its_agent_is_not_left_connected(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A stream's connect and close write the agent's last-seen time. When the fleet database cannot
    take a write (here made immutable, as a full or read-only disk would refuse it), the raise came
    before the stream's ``finally``: the stream failed and its agent stayed "connected" in that
    process for good. Now the bookkeeping is logged (once a minute) and the stream goes on."""
    db = tmp_path / "fleet.db"
    store = FleetStore(db)
    Fleet(store).connected("agent-1")  # the agent is known
    store.close()
    if subprocess.run(["chattr", "+i", str(db)], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        store = FleetStore(db)
        fleet = Fleet(store)
        with caplog.at_level(logging.ERROR, logger="sync_tools.relay.fleet"):
            fleet.connected("agent-1")
            assert fleet.live([]) == {"agent-1"}  # its open streams only
            fleet.connected("agent-1")  # a second stream of the same agent
            fleet.disconnected("agent-1")
            fleet.disconnected("agent-1")
            assert fleet.live([]) == set()
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and lines[0].startswith("cannot record that agent agent-1 connected or left: "), lines
        store.close()
    finally:
        subprocess.run(["chattr", "-i", str(db)], capture_output=True, timeout=30)
