"""The agent's download, extract and install path against hostile and unlucky input (found by a
review; each test failed before its fix): a .version that is not UTF-8, a link in the downloads
directory, malformed and sparse pax records, nesting past the recursion limit in gate answers and
events, redirects whose bodies never end. Real parts (signed stores on disk, real tarballs, loopback HTTP servers, real ``agent --once`` processes)."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.server
import io
import json
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sync_tools.agent.events import AgentEvent, SSEClient
from sync_tools.agent.extract import extract_binary
from sync_tools.agent.gate import Gate
from sync_tools.errors import ArchiveError
from tests.agent_support import ReleaseStore
from tests.support import serve_http
from tests.test_hostile_agent import V1, V2, Root

POLICY = {"waves": [1, 10, 50, 100], "min_healthy": 1, "settle_seconds": 60, "max_failures": 1,
          "min_age_seconds": 0}


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def root(tmp_path: Path) -> Root:
    return Root(tmp_path)


@contextlib.contextmanager
def _serve(body: bytes, content_type: str = "application/json", *, close: bool = False) -> Iterator[str]:
    """A loopback server answering every GET with *body* (HTTP/1.0, read until close when *close*)."""

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0" if close else "HTTP/1.1"

        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            if not close:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    with serve_http(H) as srv:
        yield srv.url


# ------------------------------------------------------------------ 1. a .version that is not UTF-8


def test_a_version_file_that_is_not_utf8_does_not_crash_the_agent_or_block_other_subsystems(
        tmp_path: Path) -> None:
    """install.begin reads the old .version with Path.read_text (install.py:212, 247): a .version that is
    not UTF-8 (written by another tool; read_version itself maps this to a DataError) raises
    UnicodeDecodeError out of _apply, past its `except SyncToolsError`, out of reconcile: a traceback,
    no report, and every subsystem after it in the config is never updated either, on every run."""
    store = ReleaseStore(tmp_path / "store", Ed25519PrivateKey.generate())
    (tmp_path / "release.pub").write_bytes(store.public_pem())
    config = tmp_path / "sync-tools.yaml"
    config.write_text(textwrap.dedent("""\
        release:
          store: store
          tag: latest
          public_key: release.pub
        subsystems:
          nats:
            upstream: /dev/null
            binary: nats-server
          web:
            upstream: /dev/null
            binary: web
        agent:
          root: .
          source: store
          reload: none
          platform: linux/amd64
          health_timeout: 1
          settle_seconds: 0
        """))
    nats_bin = tmp_path / "nats" / ".bin"
    nats_bin.mkdir(parents=True)
    (nats_bin / "nats-server").write_bytes(V1)
    (nats_bin / ".version").write_bytes(b"commit: abc\ntimestamp: 2020-01-01T00:00:00Z\n"
                                        b"checksum: " + _sha(V1).encode() + b"\nversion: caf\xe9\n")
    store.publish("nats", "nats-server", V2, "v2")
    web = b"#!/bin/sh\n# web w1\n"
    store.publish("web", "web", web, "w1")

    done = subprocess.run([sys.executable, "-m", "sync_tools", "agent", "--once", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode in (0, 1)
    # the unrelated subsystem is still brought to the release
    assert (tmp_path / "web" / ".bin" / "web").read_bytes() == web


# ------------------------------------------------------------------ 2. a link in downloads


def test_a_symlink_in_downloads_named_as_the_asset_is_not_written_through(root: Root, tmp_path: Path) -> None:
    """clean_downloads leaves links alone (install.py:418), then _stage opens the part file with
    open(part, "w+b") (runner.py:424), which follows the link: the link's target is truncated and
    overwritten with the asset, then the link is deleted. The same loss the fixed "downloads is a
    symlink" case had, one level down."""
    root.store.publish("nats", "nats-server", V1, "v1")
    outside = tmp_path / "outside"
    outside.mkdir()
    precious = outside / "precious.db"
    precious.write_bytes(b"data the agent never made")
    root.downloads.mkdir(parents=True)
    (root.downloads / "nats-server-linux-amd64.tar.gz").symlink_to(precious)
    root.agent().reconcile()
    assert precious.read_bytes() == b"data the agent never made"


def test_a_directory_in_downloads_named_as_the_asset_fails_the_subsystem_not_the_reconcile(root: Root) -> None:
    """The part file cannot be made where a directory is (refused, not followed), and the clean-up
    after the failed stage must not raise IsADirectoryError past _apply either."""
    root.store.publish("nats", "nats-server", V1, "v1")
    root.downloads.mkdir(parents=True)
    (root.downloads / "nats-server-linux-amd64.tar.gz").mkdir()
    report = root.agent().reconcile()
    res = report.result("nats")
    assert res is not None and res.action == "failed", report
    assert (root.downloads / "nats-server-linux-amd64.tar.gz").is_dir()
    assert not root.binary.exists()


