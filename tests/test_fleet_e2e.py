"""Staged rollouts end to end (issue 15) with every part real: 22 ``sync-tools agent`` processes, each with
its own install root, following the relay's SSE stream; one supervisord running their 22 services
(restarted when they exit, as a deployment has it); the relay as its own ``sync-tools relay`` process;
releases signed into a local store (with a rollout policy in the manifest entry) and served to each agent
by its own loopback HTTP server, so what each agent downloaded is counted; ``/notify`` as the release job
sends it.

One story, in order: a healthy build goes out wave by wave to all 22; a build that passes its health
check and then crashes reaches only the first wave, whose agents all roll back, the rollout halts by
itself and no other agent downloads it; a new healthy build after the halt reaches everyone again.
Wave membership and order are checked against the relay's own records (its fleet database), not against
how fast anything happened.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sync_tools.manifest import asset_name
from sync_tools.rollout import ranked, wave_size
from sync_tools.versionfile import VersionInfo, write_version
from tests.agent_support import PLATFORM, SERVICE_PY, ReleaseStore, StoreServer, Supervisord, service_binary
from tests.relay_process import RelayProcess, agent_token, clean_env, write_relay_workspace

N_AGENTS = 22
AGENTS = [f"agent-{i:02d}" for i in range(N_AGENTS)]
BINARY = "nats-server"
ASSET = asset_name(BINARY, PLATFORM)
#: Wave 1 holds max(1, ceil(5% of 22)) = 2 agents, wave 2 ceil(25% of 22) = 6, wave 3 all 22. Halting
#: takes both of wave 1 failing, so both surely install the bad build (neither is refused by an early halt).
POLICY = {"waves": [5, 25, 100], "min_healthy": 1, "settle_seconds": 2, "max_failures": 2, "min_age_seconds": 0}
WAVE_SIZES = [2, 6, 22]
#: The agents' settle window outlasts the bad build's life (it exits 1 s after it starts).
AGENT_SETTLE = 3
BAD_MODE = "dies:1"
WAIT = 120.0  # an upper bound for each phase; a passing run never waits for it

pytestmark = pytest.mark.skipif(not Path(sys.executable).with_name("supervisord").exists(),
                                reason="supervisord (the supervisor package) is not installed")


@dataclass
class FleetAgent:
    id: str
    root: Path
    port: int
    server: StoreServer
    proc: subprocess.Popen[bytes] | None = None

    @property
    def binary(self) -> Path:
        return self.root / "nats" / ".bin" / BINARY

    def sha(self) -> str:
        return hashlib.sha256(self.binary.read_bytes()).hexdigest()

    def answers(self) -> str | None:
        """The service's health answer ("nats-<version> <pid>"), or None while it is down."""
        try:
            r = requests.get(f"http://127.0.0.1:{self.port}/health", timeout=2)
        except requests.RequestException:
            return None
        return r.text if r.ok else None

    def asset_requests(self) -> int:
        return sum(1 for name, _ in self.server.requests if name == ASSET)


@dataclass
class Fleet:
    base: Path
    store: ReleaseStore
    service_py: Path
    relay: RelayProcess
    supervisor: Supervisord
    agents: list[FleetAgent] = field(default_factory=list)

    def binary(self, version: str, mode: str = "ok") -> bytes:
        return service_binary(self.service_py, f"nats-{version}", mode=mode)

    def release(self, version: str, *, mode: str = "ok", rollout: dict[str, Any] | None = POLICY) -> str:
        """Sign *version* into the store with *rollout*, reset the per-agent download counts, notify the
        relay. Returns the build (the binary's sha256)."""
        data = self.binary(version, mode)
        self.store.publish("nats", BINARY, data, version, rollout=rollout)
        for a in self.agents:
            a.server.reset()
        self.relay.notify()
        return hashlib.sha256(data).hexdigest()

    def silent_services(self) -> str:
        """The agents whose service does not answer, with supervisord's word on it (for a failure)."""
        out = []
        for a in self.agents:
            if not a.answers():
                with contextlib.suppress(Exception):
                    info = self.supervisor.info(f"svc-{a.id}")
                    out.append(f"{a.id} port {a.port}: {info['statename']} {info['description']}")
        return "; ".join(out)

    def wait(self, what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
        """Poll *check* until truthy; fails naming *what* (or an agent process that exited)."""
        deadline = time.monotonic() + timeout
        while True:
            for a in self.agents:
                if a.proc is not None and a.proc.poll() is not None:
                    log = (self.base / "logs" / f"{a.id}.log").read_text()[-2000:]
                    raise AssertionError(f"{a.id} exited with {a.proc.returncode} while waiting for {what}:\n{log}")
            with contextlib.suppress(requests.RequestException):
                value = check()
                if value:
                    return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; services not answering: "
                                     f"{self.silent_services() or 'none'}; rollouts: "
                                     f"{self.relay.operator('GET', '/rollout/nats').text[:3000]}")
            time.sleep(0.1)

    # ---------------------------------------------------------------- the relay's own records

    def opened(self, build: str) -> list[float]:
        (row,) = self.relay.fleet_rows("SELECT opened FROM rollouts WHERE subsystem = 'nats' AND build = ?", build)
        return json.loads(row[0])

    def outcomes(self, build: str) -> tuple[dict[str, float], dict[str, float]]:
        rows = self.relay.fleet_rows("SELECT agent, healthy_at, failed_at FROM outcomes WHERE subsystem = 'nats' "
                                     "AND build = ?", build)
        return {a: h for a, h, _ in rows if h is not None}, {a: f for a, _, f in rows if f is not None}

    def reports(self, build: str) -> dict[str, list[tuple[float, str]]]:
        """agent -> [(received, outcome)] of its reports naming *build*, oldest first."""
        out: dict[str, list[tuple[float, str]]] = {}
        for agent, received, outcome in self.relay.fleet_rows(
                "SELECT agent, received, outcome FROM reports WHERE subsystem = 'nats' AND to_sha = ? ORDER BY id",
                build):
            out.setdefault(agent, []).append((received, outcome))
        return out


