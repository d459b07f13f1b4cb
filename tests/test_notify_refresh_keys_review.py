"""Review of hostile input on ``POST /notify`` and ``sync-tools notify``, ``release --refresh`` and
``keys generate``: real servers (the relay under its WSGI server, the GitHub API double), real files."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from sync_tools.manifest import empty_manifest, sign_manifest, with_entry
from sync_tools.relay.app import create_app, get_relay
from sync_tools.relay.server import RelayServer
from sync_tools.relay.webhook import sign
from sync_tools.signing import load_private_key
from sync_tools.stores.github import GitHubStore
from tests.relay_support import RELEASE_REPO, SECRET, settings, write_config
from tests.servers.github_api import GitHubAPIServer
from tests.servers.github_api import github_api_fixture as github_api  # noqa: F401 -- fixture

TAG = "latest"


def _wait(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def _notify(url: str, body: bytes = b'{"release": "latest"}', **headers: str) -> requests.Response:
    return requests.post(url + "/notify", data=body, timeout=10,
                         headers={"Content-Type": "application/json",
                                  "X-Hub-Signature-256": sign(SECRET.encode(), body), **headers})


@pytest.fixture
def github_relay(tmp_path: Path, github_api: GitHubAPIServer) -> Iterator[RelayServer]:  # noqa: F811
    """A relay whose store is a release on the GitHub API double, holding one signed manifest."""
    github_api.state.add_repo(RELEASE_REPO)
    config = write_config(tmp_path, dispatch="github")

    def store() -> GitHubStore:
        return GitHubStore(RELEASE_REPO, TAG, base_url=github_api.url, timeout=5)

    first = store()
    first.ensure_release()
    from sync_tools.manifest import Asset, Entry

    entry = Entry(version="v2.10.25", commit="a" * 40, built="2026-11-24T00:00:00Z",
                  assets={"linux/amd64": Asset(name="nats-linux-amd64.tar.gz", size=10, sha256="b" * 64,
                                               binary_sha256="c" * 64)})
    data, sig = sign_manifest(with_entry(empty_manifest(), "nats", entry),
                              load_private_key(str(tmp_path / "keys" / "release.key")))
    first.write_manifest(data, sig, first.read_manifest().token)
    # a retry waits long: what the queue holds while the store cannot be read stays visible
    app = create_app(config, settings(config, tmp_path, backoff_base=60.0, github_api_url=github_api.url),
                     store_factory=store)
    server = RelayServer(app, "127.0.0.1", 0).start()
    try:
        yield server
    finally:
        server.stop()


def test_a_replayed_notify_queues_one_look_at_the_store_not_one_each(github_relay: RelayServer,
                                                                    github_api: GitHubAPIServer) -> None:  # noqa: F811
    """The signed body carries no id or time: whoever saw it once can send it again, each time with a
    fresh X-Sync-Tools-Delivery or none (what `sync-tools notify` sends). Each copy was a fan-out job of
    its own, each reading the store (GitHub API requests, against the relay's rate limit) and retried
    up to max_attempts while the store failed. A look not yet taken covers every notify after it."""
    relay = get_relay(github_relay.app)
    github_api.set_rate_limit(remaining=0)  # the store cannot be read: the first look waits in its backoff
    assert _notify(github_relay.url).status_code == 202
    _wait(lambda: any(j.attempts == 1 for j in relay.outbox.jobs("pending")))
    reads = len(github_api.requests)

    answers = [_notify(github_relay.url) for _ in range(40)]
    assert {a.status_code for a in answers} == {202}
    assert {a.json()["status"] for a in answers} == {"accepted"}
    time.sleep(0.3)  # a worker woken by a new job would have read the store by now
    fanouts = [j for j in relay.outbox.jobs(limit=1000) if j.kind == "fanout"]
    assert len(fanouts) == 1, [(j.id, j.status) for j in fanouts]
    assert len(github_api.requests) == reads


def test_a_notify_while_a_look_runs_queues_the_next_one(github_relay: RelayServer,
                                                        github_api: GitHubAPIServer) -> None:  # noqa: F811
    """The look that is running may have read the store before the release now notified: a notify then
    is never joined to it, and one more look follows."""
    relay = get_relay(github_relay.app)
    github_api.inject("GET", r"/releases/tags/latest$", status=None, delay=1.5)
    first = _notify(github_relay.url)
    assert first.status_code == 202 and first.json()["jobs"]
    _wait(lambda: bool(relay.outbox.jobs("running")))
    second = _notify(github_relay.url)
    assert second.status_code == 202
    assert second.json()["jobs"] and second.json()["coalesced"] == 0
    _wait(lambda: relay.outbox.stats().done == 2)


# ------------------------------------------------------------------------------ sync-tools notify


class _Relay:
    """A loopback stand-in for whatever answers at the relay's URL: a redirect, a page, a trickle."""

    def __init__(self, answer):  # type: ignore[no-untyped-def]
        from werkzeug.serving import make_server

        self.answer = answer
        self.server = make_server("127.0.0.1", 0, self._app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        import threading

        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def _app(self, environ, start_response):  # type: ignore[no-untyped-def]
        environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        status, headers, body = self.answer
        start_response(status, headers)
        return body

    def __enter__(self) -> _Relay:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _trickle(seconds: float):  # type: ignore[no-untyped-def]
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.2)
        yield b" "
    yield b'{"status": "accepted"}'


def test_notify_gives_up_on_a_relay_that_trickles_its_answer() -> None:
    """Each read came within the read timeout, so a proxy or relay that sent a byte now and then held
    `sync-tools notify` (a release script, a CI step) for as long as it kept going."""
    from sync_tools.errors import RemoteError
    from sync_tools.notify import notify_relay

    with _Relay(("202 Accepted", [("Content-Type", "application/json")], _trickle(8.0))) as relay:
        start = time.monotonic()
        with pytest.raises(RemoteError, match="no complete answer within"):
            notify_relay(relay.url, b"s", TAG, timeout=(1.0, 1.0))
        assert time.monotonic() - start < 5.0


def test_notify_reports_an_answer_cut_short_as_a_relay_error() -> None:
    """An answer shorter than its Content-Length (a proxy or relay restarting) escaped as urllib3's
    ProtocolError: no RemoteError, so no one-line error from the CLI."""
    import socket
    import threading

    from sync_tools.errors import RemoteError
    from sync_tools.notify import notify_relay

    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with pytest.raises(RemoteError, match="cannot reach the relay"):
            notify_relay(f"http://127.0.0.1:{listener.getsockname()[1]}", b"s", TAG, timeout=(2.0, 2.0))
    finally:
        thread.join(5)
        listener.close()


@pytest.mark.parametrize(("answer", "says"), [
    (("301 Moved Permanently", [("Location", "https://relay.example.org/notify"), ("Content-Type", "text/html")],
      [b"<a>moved</a>"]), "redirects to https://relay.example.org/notify"),
    (("200 OK", [("Content-Type", "text/html")], [b"<html><body>Sign in</body></html>"]),
     "answered 200 with text/html, not the relay's JSON"),
], ids=["redirect", "html"])
def test_notify_says_what_answered_instead_of_the_relay(tmp_path: Path, answer, says) -> None:  # type: ignore[no-untyped-def]
    """A redirect (http to https at a proxy) was "answered 301: Moved Permanently", without where to;
    a sign-in page was "answered 200: OK", an error that reads as a success."""
    from click.testing import CliRunner

    from sync_tools.cli import cli

    config = write_config(tmp_path)
    with _Relay(answer) as relay:
        result = CliRunner().invoke(cli, ["notify", "--relay", relay.url, "--config", str(config.path)],
                                    env={"SYNC_TOOLS_NOTIFY_SECRET": "s"})
    assert result.exit_code == 1
    assert says in result.output, result.output


# -------------------------------------------------------------------------------- keys generate


def test_keys_generate_makes_no_directory_others_can_write_under_a_permissive_umask(tmp_path: Path) -> None:
    """Under umask 000 the key directory came out 0777: anyone on the machine could put their own
    release.pub (and release.key) in place of the new pair before it was pinned and stored as the
    CI secret."""
    import os
    import stat

    from click.testing import CliRunner

    from sync_tools.cli import cli

    old = os.umask(0)
    try:
        result = CliRunner().invoke(cli, ["keys", "generate", "--out", str(tmp_path / "a" / "keys")])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    for d in (tmp_path / "a", tmp_path / "a" / "keys"):
        assert stat.S_IMODE(d.stat().st_mode) & 0o022 == 0, oct(d.stat().st_mode)
    assert stat.S_IMODE((tmp_path / "a" / "keys" / "release.key").stat().st_mode) == 0o600


def test_keys_generate_refuses_a_directory_anyone_can_write(tmp_path: Path) -> None:
    import os

    from click.testing import CliRunner

    from sync_tools.cli import cli

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    result = CliRunner().invoke(cli, ["keys", "generate", "--out", str(shared)])
    assert result.exit_code == 1
    assert "anyone can write" in result.output
    assert list(shared.iterdir()) == []
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)  # /tmp's mode: nobody may replace another's file
    assert CliRunner().invoke(cli, ["keys", "generate", "--out", str(sticky)]).exit_code == 0


