"""``release`` publishes patches (issue #17): each replaced asset gets patches from the previous few builds
in the store, the signed manifest lists them, a patch over half the asset is not published, the store
keeps the bases later patches start from and prunes the rest. And the issue's 'done when': a release
of a new nats-server-like build reaches a running agent as a patch, with the bytes shown."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization

from sync_tools import patches
from sync_tools.cli import cli
from sync_tools.manifest import asset_name
from sync_tools.package import Packaged, write_tarball
from sync_tools.release import release
from sync_tools.stores.local import LocalStore
from tests.agent_support import PLATFORM, World, close_world, make_world

PAD = 1 << 20
ASSET = asset_name("nats-server", PLATFORM)


def build(world: World, version: str, *, seed: int = 7, edits: int = 0) -> bytes:
    """A runnable nats-like build: the service script, then 1 MiB of incompressible 'code' (one *seed*
    per line of builds) with *edits* small changes, as between patch releases."""
    pad = bytearray(random.Random(seed).randbytes(PAD))
    rng = random.Random(f"{version}:{edits}")
    for _ in range(edits):
        at = rng.randrange(PAD - 64)
        pad[at:at + 32] = rng.randbytes(32)
    return world.binary("nats", version) + b"#" + bytes(pad)


def package(world: World, version: str, data: bytes) -> Path:
    """``.dist`` holding *data* as nats' packaged asset and its sidecar (what ``package`` writes)."""
    dist = world.base / ".dist"
    dist.mkdir(exist_ok=True)
    src = world.base / "built"
    src.write_bytes(data)
    out = dist / ASSET
    write_tarball(out, [("nats-server", src)], 0)
    item = Packaged(subsystem="nats", platform=PLATFORM, version=version,
                    commit=hashlib.sha1(version.encode()).hexdigest(), built="2025-01-01T00:00:00Z",
                    binary="nats-server", name=ASSET, size=out.stat().st_size,
                    sha256=hashlib.sha256(out.read_bytes()).hexdigest(),
                    binary_sha256=hashlib.sha256(data).hexdigest(), path=out)
    item.sidecar.write_text(json.dumps(item.to_json()))
    return dist


def do_release(world: World, version: str, data: bytes, **kw: object):  # noqa: ANN201
    key = world.store.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    return release(world.config(), "nats", dist=package(world, version, data), signing_key=key, **kw)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def world(tmp_path):
    w = make_world(tmp_path / "w", {"nats": "nats-server"})
    try:
        yield w
    finally:
        close_world(w)


def stored(world: World) -> set[str]:
    return {n for n in LocalStore(world.store.store, "latest").list_assets() if n.startswith("nats-server")}


