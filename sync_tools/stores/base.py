"""The release store interface.

A store holds the assets of one rolling release (``release.tag``) plus ``manifest.json`` and
``manifest.json.sig``. Writers replace the manifest with compare-and-swap semantics: they pass the
``token`` of the :class:`Snapshot` they read, and the store raises :class:`ManifestConflict` when the
manifest changed in between, so parallel releases of different subsystems redo their
read-modify-write instead of overwriting each other.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from sync_tools.errors import RemoteError, SyncToolsError

if TYPE_CHECKING:
    from sync_tools.config import Config


class ManifestConflict(SyncToolsError):
    """The manifest changed between read and write; read again and redo the change."""


class ManifestBusy(RemoteError):
    """Another writer is midway through replacing the manifest; read again a little later."""


@dataclass(frozen=True)
class Snapshot:
    """The manifest as read: its bytes and signature (None before the first release) and a token
    identifying this version for compare-and-swap."""

    data: bytes | None
    signature: bytes | None
    token: str | None


class Store(abc.ABC):
    """One release's assets and manifest. Every method has bounded time (network calls time out)."""

    @abc.abstractmethod
    def ensure_release(self) -> None:
        """Create the release (or directory) if it does not exist yet. Idempotent."""

    @abc.abstractmethod
    def read_manifest(self) -> Snapshot:
        """The current manifest bytes, signature and CAS token (all None when there is none)."""

    @abc.abstractmethod
    def write_manifest(self, data: bytes, signature: bytes, expected_token: str | None) -> None:
        """Replace manifest.json and its .sig if the manifest is still at *expected_token*.

        Raises ManifestConflict when another writer got there first.
        """

    @abc.abstractmethod
    def upload_asset(self, path: Path, name: str) -> None:
        """Put *path* under *name*, replacing a same-named asset without ever losing the old one:
        a failed upload leaves the previous asset in place."""

    @abc.abstractmethod
    def list_assets(self) -> dict[str, int]:
        """Asset name -> size in bytes."""

    @abc.abstractmethod
    def download_asset(self, name: str, out: BinaryIO, *, max_bytes: int) -> int:
        """Write the bytes of asset *name* to *out*; return how many. Raises DataError when it is
        over *max_bytes*, RemoteError when it is missing (status_code 404) or the store fails."""

    @abc.abstractmethod
    def delete_asset(self, name: str) -> None:
        """Remove asset *name* (gone already is fine). Raises DataError for the manifest pair."""

    @abc.abstractmethod
    def asset_url(self, name: str) -> str:
        """Where an agent downloads *name* from (a URL, or a local path)."""


def open_store(config: Config, **kwargs: object) -> Store:
    """The store the config names: GitHub when ``release.repo`` is set without ``release.store``,
    else the local directory store."""
    if config.release.backend == "github":
        from sync_tools.stores.github import GitHubStore

        assert config.release.repo is not None
        return GitHubStore(config.release.repo, config.release.tag, **kwargs)  # type: ignore[arg-type]
    from sync_tools.stores.local import LocalStore

    return LocalStore(config.release.store_path(config.root), config.release.tag)
