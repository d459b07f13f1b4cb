"""The demo: one upstream release becomes exactly one rebuilt, released, downloaded and reloaded service.

Everything runs on loopback in a temporary directory, as separate processes talking the real
protocols: the relay (``sync-tools relay``, local dispatch), two agents (``sync-tools agent``) that
follow the relay's SSE stream, a supervisord per agent running the services, and an HTTP file server
per agent serving the release store (its access log shows what each agent downloaded).

The timeline is read afterwards from what each step leaves behind (the relay's SQLite outbox, file
mtimes, the access logs, the services' own start times), not from anything the parts print.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import http.server
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from sync_tools import signing
from sync_tools.demo import upstream
from sync_tools.demo.supervisor import Program, Supervisor
from sync_tools.errors import SyncToolsError
from sync_tools.fsutil import sha256_file

SUBSYSTEMS = {"nats": "nats-server", "arc": "arc"}
OLD, NEW = "v1.0.0", "v1.1.0"
AGENTS = ("agent-1", "agent-2")
DEADLINE = 90.0


class DemoFailed(SyncToolsError):
    """The demo's end state did not hold."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def this_platform() -> str:
    from sync_tools.agent.runner import detect_platform

    return detect_platform()


# ------------------------------------------------------------------------------------- file server


class _StoreHandler(http.server.SimpleHTTPRequestHandler):
    log: list[tuple[float, str]]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        self.log.append((time.time(), self.path))
        super().do_GET()


class StoreServer:
    """Serves one directory over HTTP on loopback and records every path requested, with its time."""

    def __init__(self, directory: Path):
        self.log: list[tuple[float, str]] = []
        handler = type("Handler", (_StoreHandler,), {"log": self.log})
        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> StoreServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def downloads(self, since: float) -> list[str]:
        """Assets and patches (sync_tools.patches) fetched since *since*."""
        return [p for t, p in self.log if t >= since and p.endswith((".tar.gz", ".hdiff"))]

    def first(self, suffix: str, since: float) -> float | None:
        return next((t for t, p in self.log if t >= since and p.endswith(suffix)), None)


# ---------------------------------------------------------------------------------------- processes


