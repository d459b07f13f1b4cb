"""``check``: pinned versus newest upstream version for each subsystem, and the record of it.

All subsystems are checked concurrently in a bounded pool sharing one :class:`Sources` (so a remote
tracked by several subsystems is asked once). One failing subsystem never sinks the others: its
result carries an ``error`` and the rest are still reported. :func:`write_version_manifest` records
the run in ``.version-manifest.json`` (seed schema of ARCHITECTURE.md), atomically.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from sync_tools.config import Config, Subsystem
from sync_tools.errors import SyncToolsError
from sync_tools.sources import Latest, Sources, find_latest

log = logging.getLogger(__name__)

VERSION_MANIFEST = ".version-manifest.json"
MAX_WORKERS = 8


class CheckResult(NamedTuple):
    """One subsystem's answer. ``error`` is set (and ``latest`` None) when its upstream failed."""

    name: str
    upstream: str
    strategy: str
    current: str | None
    latest: str | None = None
    commit: str | None = None
    current_commit: str | None = None
    update_available: bool = False
    major_available: str | None = None
    error: str | None = None
    seconds: float = 0.0
    branch: str | None = None  # the pin follows this upstream branch; current_commit is what is installed

    def to_json(self) -> dict[str, Any]:
        """The CLI's JSON shape: current, latest, update_available always; commit, major_available,
        error where set."""
        out: dict[str, Any] = {"current": self.current, "latest": self.latest,
                               "update_available": self.update_available}
        for key in ("commit", "current_commit", "branch", "major_available", "error"):
            if key in ("current_commit", "branch") and self.branch is None:
                continue
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        return out


class CheckReport(NamedTuple):
    """A whole run: results in config order and when it ran."""

    results: tuple[CheckResult, ...]
    checked_at: datetime

    @property
    def errors(self) -> tuple[CheckResult, ...]:
        return tuple(r for r in self.results if r.error is not None)

    @property
    def updates(self) -> tuple[CheckResult, ...]:
        return tuple(r for r in self.results if r.update_available)

    def to_json(self) -> dict[str, dict[str, Any]]:
        return {r.name: r.to_json() for r in self.results}


def check_one(sub: Subsystem, sources: Sources, root: Path | None = None) -> CheckResult:
    """Check one subsystem; any SyncToolsError becomes the result's ``error`` (never raised).

    A pin that names an upstream branch (``main``), and a ``commits`` subsystem with no pinned commit,
    compare the branch head with the commit of the binary installed under *root*
    (``<sub>/.bin/.version``, a short or full sha): an update is available when they differ or
    nothing verified is installed."""
    started = time.monotonic()
    base = {"name": sub.name, "upstream": sub.upstream, "strategy": sub.strategy, "current": sub.current}
    try:
        found: Latest = find_latest(sub, sources)
        branch = found.branch or (sub.branch or "HEAD" if sub.strategy == "commits" and not sub.current else None)
        if branch is not None and found.latest is not None:
            from sync_tools.sources.commits import pin_matches

            installed = installed_commit(sub, root) if root is not None else None
            matched = pin_matches(installed, found.latest)
            found = found._replace(branch=branch, current_commit=found.latest if matched else installed,
                                   update_available=not matched)
    except SyncToolsError as e:
        error = printable(str(e))
        log.info("check %s failed: %s", sub.name, error)
        return CheckResult(**base, error=error, seconds=time.monotonic() - started)
    except Exception as e:  # a bug or an unwrapped library error must not sink the other subsystems
        # one line, as every error here; the traceback only for whoever asks for debug logs
        error = printable(f"internal error: {type(e).__name__}: {e}")
        log.warning("check %s failed: %s", sub.name, error)
        log.debug("check %s crashed", sub.name, exc_info=True)
        return CheckResult(**base, error=error, seconds=time.monotonic() - started)
    return CheckResult(**base, latest=found.latest, commit=found.commit, current_commit=found.current_commit,
                       update_available=found.update_available, major_available=found.major_available,
                       seconds=time.monotonic() - started, branch=found.branch)


