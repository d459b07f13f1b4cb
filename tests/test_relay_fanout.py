"""Release fan-out: agent events built from the verified manifest in the store, the SSE stream
(Bearer, ``id:``, Last-Event-ID, heartbeat) and Standard Webhooks pushes to registered agents."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from standardwebhooks import Webhook
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from sync_tools.manifest import MANIFEST_NAME, SIGNATURE_NAME
from sync_tools.relay.app import get_relay
from sync_tools.relay.server import RelayServer
from sync_tools.relay.webhook import sign
from tests.relay_support import (
    AGENT_SECRET,
    SECRET,
    TOKEN,
    delivery,
    publish,
    release_payload,
    serve_relay,
    write_config,
)


class AgentReceiver:
    """A loopback agent endpoint recording pushes; answers the statuses in ``answers`` first."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.answers: list[int] = []
        self.server = make_server("127.0.0.1", 0, self._app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}/webhook"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def _app(self, environ: dict, start_response: Any) -> Any:
        req = Request(environ)
        status = self.answers.pop(0) if self.answers else 204
        self.received.append(({k: v for k, v in req.headers.items()}, req.get_data()))
        return Response(status=status)(environ, start_response)

    def __enter__(self) -> AgentReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def agent() -> Iterator[AgentReceiver]:
    with AgentReceiver() as a:
        yield a


@pytest.fixture
def relay(tmp_path: Path, agent: AgentReceiver) -> Iterator[RelayServer]:
    config = write_config(tmp_path, dispatch="github",
                          agents=[{"url": agent.url, "secret_env": "AGENT1_SECRET"}])
    with serve_relay(config, tmp_path) as server:
        yield server


