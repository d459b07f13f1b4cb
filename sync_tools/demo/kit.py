"""Build steps for the demo's tiny subsystems, the stand-ins for ``task NAME:src:update`` and
``task NAME:bin:build``. Run from the workspace root::

    python -m sync_tools.demo.kit src-update NAME UPSTREAM   # NAME/.src at $<NAME>_VERSION (or the pin)
    python -m sync_tools.demo.kit bin-build NAME BINARY      # NAME/.bin/BINARY from NAME/.src

The version to check out comes from the environment variable ``<NAME>_VERSION`` (the same name
plat-telemetry's Taskfiles read), falling back to the ``VERSION`` argument.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from dulwich import porcelain

from sync_tools.fsutil import atomic_write_bytes


def src_update(name: str, upstream: str, version: str | None) -> str:
    """Fresh clone of *upstream* into ``NAME/.src`` checked out at *version*; returns the commit."""
    version = os.environ.get(f"{name.upper()}_VERSION") or version
    if not version:
        raise SystemExit(f"src-update {name}: no version (set {name.upper()}_VERSION)")
    src = Path(name) / ".src"
    staging = Path(name) / ".src.new"
    shutil.rmtree(staging, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    repo = porcelain.clone(upstream, str(staging), checkout=True, errstream=porcelain.NoneStream())
    try:
        target = repo.refs[b"refs/tags/" + version.encode()]
    except KeyError:
        raise SystemExit(f"src-update {name}: upstream has no tag {version}") from None
    porcelain.reset(repo, "hard", target)
    repo.close()
    shutil.rmtree(src, ignore_errors=True)
    os.replace(staging, src)
    commit = porcelain.rev_parse(str(src), "HEAD")
    return commit.decode() if isinstance(commit, bytes) else str(commit)


def bin_build(name: str, binary: str) -> Path:
    """``NAME/.bin/BINARY``: the service source behind a shebang for this Python, mode 0755."""
    source = (Path(name) / ".src" / "service.py").read_bytes()
    out = Path(name) / ".bin" / binary
    atomic_write_bytes(out, f"#!{sys.executable}\n".encode() + source, mode=0o755)
    return out


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "src-update":
        commit = src_update(argv[1], argv[2], argv[3] if len(argv) > 3 else None)
        print(f"{argv[1]}: source at {commit[:12]}")
        return 0
    if len(argv) == 3 and argv[0] == "bin-build":
        print(f"{argv[1]}: built {bin_build(argv[1], argv[2])}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
