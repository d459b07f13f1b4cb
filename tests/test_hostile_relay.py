"""The relay against a hostile world (issue #20): its database removed, replaced or out of room while it
runs, truncated bodies, corrupt databases at boot, payloads that name the upstream in only some of their
fields, small volumes, and more connections than file descriptors. Real parts: the relay under a real
server on loopback (``sync-tools relay``'s and gunicorn's), real SQLite files, real tmpfs mounts."""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from sync_tools.errors import ConfigError
from sync_tools.relay import connections
from sync_tools.relay import outbox as outbox_module
from sync_tools.relay import server as relay_server
from sync_tools.relay.app import create_app, get_relay
from sync_tools.relay.outbox import NewJob, Outbox
from sync_tools.relay.server import RelayServer
from sync_tools.relay.settings import load_settings
from tests.relay_support import (
    RELEASE_REPO,
    TOKEN,
    Delivery,
    delivery,
    env,
    settings,
    tag_payload,
    write_config,
)
from tests.servers.github_api import GitHubAPIServer, github_api  # noqa: F401
from tests.support import free_port, stop_group, wait_for


@contextlib.contextmanager
def _relay(root: Path, github_api: GitHubAPIServer, db: Path | None = None,  # noqa: F811
           max_attempts: int = 4, **overrides: object) -> Iterator[RelayServer]:
    github_api.state.add_repo(RELEASE_REPO)
    cfg = write_config(root, max_attempts=max_attempts)
    st = settings(cfg, root, github_api_url=github_api.url, **overrides)
    if db is not None:
        st = type(st)(**{**st.__dict__, "db_path": db})
    server = RelayServer(create_app(cfg, st), "127.0.0.1", 0).start()
    try:
        yield server
    finally:
        server.stop()


def _post(server: RelayServer, tag: str, delivery_id: str | None = None) -> int:
    d = delivery("create", tag_payload(tag=tag), delivery_id=delivery_id)
    return requests.post(server.url + "/webhook", data=d.body, headers=d.headers, timeout=15).status_code


def _health(server: RelayServer) -> tuple[int, dict]:
    r = requests.get(server.url + "/health", timeout=15)
    return r.status_code, r.json()


def _files(db: Path) -> list[Path]:
    return [db, Path(f"{db}-wal"), Path(f"{db}-shm")]


# ---------------------------------------------------- 1, 3. a 202 means a restart will read the delivery


def test_a_deleted_database_answers_503_and_unhealthy_never_a_lost_202(tmp_path: Path,
                                                                       github_api: GitHubAPIServer) -> None:  # noqa: F811
    """Before: with the database files removed the relay went on committing to the unlinked files,
    answered 202 and /health "ok", and a restart found none of those deliveries."""
    db = tmp_path / "relay.db"
    with _relay(tmp_path, github_api) as server:
        assert _post(server, "v2.10.1") == 202
        assert _health(server)[0] == 200
        for f in _files(db):
            f.unlink()
        # the reader pool empty, as when the worker holds its one connection: the next read opens the
        # path (a delivery's "older than dispatched" check), and that must be a 503, never a 500
        readers = get_relay(server.app).outbox._readers
        while not readers.empty():
            readers.get_nowait()
        acknowledged = []
        for i in range(3):
            delivery_id = f"after-delete-{i}"
            code = _post(server, f"v2.11.{i}", delivery_id)
            assert code == 503, code
            if code == 202:
                acknowledged.append(delivery_id)
        wait_for(lambda: _health(server)[0] == 503, what="/health to say the database is gone")
        assert "gone" in _health(server)[1]["error"]
    with _relay(tmp_path, github_api) as server:  # a restart reads the path: every 202 must be there
        outbox = get_relay(server.app).outbox
        assert [d for d in acknowledged if not outbox.has_delivery(d)] == []
        assert _post(server, "v2.12.0") == 202 and _health(server)[0] == 200


