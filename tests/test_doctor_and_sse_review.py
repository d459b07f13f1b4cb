"""``sync-tools doctor`` and the relay's SSE side (found by a review; each test failed before its fix): a
tags subsystem without a pin said to follow a branch, fixes that did not clear their finding (a
Taskfile included from elsewhere, process-compose on --port N, an IPv6 agent.url), an SSE replay that
stopped at a damaged event, a traceback for every subscriber that stops reading under gunicorn.

Real parts only: real git repositories (tests.gitrepos), the real CLI (click's runner), the relay
under its real servers on loopback (``sync-tools relay``'s werkzeug server, gunicorn), real SQLite.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from sync_tools.cli import cli
from sync_tools.relay.app import get_relay
from sync_tools.relay.server import RelayServer
from tests.gitrepos import GitRepo
from tests.relay_support import TOKEN, env, serve_relay, write_config
from tests.support import free_port, stop_group, wait_for

ROOT = Path(__file__).resolve().parents[1]
GUNICORN = Path(sys.executable).with_name("gunicorn")

# ------------------------------------------------------------------------------------------ doctor


def _doctor(root: Path, *args: str, config: str = "sync-tools.yaml") -> tuple[int, dict]:
    res = CliRunner().invoke(cli, ["doctor", "--config", str(root / config), "--json", *args])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    return res.exit_code, json.loads(res.stdout)


def _of(data: dict, sub: str | None, code: str | None = None) -> list[dict]:
    return [f for f in data["findings"] if f["subsystem"] == sub and (code is None or f["code"] == code)]


def test_doctor_a_tags_subsystem_without_a_pin_is_pin_missing_not_following_a_branch(tmp_path: Path) -> None:
    """docs/doctor.md: ``pin-missing`` (warning) when there is no pin and no branch. A ``tags``
    subsystem without ``current`` gets instead an info "follows branch main: latest is its head",
    which is false: ``sync-tools check`` takes the newest tag (v1.1.0) as its latest, not main's head."""
    up = GitRepo.create(tmp_path / "web.git")
    up.commit("one")
    up.tag("v1.0.0")
    up.commit("two")
    up.tag("v1.1.0")
    up.commit("work after the release")  # main's head is not a release
    up.close()
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "sync-tools.yaml").write_text(
        "subsystems:\n  web:\n    upstream: ../web.git\n    build: ['make web']\n    health: 'true'\n")
    # what sync-tools itself takes as the latest for this subsystem: the newest tag
    res = CliRunner().invoke(cli, ["check", "--config", str(ws / "sync-tools.yaml"), "--json"])
    assert json.loads(res.stdout)["web"]["latest"] == "v1.1.0", res.output
    _, data = _doctor(ws)
    web = _of(data, "web")
    assert not [f for f in web if "follows branch" in f["message"]], web
    assert [f["level"] for f in web if f["code"] == "pin-missing"] == ["warning"], web


def test_doctor_version_var_missing_fix_does_not_clear_it_when_the_taskfile_is_included_from_elsewhere(
        tmp_path: Path) -> None:
    """The root Taskfile includes ``web: ./services/web`` (its build tasks resolve, WEB_VERSION is a
    template). doctor says there is no web/Taskfile.yml and tells to set ``version_var``; once set as
    printed, the same warning (and fix) comes back: the fix cannot be satisfied."""
    up = GitRepo.create(tmp_path / "web.git")
    up.commit("one")
    up.tag("v1.0.0")
    up.close()
    ws = tmp_path / "ws"
    (ws / "services" / "web").mkdir(parents=True)
    (ws / "Taskfile.yml").write_text("version: '3'\nincludes:\n  web: ./services/web\n")
    (ws / "services" / "web" / "Taskfile.yml").write_text(
        "version: '3'\nvars:\n  WEB_VERSION: '{{.WEB_VERSION | default \"v1.0.0\"}}'\n"
        "tasks:\n  src:update:\n    cmds:\n      - git checkout {{.WEB_VERSION}}\n"
        "  bin:build:\n    cmds:\n      - go build .\n")
    cfg = ws / "sync-tools.yaml"
    cfg.write_text("subsystems:\n  web:\n    upstream: ../web.git\n    current: v1.0.0\n    health: 'true'\n")
    _, data = _doctor(ws, "--offline")
    assert _of(data, "web", "build-tasks"), data  # task web:src:update / web:bin:build resolve
    found = _of(data, "web", "version-var-missing")
    # the included Taskfile is read: the fix names its var
    assert len(found) == 1 and "services/web/Taskfile.yml" in found[0]["message"], found
    assert found[0]["fix"].startswith("set subsystems.web.version_var: WEB_VERSION"), found
    cfg.write_text(cfg.read_text() + "    version_var: WEB_VERSION\n")  # the fix, applied as written
    _, after = _doctor(ws, "--offline")
    assert not _of(after, "web", "version-var-missing"), _of(after, "web")


