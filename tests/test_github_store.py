"""GitHubStore against the GitHub API test server: the replace dance, failures, CAS, timeouts, auth."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from sync_tools.errors import DataError, RemoteError
from sync_tools.signing import generate_keypair, load_public_key, sign, verify
from sync_tools.stores.base import ManifestConflict
from sync_tools.stores.github import GitHubStore
from tests.github_support import ASSET, REPO, TAG, asset_file, github_store
from tests.servers.github_api import (
    GitHubAPIServer,
    github_api_fixture,  # noqa: F401 -- registers fixture `github_api`
)


def _names(server: GitHubAPIServer) -> list[str]:
    return sorted(server.state.assets(REPO, TAG))


@pytest.fixture
def repo(github_api: GitHubAPIServer) -> GitHubAPIServer:
    github_api.state.add_repo(REPO)
    return github_api


# ------------------------------------------------------------------------------- release + assets


def test_ensure_release_creates_once(repo: GitHubAPIServer) -> None:
    store = github_store(repo)
    store.ensure_release()
    store.ensure_release()
    github_store(repo).ensure_release()
    assert [r["tag_name"] for r in repo.state.releases(REPO)] == [TAG]
    assert len(repo.requests_to("POST", r"/releases$")) == 1


def test_ensure_release_tolerates_a_parallel_creator(repo: GitHubAPIServer) -> None:
    # Another job creates the release between our lookup (404) and our create (which then gets 422).
    def other_job(entry: dict) -> None:
        if entry["path"].endswith(f"/releases/tags/{TAG}") and entry["status"] == 404 and not repo.state.releases(REPO):
            repo.state.add_release(REPO, TAG)

    repo.hooks.append(other_job)
    github_store(repo).ensure_release()
    assert [r["tag_name"] for r in repo.state.releases(REPO)] == [TAG]
    assert [e["status"] for e in repo.requests_to("POST", r"/releases$")] == [422]


def test_upload_then_replace_and_list(repo: GitHubAPIServer, tmp_path: Path) -> None:
    store = github_store(repo)
    store.upload_asset(asset_file(tmp_path, b"v1"), ASSET)
    store.upload_asset(asset_file(tmp_path, b"version two"), ASSET)
    assert repo.state.assets(REPO, TAG) == {ASSET: b"version two"}
    assert store.list_assets() == {ASSET: 11}
    url = store.asset_url(ASSET)
    assert url == f"{repo.url}/{REPO}/releases/download/{TAG}/{ASSET}"
    assert store.asset_url("not-yet.tar.gz") == f"{repo.url}/{REPO}/releases/download/{TAG}/not-yet.tar.gz"
    [asset] = repo.state.asset_records(REPO, TAG)
    assert asset["content_type"] == "application/gzip"


def test_replace_never_has_a_moment_without_a_copy(repo: GitHubAPIServer, tmp_path: Path) -> None:
    store = github_store(repo)
    store.upload_asset(asset_file(tmp_path, b"old bytes"), ASSET)
    seen: list[tuple[str, str, list[str]]] = []

    def observe(entry: dict) -> None:
        assets = repo.state.assets(REPO, TAG)
        copies = {n: d for n, d in assets.items() if n == ASSET or n.startswith(ASSET + ".tmp-")}
        seen.append((entry["method"], entry["path"], sorted(copies)))
        # After every request the server answered: the old or the new bytes exist as an asset.
        assert set(copies.values()) & {b"old bytes", b"new bytes"}, (entry, copies)

    repo.hooks.append(observe)
    store.upload_asset(asset_file(tmp_path, b"new bytes"), ASSET)
    repo.hooks.clear()
    assert repo.state.assets(REPO, TAG) == {ASSET: b"new bytes"}
    methods = [m for m, _, _ in seen]
    assert "POST" in methods and "DELETE" in methods and "PATCH" in methods
    # The moment between the delete and the rename held the new copy under its temporary name.
    after_delete = next(names for m, _, names in seen if m == "DELETE")
    assert len(after_delete) == 1 and after_delete[0].startswith(ASSET + ".tmp-")
    assert repo.internal_errors == []


@pytest.mark.parametrize("fault", [{"status": 500}, {"status": 502, "times": 5}, {"reset": True}])
def test_failed_upload_keeps_the_old_asset(repo: GitHubAPIServer, tmp_path: Path, fault: dict) -> None:
    store = github_store(repo)
    store.upload_asset(asset_file(tmp_path, b"old"), ASSET)
    repo.inject("POST", r"^/uploads/.*/assets$", **fault)
    with pytest.raises(RemoteError) as err:
        store.upload_asset(asset_file(tmp_path, b"new" * 50_000), ASSET)
    if "status" in fault:
        assert err.value.status_code == fault["status"]
    assert repo.state.assets(REPO, TAG) == {ASSET: b"old"}
    repo.clear_faults()
    store.upload_asset(asset_file(tmp_path, b"new"), ASSET)
    assert repo.state.assets(REPO, TAG) == {ASSET: b"new"}


def test_failed_rename_is_retried(repo: GitHubAPIServer, tmp_path: Path) -> None:
    store = github_store(repo)
    store.upload_asset(asset_file(tmp_path, b"old"), ASSET)
    repo.inject("PATCH", r"/releases/assets/\d+$", status=503)
    store.upload_asset(asset_file(tmp_path, b"new"), ASSET)
    assert repo.state.assets(REPO, TAG) == {ASSET: b"new"}
    assert [e["status"] for e in repo.requests_to("PATCH", r"/releases/assets/")][1:] == [503, 200]


def test_refused_delete_keeps_the_old_asset_and_drops_the_new_one(repo: GitHubAPIServer, tmp_path: Path) -> None:
    store = github_store(repo)
    store.upload_asset(asset_file(tmp_path, b"old"), ASSET)
    repo.inject("DELETE", r"/releases/assets/\d+$", status=403, body={"message": "Resource not accessible by integration"})
    with pytest.raises(RemoteError, match="Resource not accessible") as err:
        store.upload_asset(asset_file(tmp_path, b"new"), ASSET)
    assert err.value.status_code == 403
    assert repo.state.assets(REPO, TAG) == {ASSET: b"old"}


def test_leftovers_of_crashed_runs_are_cleaned(repo: GitHubAPIServer, tmp_path: Path) -> None:
    state = repo.state
    state.add_release(REPO, TAG)
    state.add_asset(REPO, TAG, ASSET, b"current")
    state.add_asset(REPO, TAG, ASSET + ".tmp-00000000000000aa", b"half-replaced")
    # A run that died between deleting arc's old asset and renaming the new one: the temporary is
    # the only copy and goes into place rather than away.
    state.add_asset(REPO, TAG, "arc-linux-amd64.tar.gz.tmp-00000000000000bb", b"arc only copy")
    store = github_store(repo, stale_after=0)
    store.upload_asset(asset_file(tmp_path, b"next"), "other.tar.gz")
    assert state.assets(REPO, TAG) == {
        ASSET: b"current",
        "arc-linux-amd64.tar.gz": b"arc only copy",
        "other.tar.gz": b"next",
    }
    # Fresh temporaries (a parallel job's upload in flight) are left alone.
    state.add_asset(REPO, TAG, ASSET + ".tmp-00000000000000cc", b"in flight")
    github_store(repo).upload_asset(asset_file(tmp_path, b"x"), "third.tar.gz")
    assert ASSET + ".tmp-00000000000000cc" in state.assets(REPO, TAG)
    assert "third.tar.gz" in github_store(repo).list_assets()
    assert not any(".tmp-" in n for n in github_store(repo).list_assets())


def test_reserved_names_are_refused(repo: GitHubAPIServer, tmp_path: Path) -> None:
    store = github_store(repo)
    for name in ("manifest.json", "manifest.json.sig", "x.tar.gz.tmp-0123456789abcdef"):
        with pytest.raises(DataError):
            store.upload_asset(asset_file(tmp_path, b"x"), name)
    with pytest.raises(DataError, match="no such file"):
        store.upload_asset(tmp_path / "missing.tar.gz", ASSET)
    assert repo.requests == []  # refused before any request


# ------------------------------------------------------------------------------------- manifest


def test_manifest_round_trip_and_stale_token(repo: GitHubAPIServer) -> None:
    store = github_store(repo)
    assert store.read_manifest().token is None
    store.ensure_release()
    assert store.read_manifest().data is None
    store.write_manifest(b'{"serial": 1}', b"sig-1", None)
    first = store.read_manifest()
    assert (first.data, first.signature) == (b'{"serial": 1}', b"sig-1") and first.token
    store.write_manifest(b'{"serial": 2}', b"sig-2", first.token)
    second = store.read_manifest()
    assert (second.data, second.signature) == (b'{"serial": 2}', b"sig-2") and second.token != first.token

    with pytest.raises(ManifestConflict):
        store.write_manifest(b'{"serial": 3}', b"sig-3", first.token)  # stale
    with pytest.raises(ManifestConflict):
        store.write_manifest(b'{"serial": 3}', b"sig-3", None)  # "there was none": there is one
    assert repo.state.assets(REPO, TAG) == {"manifest.json": b'{"serial": 2}', "manifest.json.sig": b"sig-2"}
    assert store.list_assets() == {"manifest.json": 13, "manifest.json.sig": 5}


def test_writer_losing_the_race_mid_write_changes_nothing(repo: GitHubAPIServer) -> None:
    """B passed its token check, then A committed while B was uploading: B's delete of the manifest it
    read finds it gone (the lock), B removes its temporaries and raises ManifestConflict."""
    a, b = github_store(repo), github_store(repo)
    a.write_manifest(b"m0", b"s0", None)
    token = a.read_manifest().token
    fired = threading.Event()

    def a_commits_while_b_uploads(entry: dict) -> None:
        if entry["path"].startswith("/uploads/") and entry["query"].get("name", "").startswith("manifest.json.tmp-"):
            if not fired.is_set():
                fired.set()
                a.write_manifest(b"m-a", b"s-a", token)

    repo.hooks.append(a_commits_while_b_uploads)
    with pytest.raises(ManifestConflict):
        b.write_manifest(b"m-b", b"s-b", token)
    repo.hooks.clear()
    assert repo.state.assets(REPO, TAG) == {"manifest.json": b"m-a", "manifest.json.sig": b"s-a"}


def test_concurrent_writers_of_different_subsystems_both_land(repo: GitHubAPIServer) -> None:
    keys = generate_keypair()
    private = load_pem_private_key(keys.private_pem, None)
    public = load_public_key(keys.public_pem)
    github_store(repo).ensure_release()
    start = threading.Barrier(2)
    conflicts: list[str] = []
    failures: list[BaseException] = []

    def release(subsystem: str) -> None:
        store = github_store(repo)
        try:
            start.wait(timeout=5)
            for version in range(3):
                for _attempt in range(30):
                    snap = store.read_manifest()
                    doc = json.loads(snap.data) if snap.data else {"subsystems": {}}
                    if snap.data is not None:
                        verify(snap.data, snap.signature or b"", public)  # pairs read are never torn
                    doc["subsystems"][subsystem] = version
                    data = json.dumps(doc, sort_keys=True).encode()
                    try:
                        store.write_manifest(data, sign(data, private), snap.token)  # type: ignore[arg-type]
                        break
                    except ManifestConflict as e:
                        conflicts.append(str(e))
                        time.sleep(0.01)
                else:
                    raise AssertionError(f"{subsystem} never landed")
        except BaseException as e:  # reported to the main thread
            failures.append(e)

    threads = [threading.Thread(target=release, args=(name,)) for name in ("nats", "arc")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert failures == []
    final = repo.state.assets(REPO, TAG)
    assert json.loads(final["manifest.json"]) == {"subsystems": {"nats": 2, "arc": 2}}
    verify(final["manifest.json"], final["manifest.json.sig"], public)
    assert set(final) == {"manifest.json", "manifest.json.sig"}  # no temporaries left behind


def test_reader_waits_for_a_pair_in_flight_then_rolls_a_crashed_one_forward(repo: GitHubAPIServer) -> None:
    state = repo.state
    state.add_release(REPO, TAG)
    # A writer committed its manifest and died before putting its signature in place.
    state.add_asset(REPO, TAG, "manifest.json.sig", b"old-sig", label="manifest.json.sig (00000000000000a0)")
    state.add_asset(REPO, TAG, "manifest.json", b"new", label="manifest.json (00000000000000b1)")
    state.add_asset(REPO, TAG, "manifest.json.sig.tmp-00000000000000b1", b"new-sig", label="manifest.json.sig (00000000000000b1)")

    t0 = time.monotonic()
    with pytest.raises(RemoteError, match="being replaced"):
        github_store(repo, settle=0.3).read_manifest()  # not stale yet: it may still be in flight
    assert time.monotonic() - t0 < 3

    snap = github_store(repo, stale_after=0).read_manifest()
    assert (snap.data, snap.signature) == (b"new", b"new-sig")
    assert sorted(state.assets(REPO, TAG)) == ["manifest.json", "manifest.json.sig"]


def test_unpaired_manifests_are_returned_for_the_signature_check_to_judge(repo: GitHubAPIServer) -> None:
    state = repo.state
    state.add_release(REPO, TAG)
    # Uploaded by hand or by another tool: no pair labels, no signature. Read as is (verification refuses it).
    state.add_asset(REPO, TAG, "manifest.json", b"by hand")
    assert github_store(repo, settle=0.2).read_manifest().signature is None
    # Torn long ago with nothing left to finish it: returned as is rather than waited on forever.
    with state.lock:
        next(a for a in state._assets.values() if a["name"] == "manifest.json")["label"] = "manifest.json (00000000000000d3)"
    state.add_asset(REPO, TAG, "manifest.json.sig", b"other", label="manifest.json.sig (00000000000000e4)")
    with pytest.raises(RemoteError):
        github_store(repo, settle=0.2).read_manifest()
    snap = github_store(repo, settle=0.2, stale_after=0).read_manifest()
    assert (snap.data, snap.signature) == (b"by hand", b"other")


def test_crash_between_delete_and_rename_is_rolled_forward(repo: GitHubAPIServer) -> None:
    state = repo.state
    state.add_release(REPO, TAG)
    state.add_asset(REPO, TAG, "manifest.json.sig.tmp-00000000000000c2", b"sig-c", label="manifest.json.sig (00000000000000c2)")
    state.add_asset(REPO, TAG, "manifest.json.tmp-00000000000000c2", b"data-c", label="manifest.json (00000000000000c2)")
    # While the temporaries are fresh nobody mistakes "no manifest.json" for "no manifest yet".
    with pytest.raises(RemoteError):
        github_store(repo, settle=0.2).read_manifest()
    with pytest.raises(RemoteError):
        github_store(repo, settle=0.2).write_manifest(b"from scratch", b"sig", None)
    snap = github_store(repo, stale_after=0).read_manifest()
    assert (snap.data, snap.signature) == (b"data-c", b"sig-c")


def test_write_failure_after_upload_keeps_the_old_pair(repo: GitHubAPIServer) -> None:
    store = github_store(repo)
    store.write_manifest(b"m1", b"s1", None)
    token = store.read_manifest().token
    repo.inject("POST", r"^/uploads/", status=500)  # the signature temporary fails to upload
    with pytest.raises(RemoteError):
        store.write_manifest(b"m2", b"s2", token)
    assert repo.state.assets(REPO, TAG) == {"manifest.json": b"m1", "manifest.json.sig": b"s1"}
    store.write_manifest(b"m2", b"s2", token)
    assert repo.state.assets(REPO, TAG) == {"manifest.json": b"m2", "manifest.json.sig": b"s2"}


def test_oversize_manifest_is_refused(repo: GitHubAPIServer) -> None:
    with pytest.raises(DataError):
        github_store(repo).write_manifest(b"x" * (4 * 1024 * 1024 + 1), b"sig", None)


# --------------------------------------------------------------------------- timeouts, auth, env


def test_timeout_is_a_remote_error(repo: GitHubAPIServer) -> None:
    repo.inject("GET", r"/releases/tags/", status=None, delay=8.0, times=5)
    t0 = time.monotonic()
    with pytest.raises(RemoteError):
        github_store(repo, timeout=1).read_manifest()
    elapsed = time.monotonic() - t0
    assert 1.9 < elapsed < 6, elapsed  # a 1 s read timeout retried once; never the server's 8 s


def test_server_errors_carry_the_status(repo: GitHubAPIServer) -> None:
    repo.inject("GET", r"/releases/tags/", status=503, times=10)
    with pytest.raises(RemoteError) as err:
        github_store(repo).list_assets()
    assert err.value.status_code == 503
    assert len(repo.requests_to("GET", r"/releases/tags/")) == 4  # first try + 3 retries


def test_token_is_sent_and_required(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with GitHubAPIServer(token="ghs_test") as server:
        server.state.add_repo(REPO)
        with pytest.raises(RemoteError) as err:
            github_store(server).ensure_release()
        assert err.value.status_code == 401
        assert "ghs_test" not in str(err.value)
        github_store(server, token="ghs_test").upload_asset(asset_file(tmp_path, b"x"), ASSET)
        # $GITHUB_TOKEN and $GITHUB_API_URL are the defaults, as in GitHub Actions.
        monkeypatch.setenv("GITHUB_TOKEN", "ghs_test")
        monkeypatch.setenv("GITHUB_API_URL", server.url)
        assert GitHubStore(REPO, TAG).list_assets() == {ASSET: 1}
        api = [r for r in server.requests if not r["path"].startswith("/_storage/")]
        assert [r["authenticated"] for r in api[:1]] == [False]
        assert all(r["authenticated"] for r in api[1:])
        assert server.schema_errors == [] and server.internal_errors == []


def test_bad_repo_name_is_refused() -> None:
    with pytest.raises(DataError):
        GitHubStore("not-a-repo", TAG, base_url="http://127.0.0.1:9")
