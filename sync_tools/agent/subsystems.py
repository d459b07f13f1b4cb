"""Which subsystems an agent looks after.

A workspace config lists them (with upstreams, build commands and the rest). A USER machine's
agent-only config need not: with no ``subsystems:`` the signed manifest names them, each installed
as ``<name>/.bin/<binary>`` (the binary the manifest names; ``<name>/.bin/<path>`` when the entry
has a ``path``, as grafana's ``bin/grafana-server``), its process called ``<name>``. A config
that lists subsystems limits the agent to those, with their own ``process``, ``health`` and binary
path.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sync_tools.config import Config, Subsystem
from sync_tools.errors import ConfigError

if TYPE_CHECKING:
    from sync_tools.manifest import Manifest


def from_manifest(name: str, binary: str | None, path: str | None = None) -> Subsystem:
    """The subsystem an agent-only config implies for a manifest entry (or a journal's intent); *path*:
    the entry's place for the binary under ``.bin`` when it is not right there (``bin/grafana-server``,
    where plat-telemetry runs grafana)."""
    return Subsystem(name=name, upstream="", binary=binary or name, build=(), paths=(), process=name,
                     bin_path=path if path and binary and path != binary else "")


def for_manifest(config: Config, manifest: Manifest) -> list[Subsystem]:
    """The subsystems to bring to *manifest*: the configured ones, else every one it names."""
    if config.subsystems:
        return list(config.subsystems.values())
    return [from_manifest(n, e.binary, e.path) for n, e in sorted(manifest.subsystems.items())]


def named(config: Config, name: str, binary: str | None = None, *, bin_dir: Path | None = None,
          root: Path | None = None) -> Subsystem | None:
    """The subsystem called *name*: the configured one; with an agent-only config (none configured),
    one implied by *binary* (in *bin_dir*, a journal's, under *root*); None when the config lists
    others but not this one."""
    if config.subsystems:
        return config.subsystems.get(name)
    path = None
    if binary and bin_dir is not None and root is not None:
        try:
            sub = Path(bin_dir).relative_to(Path(root) / name / ".bin").as_posix()
        except ValueError:
            sub = "."
        path = f"{sub}/{binary}" if sub != "." else None
    return from_manifest(name, binary, path)


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
        # in a subfolder that holds its .version first (a manifest's path: bin/grafana-server): a file
        # left at the top by an install from before the manifest said so is not the one that runs
        nested = [(f"{s.name}/{f}", f) for s in sorted((d / ".bin").iterdir())
                  if s.is_dir() and not s.name.startswith(".") and (s / ".version").is_file()
                  for f in _binaries(s)]
        if len(nested) == 1:
            out.append(from_manifest(d.name, nested[0][1], nested[0][0]))
            continue
        files = _binaries(d / ".bin")
        out.append(from_manifest(d.name, files[0] if len(files) == 1 else None))
    return out


def installed_named(config: Config, root: Path, name: str) -> Subsystem:
    """The subsystem called *name* for ``rollback``: the configured one, else (an agent-only config) the
    one installed under *root* as :func:`installed` finds it. Raises ConfigError for neither."""
    if config.subsystems:
        return config.subsystem(name)
    for sub in installed(config, root):
        if sub.name == name:
            return sub
    raise ConfigError(f"no subsystem {name!r} is installed under {root} (the config lists none: the "
                      "manifest names them)", path=config.path)


def _binaries(directory: Path) -> list[str]:
    try:
        return [f.name for f in directory.iterdir() if f.is_file() and not f.name.startswith(".")]
    except OSError:
        return []