def test_a_new_nats_server_build_reaches_the_agent_as_a_patch(world) -> None:
    """Done when: release of v3 (a patch release of v2) reaches the agent as a patch, bytes shown."""
    v2, v3 = build(world, "v2"), build(world, "v3", edits=30)
    first = do_release(world, "v2", v2)
    assert first.patches == {PLATFORM: ()}  # v1 (a small script) -> v2: over half the asset, not published
    assert world.agent().reconcile().result("nats").action == "updated"
    world.server.reset()

    result = do_release(world, "v3", v3)
    [patch] = result.patches[PLATFORM]
    asset = world.store.manifest().subsystems["nats"].assets[PLATFORM]
    assert asset.patches == (patch,)  # the signed manifest lists it
    assert (patch.from_sha, patch.format) == (sha(v2), patches.FORMAT)
    assert patch.size < 0.05 * asset.size
    assert stored(world) == {ASSET, patch.name, patches.base_name(ASSET, sha(v2))}

    out = CliRunner().invoke(cli, ["--config", str(world.config_path), "agent", "--once", "--source",
                                   world.server.url, "--json"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    nats = json.loads(out.output)["subsystems"]["nats"]
    assert nats["action"] == "updated"
    assert nats["patch"] == {"bytes": patch.size, "saved": asset.size - patch.size}
    assert world.bin_path("nats").read_bytes() == v3
    world.wait_version("nats", "v3")
    assert world.server.sent.get(patch.name) == patch.size and ASSET not in world.server.sent
    text = CliRunner().invoke(cli, ["--config", str(world.config_path), "agent", "--once", "--source",
                                    world.server.url])
    assert text.exit_code == 0 and "unchanged" in text.output


def test_the_store_keeps_the_bases_it_needs_and_prunes_old_patches(world) -> None:
    builds = {v: build(world, v, edits=10 * i) for i, v in enumerate(["v2", "v3", "v4", "v5", "v6"])}
    do_release(world, "v2", builds["v2"])
    do_release(world, "v3", builds["v3"])
    do_release(world, "v4", builds["v4"])
    r5 = do_release(world, "v5", builds["v5"])
    assert [p.from_sha for p in r5.patches[PLATFORM]] == [sha(builds[v]) for v in ("v4", "v3", "v2")]
    # bases for each patch's starting build stay; the current build is the full asset itself
    assert stored(world) == {ASSET, *(p.name for p in r5.patches[PLATFORM]),
                             *(patches.base_name(ASSET, sha(builds[v])) for v in ("v4", "v3", "v2"))}
    r6 = do_release(world, "v6", builds["v6"])
    assert [p.from_sha for p in r6.patches[PLATFORM]] == [sha(builds[v]) for v in ("v5", "v4", "v3")]
    # v5's patches are pruned, and v2's base (no patch starts from it any more)
    assert stored(world) == {ASSET, *(p.name for p in r6.patches[PLATFORM]),
                             *(patches.base_name(ASSET, sha(builds[v])) for v in ("v5", "v4", "v3"))}
    store = world.store.dir
    for p in r6.patches[PLATFORM]:  # each listed patch, applied to its base, gives v6
        base = Path(store / patches.base_name(ASSET, p.from_sha))
        assert base.is_file() and sha((store / p.name).read_bytes()) == p.sha256

    # a minor release (nothing shared): no patch is published, and nothing of the old ones stays
    minor = build(world, "v7", seed=99)
    r7 = do_release(world, "v7", minor)
    assert r7.patches == {PLATFORM: ()}
    assert stored(world) == {ASSET}
    assert world.store.manifest().subsystems["nats"].assets[PLATFORM].patches == ()


def test_patch_from_zero_publishes_none_and_the_same_build_again_keeps_its_patches(world) -> None:
    v2, v3 = build(world, "v2"), build(world, "v3", edits=5)
    do_release(world, "v2", v2)
    r3 = do_release(world, "v3", v3)
    assert len(r3.patches[PLATFORM]) == 1
    again = do_release(world, "v3", v3)  # a rerun release job
    assert again.patches == r3.patches and stored(world) == {ASSET, r3.patches[PLATFORM][0].name,
                                                              patches.base_name(ASSET, sha(v2))}
    off = do_release(world, "v4", build(world, "v4", edits=9), patch_from=0)
    assert off.patches == {PLATFORM: ()} and stored(world) == {ASSET}


def test_a_tampered_base_makes_no_patch_and_the_release_goes_on(world) -> None:
    v2, v3, v4 = build(world, "v2"), build(world, "v3", edits=5), build(world, "v4", edits=8)
    do_release(world, "v2", v2)
    do_release(world, "v3", v3)
    base = world.store.dir / patches.base_name(ASSET, sha(v2))
    base.write_bytes(base.read_bytes()[:-100])  # a damaged copy of v2
    r4 = do_release(world, "v4", v4)
    assert [p.from_sha for p in r4.patches[PLATFORM]] == [sha(v3)]  # only the one it could verify
    assert world.store.manifest().subsystems["nats"].version == "v4"


def test_release_patches_in_config_sets_how_many(world, monkeypatch) -> None:
    """`release.patches: 0` in sync-tools.yaml: the `release` command publishes no patch."""
    v2, v3 = build(world, "v2"), build(world, "v3", edits=5)
    do_release(world, "v2", v2)
    world.config_path.write_text(world.config_path.read_text().replace("release:\n", "release:\n  patches: 0\n"))
    assert world.config().release.patches == 0
    key = world.store.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()).decode()
    monkeypatch.setenv("SYNC_TOOLS_SIGNING_KEY", key)
    result = CliRunner().invoke(cli, ["release", "--only", "nats", "--dist", str(package(world, "v3", v3)),
                                      "--json", "--config", str(world.config_path)])
    assert result.exit_code == 0, result.output
    assert stored(world) == {ASSET}  # v3's asset, and neither a patch nor a base kept for one
