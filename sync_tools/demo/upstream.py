"""Tiny upstream projects for the demo: real git repos (dulwich) holding a buildable service.

Each repo holds ``service.py``, a small HTTP service that answers ``GET /health`` with its name and
version, and ``VERSION``. Building it (see :mod:`sync_tools.demo.kit`) turns the checked-out source
into an executable at ``<subsystem>/.bin/<binary>``.
"""

from __future__ import annotations

import time
from pathlib import Path

from dulwich import porcelain
from dulwich.repo import Repo

SERVICE_SOURCE = '''\
"""{name} {version}: a tiny service built by the sync-tools demo."""
import http.server
import json
import os
import signal
import sys
import threading
import time

STARTED = time.time()
NAME = {name!r}
VERSION = {version!r}
CRASH_AFTER = {crash_after!r}  # a bad build: healthy at first, then the process exits this many seconds in


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == "/health" and not os.environ.get("DEMO_UNHEALTHY")
        body = json.dumps({{"service": NAME, "version": VERSION, "pid": os.getpid(), "started": STARTED}}).encode()
        self.send_response(200 if ok else 503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main():
    port = int(os.environ.get("PORT", "0"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if CRASH_AFTER is not None:
        threading.Timer(CRASH_AFTER, lambda: os._exit(1)).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
'''

_AUTHOR = b"sync-tools demo <demo@sync-tools.invalid>"


def _commit(repo_path: Path, message: str) -> bytes:
    return porcelain.commit(str(repo_path), message=message.encode(), author=_AUTHOR, committer=_AUTHOR)


def write_version(repo_path: Path, name: str, version: str, *, crash_after: float | None = None) -> bytes:
    """Write the service source at *version* (one that exits *crash_after* seconds after it starts, if
    given) and commit it; returns the commit sha (hex bytes)."""
    (repo_path / "service.py").write_text(SERVICE_SOURCE.format(name=name, version=version,
                                                                crash_after=crash_after))
    (repo_path / "VERSION").write_text(version + "\n")
    porcelain.add(str(repo_path), paths=[str(repo_path / "service.py"), str(repo_path / "VERSION")])
    return _commit(repo_path, f"{name} {version}")


def create_upstream(repo_path: Path, name: str, version: str) -> bytes:
    """A new upstream repo at *repo_path* with one commit and an annotated tag *version*."""
    repo_path.mkdir(parents=True, exist_ok=True)
    Repo.init(str(repo_path), default_branch=b"main")
    sha = write_version(repo_path, name, version)
    tag(repo_path, version)
    return sha


def tag(repo_path: Path, version: str) -> None:
    """An annotated tag at HEAD, as upstream projects release."""
    porcelain.tag_create(str(repo_path), version.encode(), author=_AUTHOR,
                         message=f"release {version}".encode(), annotated=True,
                         tag_time=int(time.time()))


def release(repo_path: Path, name: str, version: str, *, crash_after: float | None = None) -> str:
    """Commit *version* and tag it: an upstream release (a bad one with *crash_after*). Returns the
    commit sha (hex str)."""
    sha = write_version(repo_path, name, version, crash_after=crash_after)
    tag(repo_path, version)
    return sha.decode()
