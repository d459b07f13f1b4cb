"""Relay hardening: dispatch order for commits, stopping local builds with the relay, the deadline of
an answer, unreadable request bodies, backoff at high attempt counts, untracked events on
``/webhook/<subsystem>``, odd rate-limit headers and what a local build's environment holds."""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from requests.structures import CaseInsensitiveDict

from sync_tools.errors import RemoteError
from sync_tools.relay.app import create_app, get_relay
from sync_tools.relay.dispatch import (
    DispatchRefused,
    LocalDispatcher,
    WatchedAdapter,
    check_response,
    post,
    retry_after_seconds,
    watch_session,
)
from sync_tools.relay.outbox import NewJob, Outbox
from sync_tools.relay.server import RelayServer
from sync_tools.relay.worker import Backoff, Worker
from tests.relay_support import (
    AGENT_SECRET,
    delivery,
    env,
    fixture,
    running_relay,
    settings,
    tag_payload,
    write_config,
)
from tests.servers.github_api import GitHubAPIServer, github_api  # noqa: F401
from tests.support import wait_for

REPO = "acme/plat-telemetry"


def _ended(pid: int) -> bool:
    """*pid* is gone or a zombie (its parent may be a container's init that never reaps)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


# ------------------------------------------------------------------ 1. commits go out in arrival order


@pytest.fixture
def commits_relay(tmp_path: Path, github_api: GitHubAPIServer) -> Iterator[RelayServer]:  # noqa: F811
    with running_relay(tmp_path, github_api, max_attempts=4, hello_strategy="commits",
                       hello_extra="branch: master") as server:
        yield server


def _push(server: RelayServer, sha: str) -> int:
    p = fixture("push.0.json")
    p["ref"], p["after"] = "refs/heads/master", sha
    d = delivery("push", p)
    return requests.post(server.url + "/webhook", data=d.body, headers=d.headers, timeout=10).status_code


def test_a_retried_older_push_goes_out_before_a_later_one(commits_relay: RelayServer,
                                                                 github_api: GitHubAPIServer) -> None:  # noqa: F811
    """strategy commits: push A's dispatch fails and backs off; push B waits for it, so A goes out
    before B and the release ends on the branch's newest head (not on A, as when B overtook A)."""
    github_api.inject("POST", "/dispatches$", status=502, times=1, headers={"Retry-After": "2"})
    assert _push(commits_relay, "1" * 40) == 202
    wait_for(lambda: github_api.requests_to("POST", "/dispatches$"), what="the failed first dispatch")
    assert _push(commits_relay, "2" * 40) == 202
    outbox = get_relay(commits_relay.app).outbox
    wait_for(lambda: outbox.stats().queue_depth == 0, timeout=30, what="both jobs settled")
    assert [d["client_payload"]["version"] for d in github_api.state.dispatches] == ["1" * 40, "2" * 40]
    # a later push still goes out
    assert _push(commits_relay, "3" * 40) == 202
    wait_for(lambda: len(github_api.state.dispatches) == 3, timeout=30, what="the third push's dispatch")
    assert github_api.state.dispatches[-1]["client_payload"]["version"] == "3" * 40
    # the first push retried by hand after the later ones went out is not dispatched again: it would
    # roll the build back to an older head
    wait_for(lambda: outbox.stats().queue_depth == 0, timeout=30, what="the queue drained")
    (first,) = [j for j in outbox.jobs(limit=10) if j.payload.get("version") == "1" * 40]
    with outbox._tx() as conn:
        conn.execute("UPDATE jobs SET status = 'dead' WHERE id = ?", (first.id,))
    assert outbox.retry_dead(first.id) == 1
    get_relay(commits_relay.app).worker.wake()
    wait_for(lambda: outbox.job(first.id).status == "done", timeout=30, what="the retried job settled")
    assert len(github_api.state.dispatches) == 3


# ------------------------------------------------------- 2. stopping the relay stops its local builds


def test_stopping_the_relay_stops_a_running_local_build_and_keeps_its_job(tmp_path: Path) -> None:
    """relay.stop() ends the build's process group, including a child that ignores SIGTERM and
    outlives its parent; the job goes back to the queue (no attempt counted) for the next start."""
    config = write_config(tmp_path, dispatch="local")
    pidfile = tmp_path / "child.pid"
    # the step's shell dies on SIGTERM; its child ignores SIGTERM and stays in the process group
    script = f"(trap '' TERM; exec sleep 300) & echo $! > {pidfile}; wait"
    disp = LocalDispatcher(config.path, tmp_path / "logs", timeout=600, command=("/bin/sh", "-c", script, "sh"),
                           stop_grace=1.0)
    app = create_app(config, settings(config, tmp_path), dispatcher=disp)
    relay = get_relay(app)
    relay.start()
    child = 0
    try:
        d = delivery("create", tag_payload(tag="v2.10.26"))
        assert app.test_client().post("/webhook", data=d.body, headers=d.headers).status_code == 202
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=30, what="the build's child")
        child = int(pidfile.read_text())
        assert not _ended(child)
    finally:
        relay.stop()
    try:
        wait_for(lambda: _ended(child), timeout=30, what="the build's child to end with the relay")
    finally:
        if child and not _ended(child):
            import os
            import signal

            os.kill(child, signal.SIGKILL)
    outbox = Outbox(settings(config, tmp_path).db_path)
    try:
        (job,) = outbox.jobs()
        assert (job.status, job.attempts) == ("pending", 0)
    finally:
        outbox.close()


