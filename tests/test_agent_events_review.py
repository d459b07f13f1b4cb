"""How the agent hears about releases (the SSE client and the push receiver) against hostile and unlucky
input, found by a review; each test failed before its fix. Real loopback servers and sockets throughout."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from sync_tools.agent import events
from sync_tools.agent.events import AgentEvent, SSEClient
from tests.support import serve_http, wait_for

SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()


def _event(serial: int) -> bytes:
    return f"data: {json.dumps({'type': 'release.updated', 'serial': serial})}\n\n".encode()


@contextlib.contextmanager
def _running(client: SSEClient) -> Iterator[SSEClient]:
    t = threading.Thread(target=client.run, daemon=True)
    t.start()
    try:
        yield client
    finally:
        client.stop()
        t.join(5)
        assert not t.is_alive()


class _Recorded(SSEClient):
    """An SSEClient that records the failure count each wait was drawn for (its backoff's argument)."""

    def __init__(self, *a: object, **k: object):
        super().__init__(*a, **k)  # type: ignore[arg-type]
        self.drawn: list[int] = []

    def backoff(self, failures: int) -> float:
        self.drawn.append(failures)
        return super().backoff(failures)


# ------------------------------------------------ 1. a Last-Event-ID the relay refuses, kept for good


class _RelayLike(http.server.BaseHTTPRequestHandler):
    """/events as the relay answers it: 400 for a Last-Event-ID that is not a non-negative integer;
    otherwise the server's ``script`` for this connection (the last one over and over), then close."""

    protocol_version = "HTTP/1.0"

    def log_message(self, *a: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server
        last = self.headers.get("Last-Event-ID")
        srv.seen.append(last)  # type: ignore[attr-defined]
        if last is not None and not last.strip().isdigit():
            self.send_response(400)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"error": "Last-Event-ID must be an event id"}')
            return
        script = srv.script  # type: ignore[attr-defined]
        body = script[min(len(srv.seen) - 1, len(script) - 1)]  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def _relay_like(*script: bytes) -> Iterator[http.server.HTTPServer]:
    with serve_http(_RelayLike) as srv:
        srv.seen = []  # type: ignore[attr-defined]
        srv.script = list(script)  # type: ignore[attr-defined]
        yield srv


@pytest.mark.parametrize("bad_id", ["a\x00b", "7\r8", "\u20ac1", "9" * 100_000, "not-a-number"])
def test_an_event_id_the_agent_could_not_resume_from_does_not_stop_it_hearing_of_releases(bad_id: str) -> None:
    """An ``id:`` with NUL, a CR, a character a header cannot carry, 100 KB of digits, or text the relay does
    not take: the agent kept it as its resume point (and in its state file), and every reconnect after
    failed for good (a header http.client refuses to send, a 431 or a 400 from the relay), retried
    forever: that agent heard of no release again, restarts included."""
    first = f"id: {bad_id}\n".encode() + _event(1)
    with _relay_like(first, b"id: 5\n" + _event(2)) as srv:
        got: list[AgentEvent] = []
        with _running(SSEClient(srv.url, None, got.append, backoff_base=0.01, backoff_max=0.05)):
            wait_for(lambda: [e.serial for e in got][:2] == [1, 2], timeout=10, what="the next event")
    if bad_id != "not-a-number":  # one the relay alone refuses is caught by its 400 (the next test)
        assert got[0].id is None  # the event itself is not refused; its id is


def test_a_resume_point_the_relay_refuses_is_dropped_and_the_agent_subscribes_afresh() -> None:
    """A resume point from the state file (or an event) that the relay answers 400 for: before, every
    reconnect sent it again and got 400, for good. Now the agent forgets it and subscribes from the
    relay's tail (its on_connect with no resume point makes the agent look at the release once more)."""
    with _relay_like(b"id: 5\n" + _event(2)) as srv:
        got: list[AgentEvent] = []
        connects: list[tuple[int, str | None]] = []
        client = SSEClient(srv.url, None, got.append, last_event_id="x1", backoff_base=0.01, backoff_max=0.05,
                           on_connect=lambda n, last: connects.append((n, last)))
        with _running(client):
            wait_for(lambda: got, timeout=10, what="an event")
        assert srv.seen[:2] == ["x1", None]  # type: ignore[attr-defined]
        assert connects[0] == (1, None)
        assert client.last_event_id in ("5", None)


# ------------------------------------------- 2. answers that are no stream: a reconnect and reconcile storm


@pytest.mark.parametrize("content_type, body", [
    ("text/html", b"<html><body>Welcome to our captive portal</body></html>\n"),
    ("text/event-stream", b"retry: 3000\n: connected\n\n"),  # a stream that ends at once
])
def test_a_stream_that_ends_at_once_backs_off_like_a_failure(content_type: str, body: bytes) -> None:
    """A 200 that is no event stream (a captive portal, a catch-all web server at agent.relay) or a
    stream that closes as soon as it opens: each was a "clean end", the backoff went back to its first
    step (at most half a second) and each connect told the agent to reconcile again: twice a second per
    machine, for good, every one fetching the manifest. Now the backoff grows as for a failure, and a
    200 that is not text/event-stream is not a connect at all."""

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.end_headers()
            self.wfile.write(body)

    with serve_http(H) as srv:
        connects: list[int] = []
        client = _Recorded(srv.url, None, lambda e: None, backoff_base=0.001, backoff_max=0.01,
                           on_connect=lambda n, last: connects.append(n))
        with _running(client):
            wait_for(lambda: len(client.drawn) >= 5, timeout=10, what="five reconnects")
    assert client.drawn[:5] == [0, 1, 2, 3, 4]
    if content_type == "text/html":
        assert connects == [] and client.connects == 0


def test_a_stream_that_held_resets_the_backoff() -> None:
    """The other side of the rule above: a stream that stayed open for a while and then ended (a relay
    restart) reconnects at once, from the first step of the backoff."""

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b": connected\n\n")
            self.wfile.flush()
            time.sleep(0.3)

    with serve_http(H) as srv:
        client = _Recorded(srv.url, None, lambda e: None, backoff_base=0.001, backoff_max=0.01,
                           stable_after=0.2)
        with _running(client):
            wait_for(lambda: len(client.drawn) >= 3, timeout=10, what="three reconnects")
    assert client.drawn[:3] == [0, 0, 0]


