"""The staged-rollout core, the relay's fleet judgement and the policy parser (found by a review; each
test failed before its fix): wave members kept as the fleet grows, a first wave of silent machines, a
rolled-back agent counted healthy, a wave never judged again once its member fell silent, huge whole
numbers in a policy. The real policy core, the real relay
Fleet over a real SQLite FleetStore, real (verified-shape) manifests; no mocks of the code under test."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as hst

from sync_tools.errors import ManifestError
from sync_tools.manifest import Asset, Entry, Manifest, format_time, parse_manifest
from sync_tools.relay.fleet import Fleet, FleetStore, Report
from sync_tools.rollout import PolicyError, RolloutPolicy, placed, rank_key, ranked, wave_of, wave_size

PLATFORM = "linux/amd64"
T0 = 1_800_000_000.0


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _fleet(tmp_path: Path, clock: Clock) -> Fleet:
    return Fleet(FleetStore(tmp_path / "relay.fleet.db"), now=clock)


def _manifest(build: str, policy: dict[str, Any], built: float, serial: int = 1) -> Manifest:
    asset = Asset(name="nats-linux-amd64.tar.gz", size=10, sha256="a" * 64, binary_sha256=build)
    entry = Entry(version="v2", commit="c" * 40, built=format_time(datetime.fromtimestamp(built, UTC)),
                  assets=MappingProxyType({PLATFORM: asset}), rollout=RolloutPolicy.from_json(policy))
    return Manifest(serial=serial, created="2027-01-01T00:00:00Z", expires="2027-12-01T00:00:00Z",
                    subsystems=MappingProxyType({"nats": entry}))


def _report(agent: str, build: str, outcome: str) -> Report:
    return Report(agent=agent, subsystem="nats", outcome=outcome, platform=PLATFORM, from_sha="d" * 64,
                  to_sha=build, version="v2", serial=1)


def _ahead_of(build: str, agent: str, prefix: str = "new") -> str:
    """An agent id that ranks before *agent* in *build*'s order."""
    for i in range(10_000):
        cand = f"{prefix}-{i:04d}"
        if rank_key(build, cand) < rank_key(build, agent):
            return cand
    raise AssertionError("no id found")


BUILD = "ab" * 32
HOSTS = [f"host-{i:02d}" for i in range(10)]
# 5 % of 10 agents (and of 11) is one agent: wave 1 holds exactly one machine
POLICY = {"waves": [5, 100], "min_healthy": 1, "settle_seconds": 60, "max_failures": 2, "min_age_seconds": 0}


# ------------------------------------------------------------------------------- membership stability


def _rolling_out(tmp_path: Path, clock: Clock) -> tuple[Fleet, str]:
    """HOSTS known and live, BUILD's rollout created with wave 1 open; its first-ranked agent, allowed."""
    fleet = _fleet(tmp_path, clock)
    fleet.store.register_agents(HOSTS, clock())
    for h in HOSTS:
        fleet.store.touch(h, clock())
    fleet.on_manifest(_manifest(BUILD, POLICY, built=clock() - 10))
    first = ranked(BUILD, HOSTS)[0]
    assert fleet.decide(first, "nats", BUILD).allowed
    return fleet, first


def test_a_wave_one_agent_is_refused_after_one_new_agent_joins_the_fleet(tmp_path: Path) -> None:
    """Docs: "The order is stable for a build (a machine allowed in wave 1 stays allowed)". The wave's
    size does not change (5 % of 10 and of 11 agents is 1), yet one new machine asking the relay once
    pushes the wave-1 agent out: it was allowed, its download failed (say), it asks again, refused."""
    clock = Clock()
    fleet, first = _rolling_out(tmp_path, clock)
    newcomer = _ahead_of(BUILD, first)
    clock.t += 1
    fleet.decide(newcomer, "nats", BUILD)  # a new machine comes up and asks (the relay now knows it)
    clock.t += 1
    d = fleet.decide(first, "nats", BUILD)
    assert d.allowed, f"the wave-1 agent {first} was allowed, then refused once the fleet grew: {d.reason}"


