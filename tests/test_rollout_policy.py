"""The rollout policy (manifest and config) and the pure state machine that judges a rollout."""

from __future__ import annotations

import json
from pathlib import Path
from types import MappingProxyType

import pytest

from sync_tools.config import load_config
from sync_tools.errors import ConfigError, ManifestError
from sync_tools.manifest import Asset, Entry, Manifest, parse_manifest
from sync_tools.rollout import (
    ACTIVE,
    COMPLETE,
    HALTED,
    WAITING,
    PolicyError,
    RolloutPolicy,
    decide,
    evaluate,
    ranked,
    wave_of,
    wave_size,
)

BUILD = "ab" * 32
OTHER = "cd" * 32
AGENTS = [f"agent-{i:02d}" for i in range(20)]


def test_policy_round_trips_and_defaults() -> None:
    p = RolloutPolicy.from_json({"waves": [1, 10, 50, 100], "min_healthy": 2, "settle_seconds": 60,
                                 "max_failures": 1, "min_age_seconds": 3600})
    assert p.waves == (1, 10, 50, 100) and p.min_healthy == 2 and p.min_age_seconds == 3600.0
    assert RolloutPolicy.from_json(p.to_json()) == p
    assert json.loads(json.dumps(p.to_json())) == {"waves": [1, 10, 50, 100], "min_healthy": 2,
                                                    "settle_seconds": 60, "max_failures": 1,
                                                    "min_age_seconds": 3600}
    # keys left out take the defaults; keys a newer release tool adds are ignored
    assert RolloutPolicy.from_json({"waves": [50, 100], "later": True}) == RolloutPolicy(waves=(50, 100))
    assert RolloutPolicy.from_json({"waves": [2.5, 100]}).waves == (2.5, 100)


@pytest.mark.parametrize("bad, key", [
    ([], None), ("x", None),
    ({"waves": []}, "waves"), ({"waves": [10, 50]}, "waves"), ({"waves": [50, 10, 100]}, "waves"),
    ({"waves": [10, 10, 100]}, "waves"), ({"waves": [0, 100]}, "waves"), ({"waves": [10, 101]}, "waves"),
    ({"waves": [True, 100]}, "waves"), ({"waves": ["10", 100]}, "waves"), ({"waves": list(range(1, 30)) + [100]}, "waves"),
    ({"min_healthy": -1}, "min_healthy"), ({"min_healthy": 1.5}, "min_healthy"), ({"max_failures": 0}, "max_failures"),
    ({"settle_seconds": float("nan")}, "settle_seconds"), ({"settle_seconds": 1e12}, "settle_seconds"),
    ({"min_age_seconds": "1h"}, "min_age_seconds"),
])
def test_bad_policies_are_refused_naming_the_key(bad: object, key: str | None) -> None:
    with pytest.raises(PolicyError) as e:
        RolloutPolicy.from_json(bad)
    assert e.value.key == key
    assert isinstance(e.value, ManifestError)


def _manifest(rollout: object) -> bytes:
    entry = {"version": "v1", "commit": "c" * 40, "built": "2026-11-24T00:00:00Z",
             "assets": {"linux/amd64": {"name": "x-linux-amd64.tar.gz", "size": 1, "sha256": "a" * 64,
                                        "binary_sha256": BUILD}}}
    if rollout is not None:
        entry["rollout"] = rollout
    return json.dumps({"schema": 1, "serial": 3, "created": "2026-11-24T00:00:00Z",
                       "expires": "2026-12-24T00:00:00Z", "subsystems": {"nats": entry}}).encode()


def test_manifest_entry_carries_the_policy() -> None:
    m = parse_manifest(_manifest({"waves": [10, 100], "min_healthy": 3}))
    assert m.subsystems["nats"].rollout == RolloutPolicy(waves=(10, 100), min_healthy=3)
    again = parse_manifest(m.dumps())
    assert again == m and again.to_json()["subsystems"]["nats"]["rollout"]["waves"] == [10, 100]
    assert parse_manifest(_manifest(None)).subsystems["nats"].rollout is None
    assert "rollout" not in parse_manifest(_manifest(None)).to_json()["subsystems"]["nats"]
    with pytest.raises(ManifestError, match=r"subsystems\.nats\.rollout\.waves"):
        parse_manifest(_manifest({"waves": [10, 50]}))
    # the canonical bytes keep the policy (it is signed with the rest)
    e = Entry(version="v1", commit="c", built="2026-11-24T00:00:00Z", rollout=RolloutPolicy(waves=(5, 100)),
              assets=MappingProxyType({"linux/amd64": Asset("x-linux-amd64.tar.gz", 1, "a" * 64, BUILD)}))
    data = Manifest(serial=1, created="2026-11-24T00:00:00Z", expires="2026-12-24T00:00:00Z",
                    subsystems=MappingProxyType({"nats": e})).dumps()
    assert b'"rollout"' in data and parse_manifest(data).subsystems["nats"].rollout == e.rollout


