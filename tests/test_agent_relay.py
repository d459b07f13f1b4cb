"""The agent against the real relay: a release lands in the store, the relay announces it on its SSE
stream, and the agent (subscribed with its bearer token) installs only what changed."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import requests

from sync_tools.agent.runner import serve
from sync_tools.agent.state import load_state
from sync_tools.config import load_config
from sync_tools.relay.app import create_app
from sync_tools.relay.server import RelayServer
from sync_tools.relay.webhook import sign
from tests.agent_support import close_world, make_world
from tests.relay_support import SECRET, TOKEN, settings, write_config


def test_a_release_announced_on_the_relays_sse_stream_is_installed(tmp_path: Path) -> None:
    world = make_world(tmp_path / "w", {"nats": "nats-server", "arc": "arc"})
    relay_root = tmp_path / "relay"
    write_config(relay_root, dispatch="github")
    # the relay watches the same store, and verifies it with the same pinned key as the agent
    (relay_root / ".releases").symlink_to(world.store.store)
    (relay_root / "keys" / "release.pub").write_bytes(world.store.public_pem())
    config = load_config(relay_root / "sync-tools.yaml")
    server = RelayServer(create_app(config, settings(config, relay_root)), "127.0.0.1", 0).start()
    agent = world.agent()
    ready: dict = {}
    started = threading.Event()

    def on_ready(info: dict) -> None:
        ready.update(info)
        started.set()

    t = threading.Thread(target=serve, kwargs=dict(agent=agent, relay=server.url, token=TOKEN, on_ready=on_ready),
                         daemon=True)
    t.start()
    try:
        assert started.wait(10) and ready["sse_connected"].wait(10)
        arc_pid = world.supervisor.pid("arc")
        data = world.publish("nats", "v2")
        body = b"{}"
        r = requests.post(server.url + "/notify", data=body, timeout=5,
                          headers={"Content-Type": "application/json",
                                   "X-Hub-Signature-256": sign(SECRET.encode(), body)})
        assert r.status_code == 202
        world.wait_version("nats", "v2")
        assert world.bin_path("nats").read_bytes() == data
        assert world.supervisor.pid("arc") == arc_pid
        deadline = time.monotonic() + 5
        while load_state(world.root).last_event_id is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert load_state(world.root).last_event_id  # the resume point is kept for a reconnect
        while len(agent.reports) < 2 and time.monotonic() < deadline:  # the report follows the health check
            time.sleep(0.02)
        assert [r.result("nats").action for r in agent.reports].count("updated") == 1
        assert {r.result("arc").action for r in agent.reports} == {"unchanged"}
    finally:
        agent.stop()
        t.join(10)
        server.stop()
        close_world(world)
