"""Production wiring: relay/wsgi.py under gunicorn with relay/gunicorn.conf.py (gevent), and the
process-compose entry's readiness probe."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from tests.relay_support import TOKEN, delivery, env, publish, release_payload, tag_payload, write_config
from tests.servers.github_api import GitHubAPIServer
from tests.support import stop_group

ROOT = Path(__file__).resolve().parents[1]
GUNICORN = Path(sys.executable).with_name("gunicorn")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_process_compose_entry_probes_health() -> None:
    pc = yaml.safe_load((ROOT / "relay/process-compose.yaml").read_text())
    relay = pc["processes"]["relay"]
    assert relay["command"].startswith("sync-tools relay --production")  # tests/test_production.py
    probe = relay["readiness_probe"]["http_get"]
    assert (probe["path"], probe["port"]) == ("/health", 9191)
    assert pc["processes"]["tunnel"]["depends_on"]["relay"]["condition"] == "process_healthy"
    tunnel = yaml.safe_load((ROOT / "relay/cloudflared.yml").read_text())
    assert tunnel["ingress"][-1] == {"service": "http_status:404"}


@pytest.mark.skipif(not GUNICORN.exists(), reason="gunicorn is not installed (pip install 'sync-tools[prod]')")
def test_gunicorn_serves_the_relay(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    publish(config, "nats", "v2.10.25")
    port = _free_port()
    with GitHubAPIServer() as api:
        api.state.add_repo("acme/plat-telemetry")
        e = {**os.environ, **env(tmp_path), "GITHUB_API_URL": api.url, "SYNC_TOOLS_CONFIG": str(config.path),
             "RELAY_BIND": f"127.0.0.1:{port}", "RELAY_SOCKET_TIMEOUT": "2"}
        proc = subprocess.Popen([str(GUNICORN), "-c", str(ROOT / "relay/gunicorn.conf.py"), "--chdir", str(ROOT),
                                 "relay.wsgi:app"], env=e, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if requests.get(url + "/health", timeout=1).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                assert proc.poll() is None, "gunicorn exited"
                assert time.monotonic() < deadline, "gunicorn did not become ready"
                time.sleep(0.1)
            sse = requests.get(url + "/events", headers={"Authorization": f"Bearer {TOKEN}"}, stream=True,
                               timeout=(5, 10))
            assert sse.status_code == 200
            d = delivery("create", tag_payload(tag="v2.10.26"))
            assert requests.post(url + "/webhook", data=d.body, headers=d.headers, timeout=5).status_code == 202
            r = delivery("release", release_payload())
            assert requests.post(url + "/webhook", data=r.body, headers=r.headers, timeout=5).status_code == 202
            buf = b""
            for chunk in sse.iter_content(chunk_size=None):
                buf += chunk
                if b"\ndata: " in buf:
                    break
            assert b'"subsystems": ["nats"]' in buf and b"\nid: 1\n" in b"\n" + buf
            sse.close()
            deadline = time.monotonic() + 10
            while not api.state.dispatches and time.monotonic() < deadline:
                time.sleep(0.05)
            assert api.state.dispatches[0]["client_payload"]["version"] == "v2.10.26"

            # a client that trickles a body and stalls is dropped (RELAY_SOCKET_TIMEOUT), not kept forever
            with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
                slow.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"X-GitHub-Event: ping\r\nContent-Length: 1000\r\n\r\n{")
                while slow.recv(4096):  # whatever is answered, the connection ends
                    pass
            assert requests.get(url + "/health", timeout=5).status_code == 200
        finally:
            err = stop_group(proc, 30)
        assert b"Traceback" not in err, err.decode()[-2000:]
        assert b"gevent" in err  # the worker model the config chose
