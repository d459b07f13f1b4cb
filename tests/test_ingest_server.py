"""The relay's ingest server (``sync-tools relay --production --ingest``: POST /webhook on granian) beside
the relay, on one outbox. Real parts: granian running the ASGI app in its own process group, the relay
under a real server, real SQLite, the GitHub API double, an SSE subscriber, the doorbell's real socket."""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from sync_tools.relay import doorbell, worker
from tests.relay_support import (
    RELEASE_REPO,
    TOKEN,
    delivery,
    env,
    publish,
    release_payload,
    running_relay,
    tag_payload,
    write_config,
)
from tests.servers.github_api import GitHubAPIServer, github_api  # noqa: F401
from tests.support import free_port, stop_group, wait_for

pytestmark = pytest.mark.skipif(not Path(sys.executable).with_name("granian").exists(),
                                reason="granian is not installed (pip install 'sync-tools[prod]')")


PIDS: dict[str, int] = {}  # ingest server URL -> its pid


@contextlib.contextmanager
def ingest_server(root: Path, github_api_url: str, workers: int = 1, **extra: str) -> Iterator[str]:
    """``sync-tools relay --production --ingest`` for the workspace at *root* (its relay.db); yields its URL."""
    port = free_port()
    e = {**os.environ, **env(root, **extra), "GITHUB_API_URL": github_api_url,
         "SYNC_TOOLS_CONFIG": str(root / "sync-tools.yaml")}
    proc = subprocess.Popen([sys.executable, "-m", "sync_tools", "relay", "--production", "--ingest", "--port",
                             str(port), "--host", "127.0.0.1", "--workers", str(workers)],
                            env=e, cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, f"the ingest server exited: {proc.stderr.read().decode()[-2000:]}"  # type: ignore[union-attr]
            with contextlib.suppress(requests.RequestException):
                return requests.get(url + "/health", timeout=1).status_code == 200
            return False

        wait_for(up, timeout=30, what="the ingest server to serve /health")
        PIDS[url] = proc.pid
        yield url
    finally:
        err = stop_group(proc, 20)
        assert b"Traceback" not in err, err.decode()[-3000:]


def _post(url: str, d, path: str = "/webhook") -> requests.Response:  # type: ignore[no-untyped-def]
    return requests.post(url + path, data=d.body, headers=d.headers, timeout=10)


def test_a_delivery_to_the_ingest_server_is_dispatched_by_the_relays_worker_at_the_ring(
        tmp_path: Path, github_api: GitHubAPIServer, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The ingest process commits and rings; the relay process's worker, which would otherwise look
    at the queue only every POLL seconds (a minute here), dispatches at once."""
    monkeypatch.setattr(worker, "POLL", 60.0)
    with running_relay(tmp_path, github_api) as relay, ingest_server(tmp_path, github_api.url) as ingest:
        time.sleep(0.5)  # the relay's workers are in their minute-long wait
        d = delivery("create", tag_payload(tag="v2.10.26"))
        r = _post(ingest, d)
        assert r.status_code == 202, r.text
        assert r.json()["status"] == "accepted" and len(r.json()["jobs"]) == 1
        sent = wait_for(lambda: github_api.state.dispatches, timeout=10, what="the relay to dispatch")
        assert sent[0]["client_payload"]["version"] == "v2.10.26"
        assert sent[0]["repo"] == RELEASE_REPO
        # the same delivery again, to either server: recorded once
        assert _post(ingest, d).json()["status"] == "duplicate"
        assert _post(relay.url, d).json()["status"] == "duplicate"
        # a version already dispatched: 200 ignored with the reason, from the ingest server too
        wait_for(lambda: requests.get(relay.url + "/health", timeout=5).json()["queue_depth"] == 0,
                 what="the dispatch to finish")
        time.sleep(0.6)  # past the ingest process's read of "dispatched" (DISPATCHED_TTL)
        old = _post(ingest, delivery("create", tag_payload(tag="v2.10.20")))
        assert old.status_code == 200 and old.json()["status"] == "ignored", old.text
        assert "older than v2.10.26" in old.json()["reasons"][0]
    assert len(github_api.state.dispatches) == 1


def test_an_own_release_through_the_ingest_server_reaches_sse_agents_of_the_relay(
        tmp_path: Path, github_api: GitHubAPIServer, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setattr(worker, "POLL", 60.0)
    with running_relay(tmp_path, github_api) as relay, ingest_server(tmp_path, github_api.url) as ingest:
        config_path = tmp_path / "sync-tools.yaml"
        from sync_tools.config import load_config

        publish(load_config(config_path), "nats", "v2.10.25")
        sse = requests.get(relay.url + "/events", headers={"Authorization": f"Bearer {TOKEN}"}, stream=True,
                           timeout=(5, 15))
        assert sse.status_code == 200
        got: list[bytes] = []

        def read() -> None:
            buf = b""
            for chunk in sse.iter_content(chunk_size=None):
                buf += chunk
                if b"\ndata: " in buf:
                    got.append(buf)
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        wait_for(lambda: requests.get(relay.url + "/health", timeout=5).json()["connected_agents"] == 1,
                 what="the subscriber to be connected")
        r = _post(ingest, delivery("release", release_payload()))
        assert r.status_code == 202, r.text
        reader.join(timeout=15)
        sse.close()
        assert got and b'"subsystems": ["nats"]' in got[0]


def test_the_ingest_server_refuses_what_the_relay_refuses(tmp_path: Path, github_api: GitHubAPIServer) -> None:  # noqa: F811
    github_api.state.add_repo(RELEASE_REPO)
    write_config(tmp_path, max_body=16384)
    with ingest_server(tmp_path, github_api.url) as ingest:
        good = delivery("create", tag_payload(tag="v2.10.30"))
        bad_sig = delivery("create", tag_payload(tag="v2.10.31"), secret="not-the-secret")
        r = _post(ingest, bad_sig)
        assert r.status_code == 401 and r.json()["status"] == "error"
        big = delivery("create", {"padding": "x" * 20_000})
        assert _post(ingest, big).status_code == 413
        no_event = delivery("create", tag_payload(tag="v2.10.32"))
        del no_event.headers["X-GitHub-Event"]
        assert _post(ingest, no_event).status_code == 400
        ping = _post(ingest, delivery("ping", {"zen": "Keep it logically awesome.", "hook_id": 1,
                                                "repository": tag_payload()["repository"]}))
        assert ping.status_code == 200 and ping.json()["status"] == "pong"
        assert requests.get(ingest + "/webhook", timeout=5).status_code == 405
        other = requests.get(ingest + "/events", timeout=5)
        assert other.status_code == 404 and "ingest server" in other.json()["error"]
        assert _post(ingest, good).status_code == 202
        # a body cut short of its Content-Length, and one that stops arriving: never a 202, and the
        # server goes on answering
        host, port = ingest.removeprefix("http://").split(":")
        head = (f"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-GitHub-Event: create\r\n"
                f"X-GitHub-Delivery: cut-1\r\nX-Hub-Signature-256: {good.headers['X-Hub-Signature-256']}\r\n"
                f"Content-Length: {len(good.body)}\r\n\r\n").encode()
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(head + good.body[:100])
            s.shutdown(socket.SHUT_WR)
            answer = s.recv(4096)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer[:100]  # never a 202
        # signed over the bytes sent, with a Content-Length that claims more: 400, as from the relay
        from sync_tools.relay.webhook import sign
        from tests.relay_support import SECRET

        sent = good.body[:200]
        lying = (f"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"X-GitHub-Event: create\r\nX-GitHub-Delivery: cut-2\r\n"
                 f"X-Hub-Signature-256: {sign(SECRET.encode(), sent)}\r\nContent-Length: {len(sent) + 100}\r\n\r\n")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(lying.encode() + sent)
            s.shutdown(socket.SHUT_WR)
            answer = s.recv(4096)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer[:100]
        assert _post(ingest, delivery("create", tag_payload(tag="v2.10.33"))).status_code == 202
    with sqlite3.connect(tmp_path / "relay.db") as db:
        recorded = {row[0] for row in db.execute("SELECT delivery FROM deliveries")}
    assert good.headers["X-GitHub-Delivery"] in recorded and not {"cut-1", "cut-2"} & recorded


def test_a_trickled_body_is_cut_at_the_deadline(tmp_path: Path, github_api: GitHubAPIServer) -> None:  # noqa: F811
    github_api.state.add_repo(RELEASE_REPO)
    write_config(tmp_path)
    with ingest_server(tmp_path, github_api.url) as ingest:
        host, port = ingest.removeprefix("http://").split(":")
        good = delivery("create", tag_payload(tag="v2.10.40"))
        head = (f"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-GitHub-Event: create\r\n"
                f"X-GitHub-Delivery: trickle-1\r\nX-Hub-Signature-256: {good.headers['X-Hub-Signature-256']}\r\n"
                f"Content-Length: {len(good.body)}\r\n\r\n").encode()
        started = time.monotonic()
        answer = b""
        with socket.create_connection((host, int(port)), timeout=60) as s:
            s.sendall(head)
            for byte in good.body:  # a byte every 0.1 s: each resets any read timeout, never the deadline
                try:
                    s.sendall(bytes([byte]))
                except OSError:
                    break
                s.settimeout(0.1)
                try:
                    answer = s.recv(4096)
                    if answer:
                        break
                except TimeoutError:
                    pass
                if time.monotonic() - started > 40:
                    break
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert 10 <= time.monotonic() - started < 40
        assert _post(ingest, good).status_code == 202  # the same delivery sent whole is taken


def test_the_doorbell_wakes_its_listener_and_a_ring_nobody_hears_is_no_error(tmp_path: Path) -> None:
    rang = threading.Event()
    bell = doorbell.Bell(tmp_path / "relay.db")
    bell.ring()  # nobody listens yet: nothing happens, nothing raises
    listener = doorbell.Listener(tmp_path / "relay.db", rang.set)
    assert listener.start()
    heard_by_second = threading.Event()
    second = doorbell.Listener(tmp_path / "relay.db", heard_by_second.set)
    assert not second.start()  # one listener per outbox; the other process keeps its own look
    try:
        bell.ring()
        assert rang.wait(5) and not heard_by_second.is_set()
        other = doorbell.Listener(tmp_path / "other.db", lambda: None)
        assert other.start() and other.address != listener.address
        other.stop()
        listener.stop()  # as when a reload's old worker exits: the second takes the bell over
        wait_for(lambda: second._sock is not None, timeout=10, what="the second listener to bind the bell")
        bell.ring()
        assert heard_by_second.wait(5)
    finally:
        listener.stop()
        second.stop()
        bell.close()


def test_deployment_files_keep_the_ingest_server_optional_and_route_agents_to_the_relay() -> None:
    """The ingest server is in relay/process-compose.yaml, disabled (enabling it is three edits the
    file names); the tunnel sends /webhook, /notify and the agents' /report and /rollout to the relay."""
    import re

    import yaml

    root = Path(__file__).resolve().parents[1]
    tunnel = yaml.safe_load((root / "relay/cloudflared.yml").read_text())
    rules = [r for r in tunnel["ingress"] if "path" in r]

    def origin(path: str) -> str:
        return next(r["service"] for r in rules if re.search(r["path"], path))

    for path in ("/webhook", "/webhook/nats", "/events", "/notify", "/report", "/rollout/nats",
                 "/rollout/nats/" + "a" * 64):
        assert origin(path) == "http://127.0.0.1:9191", path
    assert not any(re.search(r["path"], p) for r in rules for p in ("/health", "/metrics", "/fleet"))
    pc = yaml.safe_load((root / "relay/process-compose.yaml").read_text())["processes"]
    ingest = pc["relay-ingest"]
    assert ingest["disabled"] is True and "relay-ingest" not in pc["tunnel"]["depends_on"]
    assert ingest["command"].startswith("sync-tools relay --production --ingest")
    assert ingest["readiness_probe"]["http_get"]["port"] == 9193
    assert ingest["environment"] == pc["relay"]["environment"]  # one database
    assert "9193" in (root / "relay/cloudflared.yml").read_text()  # the rule to change is named there


def test_the_ingest_server_runs_below_the_relays_cpu_priority(tmp_path: Path, github_api: GitHubAPIServer) -> None:  # noqa: F811
    """Every thread of granian inherits nice 10 (set before the exec): a fan-out to the relay's SSE
    agents gets the CPU first when both are busy. A bad RELAY_INGEST_NICE stops the start in one line."""
    github_api.state.add_repo(RELEASE_REPO)
    write_config(tmp_path)
    base = os.nice(0)
    with ingest_server(tmp_path, github_api.url) as ingest:
        pid = PIDS[ingest]
        threads = list(Path(f"/proc/{pid}/task").iterdir())
        nices = {int(Path(t, "stat").read_text().rsplit(")", 1)[1].split()[16]) for t in threads}
        assert nices == {base + 10}, nices
    _refused_in_one_line(tmp_path, "RELAY_INGEST_NICE", "lots")


def _refused_in_one_line(root: Path, name: str, value: str) -> None:
    """``relay --production --ingest`` with *name*=*value* stops before serving, with one line naming it."""
    e = {**os.environ, **env(root), "SYNC_TOOLS_CONFIG": str(root / "sync-tools.yaml"), name: value}
    proc = subprocess.run([sys.executable, "-m", "sync_tools", "relay", "--production", "--ingest", "--port",
                           str(free_port())], env=e, cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and f"{name}={value!r}" in proc.stderr, proc.stderr


def test_a_taken_port_stops_the_ingest_server_with_one_line(tmp_path: Path) -> None:
    """granian binds with SO_REUSEPORT: without the check a second server started silently beside the
    first and took a share of the deliveries."""
    write_config(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        e = {**os.environ, **env(tmp_path), "SYNC_TOOLS_CONFIG": str(tmp_path / "sync-tools.yaml")}
        proc = subprocess.run([sys.executable, "-m", "sync_tools", "relay", "--production", "--ingest", "--host",
                               "127.0.0.1", "--port", str(port)], env=e, cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and f"cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr


def _cores(pid: int) -> list[set[int]]:
    """The cores each thread of process *pid* may run on."""
    return [os.sched_getaffinity(int(t.name)) for t in Path(f"/proc/{pid}/task").iterdir()]


def _workers(master: int) -> list[int]:
    """The pids of granian's worker processes under the *master*."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == master:
                kids.append(int(stat.parent.name))
    return kids


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to spread the workers over")
def test_each_ingest_worker_runs_on_a_core_of_its_own(tmp_path: Path, github_api: GitHubAPIServer) -> None:  # noqa: F811
    """A delivery crosses the threads of one worker (granian's I/O thread, the event loop, the committer):
    each worker and every thread of it stays on one core, and no two workers share one. With
    RELAY_INGEST_CPUS=off the scheduler places them, and a bad value stops the start in one line."""
    github_api.state.add_repo(RELEASE_REPO)
    write_config(tmp_path)
    allowed = os.sched_getaffinity(0)
    with ingest_server(tmp_path, github_api.url, workers=2) as ingest:
        assert _post(ingest, delivery("create", tag_payload(tag="v2.10.25"))).status_code == 202  # the committer runs
        workers = _workers(PIDS[ingest])
        assert len(workers) == 2, workers

        def pinned() -> bool:  # /health answered from one worker: the other may still be starting
            return all(len({frozenset(c) for c in _cores(w)}) == 1 and len(_cores(w)[0]) == 1 for w in workers)

        wait_for(pinned, timeout=20, what=f"every thread of both workers on one core: {[_cores(w) for w in workers]}")
        per_worker = [_cores(w) for w in workers]
        assert per_worker[0][0] != per_worker[1][0] and per_worker[0][0] | per_worker[1][0] <= allowed
    with ingest_server(tmp_path, github_api.url, workers=2, RELAY_INGEST_CPUS="off") as ingest:
        for w in _workers(PIDS[ingest]):
            assert all(c == allowed for c in _cores(w))
    _refused_in_one_line(tmp_path, "RELAY_INGEST_CPUS", "0-4096")


def _counts(text: str) -> dict[str, float]:
    """``sync_tools_relay_deliveries_total`` by result, from a Prometheus text page."""
    out = {}
    for line in text.splitlines():
        if line.startswith("sync_tools_relay_deliveries_total{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('result="', 1)[1].split('"', 1)[0]] = float(value)
    return out


def test_the_ingest_servers_metrics_count_every_workers_deliveries(tmp_path: Path, github_api: GitHubAPIServer) -> None:  # noqa: F811
    """The relay's /metrics does not see what the ingest server took, and each worker counts in its own
    process: the ingest server's /metrics sums its workers' counters (prometheus_client's multiprocess
    mode), whichever worker a scrape reaches, and they start again with the server."""
    github_api.state.add_repo(RELEASE_REPO)
    write_config(tmp_path)
    with ingest_server(tmp_path, github_api.url, workers=2) as ingest:
        assert len(_workers(PIDS[ingest])) == 2
        for i in range(20):  # a connection each: the kernel spreads them over both workers
            assert _post(ingest, delivery("create", tag_payload(tag=f"v2.11.{i}"))).status_code == 202
        assert _post(ingest, delivery("create", tag_payload(tag="v2.12.0"), secret="wrong")).status_code == 401
        for _ in range(8):
            page = requests.get(ingest + "/metrics", timeout=10)
            assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/plain")
            assert _counts(page.text) == {"accepted": 20.0, "unauthorized": 1.0}, page.text
    files = sorted(p.name.split("_")[0] for p in (tmp_path / "relay.db.ingest-metrics").glob("*.db"))
    assert files and set(files) <= {"counter", "histogram", "gauge"}
    with ingest_server(tmp_path, github_api.url, workers=2) as ingest:  # a new run counts from nothing
        assert _post(ingest, delivery("create", tag_payload(tag="v2.13.0"))).status_code == 202
        assert _counts(requests.get(ingest + "/metrics", timeout=10).text) == {"accepted": 1.0}
