"""The agent against faults, end to end: a real supervisord runs the services, a real HTTP server on
loopback serves the signed release. In every case the other subsystems keep their bytes, mtimes and
supervisor pids."""

from __future__ import annotations

import errno
import hashlib
import http.server
import json
import os
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from standardwebhooks.webhooks import Webhook

from sync_tools.agent.events import AgentEvent
from sync_tools.agent.fetch import Fetcher, HTTPFetcher
from sync_tools.agent.runner import Agent, serve
from sync_tools.agent.state import load_state
from sync_tools.manifest import asset_name
from sync_tools.signing import sign
from sync_tools.versionfile import VersionInfo, read_version, write_version
from tests.agent_support import World, close_world, file_member, free_port, make_world, special_member, tar_gz


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = make_world(tmp_path)
    try:
        yield w
    finally:
        close_world(w)


def assert_nothing_changed(world: World, before: tuple[dict, dict[str, int]], name: str = "") -> None:
    files, pids = before
    now_files, now_pids = world.untouched_state(name)
    assert now_files == files
    assert now_pids == pids


def assert_clean(world: World) -> None:
    """No staged file, no download left over, no open intent."""
    for n in world.binaries:
        assert not list((world.root / n / ".bin").glob(".*.staged"))
    assert not list((world.root / ".sync-tools" / "downloads").glob("*"))
    assert not list((world.root / ".sync-tools" / "journal").glob("*.json"))


def test_only_the_changed_subsystem_is_downloaded_swapped_and_restarted(world: World) -> None:
    before = world.untouched_state("nats")
    nats_pid = world.supervisor.pid("nats")
    old_sha = world.sha("nats")
    data = world.publish("nats", "v2")
    report = world.agent().reconcile()
    assert report.ok, report
    assert report.result("nats").action == "updated"
    assert {report.result(n).action for n in ("arc", "web")} == {"unchanged"}
    assert world.bin_path("nats").read_bytes() == data
    assert world.health("nats").startswith("nats-v2")
    assert world.supervisor.pid("nats") != nats_pid
    info = read_version(world.root / "nats" / ".bin")
    assert info.checksum == hashlib.sha256(data).hexdigest() and info.version == "v2"
    prev = world.root / "nats" / ".bin" / ".previous"
    assert hashlib.sha256((prev / "nats-server").read_bytes()).hexdigest() == old_sha
    assert read_version(prev).checksum == old_sha
    assert set(world.server.sent) == {"manifest.json", "manifest.json.sig", "nats-server-linux-amd64.tar.gz"}
    assert_nothing_changed(world, before, "nats")
    assert_clean(world)
    assert load_state(world.root).serial == report.serial


def test_a_cut_download_resumes(world: World) -> None:
    before = world.untouched_state("nats")
    data = world.publish("nats", "v2", size=400_000)
    aname = asset_name("nats-server", "linux/amd64")
    world.server.cut_once[aname] = 150_000
    report = world.agent().reconcile()
    assert report.result("nats").action == "updated", report
    ranges = [r for n, r in world.server.requests if n == aname]
    assert ranges == [None, "bytes=150000-"]
    assert world.bin_path("nats").read_bytes() == data
    assert world.health("nats").startswith("nats-v2")
    assert_nothing_changed(world, before, "nats")


@pytest.mark.parametrize("which", ["asset_sha256", "binary_sha256"])
def test_a_wrong_sha256_is_refused(world: World, which: str) -> None:
    before = world.untouched_state("nats")
    nats_pid, old = world.supervisor.pid("nats"), world.bin_path("nats").read_bytes()
    data = world.binary("nats", "v2")
    archive = tar_gz([file_member("nats-server", data)])
    kw = {"asset_sha256": "0" * 64} if which == "asset_sha256" else {}
    binary_sha = "f" * 64 if which == "binary_sha256" else hashlib.sha256(data).hexdigest()
    world.store.publish_archive("nats", "nats-server", archive, binary_sha, "v2", **kw)
    report = world.agent().reconcile()
    res = report.result("nats")
    assert res.action == "failed" and "does not match" in res.error
    assert not report.ok
    assert world.bin_path("nats").read_bytes() == old
    assert world.supervisor.pid("nats") == nats_pid
    assert_nothing_changed(world, before, "nats")
    assert_clean(world)


