"""``release`` to the local directory store: only the released subsystem's assets and manifest entry
change; the manifest is verified before it is built on, signed with the pinned key, and written with
compare-and-swap so racing releases both land."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import shutil
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from sync_tools import signing
from sync_tools.build import build
from sync_tools.cli import cli
from sync_tools.errors import ConfigError, DataError, SignatureError
from sync_tools.fsutil import sha256_bytes
from sync_tools.manifest import parse_manifest, sign_manifest, verify_manifest, with_entry
from sync_tools.package import package
from sync_tools.release import read_verified, refresh, release, release_many
from sync_tools.stores.base import ManifestBusy, ManifestConflict, open_store
from sync_tools.stores.local import LocalStore
from tests.workspace import Workspace, make_workspace


def _files(*dirs: Path, contains: str = "") -> dict[str, tuple[bytes, int]]:
    out = {}
    for d in dirs:
        for p in sorted(d.rglob("*")) if d.exists() else ():
            if p.is_file() and contains in p.name and ".git" not in p.parts:
                out[str(p)] = (p.read_bytes(), p.stat().st_mtime_ns)
    return out


def _sync_tools(ws: Workspace, *args: str) -> str:
    proc = subprocess.run(["sync-tools", *args], cwd=ws.root, env=ws.env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _manifest(ws: Workspace):
    d = ws.release_dir
    return verify_manifest((d / "manifest.json").read_bytes(), (d / "manifest.json.sig").read_bytes(),
                           signing.load_public_key(str(ws.public_key)))


def test_releasing_nats_leaves_everything_of_arc_untouched(tmp_path) -> None:
    """The issue's first 'done when': build, package and release nats twice (two platforms) with the
    real console script; arc's binary, .version, packaged asset, stored asset and manifest entry keep
    their bytes and mtimes."""
    ws = make_workspace(tmp_path / "ws", git=False)
    for name in ("nats", "arc"):
        _sync_tools(ws, "build", "--only", name, "--platform", "linux/amd64")
        _sync_tools(ws, "package", "--only", name, "--platform", "linux/amd64")
        _sync_tools(ws, "release", "--only", name)
    first = _manifest(ws)
    assert set(first.subsystems) == {"nats", "arc"}
    arc_files = {**_files(ws.root / "arc"), **_files(ws.dist, ws.release_dir, contains="arc")}
    names = {Path(p).name for p in arc_files}
    assert {"arc", ".version", "arc-linux-amd64.tar.gz", "arc-linux-amd64.tar.gz.json"} <= names
    assert str(ws.release_dir / "arc-linux-amd64.tar.gz") in arc_files
    nats_asset_before = (ws.release_dir / "nats-server-linux-amd64.tar.gz").read_bytes()

    new_commit = ws.release_upstream("nats", "v1.1.0")
    _sync_tools(ws, "build", "--only", "nats", "--version", "v1.1.0", "--platform", "linux/amd64")
    _sync_tools(ws, "package", "--only", "nats", "--platform", "linux/amd64")
    out = json.loads(_sync_tools(ws, "release", "--only", "nats", "--json"))
    assert out[0]["serial"] == first.serial + 1 and out[0]["version"] == "v1.1.0" and out[0]["commit"] == new_commit
    _sync_tools(ws, "build", "--only", "nats", "--platform", "linux/arm64")  # the pin is v1.1.0 now
    _sync_tools(ws, "package", "--only", "nats", "--platform", "linux/arm64")
    _sync_tools(ws, "release", "--only", "nats", "--platform", "linux/arm64")

    after = _manifest(ws)
    assert after.serial == first.serial + 2
    assert after.subsystems["arc"] == first.subsystems["arc"]
    nats = after.subsystems["nats"]
    assert (nats.version, nats.commit) == ("v1.1.0", new_commit)
    assert set(nats.assets) == {"linux/amd64", "linux/arm64"}  # the per-platform releases merged
    for asset in nats.assets.values():
        stored = (ws.release_dir / asset.name).read_bytes()
        assert sha256_bytes(stored) == asset.sha256 and len(stored) == asset.size
        assert stored == (ws.dist / asset.name).read_bytes()
    assert (ws.release_dir / "nats-server-linux-amd64.tar.gz").read_bytes() != nats_asset_before
    now_arc = {**_files(ws.root / "arc"), **_files(ws.dist, ws.release_dir, contains="arc")}
    assert now_arc == arc_files  # bytes and mtimes
    assert ws.config().subsystems["nats"].current == "v1.1.0"
    assert ws.config().subsystems["arc"].current == "v1.0.0"

    # The stored manifest verifies with the pinned key only, and not with one byte flipped.
    data = (ws.release_dir / "manifest.json").read_bytes()
    sig = (ws.release_dir / "manifest.json.sig").read_bytes()
    other = signing.load_private_key(signing.generate_keypair().private_pem).public_key()
    with pytest.raises(SignatureError):
        verify_manifest(data, sig, other)
    flipped = bytearray(data)
    flipped[len(flipped) // 2] ^= 0x20
    with pytest.raises(SignatureError):
        verify_manifest(bytes(flipped), sig, signing.load_public_key(str(ws.public_key)))


@pytest.fixture(scope="module")
def released(tmp_path_factory) -> Workspace:
    """nats and arc built, packaged and released for linux/amd64 (the second serial)."""
    ws = make_workspace(tmp_path_factory.mktemp("rel") / "ws", git=False)
    cfg = ws.config()
    for name in ("nats", "arc"):
        build(cfg, [name], platform="linux/amd64", env=ws.env())
        package(cfg, name, platform="linux/amd64")
        release(cfg, name, signing_key=str(ws.private_key))
    return ws


@pytest.fixture
def ws(released, tmp_path) -> Workspace:
    """A private copy of the released workspace."""
    root = tmp_path / "ws"
    shutil.copytree(released.root, root, symlinks=True)
    return dataclasses.replace(released, root=root, config_path=root / "sync-tools.yaml", store=root / ".releases",
                               private_key=root / "keys" / "release.key", public_key=root / "keys" / "release.pub")


def test_first_release_starts_from_an_empty_manifest(released) -> None:
    m = _manifest(released)
    assert time.time() - 3600 < m.serial - 1 <= time.time()  # the first serial is the clock (next_serial)
    assert m.subsystems["nats"].binary == "nats-server"
    assert datetime.fromisoformat(m.expires.replace("Z", "+00:00")) > datetime.now(UTC) + timedelta(days=29)


def test_tampered_store_is_refused_and_nothing_is_uploaded(ws, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "12345")  # a different asset than the stored one
    package(ws.config(), "arc", platform="linux/amd64")
    manifest_path = ws.release_dir / "manifest.json"
    tampered = re.sub(rb'"serial": [0-9]+', b'"serial": 9', manifest_path.read_bytes())
    manifest_path.write_bytes(tampered)
    before = _files(ws.release_dir)
    with pytest.raises(SignatureError, match="refusing to overwrite"):
        release(ws.config(), "arc", signing_key=str(ws.private_key))
    assert _files(ws.release_dir) == before


def test_missing_signature_is_refused(ws) -> None:
    (ws.release_dir / "manifest.json.sig").unlink()
    with pytest.raises(SignatureError, match="no manifest.json.sig"):
        release(ws.config(), "arc", signing_key=str(ws.private_key))


def test_signing_key_that_is_not_the_pinned_one_is_refused(ws, tmp_path) -> None:
    other, _ = signing.write_keypair(tmp_path / "other")
    before = _files(ws.release_dir)
    with pytest.raises(ConfigError, match="does not belong to release.public_key"):
        release(ws.config(), "arc", signing_key=str(other))
    with pytest.raises(ConfigError, match="SYNC_TOOLS_SIGNING_KEY"):
        release(ws.config(), "arc")  # no key at all
    assert _files(ws.release_dir) == before


def test_nothing_packaged_or_mixed_builds(ws) -> None:
    with pytest.raises(DataError, match="nothing packaged"):
        release(ws.config(), "arc", platforms=["darwin/arm64"], signing_key=str(ws.private_key))
    shutil.copy(ws.dist / "arc-linux-amd64.tar.gz", ws.dist / "arc-darwin-arm64.tar.gz")
    side = json.loads((ws.dist / "arc-linux-amd64.tar.gz.json").read_text())
    side.update(platform="darwin/arm64", name="arc-darwin-arm64.tar.gz", version="v9.9.9")
    (ws.dist / "arc-darwin-arm64.tar.gz.json").write_text(json.dumps(side))
    with pytest.raises(DataError, match="different builds"):
        release(ws.config(), "arc", signing_key=str(ws.private_key))


def test_expired_manifest_is_still_a_base_for_the_next_release(ws) -> None:
    key = signing.load_private_key(str(ws.private_key))
    store = LocalStore(ws.store, ws.tag)
    snap = store.read_manifest()
    base = parse_manifest(snap.data)
    old = dataclasses.replace(base, serial=base.serial + 1, expires="2020-01-01T00:00:00Z")
    store.write_manifest(*sign_manifest(old, key), snap.token)
    result = release(ws.config(), "arc", signing_key=str(ws.private_key))
    assert result.serial == old.serial + 1
    assert not _manifest(ws).expired()


class _BarrierStore(LocalStore):
    """A real LocalStore whose first reads wait for each other, so two releases read the same manifest
    and one of them must lose the compare-and-swap."""

    def __init__(self, path: Path, tag: str, barrier: threading.Barrier):
        super().__init__(path, tag)
        self.barrier = barrier
        self.reads = 0

    def read_manifest(self):
        snap = super().read_manifest()
        self.reads += 1
        if self.reads == 2:  # the first read is release()'s check before upload
            self.barrier.wait(timeout=30)
        return snap


def test_two_racing_releases_both_land(ws, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "777")
    cfg = ws.config()
    package(cfg, "nats", platform="linux/amd64")
    package(cfg, "arc", platform="linux/amd64")
    barrier = threading.Barrier(2)
    results, errors = {}, []

    def run(name: str) -> None:
        try:
            store = _BarrierStore(ws.store, ws.tag, barrier)
            results[name] = release(cfg, name, store=store, signing_key=str(ws.private_key))
        except Exception as e:  # surfaced below
            errors.append(e)

    serial = _manifest(ws).serial
    threads = [threading.Thread(target=run, args=(n,)) for n in ("nats", "arc")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert sorted(r.attempts for r in results.values()) == [1, 2]
    m = _manifest(ws)
    assert m.serial == serial + 2
    for name in ("nats", "arc"):
        assert m.subsystems[name].assets["linux/amd64"].sha256 == results[name].assets[0].sha256


class _AlwaysBeatenStore(LocalStore):
    """Another (legitimate, signed) writer changes the manifest right after every read."""

    def __init__(self, path: Path, tag: str, key):
        super().__init__(path, tag)
        self.key = key

    def read_manifest(self):
        snap = super().read_manifest()
        m = parse_manifest(snap.data)
        rival = with_entry(m, "arc", m.subsystems["arc"])
        LocalStore(self.base, self.tag).write_manifest(*sign_manifest(rival, self.key), snap.token)
        return snap


def test_gives_up_after_bounded_attempts_with_jittered_backoff(ws) -> None:
    key = signing.load_private_key(str(ws.private_key))
    sleeps: list[float] = []
    with pytest.raises(ManifestConflict, match="gave up after 4 attempts"):
        release(ws.config(), "nats", store=_AlwaysBeatenStore(ws.store, ws.tag, key),
                signing_key=str(ws.private_key), attempts=4, sleep=sleeps.append)
    assert len(sleeps) == 3 and all(0 < s <= 3.0 for s in sleeps)
    assert _manifest(ws).subsystems["nats"].version == "v1.0.0"  # what the rival left is intact and valid


class _RivalDuringUpload(LocalStore):
    """While this release uploads, another release lands nats's entry as *rival* makes it from the
    current one."""

    def __init__(self, path: Path, tag: str, key, rival):  # type: ignore[no-untyped-def]
        super().__init__(path, tag)
        self.key, self.rival = key, rival

    def upload_asset(self, path: Path, name: str) -> None:
        super().upload_asset(path, name)
        store = LocalStore(self.base, self.tag)
        snap = store.read_manifest()
        m = parse_manifest(snap.data)
        new = with_entry(m, "nats", self.rival(m.subsystems["nats"]))
        store.write_manifest(*sign_manifest(dataclasses.replace(new, serial=m.serial + 1), self.key), snap.token)


def _other_platform(nats):  # type: ignore[no-untyped-def]
    """The same build, released for one more platform."""
    return dataclasses.replace(nats, assets={**nats.assets, "linux/arm64": nats.assets["linux/amd64"]})


def test_another_platform_of_the_same_build_released_meanwhile_merges(ws) -> None:
    key = signing.load_private_key(str(ws.private_key))
    result = release(ws.config(), "nats", store=_RivalDuringUpload(ws.store, ws.tag, key, _other_platform),
                     signing_key=str(ws.private_key), sleep=lambda s: None)
    assert result.attempts == 1
    assert set(_manifest(ws).subsystems["nats"].assets) == {"linux/amd64", "linux/arm64"}


def test_a_release_superseded_while_it_uploads_does_not_overwrite_the_other(ws) -> None:
    key = signing.load_private_key(str(ws.private_key))
    with pytest.raises(DataError, match="nats: another release wrote this entry while this one uploaded"):
        release(ws.config(), "nats", signing_key=str(ws.private_key), store=_RivalDuringUpload(
            ws.store, ws.tag, key, lambda nats: dataclasses.replace(nats, version="v1.0.9")))
    assert _manifest(ws).subsystems["nats"].version == "v1.0.9"  # the other release's entry stands


def _package(ws: Workspace, version: str, platform: str = "linux/amd64") -> None:
    """nats's packaged linux/amd64 asset, relabelled as build *version* (its commit made from it) for
    *platform*; nats's other packages removed."""
    original = ws.root / "nats-linux-amd64.sidecar"
    if not original.exists():
        shutil.copy(ws.dist / "nats-server-linux-amd64.tar.gz.json", original)
    meta = json.loads(original.read_text())
    for side in ws.dist.glob("nats-server-*.tar.gz.json"):
        side.unlink()
    name = f"nats-server-{platform.replace('/', '-')}.tar.gz"
    if name != meta["name"]:
        shutil.copy(ws.dist / meta["name"], ws.dist / name)
    meta.update(platform=platform, name=name, version=version, commit=sha256_bytes(version.encode())[:40])
    (ws.dist / f"{name}.json").write_text(json.dumps(meta))