def test_a_healthy_wave_one_stalls_forever_once_a_token_for_an_unseen_machine_is_added(tmp_path: Path) -> None:
    """The wave-1 agent installed the build and reported healthy. Then an operator adds one token
    to the token map (a machine not provisioned yet). Its id ranks first, so it *is* wave 1 now; it is
    silent, so the wave's evidence falls back to "the waves open so far", i.e. to itself: the healthy
    report already received no longer counts and a good build never reaches wave 2 without an operator."""
    clock = Clock()
    fleet, first = _rolling_out(tmp_path, clock)
    clock.t += 5
    fleet.record(_report(first, BUILD, "updated"))
    fleet.store.register_agents([_ahead_of(BUILD, first, "spare")], clock())  # a token added, machine unseen
    for _ in range(24):  # a day passes; the live agents keep asking (and stay live)
        clock.t += 3600
        for h in HOSTS:
            fleet.decide(h, "nats", BUILD)
        judged, _ = fleet.advance("nats", BUILD)
    assert judged is not None
    assert judged.status.wave == 2, f"stalled: {judged.status.reason}"


@settings(max_examples=200, deadline=None)
@given(n=hst.integers(min_value=1, max_value=60), seed=hst.integers(min_value=0, max_value=10**6),
       p=hst.sampled_from([1, 5, 10, 25, 50]))
def test_property_wave_one_members_stay_in_wave_one_while_its_size_is_unchanged(n: int, seed: int, p: int) -> None:
    """The brief's rule: an agent in wave 1 stays in it as the fleet grows. Agents known when wave 1
    opened (t=1) keep their places whoever joins after it (t=2), ranked ahead or not."""
    build = f"{seed:064x}"
    fleet = [f"a{i}" for i in range(n)]
    grown = [*fleet, f"new-{seed}"]
    joined = {**dict.fromkeys(fleet, 0.0), f"new-{seed}": 2.0}
    before, sizes_before = placed(build, fleet, (p, 100), (1.0,), joined)
    after, sizes_after = placed(build, grown, (p, 100), (1.0,), joined)
    assert sizes_before[0] == sizes_after[0] == wave_size(p, n)
    assert before[: sizes_before[0]] == after[: sizes_after[0]]
    for agent in before[: sizes_before[0]]:
        assert wave_of(after, (p, 100), agent, sizes_after) == 1, (agent, before[:3], after[:3])


# --------------------------------------------------------------------------------- silent wave 1


def test_a_first_wave_of_only_silent_machines_stalls_a_good_build_forever(tmp_path: Path) -> None:
    """Docs: "Silent machines do not stall a rollout". A fleet of 10 whose first-ranked machine for
    this build is a token that never showed up (decommissioned, not provisioned yet): wave 1 is that
    one machine; the other nine are live and ask all day; nothing ever opens wave 2."""
    clock = Clock()
    fleet = _fleet(tmp_path, clock)
    live = HOSTS[:9]
    dead = _ahead_of(BUILD, ranked(BUILD, live)[0], "gone")
    fleet.store.register_agents([*live, dead], clock())
    for h in live:
        fleet.store.touch(h, clock())
    fleet.on_manifest(_manifest(BUILD, {**POLICY, "settle_seconds": 0}, built=clock() - 10))
    assert ranked(BUILD, [*live, dead])[0] == dead
    allowed: set[str] = set()
    for _ in range(48):  # two days; every live agent asks every hour
        clock.t += 3600
        for h in live:
            if fleet.decide(h, "nats", BUILD).allowed:
                allowed.add(h)
        judged, _ = fleet.advance("nats", BUILD)
    assert judged is not None
    assert allowed, f"no live agent was ever allowed the build in two days: {judged.status.reason}"


# ------------------------------------------------------------------------------- healthy then failed


def test_an_agent_that_rolled_back_still_counts_as_the_healthy_report_that_opens_the_next_wave(
        tmp_path: Path) -> None:
    """Docs: "Each agent counts once per build". An agent whose health check passed ("updated") and
    which then rolled back (its service died a few seconds later, the e2e's bad build) is counted both
    as a failure and as the wave's healthy report: with max_failures 2 the next wave opens on the word
    of an agent that no longer runs the build, with not a single healthy agent in the fleet."""
    clock = Clock()
    fleet = _fleet(tmp_path, clock)
    agents = HOSTS[:4]
    fleet.store.register_agents(agents, clock())
    for h in agents:
        fleet.store.touch(h, clock())
    policy = {"waves": [25, 100], "min_healthy": 1, "settle_seconds": 60, "max_failures": 2, "min_age_seconds": 0}
    fleet.on_manifest(_manifest(BUILD, policy, built=clock() - 10))
    first = ranked(BUILD, agents)[0]
    assert fleet.decide(first, "nats", BUILD).allowed
    clock.t += 5
    fleet.record(_report(first, BUILD, "updated"))
    clock.t += 5
    fleet.record(_report(first, BUILD, "rolled_back"))
    clock.t += 120
    judged, opened = fleet.advance("nats", BUILD)
    assert judged is not None
    assert opened == 0 and judged.status.wave == 1, (
        f"wave {judged.status.wave} opened with healthy={judged.status.healthy} although the only agent "
        f"that reported healthy rolled back ({judged.status.reason})")


