"""The agent's parts, each against real things: files, tarballs, loopback HTTP servers, the
process-compose stand-in over a unix socket and TCP, Standard Webhooks signatures."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import io
import json
import os
import random
import sys
import tarfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from standardwebhooks.webhooks import Webhook

from sync_tools.agent import events as agent_events
from sync_tools.agent import install
from sync_tools.agent.events import AgentEvent, SSEClient, WebhookVerifier, create_receiver, parse_agent_event
from sync_tools.agent.extract import extract_binary
from sync_tools.agent.fetch import HTTPFetcher, LocalFetcher, TooLargeError, download, make_fetcher
from sync_tools.agent.health import check_once, wait_healthy
from sync_tools.agent.reload import CommandReloader, ProcessComposeReloader, ReloadError, make_reloader
from sync_tools.agent.state import AgentState, load_state, save_state
from sync_tools.config import load_config
from sync_tools.errors import ArchiveError, DataError, DownloadError
from sync_tools.versionfile import VersionInfo, read_version
from tests.agent_support import (
    SERVICE_PY,
    StoreServer,
    file_member,
    free_port,
    service_binary,
    special_member,
    tar_gz,
    wait_http,
)
from tests.servers.process_compose import ProcessComposeServer

# ------------------------------------------------------------------------------------------ fetch


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def test_local_fetcher_reads_the_store_and_refuses_paths(tmp_path: Path) -> None:
    (tmp_path / "latest").mkdir()
    (tmp_path / "latest" / "a.tar.gz").write_bytes(b"0123456789")
    f = make_fetcher(str(tmp_path), tag="latest")
    assert isinstance(f, LocalFetcher)
    assert b"".join(f.fetch("a.tar.gz", max_bytes=10, offset=4)) == b"456789"
    with pytest.raises(TooLargeError, match="cap"):  # a refusal, not a network fault (issue #20)
        f.fetch_bytes("a.tar.gz", max_bytes=9)
    with pytest.raises(DownloadError, match="plain file name"):
        f.fetch_bytes("../latest/a.tar.gz", max_bytes=100)
    with pytest.raises(DownloadError, match="latest/missing: no such file or directory"):
        f.fetch_bytes("missing", max_bytes=100)


def test_http_download_resumes_after_a_cut_with_range(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024)
    (tmp_path / "big.tar.gz").write_bytes(data)
    with StoreServer(tmp_path) as srv:
        srv.cut_once["big.tar.gz"] = 1_000_000
        f = HTTPFetcher(srv.url)
        seen: list[int] = []
        with open(tmp_path / "out", "w+b") as out:
            moved = download(f, "big.tar.gz", out, size=len(data), sha256=_sha(data), max_bytes=len(data),
                             progress=lambda n, done, total: seen.append(done))
        assert (tmp_path / "out").read_bytes() == data
        (first, r1), (second, r2) = srv.requests
        assert r1 is None and r2 is not None
        resumed_at = int(r2.removeprefix("bytes=").rstrip("-"))
        # resumed exactly where the connection dropped: no byte fetched twice
        assert resumed_at == 1_000_000
        assert moved == len(data) and srv.sent["big.tar.gz"] == 1_000_000 + len(data) - resumed_at
        assert seen[-1] == len(data)


def test_http_resume_against_a_server_without_range_skips_the_prefix(tmp_path: Path) -> None:
    data = os.urandom(600_000)
    (tmp_path / "a.tar.gz").write_bytes(data)
    with StoreServer(tmp_path, ranges=False) as srv:
        srv.cut_once["a.tar.gz"] = 250_000
        with open(tmp_path / "out", "w+b") as out:
            download(HTTPFetcher(srv.url), "a.tar.gz", out, size=len(data), sha256=_sha(data), max_bytes=10**7)
    assert (tmp_path / "out").read_bytes() == data


def test_download_refuses_wrong_sha_oversize_and_404(tmp_path: Path) -> None:
    data = b"x" * 1000
    (tmp_path / "a.tar.gz").write_bytes(data)
    with StoreServer(tmp_path) as srv:
        f = HTTPFetcher(srv.url)
        with open(tmp_path / "o", "w+b") as out, pytest.raises(DataError, match="sha256"):
            download(f, "a.tar.gz", out, size=1000, sha256="0" * 64, max_bytes=10**6)
        with open(tmp_path / "o", "w+b") as out, pytest.raises(DataError, match="more bytes"):
            download(f, "a.tar.gz", out, size=500, sha256=_sha(data[:500]), max_bytes=10**6)
        with open(tmp_path / "o", "w+b") as out, pytest.raises(DataError, match="over the"):
            download(f, "a.tar.gz", out, size=10 * 1024**3, sha256="0" * 64, max_bytes=10**6)
        with open(tmp_path / "o", "w+b") as out, pytest.raises(DownloadError, match="HTTP 404") as ei:
            download(f, "nope.tar.gz", out, size=10, sha256="0" * 64, max_bytes=10**6, attempts=2)
        assert ei.value.status_code == 404
    # a dead server is a DownloadError (try again later), not a crash
    with open(tmp_path / "o", "w+b") as out, pytest.raises(DownloadError):
        download(HTTPFetcher(f"http://127.0.0.1:{free_port()}", timeout=(1, 1)), "a.tar.gz", out,
                 size=10, sha256="0" * 64, max_bytes=100, attempts=1)


# ---------------------------------------------------------------------------------------- extract


def _archive(tmp_path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    p = tmp_path / "a.tar.gz"
    p.write_bytes(tar_gz(members))
    return p


def test_extract_writes_the_one_binary(tmp_path: Path) -> None:
    arch = _archive(tmp_path, [file_member("./app", b"#!/bin/sh\necho hi\n", mode=0o644)])
    dest = tmp_path / ".app.staged"
    assert extract_binary(arch, "app", dest, max_bytes=100) == _sha(b"#!/bin/sh\necho hi\n")
    assert dest.read_bytes() == b"#!/bin/sh\necho hi\n"
    assert os.stat(dest).st_mode & 0o777 == 0o755


def _claimed_10gb(tmp_path: Path) -> Path:
    info = tarfile.TarInfo("app")
    info.size = 10 * 1024**3
    header = info.tobuf(tarfile.GNU_FORMAT)
    import gzip

    p = tmp_path / "a.tar.gz"
    p.write_bytes(gzip.compress(header + b"\0" * 1024))
    return p


@pytest.mark.parametrize("case,match", [
    ("dotdot", "leaves the archive root"),
    ("absolute", "absolute path"),
    ("symlink", "link"),
    ("hardlink", "link"),
    ("device", "device"),
    ("fifo", "device or fifo"),
    ("two", "more than one member"),
    ("dir", "not a regular file"),
    ("other_name", "expected the binary"),
    ("claimed_10gb", "over the"),
    ("empty", "empty archive"),
    ("not_gzip", "not a readable tar.gz|corrupt"),
])
def test_extract_refuses_unsafe_archives(tmp_path: Path, case: str, match: str) -> None:
    body = b"#!/bin/sh\n"
    members = {
        "dotdot": [file_member("../app", body)],
        "absolute": [file_member("/app", body)],
        "symlink": [special_member("app", tarfile.SYMTYPE, linkname="/etc/passwd")],
        "hardlink": [special_member("app", tarfile.LNKTYPE, linkname="/etc/passwd")],
        "device": [special_member("app", tarfile.CHRTYPE, devmajor=1, devminor=3)],
        "fifo": [special_member("app", tarfile.FIFOTYPE)],
        "two": [file_member("app", body), file_member("extra", body)],
        "dir": [special_member("app", tarfile.DIRTYPE)],
        "other_name": [file_member("evil", body)],
        "empty": [],
    }
    if case == "claimed_10gb":
        arch = _claimed_10gb(tmp_path)
    elif case == "not_gzip":
        arch = tmp_path / "a.tar.gz"
        arch.write_bytes(b"this is not gzip")
    else:
        arch = _archive(tmp_path, members[case])
    dest = tmp_path / "bin" / ".app.staged"
    dest.parent.mkdir()
    with pytest.raises(ArchiveError, match=match):
        extract_binary(arch, "app", dest, max_bytes=1024 * 1024)
    assert list(dest.parent.iterdir()) == []  # nothing left behind
    assert not (tmp_path / "app").exists() and not Path("/app").exists()


# -------------------------------------------------------------------------------- install journal


def _version(sha: str, v: str) -> VersionInfo:
    return VersionInfo(commit="c" * 40, timestamp="2026-11-24T00:00:00Z", checksum=sha, version=v)


def _setup_bin(tmp_path: Path) -> tuple[Path, install.Journal, bytes, bytes]:
    bin_dir = tmp_path / "nats" / ".bin"
    bin_dir.mkdir(parents=True)
    old, new = b"old binary\n", b"new binary\n"
    (bin_dir / "app").write_bytes(old)
    (bin_dir / ".version").write_text(_version(_sha(old), "v1").render())
    return bin_dir, install.Journal(tmp_path), old, new


@pytest.mark.parametrize("crash_after", ["journaled", "previous-saved", "swapped", "version-written"])
def test_recover_finishes_an_interrupted_swap_forward(tmp_path: Path, crash_after: str) -> None:
    """Simulate each crash point by running the install steps up to it, then recover."""
    bin_dir, journal, old, new = _setup_bin(tmp_path)
    install.staged_path(bin_dir, "app").write_bytes(new)
    intent = install.begin(journal, subsystem="nats", bin_dir=bin_dir, binary="app", new_sha=_sha(new),
                           new_version=_version(_sha(new), "v2"))
    steps = install.STEPS
    if steps.index(crash_after) >= steps.index("previous-saved"):
        install.save_previous(bin_dir, "app")
    if steps.index(crash_after) >= steps.index("swapped"):
        os.replace(intent.staged, intent.target)
    if steps.index(crash_after) >= steps.index("version-written"):
        (bin_dir / ".version").write_text(intent.new_version)
    assert (bin_dir / "app").read_bytes() in (old, new)
    done = install.recover(journal)
    assert [i.subsystem for i in done] == ["nats"]
    assert (bin_dir / "app").read_bytes() == new
    assert read_version(bin_dir).checksum == _sha(new)
    assert (bin_dir / ".previous" / "app").read_bytes() == old
    assert read_version(bin_dir / ".previous").checksum == _sha(old)
    assert not install.staged_path(bin_dir, "app").exists()


def test_stale_staged_file_without_intent_is_removed(tmp_path: Path) -> None:
    bin_dir, journal, old, new = _setup_bin(tmp_path)
    install.staged_path(bin_dir, "app").write_bytes(new[:3])  # a crash mid-extract
    assert install.recover(journal) == []
    install.clean_stale(bin_dir, "app", journal, "nats")
    assert sorted(p.name for p in bin_dir.iterdir()) == [".version", "app"]
    assert (bin_dir / "app").read_bytes() == old


def test_previous_is_verified_before_it_is_put_back(tmp_path: Path) -> None:
    bin_dir, journal, old, new = _setup_bin(tmp_path)
    with pytest.raises(install.InstallError, match="no previous"):
        install.stage_previous(bin_dir, "app")
    install.save_previous(bin_dir, "app")
    (bin_dir / ".previous" / "app").write_bytes(b"tampered")
    with pytest.raises(DataError, match="does not match its .version"):
        install.stage_previous(bin_dir, "app")


def test_state_roundtrip_and_corrupt_state(tmp_path: Path) -> None:
    assert load_state(tmp_path) == AgentState()
    st = AgentState().with_serial(7).with_serial(3).with_failed("nats", "a" * 64).with_event_id("42")
    save_state(tmp_path, st)
    assert load_state(tmp_path) == st and st.serial == 7
    (tmp_path / ".sync-tools" / "agent-state.json").write_text("{nope")
    with pytest.raises(DataError, match="corrupt agent state"):
        load_state(tmp_path)


# ----------------------------------------------------------------------------------------- health


def test_health_url_and_command(tmp_path: Path) -> None:
    (tmp_path / "svc.py").write_text(SERVICE_PY)
    port = free_port()
    script = tmp_path / "svc"
    script.write_bytes(service_binary(tmp_path / "svc.py", "v9", mode="unhealthy"))
    script.chmod(0o755)
    import subprocess

    proc = subprocess.Popen([str(script)], env={**os.environ, "PORT": str(port)})
    try:
        url = f"http://127.0.0.1:{port}/health"
        res = wait_healthy(url, deadline_s=1.0, interval=0.05)
        assert not res.ok and "HTTP 500" in res.detail and res.attempts > 1
    finally:
        proc.kill()
        proc.wait()
    assert check_once("exit 0").ok
    bad = check_once("echo broken >&2; exit 4")
    assert not bad.ok and "exit 4 broken" in bad.detail
    assert not check_once("sleep 5", timeout=0.2).ok
    assert wait_healthy(None).ok  # nothing configured: healthy by definition
    assert not check_once(f"http://127.0.0.1:{free_port()}/health", timeout=0.5).ok


def test_a_health_check_that_hangs_is_stopped_with_what_it_started() -> None:
    """A timed-out command is stopped with its children (a background job keeping the output pipe
    open used to hold the agent until it ended); a URL that streams its body is judged by its status."""
    started = time.monotonic()
    res = check_once("sleep 60 & sleep 60", timeout=0.5)
    assert not res.ok and "timed out" in res.detail
    assert time.monotonic() - started < 30  # not the 60 s of the background sleep

    class Stream(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                while True:
                    self.wfile.write(b"1000\r\n" + b"x" * 4096 + b"\r\n")
            except OSError:
                pass

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stream)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        res = check_once(f"http://127.0.0.1:{server.server_port}/events", timeout=2)
        assert res.ok and "HTTP 200" in res.detail
    finally:
        server.shutdown()


# ----------------------------------------------------------------------------------------- reload


@pytest.fixture
def pc_server(tmp_path: Path):
    (tmp_path / "svc.py").write_text(SERVICE_PY)
    ports = {"nats": free_port(), "arc": free_port()}
    procs = {n: ([sys.executable, str(tmp_path / "svc.py"), f"{n}-v1", "ok"], {"PORT": str(p)})
             for n, p in ports.items()}
    with ProcessComposeServer(procs, token="s3cret") as srv:
        srv.ports = ports  # type: ignore[attr-defined]
        yield srv


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_process_compose_restarts_only_that_process(pc_server: ProcessComposeServer, transport: str) -> None:
    target = pc_server.socket_path if transport == "unix" else pc_server.url
    r = ProcessComposeReloader(target, token="s3cret", ready_timeout=5)
    for port in pc_server.ports.values():  # type: ignore[attr-defined]
        wait_http(f"http://127.0.0.1:{port}/health")
    before = {n: r.status(n) for n in ("nats", "arc")}
    assert before["nats"].running and before["nats"].pid
    r.restart("nats")
    after = {n: r.status(n) for n in ("nats", "arc")}
    assert after["nats"].running and after["nats"].pid != before["nats"].pid
    assert after["arc"].pid == before["arc"].pid
    sent = [(m, p) for m, p, _ in pc_server.requests]
    assert ("POST", "/process/restart/nats") in sent and not any("arc" in p and m != "GET" for m, p in sent)
    assert all(tok == "s3cret" for _, _, tok in pc_server.requests)
    assert pc_server.schema_errors == []


def test_process_compose_restart_waits_for_a_new_process(tmp_path: Path) -> None:
    """process-compose may still report the old process running just after it answers the restart:
    the reloader waits for a new pid, or the health check would judge the old binary."""
    port = free_port()
    (tmp_path / "svc.py").write_text(SERVICE_PY)
    procs = {"nats": ([sys.executable, str(tmp_path / "svc.py"), "nats-v1", "ok"], {"PORT": str(port)})}
    with ProcessComposeServer(procs, answer_first=0.5) as srv:
        r = ProcessComposeReloader(srv.url, ready_timeout=10)
        wait_http(f"http://127.0.0.1:{port}/health")
        before = r.status("nats")
        r.restart("nats")
        after = r.status("nats")
        assert after.running and after.pid != before.pid


def test_process_compose_errors_are_reload_errors(pc_server: ProcessComposeServer) -> None:
    with pytest.raises(ReloadError, match="HTTP 401"):
        ProcessComposeReloader(pc_server.url, token="wrong").status("nats")
    with pytest.raises(ReloadError, match="does not exist"):
        ProcessComposeReloader(pc_server.url, token="s3cret").restart("nope")
    with pytest.raises(ReloadError):
        ProcessComposeReloader(str(Path(pc_server.dir) / "missing.sock")).status("nats")
    assert pc_server.schema_errors == []


def test_make_reloader_reads_socket_env_and_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PC_API_TOKEN", "tok")
    monkeypatch.delenv("PC_SOCKET_PATH", raising=False)
    r = make_reloader("process-compose", root=tmp_path, socket_path="pc/.pc.sock")
    assert isinstance(r, ProcessComposeReloader)
    assert r.target == str(tmp_path / "pc" / ".pc.sock") and r.token == "tok"
    cmd = make_reloader("command", root=tmp_path, command="echo {process} > restarted")
    cmd.restart("nats")
    assert (tmp_path / "restarted").read_text().strip() == "nats"
    with pytest.raises(ReloadError, match="exited 3"):
        CommandReloader("exit 3").restart("nats")


# ----------------------------------------------------------------------------------------- events

SECRET = "whsec_" + base64.b64encode(b"agent-secret-0123456789").decode()


def _signed(body: bytes, *, msg_id: str = "msg_1", ts: datetime | None = None, secret: str = SECRET) -> dict:
    ts = ts or datetime.now(UTC)
    sig = Webhook(secret).sign(msg_id, ts, body.decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(int(ts.timestamp())), "webhook-signature": sig,
            "Content-Type": "application/json"}


def _receiver() -> tuple[object, list[AgentEvent]]:
    got: list[AgentEvent] = []
    app = create_receiver(WebhookVerifier(SECRET), got.append, lambda: {"ready": True})
    return app.test_client(), got


def test_receiver_accepts_standard_webhooks_once() -> None:
    client, got = _receiver()
    body = json.dumps({"type": "release.updated", "release": "latest", "subsystems": ["nats"],
                       "serial": 43, "manifest": "http://x/manifest.json"}).encode()
    r = client.post("/webhook", data=body, headers=_signed(body))
    assert r.status_code == 202
    assert got == [AgentEvent(subsystems=("nats",), serial=43, manifest="http://x/manifest.json",
                              id="msg_1", source="webhook")]
    assert client.post("/webhook", data=body, headers=_signed(body)).json["status"] == "duplicate"
    assert len(got) == 1
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize("case", ["wrong_secret", "old", "future", "tampered", "unsigned", "garbage_sig"])
def test_receiver_refuses_unverified(case: str) -> None:
    client, got = _receiver()
    body = b'{"type": "release.updated", "subsystems": ["nats"]}'
    headers = _signed(body)
    now = datetime.now(UTC).timestamp()
    if case == "wrong_secret":
        headers = _signed(body, secret="whsec_" + base64.b64encode(b"other").decode())
    elif case == "old":
        headers = _signed(body, ts=datetime.fromtimestamp(now - 6 * 60, UTC))
    elif case == "future":
        headers = _signed(body, ts=datetime.fromtimestamp(now + 6 * 60, UTC))
    elif case == "tampered":
        body = body.replace(b"nats", b"arc!")
    elif case == "unsigned":
        headers = {"Content-Type": "application/json"}
    elif case == "garbage_sig":
        headers["webhook-signature"] = "nonsense"
    assert client.post("/webhook", data=body, headers=headers).status_code == 401
    assert got == []


def test_receiver_server_drops_a_silent_connection(monkeypatch) -> None:
    import socket

    monkeypatch.setattr(agent_events, "RECEIVER_SOCKET_TIMEOUT", 0.5)
    app = create_receiver(WebhookVerifier(SECRET), lambda e: None, lambda: {"ready": True})
    server = agent_events.make_receiver_server(app, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with socket.create_connection(("127.0.0.1", server.server_port), timeout=10) as silent:
            silent.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")  # then nothing
            started = time.monotonic()
            while silent.recv(4096):  # whatever it answers, the server closes the connection
                pass
            assert time.monotonic() - started < 8
        # and it still serves everyone else
        assert requests.get(f"http://127.0.0.1:{server.server_port}/health", timeout=5).status_code == 200
    finally:
        server.shutdown()


def test_receiver_accepts_a_timestamp_within_five_minutes() -> None:
    client, got = _receiver()
    body = b'{"type": "release.updated"}'
    ts = datetime.fromtimestamp(datetime.now(UTC).timestamp() - 4 * 60, UTC)
    assert client.post("/webhook", data=body, headers=_signed(body, ts=ts)).status_code == 202
    assert len(got) == 1


def test_receiver_accepts_githubs_release_webhook() -> None:
    client, got = _receiver()
    body = json.dumps({"action": "published", "release": {"tag_name": "latest"},
                       "repository": {"full_name": "joeblew999/plat-telemetry"}}).encode()
    sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {"X-Hub-Signature-256": sig, "X-GitHub-Event": "release", "X-GitHub-Delivery": "d-1",
               "Content-Type": "application/json"}
    assert client.post("/webhook", data=body, headers=headers).status_code == 202
    assert got[0].source == "github" and got[0].repo == "joeblew999/plat-telemetry"
    assert client.post("/webhook", data=body, headers=headers).json["status"] == "duplicate"
    ping = {**headers, "X-GitHub-Event": "ping", "X-GitHub-Delivery": "d-2"}
    assert client.post("/webhook", data=body, headers=ping).json["status"] == "ignored"
    bad = {**headers, "X-Hub-Signature-256": "sha256=" + "0" * 64, "X-GitHub-Delivery": "d-3"}
    assert client.post("/webhook", data=body, headers=bad).status_code == 401
    assert len(got) == 1


def test_parse_agent_event_rejects_bad_payloads() -> None:
    with pytest.raises(DataError):
        parse_agent_event([1, 2])
    with pytest.raises(DataError):
        parse_agent_event({"subsystems": "nats"})
    with pytest.raises(DataError):
        parse_agent_event({"serial": "43"})


class _SSEHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server
        srv.seen.append((self.headers.get("Authorization"), self.headers.get("Last-Event-ID")))  # type: ignore[attr-defined]
        if self.headers.get("Authorization") != "Bearer tok":
            self.send_response(401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        start = int(self.headers.get("Last-Event-ID") or 0)
        # two events, a heartbeat comment, then the connection drops (a cut stream)
        for i in (start + 1, start + 2):
            payload = json.dumps({"type": "release.updated", "subsystems": ["nats"], "serial": i})
            self.wfile.write(f": heartbeat\n\nid: {i}\nevent: release.updated\ndata: {payload}\n\n".encode())
            self.wfile.flush()
        self.close_connection = True


def test_sse_client_reconnects_with_last_event_id() -> None:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SSEHandler)
    httpd.seen = []  # type: ignore[attr-defined]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    got: list[AgentEvent] = []
    ids: list[str] = []
    connects: list[tuple[int, str | None]] = []
    client = SSEClient(f"http://127.0.0.1:{httpd.server_address[1]}", "tok", got.append, on_event_id=ids.append,
                       on_connect=lambda n, last: connects.append((n, last)),
                       backoff_base=0.01, backoff_max=0.05, rng=random.Random(1))
    t = threading.Thread(target=client.run, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 5
        while len(got) < 6 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        client.stop()
        t.join(5)
        httpd.shutdown()
        httpd.server_close()
    assert [e.serial for e in got[:6]] == [1, 2, 3, 4, 5, 6]
    assert ids[:6] == ["1", "2", "3", "4", "5", "6"]
    assert httpd.seen[:3] == [("Bearer tok", None), ("Bearer tok", "2"), ("Bearer tok", "4")]  # type: ignore[attr-defined]
    assert connects[:3] == [(1, None), (2, "2"), (3, "4")]
    assert not t.is_alive()


def test_sse_backoff_is_exponential_with_full_jitter() -> None:
    c = SSEClient("http://127.0.0.1:9", None, lambda e: None, backoff_base=0.5, backoff_max=8,
                  rng=random.Random(7))
    for n in range(8):
        bound = min(8, 0.5 * 2**n)
        samples = [c.backoff(n) for _ in range(200)]
        assert all(0 <= s <= bound for s in samples)
        assert max(samples) > bound * 0.8  # jitter spreads over the whole window


def test_requests_has_no_proxy_for_loopback() -> None:
    # guards the loopback-only rule for every HTTP test in this file
    assert requests.utils.should_bypass_proxies("http://127.0.0.1:1/x", no_proxy=None)


def test_tar_helper_is_deterministic() -> None:
    a = tar_gz([file_member("x", b"1")])
    assert a == tar_gz([file_member("x", b"1")])
    with tarfile.open(fileobj=io.BytesIO(a)) as tf:
        assert tf.getnames() == ["x"]


def test_agent_updates_through_process_compose(tmp_path: Path) -> None:
    """The whole update with the process-compose backend: only the changed process is restarted, over
    the unix socket, and comes back on the new binary."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from sync_tools.agent.runner import Agent
    from sync_tools.config import parse_config
    from tests.agent_support import ReleaseStore

    (tmp_path / "svc.py").write_text(SERVICE_PY)
    store = ReleaseStore(tmp_path / "store", Ed25519PrivateKey.generate())
    root = tmp_path / "root"
    ports = {"nats": free_port(), "arc": free_port()}
    for n in ports:
        store.publish(n, n, service_binary(tmp_path / "svc.py", f"{n}-v1"), "v1")
    subs = {n: {"upstream": "/dev/null", "binary": n, "health": f"http://127.0.0.1:{p}/health"}
            for n, p in ports.items()}
    config = parse_config(tmp_path / "sync-tools.yaml",
                          {"subsystems": subs, "agent": {"root": str(root), "health_timeout": 5, "settle_seconds": 0}})
    # the first install, before anything runs: no health URL to ask yet
    bare = parse_config(tmp_path / "sync-tools.yaml", {"subsystems": {n: {"upstream": "/dev/null", "binary": n}
                                                                     for n in ports},
                                                       "agent": {"root": str(root)}})
    with StoreServer(store.dir) as srv:
        first = Agent(bare, fetcher=HTTPFetcher(srv.url), public_key=store.key.public_key(),
                      platform="linux/amd64", reloader=make_reloader("none", root=root)).reconcile()
        assert first.ok, first
        procs = {n: ([str(root / n / ".bin" / n)], {"PORT": str(p)}) for n, p in ports.items()}
        with ProcessComposeServer(procs) as pc:
            for p in ports.values():
                wait_http(f"http://127.0.0.1:{p}/health")
            reloader = ProcessComposeReloader(pc.socket_path, ready_timeout=5)
            arc_pid = reloader.status("arc").pid
            store.publish("nats", "nats", service_binary(tmp_path / "svc.py", "nats-v2"), "v2")
            report = Agent(config, fetcher=HTTPFetcher(srv.url), public_key=store.key.public_key(),
                           platform="linux/amd64", reloader=reloader).reconcile()
            assert report.result("nats").action == "updated" and report.result("arc").action == "unchanged"
            assert wait_http(f"http://127.0.0.1:{ports['nats']}/health").startswith("nats-v2")
            assert reloader.status("arc").pid == arc_pid
            assert [p for m, p, _ in pc.requests if m != "GET"] == ["/process/restart/nats"]
            assert pc.schema_errors == []