def _config(tmp_path: Path, rollout: str) -> Path:
    p = tmp_path / "sync-tools.yaml"
    p.write_text("subsystems:\n  nats:\n    upstream: https://example.org/nats\n" + rollout)
    return p


def test_config_rollout_key(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, "    rollout:\n      waves: [1, 10, 50, 100]\n      min_healthy: 2\n"
                                        "      settle_seconds: 30\n      max_failures: 2\n      min_age_seconds: 0\n"))
    assert cfg.subsystems["nats"].rollout == RolloutPolicy(waves=(1, 10, 50, 100), min_healthy=2, settle_seconds=30,
                                                          max_failures=2)
    assert load_config(_config(tmp_path, "")).subsystems["nats"].rollout is None
    with pytest.raises(ConfigError, match=r"sync-tools.yaml:5: subsystems\.nats\.rollout\.waves: percentages must rise"):
        load_config(_config(tmp_path, "    rollout:\n      waves: [10, 5, 100]\n"))
    with pytest.raises(ConfigError, match=r":5: subsystems\.nats\.rollout\.wave: unknown key"):
        load_config(_config(tmp_path, "    rollout:\n      wave: [10, 100]\n"))
    with pytest.raises(ConfigError, match=r"subsystems\.nats\.rollout: must be a mapping"):
        load_config(_config(tmp_path, "    rollout: [1, 100]\n"))


def test_wave_membership_is_stable_and_differs_per_build() -> None:
    assert [wave_size(p, 20) for p in (1, 10, 50, 100)] == [1, 2, 10, 20]
    assert [wave_size(p, 1000) for p in (1, 10, 50, 100)] == [10, 100, 500, 1000]
    assert wave_size(1, 0) == 0 and wave_size(100, 3) == 3 and wave_size(34, 3) == 2
    order = ranked(BUILD, AGENTS)
    assert order == ranked(BUILD, list(reversed(AGENTS)) + AGENTS[:3])  # order of the input, duplicates: no matter
    assert sorted(order) == sorted(AGENTS)
    # each wave is a prefix of the order, so one build's waves only grow
    assert [wave_of(order, (1, 10, 50, 100), a) for a in order] == [1, 2] + [3] * 8 + [4] * 10
    assert wave_of(order, (1, 10, 50, 100), "stranger") is None
    # another build puts another agent first: no machine is always first
    firsts = {ranked(f"{i:064x}", AGENTS)[0] for i in range(40)}
    assert len(firsts) > 5
    # adding agents keeps the relative order of the others
    more = ranked(BUILD, AGENTS + ["new-1", "new-2"])
    assert [a for a in more if a in AGENTS] == order


POLICY = RolloutPolicy(waves=(1, 10, 50, 100), min_healthy=1, settle_seconds=60, max_failures=2)


def _eval(opened: list[float], healthy: dict[str, float] | None = None, failed: dict[str, float] | None = None,
          now: float = 1000.0, **kw: object):  # type: ignore[no-untyped-def]
    return evaluate(kw.pop("policy", POLICY), BUILD, agents=AGENTS, opened=opened, built_at=0.0,  # type: ignore[arg-type]
                    healthy=healthy or {}, failed=failed or {}, now=now, **kw)  # type: ignore[arg-type]


def test_state_machine_goes_wave_by_wave() -> None:
    order = ranked(BUILD, AGENTS)
    st = _eval([])
    assert (st.state, st.wave, st.open_next) == (WAITING, 0, True)
    st = _eval([1000.0])
    assert (st.state, st.wave, st.members, st.needed, st.healthy, st.due) == (ACTIVE, 1, 1, 1, 0, None)
    assert decide(st, POLICY, order[0], runs_build=False).allowed
    assert not decide(st, POLICY, order[1], runs_build=False).allowed
    assert decide(st, POLICY, order[1], runs_build=False).reason == "this agent is in wave 2; wave 1 is open"
    # a healthy report from a member of wave 2 does not count for wave 1
    st = _eval([1000.0], healthy={order[1]: 1001.0}, now=2000.0)
    assert st.healthy == 0 and not st.open_next
    # the member's healthy report starts the settle time; the next wave is due 60 s later
    st = _eval([1000.0], healthy={order[0]: 1010.0}, now=1030.0)
    assert (st.healthy, st.due, st.open_next) == (1, 1070.0, False)
    st = _eval([1000.0], healthy={order[0]: 1010.0}, now=1070.0)
    assert st.open_next
    # wave 2 holds one new agent; wave 3 eight; the last one completes after its settle time
    h = {order[0]: 1010.0, order[1]: 1080.0}
    st = _eval([1000.0, 1070.0], healthy=h, now=1140.0)
    assert (st.wave, st.members, st.open_next) == (2, 2, True)
    assert decide(st, POLICY, order[1], runs_build=False).allowed
    h.update({order[2]: 1150.0})
    st = _eval([1000.0, 1070.0, 1140.0, 1210.0], healthy={**h, order[10]: 1300.0}, now=1320.0)
    assert (st.state, st.wave, st.due) == (ACTIVE, 4, 1360.0)
    st = _eval([1000.0, 1070.0, 1140.0, 1210.0], healthy={**h, order[10]: 1300.0}, now=1360.0)
    assert st.state == COMPLETE
    assert decide(st, POLICY, "someone-new", runs_build=False).allowed