# ------------------------------------------------------------------------------------ policy parser


@pytest.mark.parametrize("key", ["min_healthy", "max_failures"])
def test_a_huge_whole_number_is_a_policy_error_not_an_overflow(key: str) -> None:
    """JSON (and YAML) carry integers of any size; float() of 10**400 raises OverflowError, which is
    no PolicyError/ManifestError: the parser does not refuse the policy with a clear error."""
    with pytest.raises(PolicyError) as e:
        RolloutPolicy.from_json({key: 10**400})
    assert e.value.key == key


def test_a_manifest_with_a_huge_whole_number_in_its_policy_is_a_manifest_error() -> None:
    entry = {"version": "v1", "commit": "c" * 40, "built": "2026-11-24T00:00:00Z",
             "assets": {PLATFORM: {"name": "x-linux-amd64.tar.gz", "size": 1, "sha256": "a" * 64,
                                   "binary_sha256": BUILD}},
             "rollout": {"waves": [10, 100], "max_failures": 10**400}}
    data = json.dumps({"schema": 1, "serial": 3, "created": "2026-11-24T00:00:00Z",
                       "expires": "2026-12-24T00:00:00Z", "subsystems": {"nats": entry}}).encode()
    with pytest.raises(ManifestError):
        parse_manifest(data)


# ------------------------------------------------------------- a member going silent: nobody re-judges


def test_a_wave_whose_only_new_member_goes_silent_is_never_reopened_by_the_relay(tmp_path: Path) -> None:
    """Docs: "Silent machines do not stall a rollout ... A wave none of whose new members is live ...
    still needs one healthy report from the waves open so far". The core agrees (it says the next wave
    is due once the member is silent), but the relay only re-judges a rollout on a report, an operator
    action or a timer, and a wave waiting for reports sets no timer (``due`` is None): when the one
    new member of wave 2 dies right after its wave opened, wave 3 is "due" for ever and never opens.
    Real relay under its real server, real SQLite, signed manifests (tests/fleet_support.py)."""
    import requests

    from sync_tools.relay.app import get_relay
    from tests.fleet_support import (
        AGENTS,
        Agent,
        fleet_relay,
        last_event,
        members,
        notify,
        publish,
        rollout_of,
        wait_for,
    )
    from tests.fleet_support import Clock as RelayClock

    policy = {"waves": [5, 10, 100], "min_healthy": 1, "settle_seconds": 0, "max_failures": 2,
              "min_age_seconds": 0}  # of 22 agents: 2, 3, 22 (wave 2 adds exactly one machine)
    clock = RelayClock()
    session = requests.Session()
    with fleet_relay(tmp_path, clock, silent_after=600.0) as server:
        config = get_relay(server.app).config
        agents = {a: Agent(server.url, a, session) for a in AGENTS}
        old = publish(config, "nats", "v1", rollout=None, built=clock())
        notify(server)
        wait_for("the first release event", lambda: last_event(server) >= 1)
        for ag in agents.values():
            assert ag.ask(old)["allowed"]
            assert ag.report("running", old).status_code == 202
        build = publish(config, "nats", "v2", rollout=policy, built=clock())
        notify(server)
        wait_for("wave 1", lambda: (rollout_of(server) or {}).get("build") == build)
        wave1 = members(build, 5)
        wave2_new = [a for a in members(build, 10) if a not in wave1]
        assert len(wave1) == 2 and len(wave2_new) == 1
        for a in wave1:
            assert agents[a].ask(build)["allowed"]
            assert agents[a].report("updated", build, version="v2").status_code == 202
        wait_for("wave 2", lambda: rollout_of(server)["wave"] == 2)
        # wave 2's event: every agent reconciles and asks; the wave-3 agents are held and say so;
        # the one new member of wave 2 is allowed, and its machine dies before it installs
        for ag in agents.values():
            answer = ag.ask(build)
            if not answer["allowed"]:
                assert ag.report("held", build, error=answer["reason"]).status_code == 202
        assert rollout_of(server)["wave"] == 2
        before = last_event(server)
        clock.advance(600.0 + 120.0)  # the dead member is silent now; nothing else happens
        try:
            wait_for("wave 3 once wave 2's only new member is silent",
                     lambda: rollout_of(server)["wave"] == 3, timeout=6.0)
        except AssertionError:
            status = rollout_of(server)
            raise AssertionError(f"stalled at wave {status['wave']}: {status['reason']!r}; "
                                 f"events since: {last_event(server) - before}") from None