def printable(text: str) -> str:
    """*text* on one line with nothing a terminal or a CI log acts on: every character that is not
    printable (a newline, an escape, U+2028) as its Python escape. An error carries what the upstream
    said (GitHub's ``message``, a git daemon's ``ERR`` line), printed after ``Error:`` and logged by
    ``plan --from-check``: a newline there started a line of the server's choosing (``::error::`` and
    the other workflow commands of GitHub Actions), an escape sequence rewrote the terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def installed_commit(sub: Subsystem, root: Path) -> str | None:
    """The commit ``<root>/<sub>/.bin/.version`` records for the installed binary, or None (nothing
    installed, a legacy one-line file, an unreadable one)."""
    from sync_tools.versionfile import read_installed

    try:
        info = read_installed(root, sub.name, sub.bin_dir(root))
    except (SyncToolsError, OSError):
        return None
    if info is None or info.legacy or info.commit in ("", "unknown"):
        return None
    return info.commit


def check(config: Config, names: Iterable[str] | None = None, *, sources: Sources | None = None,
          max_workers: int = MAX_WORKERS, clock: Callable[[], datetime] | None = None) -> CheckReport:
    """Check the named subsystems (all when none are named) concurrently.

    Raises ConfigError for an unknown name; upstream failures are reported per subsystem, not raised.
    """
    chosen = config.select(list(names) if names else None)
    for s in chosen:
        s.require_upstream(config.path)
    subs = [_resolve_upstream(config, s) for s in chosen]
    sources = sources or Sources()
    now = (clock or _utcnow)()
    if not subs:
        return CheckReport((), now)
    # every remote is asked now, before anything else: its server's answer then overlaps the rest
    sources.prefetch(subs)
    workers = max(1, min(max_workers, len(subs)))
    if workers == 1:
        return CheckReport(tuple(check_one(s, sources, config.root) for s in subs), now)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="check") as pool:
        return CheckReport(tuple(pool.map(lambda s: check_one(s, sources, config.root), subs)), now)


def _resolve_upstream(config: Config, sub: Subsystem) -> Subsystem:
    """A relative local upstream is relative to the workspace (the config's directory), not to
    wherever the command happens to run."""
    from sync_tools.sources.remote import is_local

    up = sub.upstream.strip()
    if sub.strategy == "releases" or not is_local(up) or up.startswith("file://"):
        return sub
    path = Path(up).expanduser()
    if path.is_absolute():
        return sub
    return sub._replace(upstream=str(config.root / path))


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _iso(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def manifest_entry(result: CheckResult, checked_at: datetime) -> dict[str, Any]:
    """One subsystem's record in the seed schema of ``.version-manifest.json``."""
    if result.branch is not None:  # the seed's own arc example: both commits, no tags
        current_commit, current_tag = result.current_commit, None
        latest_commit, latest_tag = result.commit, None
    elif result.strategy == "commits":
        current_commit, current_tag = result.current, None
        latest_commit, latest_tag = result.commit, None
    else:
        current_commit, current_tag = result.current_commit, result.current
        latest_commit, latest_tag = result.commit, result.latest
    entry = {
        "name": result.name,
        "upstream_repo": result.upstream,
        "current_commit": current_commit,
        "current_tag": current_tag,
        "latest_commit": latest_commit,
        "latest_tag": latest_tag,
        "update_available": result.update_available,
        "last_updated": _iso(checked_at),
    }
    if result.major_available:
        entry["major_available"] = result.major_available
    if result.branch is not None:
        entry["branch"] = result.branch
    return entry


def write_version_manifest(path: Path, report: CheckReport) -> dict[str, Any]:
    """Merge *report* into the ``.version-manifest.json`` at *path* and write it atomically.

    Subsystems not checked this run keep their entries; a subsystem whose check failed keeps its last
    good entry, with ``error`` added (a failed check loses nothing). Returns what was written. A
    missing or unreadable old file is replaced; raises OSError only when the new one cannot be written.
    """
    with _exclusive(path.parent):
        return _merge_and_write(path, report)


@contextmanager
def _exclusive(directory: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` of *directory* (the workspace) while the manifest is read, merged
    and replaced: two `check` runs of different subsystems at once each read the old file and
    replaced it with their own merge, and the later dropped the other's entries. The directory, not
    the file: the replace makes a new file, and there may be none yet. Where it cannot be locked
    (no such directory yet, a file system without flock) the write goes on unlocked, as before."""
    import fcntl

    try:
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:
            log.debug("%s: cannot lock (%s); writing %s unlocked", directory, e, VERSION_MANIFEST)
        yield
    finally:
        os.close(fd)  # closing the only descriptor releases the lock


def _merge_and_write(path: Path, report: CheckReport) -> dict[str, Any]:
    old = _read_json(path)
    old_subs: Mapping[str, Any] = old.get("subsystems", {}) if isinstance(old.get("subsystems"), dict) else {}
    subsystems: dict[str, Any] = {k: v for k, v in old_subs.items() if isinstance(v, dict)}
    for r in report.results:
        if r.error is None:
            subsystems[r.name] = manifest_entry(r, report.checked_at)
        else:
            kept = dict(subsystems.get(r.name) or {"name": r.name, "upstream_repo": r.upstream,
                                                   "current_tag": None if r.strategy == "commits" else r.current,
                                                   "current_commit": r.current if r.strategy == "commits" else None,
                                                   "latest_commit": None, "latest_tag": None,
                                                   "update_available": False, "last_updated": None})
            kept["error"] = r.error
            subsystems[r.name] = kept
    data = {"last_check": _iso(report.checked_at), "subsystems": subsystems}
    from sync_tools.fsutil import atomic_write_json

    atomic_write_json(path, data)
    return data


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("%s is unreadable (%s); writing a fresh one", path, e)
        return {}
    return data if isinstance(data, dict) else {}
