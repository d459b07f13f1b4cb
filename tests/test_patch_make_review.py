"""Review of the make side of patches (``release``): making a patch is bounded in time and size, and a
patch that cannot be made or uploaded never holds up the release; the release goes out with the full
assets and a line saying why there is no patch."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography.hazmat.primitives import serialization

from sync_tools import patches
from sync_tools import release as release_mod
from sync_tools.errors import RemoteError
from sync_tools.manifest import asset_name
from sync_tools.package import Packaged, write_tarball
from sync_tools.release import release
from sync_tools.stores.local import LocalStore
from tests.agent_support import PLATFORM, World
from tests.nats_support import nats_server_bin
from tests.test_release_patches import ASSET, build, do_release, sha, stored, world  # noqa: F401 - fixture


def test_making_a_patch_of_a_real_binary_is_cut_at_its_deadline(tmp_path) -> None:
    """A make that runs past its deadline is stopped there (the process making it is killed), with a
    PatchError and no output left behind; one within it gives a patch that round trips."""
    try:
        real = Path(nats_server_bin()).read_bytes()  # a real Go binary, about 18 MB
    except RuntimeError:
        pytest.skip("no nats-server binary")
    old, new = tmp_path / "old", tmp_path / "new"
    old.write_bytes(real)
    edited = bytearray(real)
    rng = random.Random(5)
    for _ in range(200):
        at = rng.randrange(len(edited) - 16)
        edited[at:at + 8] = rng.randbytes(8)
    new.write_bytes(bytes(edited))
    out = tmp_path / "p.hdiff"
    started = time.monotonic()
    with pytest.raises(patches.PatchError, match="took over"):
        patches.make_patch(old, new, out, timeout=0.3)
    assert time.monotonic() - started < 3.0  # cut at the deadline, not after the whole make
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["new", "old"]


def test_the_release_gives_patch_making_a_budget_and_goes_out_past_it(world, monkeypatch, caplog) -> None:  # noqa: F811
    """Past the release's time for making patches, the rest are not made: the release goes out with the
    full asset only, and says so."""
    v2, v3 = build(world, "v2"), build(world, "v3", edits=5)
    do_release(world, "v2", v2)
    monkeypatch.setattr(patches, "MAKE_BUDGET", 0.0, raising=False)
    with caplog.at_level(logging.INFO):
        r3 = do_release(world, "v3", v3)
    assert r3.patches == {PLATFORM: ()}
    assert world.store.manifest().subsystems["nats"].version == "v3"
    assert world.store.manifest().subsystems["nats"].assets[PLATFORM].patches == ()
    assert stored(world) == {ASSET}
    assert any(r.levelno == logging.WARNING and "time for making patches" in r.getMessage() for r in caplog.records)


def test_a_binary_over_the_size_limit_for_patches_gets_none_and_is_released(world, monkeypatch, caplog) -> None:  # noqa: F811
    """Making a patch holds several times the binary in memory: a binary over MAX_MAKE_BYTES gets no patch
    (nothing of the old build is fetched for one), and the release goes out with a line saying so."""
    v2, v3 = build(world, "v2"), build(world, "v3", edits=5)
    do_release(world, "v2", v2)
    monkeypatch.setattr(patches, "MAX_MAKE_BYTES", len(v3) - 1, raising=False)
    fetched: list[str] = []
    real_download = LocalStore.download_asset
    monkeypatch.setattr(LocalStore, "download_asset",
                        lambda self, name, out, **kw: fetched.append(name) or real_download(self, name, out, **kw))
    with caplog.at_level(logging.INFO):
        r3 = do_release(world, "v3", v3)
    assert r3.patches == {PLATFORM: ()} and fetched == []
    assert world.store.manifest().subsystems["nats"].version == "v3"
    assert stored(world) == {ASSET}
    assert any(r.levelno == logging.WARNING and "limit for making patches" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("failing", [".hdiff", ".base-"])
def test_a_patch_or_base_that_cannot_be_uploaded_is_left_out_and_the_release_goes_out(
        world, monkeypatch, caplog, failing) -> None:  # noqa: F811
    """An upload of a patch (or of the base it starts from) failing is a patch left out, as one that could
    not be made: the release of the full asset goes on, and the manifest lists no patch that is not there."""
    v2, v3 = build(world, "v2"), build(world, "v3", edits=5)
    do_release(world, "v2", v2)
    real_upload = LocalStore.upload_asset

    def upload(self: LocalStore, path: Path, name: str) -> None:
        if failing in name:
            raise RemoteError(f"upload {name}: 502 Bad Gateway")
        real_upload(self, path, name)

    monkeypatch.setattr(LocalStore, "upload_asset", upload)
    with caplog.at_level(logging.INFO):
        r3 = do_release(world, "v3", v3)
    assert r3.patches == {PLATFORM: ()}
    entry = world.store.manifest().subsystems["nats"]
    assert entry.version == "v3" and entry.assets[PLATFORM].patches == ()
    assert entry.assets[PLATFORM].binary_sha256 == sha(v3)
    assert stored(world) == {ASSET}  # nothing half-published stays behind
    assert any(r.levelno == logging.WARNING and "502" in r.getMessage() for r in caplog.records)


def test_patches_are_made_and_published_as_before_within_the_limits(world, tmp_path) -> None:  # noqa: F811
    """The bounds change nothing for an ordinary release: the patch from the current build is made (in
    a child process), listed, and turns the old binary into the new one."""
    v2, v3 = build(world, "v2"), build(world, "v3", edits=5)
    do_release(world, "v2", v2)
    [p] = do_release(world, "v3", v3).patches[PLATFORM]
    assert p.from_sha == sha(v2)
    store = world.store.dir
    assert hashlib.sha256((store / p.name).read_bytes()).hexdigest() == p.sha256
    old = tmp_path / "v2.bin"
    old.write_bytes(v2)
    out = tmp_path / "v3.bin"
    assert patches.apply_patch(old, store / p.name, out, max_bytes=len(v3) + 1) == sha(v3)


OTHER = "linux/arm64"


def package_platforms(w: World, version: str, builds: dict[str, bytes]) -> Path:
    """``.dist`` holding nats' packaged asset for each platform in *builds*."""
    dist = w.base / ".dist"
    shutil.rmtree(dist, ignore_errors=True)
    dist.mkdir()
    for platform, data in builds.items():
        src = w.base / "built"
        src.write_bytes(data)
        out = dist / asset_name("nats-server", platform)
        write_tarball(out, [("nats-server", src)], 0)
        item = Packaged(subsystem="nats", platform=platform, version=version,
                        commit=hashlib.sha1(version.encode()).hexdigest(), built="2025-01-01T00:00:00Z",
                        binary="nats-server", name=out.name, size=out.stat().st_size,
                        sha256=hashlib.sha256(out.read_bytes()).hexdigest(), binary_sha256=sha(data), path=out)
        item.sidecar.write_text(json.dumps(item.to_json()))
    return dist


