"""Which subsystems an agent looks after.

A workspace config lists them (with upstreams, build commands and the rest). A USER machine's
agent-only config need not: with no ``subsystems:`` the signed manifest names them, each installed
as ``<name>/.bin/<binary>`` (the binary the manifest names), its process called ``<name>``. A config
that lists subsystems limits the agent to those, with their own ``process``, ``health`` and binary
path.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sync_tools.config import Config, Subsystem

if TYPE_CHECKING:
    from sync_tools.manifest import Manifest


def from_manifest(name: str, binary: str | None) -> Subsystem:
    """The subsystem an agent-only config implies for a manifest entry (or a journal's intent)."""
    return Subsystem(name=name, upstream="", binary=binary or name, build=(), paths=(), process=name)


def for_manifest(config: Config, manifest: Manifest) -> list[Subsystem]:
    """The subsystems to bring to *manifest*: the configured ones, else every one it names."""
    if config.subsystems:
        return list(config.subsystems.values())
    return [from_manifest(n, e.binary) for n, e in sorted(manifest.subsystems.items())]


def named(config: Config, name: str, binary: str | None = None) -> Subsystem | None:
    """The subsystem called *name*: the configured one; with an agent-only config (none configured),
    one implied by *binary*; None when the config lists others but not this one."""
    if config.subsystems:
        return config.subsystems.get(name)
    return from_manifest(name, binary)


def installed(config: Config, root: Path) -> list[Subsystem]:
    """For ``status`` and clean-up: the configured subsystems, else those installed under *root*
    (``<name>/.bin`` holding one binary: the file that is not a dotfile)."""
    if config.subsystems:
        return list(config.subsystems.values())
    out = []
    try:
        dirs = sorted(p for p in root.iterdir() if (p / ".bin").is_dir())
    except OSError:
        return []
    for d in dirs:
        files = [f.name for f in (d / ".bin").iterdir() if f.is_file() and not f.name.startswith(".")]
        out.append(from_manifest(d.name, files[0] if len(files) == 1 else None))
    return out