# ----------------------------------------------------------------------------------- release --refresh


def _entry(version: str):  # type: ignore[no-untyped-def]
    from sync_tools.manifest import Asset, Entry

    return Entry(version=version, commit="d" * 40, built="2026-11-24T00:00:00Z",
                 assets={"linux/amd64": Asset(name=f"x-{version}.tar.gz", size=10, sha256="e" * 64,
                                              binary_sha256="f" * 64)})


def test_a_refresh_racing_a_release_keeps_the_release_entry(tmp_path: Path, github_api: GitHubAPIServer) -> None:  # noqa: F811
    """refresh.yml and upstream.yml's release job share no concurrency group: a release that lands
    between the refresh's read and its write must survive it (the write is a compare-and-swap; the
    refresh reads again and renews what the release wrote)."""
    from sync_tools.manifest import parse_manifest, verify_manifest
    from sync_tools.release import refresh
    from sync_tools.signing import load_public_key

    github_api.state.add_repo(RELEASE_REPO)
    config = write_config(tmp_path)
    key = load_private_key(str(tmp_path / "keys" / "release.key"))

    def store() -> GitHubStore:
        return GitHubStore(RELEASE_REPO, TAG, base_url=github_api.url, timeout=5)

    s = store()
    s.ensure_release()
    data, sig = sign_manifest(with_entry(empty_manifest(), "nats", _entry("v2.10.25")), key)
    s.write_manifest(data, sig, None)
    landed: list[int] = []

    class _ReleaseLandsAfterTheRead(GitHubStore):
        def read_manifest(self):  # type: ignore[no-untyped-def]
            snap = super().read_manifest()
            if not landed:  # the release job writes arc's entry now, over what the refresh just read
                other = store()
                now = other.read_manifest()
                base = parse_manifest(now.data)
                m = with_entry(base, "arc", _entry("v0.3.0"))  # serial + 1
                d, g = sign_manifest(m, key)
                other.write_manifest(d, g, now.token)
                landed.append(m.serial)
            return snap

    racing = _ReleaseLandsAfterTheRead(RELEASE_REPO, TAG, base_url=github_api.url, timeout=5)
    new = refresh(config, store=racing, signing_key=str(tmp_path / "keys" / "release.key"), sleep=lambda s: None)
    final = store().read_manifest()
    m = verify_manifest(final.data, final.signature, load_public_key(str(tmp_path / "keys" / "release.pub")))
    assert landed and set(m.subsystems) == {"nats", "arc"}
    assert m.serial == new.serial == landed[0] + 1


