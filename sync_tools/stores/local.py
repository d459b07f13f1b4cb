"""The local directory release store: ``<store>/<tag>/`` holding the assets, ``manifest.json`` and
``manifest.json.sig`` under the same names a GitHub release uses.

Assets are replaced with ``os.replace`` (the old file stays until the new one is complete). The
manifest pair is written under an exclusive ``fcntl`` lock on ``<tag>/.manifest.lock`` after checking
that the manifest still hashes to the CAS token the writer read, so two releases racing on one machine
(or on one shared filesystem with working POSIX locks) never lose each other's entry.

The pair is two files, so it is first written whole to ``<tag>/.manifest.pending`` (one atomic
rename: the commit point), then to the two files, and the pending file is removed. A writer killed
between the two files leaves the pending pair, which readers of this store take as the current one
and the next write completes; without it the store held a new signature beside the old manifest,
which no later release would build on.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from sync_tools.errors import ConfigError, DataError, RemoteError
from sync_tools.fsutil import atomic_write_bytes, atomic_writer, read_capped, sha256_bytes
from sync_tools.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, SIGNATURE_NAME
from sync_tools.stores.base import ManifestConflict, Snapshot, Store

log = logging.getLogger(__name__)

LOCK_NAME = ".manifest.lock"
PENDING_NAME = ".manifest.pending"  # b"<len(signature)>\n" + signature + manifest
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_MAX_SIG_BYTES = 4096


class LocalStore(Store):
    """A release kept in a directory: ``LocalStore(<store>, tag)`` uses ``<store>/<tag>/``."""

    def __init__(self, path: str | os.PathLike[str], tag: str = "latest"):
        if not _SAFE_NAME.match(tag):
            raise ConfigError(f"bad release tag {tag!r} for a directory store")
        self.base = Path(path)
        self.tag = tag
        self.dir = self.base / tag

    def __repr__(self) -> str:
        return f"LocalStore({str(self.base)!r}, {self.tag!r})"

    # ---------------------------------------------------------------------------------- helpers

    def _path(self, name: str) -> Path:
        if not _SAFE_NAME.match(name):
            raise DataError(f"unsafe asset name {name!r}")
        return self.dir / name

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _read_pair(self) -> Snapshot:
        pending = self._read_pending()
        if pending is not None:
            data, sig = pending
        else:
            data = read_capped(self.dir / MANIFEST_NAME, MAX_MANIFEST_BYTES, missing_ok=True)
            sig = read_capped(self.dir / SIGNATURE_NAME, _MAX_SIG_BYTES, missing_ok=True)
        return Snapshot(data=data, signature=sig, token=sha256_bytes(data) if data is not None else None)

    def _read_pending(self) -> tuple[bytes, bytes] | None:
        """The pair a writer committed but did not finish writing out, if any. Raises DataError when
        the pending file is not one (it is only ever written whole, by this class)."""
        raw = read_capped(self.dir / PENDING_NAME, MAX_MANIFEST_BYTES + _MAX_SIG_BYTES + 16, missing_ok=True)
        if raw is None:
            return None
        head, sep, rest = raw.partition(b"\n")
        if not sep or not head.isdigit() or len(head) > 5 or int(head) > min(len(rest), _MAX_SIG_BYTES):
            raise DataError(f"{self.dir / PENDING_NAME}: not a pending manifest pair")
        n = int(head)
        return rest[n:], rest[:n]

    # ------------------------------------------------------------------------------- the interface

    def ensure_release(self) -> None:
        """Create ``<store>/<tag>/`` if missing. Idempotent."""
        self.dir.mkdir(parents=True, exist_ok=True)

    def read_manifest(self) -> Snapshot:
        """The manifest pair, read under a shared lock so a concurrent writer cannot tear it."""
        if not self.dir.is_dir():
            return Snapshot(None, None, None)
        with self._locked(exclusive=False):
            return self._read_pair()

    def write_manifest(self, data: bytes, signature: bytes, expected_token: str | None) -> None:
        """Replace the manifest pair if the manifest still hashes to *expected_token* (None: absent).

        Raises ManifestConflict otherwise. The pair is committed to the pending file first (see the
        module's docstring), then the signature is written, then the manifest: a reader of the files
        without the lock sees either the old pair, or the new signature with the old manifest (which
        fails to verify and is retried), never an unsigned new manifest.
        """
        with self._locked(exclusive=True):
            current = self._read_pair()
            if current.token != expected_token:
                raise ManifestConflict(
                    f"{self.dir / MANIFEST_NAME} changed since it was read "
                    f"(expected {expected_token or 'none'}, found {current.token or 'none'})")
            pending = self.dir / PENDING_NAME
            atomic_write_bytes(pending, b"%d\n" % len(signature) + signature + data, mode=0o644)
            atomic_write_bytes(self.dir / SIGNATURE_NAME, signature, mode=0o644)
            atomic_write_bytes(self.dir / MANIFEST_NAME, data, mode=0o644)
            pending.unlink()
        log.info("wrote %s (sha256 %s)", self.dir / MANIFEST_NAME, sha256_bytes(data))

    def upload_asset(self, path: Path, name: str) -> None:
        """Copy *path* to ``<tag>/<name>`` through a temporary file and ``os.replace``: until the copy
        is complete and fsynced the old asset stays in place."""
        target = self._path(name)
        self.ensure_release()
        with open(path, "rb") as src, atomic_writer(target, mode=0o644) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        log.info("stored %s (%d bytes)", target, target.stat().st_size)

    def list_assets(self) -> dict[str, int]:
        """Every visible file of the release (assets, manifest.json and its .sig) -> size."""
        if not self.dir.is_dir():
            return {}
        out = {}
        for entry in os.scandir(self.dir):
            if entry.is_file(follow_symlinks=False) and not entry.name.startswith("."):
                out[entry.name] = entry.stat(follow_symlinks=False).st_size
        return dict(sorted(out.items()))

    def download_asset(self, name: str, out: BinaryIO, *, max_bytes: int) -> int:
        """Copy ``<tag>/<name>`` to *out*. Raises RemoteError (404) when missing, DataError over *max_bytes*."""
        try:
            src = open(self._path(name), "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError as e:
            raise RemoteError(f"{self.dir / name}: no such asset", status_code=404) from e
        done = 0
        with src:
            while chunk := src.read(1 << 20):
                done += len(chunk)
                if done > max_bytes:
                    raise DataError(f"{self.dir / name}: over the {max_bytes}-byte cap")
                out.write(chunk)
        return done

    def delete_asset(self, name: str) -> None:
        """Remove ``<tag>/<name>``; a missing one is fine."""
        if name in (MANIFEST_NAME, SIGNATURE_NAME):
            raise DataError(f"{name!r} is reserved; the manifest pair is written by write_manifest")
        self._path(name).unlink(missing_ok=True)
        log.info("deleted %s", self.dir / name)

    def asset_url(self, name: str) -> str:
        """The asset's absolute path (agents read a local store directly)."""
        return str(self._path(name).resolve())
