"""Delivery end to end on loopback: a real relay server, the GitHub API test server, retries,
Retry-After, dead letters, retry by hand, and durability across a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
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
from tests.relay_support import delivery, env, running_relay, tag_payload, write_config
from tests.servers.github_api import GitHubAPIServer, github_api  # noqa: F401
from tests.support import wait_for

REPO = "acme/plat-telemetry"





@pytest.fixture
def relay_server(tmp_path: Path, github_api: GitHubAPIServer) -> Iterator[RelayServer]:  # noqa: F811
    with running_relay(tmp_path, github_api, max_attempts=3) as server:
        yield server


def send(server: RelayServer, d) -> requests.Response:  # type: ignore[no-untyped-def]
    return requests.post(server.url + "/webhook", data=d.body, headers=d.headers, timeout=10)


def test_accepted_delivery_is_dispatched(relay_server: RelayServer, github_api: GitHubAPIServer) -> None:  # noqa: F811
    d = delivery("create", tag_payload(tag="v2.10.25"))
    r = send(relay_server, d)
    assert r.status_code == 202
    wait_for(lambda: github_api.state.dispatches, what="the dispatch")
    (dispatch,) = github_api.state.dispatches
    assert dispatch["repo"] == REPO and dispatch["event_type"] == "upstream-release"
    assert dispatch["client_payload"] == {"subsystem": "nats", "version": "v2.10.25", "commit": None,
                                          "upstream": "https://github.com/nats-io/nats-server",
                                          "delivery": d.headers["X-GitHub-Delivery"]}
    (req,) = github_api.requests_to("POST", "/dispatches$")
    assert req["headers"]["Authorization"] == "Bearer <redacted>"
    wait_for(lambda: get_relay(relay_server.app).outbox.stats().queue_depth == 0, what="an empty queue")


def test_redelivery_is_not_dispatched_twice(relay_server: RelayServer, github_api: GitHubAPIServer) -> None:  # noqa: F811
    d = delivery("create", tag_payload(tag="v2.10.26"))
    assert send(relay_server, d).status_code == 202
    wait_for(lambda: github_api.state.dispatches, what="the dispatch")
    again = send(relay_server, d)
    assert again.status_code == 200 and again.json()["status"] == "duplicate"
    time.sleep(0.3)
    assert len(github_api.state.dispatches) == 1


def test_retries_honour_retry_after(relay_server: RelayServer, github_api: GitHubAPIServer) -> None:  # noqa: F811
    github_api.inject("POST", "/dispatches$", status=503, times=1, headers={"Retry-After": "1"})
    started = time.monotonic()
    assert send(relay_server, delivery("create", tag_payload(tag="v2.10.27"))).status_code == 202
    wait_for(lambda: github_api.state.dispatches, what="the retried dispatch")
    elapsed = time.monotonic() - started
    # backoff_base is 0.02 s in tests: only the server's Retry-After explains a wait of a second
    assert elapsed >= 1.0, elapsed
    calls = github_api.requests_to("POST", "/dispatches$")
    assert [c["status"] for c in calls] == [503, 204]


def test_a_retried_older_version_does_not_go_out_after_a_newer_one(relay_server: RelayServer,
                                                                   github_api: GitHubAPIServer) -> None:  # noqa: F811
    github_api.inject("POST", "/dispatches$", status=502, times=1, headers={"Retry-After": "2"})
    assert send(relay_server, delivery("create", tag_payload(tag="v2.10.25"))).status_code == 202
    wait_for(lambda: github_api.requests_to("POST", "/dispatches$"), what="the failed first dispatch")
    assert send(relay_server, delivery("create", tag_payload(tag="v2.10.26"))).status_code == 202
    outbox = get_relay(relay_server.app).outbox
    wait_for(lambda: outbox.stats().queue_depth == 0, timeout=15, what="both jobs settled")
    assert [d["client_payload"]["version"] for d in github_api.state.dispatches] == ["v2.10.26"]


def test_rate_limit_reset_is_honoured(relay_server: RelayServer, github_api: GitHubAPIServer) -> None:  # noqa: F811
    reset = int(time.time()) + 2
    github_api.inject("POST", "/dispatches$", status=403, times=1,
                      headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(reset)},
                      body={"message": "API rate limit exceeded", "documentation_url": "https://docs.github.com"})
    assert send(relay_server, delivery("create", tag_payload(tag="v2.10.28"))).status_code == 202
    wait_for(lambda: github_api.state.dispatches, timeout=15, what="the dispatch after the reset")
    assert time.time() >= reset - 0.05


def test_dead_letter_after_the_limit_then_retry_by_hand(relay_server: RelayServer, tmp_path: Path,
                                                        github_api: GitHubAPIServer) -> None:  # noqa: F811
    github_api.inject("POST", "/dispatches$", status=502, times=3)
    assert send(relay_server, delivery("create", tag_payload(tag="v2.10.29"))).status_code == 202
    health = lambda: requests.get(relay_server.url + "/health", timeout=5).json()  # noqa: E731
    wait_for(lambda: health()["dead_letters"] == 1, what="a dead letter")
    assert github_api.state.dispatches == []
    assert len(github_api.requests_to("POST", "/dispatches$")) == 3

    runner = CliRunner()
    e = env(tmp_path)
    status = runner.invoke(cli, ["relay", "--config", str(tmp_path / "sync-tools.yaml"), "--status"], env=e)
    assert status.exit_code == 0, status.output
    (dead,) = json.loads(status.output)["dead"]
    assert dead["subsystem"] == "nats" and "502" in dead["error"] and dead["attempts"] == 3

    elsewhere = runner.invoke(cli, ["relay", "--config", str(tmp_path / "sync-tools.yaml"), "--status"],
                              env={**e, "SYNC_TOOLS_DB": str(tmp_path / "typo.db")})
    assert elsewhere.exit_code == 1 and "no relay database here" in elsewhere.output
    assert not (tmp_path / "typo.db").exists()  # not made empty, to report zeros
    bad = runner.invoke(cli, ["relay", "--config", str(tmp_path / "sync-tools.yaml"), "--retry-dead", "999"], env=e)
    assert bad.exit_code == 1 and "999" in bad.output
    ok = runner.invoke(cli, ["relay", "--config", str(tmp_path / "sync-tools.yaml"), "--retry-dead",
                             str(dead["id"])], env=e)
    assert ok.exit_code == 0, ok.output
    # the running relay picks the job up from the shared database (its worker polls at least every second)
    wait_for(lambda: github_api.state.dispatches, what="the hand-retried dispatch")
    assert health()["dead_letters"] == 0


def test_a_refusal_is_dead_lettered_at_once(relay_server: RelayServer, github_api: GitHubAPIServer) -> None:  # noqa: F811
    github_api.inject("POST", "/dispatches$", status=404, times=1,
                      body={"message": "Not Found", "documentation_url": "https://docs.github.com"})
    assert send(relay_server, delivery("create", tag_payload(tag="v2.10.30"))).status_code == 202
    wait_for(lambda: get_relay(relay_server.app).outbox.stats().dead == 1, what="a dead letter")
    assert len(github_api.requests_to("POST", "/dispatches$")) == 1
    (job,) = get_relay(relay_server.app).outbox.jobs("dead")
    assert "404" in (job.last_error or "")


def test_health_answers_through_slow_clients_and_a_burst(relay_server: RelayServer) -> None:
    import socket
    import threading

    slow = []
    for _ in range(40):  # slowloris: headers promising a body that never comes
        s = socket.create_connection(("127.0.0.1", relay_server.port), timeout=5)
        s.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
        slow.append(s)
    burst_done = []

    def burst() -> None:
        with requests.Session() as sess:
            for i in range(100):
                d = delivery("create", tag_payload(tag=f"v3.0.{i}"))
                sess.post(relay_server.url + "/webhook", data=d.body, headers=d.headers, timeout=10)
        burst_done.append(True)

    threads = [threading.Thread(target=burst) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        worst = 0.0
        for _ in range(20):
            t0 = time.monotonic()
            r = requests.get(relay_server.url + "/health", timeout=5)
            worst = max(worst, time.monotonic() - t0)
            assert r.status_code == 200
            time.sleep(0.02)
        assert worst < 1.0, worst
    finally:
        for t in threads:
            t.join(60)
        for s in slow:
            s.close()
    assert len(burst_done) == 3


# ------------------------------------------------------------------------------------ durability


def test_accepted_delivery_survives_sigkill(tmp_path: Path) -> None:
    """Accepted, then the relay is SIGKILLed before it could dispatch; after a restart it dispatches."""
    config = write_config(tmp_path)
    with GitHubAPIServer() as api:
        api.state.add_repo(REPO)
        # the dispatch hangs, so the first relay is killed with the job taken but not done
        api.inject("POST", "/dispatches$", status=None, delay=30, times=1)
        e = {**os.environ, **env(tmp_path), "GITHUB_API_URL": api.url, "PYTHONUNBUFFERED": "1"}
        port_file = tmp_path / "port"
        script = (
            "import sys; from pathlib import Path\n"
            "from sync_tools.config import load_config\n"
            "from sync_tools.relay.app import create_app\n"
            "from sync_tools.relay.server import RelayServer\n"
            "import threading\n"
            f"config = load_config({str(tmp_path / 'sync-tools.yaml')!r})\n"
            "server = RelayServer(create_app(config), '127.0.0.1', 0).start()\n"
            f"Path({str(port_file)!r}).write_text(str(server.port))\n"
            "threading.Event().wait()\n"
        )

        def start() -> tuple[subprocess.Popen, str]:
            port_file.unlink(missing_ok=True)
            proc = subprocess.Popen([sys.executable, "-c", script], env=e, cwd=tmp_path)
            port = wait_for(lambda: port_file.exists() and port_file.read_text(), what="the relay port")
            return proc, f"http://127.0.0.1:{port}"

        proc, url = start()
        try:
            d = delivery("create", tag_payload(tag="v2.12.0"))
            r = requests.post(url + "/webhook", data=d.body, headers=d.headers, timeout=10)
            assert r.status_code == 202
            wait_for(lambda: api.requests_to("POST", "/dispatches$"), what="the first (hanging) attempt")
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        assert api.state.dispatches == []
        assert config.relay.dispatch == "github"

        proc, url = start()
        try:
            wait_for(lambda: api.state.dispatches, timeout=15, what="the dispatch after restart")
            (dispatch,) = api.state.dispatches
            assert dispatch["client_payload"]["version"] == "v2.12.0"
            assert dispatch["client_payload"]["delivery"] == d.headers["X-GitHub-Delivery"]
            again = requests.post(url + "/webhook", data=d.body, headers=d.headers, timeout=10)
            assert again.json()["status"] == "duplicate"
        finally:
            proc.terminate()
            proc.wait(10)


def test_resume_takes_back_only_jobs_of_dead_processes(tmp_path: Path) -> None:
    from sync_tools.relay.outbox import NewJob, Outbox

    first = Outbox(tmp_path / "r.db")
    second = Outbox(tmp_path / "r.db")
    try:
        first.record("d1", "create", "dispatch", [NewJob("dispatch", {"subsystem": "nats"})])
        job = first.claim()
        assert job is not None
        second.owner = "999999999:0"  # another process sharing the file, e.g. a new gunicorn worker
        assert second.resume() == 0  # the first owner is alive: its running job is left alone
        assert first.job(job.id).status == "running"  # type: ignore[union-attr]
        with first._tx() as conn:  # the owner dies (a pid that does not exist)
            conn.execute("UPDATE jobs SET owner = '999999998:0' WHERE id = ?", (job.id,))
        assert second.resume() == 1
        assert second.claim() is not None
    finally:
        first.close()
        second.close()


def test_workers_wait_quietly_while_a_lane_is_busy(tmp_path: Path) -> None:
    """Two jobs in one lane: while the first runs, the idle workers must sleep, not spin on claim
    (under gevent a spin starves every request of the process)."""
    import threading

    from sync_tools.relay.outbox import NewJob, Outbox
    from sync_tools.relay.worker import Worker

    outbox = Outbox(tmp_path / "r.db")
    release = threading.Event()
    ran: list[int] = []

    def handler(job):  # type: ignore[no-untyped-def]
        ran.append(job.id)
        if len(ran) == 1:
            release.wait(5)
        return []

    worker = Worker(outbox, {"dispatch": handler}, threads=4)
    try:
        outbox.record("d1", "create", "a", [NewJob("dispatch", {"n": 1}, lane="dispatch")])
        outbox.record("d2", "create", "b", [NewJob("dispatch", {"n": 2}, lane="dispatch")])
        worker.start()
        wait_for(lambda: ran, what="the first job")
        cpu = time.process_time()
        time.sleep(0.6)
        spent = time.process_time() - cpu
        assert ran == [ran[0]]  # the second waits for the lane
        assert spent < 0.3, f"idle workers burned {spent:.2f} s of CPU in 0.6 s"
        release.set()
        wait_for(lambda: len(ran) == 2, timeout=3, what="the second job once the lane is free")
    finally:
        release.set()
        worker.stop()
        outbox.close()


def test_claim_cost_does_not_grow_with_a_busy_lanes_queue(tmp_path: Path) -> None:
    """Thousands of jobs queued behind one busy lane (a burst of deliveries for the single GitHub
    dispatch lane): a job of another lane, or of none, is still found, and looking costs the same
    handful of index seeks as with an empty queue (counted as SQLite VM steps, not timed)."""
    import sqlite3

    from sync_tools.relay.outbox import NewJob, Outbox

    outbox = Outbox(tmp_path / "r.db")
    try:
        def steps_of_a_look() -> int:
            with outbox._read() as conn:
                steps = [0]

                def count() -> int:
                    steps[0] += 1
                    return 0

                conn.set_progress_handler(count, 1)
                try:
                    outbox._heads(conn)
                finally:
                    conn.set_progress_handler(None, 1)
            return steps[0]

        outbox.add_jobs([NewJob("dispatch", {"n": 0}, lane="dispatch")])
        running = outbox.claim()
        assert running is not None and running.lane == "dispatch"
        outbox.add_jobs([NewJob("dispatch", {"n": 1}, lane="dispatch")])
        small = steps_of_a_look()
        outbox.add_jobs([NewJob("dispatch", {"n": i}, lane="dispatch") for i in range(2, 3000)])
        big = steps_of_a_look()
        assert big <= small * 1.5 + 20, (small, big)
        assert outbox.claim() is None  # only the busy lane has work
        outbox.add_jobs([NewJob("fanout", {"tag": "latest"}, lane="fanout"), NewJob("push", {"n": 1})])
        got = {j.kind for j in (outbox.claim(), outbox.claim())}  # type: ignore[union-attr]
        assert got == {"fanout", "push"}
        outbox.complete(running.id)
        nxt = outbox.claim()
        assert nxt is not None and nxt.lane == "dispatch" and nxt.payload == {"n": 1}  # oldest first
        assert isinstance(outbox._w, sqlite3.Connection)
    finally:
        outbox.close()


def test_two_processes_never_run_one_lane_at_once(tmp_path: Path) -> None:
    """Two outboxes on one file (two relay processes, e.g. granian workers) claiming from threads at
    once: every job runs exactly once, and never two of one lane side by side. Writers queue on the
    ``<db>.lock`` flock."""
    import threading

    from sync_tools.relay.outbox import NewJob, Outbox

    a, b = Outbox(tmp_path / "r.db"), Outbox(tmp_path / "r.db")
    b.owner = "another-process:0"
    a.add_jobs([NewJob("dispatch", {"n": i}, lane="dispatch") for i in range(40)]
               + [NewJob("push", {"n": i}) for i in range(40)])
    assert (tmp_path / "r.db.lock").exists()
    running: set[str] = set()
    overlap: list[int] = []
    done: list[int] = []
    lock = threading.Lock()

    def work(box: Outbox) -> None:
        idle = 0
        while idle < 20:
            job = box.claim()
            if job is None:
                idle += 1
                time.sleep(0.005)
                continue
            idle = 0
            if job.lane is not None:
                with lock:
                    if job.lane in running:
                        overlap.append(job.id)
                    running.add(job.lane)
                time.sleep(0.001)
                with lock:
                    running.discard(job.lane)
            box.complete(job.id)
            with lock:
                done.append(job.id)

    threads = [threading.Thread(target=work, args=(box,)) for box in (a, b, a, b)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert overlap == []
        assert sorted(done) == list(range(1, 81))
    finally:
        a.close()
        b.close()


def test_a_delivery_for_a_busy_lane_wakes_nobody(tmp_path: Path) -> None:
    """While this process runs the lane's job, a new job of that lane wakes no thread (none could
    take it); the running job's end hands the lane on."""
    import threading

    from sync_tools.relay.outbox import NewJob, Outbox
    from sync_tools.relay.worker import Worker

    outbox = Outbox(tmp_path / "r.db")
    release = threading.Event()
    ran: list[int] = []

    def handler(job):  # type: ignore[no-untyped-def]
        ran.append(job.payload["n"])
        if job.payload["n"] == 1:
            release.wait(5)
        return []

    worker = Worker(outbox, {"dispatch": handler}, threads=2)
    notified: list[int] = []
    try:
        outbox.record("d1", "create", "a", [NewJob("dispatch", {"n": 1}, lane="dispatch")])
        worker.start()
        wait_for(lambda: ran == [1], what="the first job")
        real = worker._wake.notify
        worker._wake.notify = lambda n=1: (notified.append(n), real(n))  # type: ignore[method-assign]
        outbox.record("d2", "create", "b", [NewJob("dispatch", {"n": 2}, lane="dispatch")])
        worker.wake(lanes=["dispatch"])
        assert notified == []
        worker.wake(lanes=["dispatch", None])  # a job without a lane could be taken: wake
        assert notified == [1]
        release.set()
        wait_for(lambda: ran == [1, 2], timeout=5, what="the second job once the lane is free")
    finally:
        release.set()
        worker.stop()
        outbox.close()