def test_min_age_and_silent_members() -> None:
    p = RolloutPolicy(waves=(10, 100), min_age_seconds=500, settle_seconds=0)
    st = _eval([], now=100.0, policy=p)
    assert (st.state, st.due, st.open_next) == (WAITING, 500.0, False)
    assert not decide(st, p, ranked(BUILD, AGENTS)[0], runs_build=False).allowed
    assert _eval([], now=500.0, policy=p).open_next
    # every new member of the open wave is silent: the wave needs no report from them, but the waves
    # opened so far must still have shown one healthy report
    p3 = RolloutPolicy(waves=(10, 50, 100), settle_seconds=0)
    order = ranked(BUILD, AGENTS)
    wave2 = set(order[2:10])
    st = _eval([600.0, 601.0], now=602.0, policy=p3, live=set(order) - wave2)
    assert (st.wave, st.needed, st.healthy, st.open_next) == (2, 1, 0, False)
    st = _eval([600.0, 601.0], healthy={order[0]: 600.5}, now=602.0, policy=p3, live=set(order) - wave2)
    assert (st.needed, st.healthy, st.open_next) == (1, 1, True)
    # one live new member: it is the one that must report
    st = _eval([600.0, 601.0], healthy={order[0]: 600.5}, now=602.0, policy=p3,
               live=set(order) - wave2 | {order[5]})
    assert (st.needed, st.healthy, st.open_next) == (1, 0, False)
    # an unseen fleet (nobody live) never opens wave after wave on no evidence
    st = _eval([600.0], now=10_000.0, policy=p3, live=set())
    assert (st.needed, st.open_next) == (1, False)


def test_failures_halt_and_resume_forgives() -> None:
    order = ranked(BUILD, AGENTS)
    st = _eval([1000.0], failed={order[0]: 1001.0})
    assert st.state == ACTIVE and st.failed == 1
    st = _eval([1000.0, 1100.0], failed={order[0]: 1001.0, order[1]: 1200.0})
    assert st.state == HALTED and "2 agent(s) failed" in st.reason and st.due is None
    d = decide(st, POLICY, order[2], runs_build=False)
    assert not d.allowed and d.state == HALTED
    # an agent already running the build is always allowed (its own health check rolls it back)
    assert decide(st, POLICY, order[0], runs_build=True).allowed
    # a resume forgives the failures so far; the next ones count again
    st = _eval([1000.0, 1100.0], failed={order[0]: 1001.0, order[1]: 1200.0}, forgiven=2)
    assert st.state == ACTIVE and st.failed == 0 and st.failed_total == 2
    st = _eval([1000.0], operator_halt="bad smell")
    assert st.state == HALTED and "bad smell" in st.reason


def test_tiny_and_empty_fleets_do_not_stall() -> None:
    p = RolloutPolicy(waves=(1, 10, 100), settle_seconds=0)
    five = AGENTS[:5]
    st = evaluate(p, BUILD, agents=five, opened=[0.0], built_at=0.0, healthy={}, failed={}, now=1.0)
    assert (st.members, st.needed) == (1, 1)
    first = ranked(BUILD, five)[0]
    st = evaluate(p, BUILD, agents=five, opened=[0.0, 1.0], built_at=0.0, healthy={first: 0.5}, failed={}, now=1.0)
    # 10 % of 5 is the same one agent: wave 2 has no new member and passes on wave 1's report
    assert (st.members, st.needed, st.healthy, st.open_next) == (1, 1, 1, True)
    # no agent known: nothing to judge by; a person promotes
    st = evaluate(p, BUILD, agents=[], opened=[0.0], built_at=0.0, healthy={}, failed={}, now=1.0)
    assert (st.fleet, st.members, st.open_next) == (0, 0, False)
    # min_healthy 0: the waves open on the settle time alone
    p0 = RolloutPolicy(waves=(1, 10, 100), settle_seconds=0, min_healthy=0)
    assert evaluate(p0, OTHER, agents=[], opened=[0.0], built_at=0.0, healthy={}, failed={}, now=1.0).open_next
    assert evaluate(p0, OTHER, agents=[], opened=[0.0, 0.0, 0.0], built_at=0.0, healthy={}, failed={},
                    now=1.0).state == COMPLETE
