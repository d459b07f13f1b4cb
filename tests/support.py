"""Small helpers every kind of test uses: a free loopback port, waiting for a condition, stopping a
server's process group."""

from __future__ import annotations

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