def _everything(world: World) -> tuple[dict, dict[str, int]]:
    return world.untouched_state("")


@pytest.mark.parametrize("fault", ["wrong_signature", "other_key", "expired", "lower_serial", "garbage_sig"])
def test_a_bad_manifest_changes_nothing(world: World, fault: str) -> None:
    world.publish("nats", "v2")
    if fault == "lower_serial":
        assert world.agent().reconcile().ok  # serial N applied
        m = world.store.manifest()
        world.publish("nats", "v3")
        # an old manifest (a replay of serial N-1) pointing at v3's asset must be refused
        newest = world.store.manifest()
        from dataclasses import replace

        world.store.write_manifest(replace(newest, serial=m.serial - 1))
    before = _everything(world)
    applied = load_state(world.root).serial
    world.server.reset()
    if fault == "wrong_signature":
        data = (world.store.dir / "manifest.json").read_bytes()
        world.store.write_manifest(world.store.manifest(), signature=sign(data + b" ", world.store.key))
    elif fault == "other_key":
        world.store.write_manifest(world.store.manifest(), key=Ed25519PrivateKey.generate())
    elif fault == "garbage_sig":
        world.store.write_manifest(world.store.manifest(), signature=b"not base64 at all!!")
    elif fault == "expired":
        world.store.expire()
    report = world.agent().reconcile()
    assert report.error and not report.ok and report.results == ()
    expect = {"wrong_signature": "does not verify", "other_key": "does not verify", "expired": "expired",
              "lower_serial": "rollback refused", "garbage_sig": "base64"}[fault]
    assert expect in report.error
    assert _everything(world) == before
    assert load_state(world.root).serial == applied
    assert set(world.server.sent) <= {"manifest.json", "manifest.json.sig"}


def _bad_archive(kind: str, good: bytes) -> bytes:
    if kind == "claimed_10gb":
        import gzip

        info = tarfile.TarInfo("nats-server")
        info.size = 10 * 1024**3
        return gzip.compress(info.tobuf(tarfile.GNU_FORMAT) + good + b"\0" * 512)
    members = {
        "dotdot": [file_member("../x", good)],
        "absolute": [file_member("/tmp/nats-server", good)],
        "symlink": [special_member("nats-server", tarfile.SYMTYPE, linkname="/bin/sh")],
        "device": [special_member("nats-server", tarfile.CHRTYPE, devmajor=1, devminor=5)],
        "two_files": [file_member("nats-server", good), file_member("nats-server.sh", good)],
    }[kind]
    return tar_gz(members)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "device", "two_files", "claimed_10gb"])
def test_an_unsafe_archive_is_refused(world: World, kind: str) -> None:
    before = world.untouched_state("nats")
    nats_pid, old = world.supervisor.pid("nats"), world.bin_path("nats").read_bytes()
    good = world.binary("nats", "v2")
    archive = _bad_archive(kind, good)
    world.store.publish_archive("nats", "nats-server", archive, hashlib.sha256(good).hexdigest(), "v2")
    report = world.agent(max_binary_bytes=64 * 1024 * 1024).reconcile()
    res = report.result("nats")
    assert res.action == "failed", res
    expect = {"dotdot": "leaves the archive root", "absolute": "absolute path", "symlink": "link",
              "device": "device", "two_files": "more than one member", "claimed_10gb": "over the"}[kind]
    assert res.error.startswith("nats-server-linux-amd64.tar.gz: ") and expect in res.error
    assert world.bin_path("nats").read_bytes() == old
    assert world.supervisor.pid("nats") == nats_pid
    assert not (world.root / "x").exists() and not (world.root / "nats" / "x").exists()
    assert_nothing_changed(world, before, "nats")
    assert_clean(world)


