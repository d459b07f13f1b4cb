"""Durable file writes: nothing is ever half-written where a reader can see it."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from sync_tools.errors import DataError

_CHUNK = 1 << 20


def fsync_dir(path: Path) -> None:
    """fsync a directory so a rename inside it survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str], mode: int | None = None, *,
                  exclusive: bool = False) -> Iterator[IO[bytes]]:
    """Yield a binary file that replaces *path* only if the block finishes without error.

    The data goes to a temporary file in the same directory, is flushed and fsynced, then
    ``os.replace``-d over *path*; on any exception the temporary file is removed and *path* is
    untouched. With *exclusive*, an existing *path* is never replaced: the file is linked into place,
    and FileExistsError is raised if something got there first. Without *mode* the file gets what
    ``open()`` would give it (0666 less the umask); secrets pass ``mode=0o600``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(target)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, default_mode() if mode is None else mode)
        if exclusive:
            os.link(tmp, target)
            os.unlink(tmp)
        else:
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def default_mode() -> int:
    """0666 less the process's umask: the mode ``open()`` gives a new file. Read from /proc (Linux),
    since ``os.umask`` can only be read by setting it, which would race with other threads' files."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return 0o666 & ~mask


_UMASK_LOCK = threading.Lock()


def _create_temp(target: Path) -> tuple[int, str]:
    """A new file ``.<name>.<random>.tmp`` next to *target*, created exclusively (never an existing
    file or a planted symlink), mode 0600: what ``tempfile.mkstemp`` does, without importing tempfile
    and the random, shutil, bz2 and lzma modules it pulls in (~6 ms of every `sync-tools check`, which
    writes one file; measured)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
    flags |= getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = str(target.parent / f".{target.name}.{os.urandom(6).hex()}.tmp")
        try:
            return os.open(tmp, flags, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"{target.parent}: no free temporary file name for {target.name}")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None, *,
                       exclusive: bool = False) -> None:
    """Write *data* to *path* atomically (tmp, fsync, rename; see atomic_writer for *exclusive*)."""
    with atomic_writer(path, mode=mode, exclusive=exclusive) as fh:
        fh.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON with sorted keys and a trailing newline, atomically, so diffs read well."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_capped(path: str | os.PathLike[str], cap: int, *, missing_ok: bool = False) -> bytes | None:
    """The bytes of *path*, never reading more than *cap* + 1 of them: a file over the cap is refused,
    not read whole (config, manifests and event files are hostile until verified).

    Returns None for a missing file when *missing_ok*. Raises DataError over the cap, and OSError as
    ``open`` does.
    """
    try:
        with open(path, "rb") as fh:
            data = fh.read(cap + 1)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise
    if len(data) > cap:
        raise DataError(f"{path}: larger than {cap} bytes")
    return data


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks."""
    import hashlib  # here, not at the top: OpenSSL's loading is ~4 ms of every start-up that writes a file

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    import hashlib  # see sha256_file

    return hashlib.sha256(data).hexdigest()