def _agent_config(a: FleetAgent, relay: str, pub: Path, supervisor_url: str, program: str) -> Path:
    path = a.root / "sync-tools.yaml"
    path.write_text(
        f"release:\n  tag: latest\n  public_key: {pub}\n"
        f"subsystems:\n  nats:\n    binary: {BINARY}\n    process: {program}\n"
        f"    health: http://127.0.0.1:{a.port}/health\n"
        f"agent:\n  id: {a.id}\n  root: .\n  source: {a.server.url}\n  relay: {relay}\n  reload: supervisor\n"
        f"  supervisor_url: {supervisor_url}\n  platform: {PLATFORM}\n  health_timeout: 15\n"
        f"  settle_seconds: {AGENT_SETTLE}\n")
    return path


@contextlib.contextmanager
def running_fleet(base: Path) -> Iterator[Fleet]:
    """v1 released without a policy and installed in 22 roots (as an earlier agent run would have), their
    services under one supervisord, the relay process, then 22 agent processes subscribed to it."""
    (base / "logs").mkdir(parents=True)
    store = ReleaseStore(base / "store", Ed25519PrivateKey.generate())
    service_py = base / "service.py"
    service_py.write_text(SERVICE_PY)
    ws = base / "relay"
    write_relay_workspace(ws, store.store, store.public_pem(), AGENTS, {"nats": BINARY}, signing_key=store.key)
    pub = ws / "keys" / "release.pub"
    # the store servers hold their ports first, so no service or relay port chosen below can be one of them
    servers = [StoreServer(store.dir) for _ in AGENTS]
    relay_port, *ports = _free_ports(N_AGENTS + 1)
    agents = [FleetAgent(a, base / "agents" / a, port, server) for a, port, server in zip(AGENTS, ports, servers,
                                                                                            strict=True)]
    programs = [(f"svc-{a.id}", str(a.binary), {"PORT": str(a.port)}) for a in agents]
    supervisor = Supervisord(programs, autorestart=tuple(name for name, _, _ in programs))
    fleet = Fleet(base, store, service_py, RelayProcess(ws, log=base / "logs" / "relay.log", port=relay_port),
                  supervisor, agents)
    with contextlib.ExitStack() as stack:
        for a in agents:
            stack.enter_context(a.server)
        stack.callback(supervisor.stop)
        stack.callback(fleet.relay.stop)
        stack.callback(_stop_agents, agents)

        v1 = fleet.binary("v1")
        store.publish("nats", BINARY, v1, "v1")
        entry = store.manifest().subsystems["nats"]
        for a in agents:
            a.binary.parent.mkdir(parents=True)
            a.binary.write_bytes(v1)
            a.binary.chmod(0o755)
            write_version(a.binary.parent, VersionInfo(entry.commit, entry.built, hashlib.sha256(v1).hexdigest(),
                                                       "v1"))
        supervisor.start()
        fleet.relay.start()
        fleet.relay.notify()  # the relay learns the v1 build from the signed manifest
        for a in agents:
            _agent_config(a, fleet.relay.url, pub, supervisor.url, f"svc-{a.id}")
            with open(base / "logs" / f"{a.id}.log", "ab") as log:
                a.proc = subprocess.Popen(
                    [sys.executable, "-m", "sync_tools", "-v", "agent", "--config", str(a.root / "sync-tools.yaml")],
                    cwd=a.root, env=clean_env(SYNC_TOOLS_AGENT_TOKEN=agent_token(a.id)), stdout=log,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        fleet.wait("every service answering", lambda: all(a.answers() for a in agents))
        fleet.wait("22 agents subscribed", lambda: fleet.relay.connected_agents() == N_AGENTS)
        v1_sha = hashlib.sha256(v1).hexdigest()
        fleet.wait("every agent reporting v1 running",
                   lambda: len({a for a, rs in fleet.reports(v1_sha).items() if ("running" in {o for _, o in rs})})
                   == N_AGENTS)
        yield fleet


def _free_ports(n: int) -> list[int]:
    """*n* distinct loopback ports free right now (all held open together while they are chosen: one
    at a time, the kernel may hand out the same port twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _stop_agents(agents: list[FleetAgent]) -> None:
    for a in agents:
        if a.proc is not None and a.proc.poll() is None:
            a.proc.send_signal(signal.SIGTERM)
    for a in agents:
        if a.proc is None:
            continue
        try:
            a.proc.wait(15)
        except subprocess.TimeoutExpired:
            a.proc.kill()
            a.proc.wait(5)


def _waves(build: str) -> list[list[str]]:
    """The contract's membership: wave k is the first max(1, ceil(p_k * N / 100)) agents by rank."""
    order = ranked(build, AGENTS)
    return [order[: wave_size(p, N_AGENTS)] for p in POLICY["waves"]]


def _rolled_out_wave_by_wave(fleet: Fleet, build: str, version: str) -> None:
    """*build* went to every agent, each only after its own wave opened, and each wave opened only after
    a healthy report from the waves before it and the policy's settle time; checked on the relay's
    records, the agents' disks, their services and their download counts."""
    # complete needs only the last wave's first healthy report: the others report after their settle window
    fleet.wait(f"{version}'s rollout complete, and every agent reporting it healthy",
               lambda: (fleet.relay.rollout("nats", build) or {}).get("state") == "complete"
               and len(fleet.outcomes(build)[0]) == N_AGENTS)
    waves = _waves(build)
    assert [len(w) for w in waves] == WAVE_SIZES
    opened = fleet.opened(build)
    healthy, failed = fleet.outcomes(build)
    assert len(opened) == 3 and opened == sorted(opened)
    assert set(healthy) == set(AGENTS) and failed == {}
    assert all(a.sha() == build for a in fleet.agents)
    reports = fleet.reports(build)
    for k, members in enumerate(waves):
        new = [a for a in members if k == 0 or a not in waves[k - 1]]
        for a in new:
            assert healthy[a] >= opened[k], f"{a} (wave {k + 1}) healthy before its wave opened"
            if k > 0:  # it was told to wait, before its wave opened, and installed only after
                outcomes = [o for _, o in reports[a]]
                assert outcomes.index("held") < outcomes.index("updated"), (a, reports[a])
        if k + 1 < len(opened):
            first_healthy = min(healthy[a] for a in members)
            assert opened[k + 1] >= first_healthy + POLICY["settle_seconds"], f"wave {k + 2} opened early"
    for a in fleet.agents:
        assert a.asset_requests() == 1 and a.server.sent[ASSET] == (fleet.store.dir / ASSET).stat().st_size
    fleet.wait(f"every service answering as {version}",
               lambda: all((a.answers() or "").startswith(f"nats-{version} ") for a in fleet.agents))


def test_a_rollout_goes_wave_by_wave_a_bad_build_halts_in_wave_one_and_the_next_build_goes_out(
        tmp_path: Path) -> None:
    with running_fleet(tmp_path) as fleet:
        # 1. a healthy build, wave by wave to all 22
        good = fleet.release("v2")
        _rolled_out_wave_by_wave(fleet, good, "v2")

        # 2. a build that answers its health check, then exits a second after it starts
        bad = fleet.release("v3", mode=BAD_MODE)
        first, others = _waves(bad)[0], [a for a in fleet.agents if a.id not in _waves(bad)[0]]
        fleet.wait("the bad build's rollout halted",
                   lambda: (fleet.relay.rollout("nats", bad) or {}).get("state") == "halted")
        # every agent outside wave 1 heard of the build and was told to wait
        fleet.wait("the other 20 agents held", lambda: all(
            "held" in {o for _, o in fleet.reports(bad).get(a.id, [])} for a in others))
        fleet.wait("wave 1 rolled back and healthy on v2", lambda: all(
            a.sha() == good and (a.answers() or "").startswith("nats-v2 ") for a in fleet.agents if a.id in first))
        status = fleet.relay.rollout("nats", bad)
        assert status["wave"] == 1 and status["failed"] == 2 and status["healthy"] == 0
        healthy, failed = fleet.outcomes(bad)
        assert set(failed) == set(first) and healthy == {}
        reports = fleet.reports(bad)
        for a in fleet.agents:
            outcomes = {o for _, o in reports.get(a.id, [])}
            assert a.sha() == good, a.id
            if a.id in first:  # it downloaded, installed, saw the crash inside its settle window, rolled back
                assert outcomes == {"rolled_back"} and a.asset_requests() == 1, (a.id, outcomes)
            else:  # never downloaded: only the manifest and its signature were fetched from its server
                assert outcomes == {"held"} and a.asset_requests() == 0, (a.id, outcomes, a.server.requests)
                assert a.server.sent.get(ASSET, 0) == 0
        assert all((a.answers() or "").startswith("nats-v2 ") for a in fleet.agents)
        health = fleet.relay.session.get(f"{fleet.relay.url}/health", timeout=5).json()
        assert [h["build"] for h in health["rollouts_halted"]] == [bad]

        # 3. a new healthy build after the halt goes out again, to everyone (wave 1's agents included)
        fixed = fleet.release("v4")
        _rolled_out_wave_by_wave(fleet, fixed, "v4")
