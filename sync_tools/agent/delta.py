"""The agent's patch-or-full decision and the patch path of a download (issue #17).

When the installed binary's sha256 is the ``from`` of a patch the signed manifest lists for the asset
(in a format this agent applies, and smaller than the full asset), the agent downloads that patch
(resumable, checked against the manifest's size and sha256), applies it to the installed binary in a
child process (:func:`sync_tools.patches.apply_patch`) and checks the result against the manifest's
``binary_sha256``. Any failure on that path (download, corrupt or truncated patch, wrong base, apply
error, wrong result) leaves nothing staged and the caller downloads the full asset instead; nothing
unverified is ever staged. A patch for a binary the agent does not have is never downloaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sync_tools import patches
from sync_tools.errors import SyncToolsError
from sync_tools.fsutil import sha256_file
from sync_tools.manifest import Asset, Patch

from .fetch import Fetcher, ProgressFn, download, open_part

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PatchUse:
    """An update that came by patch: the patch's name, the bytes it cost, the bytes it saved."""

    name: str
    bytes: int
    saved: int

    def to_json(self) -> dict[str, Any]:
        """The fleet report's ``patch`` field."""
        return {"bytes": self.bytes, "saved": self.saved}


@dataclass(frozen=True)
class Fetched:
    """What staging a new binary moved: bytes transferred (a failed patch attempt included), and the
    patch it came by (None: the full asset)."""

    moved: int
    patch: PatchUse | None = None


def choose_patch(asset: Asset, installed_sha: str | None) -> Patch | None:
    """The patch to download instead of *asset*: one starting from *installed_sha*, in a format this
    agent applies, and smaller than the full asset (the smallest of several). None: download the asset."""
    if installed_sha is None:
        return None
    usable = [p for p in asset.patches
              if p.from_sha == installed_sha and p.format in patches.FORMATS and p.size < asset.size]
    return min(usable, key=lambda p: p.size, default=None)


def stage_by_patch(fetcher: Fetcher, asset: Asset, *, installed: Path, staged: Path, downloads: Path,
                   max_binary_bytes: int, progress: ProgressFn | None = None) -> Fetched:
    """Try to stage *asset*'s binary at *staged* by patching the binary at *installed*.

    Returns a :class:`Fetched` whose ``patch`` is set when *staged* now holds the verified binary, and
    None (with the bytes a failed attempt moved) when the caller must download the full asset: no
    usable patch, or any failure on the way (logged; *staged* is removed). Never raises for a bad
    patch or a failed download."""
    installed_sha = sha256_file(installed) if installed.is_file() else None
    patch = choose_patch(asset, installed_sha)
    if patch is None:
        return Fetched(0)
    part = downloads / patch.name
    moved = 0
    try:
        with open_part(part) as out:
            moved = download(fetcher, patch.name, out, size=patch.size, sha256=patch.sha256,
                             max_bytes=asset.size, progress=progress)
        staged.unlink(missing_ok=True)
        sha = patches.apply_patch(installed, part, staged, fmt=patch.format, max_bytes=max_binary_bytes)
        if sha != asset.binary_sha256:
            raise patches.PatchError(f"{patch.name}: made a binary with sha256 {sha}, not the manifest's "
                                     f"{asset.binary_sha256}")
    except (SyncToolsError, OSError) as e:
        staged.unlink(missing_ok=True)
        if not moved and part.is_file():  # the download itself failed: count what it received
            moved = part.stat().st_size
        log.warning("%s: the patch did not work (%s); downloading the full asset", asset.name, e)
        return Fetched(moved)
    finally:
        try:
            part.unlink(missing_ok=True)
        except OSError as e:  # a directory put there: left alone; the full asset may still come
            log.warning("cannot remove %s: %s", part, e.strerror or e)
    log.info("%s: updated by patch %s (%d bytes instead of %d)", asset.name, patch.name, patch.size, asset.size)
    return Fetched(moved, PatchUse(patch.name, moved, max(0, asset.size - moved)))
