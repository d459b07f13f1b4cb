"""Staged rollouts: the policy a release carries and the pure state machine that judges it.

Nothing here does I/O or reads a clock: the relay (``sync_tools.relay.fleet``) hands in the policy,
the fleet's agent ids, what they reported, when each wave opened and the time, and gets back which
wave is open, whether the rollout is waiting, active, halted or complete, when the next step is due,
and whether one agent may install the build. The agent side uses :class:`RolloutPolicy` (through
``Entry.rollout`` in the manifest) and nothing else.

Waves are percentages of the fleet, strictly rising, the last 100. Which agents are in a wave is a
stable function of the build and the agent id: agents are ranked by ``sha256(build + ":" + id)``,
and wave k holds the first ``max(1, ceil(percent_k * N / 100))`` of them, so a new build picks a
different first wave (no machine is always first) while one build's waves only ever grow.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sync_tools.errors import ManifestError

WAITING, ACTIVE, HALTED, COMPLETE, UNKNOWN = "waiting", "active", "halted", "complete", "unknown"
STATES = (WAITING, ACTIVE, HALTED, COMPLETE, UNKNOWN)
OUTCOMES = ("updated", "rolled_back", "failed", "held", "running")
HEALTHY_OUTCOMES = frozenset({"updated", "running"})  # the agent runs the build and its health check passed
FAILED_OUTCOMES = frozenset({"failed", "rolled_back"})
POLICY_KEYS = ("waves", "min_healthy", "settle_seconds", "max_failures", "min_age_seconds")
MAX_WAVES = 20
MAX_SECONDS = 366 * 86400.0  # a year: far above any sane settle time or release age
MAX_COUNT = 1_000_000


class PolicyError(ManifestError):
    """A rollout policy is malformed. ``key`` names the policy key at fault (None: the whole policy)."""

    def __init__(self, message: str, *, key: str | None = None, where: str = "rollout"):
        self.key = key
        self.reason = message
        super().__init__(f"{where}.{key}: {message}" if key else f"{where}: {message}")


def _number(obj: Mapping[str, Any], key: str, default: float, *, integer: bool, maximum: float,
            minimum: float, where: str) -> Any:
    value = obj.get(key, default)
    # an int needs no float(): 10**400 (JSON and YAML both take it) would overflow it
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            integer and not isinstance(value, int) and not value.is_integer()):
        raise PolicyError(f"must be {'a whole number' if integer else 'a number'}", key=key, where=where)
    if not minimum <= value <= maximum:  # false for nan too
        raise PolicyError(f"must be from {minimum:g} to {maximum:g}, not {value!r}", key=key, where=where)
    return int(value) if integer else float(value)


@dataclass(frozen=True)
class RolloutPolicy:
    """A release's rollout policy (the manifest entry's ``rollout`` key).

    ``waves``: percentages of the fleet, strictly rising, the last 100. ``min_healthy``: healthy
    reports needed from the open wave before the next opens. ``settle_seconds``: the wait after the
    ``min_healthy``-th healthy report before the next wave opens. ``max_failures``: failed or
    rolled-back agents at which the rollout halts. ``min_age_seconds``: the first wave opens only
    this long after the entry's ``built`` time.
    """

    waves: tuple[float, ...] = (1, 10, 50, 100)
    min_healthy: int = 1
    settle_seconds: float = 60.0
    max_failures: int = 1
    min_age_seconds: float = 0.0

    @classmethod
    def from_json(cls, obj: Any, *, where: str = "rollout") -> RolloutPolicy:
        """Parse and validate a policy object. Keys left out take the defaults; keys this version does
        not know are ignored (a newer release tool may add some). Raises PolicyError."""
        if not isinstance(obj, Mapping):
            raise PolicyError("must be an object with waves, min_healthy, settle_seconds, max_failures, "
                              "min_age_seconds", where=where)
        raw = obj.get("waves", list(cls.waves))
        if not isinstance(raw, list | tuple) or not raw:
            raise PolicyError("must be a non-empty list of percentages, e.g. [1, 10, 50, 100]", key="waves",
                              where=where)
        if len(raw) > MAX_WAVES:
            raise PolicyError(f"at most {MAX_WAVES} waves", key="waves", where=where)
        waves: list[float] = []
        for w in raw:
            if isinstance(w, bool) or not isinstance(w, int | float) or not 0 < w <= 100:
                raise PolicyError(f"each wave is a percentage above 0 and at most 100, not {w!r}", key="waves",
                                  where=where)
            if waves and w <= waves[-1]:
                raise PolicyError("percentages must rise strictly", key="waves", where=where)
            waves.append(int(w) if float(w).is_integer() else float(w))
        if waves[-1] != 100:
            raise PolicyError("the last wave must be 100 (the whole fleet)", key="waves", where=where)
        return cls(
            waves=tuple(waves),
            min_healthy=_number(obj, "min_healthy", cls.min_healthy, integer=True, minimum=0, maximum=MAX_COUNT,
                                where=where),
            settle_seconds=_number(obj, "settle_seconds", cls.settle_seconds, integer=False, minimum=0,
                                   maximum=MAX_SECONDS, where=where),
            max_failures=_number(obj, "max_failures", cls.max_failures, integer=True, minimum=1,
                                 maximum=MAX_COUNT, where=where),
            min_age_seconds=_number(obj, "min_age_seconds", cls.min_age_seconds, integer=False, minimum=0,
                                    maximum=MAX_SECONDS, where=where),
        )

    def to_json(self) -> dict[str, Any]:
        def num(v: float) -> float | int:
            return int(v) if float(v).is_integer() else v

        return {"waves": [num(w) for w in self.waves], "min_healthy": self.min_healthy,
                "settle_seconds": num(self.settle_seconds), "max_failures": self.max_failures,
                "min_age_seconds": num(self.min_age_seconds)}


def policy_from_config(section: Any) -> RolloutPolicy:
    """The policy under ``subsystems.X.rollout`` of sync-tools.yaml. *section* is the config loader's
    section over that mapping (its ``data``, ``prefix`` and ``error(key, message)``); a bad value
    becomes the loader's ConfigError naming the file, the key and its line."""
    for key in section.data:
        if key not in POLICY_KEYS:
            raise section.error(key, f"unknown key (expected one of: {', '.join(POLICY_KEYS)})")
    try:
        return RolloutPolicy.from_json(dict(section.data), where=section.prefix)
    except PolicyError as e:
        raise section.error(e.key or "waves", e.reason) from e


