"""``ls_remote`` over git:// (dulwich's client, with our connect timeout) against ``git ls-remote`` on
the same repositories: protocol v2 from git daemon, a v0-only server, refusals, answers that are not
git, and the per-run cache's background prefetch."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sync_tools.errors import RemoteError
from sync_tools.sources.remote import ls_remote
from tests.gitrepos import GitRepo
from tests.servers.git_http import GitDaemon
from tests.support import serve_once

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git binary (the servers)")

def make_repo(path: Path) -> tuple[GitRepo, str]:
    repo = GitRepo.create(path)
    repo.commit("one")
    repo.tag("v1.0.0")
    repo.many_tags([f"v0.{i}.0" for i in range(200)])
    second = repo.commit("two")
    repo.tag("v1.1.0", annotated=True)
    repo.tag("v1.2.0-rc.1", annotated=True)
    repo.branch("release")
    return repo, second


def git_ls_remote(url: str) -> dict[str, str]:
    """`git ls-remote URL` as {ref: sha}, peeled lines included (``refs/tags/x^{}``)."""
    out = subprocess.run(["git", "ls-remote", url], capture_output=True, text=True, timeout=30, check=True,
                         env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0"}).stdout
    return {ref: sha for sha, ref in (line.split("\t") for line in out.splitlines())}


def as_ls_remote(refs, prefixes=("HEAD", "refs/heads/", "refs/tags/")) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """A RemoteRefs as `git ls-remote` prints it (peeled lines included), limited to *prefixes*."""
    out = {**refs.refs, **{f"{ref}^{{}}": sha for ref, sha in refs.peeled.items()}}
    return {r: sha for r, sha in out.items() if r.startswith(prefixes)}


def pkt_line(data: bytes) -> bytes:
    return b"%04x" % (len(data) + 4) + data


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[GitDaemon]:
    (tmp_path / "up").mkdir()
    with GitDaemon(tmp_path / "up") as d:
        yield d


@pytest.fixture
def v0_server(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """A git:// server whose upload-pack speaks protocol v0 (what servers older than git 2.18 do): the
    request line is read and a real `git upload-pack` answers, without the client's v2 request."""
    repo, second = make_repo(tmp_path / "v0" / "r.git")

    def handle(conn: socket.socket) -> None:
        conn.settimeout(5)
        head = conn.recv(4)
        conn.recv(int(head, 16) - 4)
        env = {k: v for k, v in os.environ.items() if k != "GIT_PROTOCOL"}
        subprocess.run(["git", "upload-pack", "--strict", str(repo.path)], stdin=conn.fileno(),
                       stdout=conn.fileno(), stderr=subprocess.DEVNULL, env=env, timeout=10)

    yield from ((port, second) for port in serve_once(handle))


def test_v2_answer_is_what_git_ls_remote_says(tmp_path, daemon):
    repo, second = make_repo(tmp_path / "up" / "r.git")
    url = daemon.url_for(repo.path)
    refs = ls_remote(url, timeout=10)
    assert as_ls_remote(refs) == as_ls_remote_text(git_ls_remote(url))
    assert refs.tags()["v1.1.0"] == second and refs.head_branch() == "main"
    assert len(refs.tags()) == 203


def as_ls_remote_text(listing: dict[str, str], prefixes=("HEAD", "refs/heads/", "refs/tags/")) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {r: sha for r, sha in listing.items() if r.startswith(prefixes)}


def test_v0_server_gives_the_same_answer(tmp_path, v0_server, daemon):
    port, second = v0_server
    refs = ls_remote(f"git://127.0.0.1:{port}/r.git", timeout=10)
    # the same repository's refs as git itself lists them, over v2 from git daemon
    shutil.copytree(tmp_path / "v0" / "r.git", tmp_path / "up" / "r.git")
    expected = git_ls_remote(daemon.url_for(tmp_path / "up" / "r.git"))
    assert as_ls_remote(refs) == as_ls_remote_text(expected)
    assert refs.tags()["v1.1.0"] == second and refs.head_branch() == "main"


