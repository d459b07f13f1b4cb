"""The agent where the world misbehaves in ways the happy path never shows: a binary installed before the
agent (no or a stale ``.version``), process managers and health checks answering garbage, helpers that
ignore SIGTERM, reload commands that start daemons, sources that trickle, events that lose their serial,
and a source that is down when the agent boots. Real parts throughout: signed releases on disk or served
over loopback HTTP, real shell commands and process groups."""

from __future__ import annotations

import hashlib
import http.server
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sync_tools.agent import fetch as agent_fetch
from sync_tools.agent import install
from sync_tools.agent.events import AgentEvent
from sync_tools.agent.fetch import DeadlineError, HTTPFetcher, LocalFetcher, download
from sync_tools.agent.health import check_once, wait_healthy
from sync_tools.agent.reload import (
    CommandReloader,
    NoReloader,
    ProcessStatus,
    Reloader,
    ReloadError,
    SupervisorReloader,
)
from sync_tools.agent.runner import Agent, UpdateReport, coalesce, serve
from sync_tools.agent.state import AgentState, load_state
from sync_tools.config import load_config
from sync_tools.errors import DataError, DownloadError
from sync_tools.manifest import MANIFEST_NAME, SIGNATURE_NAME
from sync_tools.procs import stop_group
from sync_tools.versionfile import read_version
from tests.agent_support import ReleaseStore, StoreServer
from tests.processes import assert_process_ends
from tests.support import LoopbackHTTPServer, in_thread, serve_http, trickle_until_stopped, wait_for

GOOD = b"#!/bin/sh\n# good v1\n"
BAD = b"#!/bin/sh\n# BAD v2\n"


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class Setup:
    """An install root with one subsystem ``nats``, a signed store on disk, reload backend *reload*."""

    def __init__(self, base: Path, *, health: str = "grep -q good nats/.bin/nats-server", reload: str = "none",
                 extra: str = ""):
        self.base = base
        self.store = ReleaseStore(base / "store", Ed25519PrivateKey.generate())
        (base / "release.pub").write_bytes(self.store.public_pem())
        (base / "sync-tools.yaml").write_text(
            "release:\n  store: store\n  tag: latest\n  public_key: release.pub\n"
            "subsystems:\n  nats:\n    upstream: /dev/null\n    binary: nats-server\n"
            f"    health: \"{health}\"\n"
            f"agent:\n  root: .\n  source: store\n  reload: {reload}\n  platform: linux/amd64\n"
            f"  health_timeout: 1\n  settle_seconds: 0\n{extra}")
        self.bin_dir = base / "nats" / ".bin"

    def config(self):  # noqa: ANN201
        return load_config(self.base / "sync-tools.yaml")

    def agent(self, **kw: object) -> Agent:
        return Agent(self.config(), **kw)  # type: ignore[arg-type]

    @property
    def binary(self) -> Path:
        return self.bin_dir / "nats-server"

    def journal(self) -> list[str]:
        return [p.name for p in (self.base / ".sync-tools" / "journal").glob("*.json")]


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


# ------------------------------------------------------------- 1. the automatic restore of an old binary


@pytest.mark.parametrize("version_file", ["none", "stale", "malformed"])
def test_a_failed_update_restores_a_binary_installed_without_a_valid_version_file(setup: Setup,
                                                                                   version_file: str) -> None:
    """A binary put there before the agent (by hand, by an old Taskfile) may have no .version, or one
    that names other bytes; the restore trusts the journal's sha256 of it instead."""
    setup.bin_dir.mkdir(parents=True)
    setup.binary.write_bytes(GOOD)
    if version_file == "stale":
        (setup.bin_dir / ".version").write_text(f"commit: abc\ntimestamp: 2024-01-01T00:00:00Z\nchecksum: {'0' * 64}\n")
    elif version_file == "malformed":
        (setup.bin_dir / ".version").write_text("this is not a version file\n")
    setup.store.publish("nats", "nats-server", BAD, "v2")
    res = setup.agent().reconcile().result("nats")
    assert res is not None and res.action == "rolled_back", res
    assert setup.binary.read_bytes() == GOOD
    assert setup.journal() == []
    info = read_version(setup.bin_dir)
    assert info is not None and info.checksum == _sha(GOOD)
    assert load_state(setup.base).failed["nats"] == _sha(BAD)
    # the next reconcile keeps away from the failed build instead of failing again
    again = setup.agent().reconcile()
    assert again.result("nats").action == "skipped" and again.ok
    assert setup.binary.read_bytes() == GOOD


