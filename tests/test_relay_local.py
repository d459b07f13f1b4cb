"""The ``local`` dispatcher on a real workspace: a signed tag webhook makes the relay run
``sync-tools build/package/release --only nats`` (real task, real store), one run at a time per
subsystem, and then announce the new manifest to agents itself."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import pytest
import requests

from sync_tools.manifest import MANIFEST_NAME, parse_manifest
from sync_tools.relay.app import create_app, get_relay
from sync_tools.relay.server import RelayServer
from tests.processes import assert_process_ends
from tests.relay_support import delivery, settings, tag_payload
from tests.support import wait_for
from tests.test_relay_fanout import SSE
from tests.workspace import make_workspace


def tag_event(upstream: Path, tag: str) -> dict:
    p = tag_payload("local/" + upstream.name, tag=tag)
    for k in ("html_url", "git_url", "ssh_url", "svn_url"):
        p["repository"].pop(k)
    p["repository"]["clone_url"] = f"file://{upstream}"
    return p


def test_local_dispatch_builds_releases_and_announces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = make_workspace(tmp_path / "ws", extra_config="relay:\n  dispatch: local\n")
    for k, v in ws.env().items():  # task and sync-tools on PATH, the signing key: what a DEV shell has
        monkeypatch.setenv(k, v)
    config = ws.config()
    s = settings(config, tmp_path, workers=2, heartbeat=5.0)
    server = RelayServer(create_app(config, s), "127.0.0.1", 0).start()
    sse = SSE(server.url)
    try:
        ws.release_upstream("nats", "v1.1.0")
        ws.release_upstream("nats", "v1.2.0")
        for tag in ("v1.1.0", "v1.2.0"):
            d = delivery("create", tag_event(ws.upstreams["nats"], tag))
            r = requests.post(server.url + "/webhook", data=d.body, headers=d.headers, timeout=5)
            assert r.status_code == 202, r.text
            # the first build under way before the second version arrives: queued before it started,
            # v1.1.0 would be replaced by v1.2.0 (one pending dispatch per subsystem) and never built
            wait_for(lambda: any((s.logs_dir / "nats").glob("*.log")), timeout=30, what="the first build to start")
        seen: list[dict] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            _, event = sse.next_event(timeout=60)
            seen.append(event)
            # the second release's event (the first serial is the clock, not 1; see next_serial)
            now = parse_manifest((ws.release_dir / MANIFEST_NAME).read_bytes())
            if now.subsystems["nats"].version == "v1.2.0" and event["serial"] == now.serial:
                break
        assert [e["subsystems"] for e in seen] == [["nats"]] * len(seen)
        assert seen[-1]["manifest"] == str(ws.release_dir / MANIFEST_NAME)

        manifest = parse_manifest((ws.release_dir / MANIFEST_NAME).read_bytes())
        assert manifest.subsystems["nats"].version == "v1.2.0"
        assert "arc" not in manifest.subsystems  # arc was neither built nor released
        assert not ws.binary_path("arc").exists()

        # one run at a time for nats: the second build started after the first had finished
        logs = sorted((s.logs_dir / "nats").glob("*.log"))
        assert len(logs) == 2
        first_end = logs[0].stat().st_mtime
        second_start = datetime.strptime(logs[1].name.split("-", 1)[0], "%Y%m%dT%H%M%S.%fZ").timestamp()
        second_start += datetime.now().astimezone().utcoffset().total_seconds()  # names are UTC
        assert second_start >= first_end - 0.01
        text = logs[1].read_text()
        for step in ("build", "package", "release"):
            assert f" {step} --config " in text
        assert "--version v1.2.0" in text and text.count("# exit 0") == 3
        health = requests.get(server.url + "/health", timeout=5).json()
        assert health["dead_letters"] == 0
        assert json.loads(json.dumps(health))["dispatch"] == "local"
        assert get_relay(server.app).outbox.stats().done >= 4  # 2 dispatches + their fan-outs
    finally:
        sse.close()
        server.stop()


def test_a_local_build_that_outlives_the_timeout_is_stopped_with_its_commands(tmp_path: Path) -> None:
    """The dispatcher's timeout stops the whole step: `sync-tools build` gets SIGTERM, stops the build
    command it started (its own process group), and the job fails naming the timeout."""

    from sync_tools.errors import BuildError
    from sync_tools.relay.dispatch import LocalDispatcher

    pidfile = tmp_path / "build.pid"
    ws = make_workspace(tmp_path / "ws", {"nats": {"build": f'["echo $$ > {pidfile}; exec sleep 120"]'}})
    d = LocalDispatcher(ws.config_path, tmp_path / "logs", timeout=3, env=ws.env())
    started = time.monotonic()
    with pytest.raises(BuildError, match="timed out after 3 s"):
        d.dispatch({"subsystem": "nats", "version": "v1.0.0", "delivery": "d-timeout"})
    assert time.monotonic() - started < 60
    assert_process_ends(int(pidfile.read_text()), "the build command outlived its build")
