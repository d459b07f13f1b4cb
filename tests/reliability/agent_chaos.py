"""The agent chaos suite: update cycles with the agent SIGKILLed at random points.

:func:`run_agent_chaos` builds an install root whose service runs under a real supervisord (see
``tests.agent_support.make_world``) and, for each cycle, publishes a new signed release of ``nats``,
runs ``python -m sync_tools agent --once`` as a subprocess and SIGKILLs it: either after a random delay
(uniform over the typical run time, so kills land anywhere: manifest fetch, download, extraction, the
swap, the supervisor's stop/start, the health wait) or, in a share of cycles, through the agent's own
test hook right after a randomly chosen install step. Then it checks:

- the binary at the path, and ``.previous``'s if any, have a sha256 that some *verified* manifest
  (signature checked with the pinned key) lists as ``binary_sha256``, and the path is executable;
- ``.previous`` can be restored: its ``.version`` names its binary's sha256 (what rollback checks) --
  right after a kill inside the save it may be one generation behind, and must be repaired by whatever
  runs next (rollback or the agent), which is checked then;
- if the service is running, it runs such a binary (its health answer names its build, whose bytes are
  known);
- in a third of the cycles, straight after the kill, ``sync-tools rollback nats`` restores
  ``.previous`` and the service is healthy on it (whenever a ``.previous`` exists);
- a restarted agent (``--once``, no kill) exits 0 with the new build installed, ``.version`` matching,
  the service healthy on it, and no journal, staged or download file left; in another third of the
  cycles ``sync-tools rollback nats`` then restores ``.previous``.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sync_tools.agent.install import CRASH_ENV, STEPS
from sync_tools.agent.state import load_state
from sync_tools.errors import DataError
from sync_tools.manifest import MANIFEST_NAME, SIGNATURE_NAME, verify_manifest
from sync_tools.signing import load_public_key
from sync_tools.versionfile import PREVIOUS_DIR, read_version
from tests.agent_support import World, close_world, make_world, wait_http

NAME, BINARY = "nats", "nats-server"


@dataclass(frozen=True)
class AgentChaosReport:
    cycles: int
    kills: int  # agent processes that died by SIGKILL (timer or hook)
    kill_points: dict[str, int]  # hook step, or "timer: <where the kill fell>"
    finished_before_kill: int  # timer drew a delay past the end of the run
    service_down_after_kill: int  # the kill fell between the supervisor's stop and start
    rollbacks_after_kill: int
    rollbacks_after_recovery: int
    rollback_unavailable: int  # no .previous yet (the first install was interrupted before saving it)
    previous_repaired_later: int  # a kill inside the save left .previous/.version behind; repaired next
    recoveries: int
    verified_builds: int
    seconds: float
    violations: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["violations"] = list(self.violations)
        return d


class _Chaos:
    def __init__(self, world: World, rng: random.Random):
        self.world = world
        self.rng = rng
        self.pub = load_public_key(str(world.base / "keys" / "release.pub"))
        self.verified: set[str] = set()
        self.label_sha: dict[str, str] = {}
        self.violations: list[str] = []
        self.counts: Counter[str] = Counter()
        self.run_times: list[float] = [1.0]
        self.log = world.base / "agent-runs.log"
        v1 = world.bin_path(NAME).read_bytes()
        self.label_sha[f"{NAME}-v1"] = hashlib.sha256(v1).hexdigest()
        self._record_manifest()

    def _record_manifest(self) -> None:
        d = self.world.store.dir
        m = verify_manifest((d / MANIFEST_NAME).read_bytes(), (d / SIGNATURE_NAME).read_bytes(), self.pub)
        self.verified |= {a.binary_sha256 for e in m.subsystems.values() for a in e.assets.values()}

    def publish(self, version: str) -> bytes:
        data = self.world.publish(NAME, version)
        self.label_sha[f"{NAME}-{version}"] = hashlib.sha256(data).hexdigest()
        self._record_manifest()
        return data

    def _cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "sync_tools", *args, "--config", str(self.world.config_path)]

    def _env(self, crash_step: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
        if crash_step:
            env[CRASH_ENV] = crash_step
        return env

    def agent_once(self, crash_step: str | None = None, kill_after: float | None = None) -> int:
        with open(self.log, "ab") as logf:
            started = time.monotonic()
            proc = subprocess.Popen(self._cmd("agent", "--once", "--json", "--source", self.world.server.url),
                                    env=self._env(crash_step), stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
            if kill_after is not None:
                try:
                    proc.wait(kill_after)
                except subprocess.TimeoutExpired:
                    proc.kill()
            try:
                rc = proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait(10)
                self.violations.append("an agent run took over 120 s")
            if rc == 0 and crash_step is None and kill_after is None:
                self.run_times.append(time.monotonic() - started)
            return rc

    def rollback(self) -> tuple[int, str]:
        r = subprocess.run(self._cmd("rollback", NAME), env=self._env(), capture_output=True, text=True,
                           timeout=120)
        return r.returncode, r.stderr.strip()[-500:]

    def sha(self, path: Path) -> str | None:
        try:
            return hashlib.sha256(path.read_bytes()).hexdigest()
        except FileNotFoundError:
            return None

    def running_label(self, timeout: float = 5.0) -> str | None:
        """The build the service answers with, or None when supervisord does not have it running."""
        if self.world.supervisor.info(NAME)["statename"] not in ("RUNNING", "STARTING"):
            return None
        try:
            return wait_http(f"http://127.0.0.1:{self.world.ports[NAME]}/health", timeout).split()[0]
        except AssertionError:
            return None

    def landed(self, new: bytes) -> str:
        """Where a timer kill fell, judged from what it left in the install root."""
        path = self.world.bin_path(NAME)
        root = self.world.root / ".sync-tools"
        if (root / "journal" / f"{NAME}.json").exists():
            return "swap in progress" if path.read_bytes() != new else "after the swap, before health"
        if path.read_bytes() == new:
            return "after the install"
        if list(path.parent.glob(".*.staged")):
            return "staged"
        if (root / "downloads").is_dir() and any((root / "downloads").iterdir()):
            return "downloading"
        return "before the download"

    def check_verified(self, when: str, *, after_kill: bool = False) -> None:
        """The invariants at any moment. Right after a kill (*after_kill*) ``.previous``'s ``.version``
        may be one generation behind its binary (the kill fell inside the save): the interrupted
        install's journal names both, and the next rollback or agent run repairs it first, which the
        checks after those verify."""
        path = self.world.bin_path(NAME)
        sha = self.sha(path)
        if sha not in self.verified:
            self.violations.append(f"{when}: {path.name} has sha256 {sha}, in no verified manifest")
        elif not os.access(path, os.X_OK):
            self.violations.append(f"{when}: {path.name} is not executable")
        prev = path.parent / PREVIOUS_DIR / BINARY
        if prev.exists():
            prev_sha = self.sha(prev)
            if prev_sha not in self.verified:
                self.violations.append(f"{when}: .previous holds a binary in no verified manifest")
            try:
                prev_info = read_version(prev.parent)
            except DataError as e:
                prev_info, prev_error = None, str(e)
            else:
                prev_error = "" if prev_info else "missing"
            # what `sync-tools rollback` checks before it puts .previous back
            if (prev_info is None or prev_info.checksum != prev_sha) and after_kill:
                self.counts["previous_repaired_later"] += 1
            elif prev_info is None or prev_info.checksum != prev_sha:
                why = prev_error or "its .version names another sha256 than its binary's"
                self.violations.append(f"{when}: .previous cannot be restored ({why})")
        label = self.running_label()
        if label is None:
            self.counts[f"down:{when}"] += 1
        elif self.label_sha.get(label) not in self.verified:
            self.violations.append(f"{when}: the service runs {label!r}, in no verified manifest")

    def check_rollback(self, when: str, also: str | None = None) -> None:
        """``sync-tools rollback`` puts ``.previous`` back, healthy. Right after a kill, rollback first
        finishes the interrupted install, so the build it goes back to may also be *also* (the one
        installed when the cycle began)."""
        path = self.world.bin_path(NAME)
        prev = path.parent / PREVIOUS_DIR / BINARY
        if not prev.exists():
            self.counts["rollback_unavailable"] += 1
            return
        allowed = {self.sha(prev), also} - {None}
        rc, err = self.rollback()
        if rc != 0:
            self.violations.append(f"rollback {when} failed (exit {rc}): {err}")
            return
        self.counts[f"rollback:{when}"] += 1
        label = self.running_label()
        sha = self.sha(path)
        if sha not in allowed or label is None or self.label_sha.get(label) != sha:
            self.violations.append(f"rollback {when}: path or service not on the previous build ({label})")
        self.check_verified(f"after rollback {when}")

    def check_recovered(self, version: str, data: bytes) -> None:
        path = self.world.bin_path(NAME)
        if load_state(self.world.root).failed.get(NAME) == hashlib.sha256(data).hexdigest():
            # a rollback straight after the kill finished the interrupted install and rolled away from
            # it: that build is held back until the release changes, so the agent keeps the previous one
            self.check_held_back(version, data)
            return
        rc = self.agent_once()
        self.counts["recoveries"] += 1
        if rc != 0:
            self.violations.append(f"{version}: the restarted agent exited {rc} (see {self.log})")
            return
        info = read_version(path.parent)
        label = self.running_label()
        problems = []
        if path.read_bytes() != data:
            problems.append("binary is not the new build")
        if info is None or info.checksum != hashlib.sha256(data).hexdigest():
            problems.append(".version does not match")
        if label != f"{NAME}-{version}":
            problems.append(f"service answers {label!r}")
        root = self.world.root / ".sync-tools"
        leftovers = [*(root / "journal").glob("*.json"), *path.parent.glob(".*.staged")]
        if (root / "downloads").is_dir():
            leftovers += list((root / "downloads").iterdir())
        if leftovers:
            problems.append(f"left behind: {[p.name for p in leftovers]}")
        if problems:
            self.violations.append(f"{version} after recovery: {'; '.join(problems)}")
        self.check_verified(f"{version} after recovery")


    def check_held_back(self, version: str, data: bytes) -> None:
        path = self.world.bin_path(NAME)
        before = self.sha(path)
        rc = self.agent_once()
        self.counts["recoveries"] += 1
        if rc != 0:
            self.violations.append(f"{version}: the restarted agent exited {rc} (see {self.log})")
        elif self.sha(path) != before or before == hashlib.sha256(data).hexdigest():
            self.violations.append(f"{version}: a build held back by rollback was installed again")
        self.check_verified(f"{version} after recovery (held back)")


def run_agent_chaos(workdir: Path, *, cycles: int = 100, seed: int = 0, hook_share: float = 0.35,
                    rollback_after_kill: float = 1 / 3, every_step: bool = False) -> AgentChaosReport:
    """Run *cycles* update cycles in *workdir* (created): a share *hook_share* killed by the test hook at a
    random step, the rest by a timer; *rollback_after_kill* of them rolled back before recovery, a third
    of the others after it; *every_step*: hook kills take the install steps in turn instead of at random.
    Never raises for what it measures."""
    started = time.monotonic()
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    world = make_world(workdir, {NAME: BINARY})
    chaos = _Chaos(world, rng)
    kills = 0
    points: Counter[str] = Counter()
    finished = 0
    try:
        for i in range(cycles):
            version = f"v{i + 2}"
            data = chaos.publish(version)
            installed = chaos.sha(world.bin_path(NAME))
            if rng.random() < hook_share:
                step = STEPS[i % len(STEPS)] if every_step else rng.choice(STEPS)
                rc = chaos.agent_once(crash_step=step)
                point = step
            else:
                typical = sorted(chaos.run_times)[len(chaos.run_times) // 2]
                rc = chaos.agent_once(kill_after=rng.uniform(0.0, typical * 1.1))
                point = "timer"
            if rc == -9:
                kills += 1
                points[point if point != "timer" else f"timer: {chaos.landed(data)}"] += 1
            elif rc == 0 and point == "timer":
                finished += 1
            else:
                chaos.violations.append(f"{version}: the agent ({point}) exited {rc} (see {chaos.log})")
            chaos.check_verified(f"{version} after the kill ({point})", after_kill=True)
            after = rng.random()
            if after < rollback_after_kill:
                chaos.check_rollback("after the kill", also=installed)
            chaos.check_recovered(version, data)
            if after >= rollback_after_kill and rng.random() < 0.5:
                chaos.check_rollback("after recovery")
    finally:
        close_world(world)
    c = chaos.counts
    return AgentChaosReport(
        cycles=cycles, kills=kills, kill_points=dict(sorted(points.items())), finished_before_kill=finished,
        service_down_after_kill=sum(v for k, v in c.items() if k.startswith("down:") and "after the kill" in k
                                    and "rollback" not in k),
        rollbacks_after_kill=c["rollback:after the kill"], rollbacks_after_recovery=c["rollback:after recovery"],
        rollback_unavailable=c["rollback_unavailable"], previous_repaired_later=c["previous_repaired_later"],
        recoveries=c["recoveries"],
        verified_builds=len(chaos.verified), seconds=round(time.monotonic() - started, 1),
        violations=tuple(chaos.violations))