# ------------------------------------------------------------------------ 3. the deadline of an answer


def _trickler(phase: str) -> tuple[int, threading.Event]:
    """A loopback server answering one request a byte at a time in *phase* (headers or body)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    done = threading.Event()

    def run() -> None:
        conn, _ = srv.accept()
        try:
            conn.recv(65536)
            if phase == "body":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
            t0 = time.monotonic()
            while time.monotonic() - t0 < 120 and not done.is_set():
                conn.sendall(b"x" if phase == "body" else b"X-A: b\r\n")
                time.sleep(0.2)
        except OSError:
            pass
        finally:
            conn.close()
            srv.close()
            done.set()

    threading.Thread(target=run, daemon=True).start()
    return srv.getsockname()[1], done


@pytest.mark.parametrize(("phase", "watched"), [("headers", True), ("body", True), ("body", False)])
def test_an_answer_trickled_past_the_deadline_is_cut(phase: str, watched: bool) -> None:
    """A socket timeout bounds each read, not the answer: a server trickling its headers or body a
    byte at a time is cut at connect + read timeout, and no watchdog thread is left behind."""
    port, done = _trickler(phase)
    session = watch_session(requests.Session()) if watched else requests.Session()
    started = time.monotonic()
    try:
        with pytest.raises(RemoteError, match=r"push: no complete answer within 2 s"):
            post(session, f"http://127.0.0.1:{port}/", timeout=(1.0, 1.0), what="push", data=b"{}")
        assert time.monotonic() - started < 60  # the server would trickle for 120 s
        assert done.wait(30), "the connection was not closed"
    finally:
        done.set()
    assert not [t for t in threading.enumerate() if isinstance(t, threading.Timer) and t.is_alive()]


def test_the_relays_sessions_are_watched(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    relay = get_relay(create_app(config, settings(config, tmp_path)))
    try:
        for session in (relay.pusher._session, relay.dispatcher._session):
            assert isinstance(session.get_adapter("https://api.github.com/x"), WatchedAdapter)
            assert isinstance(session.get_adapter("http://127.0.0.1/x"), WatchedAdapter)
    finally:
        relay.outbox.close()


# ------------------------------------------------------------------------ 4. unreadable request bodies


def _raw(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


@pytest.mark.parametrize("framing", [b"Content-Length: 1000\r\n\r\n0123456789",
                                     b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"],
                         ids=["cut-short", "bad-chunk"])
def test_a_body_that_cannot_be_read_is_400(tmp_path: Path, framing: bytes) -> None:
    """Under werkzeug's server a body shorter than its Content-Length, or a bad chunk header, is a
    400 (and the connection closed), not a 500."""
    config = write_config(tmp_path)
    server = RelayServer(create_app(config, settings(config, tmp_path)), "127.0.0.1", 0).start()
    try:
        head = (b"POST /webhook HTTP/1.1\r\nHost: x\r\nX-GitHub-Event: push\r\nX-GitHub-Delivery: abc\r\n"
                b"X-Hub-Signature-256: sha256=" + b"0" * 64 + b"\r\nContent-Type: application/json\r\n")
        answer = _raw(server.port, head + framing)
        assert answer.split(b"\r\n", 1)[0] == b"HTTP/1.1 400 Bad Request", answer[:200]
        assert b"could not be read" in answer
        metrics = requests.get(server.url + "/metrics", timeout=10).text
        assert 'result="bad_request"} 1.0' in metrics
    finally:
        server.stop()


# ------------------------------------------------------------------------------- 5. backoff overflow


def test_backoff_past_a_thousand_attempts_stays_at_its_cap() -> None:
    b = Backoff(base=2.0, cap=600.0)
    for attempt in (1025, 1100, 10**6):
        assert 300.0 <= b.delay(attempt, None) <= 600.0
        assert 300.0 <= b.delay(attempt, 5.0) <= 660.0


def test_a_job_at_a_high_attempt_count_waits_instead_of_looping(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "r.db")
    [job_id] = outbox.add_jobs([NewJob(kind="dispatch", payload={})])
    with outbox._tx() as conn:  # a job that has failed 1100 times (max_attempts has no ceiling)
        conn.execute("UPDATE jobs SET attempts = 1100 WHERE id = ?", (job_id,))
    calls: list[float] = []

    def handler(job):  # type: ignore[no-untyped-def]
        calls.append(time.monotonic())
        raise RemoteError("HTTP 502", status_code=502)

    worker = Worker(outbox, {"dispatch": handler}, max_attempts=5000, threads=1)
    try:
        worker.start()
        wait_for(lambda: outbox.job(job_id).attempts == 1101, timeout=30, what="the failed attempt recorded")
        time.sleep(1.0)
        job = outbox.job(job_id)
        assert job.status == "pending" and job.next_attempt >= time.time() + 200
        assert len(calls) == 1
    finally:
        worker.stop()
        outbox.close()


def test_a_failure_that_cannot_be_recorded_is_not_retried_in_a_loop(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The database refuses every failure record: the job goes back to the queue, due at once the
    first time, then after a growing delay, never run as fast as it fails."""
    outbox = Outbox(tmp_path / "r.db")
    [job_id] = outbox.add_jobs([NewJob(kind="dispatch", payload={})])

    def fail(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(outbox, "fail", fail)
    calls: list[float] = []

    def handler(job):  # type: ignore[no-untyped-def]
        calls.append(time.monotonic())
        raise RemoteError("HTTP 502", status_code=502)

    worker = Worker(outbox, {"dispatch": handler}, threads=2)
    try:
        worker.start()
        wait_for(lambda: len(calls) >= 2, timeout=30, what="the job run again once")
        time.sleep(2.0)
        # due at once, then 1 s, 2 s, 4 s ...: a handful of runs, where a loop makes hundreds
        assert len(calls) <= 5, len(calls)
        assert outbox.job(job_id).status in ("pending", "running")
    finally:
        worker.stop()
        outbox.close()


# ------------------------------------------------------------------------- 6. untracked events on a path


@pytest.mark.parametrize("path", ["/webhook", "/webhook/nats"])
def test_an_untracked_event_without_a_repository_is_ignored(tmp_path: Path, path: str) -> None:
    config = write_config(tmp_path)
    app = create_app(config, settings(config, tmp_path))
    try:
        d = delivery("organization", {"action": "member_added", "organization": {"login": "x"}})
        r = app.test_client().post(path, data=d.body, headers=d.headers)
        assert r.status_code == 200 and r.get_json()["status"] == "ignored"
        # a tracked event naming no repository is still malformed
        p = tag_payload()
        del p["repository"]
        d = delivery("create", p)
        assert app.test_client().post(path, data=d.body, headers=d.headers).status_code == 400
    finally:
        get_relay(app).outbox.close()


# ------------------------------------------------------------------- 7. odd headers and answer bodies


def test_non_ascii_digits_and_deep_nesting_in_answers_are_not_crashes() -> None:
    headers = CaseInsensitiveDict({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "\u00b2"})
    assert retry_after_seconds(headers, 1.7e9) is None
    assert retry_after_seconds(CaseInsensitiveDict({"Retry-After": "\u0663"}), 1.7e9) is None  # Arabic-Indic 3
    resp = requests.Response()
    resp.status_code = 400
    resp.headers = CaseInsensitiveDict({"Content-Type": "application/json"})
    with pytest.raises(DispatchRefused, match="HTTP 400"):
        check_response(resp, "push", 1.7e9, b"[" * 60000)


# ----------------------------------------------------------------- 8. no push secrets in a local build


def test_a_local_build_gets_no_agent_push_secret(tmp_path: Path) -> None:
    agents = [{"url": "http://127.0.0.1:9/hook", "secret_env": "AGENT1_SECRET"}]
    config = write_config(tmp_path, dispatch="local", agents=agents)
    environ = env(tmp_path, PATH="/usr/bin:/bin", KEEP_ME="yes")
    app = create_app(config, settings(config, tmp_path), environ=environ)
    relay = get_relay(app)
    try:
        disp = relay.dispatcher
        assert isinstance(disp, LocalDispatcher)
        out = tmp_path / "child.env"
        disp.command = ("/bin/sh", "-c", f"env > {out}", "sh")
        disp.dispatch({"subsystem": "nats", "version": "v2.10.26", "delivery": "d-env"})
        child_env = out.read_text()
        assert "KEEP_ME=yes" in child_env
        assert AGENT_SECRET not in child_env and "AGENT1_SECRET" not in child_env
        assert "SYNC_TOOLS_WEBHOOK_SECRET" not in child_env
    finally:
        relay.outbox.close()
