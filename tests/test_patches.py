"""sync_tools.patches and the manifest's per-asset ``patches`` list: patches made and applied (in the
child process the agent uses) round-trip generated binaries, and every bad patch is refused whole."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import replace
from pathlib import Path

import pytest

from sync_tools import patches
from sync_tools.errors import ManifestError
from sync_tools.manifest import Asset, Entry, Manifest, Patch, parse_manifest


def fake_binary(seed: int, size: int, *, edits: int = 0, version: bytes = b"") -> bytes:
    """A pseudo-binary: *size* bytes of incompressible blocks (the same for one *seed*), with *edits*
    small changes and a version string that shifts everything after it, as a patch release does."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size))
    edit_rng = random.Random(f"{seed}:{edits}:{version!r}")
    for _ in range(edits):
        at = edit_rng.randrange(len(data) - 64)
        data[at:at + 32] = edit_rng.randbytes(32)
    return version + bytes(data)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    old = tmp_path / "old"
    new = tmp_path / "new"
    old.write_bytes(fake_binary(1, 1 << 20, version=b"v1.0.0\n"))
    new.write_bytes(fake_binary(1, 1 << 20, edits=40, version=b"v1.0.1-longer\n"))
    return old, new


def test_a_patch_round_trips_and_is_a_small_share_of_the_binary(pair, tmp_path) -> None:
    old, new = pair
    size = patches.make_patch(old, new, tmp_path / "p.hdiff")
    assert size == (tmp_path / "p.hdiff").stat().st_size
    assert size < new.stat().st_size * 0.05  # 40 edits of 32 bytes and a shift: a few KB, not 1 MB
    out = tmp_path / "out"
    sha = patches.apply_patch(old, tmp_path / "p.hdiff", out, max_bytes=1 << 30)
    assert out.read_bytes() == new.read_bytes()
    assert sha == hashlib.sha256(new.read_bytes()).hexdigest()
    assert out.stat().st_mode & 0o777 == 0o755


def test_a_patch_from_an_empty_or_unrelated_binary_still_round_trips(tmp_path) -> None:
    empty, other, new = tmp_path / "empty", tmp_path / "other", tmp_path / "new"
    empty.write_bytes(b"")
    other.write_bytes(fake_binary(7, 200_000))
    new.write_bytes(fake_binary(8, 300_000))
    for base in (empty, other):
        patch = tmp_path / f"{base.name}.hdiff"
        patches.make_patch(base, new, patch)
        out = tmp_path / f"{base.name}.out"
        patches.apply_patch(base, patch, out, max_bytes=1 << 30)
        assert out.read_bytes() == new.read_bytes()