class SSE:
    """A minimal SSE client over requests: yields (id, data) and counts heartbeat comments."""

    def __init__(self, url: str, token: str | None = TOKEN, last_event_id: str | None = None):
        headers = {"Accept": "text/event-stream"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        self.resp = requests.get(url + "/events", headers=headers, stream=True, timeout=(5, 5))
        self.heartbeats = 0
        self._buf = b""
        self._chunks = self.resp.iter_content(chunk_size=None) if self.resp.status_code == 200 else iter(())

    def next_event(self, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b"\n\n" in self._buf:
                block, self._buf = self._buf.split(b"\n\n", 1)
                fields: dict[str, str] = {}
                for line in block.decode().split("\n"):
                    if line.startswith(":"):
                        if "heartbeat" in line:
                            self.heartbeats += 1
                        continue
                    key, _, value = line.partition(": ")
                    fields[key] = value
                if "data" in fields:
                    assert "id" in fields, f"an event without id: {block!r}"
                    return int(fields["id"]), json.loads(fields["data"])
            self._buf += next(self._chunks)
        raise AssertionError("no event in time")

    def close(self) -> None:
        self.resp.close()


def notify(server: RelayServer, body: bytes = b"{}", secret: str = SECRET) -> requests.Response:
    return requests.post(server.url + "/notify", data=body, timeout=5,
                         headers={"Content-Type": "application/json", "X-Hub-Signature-256": sign(secret.encode(),
                                                                                                  body)})


def test_events_need_a_bearer_token(relay: RelayServer) -> None:
    for token in (None, "wrong", TOKEN + "x"):
        s = SSE(relay.url, token=token)
        assert s.resp.status_code == 401
        assert "Bearer" in s.resp.headers["WWW-Authenticate"]
        s.close()
    bad = SSE(relay.url, last_event_id="abc")
    assert bad.resp.status_code == 400
    bad.close()
    ok = SSE(relay.url, token="other-token")
    assert ok.resp.status_code == 200 and ok.resp.headers["Content-Type"].startswith("text/event-stream")
    ok.close()


def test_release_event_from_the_verified_manifest_streamed_and_pushed(relay: RelayServer,
                                                                      agent: AgentReceiver) -> None:
    app_relay = get_relay(relay.app)
    config = app_relay.config
    sub = SSE(relay.url)
    try:
        publish(config, "nats", "v2.10.25")
        assert notify(relay).status_code == 202
        eid, event = sub.next_event()
        store_dir = config.release.store_path(config.root) / "latest"
        assert event == {"type": "release.updated", "release": "latest", "subsystems": ["nats"], "serial": 1,
                         "manifest": str((store_dir / MANIFEST_NAME).resolve())}

        # the release repo's own release webhook: only what changed since the last fan-out
        publish(config, "arc", "v0.3.0")
        r = requests.post(relay.url + "/webhook", timeout=5, **_req(delivery("release", release_payload())))
        assert r.status_code == 202
        eid2, event2 = sub.next_event()
        assert eid2 == eid + 1 and event2["subsystems"] == ["arc"] and event2["serial"] == 2

        # nothing new in the store: no event
        assert notify(relay).status_code == 202
        wait = time.monotonic() + 0.5
        while time.monotonic() < wait and app_relay.outbox.stats().queue_depth:
            time.sleep(0.02)
        assert app_relay.outbox.last_event_id() == eid2
    finally:
        sub.close()

    # both events were pushed to the registered agent, signed and verifiable
    deadline = time.monotonic() + 5
    while len(agent.received) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(agent.received) == 2
    wh = Webhook(AGENT_SECRET)
    pushed = [wh.verify(body, headers) for headers, body in agent.received]
    assert pushed == [event, event2]
    assert [h["Webhook-Id"] for h, _ in agent.received] == [f"evt_{eid}", f"evt_{eid2}"]
    # and the agent's own verifier (sync_tools.agent) reads them as the events they are
    from sync_tools.agent.events import WebhookVerifier

    verifier = WebhookVerifier(AGENT_SECRET)
    delivered = [verifier.verify(body, headers) for headers, body in agent.received]
    assert [(d.event.subsystems, d.event.serial, d.duplicate) for d in delivered] == [
        (("nats",), 1, False), (("arc",), 2, False)]
    tampered_headers, tampered_body = agent.received[0]
    with pytest.raises(Exception, match="signature"):
        wh.verify(tampered_body.replace(b"nats", b"arc!"), tampered_headers)


def _req(d) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    return {"data": d.body, "headers": d.headers}


def test_a_tampered_manifest_is_never_announced(relay: RelayServer) -> None:
    app_relay = get_relay(relay.app)
    config = app_relay.config
    publish(config, "nats", "v2.10.25")
    store_dir = config.release.store_path(config.root) / "latest"
    (store_dir / MANIFEST_NAME).write_bytes((store_dir / MANIFEST_NAME).read_bytes().replace(b"v2.10.25", b"v9.9.9"))
    assert notify(relay).status_code == 202
    deadline = time.monotonic() + 5
    while app_relay.outbox.stats().dead == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    (job,) = app_relay.outbox.jobs("dead")
    assert job.kind == "fanout" and "signature" in (job.last_error or "")
    assert app_relay.outbox.last_event_id() == 0
    assert (store_dir / SIGNATURE_NAME).exists()


def test_notify_needs_its_signature(relay: RelayServer) -> None:
    assert notify(relay, secret="wrong").status_code == 401
    r = requests.post(relay.url + "/notify", data=b"{}", timeout=5)
    assert r.status_code == 401
    assert notify(relay, body=b'{"release": "other"}').status_code == 400


def log_event(app_relay, **fields) -> None:
    """Append a release.updated event with *fields* to the relay's log and wake its streams."""
    app_relay.outbox.append_event("release.updated", {"type": "release.updated", **fields})
    app_relay.broker.notify()


def test_last_event_id_resumes_and_heartbeats_flow(relay: RelayServer) -> None:
    app_relay = get_relay(relay.app)
    for i in range(3):
        log_event(app_relay, n=i)
    s = SSE(relay.url, last_event_id="1")
    try:
        assert [s.next_event()[0], s.next_event()[0]] == [2, 3]
        # heartbeat is 0.3 s in tests: within a second of quiet there are comments on the wire
        time.sleep(1.0)
        log_event(app_relay, n=3)
        eid, data = s.next_event()
        assert (eid, data["n"]) == (4, 3)
        assert s.heartbeats >= 2
    finally:
        s.close()
    fresh = SSE(relay.url)  # no Last-Event-ID: only what comes next
    try:
        log_event(app_relay, n=4)
        assert fresh.next_event()[0] == 5
        health = requests.get(relay.url + "/health", timeout=5).json()
        assert health["connected_agents"] >= 1 and health["last_event_id"] == 5
    finally:
        fresh.close()


def test_an_event_id_from_another_database_replays_this_log_and_head_holds_no_subscriber(relay: RelayServer) -> None:
    app_relay = get_relay(relay.app)
    for i in range(2):
        log_event(app_relay, n=i)
    # the agent saved id 100 from a relay database since recreated: it gets this log from its start
    s = SSE(relay.url, last_event_id="100")
    try:
        assert [s.next_event()[0], s.next_event()[0]] == [1, 2]
    finally:
        s.close()
    for bad in ("\u00b2", "1" * 40):  # a superscript digit passes str.isdigit; a 40-digit id overflows SQLite
        r = requests.get(relay.url + "/events", timeout=5, headers={
            "Authorization": f"Bearer {TOKEN}", "Last-Event-ID": bad})  # sent as latin-1, as HTTP does
        assert r.status_code == 400, bad
    before = len(app_relay.broker._subs)
    for _ in range(3):
        r = requests.head(relay.url + "/events", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
        assert r.status_code == 200
    assert len(app_relay.broker._subs) == before


def test_pushes_are_retried(relay: RelayServer, agent: AgentReceiver) -> None:
    agent.answers = [500, 429]
    publish(get_relay(relay.app).config, "nats", "v2.10.25")
    assert notify(relay).status_code == 202
    deadline = time.monotonic() + 10
    while len(agent.received) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(agent.received) == 3
    ids = {h["Webhook-Id"] for h, _ in agent.received}
    assert len(ids) == 1  # a retry carries the same webhook-id, so an agent can drop duplicates
    assert Webhook(AGENT_SECRET).verify(agent.received[-1][1], agent.received[-1][0])["subsystems"] == ["nats"]


def test_the_agents_sse_client_resumes_from_the_relay(relay: RelayServer) -> None:
    """Interop with sync_tools.agent: its SSE client gets every event once, across a relay-side cut."""
    from sync_tools.agent.events import SSEClient

    app_relay = get_relay(relay.app)
    got: list[tuple[str | None, tuple[str, ...]]] = []
    client = SSEClient(relay.url, TOKEN, lambda e: got.append((e.id, e.subsystems)), backoff_base=0.05,
                       backoff_max=0.2, read_timeout=5)
    t = threading.Thread(target=client.run, daemon=True)
    t.start()
    try:
        assert client.connected.wait(5)
        log_event(app_relay, subsystems=["nats"], release="latest", serial=1, manifest="m")
        deadline = time.monotonic() + 5
        while len(got) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        app_relay.broker.stop()  # every stream is cut; the event after it must still arrive, once
        app_relay.outbox.append_event("release.updated", {"type": "release.updated", "subsystems": ["arc"],
                                                          "release": "latest", "serial": 2, "manifest": "m"})
        app_relay.broker.start()
        app_relay.broker.notify()
        while len(got) < 2 and time.monotonic() < deadline + 5:
            time.sleep(0.02)
        time.sleep(0.2)
        assert got == [("1", ("nats",)), ("2", ("arc",))]
    finally:
        client.stop()
        t.join(5)