@dataclass
class Procs:
    """Every process the demo started, so Ctrl-C or a failure stops them all."""

    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    supervisors: list[Supervisor] = field(default_factory=list)

    def spawn(self, argv: list[str], *, env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen[bytes]:
        fh = open(log, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        fh.close()
        self.children.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in self.children:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.children:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        for sup in self.supervisors:
            sup.stop()


def wait_for(what: str, check: Callable[[], Any], timeout: float, procs: Procs, interval: float = 0.05) -> Any:
    """Wait until *check* returns something truthy; fail naming *what* (or a child that died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs.children:
            if proc.poll() is not None:
                raise DemoFailed(f"while waiting for {what}: {' '.join(map(str, proc.args[:3]))} "
                                 f"exited with {proc.returncode}")
        with contextlib.suppress(OSError, ValueError, requests.RequestException, sqlite3.Error):
            result = check()
            if result:
                return result
        time.sleep(interval)
    raise DemoFailed(f"timed out after {timeout:.0f}s waiting for {what}")


def health(port: int) -> dict[str, Any] | None:
    r = requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
    return r.json() if r.status_code == 200 else None


# ------------------------------------------------------------------------------------------ layout


@dataclass(frozen=True)
class Agent:
    name: str
    root: Path
    ports: dict[str, int]
    token: str


def _yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False)


def write_workspace(ws: Path, upstreams: dict[str, Path], platform: str) -> Path:
    py = sys.executable
    subs = {}
    for name, binary in SUBSYSTEMS.items():
        subs[name] = {
            "upstream": str(upstreams[name]),
            "strategy": "tags",
            "current": OLD,
            "binary": binary,
            "build": [f"{py} -m sync_tools.demo.kit src-update {name} {upstreams[name]} {OLD}",
                      f"{py} -m sync_tools.demo.kit bin-build {name} {binary}"],
        }
    config = {
        "release": {"store": ".releases", "tag": "latest", "public_key": "keys/release.pub"},
        "platforms": [platform],
        "subsystems": subs,
        "relay": {"dispatch": "local"},
    }
    path = ws / "sync-tools.yaml"
    path.write_text(_yaml(config))
    return path


def write_agent_config(agent: Agent, ws: Path, upstreams: dict[str, Path], source: str, relay_url: str,
                       platform: str) -> Path:
    subs = {
        name: {"upstream": str(upstreams[name]), "current": OLD, "binary": binary, "process": name,
               "health": f"http://127.0.0.1:{agent.ports[name]}/health"}
        for name, binary in SUBSYSTEMS.items()
    }
    shutil.copy(ws / "keys" / "release.pub", agent.root / "release.pub")
    config = {
        "release": {"tag": "latest", "public_key": "release.pub"},
        "platforms": [platform],
        "subsystems": subs,
        "agent": {"root": ".", "source": source, "relay": relay_url, "reload": "supervisor",
                  "supervisor_url": f"unix://{agent.root / 'supervisor.sock'}", "platform": platform,
                  "health_timeout": 20},
    }
    path = agent.root / "sync-tools.yaml"
    path.write_text(_yaml(config))
    return path


def release_payload(name: str, repo_path: Path, version: str, commit: str) -> dict[str, Any]:
    """A ``release`` ``published`` delivery as GitHub sends it (the fields the relay reads, and the
    usual company), for a repository that lives on this machine."""
    url = f"file://{repo_path}"
    return {
        "action": "published",
        "release": {
            "id": 1, "tag_name": version, "target_commitish": commit, "name": f"{name} {version}",
            "draft": False, "prerelease": False, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ"), "html_url": f"{url}/releases/{version}",
            "author": {"login": "demo", "id": 1, "type": "User"}, "assets": [],
        },
        "repository": {"id": 1, "name": repo_path.name, "full_name": f"{repo_path.parent.name}/{repo_path.name}",
                       "private": False, "html_url": url, "clone_url": url, "default_branch": "main"},
        "sender": {"login": "demo", "id": 1, "type": "User"},
    }


def sign_delivery(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


# ------------------------------------------------------------------------------------------ the run


@dataclass
class Step:
    name: str
    at: float | None
    detail: str = ""


@dataclass
class DemoResult:
    workdir: Path
    steps: list[tuple[str, list[Step]]]
    checks: list[tuple[str, bool, str]]

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)


def _mtime(p: Path) -> float | None:
    try:
        return p.stat().st_mtime
    except FileNotFoundError:
        return None


def _snapshot(path: Path) -> tuple[str, float] | None:
    if not path.exists():
        return None
    return sha256_file(path), path.stat().st_mtime


def _relay_times(db: Path, delivery: str) -> tuple[float | None, float | None]:
    """(queued, agent event published) times from the relay's own SQLite outbox."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute("SELECT MIN(created) FROM jobs WHERE delivery = ?", (delivery,)).fetchone()
        queued = row[0] if row else None
        row = conn.execute("SELECT MIN(created) FROM events").fetchone()
        return queued, (row[0] if row else None)
    finally:
        conn.close()


def _dispatch_started(logs: Path, delivery: str) -> float | None:
    """When the local dispatcher started the build: its run log is named ``<UTC start>-<delivery>.log``."""
    for log in logs.glob(f"*-{delivery}.log"):
        stamp = log.name[: -len(f"-{delivery}.log")]
        with contextlib.suppress(ValueError):
            return datetime.strptime(stamp, "%Y%m%dT%H%M%S.%fZ").replace(tzinfo=UTC).timestamp()
    return None


@contextlib.contextmanager
def _workdir(keep: bool, workdir: Path | None) -> Iterator[Path]:
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir.resolve()
        return
    path = Path(tempfile.mkdtemp(prefix="sync-tools-demo-"))
    try:
        yield path
    finally:
        if not keep:
            shutil.rmtree(path, ignore_errors=True)


def run_demo(*, keep: bool = False, workdir: Path | None = None,
             say: Callable[[str], None] = print) -> DemoResult:
    """Run the whole loop; returns the timeline and the checks. Raises DemoFailed when a step
    does not happen in time. Every process started is stopped before this returns."""
    procs = Procs()
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        with _workdir(keep, workdir) as tmp:
            try:
                return _run(tmp, procs, say)
            finally:
                # before the workdir goes: supervisord is shut down through its socket in there
                procs.stop_all()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sync_tools", *args]


def _run(tmp: Path, procs: Procs, say: Callable[[str], None]) -> DemoResult:
    t_start = time.time()
    say(f"workdir: {tmp}")
    platform = this_platform()
    env = {k: v for k, v in os.environ.items() if k not in ("SYNC_TOOLS_CONFIG",)}
    env.update(NO_PROXY="127.0.0.1,localhost", PYTHONUNBUFFERED="1")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(var, None)
    logs = tmp / "logs"
    logs.mkdir()

    # 1. Upstreams, workspace, signing key, first release of both subsystems.
    upstreams = {name: tmp / "upstream" / f"{name}-io" / name for name in SUBSYSTEMS}
    for name, path in upstreams.items():
        upstream.create_upstream(path, name, OLD)
    ws = tmp / "workspace"
    ws.mkdir()
    signing.write_keypair(ws / "keys")
    config = write_workspace(ws, upstreams, platform)
    env["SYNC_TOOLS_SIGNING_KEY"] = str(ws / "keys" / "release.key")
    for step in ("build", "package", "release"):
        subprocess.run(_cli(step, "--config", str(config), "--only", ",".join(SUBSYSTEMS)), cwd=ws, env=env,
                       check=True, stdout=open(logs / "initial-release.log", "ab"), stderr=subprocess.STDOUT,
                       timeout=120)
    store = ws / ".releases" / "latest"
    say(f"initial release: {', '.join(f'{n} {OLD}' for n in SUBSYSTEMS)} in {store}")

    # 2. Relay on loopback, local dispatch.
    secret = uuid.uuid4().hex
    agents = [Agent(name, tmp / name, {n: free_port() for n in SUBSYSTEMS}, uuid.uuid4().hex) for name in AGENTS]
    relay_port = free_port()
    relay_url = f"http://127.0.0.1:{relay_port}"
    relay_env = dict(env, SYNC_TOOLS_WEBHOOK_SECRET=secret, SYNC_TOOLS_DB=str(ws / "relay.db"),
                     SYNC_TOOLS_AGENT_TOKENS=",".join(a.token for a in agents))
    procs.spawn(_cli("relay", "--config", str(config), "--host", "127.0.0.1", "--port", str(relay_port)),
                env=relay_env, log=logs / "relay.log", cwd=ws)
    wait_for("the relay's /health", lambda: requests.get(f"{relay_url}/health", timeout=2).ok, 20, procs)
    say(f"relay: {relay_url} (dispatch: local)")

    # 3. Agents: install the first release once, run the services under supervisord, then follow SSE.
    servers = []
    for agent in agents:
        agent.root.mkdir()
        server = StoreServer(store).__enter__()
        servers.append(server)
        agent_config = write_agent_config(agent, ws, upstreams, server.url, relay_url, platform)
        agent_env = dict(env, SYNC_TOOLS_AGENT_TOKEN=agent.token)
        agent_env.pop("SYNC_TOOLS_SIGNING_KEY")
        # supervisord first: its programs cannot start until the agent has installed them.
        sup = Supervisor(agent.root, [
            Program(name, str(agent.root / name / ".bin" / binary), {"PORT": str(agent.ports[name])})
            for name, binary in SUBSYSTEMS.items()])
        procs.supervisors.append(sup)
        sup.start()
        subprocess.run(_cli("agent", "--config", str(agent_config), "--once"), cwd=agent.root, env=agent_env,
                       check=True, stdout=open(logs / f"{agent.name}-install.log", "ab"),
                       stderr=subprocess.STDOUT, timeout=60)
        for name in SUBSYSTEMS:
            wait_for(f"{agent.name} {name} healthy", lambda a=agent, n=name: health(a.ports[n]), 20, procs)
        procs.spawn(_cli("agent", "--config", str(agent_config)), env=agent_env,
                    log=logs / f"{agent.name}.log", cwd=agent.root)
        say(f"{agent.name}: {', '.join(f'{n} {OLD}' for n in SUBSYSTEMS)} running under supervisord; "
            f"following {relay_url}/events")
    wait_for("both agents subscribed", lambda: _connected_agents(relay_url) >= len(agents), 30, procs)

    before = {
        "ws": {n: _snapshot(ws / n / ".bin" / b) for n, b in SUBSYSTEMS.items()},
        "dist": {p.name: _snapshot(p) for p in (ws / ".dist").glob("*.tar.gz")},
        "manifest": json.loads((store / "manifest.json").read_bytes()),
        "agents": {a.name: {n: (_snapshot(a.root / n / ".bin" / b), procs.supervisors[i].pid(n))
                            for n, b in SUBSYSTEMS.items()} for i, a in enumerate(agents)},
    }

    # 4. Upstream nats releases; GitHub (here: the demo) sends the signed webhook.
    commit = upstream.release(upstreams["nats"], "nats", NEW)
    body = json.dumps(release_payload("nats", upstreams["nats"], NEW, commit)).encode()
    delivery = str(uuid.uuid4())
    t0 = time.time()
    say(f"\nupstream nats tagged {NEW} ({commit[:12]}); sending the signed release webhook ...")
    resp = requests.post(f"{relay_url}/webhook", data=body, timeout=10, headers={
        "Content-Type": "application/json", "X-GitHub-Event": "release", "X-GitHub-Delivery": delivery,
        "X-Hub-Signature-256": sign_delivery(secret, body), "User-Agent": "GitHub-Hookshot/demo"})
    t_verified = time.time()
    if resp.status_code != 202:
        raise DemoFailed(f"the relay answered {resp.status_code} to the webhook: {resp.text[:200]}")

    # 5. Wait for the end state: every agent's nats answers with the new version (watched side by
    #    side, so each agent's time is its own).
    healthy_at: dict[str, float] = {}

    def all_healthy() -> bool:
        for a in agents:
            if a.name not in healthy_at:
                h = health(a.ports["nats"])
                if h and h.get("version") == NEW:
                    healthy_at[a.name] = time.time()
        return len(healthy_at) == len(agents)

    wait_for(f"every agent's nats healthy at {NEW}", all_healthy, DEADLINE, procs, interval=0.02)
    t_end = time.time()
    queued, published = _relay_times(ws / "relay.db", delivery)
    dispatched = _dispatch_started(ws / "relay-logs" / "nats", delivery)

    # 6. Timeline, from what each step left behind.
    ws_version = ws / "nats" / ".bin" / ".version"
    shared = [
        Step("verified", t_verified, f"HTTP {resp.status_code}, delivery committed to the outbox"),
        Step("dispatched", dispatched, f"local build started (queued at {(queued or t0) - t0:+.3f}s)"),
        Step("built only nats", _mtime(ws_version), f"workspace nats/.bin/.version -> {NEW}"),
        Step("released", _mtime(store / "manifest.json"),
             f"manifest serial {before['manifest']['serial']} -> "
             f"{json.loads((store / 'manifest.json').read_bytes())['serial']}"),
        Step("agents notified", published, "release.updated on /events"),
    ]
    steps: list[tuple[str, list[Step]]] = [("relay", shared)]
    checks: list[tuple[str, bool, str]] = []
    for i, agent in enumerate(agents):
        h = health(agent.ports["nats"]) or {}
        bin_dir = agent.root / "nats" / ".bin"
        nats_asset = json.loads((store / "manifest.json").read_bytes())["subsystems"]["nats"]["assets"][platform]
        got = [p.lstrip("/") for p in servers[i].downloads(t0)]
        saved = "".join(f" (a patch: {(store / p).stat().st_size} of the asset's {nats_asset['size']} bytes)"
                        for p in got if p.endswith(".hdiff") and (store / p).is_file())
        steps.append((agent.name, [
            Step("downloaded only nats", min(filter(None, (servers[i].first(p, t0) for p in got)), default=None),
                 (", ".join(got) or "nothing") + saved),
            Step("swapped", _mtime(bin_dir / ".version"), ".bin/.previous kept"),
            Step("reloaded", h.get("started"), f"supervisord restarted nats (pid {h.get('pid')})"),
            Step("healthy", healthy_at[agent.name], f"/health says {h.get('version')}"),
        ]))
    _print_timeline(say, t0, steps)

    # 7. The checks: nats moved everywhere, arc moved nowhere.
    after_manifest = json.loads((store / "manifest.json").read_bytes())
    checks.append(("nats rebuilt in the workspace", before["ws"]["nats"] != _snapshot(ws / "nats" / ".bin/nats-server"),
                   ""))
    checks.append(("arc not rebuilt (same bytes and mtime)",
                   before["ws"]["arc"] == _snapshot(ws / "arc" / ".bin" / "arc"), ""))
    checks.append(("arc's asset and manifest entry untouched",
                   all(before["dist"][k] == _snapshot(ws / ".dist" / k) for k in before["dist"] if k.startswith("arc-"))
                   and before["manifest"]["subsystems"]["arc"] == after_manifest["subsystems"]["arc"], ""))
    checks.append((f"manifest: nats {NEW}, serial raised",
                   after_manifest["subsystems"]["nats"]["version"] == NEW
                   and after_manifest["serial"] > before["manifest"]["serial"], ""))
    for i, agent in enumerate(agents):
        sup = procs.supervisors[i]
        downloads = servers[i].downloads(t0)
        (arc_snap, arc_pid) = before["agents"][agent.name]["arc"]
        (_, nats_pid) = before["agents"][agent.name]["nats"]
        want = after_manifest["subsystems"]["nats"]["assets"][platform]["binary_sha256"]
        checks += [
            (f"{agent.name}: downloaded only nats", len(downloads) == 1 and "nats-server" in downloads[0],
             ", ".join(downloads)),
            (f"{agent.name}: nats binary is the released one",
             sha256_file(agent.root / "nats" / ".bin" / "nats-server") == want, ""),
            (f"{agent.name}: previous nats kept in .bin/.previous",
             (agent.root / "nats" / ".bin" / ".previous" / "nats-server").exists(), ""),
            (f"{agent.name}: nats restarted", sup.pid("nats") != nats_pid, f"pid {nats_pid} -> {sup.pid('nats')}"),
            (f"{agent.name}: arc not downloaded, rewritten or restarted",
             arc_snap == _snapshot(agent.root / "arc" / ".bin" / "arc") and sup.pid("arc") == arc_pid,
             f"pid {arc_pid}"),
        ]
    say("")
    for label, ok, detail in checks:
        say(f"  {'ok  ' if ok else 'FAIL'} {label}{f'  ({detail})' if detail else ''}")
    say(f"\nwhole demo: {time.time() - t_start:.1f}s; webhook to last agent healthy: {t_end - t0:.2f}s")
    result = DemoResult(workdir=tmp, steps=steps, checks=checks)
    (tmp / "demo-result.json").write_text(json.dumps({
        "ok": result.ok, "t0": t0,
        "steps": {who: [{"step": s.name, "at": s.at, "detail": s.detail} for s in ss] for who, ss in steps},
        "checks": [{"check": c, "ok": ok, "detail": d} for c, ok, d in checks],
        "agents": {a.name: {"root": str(a.root), "ports": a.ports} for a in agents},
    }, indent=2))
    for server in servers:
        server.__exit__(None, None, None)
    return result


def _connected_agents(relay_url: str) -> int:
    """Connected SSE subscribers, read from the relay's Prometheus metrics."""
    text = requests.get(f"{relay_url}/metrics", timeout=2).text
    for line in text.splitlines():
        if line.startswith("sync_tools_relay_connected_agents"):
            return int(float(line.split()[-1]))
    return 0


def _print_timeline(say: Callable[[str], None], t0: float, steps: list[tuple[str, list[Step]]]) -> None:
    say("\ntimeline (seconds after the webhook was sent):")
    for who, ss in steps:
        for s in ss:
            at = f"{s.at - t0:+7.3f}s" if s.at is not None else "      - "
            say(f"  {at}  {who:<8} {s.name:<22} {s.detail}")
