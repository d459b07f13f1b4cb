"""End to end over NATS: the real relay (under a real WSGI server) publishes each release event through its
outbox to a JetStream hub; an agent on a leaf node of the hub (agent.transport: nats, the code
``sync-tools agent`` runs) installs only what changed. Across a hub restart during a release and a
leaf node cut off from the hub during another, each release is installed once the path is back.
"""

from __future__ import annotations

import threading
from pathlib import Path

import requests

from sync_tools.agent.nats_transport import serve_nats
from sync_tools.config import load_config
from sync_tools.relay.app import create_app, get_relay
from sync_tools.relay.nats_publish import KIND
from sync_tools.relay.server import RelayServer
from sync_tools.relay.webhook import sign
from tests.agent_support import close_world, make_world
from tests.nats_support import DOMAIN, Link, NatsServer
from tests.relay_support import SECRET, settings, write_config
from tests.support import wait_for


def notify(url: str) -> None:
    body = b"{}"
    r = requests.post(url + "/notify", data=body, timeout=5,
                      headers={"Content-Type": "application/json", "X-Hub-Signature-256": sign(SECRET.encode(), body)})
    assert r.status_code == 202, r.text


def test_relay_to_jetstream_to_leaf_to_agent_across_a_hub_restart_and_a_leaf_cut_off(tmp_path: Path) -> None:
    hub = NatsServer(tmp_path, "hub", hub=True).start()
    link = Link(hub.leaf_port or 0)
    leaf = NatsServer(tmp_path, "leaf", leaf_of=link.leaf_url).start()
    world = make_world(tmp_path / "w", {"nats": "nats-server", "arc": "arc"}, agent_extra=(
        f"  transport: nats\n  nats:\n    servers: [{leaf.url}]\n    domain: {DOMAIN}\n    catchup_seconds: 0.5\n"))
    relay_root = tmp_path / "relay"
    write_config(relay_root, dispatch="github", max_attempts=60)
    with open(relay_root / "sync-tools.yaml", "a") as f:  # relay: is the file's last section
        f.write(f"  nats:\n    servers: [{hub.url}]\n    domain: {DOMAIN}\n")
    (relay_root / ".releases").symlink_to(world.store.store)
    (relay_root / "keys" / "release.pub").write_bytes(world.store.public_pem())
    config = load_config(relay_root / "sync-tools.yaml")
    assert config.relay.nats is not None
    app = create_app(config, settings(config, relay_root, backoff_base=0.2, backoff_cap=1.0))
    outbox = get_relay(app).outbox
    server = RelayServer(app, "127.0.0.1", 0).start()
    agent = world.agent()
    assert agent.config.agent.transport == "nats"
    ready: dict = {}
    started = threading.Event()

    def on_ready(info: dict) -> None:
        ready.update(info)
        started.set()

    t = threading.Thread(target=serve_nats, kwargs=dict(agent=agent, environ={}, on_ready=on_ready), daemon=True)
    t.start()

    def nats_jobs() -> list:
        return [j for j in outbox.jobs(limit=1000) if j.kind == KIND]

    try:
        wait_for(lambda: hub.leafs() == 1, what="the leaf's link")
        assert started.wait(15) and ready["nats_connected"].wait(10)
        arc_pid = world.supervisor.pid("arc")

        # 1. a release: relay -> outbox job -> JetStream on the hub -> leaf -> agent
        data = world.publish("nats", "v2")
        notify(server.url)
        world.wait_version("nats", "v2")
        assert world.bin_path("nats").read_bytes() == data
        wait_for(lambda: [j.status for j in nats_jobs()] == ["done"], what="the publish job")

        # 2. the hub is down while the release goes out: the publish job is retried until it is back
        hub.stop()
        data = world.publish("nats", "v3")
        notify(server.url)
        wait_for(lambda: any(j.attempts >= 1 and j.status == "pending" for j in nats_jobs()),
                 what="a failed publish attempt")
        hub.start()  # same port, same JetStream store
        world.wait_version("nats", "v3", timeout=30)
        assert world.bin_path("nats").read_bytes() == data
        wait_for(lambda: [j.status for j in nats_jobs()] == ["done", "done"], what="the retried publish")
        assert max(j.attempts for j in nats_jobs()) >= 1

        # 3. the site's leaf node is cut off from the hub: the release is on the hub, the agent gets it
        #    (its catch-up's direct get) once the link is back
        wait_for(lambda: hub.leafs() == 1, what="the leaf back after the hub restart")
        link.cut()
        wait_for(lambda: hub.leafs() == 0, what="the cut")
        data = world.publish("nats", "v4")
        notify(server.url)
        wait_for(lambda: [j.status for j in nats_jobs()] == ["done"] * 3, what="the publish to the hub")
        link.restore()
        world.wait_version("nats", "v4", timeout=30)
        assert world.bin_path("nats").read_bytes() == data

        # only nats was installed, each release once; arc was never touched
        wait_for(lambda: sum(1 for r in agent.reports if r.result("nats").action == "updated") == 3,
                 what="three nats installs")
        assert {r.result("arc").action for r in agent.reports} == {"unchanged"}
        assert world.supervisor.pid("arc") == arc_pid
    finally:
        agent.stop()
        t.join(10)
        server.stop()
        close_world(world)
        leaf.stop()
        link.close()
        hub.stop()
