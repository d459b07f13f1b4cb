"""Safe extraction of the one binary a release asset holds.

An asset ``<binary>-<os>-<arch>.tar.gz`` must hold exactly one member: a regular file named as the
binary, at the archive root. Anything else (links, devices, directories, absolute paths, ``..``, a
second member, a size over the cap, metadata headers over :data:`MAX_META_BYTES`) is refused with
:class:`~sync_tools.errors.ArchiveError` before a byte of it is written. The member is also passed
through tarfile's ``data`` filter, so the standard library's own rules apply on top of ours.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import zlib
from pathlib import Path

from sync_tools.errors import ArchiveError

CHUNK = 256 * 1024
#: tarfile reads a metadata header (pax, GNU long name or link) whole into memory before any check of
#: ours can run: a signed asset could make the agent allocate gigabytes. The binary's name and a few pax
#: records need far less than this, in all and per archive.
MAX_META_BYTES = 64 * 1024
#: ... and in at most this many headers (a chain of them also recurses inside tarfile).
MAX_META_HEADERS = 8
_META_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
               tarfile.SOLARIS_XHDTYPE)


def _refuse_sparse(pax_headers: dict[str, str]) -> None:
    sparse = sorted(k for k in pax_headers if k.startswith("GNU.sparse."))
    if sparse:
        raise ArchiveError(f"GNU sparse member in archive (pax records {', '.join(sparse)})")


class _CappedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses a metadata header over the caps before tarfile reads it, and GNU sparse
    members, old and pax form (their maps are read whole too; a release binary is never sparse)."""

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise ArchiveError(f"sparse member {self.name!r} in archive")
        if self.type in _META_TYPES:
            count, total = getattr(tf, "_meta_seen", (0, 0))
            count, total = count + 1, total + self.size
            if count > MAX_META_HEADERS or total > MAX_META_BYTES:
                raise ArchiveError(f"tar metadata headers over the cap ({count} headers, {total} bytes; "
                                   f"at most {MAX_META_HEADERS} and {MAX_META_BYTES})")
            tf._meta_seen = (count, total)  # type: ignore[attr-defined]
        return super()._proc_member(tf)  # type: ignore[misc]

    # tarfile's pax handling calls these on the pax header before it applies the records to the member;
    # the 1.0 form reads its map from the member's data into a list with no bound
    def _proc_gnusparse_00(self, next_: tarfile.TarInfo, pax_headers: dict[str, str], buf: bytes) -> None:
        _refuse_sparse(pax_headers)

    def _proc_gnusparse_01(self, next_: tarfile.TarInfo, pax_headers: dict[str, str]) -> None:
        _refuse_sparse(pax_headers)

    def _proc_gnusparse_10(self, next_: tarfile.TarInfo, pax_headers: dict[str, str], tf: tarfile.TarFile) -> None:
        _refuse_sparse(pax_headers)

    def _apply_pax_info(self, pax_headers: dict[str, str], encoding: str, errors: str) -> None:
        _refuse_sparse(pax_headers)  # any other GNU.sparse record, in a member's or a global header
        super()._apply_pax_info(pax_headers, encoding, errors)  # type: ignore[misc]


def _check_member(member: tarfile.TarInfo, binary: str, max_bytes: int) -> None:
    name = member.name
    if name.startswith("./"):
        name = name[2:]
    if name.startswith("/") or os.path.isabs(member.name):
        raise ArchiveError(f"absolute path {member.name!r} in archive")
    if ".." in Path(name).parts:
        raise ArchiveError(f"path {member.name!r} leaves the archive root")
    if member.issym() or member.islnk():
        raise ArchiveError(f"link {member.name!r} in archive (only a regular file is allowed)")
    if member.isdev():
        raise ArchiveError(f"device or fifo {member.name!r} in archive")
    if not member.isreg():
        raise ArchiveError(f"{member.name!r} is not a regular file")
    if name != binary:
        raise ArchiveError(f"archive holds {member.name!r}, expected the binary {binary!r}")
    if member.size > max_bytes:
        raise ArchiveError(f"{member.name!r} claims {member.size} bytes, over the {max_bytes}-byte cap")


def extract_binary(archive: Path, binary: str, dest: Path, *, max_bytes: int) -> str:
    """Write the archive's single binary to *dest* (mode 0755, fsynced) and return its sha256.

    *dest* is created exclusively and removed again on any failure, so a caller that stages into a
    temporary name never sees a partial file. Raises ArchiveError.
    """
    try:
        with open(archive, "rb") as fh:
            head = fh.read(4)
        # RFC 1952: a decompressor must refuse reserved flag bits (they may announce a field that
        # changes how the rest reads). Python's gzip module skips this check; zlib's makes it.
        if len(head) == 4 and head[:3] == b"\x1f\x8b\x08" and head[3] & 0xE0:
            raise tarfile.ReadError("gzip header has reserved flag bits set")
        tf = tarfile.open(archive, mode="r:gz", tarinfo=_CappedTarInfo)  # reads the first header
    except ArchiveError as e:
        raise ArchiveError(f"{archive.name}: {e}") from e
    # tarfile raises ValueError itself for some malformed records (int() of a pax value), and a
    # RecursionError for a long enough chain of headers
    except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError, RecursionError) as e:
        raise ArchiveError(f"{archive.name}: not a readable tar.gz: {e}") from e
    with tf:
        try:
            member = tf.next()
            if member is None:
                raise ArchiveError("empty archive")
            _check_member(member, binary, max_bytes)
            try:  # against the name written (the binary's own path may be a link the swap replaces)
                tarfile.data_filter(member.replace(name=dest.name, deep=False), str(dest.parent))
            except tarfile.FilterError as e:
                raise ArchiveError(f"refused by tarfile's data filter: {e}") from e
            digest = _write_member(tf, member, dest)
            # Anything after the first member is refused: the asset holds the binary and nothing else.
            if tf.next() is not None:
                raise ArchiveError(f"more than one member (expected only {binary!r})")
        except ArchiveError as e:
            dest.unlink(missing_ok=True)
            raise ArchiveError(f"{archive.name}: {e}") from e
        except (tarfile.TarError, OSError, EOFError, zlib.error, ValueError, RecursionError) as e:
            dest.unlink(missing_ok=True)
            if isinstance(e, OSError) and e.errno is not None:
                raise  # a local write failure (ENOSPC...) is not the archive's fault
            raise ArchiveError(f"{archive.name}: corrupt archive: {e}") from e
    return digest


def _write_member(tf: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> str:
    src = tf.extractfile(member)
    if src is None:
        raise ArchiveError(f"{member.name!r} has no data")
    digest = hashlib.sha256()
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755)
    try:
        written = 0
        while chunk := src.read(CHUNK):
            written += len(chunk)
            if written > member.size:
                raise ArchiveError(f"{member.name!r} holds more than its claimed {member.size} bytes")
            view = memoryview(chunk)
            while view:  # unbuffered: a full disk surfaces here, at the write that failed
                view = view[os.write(fd, view):]
            digest.update(chunk)
        if written != member.size:
            raise ArchiveError(f"{member.name!r} ended after {written} of {member.size} bytes")
        os.fsync(fd)
        os.fchmod(fd, 0o755)
    except BaseException:
        os.close(fd)
        dest.unlink(missing_ok=True)
        raise
    os.close(fd)
    return digest.hexdigest()
