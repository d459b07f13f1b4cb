"""Reproducible release assets: ``.dist/<binary>-<os>-<arch>.tar.gz`` plus a ``.json`` sidecar.

The tarball holds the binary at its root, mode 0755, owner 0:0 with empty owner names, mtime from
``SOURCE_DATE_EPOCH`` (else the source commit's time, else 0), in USTAR format (no pax headers with
wall-clock times), gzip with header mtime 0 and no file name: the same binary gives the same bytes.

The sidecar ``.dist/<asset>.json`` records what the asset is (subsystem, platform, version, commit,
built, binary, size, sha256, binary_sha256), so ``release`` can run on another machine after the
``.dist`` directory was carried there (e.g. upload-artifact / download-artifact in Actions).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sync_tools import binfmt
from sync_tools.build import parse_platform, source_commit
from sync_tools.config import Config
from sync_tools.errors import BuildError, ConfigError, DataError
from sync_tools.fsutil import atomic_write_bytes, atomic_writer, read_capped, sha256_file
from sync_tools.manifest import Asset, asset_name
from sync_tools.versionfile import read_installed

log = logging.getLogger(__name__)

DIST_DIR = ".dist"
SIDECAR_SUFFIX = ".json"
_MAX_SIDECAR = 64 * 1024
_SIDECAR_KEYS = ("subsystem", "platform", "version", "commit", "built", "binary", "name", "size", "sha256",
                 "binary_sha256")


@dataclass(frozen=True)
class Packaged:
    """One packaged asset and what it holds (the sidecar's content)."""

    subsystem: str
    platform: str
    version: str
    commit: str
    built: str
    binary: str
    name: str
    size: int
    sha256: str
    binary_sha256: str
    path: Path  # the tarball

    def asset(self) -> Asset:
        return Asset(name=self.name, size=self.size, sha256=self.sha256, binary_sha256=self.binary_sha256)

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _SIDECAR_KEYS}

    @property
    def sidecar(self) -> Path:
        return self.path.with_name(self.name + SIDECAR_SUFFIX)


def source_date_epoch(env: dict[str, str] | None = None) -> int | None:
    """``$SOURCE_DATE_EPOCH`` as an int, None when unset. Raises ConfigError when it is not a number."""
    value = (os.environ if env is None else env).get("SOURCE_DATE_EPOCH")
    if not value:
        return None
    try:
        epoch = int(value)
    except ValueError as e:
        raise ConfigError(f"SOURCE_DATE_EPOCH must be whole seconds since 1970, not {value!r}") from e
    if epoch < 0:
        raise ConfigError("SOURCE_DATE_EPOCH must not be negative")
    if epoch >= 8**11:  # the tar header's 11 octal digits (year 6325): a value in milliseconds, most likely
        raise ConfigError(f"SOURCE_DATE_EPOCH {value} is past what a tar header holds: seconds, not milliseconds?")
    return epoch


def write_tarball(out: Path, files: Iterable[tuple[str, Path]], mtime: int) -> None:
    """Write a reproducible ``.tar.gz`` of *files* (archive name, source path) to *out*, atomically.

    Entries are sorted by name; each is a regular file with mode 0755, uid/gid 0, no owner names.
    """
    with atomic_writer(out, mode=0o644) as raw:
        # filename="" keeps the temp file's name out of the gzip header; mtime=0 fixes the header time.
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                for arcname, src in sorted(files):
                    info = tarfile.TarInfo(arcname)
                    info.size = src.stat().st_size
                    info.mode = 0o755
                    info.mtime = mtime
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.type = tarfile.REGTYPE
                    with open(src, "rb") as fh:
                        tar.addfile(info, fh)


def package(config: Config, name: str, *, platform: str | None = None, dist: Path | None = None,
            mtime: int | None = None) -> Packaged:
    """Package *name*'s built binary for *platform* (default: the platform its ``.version`` says it was
    built for, else this machine) into ``.dist``.

    The binary must match the checksum its build wrote to ``.bin/.version``, and the platform the
    build recorded there. Returns what was written. Raises ConfigError (unknown subsystem, bad
    platform), BuildError (nothing built) and DataError (the binary changed since it was built, or
    was built for another platform).
    """
    sub = config.subsystem(name)
    binary = sub.binary_path(config.root)
    info = read_installed(config.root, name, sub.bin_dir(config.root))
    if info is None or not binary.is_file():
        raise BuildError(f"{name}: nothing built at {binary} (with .version); run: sync-tools build --only {name}")
    if info.legacy:
        raise BuildError(f"{name}: {sub.bin_dir(config.root) / '.version'} is a one-line legacy file "
                         f"({info.version!r}) with no checksum to verify {binary} against; "
                         f"run: sync-tools build --only {name}")
    plat = "/".join(parse_platform(platform or info.platform))
    if info.platform and "/".join(parse_platform(info.platform)) != plat:
        raise DataError(f"{name}: the binary was built for {info.platform}, not {plat}: "
                        f"run: sync-tools build --only {name} --platform {plat}")
    binary_sha = sha256_file(binary)
    if binary_sha != info.checksum:
        raise DataError(f"{binary} has sha256 {binary_sha} but its .version says {info.checksum}: "
                        f"rebuild with sync-tools build --only {name}")
    binfmt.check_platform(binary, plat)
    if mtime is None:
        mtime = source_date_epoch()
    if mtime is None:
        src = source_commit(config.root / name / ".src")
        mtime = src.time if src is not None and src.sha == info.commit else 0
    dist = dist or config.root / DIST_DIR
    asset = asset_name(sub.binary, plat)
    out = dist / asset
    write_tarball(out, [(sub.binary, binary)], mtime)
    result = Packaged(subsystem=name, platform=plat, version=info.version or "unknown", commit=info.commit,
                      built=info.timestamp, binary=sub.binary, name=asset, size=out.stat().st_size,
                      sha256=sha256_file(out), binary_sha256=binary_sha, path=out)
    atomic_write_bytes(result.sidecar, (json.dumps(result.to_json(), indent=2, sort_keys=True) + "\n").encode(),
                       mode=0o644)
    log.info("packaged %s (%d bytes, sha256 %s)", out, result.size, result.sha256)
    return result


