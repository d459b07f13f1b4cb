"""Real git repositories served on loopback, for tests and the benchmark.

- :class:`GitHTTPServer`: smart HTTP (dulwich's WSGI app) in a thread on 127.0.0.1, port 0. Every
  repository under its root directory is served at ``http://127.0.0.1:<port>/<relative path>``; each
  request opens the repository afresh, so tags made after start-up are seen.
- :class:`GitDaemon`: ``git daemon`` serving a directory over ``git://127.0.0.1:<port>/``. A real,
  fast C server: used where a pure-Python server would be the bottleneck (bench/check). Needs the
  ``git`` binary; sync-tools itself never runs git.
- fixture ``git_http_server`` (import :func:`git_http_server_fixture` into the test module): a started
  :class:`GitHTTPServer` over ``tmp_path / "upstreams"``.

Example::

    from tests.servers.git_http import git_http_server_fixture  # noqa: F401 -- fixture `git_http_server`

    def test_x(git_http_server):
        repo = GitRepo.create(git_http_server.root / "nats.git")
        url = git_http_server.url_for(repo.path)      # http://127.0.0.1:PORT/nats.git
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from socketserver import ThreadingMixIn
from wsgiref.simple_server import make_server

import pytest
from dulwich.errors import NotGitRepository
from dulwich.repo import Repo
from dulwich.server import Backend
from dulwich.web import WSGIRequestHandlerLogger, WSGIServerLogger, make_wsgi_chain

from tests.support import free_port

log = logging.getLogger(__name__)


class _DirectoryBackend(Backend):
    """Serves any repository below *root* by its relative path; nothing outside it."""

    def __init__(self, root: Path):
        self.root = root.resolve()

    def open_repository(self, path: str | bytes) -> Repo:
        # dulwich hands the path over as bytes for upload-pack POSTs (every clone and fetch)
        path = path.decode() if isinstance(path, bytes) else path
        target = (self.root / path.lstrip("/")).resolve()
        if self.root != target and self.root not in target.parents:
            raise NotGitRepository(f"{path} is outside the served root")
        return Repo(str(target))


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServerLogger):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandlerLogger):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        log.debug(format, *args)


class GitHTTPServer:
    """A smart-HTTP git server over a directory, on 127.0.0.1 and an OS-chosen port."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        app = make_wsgi_chain(_DirectoryBackend(self.root))
        self._server = make_server("127.0.0.1", 0, app, server_class=_ThreadingWSGIServer,
                                   handler_class=_QuietHandler)
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None

    def url_for(self, repo_path: Path | str) -> str:
        """The URL of a repository directory below :attr:`root` (absolute or relative path)."""
        rel = Path(repo_path).resolve().relative_to(self.root.resolve()) if Path(repo_path).is_absolute() \
            else Path(repo_path)
        return f"{self.url}/{rel.as_posix()}"

    def start(self) -> GitHTTPServer:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="git-http", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> GitHTTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class GitDaemon:
    """``git daemon`` exporting every repository below *root* over git:// on 127.0.0.1.

    ``git daemon`` cannot report a port it chose, so a free port is picked and the start retried on
    the rare clash. Raises RuntimeError when git is missing or the daemon does not come up.
    """

    def __init__(self, root: Path | str, *, max_connections: int = 32):
        self.root = Path(root).resolve()
        self.max_connections = max_connections
        self.port = 0
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None

    def url_for(self, repo_path: Path | str) -> str:
        rel = Path(repo_path).resolve().relative_to(self.root)
        return f"{self.url}/{rel.as_posix()}"

    def start(self, timeout: float = 10.0) -> GitDaemon:
        git = shutil.which("git")
        if git is None:
            raise RuntimeError("git daemon needs the git binary, which is not on PATH")
        for _attempt in range(5):
            self.port = free_port()
            self._proc = subprocess.Popen(
                [git, "daemon", "--reuseaddr", "--export-all", f"--base-path={self.root}",
                 "--listen=127.0.0.1", f"--port={self.port}", f"--max-connections={self.max_connections}",
                 "--informative-errors", str(self.root)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1"},
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self._proc.poll() is None:
                try:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                        self.url = f"git://127.0.0.1:{self.port}"
                        return self
                except OSError:
                    time.sleep(0.02)
            self.stop()
        raise RuntimeError("git daemon did not start listening on 127.0.0.1")

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=5)
        self._proc = None

    def __enter__(self) -> GitDaemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(name="git_http_server")
def git_http_server_fixture(tmp_path: Path) -> Iterator[GitHTTPServer]:
    """A started smart-HTTP git server over ``tmp_path / "upstreams"``; stopped after the test."""
    server = GitHTTPServer(tmp_path / "upstreams").start()
    try:
        yield server
    finally:
        server.stop()