def test_the_budget_goes_to_each_assets_patch_from_the_current_build_first(world, monkeypatch) -> None:  # noqa: F811
    """Most of the fleet runs the current build: when the time for making patches runs out, every asset
    of the release has its patch from the current build before any asset gets one from an older build."""
    key = world.store.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    builds = {v: {p: build(world, v, seed=i, edits=10 * n) for i, p in enumerate((PLATFORM, OTHER))}
              for n, v in enumerate(("v2", "v3", "v4"))}
    for v in ("v2", "v3"):
        release(world.config(), "nats", dist=package_platforms(world, v, builds[v]), signing_key=key)

    clock = [0.0]
    real_make = patches.make_patch
    made: list[str] = []

    def make(old: Path, new: Path, out: Path, **kw: object) -> int:
        made.append(out.name)
        clock[0] += 60.0  # each make takes a minute of the release's budget
        return real_make(old, new, out)

    monkeypatch.setattr(patches, "make_patch", make)
    monkeypatch.setattr(patches, "MAKE_BUDGET", 100.0)
    monkeypatch.setattr(release_mod, "time", SimpleNamespace(monotonic=lambda: clock[0], sleep=time.sleep))
    r4 = release(world.config(), "nats", dist=package_platforms(world, "v4", builds["v4"]), signing_key=key)
    assert len(made) == 2
    for p in (PLATFORM, OTHER):
        assert [x.from_sha for x in r4.patches[p]] == [sha(builds["v3"][p])], p
    assert world.store.manifest().subsystems["nats"].version == "v4"
