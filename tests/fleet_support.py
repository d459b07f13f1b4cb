"""Shared material for the fleet and rollout tests: a relay with 22 agent tokens and an operator
token under a real server, a controllable clock, signed manifests carrying rollout policies, and a
simulated agent that speaks the contract over HTTP."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

from sync_tools.config import Config, load_config
from sync_tools.manifest import (
    Asset,
    Entry,
    empty_manifest,
    format_time,
    parse_manifest,
    sign_manifest,
    with_entry,
)
from sync_tools.relay.app import create_app, get_relay
from sync_tools.relay.server import RelayServer
from sync_tools.relay.settings import load_settings
from sync_tools.relay.webhook import sign
from sync_tools.rollout import RolloutPolicy, ranked, wave_size
from sync_tools.signing import load_private_key
from sync_tools.stores.local import LocalStore
from tests.relay_support import SECRET, env, write_config

AGENTS = [f"agent-{i:02d}" for i in range(22)]
OPERATOR = "operator-token-0123456789"
PLATFORM = "linux/amd64"


def token(agent: str) -> str:
    return f"tok-{agent}-{'x' * 12}"


class Clock:
    """The relay's clock: real time plus an offset the test moves forward (a settle time or a
    release age passes without waiting for it)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


def relay_env(root: Path, agents: list[str] = AGENTS, **extra: str) -> dict[str, str]:
    tokens = ",".join(f"{a}={token(a)}" for a in agents) + ",bare-sse-token"
    return env(root, SYNC_TOOLS_AGENT_TOKENS=tokens, SYNC_TOOLS_OPERATOR_TOKEN=OPERATOR,
               GITHUB_API_URL="http://127.0.0.1:9", **extra)


@contextmanager
def fleet_relay(root: Path, clock: Clock, *, agents: list[str] = AGENTS, **overrides: Any) -> Iterator[RelayServer]:
    """The relay under a real server on loopback port 0, its config and database under *root*
    (kept across calls: a second call is a restart)."""
    config = load_config(root / "sync-tools.yaml") if (root / "sync-tools.yaml").exists() else write_config(root)
    values: dict[str, Any] = {"backoff_base": 0.02, "heartbeat": 0.3, "workers": 2}
    values.update(overrides)
    settings = load_settings(config, relay_env(root, agents), **values)
    server = RelayServer(create_app(config, settings, now=clock), "127.0.0.1", 0).start()
    try:
        yield server
    finally:
        server.stop()


def publish(config: Config, name: str, version: str, *, rollout: dict[str, Any] | None, built: float,
            build: str | None = None) -> str:
    """Release *name* at *version* with *rollout* into the config's local store (a new signed
    manifest); returns the build (the linux/amd64 binary's sha256)."""
    build = build or secrets.token_hex(32)
    publish_builds(config, name, version, {PLATFORM: build}, rollout=rollout, built=built)
    return build


def publish_builds(config: Config, name: str, version: str, builds: dict[str, str], *,
                   rollout: dict[str, Any] | None, built: float) -> None:
    """Release *name* at *version* with *rollout* into the config's local store (a new signed
    manifest): one entry with an asset per platform in *builds* (platform -> the binary's sha256)."""
    store = LocalStore(config.release.store_path(config.root), config.release.tag)
    store.ensure_release()
    snap = store.read_manifest()
    base = parse_manifest(snap.data) if snap.data else empty_manifest()
    assets = {p: Asset(name=f"{name}-{p.replace('/', '-')}.tar.gz", size=10, sha256=secrets.token_hex(32),
                       binary_sha256=b) for p, b in builds.items()}
    entry = Entry(version=version, commit=secrets.token_hex(20), built=format_time(datetime.fromtimestamp(built, UTC)),
                  assets=assets, rollout=None if rollout is None else RolloutPolicy.from_json(rollout))
    m = with_entry(base, name, entry)
    key = load_private_key(str(config.root / "keys" / "release.key"))
    data, sig = sign_manifest(m, key)
    store.write_manifest(data, sig, snap.token)


def notify(server: RelayServer) -> None:
    body = b"{}"
    r = requests.post(server.url + "/notify", data=body, timeout=5,
                      headers={"Content-Type": "application/json",
                               "X-Hub-Signature-256": sign(SECRET.encode(), body)})
    assert r.status_code == 202, r.text


def wait_for(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Poll *check* until it returns something truthy (the relay's worker runs on its own thread)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def members(build: str, percent: float, agents: list[str] = AGENTS) -> list[str]:
    """The contract's wave membership: the first max(1, ceil(p * N / 100)) agents by
    sha256(build + ":" + id)."""
    return ranked(build, agents)[: wave_size(percent, len(agents))]


class Agent:
    """One simulated agent speaking the contract: asks GET /rollout, POSTs /report."""

    def __init__(self, url: str, agent: str, session: requests.Session, tok: str | None = None):
        self.url = url
        self.id = agent
        self.session = session
        self.headers = {"Authorization": f"Bearer {tok or token(agent)}"}
        self.runs: str | None = None

    def ask(self, build: str, subsystem: str = "nats") -> dict[str, Any]:
        r = self.session.get(f"{self.url}/rollout/{subsystem}/{build}", headers=self.headers, timeout=5)
        assert r.status_code == 200, r.text
        return r.json()

    def report(self, outcome: str, to: str | None, *, subsystem: str = "nats", frm: str | None = None,
               version: str = "v1", **extra: Any) -> requests.Response:
        body = {"agent": self.id, "subsystem": subsystem, "platform": PLATFORM, "from": frm if frm else self.runs,
                "to": to, "version": version, "serial": 1, "outcome": outcome, "error": None,
                "times": {"download": 0.1, "install": 0.01, "health": 0.5}, "patch": None}
        body.update(extra)
        r = self.session.post(f"{self.url}/report", json=body, headers=self.headers, timeout=5)
        if r.status_code == 202 and outcome in ("updated", "running"):
            self.runs = to
        return r


def operator(server: RelayServer, method: str, path: str, **kw: Any) -> requests.Response:
    return requests.request(method, server.url + path, headers={"Authorization": f"Bearer {OPERATOR}"}, timeout=5,
                            **kw)


def rollout_of(server: RelayServer, subsystem: str = "nats") -> dict[str, Any] | None:
    r = operator(server, "GET", f"/rollout/{subsystem}")
    assert r.status_code == 200, r.text
    rollouts = r.json()["rollouts"]
    return rollouts[0] if rollouts else None


def last_event(server: RelayServer) -> int:
    return get_relay(server.app).outbox.last_event_id()