# ------------------------------------------------------------------------------------- membership


def rank_key(build: str, agent: str) -> str:
    """The agent's place in *build*'s order: ``sha256(build + ":" + agent)`` in hex."""
    return hashlib.sha256(f"{build}:{agent}".encode()).hexdigest()


def ranked(build: str, agents: Iterable[str]) -> list[str]:
    """*agents* (duplicates dropped) in *build*'s stable order: wave k is a prefix of this list."""
    return sorted(set(agents), key=lambda a: (rank_key(build, a), a))


def wave_size(percent: float, fleet: int) -> int:
    """How many of *fleet* agents a wave of *percent* holds: ``max(1, ceil(percent * N / 100))``,
    never more than the fleet."""
    if fleet <= 0:
        return 0
    return min(fleet, max(1, math.ceil(percent * fleet / 100 - 1e-9)))


def wave_of(order: Sequence[str], waves: Sequence[float], agent: str,
            sizes: Sequence[int] | None = None) -> int | None:
    """The 1-based wave *agent* first belongs to in *order* (from :func:`ranked`, or a status's
    ``order``), None when it is not in the fleet. *sizes*: each wave's size counting the waves before
    it (a status's ``sizes``); by default :func:`wave_size` of the whole fleet."""
    try:
        i = order.index(agent)
    except ValueError:
        return None
    n = len(order)
    for k, p in enumerate(waves, 1):
        if i < (sizes[k - 1] if sizes is not None and k <= len(sizes) else wave_size(p, n)):
            return k
    return len(waves)


