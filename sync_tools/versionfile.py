"""``<subsystem>/.bin/.version``: what binary is installed and where it came from.

Format (the contract plat-telemetry's Taskfiles already write)::

    commit: <sha>
    timestamp: <iso8601>
    checksum: <sha256 of the binary>
    version: <v>            (optional)
    platform: <os>/<arch>   (optional: what ``sync-tools build`` built it for)

Unknown ``key: value`` lines are kept on read and ignored; anything else is a DataError.

A file of one bare line (``latest``, ``11.4.0``: what plat-telemetry's ``bin:download`` tasks and
``echo "$VERSION" > .version`` write) is read as *legacy*: the version only, nothing to verify the
binary against. It is not an error; the first verified install replaces it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sync_tools.errors import DataError
from sync_tools.fsutil import atomic_write_text, read_capped

VERSION_FILE = ".version"
_LEGACY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@/-]{0,199}")  # one word: a version or release name
PREVIOUS_DIR = ".previous"
MAX_VERSION_FILE = 64 * 1024


@dataclass(frozen=True)
class VersionInfo:
    commit: str
    timestamp: str
    checksum: str
    version: str | None = None
    platform: str | None = None
    legacy: bool = False  # a one-line file: a version and nothing to verify the binary with

    def render(self) -> str:
        lines = [f"commit: {self.commit}", f"timestamp: {self.timestamp}", f"checksum: {self.checksum}"]
        if self.version:
            lines.append(f"version: {self.version}")
        if self.platform:
            lines.append(f"platform: {self.platform}")
        return "\n".join(lines) + "\n"


def parse_version_text(text: str, where: str = ".version") -> VersionInfo:
    """Parse .version text. Raises DataError on a malformed file or a missing required key."""
    fields: dict[str, str] = {}
    content = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if len(content) == 1 and _LEGACY.fullmatch(content[0]):
        return VersionInfo(commit="", timestamp="", checksum="", version=content[0], legacy=True)
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise DataError(f"{where}:{n}: expected 'key: value', got {raw!r}")
        fields[key.strip()] = value.strip()
    missing = [k for k in ("commit", "timestamp", "checksum") if not fields.get(k)]
    if missing:
        raise DataError(f"{where}: missing {', '.join(missing)}")
    return VersionInfo(fields["commit"], fields["timestamp"], fields["checksum"].lower(), fields.get("version"),
                       fields.get("platform") or None)


def read_version(bin_dir: Path) -> VersionInfo | None:
    """The .version in *bin_dir*, or None when there is none. Raises DataError when it is malformed."""
    path = bin_dir / VERSION_FILE
    data = read_capped(path, MAX_VERSION_FILE, missing_ok=True)
    if data is None:
        return None
    try:
        return parse_version_text(data.decode("utf-8"), str(path))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text") from e


def read_installed(root: Path, name: str, bin_dir: Path) -> VersionInfo | None:
    """The ``.version`` describing the binary in *bin_dir* (a subsystem's ``.bin`` or a subfolder of
    it): the one beside the binary, else, for a subfolder, the one the platform's own Taskfile wrote
    at ``<name>/.bin/.version`` (plat-telemetry's grafana). Raises DataError when it is malformed."""
    info = read_version(bin_dir)
    top = root / name / ".bin"
    if info is None and bin_dir != top:
        info = read_version(top)
    return info


def write_version(bin_dir: Path, info: VersionInfo) -> None:
    """Write .version atomically (tmp, fsync, rename)."""
    atomic_write_text(bin_dir / VERSION_FILE, info.render())
