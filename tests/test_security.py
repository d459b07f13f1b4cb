"""Security checks across the relay and the agent.

- No secret or token appears in any log: a relay and an agent run as real processes at DEBUG (``-vv``),
  through accepted, refused, failed and retried deliveries, an SSE stream, a signed push and an update;
  plus an in-process relay and agent with every logger captured at DEBUG. Each secret is a distinctive
  value grepped for in every log.
- The relay never requests a URL taken from a payload: every URL in the deliveries points to a loopback
  canary, which must receive nothing.
- ``GET /events`` refuses missing and wrong tokens.
- The agent's push endpoint refuses stale (and far-future) timestamps, bad signatures and replays.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
from standardwebhooks import Webhook
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from sync_tools.agent.events import WebhookVerifier, create_receiver
from sync_tools.relay import webhook as wh
from sync_tools.relay.app import create_app, get_relay
from sync_tools.relay.server import RelayServer
from sync_tools.relay.settings import load_settings
from tests.agent_support import close_world, free_port, make_world, wait_http
from tests.relay_support import release_payload, tag_payload
from tests.reliability.relay_crash import RelayProcess, relay_env
from tests.servers.github_api import GitHubAPIServer
from tests.support import wait_for

# Distinctive values: any of them in a log line is a leak.
WEBHOOK_SECRET = "whk-S3CRET-4f9a1c7e2b"
NOTIFY_SECRET = "ntf-S3CRET-8d2e6b0a13"
GITHUB_TOKEN = "ghs_T0KEN_c81f04d9e7a2"
AGENT_TOKEN = "agt-T0KEN-5e3b9d1c70"
OTHER_AGENT_TOKEN = "agt-T0KEN-other-66a0f3"
PUSH_KEY = b"push-K3Y-raw-bytes-0123456789abcd"
PUSH_SECRET = "whsec_" + base64.b64encode(PUSH_KEY).decode()
SECRETS = (WEBHOOK_SECRET, NOTIFY_SECRET, GITHUB_TOKEN, AGENT_TOKEN, OTHER_AGENT_TOKEN, PUSH_SECRET,
           base64.b64encode(PUSH_KEY).decode(), PUSH_KEY.decode())
RELEASE_REPO = "acme/plat-telemetry"





def assert_no_secret(texts: dict[str, str]) -> None:
    for name, text in texts.items():
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} appears in {name}"


def signed(event: str, payload: Any, secret: str = WEBHOOK_SECRET) -> dict[str, Any]:
    body = json.dumps(payload).encode()
    return {"data": body, "timeout": 10, "headers": {
        "X-GitHub-Event": event, "X-GitHub-Delivery": str(uuid.uuid4()), "Content-Type": "application/json",
        "X-Hub-Signature-256": wh.sign(secret.encode(), body)}}


def relay_config(root: Path, store: Path, public_key: Path, agent_url: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    agents = json.dumps([{"url": agent_url, "secret_env": "AGENT1_SECRET"}] if agent_url else [])
    path = root / "sync-tools.yaml"
    path.write_text(
        f"release:\n  repo: {RELEASE_REPO}\n  store: {store}\n  tag: latest\n  public_key: {public_key}\n"
        "subsystems:\n  nats:\n    upstream: https://github.com/nats-io/nats-server\n    binary: nats-server\n"
        f"relay:\n  dispatch: github\n  max_attempts: 3\n  agents: {agents}\n")
    return path


# ------------------------------------------------------------------------------- secrets in logs


def test_no_secret_in_any_log_of_a_relay_and_agent_run(tmp_path: Path) -> None:
    world = make_world(tmp_path / "user", {"nats": "nats-server"})
    agent_port = free_port()
    api = GitHubAPIServer(token=GITHUB_TOKEN).start()
    relay = agent = None
    try:
        api.state.add_repo(RELEASE_REPO)
        # failures whose handling logs: a reset, a 500, and a refusal echoing GitHub's message
        api.inject("POST", "/dispatches$", reset=True, status=None)
        api.inject("POST", "/dispatches$", status=500)
        relay_root = tmp_path / "relay"
        relay_config(relay_root, world.store.store, world.base / "keys" / "release.pub",
                     f"http://127.0.0.1:{agent_port}/webhook")
        env = relay_env(relay_root, api.url, secret=WEBHOOK_SECRET, token=GITHUB_TOKEN, extra={
            "SYNC_TOOLS_NOTIFY_SECRET": NOTIFY_SECRET, "AGENT1_SECRET": PUSH_SECRET,
            "SYNC_TOOLS_AGENT_TOKENS": f"{AGENT_TOKEN},{OTHER_AGENT_TOKEN}"})
        relay = RelayProcess(relay_root, env, verbosity="-vv")
        url = relay.start()

        with open(world.config_path, "a") as f:
            f.write(f"  relay: {url}\n  listen: 127.0.0.1:{agent_port}\n")
        agent_env = {k: v for k, v in env.items() if not k.startswith(("SYNC_TOOLS_", "AGENT1", "GITHUB"))}
        agent_env.update({"SYNC_TOOLS_AGENT_TOKEN": AGENT_TOKEN, "SYNC_TOOLS_AGENT_SECRET": PUSH_SECRET})
        agent_log = tmp_path / "agent.log"
        with open(agent_log, "wb") as logf:
            agent = subprocess.Popen([sys.executable, "-m", "sync_tools", "-vv", "agent", "--source",
                                      world.server.url, "--config", str(world.config_path)],
                                     env=agent_env, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
        wait_http(f"http://127.0.0.1:{agent_port}/health", timeout=30)
        wait_for(lambda: get_connected(url), what="the agent's SSE stream")

        # an upstream tag: accepted, dispatched after a reset and a 500
        tag = signed("create", tag_payload(tag="v2.11.0"))
        assert requests.post(url + "/webhook", **tag).status_code == 202
        assert requests.post(url + "/webhook", **tag).json()["status"] == "duplicate"
        # refused: wrong secret, no signature, malformed JSON
        assert requests.post(url + "/webhook", **signed("create", tag_payload(), "wrong")).status_code == 401
        assert requests.post(url + "/webhook", data=b"{}", timeout=10,
                             headers={"X-GitHub-Event": "push", "X-GitHub-Delivery": "x1"}).status_code == 401
        bad = signed("push", {})
        bad["data"] = b"{not json"
        bad["headers"]["X-Hub-Signature-256"] = wh.sign(WEBHOOK_SECRET.encode(), bad["data"])
        assert requests.post(url + "/webhook", **bad).status_code == 400
        # /events with a wrong token; the notify endpoint with the webhook secret instead of its own
        assert requests.get(url + "/events", headers={"Authorization": f"Bearer {AGENT_TOKEN}x"},
                            timeout=5).status_code == 401
        assert requests.post(url + "/notify", **signed("release", {}, WEBHOOK_SECRET)).status_code == 401
        wait_for(lambda: api.state.dispatches, what="the dispatch")

        # a new release: the relay's own release webhook -> SSE + signed push -> the agent updates
        world.publish("nats", "v2")
        assert requests.post(url + "/webhook", **signed("release", release_payload(RELEASE_REPO))).status_code == 202
        wait_for(lambda: world.health("nats").startswith("nats-v2"), timeout=30, what="the agent's update")
        # a forged push to the agent
        assert requests.post(f"http://127.0.0.1:{agent_port}/webhook", data=b'{"type":"release.updated"}',
                             headers={"webhook-id": "m1", "webhook-timestamp": str(int(time.time())),
                                      "webhook-signature": "v1,AAAA"}, timeout=5).status_code == 401
        # a dispatch GitHub refuses (bad credentials): dead-lettered, its error logged
        api.inject("POST", "/dispatches$", status=401, body={"message": "Bad credentials",
                                                             "documentation_url": "https://docs.github.com/rest"})
        assert requests.post(url + "/webhook", **signed("create", tag_payload(tag="v2.12.0"))).status_code == 202
        wait_for(lambda: requests.get(url + "/health", timeout=5).json()["dead_letters"] == 1, what="dead letter")
    finally:
        if agent is not None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(15)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait(5)
        if relay is not None:
            relay.stop()
        api.stop()
        sv_logs = {str(p): p.read_text(errors="replace") for p in world.supervisor.dir.glob("*.log")}
        close_world(world)

    logs = {"relay": relay.log_text(), "agent": (tmp_path / "agent.log").read_text(errors="replace"), **sv_logs}
    relay_dir_logs = {str(p): p.read_text(errors="replace") for p in (tmp_path / "relay").rglob("*.log")}
    logs.update(relay_dir_logs)
    # the logs are real DEBUG logs of this flow, not empty files
    assert " DEBUG " in logs["relay"] and " DEBUG " in logs["agent"]
    assert tag["headers"]["X-GitHub-Delivery"] in logs["relay"]
    assert "dead-lettered" in logs["relay"] and "refused" in logs["agent"]
    assert_no_secret(logs)


def get_connected(url: str) -> bool:
    try:
        return requests.get(url + "/health", timeout=2).json().get("connected_agents", 0) > 0
    except (requests.RequestException, ValueError):
        return False


def test_no_secret_in_in_process_logs_at_debug(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The same parts in this process, every logger at DEBUG (urllib3's request lines included)."""
    caplog.set_level(logging.DEBUG)
    world = make_world(tmp_path / "user", {"nats": "nats-server"})
    api = GitHubAPIServer(token=GITHUB_TOKEN).start()
    try:
        api.state.add_repo(RELEASE_REPO)
        api.inject("POST", "/dispatches$", status=403, headers={"X-RateLimit-Remaining": "0",
                                                                 "X-RateLimit-Reset": str(int(time.time()) + 1)})
        cfg = relay_config(tmp_path / "relay", world.store.store, world.base / "keys" / "release.pub")
        from sync_tools.config import load_config

        config = load_config(cfg)
        settings = load_settings(config, {"SYNC_TOOLS_WEBHOOK_SECRET": WEBHOOK_SECRET, "GITHUB_TOKEN": GITHUB_TOKEN,
                                          "GITHUB_API_URL": api.url, "SYNC_TOOLS_DB": str(tmp_path / "r.db"),
                                          "SYNC_TOOLS_AGENT_TOKENS": AGENT_TOKEN}, backoff_base=0.05)
        server = RelayServer(create_app(config, settings), "127.0.0.1", 0).start()
        try:
            assert requests.post(server.url + "/webhook", **signed("create", tag_payload(tag="v3.0.0"))).status_code == 202
            assert requests.post(server.url + "/webhook", **signed("create", tag_payload(), "x")).status_code == 401
            assert requests.get(server.url + "/events", headers={"Authorization": "Bearer nope"},
                                timeout=5).status_code == 401
            wait_for(lambda: api.state.dispatches, what="the dispatch after the rate limit")
        finally:
            server.stop()
        assert repr(settings).count("S3CRET") == 0 and GITHUB_TOKEN not in repr(settings)

        world.publish("nats", "v2")
        agent = world.agent()
        assert agent.reconcile().ok
        verifier = WebhookVerifier(PUSH_SECRET)
        app = create_receiver(verifier, lambda e: None, agent.health_info)
        assert app.test_client().post("/webhook", data=b"{}", headers={"webhook-id": "a", "webhook-timestamp": "1",
                                                                        "webhook-signature": "v1,x"}).status_code == 401
    finally:
        api.stop()
        close_world(world)
    text = "\n".join(f"{r.name} {r.levelname} {r.getMessage()}" for r in caplog.records)
    assert "DEBUG" in text and "dispatched" in text and "refused" in text
    assert_no_secret({"in-process log": text})


