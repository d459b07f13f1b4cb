"""Fetchers: the agent's one seam for getting bytes from a release source.

:class:`Fetcher` is abstract over ``_fetch(name, offset, *, deadline) -> Iterator[bytes]``; the base class
adds the size cap and the deadline check on every chunk, and wraps every foreign error into
:class:`~sync_tools.errors.DownloadError` once, so the pipeline above only sees our error families.
Two real fetchers: :class:`HTTPFetcher` (a base URL such as a GitHub release download URL; streamed,
with timeouts and HTTP Range resume; the deadline also bounds its request and the redirects it
follows) and :class:`LocalFetcher` (a local store directory ``<store>/<tag>/``). Tests may pass any
other fetcher.

:func:`download` streams one asset to a file, resuming after a cut, and checks size and sha256 before
the caller may use the file.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import http.client
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sync_tools.agent.httpclient import Client, HTTPError
from sync_tools.errors import DataError, DownloadError

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
#: Seconds one whole small file (the manifest, its signature) may take, however the bytes trickle in
#: (each read has its own timeout too, but a server sending a byte per read timeout would pass that).
SMALL_FILE_DEADLINE = 60.0
#: An asset download (resumes included) may take ASSET_DEADLINE_MIN seconds plus its size at
#: ASSET_MIN_RATE bytes per second; slower than that, it fails (and the next event tries again).
ASSET_DEADLINE_MIN = 60.0
ASSET_MIN_RATE = 16 * 1024
#: (name, bytes done, bytes expected or None) - called as a download advances; the CLI draws a bar.
ProgressFn = Callable[[str, int, int | None], None]


class SizeCapError(DownloadError):
    """The source sent more bytes than the cap allowed."""


class TooLargeError(DataError):
    """A small file (the manifest, its signature) is over its cap: a refusal, not a network fault (the
    same source would send the same bytes again); see :class:`Refusal`."""


@dataclass(frozen=True)
class Refusal:
    """A release refused for its size, and the serial the event that fetched it announced (None: not
    known). Fetching again is pointless until an event announces a newer release."""

    error: str
    serial: int | None

    def covers(self, serial: int | None) -> bool:
        """True when an event announcing *serial* can only be about the release already refused."""
        return self.serial is not None and serial is not None and serial <= self.serial


class DeadlineError(DownloadError):
    """The transfer took longer than its total deadline (a server trickling bytes)."""


def asset_deadline(size: int) -> float:
    """Seconds a download of *size* bytes may take in all (see ASSET_DEADLINE_MIN, ASSET_MIN_RATE)."""
    return ASSET_DEADLINE_MIN + size / ASSET_MIN_RATE


class Fetcher(abc.ABC):
    """Gets the bytes of a named file (``manifest.json``, an asset) from one release source."""

    def fetch(self, url_or_name: str, *, max_bytes: int, offset: int = 0,
              deadline: float | None = None) -> Iterator[bytes]:
        """Yield the bytes of *url_or_name* from *offset* on, never more than ``max_bytes - offset``.

        *deadline*: a :func:`time.monotonic` time by which the transfer must be done; it is checked as
        bytes arrive, so it is passed by at most one read timeout.
        Raises DownloadError when the source fails, the transfer is cut, or the file is larger than
        *max_bytes* (the cap counts from the start of the file, not from *offset*); DeadlineError (a
        DownloadError) when *deadline* passes.
        """
        received = offset
        try:
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineError(f"{url_or_name}: out of time before the transfer started")
            for chunk in self._fetch(url_or_name, offset, deadline=deadline):
                if deadline is not None and time.monotonic() >= deadline:
                    raise DeadlineError(f"{url_or_name}: still transferring at its deadline "
                                        f"({received} bytes received): the source is too slow")
                if not chunk:
                    continue
                received += len(chunk)
                if received > max_bytes:
                    raise SizeCapError(f"{url_or_name}: larger than the {max_bytes}-byte cap")
                yield chunk
        except (DownloadError, DataError):
            raise
        except (HTTPError, http.client.HTTPException, OSError, ValueError) as e:
            from sync_tools.errtext import describe

            where = self.url(url_or_name) if isinstance(self, HTTPFetcher) else url_or_name
            named = isinstance(e, OSError) and e.filename  # the text already names the file
            raise DownloadError(describe(e) if named else f"{where}: {describe(e)}") from e

    def fetch_bytes(self, url_or_name: str, *, max_bytes: int, timeout: float | None = None) -> bytes:
        """The whole file in memory (for the manifest and its signature), within *timeout* seconds in
        all (default SMALL_FILE_DEADLINE). Raises DownloadError (DeadlineError when it took too long),
        TooLargeError (a DataError) when it is larger than *max_bytes*."""
        limit = SMALL_FILE_DEADLINE if timeout is None else timeout
        try:
            return b"".join(self.fetch(url_or_name, max_bytes=max_bytes, deadline=time.monotonic() + limit))
        except SizeCapError as e:
            raise TooLargeError(f"{e}; refused until a newer release") from e

    @abc.abstractmethod
    def _fetch(self, url_or_name: str, offset: int, *, deadline: float | None) -> Iterator[bytes]:
        """Yield the file's bytes from *offset*; raise anything on failure (the base class wraps it).

        *deadline* is :meth:`fetch`'s (a :func:`time.monotonic` time, or None): the base class checks it
        as chunks arrive, so a fetcher need only keep to it where it waits before the first chunk (a
        request and the redirects it follows)."""


class HTTPFetcher(Fetcher):
    """Files under a base URL over HTTP(S), streamed with connect/read timeouts.

    A resume (``offset > 0``) sends ``Range: bytes=<offset>-``; a server that ignores it and answers 200
    is read from the start with the first *offset* bytes skipped, so a resume is always correct.
    """

    def __init__(self, base_url: str, *, client: Client | None = None,
                 timeout: tuple[float, float] = (5.0, 30.0), headers: dict[str, str] | None = None):
        self.base_url = base_url.rstrip("/")
        self.client = client or Client()
        self.timeout = timeout
        self.headers = dict(headers or {})

    def url(self, url_or_name: str) -> str:
        if url_or_name.startswith(("http://", "https://")):
            return url_or_name
        return f"{self.base_url}/{url_or_name}"

    def _fetch(self, url_or_name: str, offset: int, *, deadline: float | None) -> Iterator[bytes]:
        headers = {"Accept-Encoding": "identity", **self.headers}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        url = self.url(url_or_name)
        # the deadline bounds the request and every redirect it follows (each hop's timeouts are cut
        # to it), not only the chunks the base class sees after the answer
        resp = self.client.get(url, headers=headers, stream=True, timeout=self.timeout, deadline=deadline)
        try:
            if resp.status == 416 and offset:
                return  # nothing left past offset: the caller's size check decides
            if resp.status not in (200, 206):
                raise DownloadError(f"{url}: HTTP {resp.status}", status_code=resp.status)
            skip = offset if (offset and resp.status == 200) else 0
            # read1 hands over whatever arrived, so a cut loses no received byte: the resume starts
            # exactly where the connection dropped
            while chunk := resp.read1(CHUNK):
                if skip:
                    if len(chunk) <= skip:
                        skip -= len(chunk)
                        continue
                    chunk, skip = chunk[skip:], 0
                yield chunk
        finally:
            resp.close()


class LocalFetcher(Fetcher):
    """Files in a local directory: a local release store's ``<store>/<tag>/``."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def _fetch(self, url_or_name: str, offset: int, *, deadline: float | None) -> Iterator[bytes]:
        name = os.path.basename(url_or_name)
        if name != url_or_name or name in ("", ".", ".."):
            raise DownloadError(f"{url_or_name!r}: not a plain file name")
        with open(self.directory / name, "rb") as fh:
            fh.seek(offset)
            while chunk := fh.read(CHUNK):
                yield chunk


