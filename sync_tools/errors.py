"""The project's error families.

Callers tell "refuse" (bad data: never retry with the same bytes) from "try again" (a network or
remote fault) by the family: :class:`DataError` versus :class:`RemoteError`. The CLI turns any
:class:`SyncToolsError` into one line on stderr and exit 1.
"""

from __future__ import annotations


class SyncToolsError(Exception):
    """Root of every error sync-tools raises on purpose."""


class ConfigError(SyncToolsError):
    """A configuration file is missing, unreadable or invalid.

    The message names the file, the key and the line where known.
    """

    def __init__(self, message: str, *, path: object = None, key: str | None = None, line: int | None = None):
        self.path = path
        self.key = key
        self.line = line
        where = ""
        if path is not None:
            where = str(path)
            if line is not None:
                where += f":{line}"
            where += ": "
        if key:
            where += f"{key}: "
        super().__init__(where + message)


class DataError(SyncToolsError):
    """Bytes that failed verification: a bad signature, checksum, archive or payload. Do not retry."""


class SignatureError(DataError):
    """A signature did not verify against the pinned key."""


class ManifestError(DataError):
    """A manifest is malformed, expired, or older than one already applied."""


class ArchiveError(DataError):
    """An archive is unsafe or does not hold what it should."""


class RemoteError(SyncToolsError):
    """A network or remote-side failure; the same request may succeed later."""

    def __init__(self, message: str, *, status_code: int | None = None, retry_after: float | None = None):
        self.status_code = status_code
        self.retry_after = retry_after
        super().__init__(message)


class DownloadError(RemoteError):
    """A download failed, was cut, or exceeded its size cap."""


class BuildError(SyncToolsError):
    """A build command failed; the message names the command and its exit code."""