def placed(build: str, agents: Collection[str], waves: Sequence[float], opened: Sequence[float],
           joined: Mapping[str, float] | None) -> tuple[tuple[str, ...], list[int]]:
    """The fleet in wave order, and each wave's size counting the waves before it.

    Without *joined* (agent -> when the relay first knew it): :func:`ranked`, and :func:`wave_size` of
    the whole fleet. With it, the waves opened so far keep their members however the fleet grows:
    wave j is filled, in rank order, from the agents known when it opened, to its size in that fleet,
    after every member of the waves before it; only the waves not yet open are sized over the fleet
    as it is now. (By rank alone, one machine added to the fleet that ranks first pushed a wave-1 agent
    out of wave 1: allowed, then refused, and its healthy report no longer counted.)"""
    rank = ranked(build, agents)
    n = len(rank)
    k = min(len(opened), len(waves))
    if joined is None:
        return tuple(rank), [wave_size(p, n) for p in waves]
    order: list[str] = []
    taken: set[str] = set()
    sizes: list[int] = []
    for j in range(k):
        known = [a for a in rank if joined.get(a, float("-inf")) <= opened[j]]
        target = max(len(order), wave_size(waves[j], len(known)))
        for a in known:
            if len(order) >= target:
                break
            if a not in taken:
                order.append(a)
                taken.add(a)
        sizes.append(len(order))
    order += [a for a in rank if a not in taken]
    for j in range(k, len(waves)):
        sizes.append(max(sizes[-1] if sizes else 0, wave_size(waves[j], n)))
    return tuple(order), sizes


# -------------------------------------------------------------------------------- state machine


@dataclass(frozen=True)
class RolloutStatus:
    """What :func:`evaluate` decided about one rollout at one instant.

    ``wave``: the open wave (1-based; 0 before the first opens). ``due``: when the next step is due
    (the next wave may open; None: waiting for reports, or nothing left to do). ``open_next``: that
    step is due now, the caller should record the next wave's opening. ``recheck``: while it waits for
    reports, when to judge it again anyway (a member it waits for falls silent). ``healthy`` / ``needed``:
    healthy agents of the open wave, and how many it needs; ``failed``: failed agents counting
    towards ``max_failures`` (those before a resume are forgiven).
    """

    state: str
    wave: int
    percent: float | None
    fleet: int
    members: int
    healthy: int
    needed: int
    failed: int
    failed_total: int
    due: float | None
    open_next: bool
    reason: str
    order: tuple[str, ...] = ()
    sizes: tuple[int, ...] = ()  # each wave's size counting the waves before it, over ``order``
    recheck: float | None = None  # waiting for reports: when a member waited for would fall silent

    def member(self, agent: str) -> bool:
        """Whether *agent* is in one of the waves opened so far."""
        return agent in self.order[: self.members]