# ------------------------------------------------------------------------ no URL from a payload


class Canary:
    """A loopback server that records every request it gets (none is the pass)."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.server = make_server("127.0.0.1", 0, self._app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def _app(self, environ: dict, start_response: Any) -> Any:
        self.hits.append(f"{environ['REQUEST_METHOD']} {Request(environ).full_path}")
        return Response("canary")(environ, start_response)

    def __enter__(self) -> Canary:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


REPO_IDENTITY = frozenset(f"/repository/{k}" for k in ("html_url", "clone_url", "git_url", "ssh_url", "svn_url"))


def canaried(obj: Any, canary: str, path: str = "", keep: frozenset[str] = frozenset()) -> Any:
    """*obj* with every URL-looking string replaced by a canary URL (naming where it was), except at
    the paths in *keep*."""
    if isinstance(obj, dict):
        return {k: canaried(v, canary, f"{path}/{k}", keep) for k, v in obj.items()}
    if isinstance(obj, list):
        return [canaried(v, canary, f"{path}/{i}", keep) for i, v in enumerate(obj)]
    if isinstance(obj, str) and obj.startswith(("http://", "https://", "git://", "git@", "ssh://")) \
            and path not in keep:
        return f"{canary}{path}"
    return obj


@pytest.fixture
def canary() -> Iterator[Canary]:
    with Canary() as c:
        yield c


def test_the_relay_requests_no_url_taken_from_a_payload(tmp_path: Path, canary: Canary) -> None:
    world = make_world(tmp_path / "user", {"nats": "nats-server"})
    api = GitHubAPIServer().start()
    pushes: list[bytes] = []
    try:
        api.state.add_repo(RELEASE_REPO)
        from sync_tools.config import load_config

        config = load_config(relay_config(tmp_path / "relay", world.store.store, world.base / "keys" / "release.pub"))
        settings = load_settings(config, {"SYNC_TOOLS_WEBHOOK_SECRET": WEBHOOK_SECRET, "GITHUB_TOKEN": GITHUB_TOKEN,
                                          "GITHUB_API_URL": api.url, "SYNC_TOOLS_DB": str(tmp_path / "r.db"),
                                          "SYNC_TOOLS_AGENT_TOKENS": AGENT_TOKEN}, backoff_base=0.05)
        server = RelayServer(create_app(config, settings), "127.0.0.1", 0).start()
        relay = get_relay(server.app)
        try:
            world.publish("nats", "v2")
            release = canaried(release_payload(RELEASE_REPO), canary.url, keep=REPO_IDENTITY)
            release["release"]["body"] = f"see {canary.url}/notes and [x]({canary.url}/md)"
            release["release"]["assets"] = [{"browser_download_url": f"{canary.url}/manifest.json",
                                             "url": f"{canary.url}/asset", "name": "manifest.json"}]
            # the upstream's repository URLs say which repository it is (a configured host must agree),
            # so they stay; every other URL is a canary
            tag = canaried(tag_payload(tag="v2.13.0"), canary.url, keep=REPO_IDENTITY)
            push = tag_payload()
            push.update(ref="refs/tags/v2.14.0", after="a" * 40, before="0" * 40, created=True, deleted=False,
                        compare="https://github.com/nats-io/nats-server/compare/v2.14.0",
                        head_commit={"id": "a" * 40, "url": "https://github.com/nats-io/nats-server/commit/a"})
            push = canaried(push, canary.url, keep=REPO_IDENTITY)
            for event, payload in (("release", release), ("create", tag), ("push", push)):
                r = requests.post(server.url + "/webhook", **signed(event, payload))
                assert r.status_code == 202, (event, r.text)
            # with the repository URLs canaried too: not the tracked repository, ignored (and not fetched)
            for event, payload in (("create", canaried(tag_payload(tag="v2.15.0"), canary.url)),
                                   ("push", canaried(push, canary.url))):
                r = requests.post(server.url + "/webhook", **signed(event, payload))
                assert r.status_code == 200 and r.json()["status"] == "ignored", (event, r.text)
            # the tag and the push name two versions of one subsystem: the newer went out (the older
            # too, unless it was still queued when the newer replaced it)
            wait_for(lambda: api.state.dispatches and api.state.dispatches[-1]["client_payload"]["version"]
                     == "v2.14.0", what="the newest version dispatched")
            wait_for(lambda: relay.outbox.last_event_id() == 1 and relay.outbox.stats().queue_depth == 0,
                     what="the fan-out")
            events = relay.outbox.events_since(0)
            pushes = [json.dumps(e.data).encode() for e in events]
        finally:
            server.stop()
    finally:
        api.stop()
        close_world(world)
    assert canary.hits == []
    # nothing the relay sent on carries a payload URL: dispatches name the configured upstream,
    # the agent event names the manifest in the configured store
    for d in api.state.dispatches:
        assert canary.url not in json.dumps(d["body"])
        assert d["client_payload"]["upstream"] == "https://github.com/nats-io/nats-server"
    assert pushes and all(canary.url.encode() not in p for p in pushes)


# ---------------------------------------------------------------------------------- /events


def test_events_refuses_missing_and_wrong_tokens(tmp_path: Path) -> None:
    from tests.relay_support import write_config

    config = write_config(tmp_path)
    settings = load_settings(config, {"SYNC_TOOLS_WEBHOOK_SECRET": WEBHOOK_SECRET, "GITHUB_TOKEN": GITHUB_TOKEN,
                                      "SYNC_TOOLS_DB": str(tmp_path / "r.db"),
                                      "SYNC_TOOLS_AGENT_TOKENS": f"{AGENT_TOKEN},{OTHER_AGENT_TOKEN}"},
                             heartbeat=0.2)
    server = RelayServer(create_app(config, settings), "127.0.0.1", 0).start()
    try:
        refused = [None, "", "Bearer", "Bearer ", f"Basic {AGENT_TOKEN}", f"Bearer {AGENT_TOKEN[:-1]}",
                   f"Bearer {AGENT_TOKEN}x", f"Bearer {AGENT_TOKEN.upper()}", f"Bearer {WEBHOOK_SECRET}",
                   f"Bearer {GITHUB_TOKEN}", f"Bearer {AGENT_TOKEN},{OTHER_AGENT_TOKEN}", f"Token {AGENT_TOKEN}"]
        for auth in refused:
            headers = {} if auth is None else {"Authorization": auth}
            r = requests.get(server.url + "/events", headers=headers, timeout=5)
            assert r.status_code == 401, auth
            assert "Bearer" in r.headers.get("WWW-Authenticate", "")
        # a token in the query string is not a token
        assert requests.get(server.url + f"/events?token={AGENT_TOKEN}", timeout=5).status_code == 401
        for good in (AGENT_TOKEN, OTHER_AGENT_TOKEN):
            with requests.get(server.url + "/events", headers={"Authorization": f"Bearer {good}"}, stream=True,
                              timeout=5) as r:
                assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    finally:
        server.stop()


# ------------------------------------------------------------------------ the agent's push endpoint


@pytest.fixture
def receiver() -> Iterator[tuple[Any, list]]:
    received: list = []
    app = create_receiver(WebhookVerifier(PUSH_SECRET), received.append, lambda: {"ready": True})
    yield app.test_client(), received


def push_headers(body: bytes, msg_id: str, when: datetime, secret: str = PUSH_SECRET) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(when.timestamp())),
            "webhook-signature": Webhook(secret).sign(msg_id, when, body.decode()), "content-type": "application/json"}


EVENT = json.dumps({"type": "release.updated", "release": "latest", "subsystems": ["nats"], "serial": 7}).encode()


def test_push_endpoint_refuses_stale_and_future_timestamps(receiver: tuple[Any, list]) -> None:
    client, received = receiver
    now = datetime.now(UTC)
    for when in (now - timedelta(minutes=6), now - timedelta(days=30), now + timedelta(minutes=6)):
        r = client.post("/webhook", data=EVENT, headers=push_headers(EVENT, f"msg_{when.timestamp()}", when))
        assert r.status_code == 401, when
    assert received == []
    assert client.post("/webhook", data=EVENT, headers=push_headers(EVENT, "msg_now", now)).status_code == 202
    assert len(received) == 1


def test_push_endpoint_refuses_replays_and_forgeries(receiver: tuple[Any, list]) -> None:
    client, received = receiver
    now = datetime.now(UTC)
    headers = push_headers(EVENT, "msg_1", now)
    assert client.post("/webhook", data=EVENT, headers=headers).status_code == 202
    for _ in range(3):  # the same delivery again: acknowledged, not acted on
        r = client.post("/webhook", data=EVENT, headers=headers)
        assert r.status_code == 200 and r.get_json()["status"] == "duplicate"
    assert len(received) == 1
    # the captured signature on another body, another id, or from another secret
    other = EVENT.replace(b"nats", b"arc!")
    assert client.post("/webhook", data=other, headers=headers).status_code == 401
    assert client.post("/webhook", data=EVENT, headers={**headers, "webhook-id": "msg_2"}).status_code == 401
    forged = push_headers(EVENT, "msg_3", now, "whsec_" + base64.b64encode(b"another key entirely!!").decode())
    assert client.post("/webhook", data=EVENT, headers=forged).status_code == 401
    assert client.post("/webhook", data=EVENT).status_code == 401
    assert len(received) == 1


def test_push_endpoint_refuses_replayed_github_deliveries(receiver: tuple[Any, list]) -> None:
    """GitHub's own signature has no timestamp, so its delivery id is what makes a replay visible: the
    same id is acted on once, and a delivery without an id (never sent by GitHub) is refused."""
    client, received = receiver
    body = json.dumps(release_payload(RELEASE_REPO)).encode()
    sig = "sha256=" + __import__("hmac").new(PUSH_SECRET.encode(), body, "sha256").hexdigest()
    headers = {"X-GitHub-Event": "release", "X-GitHub-Delivery": "gh-1", "X-Hub-Signature-256": sig,
               "Content-Type": "application/json"}
    assert client.post("/webhook", data=body, headers=headers).status_code == 202
    assert client.post("/webhook", data=body, headers=headers).get_json()["status"] == "duplicate"
    no_id = {k: v for k, v in headers.items() if k != "X-GitHub-Delivery"}
    for _ in range(2):
        assert client.post("/webhook", data=body, headers=no_id).status_code == 401
    assert len(received) == 1


def test_env_of_the_relay_subprocess_is_not_inherited_by_logs(tmp_path: Path) -> None:
    """`sync-tools relay --status` (no secret needed) prints no secret from the environment either."""
    from tests.relay_support import write_config

    write_config(tmp_path)
    from sync_tools.relay.outbox import Outbox

    env = relay_env(tmp_path, "http://127.0.0.1:9", secret=WEBHOOK_SECRET, token=GITHUB_TOKEN,
                    extra={"SYNC_TOOLS_AGENT_TOKENS": AGENT_TOKEN})
    Outbox(Path(env["SYNC_TOOLS_DB"])).close()  # the database a relay made
    r = subprocess.run([sys.executable, "-m", "sync_tools", "-vv", "relay", "--status", "--config",
                        str(tmp_path / "sync-tools.yaml")], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert_no_secret({"relay --status stdout": r.stdout, "relay --status stderr": r.stderr})
    assert os.environ.get("SYNC_TOOLS_WEBHOOK_SECRET") != WEBHOOK_SECRET
