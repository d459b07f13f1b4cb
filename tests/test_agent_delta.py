"""The agent's patch path (sync_tools/agent/delta.py) end to end: a real release store served over HTTP
(Range, byte counts, cuts), real supervisord services, a real child-process apply. A listed patch from
the installed binary is downloaded instead of the asset; every fault on that path falls back to the full
asset and installs the right bytes; a patch for a binary the agent does not have is never downloaded."""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType

import pytest

from sync_tools import patches
from sync_tools.agent.delta import choose_patch
from sync_tools.fsutil import atomic_write_bytes
from sync_tools.manifest import Asset, Entry, Patch, asset_name, format_time, with_entry
from tests.agent_support import PLATFORM, World, close_world, file_member, make_world, tar_gz

PAD = 1 << 20


def binary(world: World, version: str, *, edits: int) -> bytes:
    """A runnable nats-like binary: the service script for *version*, then 1 MiB of incompressible
    padding shared by every version with *edits* small changes (sh never reads past the exec line)."""
    pad = bytearray(random.Random(7).randbytes(PAD))
    rng = random.Random(f"edits:{version}:{edits}")
    for _ in range(edits):
        at = rng.randrange(PAD - 64)
        pad[at:at + 32] = rng.randbytes(32)
    return world.binary("nats", version) + b"#" + bytes(pad)


def publish(world: World, version: str, data: bytes, patch_list: tuple[tuple[Patch, bytes], ...] = ()) -> Asset:
    """Put *data* as nats' asset and each (patch, body) beside it, and sign the manifest listing them."""
    store = world.store
    aname = asset_name("nats-server", PLATFORM)
    archive = tar_gz([file_member("nats-server", data)])
    atomic_write_bytes(store.dir / aname, archive)
    for p, body in patch_list:
        atomic_write_bytes(store.dir / p.name, body)
    asset = Asset(aname, len(archive), hashlib.sha256(archive).hexdigest(), hashlib.sha256(data).hexdigest(),
                  patches=tuple(p for p, _ in patch_list))
    entry = Entry(version=version, commit=hashlib.sha1(version.encode()).hexdigest(),
                  built=format_time(datetime.now(UTC)), assets=MappingProxyType({PLATFORM: asset}),
                  binary="nats-server")
    store.write_manifest(with_entry(store.manifest(), "nats", entry))
    return asset


def make_patch(tmp: Path, old: bytes, new: bytes, *, listed_from: bytes | None = None) -> tuple[Patch, bytes]:
    (tmp / "old").write_bytes(old)
    (tmp / "new").write_bytes(new)
    patches.make_patch(tmp / "old", tmp / "new", tmp / "p")
    body = (tmp / "p").read_bytes()
    from_sha = hashlib.sha256(listed_from if listed_from is not None else old).hexdigest()
    name = patches.patch_name(asset_name("nats-server", PLATFORM), from_sha, hashlib.sha256(new).hexdigest())
    return Patch(from_sha, name, len(body), hashlib.sha256(body).hexdigest(), patches.FORMAT), body


@pytest.fixture
def world(tmp_path):
    """nats running v2 (a 1 MiB nats-like binary), installed by the agent from the full asset."""
    w = make_world(tmp_path / "w", {"nats": "nats-server"})
    try:
        v2 = binary(w, "v2", edits=0)
        publish(w, "v2", v2)
        report = w.agent().reconcile()
        assert report.result("nats").action == "updated" and report.result("nats").patch is None
        assert w.bin_path("nats").read_bytes() == v2
        w.server.reset()
        yield w
    finally:
        close_world(w)


def _only_full(world: World, asset: Asset) -> None:
    assert world.server.sent.get(asset.name) == asset.size


def test_a_patch_release_reaches_the_agent_as_a_patch(world, tmp_path) -> None:
    v2, v3 = world.bin_path("nats").read_bytes(), binary(world, "v3", edits=20)
    patch, body = make_patch(tmp_path, v2, v3)
    asset = publish(world, "v3", v3, ((patch, body),))
    assert patch.size < asset.size * 0.05
    report = world.agent().reconcile()
    res = report.result("nats")
    assert res.action == "updated" and res.error is None
    assert world.bin_path("nats").read_bytes() == v3
    world.wait_version("nats", "v3")
    # only the patch crossed the wire, and the result says so
    assert world.server.sent == {"manifest.json": world.server.sent["manifest.json"],
                                 "manifest.json.sig": world.server.sent["manifest.json.sig"], patch.name: patch.size}
    assert res.bytes == patch.size
    assert res.patch is not None and (res.patch.bytes, res.patch.saved) == (patch.size, asset.size - patch.size)
    assert report.to_json()["subsystems"]["nats"]["patch"] == {"bytes": patch.size, "saved": asset.size - patch.size}
    assert not list((world.root / ".sync-tools" / "downloads").iterdir())  # the patch file is gone