def test_a_replaced_database_answers_503_until_the_original_is_back(tmp_path: Path,
                                                                    github_api: GitHubAPIServer) -> None:  # noqa: F811
    db = tmp_path / "relay.db"
    with _relay(tmp_path, github_api) as server:
        assert _post(server, "v2.10.1") == 202
        os.rename(db, tmp_path / "aside.db")
        shutil.copy2(tmp_path / "aside.db", db)  # a restore from a copy: another inode
        assert _post(server, "v2.10.2") == 503
        wait_for(lambda: _health(server)[0] == 503, what="/health to say the database was replaced")
        assert "replaced" in _health(server)[1]["error"]
        os.replace(tmp_path / "aside.db", db)  # the file the relay holds is back at the path
        wait_for(lambda: _health(server)[0] == 200, what="/health to recover")
        assert _post(server, "v2.10.3") == 202


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs mounted under the test's directory (the tests run as root)."""
    mnt = tmp_path / "vol"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True,
                          text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def _fill(directory: Path) -> Path:
    """Write a file in *directory* until the volume is full; returns it."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    return filler


def test_health_says_error_while_the_disk_is_full_and_ok_once_space_returns(
        tmp_path: Path, small_volume: Path, github_api: GitHubAPIServer) -> None:  # noqa: F811
    with _relay(tmp_path, github_api, db=small_volume / "relay.db") as server:
        assert _post(server, "v2.10.1") == 202
        assert _health(server)[0] == 200
        filler = _fill(small_volume)
        wait_for(lambda: _health(server)[0] == 503, what="/health to see the full disk")
        assert "full" in _health(server)[1]["error"]
        filler.unlink()
        wait_for(lambda: _health(server)[0] == 200, what="/health to see the space back")
        assert _post(server, "v2.10.2") == 202


def test_health_says_error_when_the_database_is_read_only(tmp_path: Path,
                                                          github_api: GitHubAPIServer) -> None:  # noqa: F811
    """A read-only database in a writable directory: reads work (the old /health only read), writes
    fail. As root a file mode does not stop writes, so the file is made immutable (chattr +i)."""
    db = tmp_path / "relay.db"
    with _relay(tmp_path, github_api) as server:
        assert _post(server, "v2.10.1") == 202
    with _immutable(db), _relay(tmp_path, github_api) as server:
        assert _post(server, "v2.10.2") == 503
        wait_for(lambda: _health(server)[0] == 503, what="/health to see the read-only database")
        assert "readonly" in _health(server)[1]["error"]


@contextlib.contextmanager
def _immutable(path: Path) -> Iterator[None]:
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True, timeout=30).returncode != 0:
        pytest.skip("chattr +i is not supported here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True, timeout=30)




# ---------------------------------------------------- 5. a body shorter than its Content-Length

ROOT = Path(__file__).resolve().parents[1]
GUNICORN = Path(sys.executable).with_name("gunicorn")


@contextlib.contextmanager
def _gunicorn(root: Path, github_api: GitHubAPIServer, **extra_env: str) -> Iterator[str]:  # noqa: F811
    """The production server: gunicorn with relay/gunicorn.conf.py on a free loopback port; yields its URL."""
    if not GUNICORN.exists():
        pytest.skip("gunicorn is not installed (pip install 'sync-tools[prod]')")
    github_api.state.add_repo(RELEASE_REPO)
    config = write_config(root)
    port = free_port()
    e = {**os.environ, **env(root), "GITHUB_API_URL": github_api.url, "SYNC_TOOLS_CONFIG": str(config.path),
         "RELAY_BIND": f"127.0.0.1:{port}", **extra_env}
    proc = subprocess.Popen([str(GUNICORN), "-c", str(ROOT / "relay/gunicorn.conf.py"), "--chdir", str(ROOT),
                             "relay.wsgi:app"], env=e, cwd=root, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, "gunicorn exited"
            with contextlib.suppress(requests.RequestException):
                return requests.get(url + "/health", timeout=1).status_code == 200
            return False

        wait_for(up, what="gunicorn to serve /health")
        yield url
    finally:
        stop_group(proc)


@pytest.fixture(params=["sync-tools relay", "gunicorn"])
def any_server(request: pytest.FixtureRequest, tmp_path: Path, github_api: GitHubAPIServer,  # noqa: F811
               monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The relay's URL under each server it ships with, both with a 2 s socket timeout."""
    if request.param == "gunicorn":
        with _gunicorn(tmp_path, github_api, RELAY_SOCKET_TIMEOUT="2") as url:
            yield url
    else:
        monkeypatch.setattr(relay_server._Handler, "timeout", 2)
        with _relay(tmp_path, github_api) as server:
            yield server.url