def test_disk_full_while_staging_keeps_the_old_binary(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC injected into os.write for files under the install root (extraction writes through it)."""
    before = world.untouched_state("nats")
    nats_pid, old = world.supervisor.pid("nats"), world.bin_path("nats").read_bytes()
    data = world.publish("nats", "v2", size=300_000)
    real_write = os.write
    root = str(world.root)
    hits = []

    def full_disk(fd: int, buf: bytes) -> int:
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if path.startswith(root) and ".bin" in path:
            hits.append(path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, buf)

    monkeypatch.setattr(os, "write", full_disk)
    report = world.agent().reconcile()
    monkeypatch.setattr(os, "write", real_write)
    res = report.result("nats")
    assert hits and res.action == "failed" and "No space left" in res.error
    assert world.bin_path("nats").read_bytes() == old
    assert world.supervisor.pid("nats") == nats_pid
    assert_nothing_changed(world, before, "nats")
    assert_clean(world)
    # the disk has room again: the same release now goes in
    assert world.agent().reconcile().result("nats").action == "updated"
    assert world.bin_path("nats").read_bytes() == data


def test_an_unhealthy_binary_is_rolled_back_and_not_retried(world: World) -> None:
    before = world.untouched_state("nats")
    old = world.bin_path("nats").read_bytes()
    bad = world.publish("nats", "v2", mode="unhealthy")
    agent = world.agent(health_timeout=3.0)
    report = agent.reconcile()
    res = report.result("nats")
    assert res.action == "rolled_back" and "unhealthy" in res.error and "HTTP 500" in res.error
    assert not report.ok
    assert world.bin_path("nats").read_bytes() == old
    assert world.health("nats").startswith("nats-v1")
    assert read_version(world.root / "nats" / ".bin").checksum == hashlib.sha256(old).hexdigest()
    # .previous still holds the good binary, not the failed one
    assert (world.root / "nats" / ".bin" / ".previous" / "nats-server").read_bytes() == old
    assert load_state(world.root).failed["nats"] == hashlib.sha256(bad).hexdigest()
    assert_nothing_changed(world, before, "nats")
    assert_clean(world)
    world.server.reset()
    pid = world.supervisor.pid("nats")
    again = agent.reconcile()
    assert again.result("nats").action == "skipped"
    assert world.supervisor.pid("nats") == pid
    assert "nats-server-linux-amd64.tar.gz" not in world.server.sent
    # a fixed build clears the mark
    world.publish("nats", "v3")
    assert agent.reconcile().result("nats").action == "updated"
    assert "nats" not in load_state(world.root).failed


def test_a_binary_that_crashes_on_start_is_rolled_back(world: World) -> None:
    world.publish("nats", "v2", mode="crash")
    report = world.agent(health_timeout=3.0).reconcile()
    assert report.result("nats").action == "rolled_back"
    assert world.health("nats").startswith("nats-v1")


def test_rollback_command_swaps_previous_back(world: World) -> None:
    v1 = world.bin_path("nats").read_bytes()
    v2 = world.publish("nats", "v2")
    agent = world.agent()
    assert agent.reconcile().ok
    before = world.untouched_state("nats")
    res = agent.rollback("nats")
    assert res.action == "updated" and res.error is None
    assert world.bin_path("nats").read_bytes() == v1
    assert (world.root / "nats" / ".bin" / ".previous" / "nats-server").read_bytes() == v2
    assert world.health("nats").startswith("nats-v1")
    assert_nothing_changed(world, before, "nats")
    st = agent.status()
    assert st["nats"]["running"]["running"] is True and st["nats"]["drift"] is False
    assert st["nats"]["version"] == "v1"


def test_an_unhealthy_rollback_puts_back_the_binary_it_replaced(world: World) -> None:
    """The older build no longer starts healthy (say its config moved on): the rollback fails and
    leaves nats as it was, running the build it replaced, not the unhealthy one."""
    v2 = world.publish("nats", "v2")
    agent = world.agent(health_timeout=3.0)
    assert agent.reconcile().ok
    bad = world.binary("nats", "v1", mode="unhealthy")
    prev = world.root / "nats" / ".bin" / ".previous"
    (prev / "nats-server").write_bytes(bad)
    write_version(prev, VersionInfo(commit="1" * 40, timestamp="2026-11-24T00:00:00Z",
                                    checksum=hashlib.sha256(bad).hexdigest(), version="v1"))
    res = agent.rollback("nats")
    assert res.action == "failed" and "unhealthy after rollback" in res.error
    assert "the binary it replaced is back" in res.error and "too" not in res.error
    assert world.bin_path("nats").read_bytes() == v2 and (prev / "nats-server").read_bytes() == bad
    assert world.health("nats").startswith("nats-v2")
    assert agent.status()["nats"]["drift"] is False
    assert "nats" not in load_state(world.root).failed  # nothing held back: v2 is what runs


class _GatedFetcher(Fetcher):
    """The HTTP fetcher, holding asset downloads until the test opens the gate."""

    def __init__(self, inner: HTTPFetcher):
        self.inner = inner
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def _fetch(self, name: str, offset: int, *, deadline: float | None) -> Iterator[bytes]:
        if name.endswith(".tar.gz"):
            self.waiting.set()
            self.gate.wait(10)
        return self.inner._fetch(name, offset, deadline=deadline)


def test_events_during_an_update_coalesce(world: World) -> None:
    fetcher = _GatedFetcher(HTTPFetcher(world.server.url))
    agent = world.agent(fetcher=fetcher)
    world.publish("nats", "v2")
    t = threading.Thread(target=agent.run_forever, daemon=True)
    t.start()
    try:
        agent.submit(AgentEvent(subsystems=("nats",), serial=1))
        assert fetcher.waiting.wait(5)
        for i in range(10):  # a burst while the update runs
            agent.submit(AgentEvent(subsystems=("nats",), serial=2 + i))
        fetcher.gate.set()
        deadline = time.monotonic() + 10
        while len(agent.reports) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
    finally:
        agent.stop()
        t.join(5)
    assert len(agent.reports) == 2  # the first event, then one for the whole burst
    assert agent.reports[0].result("nats").action == "updated"
    assert agent.reports[1].result("nats").action == "unchanged"


def test_serve_applies_a_signed_push_and_refuses_an_unsigned_one(world: World) -> None:
    secret = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQ="
    port = free_port()
    agent = world.agent()
    ready = threading.Event()
    t = threading.Thread(target=serve, kwargs=dict(agent=agent, listen=f"127.0.0.1:{port}", secret=secret,
                                                   on_ready=lambda info: ready.set()), daemon=True)
    t.start()
    try:
        assert ready.wait(10)
        url = f"http://127.0.0.1:{port}"
        assert requests.get(f"{url}/health", timeout=5).json()["ready"] is True
        data = world.publish("nats", "v2")
        body = json.dumps({"type": "release.updated", "release": "latest", "subsystems": ["nats"],
                           "serial": 99}).encode()
        assert requests.post(f"{url}/webhook", data=body, timeout=5).status_code == 401
        ts = datetime.now(UTC)
        headers = {"webhook-id": "m1", "webhook-timestamp": str(int(ts.timestamp())),
                   "webhook-signature": Webhook(secret).sign("m1", ts, body.decode()),
                   "content-type": "application/json"}
        assert requests.post(f"{url}/webhook", data=body, headers=headers, timeout=5).status_code == 202
        world.wait_version("nats", "v2")
        assert world.bin_path("nats").read_bytes() == data
    finally:
        agent.stop()
        t.join(10)
    assert not t.is_alive()


def test_agent_needs_a_source_and_a_key(world: World, tmp_path: Path) -> None:
    from sync_tools.config import parse_config
    from sync_tools.errors import ConfigError

    cfg = parse_config(tmp_path / "x.yaml", {"subsystems": {"a": {"upstream": "/dev/null"}}})
    with pytest.raises(ConfigError, match="no release source"):
        Agent(cfg).fetcher  # noqa: B018
    with pytest.raises(ConfigError, match="no pinned public key"):
        Agent(cfg).public_key  # noqa: B018


# ------------------------------------------------------------------ failed marks, rollback holds, retries


class _Killed(BaseException):
    """Stands in for SIGKILL inside this process: nothing after the crash point runs."""


def test_a_crash_during_the_automatic_restore_keeps_the_failed_mark(world: World,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from sync_tools.agent import install

    old = world.bin_path("nats").read_bytes()
    bad = world.publish("nats", "v2", mode="crash")
    real = install.crash_point
    swaps: list[str] = []

    def crash_point(step: str) -> None:
        if step == "swapped":
            swaps.append(step)
            if len(swaps) == 2:  # the second swap is the restore of v1 after v2 failed its health check
                raise _Killed(step)
        real(step)

    monkeypatch.setattr(install, "crash_point", crash_point)
    with pytest.raises(_Killed):
        world.agent(health_timeout=3.0).reconcile()
    monkeypatch.setattr(install, "crash_point", real)
    assert [i.kind for i in install.Journal(world.root).pending()] == ["restore"]
    assert load_state(world.root).failed["nats"] == hashlib.sha256(bad).hexdigest()
    world.server.reset()
    report = world.agent(health_timeout=3.0).reconcile()
    # the restore is finished, and the build that failed is not downloaded and tried again
    assert [r.action for r in report.results_for("nats")] == ["recovered", "skipped"]
    assert "nats-server-linux-amd64.tar.gz" not in world.server.sent
    assert world.bin_path("nats").read_bytes() == old
    assert world.health("nats").startswith("nats-v1")
    assert load_state(world.root).failed["nats"] == hashlib.sha256(bad).hexdigest()
    # both outcomes are in the JSON report: the final one, and the recovery before it
    nats = report.to_json()["subsystems"]["nats"]
    assert nats["action"] == "skipped" and [e["action"] for e in nats["earlier"]] == ["recovered"]
    assert_clean(world)


def test_a_rollback_holds_back_the_build_it_left_until_the_release_changes(world: World) -> None:
    v1 = world.bin_path("nats").read_bytes()
    v2 = world.publish("nats", "v2")
    agent = world.agent()
    assert agent.reconcile().result("nats").action == "updated"
    res = agent.rollback("nats")
    assert res.error is None and world.bin_path("nats").read_bytes() == v1
    assert load_state(world.root).failed["nats"] == hashlib.sha256(v2).hexdigest()
    world.server.reset()
    pid = world.supervisor.pid("nats")
    again = world.agent().reconcile()  # the next event, whatever it was for
    assert again.result("nats").action == "skipped" and again.ok
    assert world.bin_path("nats").read_bytes() == v1 and world.supervisor.pid("nats") == pid
    assert "nats-server-linux-amd64.tar.gz" not in world.server.sent
    v3 = world.publish("nats", "v3")  # a new build of nats: installed, the hold ends
    assert world.agent().reconcile().result("nats").action == "updated"
    assert world.bin_path("nats").read_bytes() == v3
    assert "nats" not in load_state(world.root).failed


def _run_until(agent: Agent, event: AgentEvent, done: Callable[[list], bool],
               on_report: Callable | None = None) -> list:
    """Submit *event* and run the agent's event loop until *done(reports)* (or 15 s); return the reports."""
    reports: list = []
    cond = threading.Condition()

    def got(r: object) -> None:
        if on_report is not None:
            on_report(r)
        with cond:
            reports.append(r)
            cond.notify_all()

    t = threading.Thread(target=agent.run_forever, kwargs={"on_report": got}, daemon=True)
    t.start()
    try:
        agent.submit(event)
        with cond:
            cond.wait_for(lambda: done(reports), timeout=15)
    finally:
        agent.stop()
        t.join(10)
    return reports


def _updated(reports: list) -> bool:
    return any(r.result("nats") is not None and r.result("nats").action == "updated" for r in reports)


def test_a_manifest_fetch_that_fails_while_handling_an_event_is_retried(world: World) -> None:
    data = world.publish("nats", "v2")
    agent = world.agent()
    agent.retry_base = 0.01
    world.server.fail_next["manifest.json"] = 2  # HTTP 503 twice
    reports = _run_until(agent, AgentEvent(subsystems=("nats",), serial=world.store.manifest().serial), _updated)
    assert [bool(r.error and "503" in r.error) for r in reports] == [True, True, False], reports
    assert reports[-1].result("nats").action == "updated"
    assert world.bin_path("nats").read_bytes() == data


def test_a_manifest_older_than_the_event_is_looked_at_again(world: World) -> None:
    agent = world.agent()
    agent.retry_base = 0.01
    published: list[bytes] = []

    def publish_after_the_first(_report: object) -> None:
        if not published:  # the event ran ahead of the store (a cache behind): the release lands later
            published.append(world.publish("nats", "v2"))

    ahead = AgentEvent(subsystems=("nats",), serial=world.store.manifest().serial + 1)
    reports = _run_until(agent, ahead, _updated, publish_after_the_first)
    assert reports[0].error is None and reports[0].result("nats").action == "unchanged"
    assert reports[-1].result("nats").action == "updated"
    assert world.bin_path("nats").read_bytes() == published[0]


class _SSEAfterGate(http.server.BaseHTTPRequestHandler):
    """An SSE endpoint that answers only once ``server.gate`` is set, then streams from its tail (no
    replay: the client sent no Last-Event-ID) and stays open until ``server.done``."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *a: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.server.gate.wait(15)  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.wfile.write(b": connected\n\n")
        self.wfile.flush()
        self.server.done.wait(15)  # type: ignore[attr-defined]
        self.close_connection = True


def test_a_first_sse_connect_after_the_start_up_reconcile_began_looks_again(
        world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """No saved event id, the relay is slow to answer: a release published after the start-up
    reconcile read the manifest, but before the stream opened, is still installed."""
    from sync_tools.agent import runner
    from sync_tools.manifest import SIGNATURE_NAME

    monkeypatch.setattr(runner, "SSE_CONNECT_WAIT", 0.1)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SSEAfterGate)
    httpd.daemon_threads = True
    httpd.gate, httpd.done = threading.Event(), threading.Event()  # type: ignore[attr-defined]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    published: list[bytes] = []

    class Fetcher(HTTPFetcher):
        def fetch_bytes(self, name: str, *, max_bytes: int) -> bytes:
            out = super().fetch_bytes(name, max_bytes=max_bytes)
            if name == SIGNATURE_NAME and not published:  # the start-up reconcile has read the release
                published.append(world.publish("nats", "v2"))
                httpd.gate.set()  # type: ignore[attr-defined]
            return out

    agent = world.agent(fetcher=Fetcher(world.server.url))
    t = threading.Thread(target=serve, kwargs=dict(agent=agent, relay=f"http://127.0.0.1:{httpd.server_address[1]}",
                                                   token="tok"), daemon=True)
    t.start()
    try:
        world.wait_version("nats", "v2")
        assert world.bin_path("nats").read_bytes() == published[0]
    finally:
        agent.stop()
        httpd.done.set()  # type: ignore[attr-defined]
        t.join(10)
        httpd.shutdown()
        httpd.server_close()
    assert not t.is_alive()
