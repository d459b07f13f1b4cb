"""A binary whose place under ``<sub>/.bin`` moved: a manifest entry's (or the config's) ``path`` puts
grafana at ``grafana/.bin/bin/grafana-server`` on a machine that had it at ``grafana/.bin/grafana-server``.

- The first install at the new place replaces the build at the old one: :func:`keep_previous` keeps
  that build (and its ``.version``) in the new place's ``.previous/`` before the swap, so the automatic
  restore and ``rollback`` can put it back.
- Once the new build has proved healthy, :func:`remove_stale` removes the file left at the old place
  (and its ``.version``), which ``status`` and operators would otherwise keep finding. It stays when it
  is the only copy of its build (neither the installed binary nor ``.previous/``) or a process runs it
  (``/proc/<pid>/exe``, or a script named in its command line; when /proc cannot tell, it stays too).
  A symlink there is the operator's and is never touched. A removal that fails is a warning, never a
  failed install.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sync_tools.config import Subsystem
from sync_tools.fsutil import fsync_dir, sha256_file
from sync_tools.versionfile import PREVIOUS_DIR, VERSION_FILE

from . import install

log = logging.getLogger(__name__)

PROC = Path("/proc")
#: Leading command-line words looked at for a script's path (interpreter, an option, the script).
ARGS_LOOKED_AT = 3


def old_place(sub: Subsystem, root: Path) -> Path | None:
    """``<name>/.bin/<binary>`` when *sub*'s binary lives in a subfolder of ``.bin`` and a regular file
    (not a symlink) is there; else None."""
    base = root / sub.name / ".bin"
    if sub.bin_dir(root) == base:
        return None
    path = base / sub.binary
    return path if path.is_file() and not path.is_symlink() else None


def keep_previous(sub: Subsystem, root: Path, new_sha: str) -> tuple[str, str | None] | None:
    """Before an install at the new place when nothing is there yet: keep the build at the old place in
    the new place's ``.previous/`` and return its sha256 and .version text (for ``install.begin``'s
    *replaces*). None when nothing moved, the old build is the one going in, or ``.previous/`` there
    already holds another build (it is not overwritten). Raises InstallError when it cannot be kept."""
    bin_dir = sub.bin_dir(root)
    old = old_place(sub, root)
    if old is None or (bin_dir / sub.binary).exists():
        return None
    kept = bin_dir / PREVIOUS_DIR / sub.binary
    try:
        sha = sha256_file(old)
        if sha == new_sha:
            return None
        if kept.exists() and sha256_file(kept) != sha:
            log.warning("%s: %s already holds another build; the one at %s is not kept for a rollback",
                        sub.name, kept.parent, old)
            return None
        text = install.save_previous(bin_dir, sub.binary, source=old.parent)  # the .version kept beside it
    except OSError as e:
        raise install.InstallError(f"{sub.name}: cannot keep {old} (the build before the binary moved to "
                                   f"{bin_dir}) for a rollback: {e}") from e
    log.info("%s: the binary moved from %s to %s; the build there is kept in %s", sub.name, old.parent,
             bin_dir, kept.parent)
    return sha, text


def remove_stale(sub: Subsystem, root: Path, *, proc: Path = PROC) -> bool:
    """After a build proved healthy at the new place: remove the file left at the old place and its
    ``.version``, unless it is the only copy of its build or a process runs it. True when removed.
    Never raises (a failure is logged)."""
    old = old_place(sub, root)
    if old is None:
        return False
    bin_dir = sub.bin_dir(root)
    try:
        if not _copy_kept(old, [bin_dir / sub.binary, bin_dir / PREVIOUS_DIR / sub.binary]):
            log.warning("%s: %s is left in place: it is the only copy of its build (neither the installed "
                        "binary nor the one kept for a rollback); remove it by hand if it is not needed",
                        sub.name, old)
            return False
        pid = runner_of(old, proc=proc)
    except OSError as e:
        log.warning("%s: %s is left in place: cannot tell whether it is still needed (%s)", sub.name, old,
                    e.strerror or e)
        return False
    if pid is not None:
        log.warning("%s: %s is left in place: process %d runs it, not %s (is the process manager still "
                    "pointed at the old place?)", sub.name, old, pid, bin_dir / sub.binary)
        return False
    try:
        os.unlink(old)
        version = old.parent / VERSION_FILE
        if version.is_file() and not version.is_symlink():
            os.unlink(version)
        fsync_dir(old.parent)
    except OSError as e:
        log.warning("%s: cannot remove %s, left by the build before the binary moved to %s: %s", sub.name,
                    old, bin_dir, e.strerror or e)
        return False
    log.info("%s: removed %s, left by the build before the binary moved to %s", sub.name, old, bin_dir)
    return True


def _copy_kept(path: Path, others: list[Path]) -> bool:
    """Whether one of *others* holds the same bytes as *path*."""
    size = path.stat().st_size
    sha: str | None = None
    for other in others:
        if other.is_file() and other.stat().st_size == size:
            sha = sha or sha256_file(path)
            if sha256_file(other) == sha:
                return True
    return False


def runner_of(path: Path, *, proc: Path = PROC) -> int | None:
    """The pid of a process that runs *path*: its executable (by path, or the same file), or a script
    named among the first words of its command line. None when none does. Raises OSError when *proc*
    cannot be listed (another OS): it cannot tell."""
    st = os.stat(path)
    target = os.path.abspath(path)
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            exe = os.stat(d / "exe")
            if (exe.st_dev, exe.st_ino) == (st.st_dev, st.st_ino) or \
                    os.readlink(d / "exe").removesuffix(" (deleted)") == target:
                return int(d.name)
        except OSError:
            pass  # gone, or another user's
        try:
            words = (d / "cmdline").read_bytes().split(b"\0")[:ARGS_LOOKED_AT]
            cwd = os.readlink(d / "cwd")
        except OSError:
            continue
        for word in filter(None, map(os.fsdecode, words)):
            named = os.path.normpath(os.path.join(cwd, word))
            if named == target:
                return int(d.name)
            try:
                if os.path.samestat(os.stat(named), st):
                    return int(d.name)
            except OSError:
                pass
    return None
