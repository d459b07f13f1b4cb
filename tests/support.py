"""Small helpers every kind of test uses: a free loopback port, waiting for a condition, stopping a
server's process group, an HTTP handler served on loopback, a call that must end in bounded time."""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any


def free_port() -> int:
    """A loopback TCP port free right now (for servers that cannot bind port 0 and report it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], Any], timeout: float = 20.0, what: str = "condition",
             interval: float = 0.02) -> Any:
    """Poll *cond* until it returns something truthy (returned); AssertionError naming *what* after
    *timeout* seconds. The timeout is only an upper bound: a passing test never waits for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def stop_group(proc: subprocess.Popen, timeout: float = 30.0) -> bytes:
    """SIGTERM the process group of *proc* (started with ``start_new_session=True``), SIGKILL it when it
    has not ended within *timeout* seconds; returns what it wrote on stderr (b"" when not piped)."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=5)
    return err or b""


def serve_once(handler: Callable[[socket.socket], None]) -> Iterator[int]:
    """A loopback server running *handler* on each connection, in a thread; yields its port."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.settimeout(0.1)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                handler(conn)

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield srv.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        srv.close()


def serve_advertisement() -> Iterator[tuple[str, dict[str, bytes]]]:
    """A loopback HTTP server answering every request with ``answer["body"]`` as a git ref
    advertisement; yields its repository URL and *answer*, which the test fills in."""
    answer = {"body": b""}

    def handle(conn: socket.socket) -> None:
        try:
            conn.settimeout(2)
            conn.recv(65536)
            body = answer["body"]
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-git-upload-pack-advertisement\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        except OSError:
            pass

    for port in serve_once(handle):
        yield f"http://127.0.0.1:{port}/r.git", answer


class LoopbackHTTPServer(http.server.ThreadingHTTPServer):
    """A threaded HTTP server on 127.0.0.1:0; ``stopping`` is set before it shuts down (a handler that
    streams until told to stop watches it)."""

    daemon_threads = True

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler]):
        super().__init__(("127.0.0.1", 0), handler)
        self.stopping = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


def trickle_until_stopped(handler: http.server.BaseHTTPRequestHandler, interval: float) -> None:
    """From a handler of a :class:`LoopbackHTTPServer` whose headers promised more: send the body one
    space every *interval* seconds until the server is stopping or the client leaves."""
    try:
        while not handler.server.stopping.is_set():  # type: ignore[attr-defined]
            handler.wfile.write(b" ")
            handler.wfile.flush()
            time.sleep(interval)
    except OSError:
        pass


@contextlib.contextmanager
def serve_http(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[LoopbackHTTPServer]:
    """*handler* served by a :class:`LoopbackHTTPServer` in a daemon thread; stopped (``stopping`` set,
    shut down, closed, its thread joined) on leaving."""
    srv = LoopbackHTTPServer(handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.stopping.set()
        srv.shutdown()
        srv.server_close()
        t.join(5)


def in_thread(fn: Callable[[], object], limit: float, stuck: str) -> object:
    """Run *fn* in a daemon thread and return what it returned or raised; AssertionError *stuck* when
    it has not ended after *limit* seconds (a call with no total deadline)."""
    out: list[object] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(limit)
    assert not t.is_alive(), stuck
    return out[0]