# ------------------------------------------------------------------ 3. tarfile's own ValueErrors


def _pax_asset(pax: dict[str, str], data: bytes, name: str = "nats-server") -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=6) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tf:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o755, 0
            info.pax_headers = dict(pax)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("pax", [{"GNU.sparse.map": "x,y"}, {"GNU.sparse.size": "abc"}])
def test_a_malformed_pax_sparse_record_is_an_archive_error(tmp_path: Path, pax: dict[str, str]) -> None:
    """tarfile raises a bare ValueError for these pax records (int() of the value); extract_binary
    catches only TarError/OSError/EOFError/zlib.error (extract.py:84, 103), so the documented
    "Raises ArchiveError" does not hold."""
    archive = tmp_path / "nats-server-linux-amd64.tar.gz"
    archive.write_bytes(_pax_asset(pax, V1))
    dest = tmp_path / ".nats-server.staged"
    with pytest.raises(ArchiveError):
        extract_binary(archive, "nats-server", dest, max_bytes=1 << 20)
    assert not dest.exists()


def test_a_signed_asset_with_a_malformed_pax_record_fails_the_subsystem_not_the_reconcile(root: Root) -> None:
    """End to end: the ValueError escapes _stage (catches OSError), _apply (catches SyncToolsError) and
    reconcile: `agent --once` ends with a traceback and no report."""
    root.store.publish_archive("nats", "nats-server", _pax_asset({"GNU.sparse.map": "x,y"}, V1), _sha(V1), "v1")
    report = root.agent().reconcile()
    res = report.result("nats")
    assert res is not None and res.action == "failed", report
    assert not root.binary.exists()


# ------------------------------------------------------------------ 4. pax GNU sparse 1.0: unbounded map

_SPARSE_CHILD = r'''
import json, sys
from pathlib import Path
from sync_tools.agent.extract import extract_binary
def rss(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key)) / 1024
before = rss("VmRSS:")
try:
    extract_binary(Path(sys.argv[1]), "nats-server", Path(sys.argv[2]), max_bytes=1 << 20)
    err = None
except BaseException as e:
    err = type(e).__name__
print(json.dumps({"error": err, "growth_mib": rss("VmHWM:") - before}))
'''