def test_a_cut_patch_download_resumes(world, tmp_path) -> None:
    v2, v3 = world.bin_path("nats").read_bytes(), binary(world, "v3", edits=20)
    patch, body = make_patch(tmp_path, v2, v3)
    publish(world, "v3", v3, ((patch, body),))
    world.server.cut_once[patch.name] = patch.size // 2
    res = world.agent().reconcile().result("nats")
    assert res.action == "updated" and res.patch is not None
    assert world.bin_path("nats").read_bytes() == v3
    assert (patch.name, f"bytes={patch.size // 2}-") in world.server.requests
    assert world.server.sent[patch.name] == patch.size


def _corrupt(body: bytes) -> bytes:
    flipped = bytearray(body)
    flipped[len(flipped) // 2] ^= 0xFF
    return bytes(flipped)


@pytest.mark.parametrize("fault", ["corrupt", "truncated", "wrong_base", "apply_error", "unavailable"])
def test_every_patch_fault_falls_back_to_the_full_asset(world, tmp_path, fault) -> None:
    v2, v3 = world.bin_path("nats").read_bytes(), binary(world, "v3", edits=20)
    if fault == "wrong_base":  # listed as from v2, but made from another build: applies to other bytes
        patch, body = make_patch(tmp_path, binary(world, "v1b", edits=400), v3, listed_from=v2)
    elif fault == "apply_error":  # the manifest's sha256 matches, but it is no patch at all
        body = random.Random(1).randbytes(5000)
        good, _ = make_patch(tmp_path, v2, v3)
        patch = replace(good, size=len(body), sha256=hashlib.sha256(body).hexdigest())
    else:
        patch, body = make_patch(tmp_path, v2, v3)
    asset = publish(world, "v3", v3, ((patch, body),))
    if fault == "corrupt":  # the store's file differs from what the manifest signed
        (world.store.dir / patch.name).write_bytes(_corrupt(body))
    elif fault == "truncated":
        (world.store.dir / patch.name).write_bytes(body[: len(body) // 2])
    elif fault == "unavailable":
        world.server.fail_next[patch.name] = 100
    res = world.agent().reconcile().result("nats")
    assert res.action == "updated", res.error
    assert res.patch is None
    assert world.bin_path("nats").read_bytes() == v3
    world.wait_version("nats", "v3")
    _only_full(world, asset)
    assert res.bytes == asset.size + world.server.sent.get(patch.name, 0)  # the failed try is counted
    assert not list((world.root / ".sync-tools" / "downloads").iterdir())
    assert not (world.bin_path("nats").parent / ".nats-server.staged").exists()


def test_a_patch_for_a_binary_the_agent_does_not_have_is_never_downloaded(world, tmp_path) -> None:
    v3 = binary(world, "v3", edits=20)
    other = binary(world, "v1-other", edits=3)
    patch, body = make_patch(tmp_path, other, v3)  # from a build this agent never ran
    unknown = replace(patch, name=patch.name.replace(".hdiff", ".x.hdiff"), format="bsdiff-next")
    big = replace(make_patch(tmp_path, world.bin_path("nats").read_bytes(), v3)[0], name="big.hdiff")
    asset = publish(world, "v3", v3, ((patch, body), (unknown, body)))
    assert choose_patch(replace(asset, patches=(*asset.patches, replace(big, size=asset.size))),
                        hashlib.sha256(world.bin_path("nats").read_bytes()).hexdigest()) is None
    res = world.agent().reconcile().result("nats")
    assert res.action == "updated" and res.patch is None
    assert world.bin_path("nats").read_bytes() == v3
    assert {name for name, _ in world.server.requests} == {"manifest.json", "manifest.json.sig", asset.name}


def test_choose_patch_takes_the_smallest_usable_one() -> None:
    a, b = "a" * 64, "b" * 64
    p = [Patch(a, "x1.hdiff", 50, "c" * 64, patches.FORMAT), Patch(a, "x2.hdiff", 30, "c" * 64, patches.FORMAT),
         Patch(b, "x3.hdiff", 10, "c" * 64, patches.FORMAT), Patch(a, "x4.zst", 5, "c" * 64, "zstd")]
    asset = Asset("n-linux-amd64.tar.gz", 100, "d" * 64, "e" * 64, patches=tuple(p))
    assert choose_patch(asset, a).name == "x2.hdiff"
    assert choose_patch(asset, b).name == "x3.hdiff"
    assert choose_patch(asset, "f" * 64) is None
    assert choose_patch(asset, None) is None
    assert choose_patch(replace(asset, size=30), a) is None  # never as big as the full download
