"""Releasing one subsystem: upload its packaged assets, then re-sign the manifest with only its entry
changed.

The manifest update is an optimistic read-verify-modify-sign-write loop: read the current
``manifest.json`` + ``.sig``, verify them with the pinned public key (a store whose manifest does not
verify is an error, never silently overwritten), replace only this subsystem's entry
(:func:`sync_tools.manifest.with_entry`: serial + 1, expiry renewed), sign, and write with the CAS
token that was read. When another release got there first (:class:`ManifestConflict`) the loop reads
again and redoes the change, after a short random pause so racing jobs spread out.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sync_tools import patches, signing
from sync_tools.config import Config
from sync_tools.errors import ConfigError, DataError, RemoteError, SignatureError
from sync_tools.fsutil import sha256_file
from sync_tools.manifest import (
    Asset,
    Entry,
    Manifest,
    Patch,
    empty_manifest,
    parse_manifest,
    parse_time,
    renewed,
    sign_manifest,
    with_entry,
)
from sync_tools.package import DIST_DIR, Packaged, read_packaged
from sync_tools.stores.base import ManifestBusy, ManifestConflict, Snapshot, Store, open_store
from sync_tools.versions import later

log = logging.getLogger(__name__)

DEFAULT_ATTEMPTS = 12


@dataclass(frozen=True)
class ReleaseResult:
    subsystem: str
    version: str
    commit: str
    serial: int
    assets: tuple[Packaged, ...]
    attempts: int
    store: str
    patches: dict[str, tuple[Patch, ...]] = dataclasses.field(default_factory=dict)  # platform -> published
    skipped: str | None = None  # why it was not released (an older build than the manifest's); None: released

    def to_json(self) -> dict[str, Any]:
        return {
            "subsystem": self.subsystem, "version": self.version, "commit": self.commit,
            "serial": self.serial, "attempts": self.attempts, "store": self.store, "skipped": self.skipped,
            "assets": {p.platform: {"name": p.name, "size": p.size, "sha256": p.sha256,
                                    "binary_sha256": p.binary_sha256,
                                    "patches": [x.to_json() for x in self.patches.get(p.platform, ())]}
                       for p in self.assets},
        }


def release_keys(config: Config, signing_key: str | bytes | None = None
                 ) -> tuple[Ed25519PrivateKey, Ed25519PublicKey]:
    """The signing key (*signing_key*, else ``$SYNC_TOOLS_SIGNING_KEY``: a path or the PEM) and the
    pinned public key (``release.public_key``; the signing key's own when none is configured).

    Raises ConfigError when either cannot be loaded or they do not belong together (a manifest signed
    with a key agents do not pin would be refused by every agent).
    """
    private = signing.load_private_key(signing_key)
    if not config.release.public_key:
        log.warning("release.public_key is not set: verifying the store with the signing key's own public key")
        return private, private.public_key()
    pub_path = config.resolve(config.release.public_key)
    assert pub_path is not None
    public = signing.load_public_key(str(pub_path))
    if signing.public_key_pem(private) != signing.public_key_pem(public):
        raise ConfigError("the signing key does not belong to release.public_key; agents would refuse "
                          "the manifest", path=pub_path)
    return private, public


def read_verified(store: Store, public_key: Ed25519PublicKey) -> tuple[Manifest, Snapshot]:
    """The store's current manifest, verified with *public_key*, and the snapshot it came from.

    No manifest yet gives :func:`~sync_tools.manifest.empty_manifest`. Expiry is not checked: an old
    manifest is still the right base for the next release. Raises SignatureError and ManifestError.
    """
    snap = store.read_manifest()
    if snap.data is None:
        return empty_manifest(), snap
    if snap.signature is None:
        raise SignatureError(f"{store!r}: manifest.json has no manifest.json.sig; refusing to build on it")
    try:
        signing.verify(snap.data, snap.signature, public_key)
    except SignatureError as e:
        raise SignatureError(f"{store!r}: the current manifest.json does not verify with the pinned "
                             f"public key; refusing to overwrite it ({e})") from e
    return parse_manifest(snap.data), snap


def entry_for(items: Sequence[Packaged], binary: str | None) -> Entry:
    """The manifest entry for one subsystem's packaged assets. Raises DataError when they disagree on
    version or commit (two builds mixed in one .dist)."""
    versions = {(p.version, p.commit) for p in items}
    if len(versions) != 1:
        raise DataError(f"{items[0].subsystem}: .dist holds assets of different builds: "
                        + ", ".join(f"{v}@{c[:12]}" for v, c in sorted(versions)))
    version, commit = versions.pop()
    return Entry(version=version, commit=commit, built=max(p.built for p in items),
                 assets=MappingProxyType({p.platform: p.asset() for p in items}), binary=binary)


def _built_no_later(new: Entry, held: Entry) -> bool:
    """Whether *new* is another build than *held* that the versions cannot tell newer (both ``main``,
    a branch pin's, or the same tag rebuilt from another commit) and that was not built after it.
    A tie counts as older: putting an older commit back over a newer one is what must not happen."""
    if new.commit == held.commit or later(new.version, held.version) or later(held.version, new.version):
        return False
    return parse_time(new.built, "built") <= parse_time(held.built, "built")


def release(
    config: Config,
    name: str,
    *,
    store: Store | None = None,
    dist: Path | None = None,
    platforms: Iterable[str] | None = None,
    signing_key: str | bytes | None = None,
    attempts: int = DEFAULT_ATTEMPTS,
    sleep: Callable[[float], None] = time.sleep,
    now: datetime | None = None,
    allow_downgrade: bool = False,
    patch_from: int = patches.DEFAULT_FROM,
) -> ReleaseResult:
    """Release subsystem *name*: upload its packaged assets from *dist* (default ``.dist``), then put
    its entry into the signed manifest, leaving every other entry as it was.

    Raises ConfigError (unknown subsystem, keys), DataError (nothing packaged, an asset differs from
    its sidecar, the store's manifest does not verify, the manifest already holds a newer version
    and *allow_downgrade* is not set), RemoteError (store I/O) and ManifestConflict when *attempts*
    read-modify-write rounds all lost a race.

    Each asset it replaces also gets patches from the binaries of up to *patch_from* earlier builds
    (0: none), see :func:`release_many`.
    """
    [result] = release_many(config, [name], store=store, dist=dist, platforms=platforms,
                            signing_key=signing_key, attempts=attempts, sleep=sleep, now=now,
                            allow_downgrade=allow_downgrade, patch_from=patch_from)
    return result


def release_many(
    config: Config,
    names: Sequence[str],
    *,
    store: Store | None = None,
    dist: Path | None = None,
    platforms: Iterable[str] | None = None,
    signing_key: str | bytes | None = None,
    attempts: int = DEFAULT_ATTEMPTS,
    sleep: Callable[[float], None] = time.sleep,
    now: datetime | None = None,
    allow_downgrade: bool = False,
    patch_from: int = patches.DEFAULT_FROM,
) -> list[ReleaseResult]:
    """Release several subsystems with one manifest write: every asset is uploaded first, then all
    their entries go into the manifest together (serial + 1 once, one signature), every other entry
    left as it was. Nothing is uploaded unless every named subsystem has packaged assets.

    A build older than the one the manifest holds is refused unless *allow_downgrade* (a deliberate
    rollback): a late or stale release job must not take agents back a version. Among several names,
    the refused ones are skipped (logged, and returned with ``skipped`` saying why, nothing of theirs
    uploaded) and the others released; DataError only when every one is refused.

    Patches (issue #17): for each asset it replaces, patches from the binaries of up to *patch_from*
    earlier builds (the one the manifest names now, then the ones its patches start from) to the new
    binary are made, and each not over :data:`~sync_tools.patches.MAX_SHARE` of the full asset is
    uploaded beside it (after it) and listed in the asset's ``patches``. The asset being replaced stays in the
    store as a base (``<stem>.base-<sha>.tar.gz``) while a listed patch starts from it, so the next
    release can make patches from it too; once the manifest is written, patches and bases of the asset
    that the new entry no longer lists are deleted. A patch that cannot
    be made or uploaded is left out (logged): it never blocks a release. Making them is bounded: all
    the patches of a release share :data:`~sync_tools.patches.MAKE_BUDGET` seconds, every asset's patch
    from the current build first, and a binary over :data:`~sync_tools.patches.MAX_MAKE_BYTES` gets
    none; past either the assets go out as full downloads only, with a warning line saying so.

    Raises what :func:`release` raises.
    """
    if attempts < 1:
        raise ConfigError(f"attempts must be at least 1, not {attempts}")
    if not names:
        raise ConfigError("name the subsystems to release (--only NAME[,NAME])")
    dist = dist or config.root / DIST_DIR
    wanted = list(platforms) if platforms else None
    packaged: dict[str, tuple[Packaged, ...]] = {}
    entries: dict[str, Entry] = {}
    for name in dict.fromkeys(names):
        sub = config.subsystem(name)
        items = read_packaged(dist, name, wanted, binary=sub.binary)
        if not items:
            where = f" for {', '.join(wanted)}" if wanted else ""
            raise DataError(f"{name}: nothing packaged in {dist}{where}; run: sync-tools package --only {name}")
        packaged[name] = tuple(items)
        # path: where the platform runs it under .bin when not right there (grafana: bin/grafana-server),
        # for agents whose config does not list the subsystem
        folder = sub.bin_path.rpartition("/")[0]  # where binary_path() puts it: bin_path's folder, the binary's name
        entries[name] = dataclasses.replace(entry_for(items, sub.binary), rollout=sub.rollout,
                                            path=f"{folder}/{sub.binary}" if folder else None)
    label = ",".join(entries)
    private, public = release_keys(config, signing_key)
    store = store or open_store(config)

    def build_of(entry: Entry | None) -> tuple[str, str] | None:
        return None if entry is None else (entry.version, entry.commit)

    def older_than_held(base: Manifest) -> dict[str, str]:
        if allow_downgrade:
            return {}
        older: dict[str, str] = {}
        for n, e in entries.items():
            held = base.subsystems.get(n)
            if held is not None and later(held.version, e.version):
                older[n] = f"{n} {e.version} (the manifest holds {held.version})"
            elif held is not None and _built_no_later(e, held):
                older[n] = (f"{n} {e.version}@{e.commit[:12]} built {e.built} (the manifest holds "
                            f"{held.version}@{held.commit[:12]} built {held.built})")
        return older

    def refuse_older(base: Manifest) -> None:
        if older := older_than_held(base):
            raise DataError(f"not releasing an older build over a newer one: {'; '.join(older.values())}; "
                            "pass --allow-downgrade to roll back on purpose")

    store.ensure_release()
    # Verify and compare before uploading: a tampered store, or a newer build already released, is
    # refused before anything in the store changes. Among several, the refused ones are left out (a
    # rebuild of every pin after a dispatch moved one past its pin still releases the others).
    first, _ = _read_retrying(store, public, label=label, attempts=attempts, sleep=sleep)
    older = older_than_held(first)
    if len(older) == len(entries):
        refuse_older(first)
    skipped: dict[str, tuple[Entry, str]] = {}  # name -> (its entry, why)
    for name, why in older.items():
        why = f"not releasing an older build over a newer one: {why}; pass --allow-downgrade to roll it back"
        log.warning("%s: skipped, the others are released: %s", name, why)
        skipped[name] = (entries.pop(name), why)
        del packaged[name]
    label = ",".join(entries)
    before = {name: first.subsystems.get(name) for name in entries}
    made: dict[str, dict[str, tuple[Patch, ...]]] = {name: {} for name in entries}
    with tempfile.TemporaryDirectory(prefix="sync-tools-release-") as tmp:
        for items in packaged.values():  # before any asset goes up; the binaries stay for the patches
            for item in items:
                _check_binary_inside(item, Path(tmp) / item.name / "new")
        jobs = [(name, item, before[name].assets.get(item.platform) if before[name] is not None else None)
                for name, items in packaged.items() for item in items]
        # made (and their bases fetched) before the full assets replace the ones they start from;
        # uploaded after them, so an optional patch never stands in the way of the release itself
        pending = _make_patches(store, jobs, Path(tmp), patch_from)
        for items in packaged.values():
            for item in items:
                store.upload_asset(item.path, item.name)
                log.info("uploaded %s", item.name)
        for (name, platform), todo in pending.items():
            made[name][platform] = _upload_patches(store, todo)
    for name, by_platform in made.items():
        assets = {p: dataclasses.replace(a, patches=by_platform.get(p, ())) for p, a in entries[name].assets.items()}
        entries[name] = dataclasses.replace(entries[name], assets=MappingProxyType(assets))

    def change(base: Manifest) -> Manifest:
        # Another release put a different build of the same subsystem in after our first read. (The
        # same build as ours, released alongside for other platforms, merges as usual.)
        superseded = [n for n in entries
                      if build_of(base.subsystems.get(n)) not in (build_of(before[n]), build_of(entries[n]))]
        if superseded:
            # Its assets and ours have the same names and ours were uploaded last: writing our entry
            # now could put back an older build, and not writing it leaves its entry naming our files.
            # Agents refuse the mismatch (the sha256 differs), so nothing wrong gets installed; the
            # next release of the subsystem puts the pair right.
            raise DataError(f"{', '.join(superseded)}: another release wrote "
                            f"{'this entry' if len(superseded) == 1 else 'these entries'} while this one "
                            f"uploaded (manifest serial {base.serial}), so the uploaded assets may no longer "
                            "match the manifest; agents refuse them until the next release: release "
                            "the newest build again")
        refuse_older(base)
        new = base
        for name, entry in entries.items():
            new = with_entry(new, name, entry, now=now, expires_days=config.release.expires_days)
        return dataclasses.replace(new, serial=next_serial(base, now))  # one write, one serial step

    new, attempt = _write_manifest(store, public, private, change, label=label, attempts=attempts, sleep=sleep)
    log.info("released %s: manifest serial %d", label, new.serial)
    for name, items in packaged.items():
        for item in items:
            _prune_patches(store, new.subsystems[name].assets.get(item.platform), item.name)
    results = {name: ReleaseResult(subsystem=name, version=entry.version, commit=entry.commit, serial=new.serial,
                                   assets=packaged[name], attempts=attempt, store=repr(store), patches=made[name])
               for name, entry in entries.items()}
    results.update({name: ReleaseResult(subsystem=name, version=entry.version, commit=entry.commit,
                                        serial=new.serial, assets=(), attempts=attempt, store=repr(store),
                                        skipped=why)
                    for name, (entry, why) in skipped.items()})
    return [results[name] for name in dict.fromkeys(names)]


def _check_binary_inside(item: Packaged, out: Path) -> None:
    """Extract *item*'s binary to *out* (where :func:`_make_patches` takes it from) and check it is the
    one its sidecar names (``binary_sha256``, which every agent checks the binary it installs against):
    a sidecar that says otherwise (edited, or written for another build) would publish a manifest every
    agent refuses. Raises DataError; the caller runs it before any asset is uploaded."""
    from sync_tools.agent.extract import extract_binary

    out.parent.mkdir(parents=True, exist_ok=True)
    sha = extract_binary(item.path, item.binary, out, max_bytes=_MAX_BASE_BYTES)
    if sha != item.binary_sha256:
        raise DataError(f"{item.path}: the binary inside has sha256 {sha}, but its sidecar says {item.binary_sha256} "
                        f"(agents would refuse it); package it again: sync-tools package --only {item.subsystem}")


#: A patch made and not yet uploaded: the patch, its file, and the archive to keep as its base with the
#: base's name (None: nothing to upload, as for the patches of the same build the store holds already).
_Pending = tuple[Patch, Path | None, tuple[Path, str] | None]


def _make_patches(store: Store, jobs: Sequence[tuple[str, Packaged, Asset | None]], tmp: Path, keep: int
                  ) -> dict[tuple[str, str], list[_Pending]]:
    """Make the patches of each ``(subsystem, packaged asset, the asset the manifest names now for its
    platform or None)`` in *jobs* from up to *keep* earlier builds, fetching the bases they start from;
    return them per ``(subsystem, platform)``, for :func:`_upload_patches`. Each new binary is at
    ``tmp/<asset name>/new`` already (:func:`_check_binary_inside`).

    All of them together get :data:`~sync_tools.patches.MAKE_BUDGET` seconds, spent in rounds: every
    asset's patch from the current build (the one most of the fleet runs), then every asset's from the
    build before, and so on. Past the budget no more are made, and a binary over
    :data:`~sync_tools.patches.MAX_MAKE_BYTES` gets none. A patch that cannot be made is left out. Each
    is a warning line; the release always goes on, with those assets as full downloads only."""
    deadline = time.monotonic() + patches.MAKE_BUDGET
    out: dict[tuple[str, str], list[_Pending]] = {}
    plans: list[tuple[tuple[str, str], Packaged, Asset | None, list[str], Path]] = []
    for name, item, prev in jobs:
        key = (name, item.platform)
        out[key] = []
        if keep <= 0:
            continue
        if prev is not None and prev.binary_sha256 == item.binary_sha256:
            out[key] = [(p, None, None) for p in prev.patches]  # the same build again: they are in the store
            continue
        wanted = [] if prev is None else [prev.binary_sha256, *(p.from_sha for p in prev.patches)]
        froms = [sha for sha in dict.fromkeys(wanted) if sha != item.binary_sha256][:keep]
        work = tmp / item.name
        if froms and (work / "new").stat().st_size > patches.MAX_MAKE_BYTES:
            log.warning("%s: no patches: its binary is %d bytes, over the %d-byte limit for making patches "
                        "(full asset only)", item.name, (work / "new").stat().st_size, patches.MAX_MAKE_BYTES)
            continue
        if froms:
            plans.append((key, item, prev, froms, work))
    listing = store.list_assets() if plans else {}
    todo = [(r, plan) for r in range(keep) for plan in plans if r < len(plan[3])]  # round by round
    for i, (r, (key, item, prev, froms, work)) in enumerate(todo):
        if time.monotonic() >= deadline:
            log.warning("the release's time for making patches (%gs) is spent: %d not made (%s); those go "
                        "out as full downloads only", patches.MAKE_BUDGET, len(todo) - i,
                        ", ".join(f"{t[1].name} from {t[3][n][:12]}" for n, t in todo[i:]))
            break
        made = _make_patch(store, listing, item, prev, froms[r], work, deadline)
        if made is not None:
            out[key].append(made)
    return out


def _make_patch(store: Store, listing: dict[str, int], item: Packaged, prev: Asset | None, sha: str,
                work: Path, deadline: float) -> _Pending | None:
    """Make *item*'s patch from the binary *sha* (the new binary is ``work/new``) within *deadline*. None
    (logged) when it is not made or over :data:`~sync_tools.patches.MAX_SHARE`."""
    try:
        base = _base_binary(store, listing, item, prev, sha, work)
        if base is None:
            return None
        old_bin, archive, from_full = base
        pname = patches.patch_name(item.name, sha, item.binary_sha256)
        ppath = work / pname
        size = patches.make_patch(old_bin, work / "new", ppath,
                                  timeout=min(patches.MAKE_TIMEOUT, deadline - time.monotonic()))
    except (DataError, RemoteError, OSError) as e:
        log.warning("%s: no patch from %s: %s", item.name, sha[:12], e)
        return None
    finally:
        (work / sha).unlink(missing_ok=True)  # the old binary: a large one need not wait for the rest
    share = size / max(1, item.size)
    if share > patches.MAX_SHARE:
        log.info("%s: the patch from %s is %.0f%% of the full asset; not published", item.name, sha[:12],
                 share * 100)
        return None
    patch = Patch(from_sha=sha, name=pname, size=size, sha256=sha256_file(ppath), format=patches.FORMAT)
    # the build being replaced: its asset stays in the store as a base for later patches
    return patch, ppath, (archive, patches.base_name(item.name, sha)) if from_full else None


def _upload_patches(store: Store, todo: Sequence[_Pending]) -> tuple[Patch, ...]:
    """Upload each made patch, and the base it starts from where that is the asset being replaced; return
    the patches to list. One whose upload (or its base's) fails is left out (logged): what did get
    there is pruned once the manifest is written."""
    out = []
    for patch, ppath, base in todo:
        try:
            if base is not None:
                store.upload_asset(*base)
            if ppath is not None:
                store.upload_asset(ppath, patch.name)
        except (DataError, RemoteError, OSError) as e:
            log.warning("%s: left out, its upload failed: %s", patch.name, e)
            continue
        if ppath is not None:
            log.info("uploaded %s (%d bytes)", patch.name, patch.size)
        out.append(patch)
    return tuple(out)


_MAX_BASE_BYTES = 2 << 30


def _base_binary(store: Store, listing: dict[str, int], item: Packaged, prev: Asset | None, sha: str,
                 work: Path) -> tuple[Path, Path, bool] | None:
    """The binary whose sha256 is *sha*, its archive, and whether that came from the full asset: from its
    base copy in the store or, for the build the manifest names now, from its full asset (verified
    against the manifest). None when the store has neither. Raises DataError, RemoteError, OSError."""
    from sync_tools.agent.extract import extract_binary

    name = patches.base_name(item.name, sha)
    from_full = name not in listing
    if from_full:
        if prev is None or prev.binary_sha256 != sha or prev.name not in listing:
            log.info("%s: no base for %s in the store; no patch from it", item.name, sha[:12])
            return None
        name = prev.name
    archive = work / f"{sha}.tar.gz"
    with open(archive, "wb") as fh:
        store.download_asset(name, fh, max_bytes=_MAX_BASE_BYTES)
    if from_full and prev is not None and sha256_file(archive) != prev.sha256:
        raise DataError(f"{name} in the store is not the asset the manifest names")
    old_bin = work / sha
    old_bin.unlink(missing_ok=True)
    got = extract_binary(archive, item.binary, old_bin, max_bytes=_MAX_BASE_BYTES)
    if got != sha:
        old_bin.unlink(missing_ok=True)
        raise DataError(f"{name} holds a binary with sha256 {got}, not {sha}")
    return old_bin, archive, from_full


def _prune_patches(store: Store, asset: Asset | None, asset_name: str) -> None:
    """Delete *asset_name*'s patches the manifest no longer lists and the bases none of them starts from
    (the next release makes its patches from those and from the current asset). Best effort: logged,
    never raised."""
    listed = {p.name for p in asset.patches} if asset is not None else set()
    keep_bases = {patches.base_name(asset_name, p.from_sha) for p in asset.patches} if asset is not None else set()
    try:
        for name in store.list_assets():
            if (patches.is_patch_of(name, asset_name) and name not in listed) or \
                    (patches.is_base_of(name, asset_name) and name not in keep_bases):
                store.delete_asset(name)
    except (DataError, RemoteError, OSError) as e:
        log.warning("%s: pruning old patches failed (the next release tries again): %s", asset_name, e)


def next_serial(base: Manifest, now: datetime | None = None) -> int:
    """The serial of the manifest written over *base*: one more, except that a store with no manifest
    (serial 0) starts at the current Unix time. Agents refuse a serial lower than the one they last
    applied, so a release deleted or a store wiped and written again from 1 would be refused by every
    agent until it had climbed past their serial; the clock is far ahead of any count of releases."""
    if base.serial == 0 and not base.subsystems:
        return max(1, int((now or datetime.now(UTC)).timestamp()))
    return base.serial + 1


def refresh(
    config: Config,
    *,
    store: Store | None = None,
    signing_key: str | bytes | None = None,
    attempts: int = DEFAULT_ATTEMPTS,
    sleep: Callable[[float], None] = time.sleep,
    now: datetime | None = None,
) -> Manifest:
    """Re-sign the current manifest with its expiry renewed and serial + 1, every entry and asset as
    it was. Agents refuse an expired manifest (a freeze attack looks just like that), so a release
    store whose upstreams are quiet for ``release.expires_days`` needs this on a schedule (the
    workflow runs it weekly). Returns the manifest written.

    Raises DataError when nothing was released yet, and what :func:`release` raises.
    """
    private, public = release_keys(config, signing_key)
    store = store or open_store(config)

    def change(base: Manifest) -> Manifest:
        if base.serial == 0 and not base.subsystems:
            raise DataError(f"{store!r}: nothing released yet, so nothing to refresh")
        return renewed(base, now=now, expires_days=config.release.expires_days)

    new, _ = _write_manifest(store, public, private, change, label="refresh", attempts=attempts, sleep=sleep)
    log.info("refreshed the manifest: serial %d, expires %s", new.serial, new.expires)
    return new


def _read_retrying(store: Store, public: Ed25519PublicKey, *, label: str, attempts: int,
                   sleep: Callable[[float], None]) -> tuple[Manifest, Snapshot]:
    """:func:`read_verified`, read again after a pause while another writer is midway through its
    write (ManifestBusy), as :func:`_write_manifest` does. Raises ManifestConflict after *attempts*."""
    for attempt in range(1, attempts + 1):
        try:
            return read_verified(store, public)
        except ManifestBusy as e:
            if attempt == attempts:
                raise ManifestConflict(f"{label}: the manifest stayed midway through another write; gave "
                                       f"up after {attempts} attempts ({e})") from e
            sleep(_backoff(attempt))
    raise AssertionError("unreachable: the loop returns or raises")


def _backoff(attempt: int) -> float:
    return min(2.0, 0.05 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)  # noqa: S311 - jitter


def _write_manifest(store: Store, public: Ed25519PublicKey, private: Ed25519PrivateKey,
                    change: Callable[[Manifest], Manifest], *, label: str, attempts: int,
                    sleep: Callable[[float], None]) -> tuple[Manifest, int]:
    """Read the verified manifest, apply *change*, sign and write it with compare-and-swap; read again
    and redo the change when another writer got there first or is midway through its write. Returns
    the manifest written and the attempt that wrote it; raises ManifestConflict after *attempts*."""
    if attempts < 1:
        raise ConfigError(f"attempts must be at least 1, not {attempts}")
    for attempt in range(1, attempts + 1):
        try:
            base, snap = read_verified(store, public)
            new = change(base)
            data, sig = sign_manifest(new, private)
            parse_manifest(data)  # never sign what no agent, and no later release, could read back
            store.write_manifest(data, sig, snap.token)
        except (ManifestConflict, ManifestBusy) as e:
            if attempt == attempts:
                raise ManifestConflict(f"{label}: the manifest kept changing; gave up after {attempts} "
                                       f"attempts ({e})") from e
            delay = _backoff(attempt)
            log.info("manifest changed under %s (attempt %d); retrying in %.2fs", label, attempt, delay)
            sleep(delay)
            continue
        return new, attempt
    raise AssertionError("unreachable: the loop returns or raises")