def _raw(url: str, head: bytes, body: bytes, *, half_close: bool) -> int:
    """Send *head* and *body* on one connection (half-closing after it when asked); the status answered."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(head + body)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        answer = b""
        while b"\r\n" not in answer:
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    return int(answer.split(b" ", 2)[1]) if answer else 0


def _truncated(declared_extra: int) -> tuple[bytes, bytes]:
    """A delivery signed over the bytes actually sent, whose Content-Length claims more."""
    d = delivery("create", tag_payload(tag="v2.10.30"))
    head = (f"POST /webhook HTTP/1.1\r\nHost: relay\r\nContent-Length: {len(d.body) + declared_extra}\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in d.headers.items()) + "\r\n").encode()
    return head, d.body


def test_a_body_shorter_than_its_content_length_is_400_under_every_server(any_server: str) -> None:
    """Before: gunicorn's reader ended quietly at the half-close, so a delivery signed over the bytes
    sent was answered 202 (and one signed over the full body a misleading 401)."""
    head, body = _truncated(100)
    assert _raw(any_server, head, body, half_close=True) == 400
    assert requests.get(any_server + "/health", timeout=10).status_code == 200


def test_a_body_that_stops_arriving_is_408_under_every_server(any_server: str) -> None:
    """Before: ``sync-tools relay`` answered 400 (werkzeug folds the socket timeout into
    ClientDisconnected), though docs/decisions.md promises 408."""
    head, body = _truncated(100)
    assert _raw(any_server, head, body, half_close=False) == 408


# ---------------------------------------------------- 6. boot failures: one clear line, non-zero exit


def _corrupt_database(db: Path) -> None:
    """A real relay database with deliveries, then every page after the first overwritten in part:
    it opens (the schema is on page 1) and fails at the first read of a table."""
    outbox = Outbox(db)
    for i in range(50):
        outbox.record(f"d{i}", "create", "x", [NewJob("dispatch", {"pad": "b" * 500})])
    outbox.close()
    data = bytearray(db.read_bytes())
    for off in range(4096, len(data), 4096):
        data[off:off + 100] = b"\xff" * 100
    db.write_bytes(bytes(data))


@pytest.mark.parametrize("server", ["sync-tools relay", "gunicorn"])
def test_a_corrupt_database_stops_the_boot_with_one_clear_line(tmp_path: Path, server: str) -> None:
    """Before: ``sync-tools relay`` printed a raw traceback from the broker's start, and gunicorn's
    worker_exit hook raised an AttributeError on top of the boot failure."""
    if server == "gunicorn" and not GUNICORN.exists():
        pytest.skip("gunicorn is not installed")
    config = write_config(tmp_path)
    db = tmp_path / "relay.db"
    _corrupt_database(db)
    e = {**os.environ, **env(tmp_path), "SYNC_TOOLS_CONFIG": str(config.path),
         "RELAY_BIND": f"127.0.0.1:{free_port()}"}
    cmd = ([sys.executable, "-m", "sync_tools", "relay", "--config", str(config.path), "--port", "0"]
           if server == "sync-tools relay" else
           [str(GUNICORN), "-c", str(ROOT / "relay/gunicorn.conf.py"), "--chdir", str(ROOT), "relay.wsgi:app"])
    done = subprocess.run(cmd, env=e, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and "AttributeError" not in done.stderr, done.stderr[-3000:]
    lines = [ln for ln in done.stderr.splitlines() if f"{db} is corrupt" in ln]
    assert len(lines) == 1, done.stderr[-3000:]
    assert "move it aside" in lines[0]


# ---------------------------------------------------- 7. every repository field must name the upstream


def _tag_delivery(**repo_fields: str) -> Delivery:
    p = tag_payload(tag="v2.10.40")  # nats-io/nats-server, a tracked upstream
    p["repository"].update(repo_fields)
    return delivery("create", p)


@pytest.mark.parametrize("fields", [
    {"full_name": "mallory/nats-server"},  # another owner, next to the upstream's URLs
    {"html_url": "https://github.com/mallory/nats-server", "svn_url": "https://github.com/mallory/nats-server",
     "git_url": "git://github.com/mallory/nats-server.git", "ssh_url": "git@github.com:mallory/nats-server.git",
     "full_name": "mallory/nats-server"},  # only clone_url names the upstream
    {"full_name": "nats-io/nats-server "},  # a trailing space
    {"full_name": "nats-io/nats-server", "html_url": "https://github.com/nats-io/nats-server\u212a"},  # Kelvin
    {"full_name": "nats-io/nats-server\u212a"},
    {"html_url": "https://evil.example/nats-io/nats-server"},  # another host in one field
])
def test_a_payload_whose_repository_fields_disagree_is_never_dispatched(
        tmp_path: Path, github_api: GitHubAPIServer, fields: dict[str, str]) -> None:  # noqa: F811
    """Before: one field naming the upstream was enough, so each of these was dispatched."""
    with _relay(tmp_path, github_api) as server:
        d = _tag_delivery(**fields)
        r = requests.post(server.url + "/webhook", data=d.body, headers=d.headers, timeout=15)
        assert r.status_code == 200 and r.json()["status"] == "ignored", r.text
        assert get_relay(server.app).outbox.stats().queue_depth == 0
        # the same payload with every field agreeing is dispatched
        good = _tag_delivery()
        assert requests.post(server.url + "/webhook", data=good.body, headers=good.headers,
                             timeout=15).status_code == 202


def test_a_repeated_delivery_id_with_another_body_is_warned_about(tmp_path: Path, github_api: GitHubAPIServer,  # noqa: F811
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    with _relay(tmp_path, github_api) as server:
        first = delivery("create", tag_payload(tag="v2.10.41"), delivery_id="same-id")
        assert requests.post(server.url + "/webhook", data=first.body, headers=first.headers,
                             timeout=15).status_code == 202
        with caplog.at_level(logging.INFO, logger="sync_tools.relay.app"):
            again = requests.post(server.url + "/webhook", data=first.body, headers=first.headers, timeout=15)
            assert again.json()["status"] == "duplicate"
            assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # GitHub's redelivery
            other = delivery("create", tag_payload(tag="v9.9.9"), delivery_id="same-id")
            r = requests.post(server.url + "/webhook", data=other.body, headers=other.headers, timeout=15)
            assert r.status_code == 200 and r.json()["status"] == "duplicate"
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 1 and "same-id repeated with a different body" in warned[0], warned
        jobs = get_relay(server.app).outbox.jobs()
        assert [j.payload.get("version") for j in jobs] == ["v2.10.41"]  # v9.9.9 was not acted on


# ---------------------------------------------------- 4. small volumes: WAL, pruning, a full disk


def test_the_wal_stays_bounded_on_a_2_mib_volume(tmp_path: Path, small_volume: Path,
                                                 github_api: GitHubAPIServer) -> None:  # noqa: F811
    """Before: the WAL grew ~50 KB per delivery and was checkpointed only at ~4 MiB, never truncated:
    a 2 MiB volume was full after ~40 deliveries."""
    db = small_volume / "relay.db"
    with _relay(tmp_path, github_api, db=db) as server:
        codes = [_post(server, f"v3.0.{i}") for i in range(150)]
        assert codes == [202] * 150
        wal = Path(f"{db}-wal").stat().st_size
        assert wal <= outbox_module.WAL_LIMIT + 256 * 1024, wal
        # one pending dispatch per subsystem, replaced by each newer version: the newest went out last
        outbox = get_relay(server.app).outbox
        wait_for(lambda: outbox.stats().queue_depth == 0 and github_api.state.dispatches
                 and github_api.state.dispatches[-1]["client_payload"]["version"] == "v3.0.149",
                 what="the newest version dispatched")
        versions = [tuple(map(int, d["client_payload"]["version"][1:].split("."))) for d in github_api.state.dispatches]
        assert versions == sorted(set(versions))  # never an older version after a newer one


def test_finished_rows_are_pruned_on_the_operators_schedule(tmp_path: Path) -> None:
    clock = [1_000_000.0]
    outbox = Outbox(tmp_path / "relay.db", now=lambda: clock[0], retention=3600.0, prune_every=0.0)
    try:
        outbox.record("old", "create", "x", [NewJob("dispatch", {"n": 1})])
        outbox.record("stuck", "create", "x", [NewJob("dispatch", {"n": 2})])
        outbox.append_event("release", {"serial": 1})
        outbox.append_event("release", {"serial": 2})
        done = outbox.claim()
        assert done is not None
        outbox.complete(done.id)
        clock[0] += 7200.0
        outbox.record("new", "create", "x", [NewJob("dispatch", {"n": 3})])
        outbox.maintain_if_due()  # prune_every 0: now
        left = {j.payload["n"]: j.status for j in outbox.jobs()}
        assert left == {2: "pending", 3: "pending"}  # the done one went; unfinished ones never do
        assert not outbox.has_delivery("old") and outbox.has_delivery("stuck") and outbox.has_delivery("new")
        assert [e.data["serial"] for e in outbox.events_since(0)] == [2]  # the newest event stays
        assert Path(f"{tmp_path / 'relay.db'}-wal").stat().st_size == 0  # checkpointed and truncated
    finally:
        outbox.close()


def test_the_schedule_comes_from_the_environment(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    st = load_settings(cfg, env(tmp_path, SYNC_TOOLS_RETENTION_DAYS="0.5", SYNC_TOOLS_PRUNE_EVERY="60"))
    assert (st.retention, st.prune_every) == (43200.0, 60.0)
    with pytest.raises(ConfigError, match="SYNC_TOOLS_PRUNE_EVERY"):
        load_settings(cfg, env(tmp_path, SYNC_TOOLS_PRUNE_EVERY="soon"))


def test_a_full_disk_is_logged_once_per_interval_and_every_accepted_job_finishes_once_space_returns(
        tmp_path: Path, small_volume: Path, github_api: GitHubAPIServer,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    """Before: the workers logged ~80 tracebacks a second (a due job that could not be claimed was
    retried every 50 ms), and accepted jobs stayed queued after the space came back."""
    db = small_volume / "relay.db"
    github_api.inject("POST", "/dispatches$", status=502, times=1000)  # the jobs stay queued for now
    with _relay(tmp_path, github_api, db=db, max_attempts=1000, backoff_base=0.2, backoff_cap=0.5) as server:
        accepted = sum(_post(server, f"v4.0.{i}") == 202 for i in range(10))
        assert accepted == 10
        filler = _fill(small_volume)
        before = len(caplog.records)
        with caplog.at_level(logging.WARNING, logger="sync_tools.relay"):
            refused = [_post(server, f"v4.1.{i}") for i in range(5)]
            assert set(refused) == {503}
            github_api.clear_faults()
            deadline = time.monotonic() + 3.0  # three seconds of a full disk with due jobs
            while time.monotonic() < deadline:
                time.sleep(0.1)
        noisy = [r for r in caplog.records[before:] if r.name.startswith("sync_tools.relay")
                 and "retrying in" not in r.getMessage()]  # GitHub's 502s, one line per attempt
        assert len(noisy) <= 6, [r.getMessage() for r in noisy][:20]
        assert not [r for r in noisy if r.exc_info]  # no tracebacks
        filler.unlink()
        outbox = get_relay(server.app).outbox
        wait_for(lambda: {j.status for j in outbox.jobs()} == {"done"}, timeout=60,
                 what="every accepted job done once space returned")
        # older tags of one subsystem are coalesced into the newest: at most the one that was running
        # (or in its backoff) and one pending, replaced by each newer version; the newest went out
        assert 1 <= len(outbox.jobs()) <= 2
        assert github_api.state.dispatches[-1]["client_payload"]["version"] == "v4.0.9"


# ---------------------------------------------------- 2. connections at a 1024 open-files limit


def _limit_1024() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


class _Attack:
    """*idle* connections that send nothing and *tricklers* that send a request's headers a byte a
    second, all to 127.0.0.1:*port*; a cut connection is opened again (the pressure stays)."""

    def __init__(self, port: int, idle: int, tricklers: int):
        self.port = port
        self.idle = [self._open() for _ in range(idle)]
        self.tricklers = [self._open(b"POST /webhook HTTP/1.1\r\nHost: relay\r\n") for _ in range(tricklers)]
        self.reopened = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _open(self, first: bytes = b"") -> socket.socket | None:
        try:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            s.setblocking(False)
            if first:
                s.send(first)
            return s
        except OSError:
            return None

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            for group, first in ((self.tricklers, b"X"), (self.idle, None)):
                for i, s in enumerate(group):
                    try:
                        if s is None:
                            raise OSError
                        if first:
                            s.send(first)
                        elif s.recv(1, socket.MSG_PEEK) == b"":
                            raise OSError  # the server closed it
                    except BlockingIOError:
                        pass
                    except OSError:
                        if s is not None:
                            s.close()
                        group[i] = self._open(b"POST /webhook HTTP/1.1\r\n" if first else b"")
                        self.reopened += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for s in self.idle + self.tricklers:
            if s is not None:
                s.close()


@pytest.mark.parametrize("server", [
    "sync-tools relay", "sync-tools relay --production",
    # measured 2026-12-06: the 20 deliveries timed out connecting. granian keeps a connection that never
    # sends a byte (its header timeout starts at the first byte) and has no bound of its own, so at a hard
    # limit of 1,024 the idle ones fill it; not run (it takes minutes to fail). docs/decisions.md, #20
    pytest.param("sync-tools relay --production --ingest", marks=pytest.mark.xfail(
        run=False, reason="granian holds idle connections that never send a byte: the ingest server has no "
                          "bound but the open-files limit (raised at start, up to the hard limit)")),
])
def test_deliveries_get_202_through_1100_tricklers_and_1000_idle_connections_at_a_1024_limit(
        tmp_path: Path, github_api: GitHubAPIServer, server: str) -> None:  # noqa: F811
    """Before: connections were bounded only by the open-files limit and slow requests never cut: with
    1,024 descriptors, 2,100 hostile connections left no room to accept a delivery (under gunicorn, its
    gevent pool stopped accepting once the tricklers held every slot). The ingest server (granian) is
    held to the same."""
    flags = server.split()[2:]
    if "--production" in flags and not GUNICORN.exists():
        pytest.skip("gunicorn is not installed (pip install 'sync-tools[prod]')")
    if "--ingest" in flags and not GUNICORN.with_name("granian").exists():
        pytest.skip("granian is not installed (pip install 'sync-tools[prod]')")
    github_api.state.add_repo(RELEASE_REPO)
    config = write_config(tmp_path)
    port = free_port()
    e = {**os.environ, **env(tmp_path), "GITHUB_API_URL": github_api.url}
    proc = subprocess.Popen([sys.executable, "-m", "sync_tools", "relay", "--config", str(config.path), "--host",
                             "127.0.0.1", "--port", str(port), *flags],
                            env=e, cwd=tmp_path, preexec_fn=_limit_1024,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    attack = None
    try:
        def up() -> bool:
            assert proc.poll() is None, "the relay exited"
            with contextlib.suppress(requests.RequestException):
                return requests.get(url + "/health", timeout=1).status_code == 200
            return False

        wait_for(up, what="the relay to serve /health")
        attack = _Attack(port, idle=1000, tricklers=1100)
        latencies = []
        for i in range(20):
            d = delivery("create", tag_payload(tag=f"v5.0.{i}"))
            started = time.monotonic()
            r = requests.post(url + "/webhook", data=d.body, headers=d.headers, timeout=10)
            latencies.append(time.monotonic() - started)
            assert r.status_code == 202, r.text
            assert requests.get(url + "/health", timeout=10).status_code == 200
            time.sleep(0.5)  # over ten seconds of attack, the attacker reconnecting what is cut
        print(f"{server}: deliveries under attack: max {max(latencies):.3f} s, median {sorted(latencies)[10]:.3f} s, "
              f"attacker reconnects {attack.reopened}")
        wait_for(lambda: attack.reopened > 0, what="the relay to cut hostile connections to make room")
    finally:
        if attack is not None:
            attack.close()
        err = stop_group(proc, 30)
    assert b"Traceback" not in err, err.decode()[-3000:]


def _nofile(limit: int) -> Callable[[], None]:
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


@pytest.mark.skipif(not GUNICORN.exists(), reason="gunicorn is not installed")
@pytest.mark.parametrize("server", ["sync-tools relay", "gunicorn"])
def test_an_open_files_limit_too_small_for_the_relay_stops_it_with_one_line(tmp_path: Path, server: str) -> None:
    config = write_config(tmp_path)
    e = {**os.environ, **env(tmp_path), "SYNC_TOOLS_CONFIG": str(config.path),
         "RELAY_BIND": f"127.0.0.1:{free_port()}"}
    cmd = ([sys.executable, "-m", "sync_tools", "relay", "--config", str(config.path), "--port", "0"]
           if server == "sync-tools relay" else
           [str(GUNICORN), "-c", str(ROOT / "relay/gunicorn.conf.py"), "--chdir", str(ROOT), "relay.wsgi:app"])
    done = subprocess.run(cmd, env=e, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          preexec_fn=_nofile(200))
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "open-files limit (200, hard 200)" in done.stderr and "ulimit -n" in done.stderr, done.stderr


@pytest.mark.skipif(not GUNICORN.exists(), reason="gunicorn is not installed")
def test_gunicorn_fits_its_connections_to_a_1024_limit(tmp_path: Path, github_api: GitHubAPIServer) -> None:  # noqa: F811
    """Before: gevent took up to 20,000 connections with 1,024 descriptors, and accept() failed with
    EMFILE once they were used; now it takes what the limit allows and the rest wait in the backlog."""
    github_api.state.add_repo(RELEASE_REPO)
    config = write_config(tmp_path)
    port = free_port()
    e = {**os.environ, **env(tmp_path), "GITHUB_API_URL": github_api.url, "SYNC_TOOLS_CONFIG": str(config.path),
         "RELAY_BIND": f"127.0.0.1:{port}"}
    proc = subprocess.Popen([str(GUNICORN), "-c", str(ROOT / "relay/gunicorn.conf.py"), "--chdir", str(ROOT),
                             "relay.wsgi:app"], env=e, cwd=tmp_path, preexec_fn=_nofile(1024),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        def up() -> bool:
            assert proc.poll() is None, "gunicorn exited"
            with contextlib.suppress(requests.RequestException):
                return requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
            return False

        wait_for(up, what="gunicorn to serve /health")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert b"allows 896 connections, not 20000" in err, err.decode()[-3000:]


@contextlib.contextmanager
def _server_with(server: str, root: Path, github_api: GitHubAPIServer,  # noqa: F811
                 max_connections: int) -> Iterator[str]:
    """``sync-tools relay``'s server or gunicorn's, taking *max_connections* connections; yields its URL."""
    if server == "gunicorn":
        # a stream's end is seen at its next heartbeat's write: 2 s, not the default's 25
        with _gunicorn(root, github_api, RELAY_CONNECTIONS=str(max_connections), SYNC_TOOLS_SSE_HEARTBEAT="2") as url:
            yield url
        return
    github_api.state.add_repo(RELEASE_REPO)
    cfg = write_config(root)
    app = create_app(cfg, settings(cfg, root, github_api_url=github_api.url))
    relay = RelayServer(app, "127.0.0.1", 0, max_connections=max_connections).start()
    try:
        yield relay.url
    finally:
        relay.stop()


@pytest.mark.parametrize("server", ["sync-tools relay", "gunicorn"])
def test_sse_streams_leave_room_for_health_and_deliveries(tmp_path: Path, github_api: GitHubAPIServer,  # noqa: F811
                                                          server: str) -> None:
    """Streams may take all connections but RESERVE (64): the next stream is 503 while /health and a
    delivery still get through, and an ended stream frees its slot. (Before, under gunicorn: streams
    could take every slot of gevent's pool, which then stopped accepting.)"""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    streams: list[requests.Response] = []
    with _server_with(server, tmp_path, github_api, 140) as url:
        try:
            for _ in range(140 - connections.RESERVE):
                r = requests.get(url + "/events", headers=auth, stream=True, timeout=10)
                assert r.status_code == 200
                streams.append(r)
            extra = requests.get(url + "/events", headers=auth, timeout=10)
            assert extra.status_code == 503 and "too many event streams" in extra.text
            assert requests.get(url + "/health", timeout=15).status_code == 200
            d = delivery("create", tag_payload(tag="v6.0.0"))
            assert requests.post(url + "/webhook", data=d.body, headers=d.headers, timeout=15).status_code == 202
            streams.pop().close()
            # the server sees the close at its next heartbeat's write (gunicorn's relay here: within 2 s)
            wait_for(lambda: requests.get(url + "/events", headers=auth, stream=True, timeout=10).status_code == 200,
                     timeout=60, what="a freed stream slot")
        finally:
            for r in streams:
                r.close()


def _closed(s: socket.socket) -> bool:
    """Whether the server has closed *s*, reading what it sent meanwhile (an answer must not be a success)."""
    s.setblocking(False)
    while True:
        try:
            data = s.recv(4096)
        except BlockingIOError:
            return False
        except ConnectionError:
            return True
        if not data:
            return True
        assert not data.startswith(b"HTTP/1.1 2"), data


@pytest.mark.skipif(not GUNICORN.exists(), reason="gunicorn is not installed")
def test_gunicorn_cuts_trickled_headers_and_bodies_at_the_deadline_but_not_event_streams(
        tmp_path: Path, github_api: GitHubAPIServer) -> None:  # noqa: F811
    """Before: each trickled byte restarted gunicorn's read timeout, so a body sent a few bytes a second
    was never cut (and headers only after keepalive, 75 s). With a 2 s deadline both are cut long before
    their 200 bytes are in, while an SSE stream opened before them outlives it."""
    with _gunicorn(tmp_path, github_api, RELAY_REQUEST_DEADLINE="2") as url:
        port = int(url.rsplit(":", 1)[1])
        stream = socket.create_connection(("127.0.0.1", port), timeout=10)
        stream.sendall(f"GET /events HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = stream.recv(4096)
            assert chunk, head
            head += chunk
        assert head.startswith(b"HTTP/1.1 200"), head
        d = delivery("create", tag_payload(tag="v6.1.0"))
        headers = socket.create_connection(("127.0.0.1", port), timeout=10)
        headers.sendall(b"POST /webhook HTTP/1.1\r\nHost: relay\r\nX-Pad: ")
        body = socket.create_connection(("127.0.0.1", port), timeout=10)
        body.sendall((f"POST /webhook HTTP/1.1\r\nHost: relay\r\nContent-Length: {len(d.body)}\r\n"
                      + "".join(f"{k}: {v}\r\n" for k, v in d.headers.items()) + "\r\n").encode())
        assert len(d.body) > 200
        sent = {"headers": 0, "body": 0}
        try:
            while sent["headers"] < 200 or sent["body"] < 200:
                for name, s, byte in (("headers", headers, b"a"), ("body", body, d.body[sent["body"]:][:1])):
                    if sent[name] < 200 and not _closed(s):
                        with contextlib.suppress(OSError):  # cut between the check and the send
                            s.send(byte)
                        sent[name] += 1
                    elif sent[name] < 200:
                        sent[name] = 1000 + sent[name]  # cut after sent[name] bytes
                time.sleep(0.25)
            assert sent["headers"] >= 1000 and sent["body"] >= 1000, f"not cut: {sent}"
            assert not _closed(stream), "the event stream was cut"
            assert requests.post(url + "/webhook", data=d.body, headers=d.headers, timeout=15).status_code == 202
        finally:
            for s in (stream, headers, body):
                s.close()


def test_the_request_deadline_comes_from_the_environment() -> None:
    assert connections.deadline_from({}) == connections.DEADLINE
    assert connections.deadline_from({"RELAY_REQUEST_DEADLINE": "2.5"}) == 2.5
    for bad in ("abc", "0", "-3", "nan", "1e9"):
        with pytest.raises(ConfigError, match="RELAY_REQUEST_DEADLINE"):
            connections.deadline_from({"RELAY_REQUEST_DEADLINE": bad})


@pytest.mark.skipif(not GUNICORN.exists(), reason="gunicorn is not installed")
def test_gunicorn_refuses_a_bad_request_deadline_with_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    e = {**os.environ, **env(tmp_path), "SYNC_TOOLS_CONFIG": str(config.path),
         "RELAY_BIND": f"127.0.0.1:{free_port()}", "RELAY_REQUEST_DEADLINE": "soon"}
    done = subprocess.run([str(GUNICORN), "-c", str(ROOT / "relay/gunicorn.conf.py"), "--chdir", str(ROOT),
                           "relay.wsgi:app"], env=e, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "RELAY_REQUEST_DEADLINE='soon'" in done.stderr, done.stderr