def test_bad_patches_are_refused_and_leave_no_output(pair, tmp_path) -> None:
    old, new = pair
    good = tmp_path / "good.hdiff"
    patches.make_patch(old, new, good)
    data = good.read_bytes()
    cases = {
        "garbage": random.Random(3).randbytes(len(data)),
        "truncated": data[: len(data) // 2],
        "empty": b"",
    }
    for name, body in cases.items():
        patch = tmp_path / f"{name}.hdiff"
        patch.write_bytes(body)
        out = tmp_path / f"{name}.out"
        with pytest.raises(patches.PatchError, match="apply failed"):
            patches.apply_patch(old, patch, out, max_bytes=1 << 30)
        assert not out.exists(), name
    # a flipped byte in the compressed body: either refused, or a wrong binary the caller's sha256 check
    # refuses; never the new binary with a wrong checksum claimed
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0xFF
    (tmp_path / "flipped.hdiff").write_bytes(bytes(flipped))
    try:
        sha = patches.apply_patch(old, tmp_path / "flipped.hdiff", tmp_path / "flipped.out", max_bytes=1 << 30)
    except patches.PatchError:
        assert not (tmp_path / "flipped.out").exists()
    else:
        assert sha == hashlib.sha256((tmp_path / "flipped.out").read_bytes()).hexdigest()


def test_a_patch_applied_to_the_wrong_base_is_refused_or_makes_other_bytes(pair, tmp_path) -> None:
    old, new = pair
    patch = tmp_path / "p.hdiff"
    patches.make_patch(old, new, patch)
    wrong = tmp_path / "wrong"
    wrong.write_bytes(fake_binary(2, 1 << 20, version=b"v1.0.0\n"))  # same size, other bytes
    out = tmp_path / "out"
    try:
        sha = patches.apply_patch(wrong, patch, out, max_bytes=1 << 30)
    except patches.PatchError:
        assert not out.exists()
    else:
        assert sha != hashlib.sha256(new.read_bytes()).hexdigest()


def test_the_output_cap_and_an_unknown_format_are_refused(pair, tmp_path) -> None:
    old, new = pair
    patch = tmp_path / "p.hdiff"
    patches.make_patch(old, new, patch)
    with pytest.raises(patches.PatchError, match="over the 1000-byte cap"):
        patches.apply_patch(old, patch, tmp_path / "capped", max_bytes=1000)
    assert not (tmp_path / "capped").exists()
    with pytest.raises(patches.PatchError, match="unknown patch format 'bsdiff9'"):
        patches.apply_patch(old, patch, tmp_path / "x", fmt="bsdiff9", max_bytes=1 << 30)


def test_names_tie_patches_and_bases_to_their_asset() -> None:
    a, b = "a" * 64, "b" * 64
    name = patches.patch_name("nats-server-linux-amd64.tar.gz", a, b)
    assert name == f"nats-server-linux-amd64.{a[:16]}-{b[:16]}.hdiff"
    assert patches.is_patch_of(name, "nats-server-linux-amd64.tar.gz")
    assert not patches.is_patch_of(name, "nats-server-linux-arm64.tar.gz")
    assert not patches.is_patch_of(name, "nats-linux-amd64.tar.gz")
    base = patches.base_name("nats-server-linux-amd64.tar.gz", a)
    assert base == f"nats-server-linux-amd64.base-{a[:16]}.tar.gz"
    assert patches.is_base_of(base, "nats-server-linux-amd64.tar.gz")
    assert not patches.is_base_of(base, "nats-server-linux-amd64x.tar.gz")
    assert not patches.is_patch_of("nats-server-linux-amd64.tar.gz", "nats-server-linux-amd64.tar.gz")


def _manifest_with(patch_json: object) -> bytes:
    asset = Asset("nats-server-linux-amd64.tar.gz", 100, "c" * 64, "d" * 64)
    m = Manifest(serial=1, created="2025-01-01T00:00:00Z", expires="2025-02-01T00:00:00Z",
                 subsystems={"nats": Entry("v1", "e" * 40, "2025-01-01T00:00:00Z", {"linux/amd64": asset})})
    obj = json.loads(m.dumps())
    obj["subsystems"]["nats"]["assets"]["linux/amd64"]["patches"] = patch_json
    return json.dumps(obj).encode()


def test_the_manifest_carries_patches_and_refuses_bad_ones() -> None:
    good = Patch(from_sha="a" * 64, name="nats-server-linux-amd64.aaaa-dddd.hdiff", size=10, sha256="f" * 64,
                 format="hdiffpatch")
    m = parse_manifest(_manifest_with([good.to_json()]))
    asset = m.subsystems["nats"].assets["linux/amd64"]
    assert asset.patches == (good,)
    assert parse_manifest(m.dumps()) == m  # round trip through the canonical bytes
    assert "patches" not in json.loads(replace(m, subsystems={"nats": replace(
        m.subsystems["nats"], assets={"linux/amd64": replace(asset, patches=())})}).dumps())["subsystems"]["nats"][
        "assets"]["linux/amd64"]  # no key when empty: manifests without patches are as before
    assert parse_manifest(_manifest_with([{**good.to_json(), "format": "zstd-19"}])).subsystems["nats"].assets[
        "linux/amd64"].patches[0].format == "zstd-19"  # an unknown format parses; the agent skips it
    bad = {
        "not a list": {"x": 1},
        "bad from": [{**good.to_json(), "from": "A" * 64}],
        "unsafe name": [{**good.to_json(), "name": "../manifest.json"}],
        "manifest name": [{**good.to_json(), "name": "manifest.json"}],
        "negative size": [{**good.to_json(), "size": -1}],
        "bad sha256": [{**good.to_json(), "sha256": "x"}],
        "bad format": [{**good.to_json(), "format": "Bad Format"}],
        "missing key": [{k: v for k, v in good.to_json().items() if k != "sha256"}],
        "too many": [good.to_json()] * 17,
    }
    for why, value in bad.items():
        with pytest.raises(ManifestError, match="patches"):
            parse_manifest(_manifest_with(value))
        assert why