def test_an_answer_that_never_ends_holds_no_worker() -> None:
    """POSTs (dispatches, pushes to agents) read a bounded part of the answer within the read timeout:
    an endpoint that streams forever, or trickles, returns control; a refusal's message is still read."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from sync_tools.errors import RemoteError
    from sync_tools.relay.dispatch import MAX_ANSWER, DispatchRefused, check_response, post

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == "/refuse":
                body = b'{"message": "Not Found"}'
                self.send_response(404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                while True:  # forever, fast (/flood) or a byte at a time (/trickle)
                    data = b"x" * 4096 if self.path == "/flood" else b"x"
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                    if self.path == "/trickle":
                        time.sleep(0.05)
            except OSError:
                pass

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    session = requests.Session()
    try:
        resp, body = post(session, url + "/flood", timeout=(5, 5), what="flood", data=b"{}")
        assert resp.status_code == 200 and len(body) == MAX_ANSWER
        started = time.monotonic()
        resp, body = post(session, url + "/trickle", timeout=(5, 1), what="trickle", data=b"{}")
        assert time.monotonic() - started < 4 and 0 < len(body) < MAX_ANSWER
        resp, body = post(session, url + "/refuse", timeout=(5, 5), what="dispatch", data=b"{}")
        with pytest.raises(DispatchRefused, match=r"HTTP 404 \(Not Found\)"):
            check_response(resp, "dispatch", time.time(), body)
        # GitHub's secondary rate limit: a 403 without rate-limit headers, to be retried after a minute
        resp.status_code = 403
        limited = b'{"message": "You have exceeded a secondary rate limit. Please wait a few minutes."}'
        with pytest.raises(RemoteError) as e:
            check_response(resp, "dispatch", time.time(), limited)
        assert e.value.retry_after == 60
        with pytest.raises(RemoteError, match="closed: connection refused"):
            post(session, "http://127.0.0.1:9/", timeout=(2, 2), what="closed", data=b"{}")
    finally:
        server.shutdown()


def test_a_job_whose_outcome_cannot_be_recorded_goes_back_and_its_lane_moves_on(tmp_path: Path,
                                                                               monkeypatch) -> None:
    """The database refuses to record one outcome (locked past its busy timeout, disk full): the
    worker thread survives, the job is queued again, and the lane behind it is not stranded."""
    import sqlite3

    from sync_tools.relay.outbox import NewJob, Outbox
    from sync_tools.relay.worker import Worker

    outbox = Outbox(tmp_path / "r.db")
    ran: list[int] = []
    real_complete = outbox.complete
    broken = {"left": 1}

    def complete(job_id, follow=None):  # type: ignore[no-untyped-def]
        if broken["left"]:
            broken["left"] -= 1
            raise sqlite3.OperationalError("database is locked")
        return real_complete(job_id, follow)

    monkeypatch.setattr(outbox, "complete", complete)
    worker = Worker(outbox, {"dispatch": lambda job: ran.append(job.id) or []}, threads=1)
    try:
        outbox.record("d1", "create", "a", [NewJob("dispatch", {"n": 1}, lane="dispatch")])
        outbox.record("d2", "create", "b", [NewJob("dispatch", {"n": 2}, lane="dispatch")])
        worker.start()
        wait_for(lambda: outbox.stats().done == 2, timeout=10, what="both jobs done")
        assert ran[0] == ran[1] and len(ran) == 3  # the first ran again (at least once), then the second
        assert all(t.is_alive() for t in worker._threads)
    finally:
        worker.stop()
        outbox.close()


def test_workers_take_back_the_jobs_of_a_process_that_died_while_they_ran(tmp_path: Path, monkeypatch) -> None:
    from sync_tools.relay import worker as worker_module
    from sync_tools.relay.outbox import NewJob, Outbox
    from sync_tools.relay.worker import Worker

    monkeypatch.setattr(worker_module, "RESUME_EVERY", 0.2)
    old, new = Outbox(tmp_path / "r.db"), Outbox(tmp_path / "r.db")
    new.owner = "new-process"  # two processes sharing the file (here: one process playing both)
    ran: list[int] = []
    worker = Worker(new, {"dispatch": lambda job: ran.append(job.id) or []}, threads=1)
    try:
        old.record("d1", "create", "a", [NewJob("dispatch", {"n": 1}, lane="dispatch")])
        job = old.claim()  # the old process (alive) is running a job ...
        assert job is not None
        worker.start()  # ... when the new one starts: its start-up resume leaves a live owner's job alone
        time.sleep(0.5)
        assert ran == [] and new.job(job.id).status == "running"  # type: ignore[union-attr]
        with old._tx() as conn:  # then the old process is killed mid-job
            conn.execute("UPDATE jobs SET owner = '999999998:0' WHERE id = ?", (job.id,))
        wait_for(lambda: ran == [job.id], timeout=10, what="the dead process's job run by the live one")
    finally:
        worker.stop()
        old.close()
        new.close()


def test_a_retry_after_of_zero_still_backs_off() -> None:
    from sync_tools.relay.worker import Backoff

    b = Backoff(base=2.0)
    assert b.delay(1, 0.0, rand=lambda: 0.0) == 1.0  # the backoff's floor, not an instant retry
    assert b.delay(4, 0.0, rand=lambda: 0.0) == 8.0
    assert b.delay(1, 30.0, rand=lambda: 0.0) == 30.0  # a longer Retry-After still wins