def evaluate(
    policy: RolloutPolicy,
    build: str,
    *,
    agents: Collection[str],
    opened: Sequence[float],
    built_at: float,
    healthy: Mapping[str, float],
    failed: Mapping[str, float],
    now: float,
    live: Collection[str] | None = None,
    operator_halt: str | None = None,
    forgiven: int = 0,
    joined: Mapping[str, float] | None = None,
    silent_at: Mapping[str, float] | None = None,
) -> RolloutStatus:
    """Judge the rollout of *build* under *policy*.

    *agents*: the fleet (N). *opened*: when each wave opened so far, in order. *built_at*: the
    entry's ``built`` time (for ``min_age_seconds``). *healthy* / *failed*: agent -> time of its
    first healthy / failed report for this build (only reports for a build the relay knows from a
    verified manifest belong here). *live*: agents not silent (None: all): a wave whose new members
    are all silent needs no healthy report from them, so a few dead machines cannot stall a rollout
    forever (the waves opened so far must still show a healthy report). *operator_halt*: the reason
    a person halted it. *forgiven*: failed agents a resume
    forgave. *joined*: agent -> when it joined the fleet, so the waves opened keep their members
    (:func:`placed`). *silent_at*: agent -> when it will count as silent if not heard from: a wave
    that waits for a live member's report is due to be judged again then. Times are seconds on one
    clock.
    """
    order, sizes = placed(build, agents, policy.waves, opened, joined)
    n = len(order)
    k = min(len(opened), len(policy.waves))
    failed_total = len(failed)
    failing = max(0, failed_total - forgiven)
    members = sizes[k - 1] if k else 0
    percent = policy.waves[k - 1] if k else None

    def status(state: str, reason: str, *, healthy_n: int = 0, needed: int = 0, due: float | None = None,
               open_next: bool = False, recheck: float | None = None) -> RolloutStatus:
        return RolloutStatus(state=state, wave=k, percent=percent, fleet=n, members=members, healthy=healthy_n,
                             needed=needed, failed=failing, failed_total=failed_total, due=due,
                             open_next=open_next, reason=reason, order=order, sizes=tuple(sizes), recheck=recheck)

    if operator_halt is not None:
        return status(HALTED, f"halted by an operator: {operator_halt}" if operator_halt else "halted by an operator")
    if failing >= policy.max_failures:
        return status(HALTED, f"{failing} agent(s) failed or rolled back this build (max_failures "
                              f"{policy.max_failures})")
    if k == 0:
        at = built_at + policy.min_age_seconds
        if now >= at:
            return status(WAITING, "the first wave is due", due=at, open_next=True)
        return status(WAITING, f"the first wave opens {at - now:.0f} s from now (min_age_seconds "
                               f"{policy.min_age_seconds:g})", due=at)
    new = order[(sizes[k - 2] if k > 1 else 0): members]
    alive = new if live is None else [a for a in new if a in live]
    if alive:
        needed = min(policy.min_healthy, len(alive))
        counted = new
    else:
        # no new member of this wave can report (none is live, or the wave added nobody): the waves
        # opened so far must still show health, at least one report, so an unseen fleet never opens
        # wave after wave on no evidence at all
        counted = order[:members]
        alive_all = counted if live is None else [a for a in counted if a in live]
        needed = min(policy.min_healthy, max(1, len(alive_all))) if policy.min_healthy else 0
        if not alive_all and live is not None and any(a in live for a in order[members:]):
            # every member so far is silent (a first wave of machines switched off): none of them can
            # ever report, so the next wave, which has live machines, gives the evidence instead
            needed = 0
    # an agent counts once: healthy only when no failure came at or after its healthy report (one that
    # said updated and then rolled back is a failure, not the wave's healthy report as well)
    times = sorted(healthy[a] for a in counted if a in healthy and not (a in failed and failed[a] >= healthy[a]))
    last = k == len(policy.waves)
    if len(times) < needed:
        # judged again when a member it waits for would fall silent: then it may wait for nobody
        waiting = [silent_at[a] for a in counted if silent_at is not None and a in silent_at and a not in healthy
                   and (live is None or a in live)]
        return status(ACTIVE, f"wave {k} ({percent:g}%): {len(times)} of {needed} healthy report(s)",
                      healthy_n=len(times), needed=needed, recheck=min(waiting) if waiting else None)
    ready = max(opened[k - 1], times[needed - 1] if needed else opened[k - 1]) + policy.settle_seconds
    if last:
        if now >= ready:
            return status(COMPLETE, "every wave is open and the last one settled", healthy_n=len(times),
                          needed=needed)
        return status(ACTIVE, f"the last wave settles {ready - now:.0f} s from now", healthy_n=len(times),
                      needed=needed, due=ready)
    if now >= ready:
        return status(ACTIVE, f"wave {k + 1} is due", healthy_n=len(times), needed=needed, due=ready,
                      open_next=True)
    return status(ACTIVE, f"wave {k} healthy; wave {k + 1} opens {ready - now:.0f} s from now",
                  healthy_n=len(times), needed=needed, due=ready)


@dataclass(frozen=True)
class Decision:
    """The answer to an agent asking whether it may install a build (``GET /rollout/...``)."""

    allowed: bool
    state: str
    wave: int
    percent: float | None
    reason: str
    agent_wave: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "state": self.state, "wave": self.wave, "percent": self.percent,
                "reason": self.reason, "agent_wave": self.agent_wave}


def decide(st: RolloutStatus, policy: RolloutPolicy, agent: str, *, runs_build: bool) -> Decision:
    """Whether *agent* may install the build *st* judges. An agent that already runs it is always
    allowed (a rollback of a halted build is the agent's own health check); otherwise only members
    of the waves opened so far, and nobody while the rollout waits or is halted."""
    agent_wave = wave_of(st.order, policy.waves, agent, st.sizes or None)

    def answer(allowed: bool, reason: str) -> Decision:
        return Decision(allowed, st.state, st.wave, st.percent, reason, agent_wave)

    if runs_build:
        return answer(True, "this agent already runs the build")
    if st.state == HALTED:
        return answer(False, st.reason)
    if st.state == WAITING or st.wave == 0:
        return answer(False, st.reason)
    if st.state == COMPLETE or st.member(agent):
        return answer(True, f"in wave {agent_wave}" if agent_wave else "the whole fleet is open")
    if agent_wave is None:
        return answer(False, "this agent is not in the fleet yet")
    return answer(False, f"this agent is in wave {agent_wave}; wave {st.wave} is open")