def test_a_pax_gnu_sparse_map_is_refused_before_it_is_read_into_memory(tmp_path: Path) -> None:
    """_CappedTarInfo refuses GNUTYPE_SPARSE members ("their maps are read whole") but not the pax form
    of GNU sparse 1.0 (GNU.sparse.major=1/minor=0), whose map tarfile reads from the member's data into a
    Python list with no bound (tarfile._proc_gnusparse_10), capped by neither MAX_META_BYTES nor the
    member size check (which runs later). A 12 KB archive here grows the process by ~46 MiB; the
    ratio is ~4 bytes of memory per decompressed byte, so a signed asset of a few MB takes gigabytes."""
    count = 6_000_000
    data = b"1000000000000\n" + b"0\n" * count
    pax = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "nats-server",
           "GNU.sparse.realsize": str(len(V1))}
    archive = tmp_path / "nats-server-linux-amd64.tar.gz"
    archive.write_bytes(_pax_asset(pax, data, name="GNUSparseFile.0/nats-server"))
    assert archive.stat().st_size < 200_000
    done = subprocess.run([sys.executable, "-c", _SPARSE_CHILD, str(archive), str(tmp_path / "staged")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["error"] == "ArchiveError" and out["growth_mib"] < 16, out


# ------------------------------------------------------------------ 5. the wave gate "never raises"

_NESTED = b"[" * 5000
_HUGE_PERCENT = b'{"allowed": false, "percent": 1' + b"0" * 400 + b"}"


@pytest.mark.parametrize("body", [_NESTED, _HUGE_PERCENT], ids=["deeply-nested", "huge-percent"])
def test_the_gate_fails_closed_on_any_answer_and_never_raises(body: bytes) -> None:
    """gate.py:125 catches ValueError only: json.loads of a deeply nested answer raises RecursionError;
    gate.py:140 formats an int percent with :g, which raises OverflowError for an int beyond a float."""
    with _serve(body) as url:
        d = Gate(url, "token").decide("nats", "b" * 64, has_policy=True)
    assert not d.allowed


def test_a_relay_answer_the_gate_cannot_parse_holds_the_build_instead_of_aborting_the_reconcile(
        root: Root) -> None:
    """End to end: the RecursionError leaves _apply, _reconcile and reconcile: no report at all (the
    daemon's start-up reconcile in serve() would end the agent), and no other subsystem is looked at."""
    root.store.publish("nats", "nats-server", V1, "v1", rollout=POLICY)
    with _serve(_NESTED) as url:
        report = root.agent(gate=Gate(url, "token")).reconcile()
    res = report.result("nats")
    assert res is not None and res.action == "held", report
    assert not root.binary.exists()


# ------------------------------------------------------------------ 6. SSE: a malformed event ignored


def test_an_sse_event_too_deeply_nested_is_ignored_and_the_stream_goes_on() -> None:
    """events.py:193 catches ValueError/DataError only: json.loads of a deeply nested data line raises
    RecursionError, which tears the stream down; the reconnect sends the same Last-Event-ID, the relay
    replays the same event, and the agent never sees a release event again."""
    body = (b"id: 1\ndata: " + _NESTED + b"\n\n"
            + b"id: 2\ndata: " + json.dumps({"type": "release.updated", "serial": 7}).encode() + b"\n\n")
    got: list[AgentEvent] = []
    with _serve(body, "text/event-stream", close=True) as url:
        client = SSEClient(url, None, got.append, backoff_base=0.01, backoff_max=0.05)
        t = threading.Thread(target=client.run, daemon=True)
        t.start()
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        client.stop()
        t.join(5)
    assert [e.serial for e in got][:1] == [7], (client.connects, got)


# ------------------------------------------------------------------ 7. a redirect with an endless body


@contextlib.contextmanager
def _endless_redirect(seconds: float = 20.0) -> Iterator[str]:
    """Answers every GET of ``/manifest.json`` (and ``/health``) with 302 and a body that keeps coming,
    1 KiB every 0.1 s, for *seconds*; anything else is a quick 404."""

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            if self.path not in ("/manifest.json", "/health"):
                self.send_error(404)
                return
            self.send_response(302)
            self.send_header("Location", "/elsewhere")
            self.end_headers()
            end = time.monotonic() + seconds
            try:
                while time.monotonic() < end:
                    self.wfile.write(b"x" * 1024)
                    self.wfile.flush()
                    time.sleep(0.1)
            except OSError:
                pass

    with serve_http(H) as srv:
        yield srv.url


def _timed(fn) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    with contextlib.suppress(Exception):
        fn()
    return time.monotonic() - started


def test_a_redirect_whose_body_never_ends_cannot_hold_the_manifest_fetch_past_its_deadline() -> None:
    """urllib3 follows redirects inside Client.get (httpclient.py:25-27, 59-61) and drains each redirect's
    body there (PoolManager.urlopen -> drain_conn) before the fetcher's loop runs, so the fetch's total
    deadline (fetch.py:89-94), checked only as body chunks reach that loop, never applies: bytes keep
    arriving within the read timeout and the fetch (with the agent lock held by the reconcile) hangs
    for as long as the server keeps sending."""
    from sync_tools.agent.fetch import HTTPFetcher

    with _endless_redirect(20.0) as url:
        took = _timed(lambda: HTTPFetcher(url).fetch_bytes("manifest.json", max_bytes=4096, timeout=1.0))
    assert took < 8.0, f"fetch_bytes with a 1 s deadline took {took:.1f}s"


def test_a_health_url_redirecting_with_an_endless_body_cannot_hold_the_health_check() -> None:
    """The same drain in check_once (health.py:36): the per-attempt timeout and the health deadline are
    not applied, so a new build whose health URL answers like this keeps the agent from ever rolling
    it back while the body flows."""
    from sync_tools.agent.health import wait_healthy

    with _endless_redirect(20.0) as url:
        took = _timed(lambda: wait_healthy(f"{url}/health", deadline_s=1.0, attempt_timeout=1.0))
    assert took < 8.0, f"a 1 s health check took {took:.1f}s"


def test_a_chain_of_slow_redirects_cannot_hold_the_manifest_fetch_past_its_deadline() -> None:
    """Each redirect answers within the read timeout, but the chain together takes longer than the
    fetch's deadline: the redirects Client.get follows keep to that deadline too."""
    from sync_tools.agent.fetch import HTTPFetcher

    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802
            time.sleep(0.8)
            self.send_response(302)
            self.send_header("Location", f"/hop{len(self.path)}")
            self.send_header("Content-Length", "0")
            self.end_headers()

    with serve_http(H) as srv:
        took = _timed(lambda: HTTPFetcher(srv.url).fetch_bytes("manifest.json", max_bytes=4096, timeout=1.5))
    assert took < 3.0, f"fetch_bytes with a 1.5 s deadline took {took:.1f}s over 5 redirects of 0.8 s"


@pytest.mark.parametrize("location", ["http://127.0.0.1:99999/", "http://h:abc/", "http://[::1/"])
def test_a_redirect_to_no_url_is_a_redirect_error_not_a_value_error(location: str) -> None:
    """urllib.parse raises ValueError for a port out of range or an unclosed bracket; the client's own
    redirect handling must keep to its family of errors (health checks and the gate never raise)."""
    from sync_tools.agent.httpclient import Client, RedirectError

    class Moved(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    with serve_http(Moved) as server:
        with pytest.raises(RedirectError, match="not a URL"):
            Client().get(server.url + "/x", timeout=(2, 2))
