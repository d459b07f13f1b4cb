"""``agent.transport: push``: release events come only as the relay's signed pushes to ``agent.listen``.
The config took ``push`` and then ran it as ``sse``: with ``agent.relay`` set (for reports and the wave
gate) the agent followed ``/events`` as well, and without ``agent.listen`` it had nothing to say. The real
``sync-tools agent`` runs as a subprocess against a loopback server that records what it is asked."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from tests.support import free_port, serve_http, stop_group

SECRET = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTEyMzQ="


class _Relay(http.server.BaseHTTPRequestHandler):
    """A relay that records the paths asked for and answers every one 503 (the agent keeps trying)."""

    asked: list[str] = []

    def log_message(self, *a: object) -> None:
        pass

    def _any(self) -> None:
        type(self).asked.append(self.path)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_POST = _any  # noqa: N815


def _config(tmp_path: Path, relay: str, listen: str | None) -> Path:
    (tmp_path / "root").mkdir(exist_ok=True)
    cfg = tmp_path / "sync-tools.yaml"
    cfg.write_text(f"agent:\n  root: {tmp_path / 'root'}\n  source: {tmp_path / 'store'}\n  transport: push\n"
                   f"  relay: {relay}\n  reload: none\n" + (f"  listen: {listen}\n" if listen else "")
                   + f"release:\n  public_key: {tmp_path / 'none.pub'}\n")
    return cfg


def test_transport_push_takes_pushes_and_follows_no_event_stream(tmp_path: Path) -> None:
    _Relay.asked = []
    port = free_port()
    with serve_http(_Relay) as relay:
        cfg = _config(tmp_path, relay.url, f"127.0.0.1:{port}")
        env = {**os.environ, "SYNC_TOOLS_AGENT_SECRET": SECRET, "SYNC_TOOLS_AGENT_TOKEN": "agent-token"}
        proc = subprocess.Popen([sys.executable, "-m", "sync_tools", "agent", "--config", str(cfg)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while True:  # the push receiver answers once the agent is up
                assert proc.poll() is None, proc.communicate()[1]
                try:
                    if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code < 500:
                        break
                except requests.RequestException:
                    pass
                assert time.monotonic() < deadline, "the push receiver never answered"
                time.sleep(0.1)
            time.sleep(2)  # an SSE client would have asked for /events by now, and again after the 503
        finally:
            stop_group(proc)
        stderr = proc.communicate()[1]
    assert not [p for p in _Relay.asked if p.startswith("/events")], (_Relay.asked, stderr)


def test_transport_push_without_listen_is_one_line(tmp_path: Path) -> None:
    with serve_http(_Relay) as relay:
        cfg = _config(tmp_path, relay.url, None)
        r = subprocess.run([sys.executable, "-m", "sync_tools", "agent", "--config", str(cfg)],
                           env={**os.environ, "SYNC_TOOLS_AGENT_SECRET": SECRET}, capture_output=True, text=True,
                           timeout=60)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "agent.transport is 'push' but agent.listen is not set" in lines[0], r.stderr
