"""`check` against hostile or stuck upstreams: every listing has a total deadline (a server that trickles
a byte at a time, a stuck ssh), the forked helper never outlives its check, a garbled answer or a broken
local repository is one clear error line (no traceback), and --timeout takes only sane values."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from sync_tools.cli import cli
from sync_tools.errors import RemoteError
from sync_tools.sources.remote import ls_remote
from tests.gitrepos import GitRepo
from tests.processes import assert_process_ends
from tests.support import serve_advertisement


def pkt(data: bytes) -> bytes:
    return b"%04x" % (len(data) + 4) + data


_ADVERT = pkt(b"# service=git-upload-pack\n") + b"0000" + pkt(b"0" * 40 + b" capabilities^{}\0side-band-64k\n")


class TrickleServer:
    """A loopback TCP server that answers every connection with *head*, then one byte of *body* every
    *every* seconds, for ever (until stopped). ``url`` is its address for *scheme*."""

    def __init__(self, head: bytes, body: bytes, every: float = 0.2):
        self.head, self.body, self.every = head, body, every
        self.stop = threading.Event()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.threads: list[threading.Thread] = []

    def __enter__(self) -> TrickleServer:
        t = threading.Thread(target=self._accept, daemon=True)
        t.start()
        self.threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.sock.close()
        for t in self.threads:
            t.join(5)

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            t = threading.Thread(target=self._trickle, args=(conn,), daemon=True)
            t.start()
            self.threads.append(t)

    def _trickle(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(1)
                try:
                    conn.recv(65536)
                except TimeoutError:
                    pass
                conn.sendall(self.head)
                i = 0
                while not self.stop.wait(self.every):
                    conn.sendall(self.body[i % len(self.body):][:1])  # never finishes
                    i += 1
            except OSError:
                pass


@pytest.fixture
def trickling_http():
    head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/x-git-upload-pack-advertisement\r\n"
            b"Connection: close\r\n\r\n")
    with TrickleServer(head, _ADVERT) as server:
        yield f"http://127.0.0.1:{server.port}/repo.git"


@pytest.fixture
def trickling_git():
    with TrickleServer(b"", pkt(b"version 2\n") + pkt(b"ls-refs\n"), every=0.2) as server:
        yield f"git://127.0.0.1:{server.port}/repo.git"


@pytest.mark.parametrize("which", ["trickling_http", "trickling_git"])
def test_a_trickling_server_is_cut_at_the_listing_deadline(which, request):
    url = request.getfixturevalue(which)
    started = time.monotonic()
    with pytest.raises(RemoteError, match="timed out"):
        ls_remote(url, timeout=0.5)  # every read gets a byte within 0.5 s: only a total deadline ends it
    assert time.monotonic() - started < 3


@pytest.fixture
def trickling_ssh(tmp_path, monkeypatch):
    """An `ssh` program on PATH that answers a byte at a time for ever (the start of a 64 KiB pkt-line,
    which never ends); its pid is written to a file."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    pidfile = tmp_path / "ssh.pid"
    ssh = bindir / "ssh"
    ssh.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nprintf fff0\nwhile true; do printf a; sleep 0.2; done\n")
    ssh.chmod(ssh.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return pidfile


@pytest.mark.parametrize("url", ["ssh://127.0.0.1/x.git", "git@127.0.0.1:x.git"])
def test_a_stuck_ssh_is_killed_at_the_listing_deadline(trickling_ssh, url):
    started = time.monotonic()
    with pytest.raises(RemoteError, match="timed out"):
        ls_remote(url, timeout=0.5)
    assert time.monotonic() - started < 3
    assert_process_ends(int(trickling_ssh.read_text()), "the ssh process outlived its listing", timeout=5)


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _start_check(ws: Path, timeout: str) -> tuple[subprocess.Popen[str], int]:
    """The console script's `check` (which forks the listing helper) and the helper's pid."""
    env = {k: v for k, v in os.environ.items() if k != "SYNC_TOOLS_CONFIG"}
    proc = subprocess.Popen([sys.executable, "-m", "sync_tools", "check", "--json", "--timeout", timeout],
                            cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        kids = _children(proc.pid)
        if kids:
            return proc, kids[0]
        time.sleep(0.005)
    proc.kill()
    proc.communicate()
    pytest.skip("no listing helper was seen (not Linux, or it ended at once)")


def _workspace(tmp_path: Path, url: str) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "sync-tools.yaml").write_text(yaml.safe_dump({"subsystems": {"x": {"upstream": url, "current": "v1"}}}))
    return ws


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the helper is forked on Linux only")
def test_check_against_a_trickling_server_ends_and_leaves_no_helper(tmp_path, trickling_http):
    ws = _workspace(tmp_path, trickling_http)
    started = time.monotonic()
    proc, helper = _start_check(ws, "1")
    out, err = proc.communicate(timeout=60)
    assert time.monotonic() - started < 1 * 2 + 5  # the bound a listing is waited for
    assert proc.returncode == 1
    assert err.strip().splitlines() == [f"Error: x: {trickling_http}: timed out (no complete answer within 2s)"]
    assert_process_ends(helper, "the listing helper outlived its check", timeout=3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the helper is forked on Linux only")
def test_the_helper_dies_with_its_check(tmp_path, trickling_http):
    ws = _workspace(tmp_path, trickling_http)
    proc, helper = _start_check(ws, "60")  # the listing would go on for two minutes
    time.sleep(1.5)  # the helper is listing by now
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    assert_process_ends(helper, "the listing helper outlived its killed check", timeout=3)


# ------------------------------------------------------------------- garbled answers, broken repos

_GARBLED = {
    "non-UTF-8 service line": pkt(b"# service=git-upload-pack\n") + b"0000" + pkt(b"\xff\xfe" * 3) + b"0000",
    "ref line with no space": pkt(b"# service=git-upload-pack\n") + b"0000" + pkt(b"a" * 40 + b"\0x\n")
    + pkt(b"abc") + b"0000",
    "symref without a colon": pkt(b"# service=git-upload-pack\n") + b"0000"
    + pkt(b"a" * 40 + b" HEAD\0symref=HEAD\n") + b"0000",
    "object id that is not hex": pkt(b"# service=git-upload-pack\n") + b"0000"
    + pkt(b"g" * 40 + b" refs/tags/v1\0x\n") + b"0000",
}


@pytest.fixture
def garbling_server():
    """A loopback HTTP server answering every request with ``answer["body"]`` as a ref advertisement."""
    yield from serve_advertisement()


@pytest.mark.parametrize("case", list(_GARBLED))
def test_a_garbled_answer_is_a_remote_error(garbling_server, case):
    url, answer = garbling_server
    answer["body"] = _GARBLED[case]
    with pytest.raises(RemoteError, match=f"^{url}: "):
        ls_remote(url, timeout=5)


def test_check_reports_a_garbled_answer_in_one_line(tmp_path, garbling_server):
    url, answer = garbling_server
    answer["body"] = _GARBLED["ref line with no space"]
    ws = _workspace(tmp_path, url)
    result = CliRunner().invoke(cli, ["check", "--config", str(ws / "sync-tools.yaml")])
    assert result.exit_code == 1
    assert "Traceback" not in result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: x: {url}: the server's answer is not a git ref"), lines


def test_a_broken_local_repository_is_a_remote_error(tmp_path):
    repo = GitRepo.create(tmp_path / "up.git")
    repo.commit("one")
    repo.tag("v1.0.0")
    repo.repo.refs[b"refs/tags/v1.1.0"] = b"1" * 40  # a loose tag whose object is missing
    repo.close()
    with pytest.raises(RemoteError, match="cannot read the repository's refs"):
        ls_remote(str(tmp_path / "up.git"))
    ws = _workspace(tmp_path, str(tmp_path / "up.git"))
    result = CliRunner().invoke(cli, ["check", "--config", str(ws / "sync-tools.yaml")])
    assert result.exit_code == 1 and "Traceback" not in result.stdout + result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# ------------------------------------------------------------------------------------ --timeout

@pytest.mark.parametrize("value", ["nan", "inf", "1e300", "-1", "0", "3601"])
def test_timeout_out_of_range_is_a_usage_error(tmp_path, value):
    ws = _workspace(tmp_path, "https://example.invalid/x.git")
    result = CliRunner().invoke(cli, ["check", "--timeout", value, "--config", str(ws / "sync-tools.yaml")])
    assert result.exit_code == 2, result.output
    assert "--timeout" in result.stderr and "Traceback" not in result.stderr