def test_a_missing_repository_is_named_by_the_daemon(daemon):
    url = f"{daemon.url}/nope.git"
    with pytest.raises(RemoteError, match=rf"^{url}: .*nope.git"):
        ls_remote(url, timeout=10)


@pytest.mark.parametrize("answer", [
    b"HTTP/1.0 400 Bad Request\r\n\r\n",
    b"",
    pkt_line(b"version 2\n") + pkt_line(b"agent=x\n"),
    pkt_line(b"0123 refs/heads/main\n") + b"0000",
])
def test_answers_that_are_not_git_are_one_clear_error(answer):
    def handle(conn: socket.socket) -> None:
        conn.settimeout(5)
        conn.recv(4096)
        conn.sendall(answer)
        conn.shutdown(socket.SHUT_WR)  # all this server will ever say
        try:
            conn.recv(4096)  # until the client hangs up
        except OSError:
            pass

    for port in serve_once(handle):
        url = f"git://127.0.0.1:{port}/x.git"
        with pytest.raises(RemoteError, match=rf"^{url}: \S") as e:
            ls_remote(url, timeout=5)
        assert "\n" not in str(e.value) and len(str(e.value)) < 400  # one line, not a dump


def test_socket_errors_are_one_line_naming_the_url(tmp_path, daemon):
    repo, second = make_repo(tmp_path / "up" / "r.git")
    refs = ls_remote(daemon.url_for(repo.path), timeout=10)
    assert refs.tags()["v1.1.0"] == second and refs.head_branch() == "main"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(RemoteError, match=rf"^git://127.0.0.1:{port}/x.git: cannot reach: Connection refused"):
            ls_remote(f"git://127.0.0.1:{port}/x.git", timeout=5)


def test_prefetch_lists_each_url_once_in_the_background_and_get_waits_for_it(tmp_path, daemon):
    from sync_tools.sources.remote import RefCache

    repo, second = make_repo(tmp_path / "up" / "r.git")
    url = daemon.url_for(repo.path)
    calls = []
    started = threading.Event()
    release = threading.Event()

    def lister(u, timeout):
        calls.append((u, threading.current_thread().name))
        started.set()
        assert release.wait(10)
        return ls_remote(u, timeout=timeout)

    cache = RefCache(timeout=10, lister=lister)
    cache.prefetch([url, url + "/"])  # the same remote twice: one listing
    assert started.wait(10)  # running before anyone asked, and prefetch did not wait for it
    release.set()
    assert cache.get(url).tags()["v1.1.0"] == second
    cache.prefetch([url])  # asked already: nothing new
    assert cache.get(url + "/").head_branch() == "main"
    assert cache.requests == 1 and calls == [(url, "ls-remote")]


def test_prefetch_errors_are_raised_by_get_in_the_askers_thread(daemon):
    from sync_tools.errors import DataError
    from sync_tools.sources.remote import RefCache

    cache = RefCache(timeout=5)
    missing, bad = f"{daemon.url}/nope.git", "ftp://127.0.0.1/x.git"
    cache.prefetch([missing, bad])
    with pytest.raises(RemoteError, match="no such repository"):
        cache.get(missing)
    with pytest.raises(DataError, match="unsupported scheme"):
        cache.get(bad)
    with pytest.raises(DataError, match="unsupported scheme"):  # the same error again, not a new listing
        cache.get(bad)
    assert cache.requests == 2


def test_an_empty_repository_still_names_heads_branch(tmp_path, daemon):
    GitRepo.create(tmp_path / "up" / "empty.git", branch="trunk").close()
    url = daemon.url_for(tmp_path / "up" / "empty.git")
    refs = ls_remote(url, timeout=10)
    assert dict(refs.refs) == {} and refs.head_branch() == "trunk" and refs.tags() == {}
