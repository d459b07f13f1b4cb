"""The GitHub release store against GitHub's real shapes and limits (found by a review; each test
failed before its fix): uploads and downloads on hosts other than the API's, secondary rate limits on
uploads and renames, a Retry-After over the cap, a writer killed between delete and rename, one-line
errors. Against the loopback GitHub API double, split over api./uploads./objects. hosts.
"""

from __future__ import annotations

import datetime as _dt
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sync_tools.errors import RemoteError
from sync_tools.stores.github import GitHubStore
from tests.github_support import ASSET, REPO, TAG, asset_file, github_store
from tests.servers.github_api import (
    GitHubAPIServer,
    GitHubState,
    github_api_fixture,  # noqa: F401 -- registers fixture `github_api`
)

SECONDARY = {
    "message": "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.",
    "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api#about-secondary-rate-limits",
}


@pytest.fixture
def repo(github_api: GitHubAPIServer) -> GitHubAPIServer:  # noqa: F811 -- the fixture
    github_api.state.add_repo(REPO)
    return github_api


def _in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        t0 = time.monotonic()
        try:
            out["value"] = fn(*args, **kwargs)
        except BaseException as e:  # reported to the test
            out["error"] = e
        out["elapsed"] = time.monotonic() - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


# ------------------------------------------------------------------ secondary rate limits on writes


def test_secondary_rate_limit_on_the_rename_never_leaves_the_asset_missing(repo: GitHubAPIServer, tmp_path: Path) -> None:
    """GitHub's secondary rate limits are aimed at content-creating requests (POST/PATCH/DELETE) and
    answer 403 + Retry-After. The replace dance deletes the old asset and then renames the new one with a
    PATCH, which neither GithubRetry (PATCH not in allowed_methods) nor _rename_retrying (only 5xx)
    retries: the old asset is gone, the new one stays under its temporary name, and the manifest names an
    asset that is not there (agents 404) until a later run finds the temporary stale (15 min)."""
    store = github_store(repo)
    store.upload_asset(asset_file(tmp_path, b"old"), ASSET)
    repo.inject("PATCH", r"/releases/assets/\d+$", status=403, headers={"Retry-After": "1"}, body=SECONDARY)
    error: BaseException | None = None
    try:
        store.upload_asset(asset_file(tmp_path, b"new"), ASSET)
    except RemoteError as e:
        error = e
    names = repo.state.assets(REPO, TAG)
    assert ASSET in names, f"{ASSET} is missing after a secondary rate limit on its rename: {sorted(names)} ({error})"
    assert error is None and names[ASSET] == b"new"


def test_secondary_rate_limit_on_the_manifest_rename_keeps_a_manifest(repo: GitHubAPIServer) -> None:
    """The same for write_manifest: the commit point deletes the old manifest.json, then the rename of
    the new one is refused by a secondary rate limit and not retried. No manifest.json is left at all:
    every agent 404s and every release for the next 15 minutes gives up ("being replaced")."""
    store = github_store(repo)
    store.write_manifest(b"m1", b"s1", None)
    token = store.read_manifest().token
    repo.inject("PATCH", r"/releases/assets/\d+$", status=403, headers={"Retry-After": "1"}, body=SECONDARY)
    error: BaseException | None = None
    try:
        store.write_manifest(b"m2", b"s2", token)
    except RemoteError as e:
        error = e
    names = repo.state.assets(REPO, TAG)
    assert "manifest.json" in names, f"no manifest.json after a secondary rate limit: {sorted(names)} ({error})"
    assert error is None
    snap = github_store(repo, settle=0.5).read_manifest()
    assert (snap.data, snap.signature) == (b"m2", b"s2")


def test_secondary_rate_limit_on_an_upload_is_waited_out(repo: GitHubAPIServer, tmp_path: Path) -> None:
    """A 403 + Retry-After on the upload POST (nothing was stored) fails the whole release instead of
    waiting the second GitHub asks for: POST is left out of the retry's allowed_methods."""
    store = github_store(repo)
    store.ensure_release()
    repo.inject("POST", r"^/uploads/", status=403, headers={"Retry-After": "1"}, body=SECONDARY)
    store.upload_asset(asset_file(tmp_path, b"bytes"), ASSET)
    assert repo.state.assets(REPO, TAG) == {ASSET: b"bytes"}