def make_fetcher(source: str, *, tag: str = "latest", base: Path | None = None) -> Fetcher:
    """The fetcher for an ``agent.source``: an http(s) base URL, or a local store directory (read at
    ``<store>/<tag>/``, relative to *base*)."""
    if source.startswith(("http://", "https://")):
        return HTTPFetcher(source)
    store = Path(os.path.expanduser(source))
    if base is not None and not store.is_absolute():
        store = base / store
    return LocalFetcher(store / tag)


def open_part(path: Path) -> BinaryIO:
    """A new, empty file at *path* to download into (``w+b``), only readable by the agent.

    Whatever is at *path* is removed first, never written through: a link put in the downloads
    directory is replaced, not followed, and one put back meanwhile makes the open fail (OSError)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    return os.fdopen(fd, "w+b")


def download(fetcher: Fetcher, name: str, out: BinaryIO, *, size: int, sha256: str, max_bytes: int,
             attempts: int = 4, progress: ProgressFn | None = None, timeout: float | None = None) -> int:
    """Stream *name* into the open file *out* (positioned at 0), resuming after a cut with an offset.

    The file must come to exactly *size* bytes with the given *sha256*; *size* over *max_bytes* is
    refused before any byte moves. The whole download, resumes included, must be done within *timeout*
    seconds (default :func:`asset_deadline` of *size*). Returns the bytes transferred (resumes included).
    Raises DownloadError (source failed *attempts* times in a row; DeadlineError: out of time) or
    DataError (size or sha256 wrong: the bytes are bad, retrying will not help).
    """
    if size > max_bytes:
        raise DataError(f"{name}: manifest size {size} is over the {max_bytes}-byte cap")
    deadline = time.monotonic() + (asset_deadline(size) if timeout is None else timeout)
    digest = hashlib.sha256()
    done = 0
    moved = 0
    failures = 0
    while True:
        try:
            for chunk in fetcher.fetch(name, max_bytes=size, offset=done, deadline=deadline):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                moved += len(chunk)
                failures = 0  # progress was made: a later cut gets fresh attempts
                if progress is not None:
                    progress(name, done, size)
            if done < size:
                raise DownloadError(f"{name}: ended after {done} of {size} bytes")
            break
        except SizeCapError as e:
            raise DataError(f"{name}: more bytes than the manifest's size {size}") from e
        except DeadlineError:
            raise  # a resume would only start out of time
        except DownloadError as e:
            failures += 1
            if failures >= attempts:
                raise
            log.warning("download of %s cut at %d/%d bytes (%s); resuming", name, done, size, e)
    out.flush()
    os.fsync(out.fileno())
    if digest.hexdigest() != sha256:
        raise DataError(f"{name}: sha256 {digest.hexdigest()} does not match the manifest's {sha256}")
    return moved