def _read_sidecar(path: Path) -> Packaged:
    try:
        obj = json.loads(read_capped(path, _MAX_SIDECAR) or b"")
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable package sidecar: {e}") from e
    if not isinstance(obj, dict) or any(k not in obj for k in _SIDECAR_KEYS):
        raise DataError(f"{path}: package sidecar must hold {', '.join(_SIDECAR_KEYS)}")
    if not isinstance(obj["size"], int) or not all(isinstance(obj[k], str) for k in _SIDECAR_KEYS if k != "size"):
        raise DataError(f"{path}: package sidecar has a field of the wrong type")
    if obj["name"] + SIDECAR_SUFFIX != path.name:
        raise DataError(f"{path}: sidecar describes {obj['name']!r}, not its own asset")
    return Packaged(**{k: obj[k] for k in _SIDECAR_KEYS}, path=path.with_name(obj["name"]))


def take_leg_packages(artifacts: Path, into: Path) -> list[Path]:
    """Copy each build leg's package from *artifacts* (one folder per leg, ``dist-<subsystem>-<os>-<arch>``,
    as actions/download-artifact lays them out without ``merge-multiple``) into the empty or new folder
    *into*; returns the assets taken.

    A leg ran upstream code, and a merged download would let a file it uploaded named like another leg's
    asset replace that asset before it is signed. So each folder must hold exactly its own package, the
    asset and its sidecar, for the subsystem and platform its name says, as plain files. Raises DataError
    for anything else (nothing is released then)."""
    try:
        into.mkdir(parents=True, exist_ok=True)
        if any(into.iterdir()):
            raise DataError(f"{into}: not empty; the legs' packages are taken into an empty folder")
        legs = sorted(artifacts.iterdir())
    except OSError as e:
        raise DataError(f"cannot read the build legs' artifacts in {artifacts}: {e.strerror or e}") from e
    taken: list[Path] = []
    for leg in legs:
        parts = leg.name.removeprefix("dist-").rsplit("-", 2)
        if leg.is_symlink() or not leg.is_dir() or not leg.name.startswith("dist-") or len(parts) != 3 \
                or not all(parts):
            raise DataError(f"{leg}: not a build leg's artifact (a folder dist-<subsystem>-<os>-<arch>)")
        sub, platform = parts[0], f"{parts[1]}/{parts[2]}"
        files = sorted(p.name for p in leg.iterdir())
        sidecars = [n for n in files if n.endswith(".tar.gz" + SIDECAR_SUFFIX)]
        if len(sidecars) != 1:
            raise DataError(f"{leg}: {len(sidecars)} package sidecars; a leg uploads exactly one package")
        side = leg / sidecars[0]
        if side.is_symlink():
            raise DataError(f"{side}: a symlink, not the leg's own sidecar")
        item = _read_sidecar(side)
        if (item.subsystem, item.platform) != (sub, platform):
            raise DataError(f"{leg}: its package is {item.subsystem!r} for {item.platform!r}, not this leg's "
                            f"{sub} for {platform}")
        if files != sorted([item.name, side.name]):
            raise DataError(f"{leg} holds {', '.join(files)}: a leg's artifact holds its package and sidecar only")
        for name in files:
            src, dest = leg / name, into / name
            if src.is_symlink() or not src.is_file():
                raise DataError(f"{src}: not a plain file")
            if dest.exists():
                raise DataError(f"{name}: in two legs' artifacts ({leg.name} and another)")
            shutil.copyfile(src, dest)
        taken.append(into / item.name)
    return taken


def read_packaged(dist: Path, name: str, platforms: Iterable[str] | None = None, *,
                  binary: str | None = None) -> list[Packaged]:
    """The packaged assets of subsystem *name* in *dist* (optionally only *platforms*), each checked
    against its sidecar (size and sha256), and, given *binary*, named as that binary's asset for its
    platform (``<binary>-<os>-<arch>.tar.gz``). Raises DataError when an asset is missing, differs or
    is misnamed."""
    wanted = set(platforms) if platforms else None
    out = []
    if dist.is_dir():
        for path in sorted(dist.glob("*.tar.gz" + SIDECAR_SUFFIX)):
            item = _read_sidecar(path)
            if item.subsystem != name or (wanted is not None and item.platform not in wanted):
                continue
            if binary is not None:
                # a sidecar (written by a build leg that ran upstream code) must not make this
                # subsystem's release replace another subsystem's assets
                try:
                    os_, arch = parse_platform(item.platform or "?")
                except ConfigError as e:
                    raise DataError(f"{path}: {e}") from e
                expected = asset_name(binary, f"{os_}/{arch}")
                if item.name != expected:
                    raise DataError(f"{path}: {name}'s asset for {item.platform} must be named {expected}, "
                                    f"not {item.name}")
            if not item.path.is_file():
                raise DataError(f"{item.path}: missing (its sidecar {path.name} is there)")
            size, digest = item.path.stat().st_size, sha256_file(item.path)
            if size != item.size or digest != item.sha256:
                raise DataError(f"{item.path}: size/sha256 differ from its sidecar; package it again")
            out.append(item)
    return sorted(out, key=lambda p: p.platform)
