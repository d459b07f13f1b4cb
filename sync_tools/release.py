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
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sync_tools import signing
from sync_tools.config import Config
from sync_tools.errors import ConfigError, DataError, SignatureError
from sync_tools.manifest import (
    Entry,
    Manifest,
    empty_manifest,
    parse_manifest,
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

    def to_json(self) -> dict[str, Any]:
        return {
            "subsystem": self.subsystem, "version": self.version, "commit": self.commit,
            "serial": self.serial, "attempts": self.attempts, "store": self.store,
            "assets": {p.platform: {"name": p.name, "size": p.size, "sha256": p.sha256,
                                    "binary_sha256": p.binary_sha256} for p in self.assets},
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
) -> ReleaseResult:
    """Release subsystem *name*: upload its packaged assets from *dist* (default ``.dist``), then put
    its entry into the signed manifest, leaving every other entry as it was.

    Raises ConfigError (unknown subsystem, keys), DataError (nothing packaged, an asset differs from
    its sidecar, the store's manifest does not verify, the manifest already holds a newer version
    and *allow_downgrade* is not set), RemoteError (store I/O) and ManifestConflict when *attempts*
    read-modify-write rounds all lost a race.
    """
    [result] = release_many(config, [name], store=store, dist=dist, platforms=platforms,
                            signing_key=signing_key, attempts=attempts, sleep=sleep, now=now,
                            allow_downgrade=allow_downgrade)
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
) -> list[ReleaseResult]:
    """Release several subsystems with one manifest write: every asset is uploaded first, then all
    their entries go into the manifest together (serial + 1 once, one signature), every other entry
    left as it was. Nothing is uploaded unless every named subsystem has packaged assets.

    A build older than the one the manifest holds is refused unless *allow_downgrade* (a deliberate
    rollback): a late or stale release job must not take agents back a version.

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
        entries[name] = dataclasses.replace(entry_for(items, sub.binary), rollout=sub.rollout)
    label = ",".join(entries)
    private, public = release_keys(config, signing_key)
    store = store or open_store(config)

    def build_of(entry: Entry | None) -> tuple[str, str] | None:
        return None if entry is None else (entry.version, entry.commit)

    def refuse_older(base: Manifest) -> None:
        if allow_downgrade:
            return
        older = [f"{n} {e.version} (the manifest holds {base.subsystems[n].version})"
                 for n, e in entries.items()
                 if n in base.subsystems and later(base.subsystems[n].version, e.version)]
        if older:
            raise DataError(f"not releasing an older build over a newer one: {'; '.join(older)}; "
                            "pass --allow-downgrade to roll back on purpose")

    store.ensure_release()
    # Verify and compare before uploading: a tampered store, or a newer build already released, is
    # refused before anything in the store changes.
    first, _ = _read_retrying(store, public, label=label, attempts=attempts, sleep=sleep)
    refuse_older(first)
    before = {name: first.subsystems.get(name) for name in entries}
    for items in packaged.values():
        for item in items:
            store.upload_asset(item.path, item.name)
            log.info("uploaded %s", item.name)

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
    return [ReleaseResult(subsystem=name, version=entry.version, commit=entry.commit, serial=new.serial,
                          assets=packaged[name], attempts=attempt, store=repr(store))
            for name, entry in entries.items()]


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