def test_the_restore_keeps_a_version_file_that_describes_the_old_binary(setup: Setup) -> None:
    setup.store.publish("nats", "nats-server", GOOD, "v1")
    assert setup.agent().reconcile().result("nats").action == "updated"
    setup.store.publish("nats", "nats-server", BAD, "v2")
    assert setup.agent().reconcile().result("nats").action == "rolled_back"
    info = read_version(setup.bin_dir)
    assert info is not None and info.checksum == _sha(GOOD) and info.version == "v1"


def test_the_restore_refuses_a_previous_binary_that_is_not_the_one_replaced(tmp_path: Path) -> None:
    prev = tmp_path / ".previous"
    prev.mkdir(parents=True)
    (prev / "b").write_bytes(GOOD)
    with pytest.raises(DataError, match="not the binary the update replaced"):
        install.stage_previous(tmp_path, "b", expect_sha=_sha(BAD))
    assert not install.staged_path(tmp_path, "b").exists()
    # a rollback the user asked for still needs the previous binary's own .version
    with pytest.raises(install.InstallError, match="no .version"):
        install.stage_previous(tmp_path, "b")
    sha, info = install.stage_previous(tmp_path, "b", expect_sha=_sha(GOOD))
    assert sha == _sha(GOOD) and info.checksum == sha and info.commit == "unknown"