def test_doctor_port_clash_fix_start_process_compose_with_port_n_clears_it(tmp_path: Path) -> None:
    """port-clash's fix: "... or start process-compose with --port N (and set agent.url:
    http://127.0.0.1:N) ...". Applied as written (the Taskfile starts it with --port 9000, agent.url
    names 9000), doctor still says web's 8080 is "the port process-compose's API uses by default":
    a --port in the Taskfile is not read (only -U is), and agent.url counts only with agent.reload:
    process-compose, which the fix does not mention."""
    ws = _web_ws(tmp_path, "", "processes:\n  web:\n    command: ./web/.bin/web --listen 127.0.0.1:8080\n")
    cfg = ws / "sync-tools.yaml"
    _, data = _doctor(ws, "--offline")
    clash = _of(data, "web", "port-clash")
    assert len(clash) == 1 and "start process-compose with --port N (and set agent.url: http://127.0.0.1:N)" \
        in clash[0]["fix"], data
    # the fix, as printed: process-compose started with --port 9000, and agent.url set to it
    (ws / "Taskfile.yml").write_text("version: '3'\ntasks:\n  pc:up:\n    cmds:\n"
                                     "      - process-compose up --port 9000 -t=false\n")
    cfg.write_text(cfg.read_text() + "agent:\n  url: http://127.0.0.1:9000\n")
    _, after = _doctor(ws, "--offline")
    assert not [f for f in after["findings"] if f["code"] == "port-clash"], after["findings"]

# ----------------------------------------------------------------------------------------- relay SSE


def _relay(root: Path) -> contextlib.AbstractContextManager[RelayServer]:
    return serve_relay(write_config(root), root)


def _read_ids_until_quiet(url: str, last_event_id: str, quiet_heartbeats: int = 3,
                          timeout: float = 20.0) -> list[int]:
    """Every event id the stream sends until *quiet_heartbeats* heartbeats come in a row."""
    headers = {"Authorization": f"Bearer {TOKEN}", "Last-Event-ID": last_event_id}
    ids: list[int] = []
    buf = b""
    quiet = 0
    deadline = time.monotonic() + timeout
    with requests.get(url + "/events", headers=headers, stream=True, timeout=(5, 5)) as resp:
        assert resp.status_code == 200
        for chunk in resp.iter_content(chunk_size=None):
            buf += chunk
            while b"\n\n" in buf:
                block, buf = buf.split(b"\n\n", 1)
                if block.startswith(b": heartbeat"):
                    quiet += 1
                    continue
                for line in block.split(b"\n"):
                    if line.startswith(b"id: "):
                        ids.append(int(line[4:]))
                        quiet = 0
            if quiet >= quiet_heartbeats or time.monotonic() > deadline:
                break
    return ids


def test_sse_replay_does_not_stop_short_at_a_damaged_event(tmp_path: Path) -> None:
    """fanout.Broker.stream reads the backlog 500 rows at a time and stops at the first batch shorter
    than 500; outbox.events_since skips a damaged row (it says: "so the events after it still reach
    every subscriber"), which makes that batch 499 long. An agent resuming from Last-Event-ID 0 then
    gets events 1..500 and nothing after them, the stream going quiet (heartbeats) while events
    501..700 sit in the log; they only come with the next live event, all read in one query."""
    with _relay(tmp_path) as server:
        relay = get_relay(server.app)
        for i in range(700):
            relay.outbox.append_event("release.updated", {"type": "release.updated", "n": i})
        with sqlite3.connect(relay.settings.db_path) as db:
            db.execute("UPDATE events SET data = 'damaged' WHERE id = 10")
        relay.broker.notify()
        # the broker has handed on everything already: what the stream sends comes from its replay
        wait_for(lambda: relay.broker.last_id >= 700, what="the broker to catch up")
        ids = _read_ids_until_quiet(server.url, "0")
    assert ids == [i for i in range(1, 701) if i != 10], f"got {len(ids)} events, the last {ids[-1:]}"