# ------------------------------------------------------------------ interrupted manifest writes


def _age(server: GitHubAPIServer, minutes: float) -> None:
    """Make every asset of the release look created (and last updated) *minutes* ago."""
    when = (_dt.datetime.now(_dt.UTC) - _dt.timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")
    with server.state.lock:
        for a in server.state._assets.values():
            a["created_at"] = a["updated_at"] = when


def test_a_write_killed_between_delete_and_rename_is_repaired_once_stale(repo: GitHubAPIServer) -> None:
    """A writer killed after deleting the old manifest.json (its commit point) and before renaming its
    own leaves manifest.json.tmp-N and manifest.json.sig.tmp-N, both complete. Once they are older than
    stale_after (15 min) the next reader renames the manifest temporary into place -- which gives it a
    fresh updated_at -- and then refuses to install the signature temporary of the same nonce until the
    *renamed manifest* is 15 minutes old: every release (and every agent) is refused for a second 15
    minutes, although both halves of the pair were long stale. (test_github_store's version of this uses
    stale_after=0, which hides it.)"""
    state = repo.state
    state.add_release(REPO, TAG)
    state.add_asset(REPO, TAG, "manifest.json.sig", b"sig-old", label="manifest.json.sig (00000000000000b0)")
    state.add_asset(REPO, TAG, "manifest.json.sig.tmp-00000000000000c2", b"sig-c", label="manifest.json.sig (00000000000000c2)")
    state.add_asset(REPO, TAG, "manifest.json.tmp-00000000000000c2", b"data-c", label="manifest.json (00000000000000c2)")
    _age(repo, 20)
    snap = github_store(repo, settle=1.0).read_manifest()  # stale_after: the default 15 min
    assert (snap.data, snap.signature) == (b"data-c", b"sig-c")


# ---------------------------------------------------------------------- Retry-After beyond the cap


def test_a_long_retry_after_is_not_slept_through(repo: GitHubAPIServer) -> None:
    """The store documents that rate-limit answers are waited out up to 2 minutes (max_rate_limit_wait=120),
    but that cap only applies to 403s without Retry-After. A 403 with Retry-After goes to urllib3, whose
    retry_after_max is 6 hours: a GET sleeps whatever GitHub names (here 150 s; 3600 would hang the job
    until its timeout kills it, with no error line), three times over."""
    github_store(repo).ensure_release()
    repo.inject("GET", r"/releases/tags/", status=403, headers={"Retry-After": "150"}, body=SECONDARY)
    t, out = _in_thread(github_store(repo, timeout=2).list_assets)
    t.join(timeout=20)
    assert not t.is_alive(), "list_assets is still sleeping on a 150 s Retry-After, past the documented 2 min cap"


# ------------------------------------------- github.com's other hosts: uploads and asset storage

class _SplitHostState(GitHubState):
    """Releases whose upload_url names the uploads host, as api.github.com's name uploads.github.com."""

    def render_release(self, rel: dict) -> dict:
        out = super().render_release(rel)
        out["upload_url"] = out["upload_url"].replace(self._server.url, self._server.uploads_url, 1)
        return out


class _SplitHostServer(GitHubAPIServer):
    """The double reached as github.com is: the API as api.github.com, uploads through
    uploads.github.com and downloads redirected to an object storage host (all three on this loopback
    server's port; the names resolve to 127.0.0.1 through the test's resolver)."""

    def __init__(self) -> None:
        super().__init__()
        self.state = _SplitHostState(self)

    def start(self) -> _SplitHostServer:
        super().start()
        port = self._server.server_port
        self.url = f"http://api.github.com:{port}"
        self.uploads_url = f"http://uploads.github.com:{port}"
        self.storage_url = f"http://objects.github.com:{port}"
        return self

    def _storage_url(self, a: dict) -> str:
        return f"{self.storage_url}/_storage/{a['id']}/{a['name']}"


@pytest.fixture
def split(monkeypatch: pytest.MonkeyPatch) -> Iterator[_SplitHostServer]:
    real = socket.getaddrinfo

    def resolve(host, *args, **kwargs):  # *.github.com -> this loopback server
        if isinstance(host, str) and (host == "github.com" or host.endswith(".github.com")):
            host = "127.0.0.1"
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    server = _SplitHostServer().start()
    server.state.add_repo(REPO)
    try:
        yield server
    finally:
        server.stop()
    assert server.schema_errors == [] and server.internal_errors == []


def test_split_hosts_work_at_all(split: _SplitHostServer, tmp_path: Path) -> None:
    """Control: with the hosts split as on github.com the store uploads, reads and downloads fine."""
    store = github_store(split)
    store.upload_asset(asset_file(tmp_path, b"bytes"), ASSET)
    store.write_manifest(b"m1", b"s1", None)
    assert store.read_manifest().data == b"m1"
    assert any(r["path"].startswith("/uploads/") and r["headers"].get("Host", "").startswith("uploads.github.com")
               for r in split.requests)
    assert any(r["path"].startswith("/_storage/") and r["headers"].get("Host", "").startswith("objects.github.com")
               for r in split.requests)


def test_an_upload_to_the_uploads_host_times_out(split: _SplitHostServer, tmp_path: Path) -> None:
    """Every request is to time out after ``timeout`` seconds, but PyGithub sends a request to another
    host than base_url's (uploads.github.com for every upload) through a connection it makes without
    any timeout. An uploads host that stops answering holds the release job until the job's own
    timeout kills it (30 min), with no error line. (The same request to the API host times out.)"""
    store = github_store(split, timeout=1)
    store.ensure_release()
    split.inject("POST", r"^/uploads/", status=None, delay=8.0)
    t, out = _in_thread(store.upload_asset, asset_file(tmp_path, b"bytes"), ASSET)
    t.join(timeout=15)
    assert not t.is_alive()
    assert out["elapsed"] < 5, f"the upload took {out['elapsed']:.1f}s with a 1 s timeout ({out.get('error')!r})"
    assert isinstance(out.get("error"), RemoteError)


def test_a_manifest_download_from_the_storage_host_times_out(split: _SplitHostServer) -> None:
    """Reading manifest.json (every release does, first) downloads through the asset API, which answers
    302 to the storage host (objects.githubusercontent.com on github.com); PyGithub follows it on a
    connection without a timeout, so a stalled storage host hangs read_manifest."""
    store = github_store(split, timeout=1)
    store.write_manifest(b"m1", b"s1", None)
    # A stalled host stalls every attempt: the store retries an idempotent GET once on a read timeout
    # (as documented), so a single stalled answer is recovered in ~1 s and would prove nothing here.
    split.inject("GET", r"^/_storage/", status=None, delay=8.0, times=2)
    t, out = _in_thread(github_store(split, timeout=1).read_manifest)
    t.join(timeout=15)
    assert not t.is_alive()
    assert out["elapsed"] < 5, f"read_manifest took {out['elapsed']:.1f}s with a 1 s timeout ({out.get('error')!r})"
    assert isinstance(out.get("error"), RemoteError)


# ----------------------------------------------------------------------------- one clear line


def test_a_connection_failure_is_one_clear_line() -> None:
    """The project's own rule (sync_tools/errtext.py, the CLI's LazyGroup): an error is one line a person
    can act on, "never a connection pool's repr or an exception class chain". The store formats
    requests' exceptions with str(e): the CLI prints "...: list assets: HTTPConnectionPool(host=...,
    port=...): Max retries exceeded with url: ... (Caused by NewConnectionError(...))"."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connection refused
    with pytest.raises(RemoteError) as err:
        GitHubStore(REPO, TAG, base_url=f"http://127.0.0.1:{port}", timeout=1).list_assets()
    text = str(err.value)
    assert "\n" not in text
    assert "HTTPConnectionPool" not in text and "Caused by" not in text, text
    assert "connection refused" in text


def test_an_html_error_page_is_not_reported_as_none(repo: GitHubAPIServer) -> None:
    """GitHub answers a 502/504 with an HTML page, not JSON. PyGithub then carries {"data": "<html>..."},
    whose "message" is None, and the error line reads "GitHub answered 502: None"."""
    page = "<!DOCTYPE html>\n<html><head><title>Unicorn! &middot; GitHub</title></head>\n<body>No server is currently available to service your request.</body></html>\n"
    repo.inject("GET", r"/releases/tags/", status=502, times=10, body=page)
    with pytest.raises(RemoteError) as err:
        github_store(repo).list_assets()
    assert err.value.status_code == 502
    assert not str(err.value).endswith(": None"), str(err.value)
