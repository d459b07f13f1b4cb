"""``sync-tools demo --fleet``: a staged rollout, then a bad build halted by the fleet itself.

The same real parts as the plain demo (an upstream git repo, a workspace released by the relay's local
dispatch, the relay and the agents as processes, a supervisord and a store server per agent), with four
agents and a rollout policy on ``nats`` (waves 25 / 50 / 100 %: one agent, then two, then all four):

1. upstream tags a good version: it is built, released with the policy, and goes out wave by wave;
2. upstream tags a version that answers its health check and crashes a second later: the one agent of
   wave 1 installs it, sees the crash inside its settle window, rolls back and reports it; the relay
   halts the rollout; the other three never download it.

The checks are read from what the parts leave behind: the relay's fleet database (when each wave opened,
when each agent reported), each agent's binary, its service's answer and its store server's access log.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from sync_tools import signing
from sync_tools.demo import upstream
from sync_tools.demo.run import (
    Agent,
    DemoFailed,
    DemoResult,
    Procs,
    Step,
    StoreServer,
    _cli,
    _connected_agents,
    _workdir,
    _yaml,
    free_port,
    health,
    release_payload,
    sign_delivery,
    this_platform,
    wait_for,
)
from sync_tools.demo.supervisor import Program, Supervisor
from sync_tools.fsutil import sha256_file
from sync_tools.rollout import ranked, wave_size

NAME, BINARY = "nats", "nats-server"
OLD, GOOD, BAD = "v1.0.0", "v1.1.0", "v1.2.0"
AGENTS = ("agent-1", "agent-2", "agent-3", "agent-4")
POLICY = {"waves": [25, 50, 100], "min_healthy": 1, "settle_seconds": 2, "max_failures": 1, "min_age_seconds": 0}
AGENT_SETTLE = 3  # each agent watches a new build this long after its first healthy answer
CRASH_AFTER = 1.0
DEADLINE = 120.0


def run_fleet_demo(*, keep: bool = False, workdir: Path | None = None,
                   say: Callable[[str], None] = print) -> DemoResult:
    """Run the rollout demo; returns the timeline and the checks. Raises DemoFailed when a step does
    not happen in time. Every process started is stopped before this returns."""
    procs = Procs()
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with _workdir(keep, workdir) as tmp:
            servers: list[StoreServer] = []
            try:
                return _run(tmp, procs, servers, say)
            finally:
                procs.stop_all()
                for s in servers:
                    s.__exit__(None, None, None)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _workspace(ws: Path, repo: Path, platform: str, rollout: dict[str, Any] | None) -> Path:
    py = sys.executable
    sub: dict[str, Any] = {
        "upstream": str(repo), "strategy": "tags", "current": OLD, "binary": BINARY,
        "build": [f"{py} -m sync_tools.demo.kit src-update {NAME} {repo} {OLD}",
                  f"{py} -m sync_tools.demo.kit bin-build {NAME} {BINARY}"],
    }
    if rollout is not None:
        sub["rollout"] = rollout
    path = ws / "sync-tools.yaml"
    path.write_text(_yaml({"release": {"store": ".releases", "tag": "latest", "public_key": "keys/release.pub"},
                           "platforms": [platform], "subsystems": {NAME: sub}, "relay": {"dispatch": "local"}}))
    return path


def _agent_config(agent: Agent, ws: Path, source: str, relay_url: str, platform: str) -> Path:
    shutil.copy(ws / "keys" / "release.pub", agent.root / "release.pub")
    path = agent.root / "sync-tools.yaml"
    path.write_text(_yaml({
        "release": {"tag": "latest", "public_key": "release.pub"},
        "platforms": [platform],
        "subsystems": {NAME: {"binary": BINARY, "process": NAME,
                              "health": f"http://127.0.0.1:{agent.ports[NAME]}/health"}},
        "agent": {"id": agent.name, "root": ".", "source": source, "relay": relay_url, "reload": "supervisor",
                  "supervisor_url": f"unix://{agent.root / 'supervisor.sock'}", "platform": platform,
                  "health_timeout": 20, "settle_seconds": AGENT_SETTLE},
    }))
    return path


class _Relay:
    """What the demo reads from the relay: the operator API and its fleet database (read-only)."""

    def __init__(self, url: str, operator: str, fleet_db: Path):
        self.url, self.operator, self.fleet_db = url, operator, fleet_db

    def rollout(self, version: str) -> dict[str, Any] | None:
        r = requests.get(f"{self.url}/rollout/{NAME}", timeout=5,
                         headers={"Authorization": f"Bearer {self.operator}"})
        r.raise_for_status()
        return next((x for x in r.json()["rollouts"] if x["version"] == version), None)

    def rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(f"file:{self.fleet_db}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def opened(self, build: str) -> list[float]:
        rows = self.rows("SELECT opened FROM rollouts WHERE subsystem = ? AND build = ?", NAME, build)
        return json.loads(rows[0][0]) if rows else []

    def outcomes(self, build: str) -> tuple[dict[str, float], dict[str, float]]:
        rows = self.rows("SELECT agent, healthy_at, failed_at FROM outcomes WHERE subsystem = ? AND build = ?",
                         NAME, build)
        return {a: h for a, h, _ in rows if h is not None}, {a: f for a, _, f in rows if f is not None}

    def outcomes_reported(self, build: str) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for agent, outcome in self.rows("SELECT agent, outcome FROM reports WHERE subsystem = ? AND to_sha = ?",
                                        NAME, build):
            out.setdefault(agent, set()).add(outcome)
        return out


def _send_release(relay_url: str, secret: str, repo: Path, version: str, commit: str) -> float:
    body = json.dumps(release_payload(NAME, repo, version, commit)).encode()
    t0 = time.time()
    resp = requests.post(f"{relay_url}/webhook", data=body, timeout=10, headers={
        "Content-Type": "application/json", "X-GitHub-Event": "release", "X-GitHub-Delivery": str(uuid.uuid4()),
        "X-Hub-Signature-256": sign_delivery(secret, body), "User-Agent": "GitHub-Hookshot/demo"})
    if resp.status_code != 202:
        raise DemoFailed(f"the relay answered {resp.status_code} to the webhook: {resp.text[:200]}")
    return t0


def _version_of(agent: Agent) -> str | None:
    h = health(agent.ports[NAME])
    return h.get("version") if h else None


def _watch(what: str, relay: _Relay, version: str, agents: list[Agent], t0: float, procs: Procs,
           say: Callable[[str], None], done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Follow *version*'s rollout until *done*(status), printing each wave opening and each agent that
    starts answering as *version*, as they happen."""
    shown_wave = 0
    shown: set[str] = set()

    def step() -> dict[str, Any] | None:
        nonlocal shown_wave
        st = relay.rollout(version)
        if st is None:
            return None
        if st["wave"] > shown_wave:
            for w in range(shown_wave + 1, st["wave"] + 1):
                say(f"  {time.time() - t0:+7.2f}s  relay    wave {w} of {len(st['waves'])} open "
                    f"({st['waves'][w - 1]}% of {st['fleet']} agents)")
            shown_wave = st["wave"]
        for a in agents:
            if a.name not in shown and _version_of(a) == version:
                shown.add(a.name)
                say(f"  {time.time() - t0:+7.2f}s  {a.name}  answering as {version}")
        return st if done(st) else None

    return wait_for(what, step, DEADLINE, procs, interval=0.1)