class _EndlessEventHandler(http.server.BaseHTTPRequestHandler):
    """One SSE event whose data lines never end with a blank line: 12 lines of 100 KB, then close."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *a: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for _ in range(12):
            self.wfile.write(b"data: " + b"x" * 100_000 + b"\n")
            self.wfile.flush()
        self.close_connection = True


def test_sse_client_caps_the_data_of_one_event() -> None:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EndlessEventHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    got: list[AgentEvent] = []
    client = SSEClient(f"http://127.0.0.1:{httpd.server_address[1]}", None, got.append)
    try:
        with pytest.raises(DataError, match="larger than 1 MiB"):
            client._stream()
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert got == []


@pytest.mark.parametrize("body", [b"not json {", b"[1, 2]", b'{"subsystems": "nats"}'])
def test_receiver_answers_400_for_a_signed_delivery_that_is_not_an_event(body: bytes) -> None:
    client, got = _receiver()
    r = client.post("/webhook", data=body, headers=_signed(body))
    assert r.status_code == 400
    assert r.json["error"].startswith("signed delivery is not")
    assert got == []


def test_receiver_answers_400_for_a_signed_github_delivery_that_is_not_json() -> None:
    client, got = _receiver()
    body = b"not json {"
    sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    headers = {"X-Hub-Signature-256": sig, "X-GitHub-Event": "release", "X-GitHub-Delivery": "d-9"}
    r = client.post("/webhook", data=body, headers=headers)
    assert r.status_code == 400 and "not JSON" in r.json["error"]
    assert got == []


def test_stage_previous_fsyncs_its_copy_where_links_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir, _journal, old, _new = _setup_bin(tmp_path)
    install.save_previous(bin_dir, "app")

    def no_links(*_a: object, **_k: object) -> None:
        raise OSError(18, "Invalid cross-device link")

    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    monkeypatch.setattr(install.os, "link", no_links)
    monkeypatch.setattr(install.os, "fsync", fsync)
    sha, _info = install.stage_previous(bin_dir, "app")
    staged = install.staged_path(bin_dir, "app")
    assert sha == _sha(old) and staged.read_bytes() == old
    assert os.stat(staged).st_ino in synced


def test_process_compose_stop_start_as_the_owner_does_it(pc_server: ProcessComposeServer, tmp_path: Path) -> None:
    """`agent.restart: stop-start`: stop, wait until stopped, then start (plat-telemetry replaced
    restart by this: the new process must not start while the old one holds its port). No restart
    call is made, the new process listens on the same port, and only that process is touched."""
    cfg = tmp_path / "sync-tools.yaml"
    cfg.write_text(f"agent:\n  reload: process-compose\n  url: {pc_server.url}\n  restart: stop-start\n")
    r = make_reloader("process-compose", root=tmp_path, url=pc_server.url,
                      restart=load_config(cfg).agent.restart)
    assert isinstance(r, ProcessComposeReloader) and r.stop_start
    r.token = "s3cret"
    port = pc_server.ports["nats"]  # type: ignore[attr-defined]
    wait_http(f"http://127.0.0.1:{port}/health")
    before = r.status("nats")
    r.restart("nats")
    after = r.status("nats")
    assert after.running and after.pid != before.pid
    wait_http(f"http://127.0.0.1:{port}/health")  # the new process has the port
    sent = [(m, p) for m, p, _ in pc_server.requests if m != "GET"]
    assert sent == [("PATCH", "/process/stop/nats"), ("POST", "/process/start/nats")]
    assert pc_server.schema_errors == []