def test_an_older_build_is_refused_before_anything_is_uploaded(ws) -> None:
    """A late or stale release job (a dispatch finishing after a newer one, a rebuild of an old pin)
    must not take agents back a version; a deliberate rollback says so."""
    _package(ws, "v1.2.0")
    release(ws.config(), "nats", signing_key=str(ws.private_key))
    _package(ws, "v1.1.0")
    assets = _files(ws.release_dir, contains=".tar.gz")
    with pytest.raises(DataError, match=r"older build over a newer one: nats v1.1.0 \(the manifest holds "
                                        r"v1.2.0\).*--allow-downgrade"):
        release(ws.config(), "nats", signing_key=str(ws.private_key))
    assert _files(ws.release_dir, contains=".tar.gz") == assets
    assert _manifest(ws).subsystems["nats"].version == "v1.2.0"

    result = release(ws.config(), "nats", signing_key=str(ws.private_key), allow_downgrade=True)
    assert _manifest(ws).subsystems["nats"].version == "v1.1.0" == result.version


def test_cli_release_refuses_an_older_build_and_allows_a_deliberate_one(ws) -> None:
    _package(ws, "v1.2.0")
    _sync_tools(ws, "release", "--only", "nats")
    _package(ws, "v1.1.0")
    proc = subprocess.run(["sync-tools", "release", "--only", "nats"], cwd=ws.root, env=ws.env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "--allow-downgrade" in proc.stderr and "Traceback" not in proc.stderr
    assert "released nats v1.1.0" in _sync_tools(ws, "release", "--only", "nats", "--allow-downgrade")


def test_platforms_of_a_new_build_released_by_parallel_jobs_all_land(ws) -> None:
    """A per-platform matrix: the arm64 job of the new build writes first, then the amd64 job of the
    same build, which read the manifest while it still held the old build."""
    key = signing.load_private_key(str(ws.private_key))
    _package(ws, "v1.1.0", "linux/arm64")
    release(ws.config(), "nats", signing_key=str(ws.private_key), platforms=["linux/arm64"])
    arm64 = _manifest(ws).subsystems["nats"]
    _package(ws, "v1.1.0", "linux/amd64")
    # roll the store back to the old build, then have the arm64 job land while the amd64 one uploads
    store = LocalStore(ws.store, ws.tag)
    snap = store.read_manifest()
    m = parse_manifest(snap.data)
    old = dataclasses.replace(m.subsystems["nats"], version="v1.0.0", commit="0" * 40)
    store.write_manifest(*sign_manifest(dataclasses.replace(with_entry(m, "nats", old), serial=m.serial + 1), key),
                         snap.token)
    result = release(ws.config(), "nats", signing_key=str(ws.private_key), sleep=lambda s: None,
                     store=_RivalDuringUpload(ws.store, ws.tag, key, lambda nats: arm64),
                     allow_downgrade=True)
    assert result.attempts == 1
    entry = _manifest(ws).subsystems["nats"]
    assert entry.version == "v1.1.0" and set(entry.assets) == {"linux/amd64", "linux/arm64"}


class _BusyOnceStore(LocalStore):
    """Another writer is midway through replacing the manifest at this release's *busy_read*-th look
    (the first look is the check before upload; the second, the read of the write loop)."""

    def __init__(self, path: Path, tag: str, busy_read: int = 2):
        super().__init__(path, tag)
        self.reads, self.busy_read = 0, busy_read

    def read_manifest(self):
        self.reads += 1
        if self.reads == self.busy_read:
            raise ManifestBusy("manifest.json is being replaced by another writer")
        return super().read_manifest()


def test_a_manifest_being_replaced_is_read_again(ws) -> None:
    sleeps: list[float] = []
    result = release(ws.config(), "nats", store=_BusyOnceStore(ws.store, ws.tag), signing_key=str(ws.private_key),
                     sleep=sleeps.append)
    assert result.attempts == 2 and len(sleeps) == 1
    assert _manifest(ws).serial == result.serial


def test_a_manifest_being_replaced_at_the_first_look_is_read_again(ws) -> None:
    sleeps: list[float] = []
    result = release(ws.config(), "nats", store=_BusyOnceStore(ws.store, ws.tag, busy_read=1),
                     signing_key=str(ws.private_key), sleep=sleeps.append)
    assert len(sleeps) == 1 and _manifest(ws).serial == result.serial


def test_refresh_renews_the_expiry_and_changes_nothing_else(ws) -> None:
    before = _manifest(ws)
    assets = _files(ws.release_dir, contains=".tar.gz")
    later = datetime.now(UTC) + timedelta(days=29)
    result = CliRunner().invoke(cli, ["release", "--refresh", "--json", "--config", str(ws.config_path)],
                                env={"SYNC_TOOLS_SIGNING_KEY": str(ws.private_key)})
    assert result.exit_code == 0, result.output
    after = _manifest(ws)
    assert json.loads(result.output) == {"serial": before.serial + 1, "expires": after.expires}
    assert after.serial == before.serial + 1 and after.subsystems == before.subsystems
    assert datetime.fromisoformat(after.expires.replace("Z", "+00:00")) > later
    assert _files(ws.release_dir, contains=".tar.gz") == assets  # no asset touched
    bad = CliRunner().invoke(cli, ["release", "--refresh", "--only", "nats", "--config", str(ws.config_path)])
    assert bad.exit_code == 2 and "--refresh alone" in bad.output


def test_refresh_of_an_empty_store_says_there_is_nothing(tmp_path) -> None:
    ws = make_workspace(tmp_path / "ws", git=False)
    with pytest.raises(DataError, match="nothing released yet"):
        refresh(ws.config(), signing_key=str(ws.private_key))


def test_local_store_compare_and_swap(ws) -> None:
    store = open_store(ws.config())
    assert isinstance(store, LocalStore) and store.dir == ws.release_dir
    snap = store.read_manifest()
    assert snap.token == sha256_bytes(snap.data)
    key = signing.load_private_key(str(ws.private_key))
    new = with_entry(parse_manifest(snap.data), "arc", parse_manifest(snap.data).subsystems["arc"])
    data, sig = sign_manifest(new, key)
    with pytest.raises(ManifestConflict):
        store.write_manifest(data, sig, "0" * 64)
    with pytest.raises(ManifestConflict):
        store.write_manifest(data, sig, None)  # "no manifest yet" is stale too
    store.write_manifest(data, sig, snap.token)
    with pytest.raises(ManifestConflict):
        store.write_manifest(data, sig, snap.token)  # the same token cannot win twice
    assert read_verified(store, key.public_key())[0].serial == new.serial


def test_local_store_assets(ws, tmp_path) -> None:
    store = LocalStore(ws.store, ws.tag)
    assets = store.list_assets()
    assert set(assets) == {"nats-server-linux-amd64.tar.gz", "arc-linux-amd64.tar.gz", "manifest.json",
                           "manifest.json.sig"}
    assert store.asset_url("arc-linux-amd64.tar.gz") == str((ws.release_dir / "arc-linux-amd64.tar.gz").resolve())
    old = (ws.release_dir / "arc-linux-amd64.tar.gz").read_bytes()
    with pytest.raises(IsADirectoryError):
        store.upload_asset(tmp_path, "arc-linux-amd64.tar.gz")  # fails before any byte is copied
    assert (ws.release_dir / "arc-linux-amd64.tar.gz").read_bytes() == old
    assert sorted(os.listdir(ws.release_dir)) == [".manifest.lock", *sorted(assets)]  # no temp files
    for bad in ("../x.tar.gz", ".hidden", "a/b"):
        with pytest.raises(DataError):
            store.upload_asset(ws.dist / "arc-linux-amd64.tar.gz", bad)
    with pytest.raises(ConfigError):
        LocalStore(ws.store, "../up")
    assert LocalStore(tmp_path / "none", "latest").read_manifest().data is None


def test_signature_written_is_base64_of_64_bytes(released) -> None:
    sig = (released.release_dir / "manifest.json.sig").read_bytes()
    assert len(base64.b64decode(sig.strip(), validate=True)) == 64


def test_cli_release_text_and_errors(ws) -> None:
    runner = CliRunner()
    env = {"SYNC_TOOLS_SIGNING_KEY": str(ws.private_key)}
    serial = _manifest(ws).serial
    result = runner.invoke(cli, ["release", "--only", "arc", "--config", str(ws.config_path)], env=env)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("released arc v1.0.0") and f"manifest serial {serial + 1};" in result.output
    missing = runner.invoke(cli, ["release", "--only", "arc", "--platform", "darwin/arm64",
                                  "--config", str(ws.config_path)], env=env)
    assert missing.exit_code == 1 and len(missing.output.strip().splitlines()) == 1


def test_several_subsystems_are_one_manifest_write(ws, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "4242")  # new asset bytes for both
    cfg = ws.config()
    fresh = {n: package(cfg, n, platform="linux/amd64") for n in ("nats", "arc")}
    runner = CliRunner()
    env = {"SYNC_TOOLS_SIGNING_KEY": str(ws.private_key)}
    serial = _manifest(ws).serial
    result = runner.invoke(cli, ["release", "--only", "nats,arc", "--json", "--config", str(ws.config_path)],
                           env=env)
    assert result.exit_code == 0, result.output
    assert [r["serial"] for r in json.loads(result.output)] == [serial + 1, serial + 1]
    m = _manifest(ws)
    assert m.serial == serial + 1
    for name, item in fresh.items():
        assert m.subsystems[name].assets["linux/amd64"].sha256 == item.sha256
        assert (ws.release_dir / item.name).read_bytes() == item.path.read_bytes()


def test_one_subsystem_without_packages_stops_all_before_any_upload(ws, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "4343")
    package(ws.config(), "nats", platform="linux/amd64")
    (ws.dist / "arc-linux-amd64.tar.gz.json").unlink()
    before = _files(ws.release_dir)
    with pytest.raises(DataError, match="arc: nothing packaged"):
        release_many(ws.config(), ["nats", "arc"], signing_key=str(ws.private_key))
    assert _files(ws.release_dir) == before


def test_a_sidecar_naming_another_subsystems_asset_is_refused(ws) -> None:
    """Sidecars come from build legs that run upstream code: nats's must not make its release
    replace arc's asset."""
    arc_assets = _files(ws.release_dir, contains="arc-")
    side = json.loads((ws.dist / "nats-server-linux-amd64.tar.gz.json").read_text())
    shutil.copy(ws.dist / "nats-server-linux-amd64.tar.gz", ws.dist / "arc-linux-arm64.tar.gz")
    (ws.dist / "nats-server-linux-amd64.tar.gz.json").unlink()
    side.update(platform="linux/arm64", name="arc-linux-arm64.tar.gz")
    (ws.dist / "arc-linux-arm64.tar.gz.json").write_text(json.dumps(side))
    with pytest.raises(DataError, match="nats's asset for linux/arm64 must be named nats-server-linux-arm64.tar.gz"):
        release(ws.config(), "nats", signing_key=str(ws.private_key))
    assert _files(ws.release_dir, contains="arc-") == arc_assets


def test_a_wiped_store_starts_above_the_serial_agents_applied(ws) -> None:
    """The release deleted or the store wiped: the next release must not start again from 1, which
    every agent would refuse as a rollback until the serial climbed past theirs."""
    applied = _manifest(ws).serial
    for name in ("manifest.json", "manifest.json.sig"):
        (ws.release_dir / name).unlink()
    result = release(ws.config(), "nats", signing_key=str(ws.private_key))
    assert result.serial >= applied and _manifest(ws).serial == result.serial
    verify_manifest((ws.release_dir / "manifest.json").read_bytes(),
                    (ws.release_dir / "manifest.json.sig").read_bytes(),
                    signing.load_public_key(str(ws.public_key)), min_serial=applied)


def test_a_writer_killed_between_the_two_files_leaves_a_store_the_next_release_builds_on(ws, monkeypatch) -> None:
    """The pair is committed whole first: a crash after the new signature but before the new
    manifest used to leave a pair that never verified again, and every later release refused it."""
    import sync_tools.stores.local as local

    real = local.atomic_write_bytes

    def crash_before_the_manifest(path, data, **kw):  # type: ignore[no-untyped-def]
        if Path(path).name == "manifest.json":
            raise KeyboardInterrupt("killed")
        return real(path, data, **kw)

    monkeypatch.setattr(local, "atomic_write_bytes", crash_before_the_manifest)
    with pytest.raises(KeyboardInterrupt):
        release(ws.config(), "arc", signing_key=str(ws.private_key))
    monkeypatch.setattr(local, "atomic_write_bytes", real)
    assert (ws.release_dir / ".manifest.pending").exists()

    committed, _ = read_verified(LocalStore(ws.store, ws.tag), signing.load_public_key(str(ws.public_key)))
    result = release(ws.config(), "nats", signing_key=str(ws.private_key))
    assert result.serial == committed.serial + 1
    assert _manifest(ws).serial == result.serial  # the files themselves are a verified pair again
    assert not (ws.release_dir / ".manifest.pending").exists()


def test_a_damaged_pending_pair_is_an_error_not_a_manifest(ws) -> None:
    (ws.release_dir / ".manifest.pending").write_bytes(b"99999\nshort")
    with pytest.raises(DataError, match="not a pending manifest pair"):
        LocalStore(ws.store, ws.tag).read_manifest()


def test_a_sidecar_whose_binary_sha256_is_not_the_binary_inside_releases_nothing(ws) -> None:
    """The sidecar's size and sha256 match the archive, but its binary_sha256 (what every agent checks the
    installed binary against) names another binary: released, every agent would refuse the build. It is
    refused before anything in the store changes."""
    cfg = ws.config()
    build(cfg, ["nats"], platform="linux/amd64", env=ws.env())
    package(cfg, "nats", platform="linux/amd64")
    sidecar = ws.dist / "nats-server-linux-amd64.tar.gz.json"
    meta = json.loads(sidecar.read_text())
    meta["binary_sha256"] = "0" * 64
    sidecar.write_text(json.dumps(meta))
    store_before = _files(ws.release_dir)
    with pytest.raises(DataError, match="the binary inside has sha256 .* but its sidecar says 0{64}"):
        release(cfg, "nats", signing_key=str(ws.private_key))
    assert _files(ws.release_dir) == store_before
