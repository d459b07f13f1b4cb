"""A doorbell between relay processes that share one outbox: the ingest server rings it after it
committed a delivery's jobs, and the relay process that runs the worker (and the SSE broker) wakes
at once instead of at its next look at the queue (``worker.POLL``).

The bell is a Linux abstract-namespace unix datagram socket named after the outbox's path: no file
to clean up, nothing on the network, and a ring costs one ``sendto``. A ring nobody hears (the other
process is restarting) is not an error: the worker's own look at the queue picks the job up.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)
RETRY = 1.0  # seconds between two tries at a bell another process holds


def address(db_path: Path) -> bytes:
    """The bell of the outbox at *db_path* (the same in every process that opens that file)."""
    digest = hashlib.sha256(str(Path(db_path).resolve()).encode()).hexdigest()[:24]
    return b"\0sync-tools-relay-" + digest.encode()


class Bell:
    """The ringing side: one socket, reused; never blocks, never raises."""

    def __init__(self, db_path: Path) -> None:
        self.address = address(db_path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)

    def ring(self) -> None:
        # nobody listening (ConnectionRefused), or the listener's queue full (BlockingIO: a wake is
        # already pending there): either way the worker gets to the job
        with contextlib.suppress(OSError):
            self._sock.sendto(b"!", self.address)

    def close(self) -> None:
        self._sock.close()


class Listener:
    """The hearing side: a daemon thread (a greenlet under gevent) that calls *on_ring* for each ring
    (several rings that arrived together call it once)."""

    def __init__(self, db_path: Path, on_ring: Callable[[], None]) -> None:
        self.address = address(db_path)
        self.on_ring = on_ring
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def start(self) -> bool:
        """Bind the bell and start listening. False when another process listens on it (a second
        worker process of the same relay, or the worker a reload replaces): that one wakes, this one
        keeps its own look at the queue and tries the bell again every RETRY seconds, so it takes
        over once the other is gone."""
        if self._bind():
            return True
        log.info("doorbell %r taken: this process finds jobs by its own look at the queue until it is free",
                 self.address[1:].decode())
        self._thread = threading.Thread(target=self._retry, name="relay-doorbell", daemon=True)
        self._thread.start()
        return False

    def _bind(self) -> bool:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(self.address)
        except OSError:
            sock.close()
            return False
        if self._stopped.is_set():  # stopped while binding
            sock.close()
            return True
        self._sock = sock
        self._thread = threading.Thread(target=self._listen, name="relay-doorbell", daemon=True)
        self._thread.start()
        return True

    def _retry(self) -> None:
        while not self._stopped.wait(RETRY):
            if self._bind():
                log.info("doorbell %r bound", self.address[1:].decode())
                return

    def _listen(self) -> None:
        sock = self._sock
        assert sock is not None
        while True:
            try:
                sock.recv(64)
                if self._sock is None:
                    return  # stopped
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    while True:  # drain what else rang meanwhile: one wake for all of it
                        sock.recv(64)
                sock.setblocking(True)
            except OSError:
                return  # closed
            try:
                self.on_ring()
            except Exception:  # noqa: BLE001 - a failing wake must not end the listener
                log.exception("doorbell: waking the worker failed")

    def stop(self) -> None:
        self._stopped.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
            self._sock = None