# --------------------------------------------------------------------- 3. Retry-After of a busy relay


def _busy_relay(status: int, retry_after: str, times: list[float]) -> type[http.server.BaseHTTPRequestHandler]:
    """A relay (or the proxy before it) that answers every GET *status* with ``Retry-After: retry_after``,
    noting the time of each in *times*."""

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            times.append(time.monotonic())
            self.send_response(status)
            self.send_header("Retry-After", retry_after)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return H


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_of_a_busy_relay_is_honoured_with_jitter(status: int) -> None:
    """A relay (or the proxy before it) that answers 429/503 with ``Retry-After: 1``: the agent came back
    after its own backoff (here a hundredth of a second), ignoring it. Now it waits at least that long,
    with jitter on top so a fleet does not come back in step."""
    times: list[float] = []
    with serve_http(_busy_relay(status, "1", times)) as srv:
        with _running(SSEClient(srv.url, None, lambda e: None, backoff_base=0.01, backoff_max=0.01)):
            wait_for(lambda: len(times) >= 2, timeout=10, what="a second attempt")
    assert times[1] - times[0] >= 0.95


@pytest.mark.parametrize("value", ["999999999", "-5", "soon", "Wed, 21 Oct 2099 07:28:00 GMT"])
def test_a_retry_after_that_is_huge_negative_or_nonsense_is_capped_or_ignored(
        value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hostile ``Retry-After`` must not silence the agent for years or make it spin."""
    monkeypatch.setattr(events, "RETRY_AFTER_MAX", 0.5)
    times: list[float] = []
    with serve_http(_busy_relay(503, value, times)) as srv:
        with _running(SSEClient(srv.url, None, lambda e: None, backoff_base=0.01, backoff_max=0.01)):
            wait_for(lambda: len(times) >= 3, timeout=10, what="a third attempt")
    assert all(b - a < 2.0 for a, b in zip(times, times[1:], strict=False))


def test_retry_after_draws_are_spread() -> None:
    """A thousand agents told ``Retry-After: 30`` after a relay restart come back spread out, not in step."""
    client = SSEClient("http://127.0.0.1:9", None, lambda e: None, rng=random.Random(3))
    waits = [client.delay(0, 30.0) for _ in range(1000)]
    assert min(waits) >= 30.0 and max(waits) - min(waits) > 10.0


# ----------------------------------------------------- 4. a push listener on a port already taken


def test_agent_with_a_listen_port_already_taken_stops_with_one_line_before_reconciling(tmp_path: Path) -> None:
    """``agent.listen`` on a port another program holds: the agent first recovered, reported to the relay
    and made its start-up reconcile (installing and restarting services), and only then failed, with
    werkzeug's words ("start the server with a different port") and exit 1; under a supervisor that
    restarts it, that is a reconcile loop. Now it stops at once with one line that names the setting."""
    from sync_tools.cli import cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "root").mkdir()
        cfg = tmp_path / "sync-tools.yaml"
        cfg.write_text(f"agent:\n  root: {tmp_path / 'root'}\n  source: {tmp_path / 'store'}\n"
                       f"  listen: 127.0.0.1:{port}\n  reload: none\n"
                       f"release:\n  public_key: {tmp_path / 'none.pub'}\n")
        r = CliRunner().invoke(cli, ["agent", "--config", str(cfg)], env={"SYNC_TOOLS_AGENT_SECRET": SECRET})
    assert r.exit_code != 0
    assert "agent.listen" in r.stderr and f"127.0.0.1:{port}" in r.stderr, r.stderr
    assert "cannot fetch the release" not in r.stderr  # no start-up reconcile was made
    assert "different port" not in r.stderr


# ------------------------------------------------------------ 5. slow senders against the push listener


@contextlib.contextmanager
def _receiver_server() -> Iterator[int]:
    app = events.create_receiver(events.WebhookVerifier(SECRET), lambda e: None, lambda: {"ready": True})
    server = events.make_receiver_server(app, "127.0.0.1", 0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server.server_port
    finally:
        server.shutdown()
        server.server_close()
        t.join(5)


def test_a_push_sender_that_trickles_its_request_is_cut_at_a_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiver's sockets time out after a silence, but a sender that writes one byte of its headers
    just inside that silence held its thread for as long as it liked (a request line may be 64 KiB: at
    one byte a minute, weeks). Now a request has a total deadline."""
    monkeypatch.setattr(events, "RECEIVER_SOCKET_TIMEOUT", 1.0)
    monkeypatch.setattr(events, "RECEIVER_REQUEST_DEADLINE", 1.5)
    with _receiver_server() as port, socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        started = time.monotonic()
        conn.settimeout(0.3)
        closed = False
        for b in b"POST /webhook HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 100:
            try:
                conn.sendall(bytes([b]))
                if conn.recv(4096) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except OSError:
                closed = True
                break
            if time.monotonic() - started > 8:
                break
        assert closed and time.monotonic() - started < 6


def test_the_push_listener_holds_a_bounded_number_of_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each connection got a thread with no limit: thousands of idle sockets were thousands of threads
    (against the service's task limit, which the agent's own threads share). Now connections past a
    cap are closed at once, and the ones in the cap are served as before."""
    monkeypatch.setattr(events, "RECEIVER_MAX_CONNECTIONS", 4)
    with _receiver_server() as port:
        before = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(12)]
        try:
            time.sleep(0.5)
            assert threading.active_count() - before <= 4 * 2  # a connection's thread and its deadline timer
            refused = 0
            for s in idle:
                s.settimeout(0.2)
                try:
                    refused += s.recv(1) == b""
                except TimeoutError:
                    pass
            assert refused == 8
        finally:
            for s in idle:
                s.close()
        # once they are gone, pushes are served again
        def health() -> bool:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /health HTTP/1.0\r\n\r\n")
                return s.recv(64).startswith(b"HTTP/1.1 200") or False
        wait_for(health, timeout=10, what="the receiver serving again")


def test_a_refused_resume_point_is_dropped_from_the_agent_state_too(tmp_path: Path) -> None:
    """The refused id was forgotten in memory only: the state file kept it, so the next start of the
    agent sent it again and was refused once more before it subscribed afresh."""
    from sync_tools.agent.state import load_state, save_state

    root = tmp_path / "root"
    root.mkdir()
    save_state(root, load_state(root).with_event_id("x1"))
    seen: list[str | None] = []

    def remember(eid: str | None) -> None:
        seen.append(eid)
        save_state(root, load_state(root).with_event_id(eid))

    with _relay_like(b"id: 5\n" + _event(2)) as srv:
        got: list[AgentEvent] = []
        client = SSEClient(srv.url, None, got.append, last_event_id=load_state(root).last_event_id,
                           backoff_base=0.01, backoff_max=0.05, on_event_id=remember)
        with _running(client):
            wait_for(lambda: got, timeout=10, what="an event")
    assert seen[0] is None  # dropped from the state as soon as the relay refused it
    assert load_state(root).last_event_id in ("5", None)