def test_keys_generate_leaves_no_private_key_alone_when_the_public_one_cannot_be_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing the public key fails with a full disk: the private key written a moment before stayed,
    alone, and the next run refused to overwrite it ("already exists"), with no public half to pin."""
    import errno

    from sync_tools import signing

    real = signing.atomic_write_bytes

    def full_disk(path: Path, *a: object, **kw: object) -> None:
        if str(path).endswith(".pub"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, *a, **kw)

    monkeypatch.setattr(signing, "atomic_write_bytes", full_disk)
    with pytest.raises(OSError, match="No space left"):
        signing.write_keypair(tmp_path / "keys")
    assert list((tmp_path / "keys").iterdir()) == []
    monkeypatch.setattr(signing, "atomic_write_bytes", real)
    priv, pub = signing.write_keypair(tmp_path / "keys")  # the disk has room again: a whole pair
    assert priv.exists() and pub.exists()


def test_notify_signs_with_the_secret_as_the_relay_uses_it(tmp_path: Path, github_api: GitHubAPIServer) -> None:  # noqa: F811
    """The relay (and the workflow's notify step) use SYNC_TOOLS_NOTIFY_SECRET as it is; the CLI
    stripped it, so a secret with a space or a newline at an end got 401 from the CLI only."""
    from click.testing import CliRunner

    from sync_tools.cli import cli
    from tests.relay_support import serve_relay

    github_api.state.add_repo(RELEASE_REPO)
    config = write_config(tmp_path, dispatch="github")
    padded = " notify-secret\n"
    with serve_relay(config, tmp_path, notify_secret=padded.encode(), github_api_url=github_api.url) as relay:
        result = CliRunner().invoke(cli, ["notify", "--relay", relay.url, "--config", str(config.path)],
                                    env={"SYNC_TOOLS_NOTIFY_SECRET": padded})
    assert result.exit_code == 0, result.output
    assert result.output.startswith("relay accepted"), result.output  # not "401" anywhere: the delivery id may hold it
