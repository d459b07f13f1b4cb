"""Shared material for the relay tests: a workspace config, signed deliveries, a signed store."""

from __future__ import annotations

import base64
import json
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sync_tools.config import Config, load_config
from sync_tools.manifest import Asset, Entry, Manifest, empty_manifest, sign_manifest, with_entry
from sync_tools.relay import webhook as wh
from sync_tools.relay.settings import load_settings
from sync_tools.signing import load_private_key, write_keypair
from sync_tools.stores.local import LocalStore

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "webhooks"
SECRET = "It's a Secret to Everybody"
TOKEN = "agent-token-1"
RELEASE_REPO = "acme/plat-telemetry"  # release.repo in CONFIG
AGENT_SECRET = "whsec_" + base64.b64encode(b"agent shared secret, 32 bytes!!").decode()

CONFIG = """\
release:
  repo: acme/plat-telemetry
  store: .releases
  tag: latest
  public_key: keys/release.pub
subsystems:
  nats:
    upstream: https://github.com/nats-io/nats-server
    include: '^v\\d+\\.\\d+\\.\\d+$'
  hello:
    upstream: {hello_upstream}
    strategy: {hello_strategy}
    {hello_extra}
  octo:
    upstream: git@github.com:octocoders/hello-world.git
    strategy: commits
    branch: master
  arc:
    upstream: https://ghe.example.com/basekick/arc.git
    strategy: commits
relay:
  dispatch: {dispatch}
  max_attempts: {max_attempts}
  max_body: {max_body}
  agents: {agents}
"""


def write_config(root: Path, *, dispatch: str = "github", max_attempts: int = 4, max_body: int = 1 << 20,
                 agents: list[dict[str, str]] | None = None, hello_strategy: str = "tags",
                 hello_extra: str = "", hello_upstream: str = "https://github.com/Codertocat/Hello-World") -> Config:
    """A sync-tools.yaml (with a fresh release key pair under keys/) in *root*; returns the Config."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "keys" / "release.key").exists():
        write_keypair(root / "keys")
    (root / "sync-tools.yaml").write_text(CONFIG.format(
        dispatch=dispatch, max_attempts=max_attempts, max_body=max_body, agents=json.dumps(agents or []),
        hello_strategy=hello_strategy, hello_extra=hello_extra, hello_upstream=hello_upstream))
    return load_config(root / "sync-tools.yaml")


def env(root: Path, **extra: str) -> dict[str, str]:
    base = {"SYNC_TOOLS_WEBHOOK_SECRET": SECRET, "GITHUB_TOKEN": "ghs_test", "SYNC_TOOLS_AGENT_TOKENS":
            f"{TOKEN}, other-token", "SYNC_TOOLS_DB": str(root / "relay.db"), "AGENT1_SECRET": AGENT_SECRET}
    base.update(extra)
    return base


def settings(config: Config, root: Path, **overrides: Any):  # type: ignore[no-untyped-def]
    values: dict[str, Any] = {"backoff_base": 0.02, "heartbeat": 0.3, "workers": 2}
    values.update(overrides)
    extra = {"GITHUB_API_URL": values.pop("github_api_url", "http://127.0.0.1:9")}
    key = config.root / "keys" / "release.key"  # dispatch: local needs what `release` signs with
    if key.is_file():
        extra["SYNC_TOOLS_SIGNING_KEY"] = str(key)
    return load_settings(config, env(root, **extra), **values)


def fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / name).read_text())


def fixture_names() -> list[str]:
    return sorted(p.name for p in FIXTURES.glob("*.json"))


@dataclass(frozen=True)
class Delivery:
    body: bytes
    headers: dict[str, str]


def delivery(event: str, payload: Any, *, secret: str = SECRET, delivery_id: str | None = None,
             form: bool = False, body: bytes | None = None, **headers: str) -> Delivery:
    """A GitHub delivery: body (JSON, or form ``payload=``) and headers, signed with *secret*."""
    if body is None:
        text = json.dumps(payload)
        if form:
            from urllib.parse import urlencode

            body = urlencode({"payload": text}).encode()
        else:
            body = text.encode()
    h = {
        "X-GitHub-Event": event,
        "X-GitHub-Delivery": delivery_id or str(uuid.uuid4()),
        "X-Hub-Signature-256": wh.sign(secret.encode(), body),
        "Content-Type": "application/x-www-form-urlencoded" if form else "application/json",
        "User-Agent": "GitHub-Hookshot/test",
    }
    h.update({k.replace("_", "-"): v for k, v in headers.items()})
    return Delivery(body, h)


def tag_payload(repo: str = "nats-io/nats-server", tag: str = "v2.10.25", host: str = "github.com") -> dict[str, Any]:
    """A ``create`` (tag) payload for *repo*, shaped like the vendored example."""
    p = fixture("create.0.json")
    p["ref"] = tag
    p["repository"]["full_name"] = repo
    p["repository"]["name"] = repo.split("/")[1]
    p["repository"]["html_url"] = f"https://{host}/{repo}"
    p["repository"]["clone_url"] = f"https://{host}/{repo}.git"
    p["repository"]["git_url"] = f"git://{host}/{repo}.git"
    p["repository"]["ssh_url"] = f"git@{host}:{repo}.git"
    p["repository"]["svn_url"] = f"https://{host}/{repo}"
    return p


def release_payload(repo: str = "acme/plat-telemetry", tag: str = "latest", action: str = "published") -> dict:
    p = fixture("release.published.0.json")
    p["action"] = action
    p["release"]["tag_name"] = tag
    for k, v in tag_payload(repo).get("repository", {}).items():
        if k in ("full_name", "name", "html_url", "clone_url", "git_url", "ssh_url", "svn_url"):
            p["repository"][k] = v
    return p


def publish(config: Config, name: str, version: str, *, serial_from: Manifest | None = None) -> Manifest:
    """Release *name* at *version* into the config's local store: a new signed manifest."""
    store = LocalStore(config.release.store_path(config.root), config.release.tag)
    store.ensure_release()
    snap = store.read_manifest()
    from sync_tools.manifest import parse_manifest

    base = parse_manifest(snap.data) if snap.data else empty_manifest()
    entry = Entry(version=version, commit=secrets.token_hex(20), built="2026-11-24T00:00:00Z",
                  assets={"linux/amd64": Asset(name=f"{name}-linux-amd64.tar.gz", size=10,
                                               sha256=secrets.token_hex(32), binary_sha256=secrets.token_hex(32))})
    m = with_entry(base, name, entry)
    key = load_private_key(str(config.root / "keys" / "release.key"))
    data, sig = sign_manifest(m, key)
    store.write_manifest(data, sig, snap.token)
    return m


@contextmanager
def serve_relay(config: Any, root: Path, **overrides: Any) -> Iterator[Any]:
    """The relay of *config* under a real server on port 0 (``settings(config, root, **overrides)``);
    stopped at the end."""
    from sync_tools.relay.app import create_app
    from sync_tools.relay.server import RelayServer

    server = RelayServer(create_app(config, settings(config, root, **overrides)), "127.0.0.1", 0).start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def running_relay(root: Path, github_api: Any, **config: Any) -> Iterator[Any]:
    """The relay under a real server on port 0, its config written under *root* (``write_config``'s
    keywords), dispatching to the GitHub API test server *github_api*; stopped at the end."""
    github_api.state.add_repo(RELEASE_REPO)
    with serve_relay(write_config(root, **config), root, github_api_url=github_api.url) as server:
        yield server
