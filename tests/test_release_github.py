"""``release`` to a GitHub release, against the loopback GitHub API test server: only the released
subsystem's asset and entry change, an asset is replaced with a copy present at every moment, an
upload cut halfway keeps the old asset and manifest, and racing releases of two subsystems both land."""

from __future__ import annotations

import dataclasses
import shutil
import threading
import time

import pytest

from sync_tools import signing
from sync_tools.build import build
from sync_tools.errors import RemoteError
from sync_tools.manifest import verify_manifest
from sync_tools.package import package
from sync_tools.release import release
from sync_tools.stores.base import open_store
from sync_tools.stores.github import GitHubStore
from tests.servers.github_api import GitHubAPIServer
from tests.servers.github_api import github_api_fixture as github_api  # noqa: F401 -- fixture
from tests.workspace import Workspace, make_workspace

REPO = "joeblew999/plat-telemetry"
TAG = "latest"
NATS = "nats-server-linux-amd64.tar.gz"
ARC = "arc-linux-amd64.tar.gz"


@pytest.fixture(scope="module")
def packaged(tmp_path_factory) -> Workspace:
    """nats and arc built and packaged for linux/amd64, releasing to REPO on GitHub."""
    ws = make_workspace(tmp_path_factory.mktemp("gh") / "ws", git=False, repo=REPO)
    cfg = ws.config()
    for name in ("nats", "arc"):
        build(cfg, [name], platform="linux/amd64", env=ws.env())
        package(cfg, name, platform="linux/amd64")
    return ws


@pytest.fixture
def ws(packaged, tmp_path) -> Workspace:
    root = tmp_path / "ws"
    shutil.copytree(packaged.root, root, symlinks=True)
    return dataclasses.replace(packaged, root=root, config_path=root / "sync-tools.yaml",
                               private_key=root / "keys" / "release.key", public_key=root / "keys" / "release.pub")


@pytest.fixture
def server(github_api: GitHubAPIServer, monkeypatch) -> GitHubAPIServer:  # noqa: F811 -- the fixture
    github_api.state.add_repo(REPO)
    monkeypatch.setenv("GITHUB_API_URL", github_api.url)  # open_store builds GitHubStore from this
    monkeypatch.setenv("GITHUB_TOKEN", "test-token")
    return github_api


def _release(ws: Workspace, name: str, **kw):
    return release(ws.config(), name, signing_key=str(ws.private_key), **kw)


def _manifest(ws: Workspace, server: GitHubAPIServer):
    assets = server.state.assets(REPO, TAG)
    return verify_manifest(assets["manifest.json"], assets["manifest.json.sig"],
                           signing.load_public_key(str(ws.public_key)))


def _asset_record(server: GitHubAPIServer, name: str) -> dict:
    return next(a for a in server.state.asset_records(REPO, TAG) if a["name"] == name)


def test_release_replaces_only_nats_with_a_copy_at_every_moment(ws, server) -> None:
    assert isinstance(open_store(ws.config()), GitHubStore)
    _release(ws, "nats")
    _release(ws, "arc")
    first = _manifest(ws, server)
    assert [r["tag_name"] for r in server.state.releases(REPO)] == [TAG]
    arc_record = dict(_asset_record(server, ARC))
    old_nats = server.state.assets(REPO, TAG)[NATS]

    ws.release_upstream("nats", "v1.1.0")
    cfg = ws.config()
    build(cfg, ["nats"], platform="linux/amd64", version="v1.1.0", env=ws.env())
    new_nats = package(ws.config(), "nats", platform="linux/amd64").path.read_bytes()
    assert new_nats != old_nats

    seen: list[tuple[str, str]] = []

    def observe(entry: dict) -> None:
        assets = server.state.assets(REPO, TAG)
        copies = {n: d for n, d in assets.items() if n == NATS or n.startswith(NATS + ".tmp-")}
        seen.append((entry["method"], entry["path"]))
        assert set(copies.values()) & {old_nats, new_nats}, f"no copy of {NATS} after {entry['method']} " \
                                                             f"{entry['path']}: {sorted(copies)}"

    server.hooks.append(observe)
    result = _release(ws, "nats")
    server.hooks.clear()

    assert result.serial == first.serial + 1 and result.version == "v1.1.0"
    assert server.state.assets(REPO, TAG)[NATS] == new_nats
    assert any(m == "DELETE" for m, _ in seen)  # the old asset really was replaced, not overwritten
    after = _manifest(ws, server)
    assert after.subsystems["arc"] == first.subsystems["arc"]
    assert after.subsystems["nats"].version == "v1.1.0"
    assert _asset_record(server, ARC) == arc_record  # arc's asset: same id, bytes, updated_at
    uploads = [e for e in server.requests_to("POST", r"/assets$") if "arc" in str(e.get("query", ""))]
    assert len(uploads) == 1  # arc uploaded once, by its own release only
    assert not [n for n in server.state.assets(REPO, TAG) if ".tmp-" in n]  # no temporaries left