def _run(tmp: Path, procs: Procs, servers: list[StoreServer], say: Callable[[str], None]) -> DemoResult:
    t_start = time.time()
    say(f"workdir: {tmp}")
    platform = this_platform()
    env = {k: v for k, v in os.environ.items() if k != "SYNC_TOOLS_CONFIG"}
    env.update(NO_PROXY="127.0.0.1,localhost", PYTHONUNBUFFERED="1")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(var, None)
    logs = tmp / "logs"
    logs.mkdir()

    # 1. The upstream, the workspace and the first release (no policy: the agents install it at once).
    repo = tmp / "upstream" / f"{NAME}-io" / NAME
    upstream.create_upstream(repo, NAME, OLD)
    ws = tmp / "workspace"
    ws.mkdir()
    signing.write_keypair(ws / "keys")
    config = _workspace(ws, repo, platform, None)
    env["SYNC_TOOLS_SIGNING_KEY"] = str(ws / "keys" / "release.key")
    with open(logs / "initial-release.log", "ab") as out:
        for step in ("build", "package", "release"):
            subprocess.run(_cli(step, "--config", str(config), "--only", NAME), cwd=ws, env=env, check=True,
                           stdout=out, stderr=subprocess.STDOUT, timeout=120)
    _workspace(ws, repo, platform, POLICY)  # from now on, every nats release carries the policy
    store = ws / ".releases" / "latest"
    say(f"initial release: {NAME} {OLD}; later releases carry the rollout policy {json.dumps(POLICY)}")

    # 2. The relay: local dispatch, one token per agent id, an operator token.
    secret, operator = uuid.uuid4().hex, uuid.uuid4().hex
    agents = [Agent(name, tmp / name, {NAME: free_port()}, uuid.uuid4().hex) for name in AGENTS]
    relay_url = f"http://127.0.0.1:{free_port()}"
    relay_env = dict(env, SYNC_TOOLS_WEBHOOK_SECRET=secret, SYNC_TOOLS_DB=str(ws / "relay.db"),
                     SYNC_TOOLS_AGENT_TOKENS=",".join(f"{a.name}={a.token}" for a in agents),
                     SYNC_TOOLS_OPERATOR_TOKEN=operator)
    procs.spawn(_cli("relay", "--config", str(config), "--host", "127.0.0.1", "--port", relay_url.rsplit(":", 1)[1]),
                env=relay_env, log=logs / "relay.log", cwd=ws)
    wait_for("the relay's /health", lambda: requests.get(f"{relay_url}/health", timeout=2).ok, 20, procs)
    relay = _Relay(relay_url, operator, ws / "relay.fleet.db")
    say(f"relay: {relay_url} (dispatch: local, {len(agents)} agent tokens)")

    # 3. Four agents: install the first release, services under supervisord, then follow the relay.
    for agent in agents:
        agent.root.mkdir()
        server = StoreServer(store).__enter__()
        servers.append(server)
        agent_config = _agent_config(agent, ws, server.url, relay_url, platform)
        agent_env = dict(env, SYNC_TOOLS_AGENT_TOKEN=agent.token)
        agent_env.pop("SYNC_TOOLS_SIGNING_KEY")
        sup = Supervisor(agent.root, [Program(NAME, str(agent.root / NAME / ".bin" / BINARY),
                                              {"PORT": str(agent.ports[NAME])})])
        procs.supervisors.append(sup)
        sup.start()
        with open(logs / f"{agent.name}-install.log", "ab") as out:
            subprocess.run(_cli("agent", "--config", str(agent_config), "--once"), cwd=agent.root, env=agent_env,
                           check=True, stdout=out, stderr=subprocess.STDOUT, timeout=60)
        wait_for(f"{agent.name} {NAME} healthy", lambda a=agent: health(a.ports[NAME]), 20, procs)
        procs.spawn(_cli("agent", "--config", str(agent_config)), env=agent_env, log=logs / f"{agent.name}.log",
                    cwd=agent.root)
    wait_for("every agent subscribed", lambda: _connected_agents(relay_url) >= len(agents), 30, procs)
    say(f"{len(agents)} agents running {NAME} {OLD} under supervisord, following {relay_url}/events")

    checks: list[tuple[str, bool, str]] = []
    steps: list[tuple[str, list[Step]]] = []
    ids = [a.name for a in agents]

    # 4. A good version: built, released with the policy, out wave by wave.
    commit = upstream.release(repo, NAME, GOOD)
    say(f"\nupstream {NAME} tagged {GOOD}; sending the signed release webhook ...")
    t0 = _send_release(relay_url, secret, repo, GOOD, commit)
    st = _watch(f"{GOOD} on every agent", relay, GOOD, agents, t0, procs, say,
                lambda s: s["state"] == "complete" and all(_version_of(a) == GOOD for a in agents))
    good = st["build"]
    wait_for(f"every agent reporting {GOOD} healthy", lambda: len(relay.outcomes(good)[0]) == len(agents), 30, procs)
    opened = relay.opened(good)
    healthy, _ = relay.outcomes(good)
    order = ranked(good, ids)
    waves = [order[: wave_size(p, len(ids))] for p in POLICY["waves"]]
    steps.append((GOOD, [Step(f"wave {k + 1} opened", t) for k, t in enumerate(opened)]
                  + [Step(f"{a} healthy", healthy[a]) for a in order]))
    in_order = all(healthy[a] >= opened[k] for k, members in enumerate(waves) for a in members
                   if k == 0 or a not in waves[k - 1])
    checks += [
        (f"{GOOD}: rollout complete, {len(opened)} waves opened one after another",
         st["state"] == "complete" and len(opened) == len(POLICY["waves"]) and opened == sorted(opened), ""),
        (f"{GOOD}: each agent installed it only once its wave was open", in_order,
         "; ".join(f"wave {k + 1}: {', '.join(w)}" for k, w in enumerate(waves))),
        (f"{GOOD}: every agent runs the released binary",
         all(sha256_file(a.root / NAME / ".bin" / BINARY) == good for a in agents), ""),
    ]

    # 5. A bad version: healthy for a second, then it crashes. Wave 1 only; the rollout halts.
    t_bad = time.time()
    commit = upstream.release(repo, NAME, BAD, crash_after=CRASH_AFTER)
    say(f"\nupstream {NAME} tagged {BAD} (it crashes {CRASH_AFTER:g}s after it starts); sending the webhook ...")
    t0 = _send_release(relay_url, secret, repo, BAD, commit)
    st = _watch(f"{BAD}'s rollout halted", relay, BAD, agents, t0, procs, say, lambda s: s["state"] == "halted")
    bad = st["build"]
    first = ranked(bad, ids)[: wave_size(POLICY["waves"][0], len(ids))]
    others = [a for a in agents if a.name not in first]
    wait_for("the other agents told to wait", lambda: all(
        "held" in relay.outcomes_reported(bad).get(a.name, set()) for a in others), 30, procs)
    wait_for(f"wave 1 back on {GOOD}", lambda: all(_version_of(a) == GOOD for a in agents if a.name in first),
             30, procs)
    say(f"  {time.time() - t0:+7.2f}s  relay    rollout halted: {st['reason']}")
    reported = relay.outcomes_reported(bad)
    _, failed = relay.outcomes(bad)
    # the asset or a patch to it (<asset stem>.<from>-<to>.hdiff): either way the build's bytes
    stem = f"{BINARY}-{platform.replace('/', '-')}"
    downloaded = [a.name for a, s in zip(agents, servers, strict=True) if any(stem in p for p in s.downloads(t_bad))]
    steps.append((BAD, [Step("wave 1 opened", (relay.opened(bad) or [None])[0])]
                  + [Step(f"{a} rolled back", failed.get(a)) for a in first]))
    checks += [
        (f"{BAD}: rollout halted by itself in wave 1", st["state"] == "halted" and st["wave"] == 1, st["reason"]),
        (f"{BAD}: wave 1 ({', '.join(first)}) installed it, saw the crash and rolled back",
         set(failed) == set(first) and all(reported.get(a) == {"rolled_back"} for a in first), ""),
        (f"{BAD}: only wave 1 downloaded it", sorted(downloaded) == sorted(first), ", ".join(downloaded) or "nobody"),
        (f"{BAD}: the other agents were held and never ran it",
         all(reported.get(a.name) == {"held"} for a in others), ""),
        (f"every agent runs {GOOD} again",
         all(_version_of(a) == GOOD and sha256_file(a.root / NAME / ".bin" / BINARY) == good for a in agents), ""),
    ]

    say("")
    for label, ok, detail in checks:
        say(f"  {'ok  ' if ok else 'FAIL'} {label}{f'  ({detail})' if detail else ''}")
    say(f"\nwhole demo: {time.time() - t_start:.1f}s")
    result = DemoResult(workdir=tmp, steps=steps, checks=checks)
    (tmp / "demo-result.json").write_text(json.dumps({
        "ok": result.ok, "policy": POLICY,
        "steps": {who: [{"step": s.name, "at": s.at} for s in ss] for who, ss in steps},
        "checks": [{"check": c, "ok": ok, "detail": d} for c, ok, d in checks],
        "builds": {GOOD: good, BAD: bad},
        "agents": {a.name: {"root": str(a.root), "ports": a.ports} for a in agents},
    }, indent=2))
    return result