def test_a_state_file_that_cannot_be_written_does_not_skip_the_restore(setup: Setup,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    setup.store.publish("nats", "nats-server", GOOD, "v1")
    assert setup.agent().reconcile().result("nats").action == "updated"
    setup.store.publish("nats", "nats-server", BAD, "v2")

    def broken(self: AgentState, name: str, sha: str | None) -> AgentState:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(AgentState, "with_failed", broken)
    res = setup.agent().reconcile().result("nats")
    assert res is not None and res.action == "rolled_back" and "could not be recorded" in (res.error or "")
    assert setup.binary.read_bytes() == GOOD
    assert setup.journal() == []


# ------------------------------------------------- 2. backends and health checks that answer garbage


class _HTMLHandler(http.server.BaseHTTPRequestHandler):
    """A proxy in front of the process manager: HTTP 200 with an HTML page for everything."""

    def log_message(self, *a: object) -> None:
        pass

    def _reply(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = b"<html><body>502 Bad Gateway</body></html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _reply  # noqa: N815


@pytest.fixture
def html_server() -> Iterator[str]:
    with serve_http(_HTMLHandler) as srv:
        yield srv.url


def test_supervisor_answering_html_is_a_reload_error(html_server: str) -> None:
    r = SupervisorReloader(html_server, timeout=5)
    with pytest.raises(ReloadError):
        r.restart("nats")
    with pytest.raises(ReloadError):
        r.status("nats")


def test_an_update_with_a_garbage_answering_supervisor_rolls_back_and_ends_its_intent(tmp_path: Path,
                                                                                        html_server: str) -> None:
    s = Setup(tmp_path, reload="supervisor", extra=f"  supervisor_url: {html_server}\n")
    s.store.publish("nats", "nats-server", GOOD, "v1")
    assert s.agent(reloader=NoReloader()).reconcile().result("nats").action == "updated"
    s.store.publish("nats", "nats-server", BAD, "v2")
    report = s.agent().reconcile()  # used to raise ExpatError out of reconcile, leaving the intent open
    res = report.result("nats")
    assert res is not None and res.action in ("rolled_back", "failed") and "reload failed" in (res.error or "")
    assert s.binary.read_bytes() == GOOD
    assert s.journal() == []


def test_output_that_is_not_utf8_is_no_exception(tmp_path: Path) -> None:
    res = wait_healthy("printf 'ok \\377\\n'", deadline_s=5)
    assert res.ok
    res = check_once("printf 'caf\\351\\n' >&2; exit 3", timeout=5)
    assert not res.ok and "exit 3" in res.detail
    with pytest.raises(ReloadError, match="exited 4"):
        CommandReloader("printf 'caf\\351\\n'; exit 4", cwd=tmp_path).restart("nats")
    CommandReloader("printf 'restarted \\377\\n'", cwd=tmp_path).restart("nats")


class _Exploding(Reloader):
    """A backend with a bug: restart raises something no one foresaw."""

    name = "exploding"

    def restart(self, process: str) -> None:
        raise KeyError("statename")

    def status(self, process: str) -> ProcessStatus:
        return ProcessStatus(process, None, "unknown")


def test_any_error_from_the_restart_is_an_unhealthy_result(setup: Setup) -> None:
    setup.store.publish("nats", "nats-server", GOOD, "v1")
    assert setup.agent().reconcile().result("nats").action == "updated"
    setup.store.publish("nats", "nats-server", BAD, "v2")
    res = setup.agent(reloader=_Exploding()).reconcile().result("nats")
    assert res is not None and res.action == "failed" and "KeyError" in (res.error or "")
    assert setup.binary.read_bytes() == GOOD  # the restore still put the old binary back
    assert setup.journal() == []


class _FailingOnce(LocalFetcher):
    """Raises an error outside every family the agent knows on the first call."""

    def __init__(self, directory: Path):
        super().__init__(directory)
        self.calls = 0

    def _fetch(self, url_or_name: str, offset: int, *, deadline: float | None) -> Iterator[bytes]:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("a bug")
        return super()._fetch(url_or_name, offset, deadline=deadline)


def _run(agent: Agent, done: Callable[[list[UpdateReport]], bool], events: list[AgentEvent],
         target: Callable[..., None] | None = None, **kw: object) -> tuple[list[UpdateReport], threading.Thread]:
    """Run *target* (default ``agent.run_forever``) in a thread with *events* queued, until *done*."""
    reports: list[UpdateReport] = []
    for e in events:
        agent.submit(e)
    fn = target or agent.run_forever
    t = threading.Thread(target=fn, kwargs={"on_report": reports.append, **kw}, daemon=True)
    t.start()
    try:
        wait_for(lambda: done(reports), timeout=60, what="the expected reconciles")
        alive = t.is_alive()
    finally:
        agent.stop()
        t.join(20)
    assert alive, "the event loop died"
    return reports, t


def _nats(action: str) -> Callable[[list[UpdateReport]], bool]:
    return lambda reports: any(r.result("nats") is not None and r.result("nats").action == action for r in reports)


def test_the_event_loop_survives_an_unexpected_error(setup: Setup) -> None:
    setup.store.publish("nats", "nats-server", GOOD, "v1")
    fetcher = _FailingOnce(setup.store.dir)
    agent = setup.agent(fetcher=fetcher)
    reports: list[UpdateReport] = []
    t = threading.Thread(target=agent.run_forever, kwargs={"on_report": reports.append}, daemon=True)
    t.start()
    try:
        agent.submit(AgentEvent(serial=1))
        wait_for(lambda: fetcher.calls >= 1 and not agent.updating, timeout=30, what="the first reconcile")
        time.sleep(0.1)
        assert t.is_alive()
        agent.submit(AgentEvent(serial=1))
        wait_for(lambda: _nats("updated")(reports), timeout=30, what="the second event's reconcile")
    finally:
        agent.stop()
        t.join(20)
    assert setup.binary.read_bytes() == GOOD


# --------------------------------------------------------- 3. helpers that ignore SIGTERM


def test_a_timed_out_health_check_whose_helper_ignores_sigterm_does_not_hang(tmp_path: Path) -> None:
    """The shell dies on SIGTERM, its helper does not and holds the output pipe: the group is killed."""
    pidfile = tmp_path / "pid"
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(check_once(
        f"sh -c 'trap \"\" TERM; echo $$ > {pidfile}; exec sleep 300'; true", timeout=1.0)), daemon=True)
    t.start()
    t.join(120)  # the fixed check returns in seconds; the helper would hold it for 300
    pid = int(pidfile.read_text()) if pidfile.exists() else None
    try:
        assert not t.is_alive(), "check_once waited for a helper that ignores SIGTERM"
        assert not result[0].ok and "timed out" in result[0].detail  # type: ignore[attr-defined]
    finally:
        if pid is not None:
            assert_process_ends(pid, "the helper outlived the health check")


def test_stop_group_kills_what_outlives_its_leader(tmp_path: Path) -> None:
    import subprocess

    pidfile = tmp_path / "pid"
    proc = subprocess.Popen(f"sh -c 'trap \"\" TERM; echo $$ > {pidfile}; exec sleep 300' & wait",
                            shell=True, start_new_session=True)
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the helper")
    stop_group(proc, grace=0.5)
    assert proc.returncode is not None
    assert_process_ends(int(pidfile.read_text()), "the helper ignoring SIGTERM survived stop_group")


# ------------------------------------------------------------- 4. a batch keeps its highest serial


def test_a_batch_is_reconciled_with_the_highest_serial_it_announced() -> None:
    rel = AgentEvent(serial=5, subsystems=("nats",))
    reconnect = AgentEvent(type="reconnected", source="sse")
    assert coalesce([rel, reconnect]).serial == 5 and coalesce([rel, reconnect]).type == "reconnected"
    assert coalesce([AgentEvent(serial=7), AgentEvent(serial=6)]).serial == 7
    assert coalesce([reconnect]) == reconnect


def test_a_stale_manifest_is_looked_at_again_when_a_reconnect_followed_the_event(setup: Setup) -> None:
    setup.store.publish("nats", "nats-server", GOOD, "v1")  # the (cached) source is still at serial 1
    agent = setup.agent()
    agent.retry_base = 0.05
    published: list[bool] = []

    def publish_late(reports: list[UpdateReport]) -> bool:
        if reports and not published:  # the release lands after the first look
            published.append(True)
            setup.store.publish("nats", "nats-server", GOOD + b"# v2\n", "v2")
        return any(r.serial == 2 for r in reports)

    reports, _ = _run(agent, publish_late, [AgentEvent(serial=2, subsystems=("nats",)),
                                            AgentEvent(type="reconnected", source="sse")])
    assert reports[0].serial == 1 and reports[0].retry
    assert setup.binary.read_bytes() == GOOD + b"# v2\n"


def test_a_signature_that_does_not_verify_yet_is_looked_at_again_while_the_event_is_ahead(setup: Setup) -> None:
    setup.store.publish("nats", "nats-server", GOOD, "v1")
    good_sig = (setup.store.dir / SIGNATURE_NAME).read_bytes()
    (setup.store.dir / SIGNATURE_NAME).write_bytes(b"\0" * 64)  # a cache serving an old .sig
    agent = setup.agent()
    agent.retry_base = 0.05

    def fix_after_first(reports: list[UpdateReport]) -> bool:
        if reports:
            (setup.store.dir / SIGNATURE_NAME).write_bytes(good_sig)
        return _nats("updated")(reports)

    reports, _ = _run(agent, fix_after_first, [AgentEvent(serial=1)])
    assert reports[0].error and reports[0].retry
    assert setup.binary.read_bytes() == GOOD
    # without an event ahead of the applied serial, a bad signature is refused, not retried
    (setup.store.dir / SIGNATURE_NAME).write_bytes(b"\0" * 64)
    assert not setup.agent().reconcile(AgentEvent(serial=1)).retry


# ------------------------------------------------------------------ 5. the start-up reconcile retries


def test_a_start_up_reconcile_that_fails_transiently_is_retried_until_it_works(setup: Setup) -> None:
    setup.store.publish("nats", "nats-server", GOOD, "v1")
    with StoreServer(setup.store.dir) as server:
        server.fail_next[MANIFEST_NAME] = 4  # the network is not up yet at boot; more than the fast retries
        agent = setup.agent(fetcher=HTTPFetcher(server.url))
        agent.retry_base, agent.retry_max, agent.retry_attempts = 0.02, 0.1, 1
        reports, _ = _run(agent, _nats("updated"), [], target=lambda on_report: serve(agent, on_report=on_report))
    assert [bool(r.error and "503" in r.error) for r in reports] == [True] * 4 + [False]
    assert setup.binary.read_bytes() == GOOD


def test_event_retries_go_on_slowly_after_the_fast_ones(setup: Setup) -> None:
    setup.store.publish("nats", "nats-server", GOOD, "v1")
    with StoreServer(setup.store.dir) as server:
        server.fail_next[MANIFEST_NAME] = 5
        agent = setup.agent(fetcher=HTTPFetcher(server.url))
        agent.retry_base, agent.retry_max, agent.retry_attempts = 0.02, 0.1, 2
        reports, _ = _run(agent, _nats("updated"), [AgentEvent(serial=1)])
    assert len(reports) == 6 and reports[-1].ok


# ------------------------------------------------------------------ 6. a source that trickles


class _Trickle(http.server.BaseHTTPRequestHandler):
    """Promises a large body, then sends one byte every 0.1 s, forever (until the client leaves)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *a: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.server.requests += 1  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", "1000000")
        self.end_headers()
        trickle_until_stopped(self, 0.1)


@pytest.fixture
def trickle() -> Iterator[LoopbackHTTPServer]:
    with serve_http(_Trickle) as srv:
        srv.requests = 0  # type: ignore[attr-defined]
        yield srv


def _in_thread(fn: Callable[[], object], limit: float = 120) -> object:
    return in_thread(fn, limit, "the transfer had no total deadline")


def test_a_trickling_manifest_fails_at_its_deadline(setup: Setup, trickle: LoopbackHTTPServer,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_fetch, "SMALL_FILE_DEADLINE", 1.0)
    fetcher = HTTPFetcher(f"http://127.0.0.1:{trickle.server_port}", timeout=(5.0, 10.0))
    report = _in_thread(lambda: setup.agent(fetcher=fetcher).reconcile())
    assert isinstance(report, UpdateReport)
    assert report.error and "too slow" in report.error and report.retry


def test_a_trickling_asset_fails_at_its_deadline_without_resuming(tmp_path: Path,
                                                                   trickle: LoopbackHTTPServer,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    fetcher = HTTPFetcher(f"http://127.0.0.1:{trickle.server_port}", timeout=(5.0, 10.0))
    with open(tmp_path / "part", "w+b") as out:
        err = _in_thread(lambda: download(fetcher, "a.tar.gz", out, size=1000000, sha256="0" * 64,
                                          max_bytes=1 << 30, timeout=1.0))
    assert isinstance(err, DeadlineError) and isinstance(err, DownloadError)
    assert trickle.requests == 1  # type: ignore[attr-defined]
    # the default deadline grows with the size, from a floor
    monkeypatch.setattr(agent_fetch, "ASSET_DEADLINE_MIN", 10.0)
    monkeypatch.setattr(agent_fetch, "ASSET_MIN_RATE", 1000)
    assert agent_fetch.asset_deadline(0) == 10.0 and agent_fetch.asset_deadline(5000) == 15.0


_HOP_WAIT = 0.8  # seconds each answer of the slow redirect chain takes: well within any read timeout


class _CutThenSlowRedirects(http.server.BaseHTTPRequestHandler):
    """``/a.tar.gz``: the first GET sends half the body and drops the connection; the resume (a Range
    request) is redirected ``/hop1`` .. ``/hop5`` (MAX_REDIRECTS hops), each answer taking _HOP_WAIT
    seconds, and ``/hop5`` sends the rest (206). Every path asked for goes to ``server.paths``."""

    data = os.urandom(200_000)

    def log_message(self, *a: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.server.paths.append(self.path)  # type: ignore[attr-defined]
        ranged = self.headers.get("Range")
        try:
            if self.path == "/a.tar.gz" and not ranged:
                self.send_response(200)
                self.send_header("Content-Length", str(len(self.data)))
                self.end_headers()
                self.wfile.write(self.data[: len(self.data) // 2])
                return  # HTTP/1.0: the connection closes short of Content-Length, a cut
            time.sleep(_HOP_WAIT)
            hop = 1 if self.path == "/a.tar.gz" else int(self.path.removeprefix("/hop")) + 1
            if hop <= 5:
                self.send_response(302)
                self.send_header("Location", f"/hop{hop}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = int((ranged or "bytes=0-").removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(self.data) - 1}/{len(self.data)}")
            self.send_header("Content-Length", str(len(self.data) - start))
            self.end_headers()
            self.wfile.write(self.data[start:])
        except OSError:
            pass  # the client left at its deadline


def test_a_resume_through_slow_redirects_keeps_to_the_downloads_deadline(tmp_path: Path) -> None:
    """The download's one deadline reaches the redirects a resume's GET follows (fetch -> _fetch ->
    Client.get): each hop answers within the read timeout, and the chain would deliver the rest after
    6 x _HOP_WAIT = 4.8 s, but the download was given 1.5 s in all, so it ends near 1.5 s, out of time,
    before the chain's end is asked for."""
    data = _CutThenSlowRedirects.data
    with serve_http(_CutThenSlowRedirects) as srv:
        srv.paths = []  # type: ignore[attr-defined]
        fetcher = HTTPFetcher(srv.url, timeout=(5.0, 10.0))
        with open(tmp_path / "part", "w+b") as out:
            started = time.monotonic()
            err = in_thread(lambda: download(fetcher, "a.tar.gz", out, size=len(data), sha256=_sha(data),
                                             max_bytes=len(data), timeout=1.5), 30, "no total deadline")
            took = time.monotonic() - started
        paths = list(srv.paths)  # type: ignore[attr-defined]
    assert isinstance(err, DeadlineError), err
    assert paths[:2] == ["/a.tar.gz", "/a.tar.gz"]  # the cut, then the resume that was redirected
    assert "/hop5" not in paths, paths  # the hops stopped at the deadline
    assert took < 3.0, f"a download with a 1.5 s deadline took {took:.1f}s through slow redirects"


# ------------------------------------------------------------------ 7. the command reload backend


def test_a_reload_command_that_starts_a_daemon_succeeds(tmp_path: Path) -> None:
    """The daemon keeps the command's stdout open: the reload is done when the command exits."""
    pidfile = tmp_path / "pid"
    r = CommandReloader(f"sh -c 'echo $$ > {pidfile}; exec sleep 300' & echo restarted {{process}}",
                        cwd=tmp_path, timeout=30)
    try:
        r.restart("nats")  # used to wait for the daemon and report a timeout
    finally:
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the daemon's pid")
        os.kill(int(pidfile.read_text()), signal.SIGKILL)


def test_a_reload_command_that_times_out_is_stopped_with_what_it_started(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    r = CommandReloader(f"sh -c 'echo $$ > {pidfile}; exec sleep 300'; true", cwd=tmp_path, timeout=1, grace=1)
    with pytest.raises(ReloadError, match="timed out"):
        r.restart("nats")
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), what="the child's pid")
    assert_process_ends(int(pidfile.read_text()), "the reload command's child outlived its timeout")