def test_upload_failing_halfway_keeps_the_old_asset_and_manifest(ws, server) -> None:
    _release(ws, "nats")
    before = server.state.assets(REPO, TAG)
    ws.release_upstream("nats", "v1.2.0")
    build(ws.config(), ["nats"], platform="linux/amd64", version="v1.2.0", env=ws.env())
    package(ws.config(), "nats", platform="linux/amd64")
    server.inject("POST", r"^/uploads/.*/assets$", reset=True)  # the connection dies mid-body
    with pytest.raises(RemoteError):
        _release(ws, "nats")
    assert server.state.assets(REPO, TAG) == before  # old asset and old manifest pair, nothing else
    assert _manifest(ws, server).subsystems["nats"].version == "v1.0.0"
    server.clear_faults()
    assert _release(ws, "nats").version == "v1.2.0"
    assert _manifest(ws, server).subsystems["nats"].version == "v1.2.0"


class _BarrierStore(GitHubStore):
    """A real GitHubStore whose manifest reads inside the release loop wait for the other thread's, so
    both releases build on the same manifest and one must lose the compare-and-swap."""

    def __init__(self, barrier: threading.Barrier, **kw):
        super().__init__(REPO, TAG, **kw)
        self.barrier = barrier
        self.reads = 0

    def read_manifest(self):
        snap = super().read_manifest()
        self.reads += 1
        if self.reads == 2:  # the first read is release()'s check before uploading
            self.barrier.wait(timeout=30)
        return snap


def test_two_concurrent_releases_of_different_subsystems_both_land(ws, server) -> None:
    GitHubStore(REPO, TAG, base_url=server.url).ensure_release()  # once, before the parallel jobs
    started = int(time.time())  # the first serial of a store with no manifest is the clock
    barrier = threading.Barrier(2)
    results, errors = {}, []

    def run(name: str) -> None:
        try:
            store = _BarrierStore(barrier, base_url=server.url, timeout=10)
            results[name] = _release(ws, name, store=store)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("nats", "arc")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert max(r.attempts for r in results.values()) >= 2  # the race happened and was redone
    m = _manifest(ws, server)
    assert started <= m.serial - 1 <= time.time() and set(m.subsystems) == {"nats", "arc"}  # two writes
    assets = server.state.assets(REPO, TAG)
    for name, asset in ((n, m.subsystems[n].assets["linux/amd64"]) for n in ("nats", "arc")):
        assert asset.sha256 == results[name].assets[0].sha256
        assert len(assets[asset.name]) == asset.size
    assert set(assets) == {NATS, ARC, "manifest.json", "manifest.json.sig"}



def test_a_release_whose_manifest_another_built_on_at_once_still_succeeds(ws, server) -> None:
    """The store reads the pair back after writing it; when another release (arc), built on ours, has
    replaced it already, that read says "conflict". The retry finds nats's entry is already this
    build and writes it again; nats's release must not be reported failed (the relay would not be
    told)."""
    _release(ws, "arc")
    arc_released: list[int] = []

    class _ArcLandsRightAfter(GitHubStore):
        def _install_signature(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            super()._install_signature(*args, **kwargs)
            if not arc_released:
                arc_released.append(_release(ws, "arc").serial)

    result = _release(ws, "nats", store=_ArcLandsRightAfter(REPO, TAG, base_url=server.url, timeout=10),
                      sleep=lambda s: None)
    m = _manifest(ws, server)
    assert arc_released and result.serial == m.serial > arc_released[0]
    assert m.subsystems["nats"].commit == result.commit
    assert m.subsystems["nats"].assets["linux/amd64"].sha256 == result.assets[0].sha256