# ------------------------------------------------------------------------------------------ gunicorn


@contextlib.contextmanager
def _gunicorn(root: Path, stderr: Path, **extra_env: str) -> Iterator[tuple[str, subprocess.Popen]]:
    if not GUNICORN.exists():
        pytest.skip("gunicorn is not installed")
    config = write_config(root)
    port = free_port()
    e = {**os.environ, **env(root), "GITHUB_API_URL": "http://127.0.0.1:9", "SYNC_TOOLS_CONFIG": str(config.path),
         "RELAY_BIND": f"127.0.0.1:{port}", **extra_env}
    with stderr.open("wb") as err:
        proc = subprocess.Popen([str(GUNICORN), "-c", "python:sync_tools.relay.gunicorn_conf",
                                 "sync_tools.relay.wsgi:app"], env=e, cwd=root, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, "gunicorn exited: " + stderr.read_text()[-2000:]
            with contextlib.suppress(requests.RequestException):
                return requests.get(url + "/health", timeout=1).status_code == 200
            return False

        wait_for(up, timeout=60, what="gunicorn to serve /health")
        yield url, proc
    finally:
        if proc.poll() is None:
            stop_group(proc)


def test_gunicorn_a_subscriber_that_stops_reading_is_dropped_without_a_traceback(tmp_path: Path) -> None:
    """wsgi.SocketTimeout gives the socket a timeout so that "an SSE subscriber that stops reading"
    is dropped. It is dropped, but gunicorn reports the timeout (an OSError without errno) as
    "Socket error processing request." with a traceback, at error level, for each such client."""
    log = tmp_path / "gunicorn.err"
    with _gunicorn(tmp_path, log, RELAY_SOCKET_TIMEOUT="2") as (url, _proc):
        big = "x" * 65536
        with sqlite3.connect(tmp_path / "relay.db") as db:  # what SYNC_TOOLS_DB names (tests.relay_support.env)
            db.executemany("INSERT INTO events (type, data, created) VALUES (?, ?, ?)",
                           [("release.updated", json.dumps({"type": "release.updated", "pad": big}), time.time())
                            for _ in range(300)])  # ~20 MB of backlog: more than any socket buffer holds
        port = int(url.rsplit(":", 1)[1])
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        try:
            s.sendall(f"GET /events HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {TOKEN}\r\n"
                      "Last-Event-ID: 0\r\n\r\n".encode())
            # never read: the relay's writes block, and time out after 2 s
            time.sleep(8)
            assert requests.get(url + "/health", timeout=5).status_code == 200
        finally:
            s.close()
        time.sleep(0.5)
    text = log.read_text(errors="replace")
    at = text.find("Traceback")
    assert at < 0 and "Socket error processing request" not in text, text[max(0, at - 300):at + 200]


def _web_ws(tmp_path: Path, config_tail: str, process_compose: str) -> Path:
    up = GitRepo.create(tmp_path / "web.git")
    up.commit("one")
    up.tag("v1.0.0")
    up.close()
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "sync-tools.yaml").write_text(
        "subsystems:\n  web:\n    upstream: ../web.git\n    current: v1.0.0\n    build: ['make web']\n"
        "    health: 'true'\n" + config_tail)
    (ws / "process-compose.yaml").write_text(process_compose)
    return ws


def test_doctor_port_clash_reads_the_port_of_an_ipv6_agent_url(tmp_path: Path) -> None:
    """agent.url http://[::1]:9999 with reload process-compose: the port regex (``[^/:]+:(\\d+)``)
    does not match a bracketed host, so the API port is taken as 80 and web's 9999 is not reported."""
    ws = _web_ws(tmp_path, "agent:\n  reload: process-compose\n  url: http://[::1]:9999\n",
                 "processes:\n  web:\n    command: ./web/.bin/web --listen 127.0.0.1:9999\n")
    _, data = _doctor(ws, "--offline")
    clash = _of(data, "web", "port-clash")
    assert len(clash) == 1 and "uses port 9999" in clash[0]["message"], data["findings"]
