"""Crash-safe replacement of one subsystem's binary, with an intent journal.

The swap never leaves a partial binary at ``<sub>/.bin/<binary>``:

1. the new binary is staged (fully written, fsynced, sha256-checked) under a hidden name in the same
   directory;
2. an *intent* naming the new and old sha256 and their ``.version`` texts is written atomically to
   ``<root>/.sync-tools/journal/<sub>.json``;
3. the current binary is hard-linked (copied where links fail) into ``.bin/.previous/`` and its
   ``.version`` copied next to it - the binary path itself never goes missing;
4. ``os.replace`` puts the staged binary in place (atomic on POSIX);
5. ``.version`` is rewritten;
6. the caller reloads the process and checks health, then :meth:`Journal.remove` ends the intent.

After a crash at any point, :func:`recover` finishes every intent *forward*: the staged file was verified
before the intent existed, so it is either already in place or still staged and is moved in; the caller
then reloads and health-checks as for a fresh install. A staged file with no intent (a crash before step
2) is deleted: the old binary stays. Either way a verified binary is at the path, never a partial one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from sync_tools.errors import DataError, SyncToolsError
from sync_tools.fsutil import atomic_write_json, atomic_write_text, fsync_dir, read_capped, sha256_file
from sync_tools.versionfile import (
    MAX_VERSION_FILE,
    PREVIOUS_DIR,
    VERSION_FILE,
    VersionInfo,
    parse_version_text,
    read_version,
)

log = logging.getLogger(__name__)

STATE_DIR = ".sync-tools"
#: Test hook: the agent SIGKILLs itself right after the named step (see STEPS) to prove crash safety.
CRASH_ENV = "SYNC_TOOLS_AGENT_CRASH_AFTER"
STEPS = ("downloaded", "staged", "journaled", "previous-saved", "swapped", "version-written", "reloaded",
         "healthy")
#: Test hook: ``<step>:<marker file>``: at that step (one of STEPS, or ``stopped``: the supervisor backend
#: stopped the program and has not started it yet) the agent writes its pid to the marker file and waits
#: while the file exists (at most PAUSE_MAX seconds), so a test can SIGKILL it there. Once per marker: an
#: agent that finds the file already there goes on.
PAUSE_ENV = "SYNC_TOOLS_AGENT_PAUSE_AT"
PAUSE_MAX = 600.0


class InstallError(SyncToolsError):
    """A local failure while installing (disk full, permissions); the installed binary is unchanged."""


class AgentBusy(InstallError):
    """Another agent process held the install root's lock for longer than this one would wait."""


LOCK_NAME = "agent.lock"


class AgentLock:
    """An exclusive ``fcntl.flock`` of ``<root>/.sync-tools/agent.lock``: one agent process at a time
    installs, recovers, rolls back or rewrites the agent state in an install root.

    Within one process the lock is shared: a thread that asks while another thread of this process holds
    it goes on at once (the caller's own thread locks order them); :meth:`hold` nests. Other processes
    (or another :class:`AgentLock` on the same root) wait, polling, at most *timeout* seconds, then get
    :class:`AgentBusy`.
    """

    def __init__(self, root: Path, *, poll: float = 0.05):
        self.path = Path(root) / STATE_DIR / LOCK_NAME
        self.poll = poll
        self._mutex = threading.Lock()
        self._fd: int | None = None
        self._depth = 0

    def _try(self) -> bool:
        with self._mutex:
            if self._fd is not None:
                self._depth += 1
                return True
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except BaseException:
                os.close(fd)
                raise
            self._fd, self._depth = fd, 1
            return True

    def acquire(self, timeout: float) -> None:
        """Take the lock, waiting at most *timeout* seconds. Raises AgentBusy, InstallError (cannot open)."""
        deadline = time.monotonic() + timeout
        try:
            while not self._try():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AgentBusy(f"another agent process is installing in {self.path.parent.parent} "
                                    f"(waited {timeout:g}s for {self.path}); try again when it is done")
                time.sleep(min(self.poll, left))
        except OSError as e:
            raise InstallError(f"cannot lock {self.path}: {e}") from e

    def release(self) -> None:
        with self._mutex:
            self._depth -= 1
            if self._depth == 0 and self._fd is not None:
                fd, self._fd = self._fd, None
                os.close(fd)  # closing the only descriptor drops the flock

    @contextlib.contextmanager
    def hold(self, timeout: float) -> Iterator[None]:
        self.acquire(timeout)
        try:
            yield
        finally:
            self.release()


def crash_point(step: str) -> None:
    """Kill this process with SIGKILL after *step*, or pause there (see PAUSE_ENV), when a test hook
    names it; otherwise nothing."""
    if os.environ.get(CRASH_ENV) == step:
        log.warning("test hook %s=%s: SIGKILL now", CRASH_ENV, step)
        os.kill(os.getpid(), signal.SIGKILL)
    pause_step, _, marker = os.environ.get(PAUSE_ENV, "").partition(":")
    if pause_step == step and marker and not os.path.exists(marker):
        log.warning("test hook %s: pausing after %s while %s exists", PAUSE_ENV, step, marker)
        atomic_write_text(Path(marker), f"{os.getpid()}\n")
        deadline = time.monotonic() + PAUSE_MAX
        while os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.05)


def staged_path(bin_dir: Path, binary: str) -> Path:
    return bin_dir / f".{binary}.staged"


@dataclass(frozen=True)
class Intent:
    """One swap in progress, as written to the journal before the first visible change."""

    subsystem: str
    bin_dir: str
    binary: str
    new_sha: str
    new_version: str  # rendered .version text of the binary going in
    old_sha: str | None
    old_version: str | None
    kind: str = "update"  # update | restore (automatic, after a failed health check) | rollback

    @property
    def target(self) -> Path:
        return Path(self.bin_dir) / self.binary

    @property
    def staged(self) -> Path:
        return staged_path(Path(self.bin_dir), self.binary)


class Journal:
    """Intent files under ``<root>/.sync-tools/journal/``, one per subsystem, written atomically."""

    def __init__(self, root: Path):
        self.dir = Path(root) / STATE_DIR / "journal"

    def path(self, subsystem: str) -> Path:
        return self.dir / f"{subsystem}.json"

    def write(self, intent: Intent) -> None:
        atomic_write_json(self.path(intent.subsystem), asdict(intent))

    def remove(self, subsystem: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(subsystem).unlink()
            fsync_dir(self.dir)

    def pending(self) -> list[Intent]:
        """Every intent not yet ended. Raises DataError for an unreadable journal file."""
        if not self.dir.is_dir():
            return []
        out = []
        for p in sorted(self.dir.glob("*.json")):
            try:
                out.append(Intent(**json.loads(p.read_text(encoding="utf-8"))))
            except (ValueError, TypeError, OSError) as e:
                raise DataError(f"{p}: unreadable install journal: {e}") from e
        return out


def _sha_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except FileNotFoundError:
        return None


def _read_text_or_none(path: Path) -> str | None:
    """The .version text at *path*; None when it is missing, over the cap or not UTF-8. Such a file
    describes no binary anyone could check, and another tool may have written it: it must not stop the
    install (a restore checks the bytes themselves, and falls back to a made-up .version)."""
    try:
        data = read_capped(path, MAX_VERSION_FILE, missing_ok=True)
        return None if data is None else data.decode("utf-8")
    except (DataError, UnicodeDecodeError) as e:
        log.warning("%s: ignoring a .version that is no text the agent can keep (%s)", path, e)
        return None


def save_previous(bin_dir: Path, binary: str, *, source: Path | None = None) -> str | None:
    """Keep the current binary and its .version in ``.previous/`` without the binary path ever going
    missing: a hard link (a copy where links fail) replaces ``.previous/<binary>`` atomically.
    *source*: the directory the current binary and its .version are in, when not *bin_dir* (the binary
    moved place: :mod:`.relocated`). Returns the .version text kept (None: there was none)."""
    current = (source or bin_dir) / binary
    prev = bin_dir / PREVIOUS_DIR
    prev.mkdir(exist_ok=True)
    tmp = prev / f".{binary}.tmp"
    tmp.unlink(missing_ok=True)
    try:
        os.link(current, tmp)
    except OSError:
        shutil.copy2(current, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
    os.replace(tmp, prev / binary)
    version_text = _read_text_or_none((source or bin_dir) / VERSION_FILE)
    if version_text is None:
        (prev / VERSION_FILE).unlink(missing_ok=True)
    else:
        atomic_write_text(prev / VERSION_FILE, version_text)
    fsync_dir(prev)
    return version_text


def begin(journal: Journal, *, subsystem: str, bin_dir: Path, binary: str, new_sha: str,
          new_version: VersionInfo, kind: str = "update",
          replaces: tuple[str, str | None] | None = None) -> Intent:
    """Record the intent to swap in the already staged and verified ``staged_path(bin_dir, binary)``.
    *replaces*: when nothing is at the target, the sha256 and .version text of the build the swap
    replaces all the same (the binary moved place), already kept in ``.previous/``."""
    target = bin_dir / binary
    old_sha, old_version = _sha_or_none(target), _read_text_or_none(bin_dir / VERSION_FILE)
    if old_sha is None and replaces is not None:
        old_sha, old_version = replaces
    intent = Intent(
        subsystem=subsystem, bin_dir=str(bin_dir), binary=binary, new_sha=new_sha,
        new_version=new_version.render(), old_sha=old_sha, old_version=old_version, kind=kind,
    )
    try:
        journal.write(intent)
    except OSError as e:
        raise InstallError(f"{subsystem}: cannot write the install journal: {e}") from e
    crash_point("journaled")
    return intent


def swap(intent: Intent, *, keep_previous: bool = True) -> None:
    """Steps 3-5: keep the old binary in ``.previous/``, move the staged one in, write ``.version``.

    Raises InstallError on a local failure; the intent stays in the journal so :func:`recover` (or
    the caller) can finish or retry it, and the binary path holds the old or the new verified binary.
    """
    bin_dir = Path(intent.bin_dir)
    try:
        # nothing at the target: the binary moved place, and the build it replaces is in .previous already
        replaced = intent.old_sha is not None and intent.old_sha != intent.new_sha and intent.target.exists()
        if keep_previous and replaced:
            save_previous(bin_dir, intent.binary)
        crash_point("previous-saved")
        if intent.staged.exists():
            os.replace(intent.staged, intent.target)
            fsync_dir(bin_dir)
        elif _sha_or_none(intent.target) != intent.new_sha:
            # never write the new .version over the old binary: the install did not happen
            raise InstallError(f"{intent.subsystem}: the staged binary {intent.staged} is gone and "
                               f"{intent.target} is not the new one; nothing was installed")
        crash_point("swapped")
        atomic_write_text(bin_dir / VERSION_FILE, intent.new_version)
        crash_point("version-written")
    except OSError as e:
        raise InstallError(f"{intent.subsystem}: swap failed: {e}") from e


def stage_previous(bin_dir: Path, binary: str, *, expect_sha: str | None = None,
                   expect_version: str | None = None) -> tuple[str, VersionInfo]:
    """Stage ``.previous/<binary>`` for a swap back; returns its sha256 and the .version to write.

    Without *expect_sha* (a rollback the user asked for) the previous binary is trusted only through
    its own ``.version``: raises InstallError when there is no previous binary or no .version, DataError
    when the .version does not match the bytes (a previous binary is never put back unverified).

    With *expect_sha* (the automatic restore after a failed update: the journal's record of the binary
    the update replaced) the bytes are checked against it instead, and the .version is *expect_version*
    (the text the update replaced) when it describes those bytes, else ``.previous/.version`` when it
    does, else one made up from the checksum alone (``commit: unknown``: the old binary may never have
    had a valid one, and a stale one's commit and version describe other bytes).
    Raises InstallError when the previous binary is missing, DataError when it is not the expected one.
    """
    prev = bin_dir / PREVIOUS_DIR
    src = prev / binary
    if not src.is_file():
        raise InstallError(f"{bin_dir}: no previous binary to go back to")
    sha = sha256_file(src)
    if expect_sha is None:
        info = read_version(prev)
        if info is None:
            raise InstallError(f"{prev}: no .version for the previous binary")
        if info.checksum != sha:
            raise DataError(f"{src}: sha256 {sha} does not match its .version ({info.checksum})")
    else:
        if sha != expect_sha:
            raise DataError(f"{src}: sha256 {sha} is not the binary the update replaced ({expect_sha})")
        info = _version_for(sha, expect_version, prev)
    staged = staged_path(bin_dir, binary)
    staged.unlink(missing_ok=True)
    try:
        os.link(src, staged)
    except OSError:
        shutil.copy2(src, staged)
        with open(staged, "rb") as fh:
            os.fsync(fh.fileno())
    return sha, info


def _version_for(sha: str, text: str | None, prev: Path) -> VersionInfo:
    """The first of *text* and ``<prev>/.version`` that parses and names *sha*; else a made-up one."""
    candidates: list[VersionInfo | None] = []
    if text is not None:
        with contextlib.suppress(DataError):
            candidates.append(parse_version_text(text))
    with contextlib.suppress(DataError, OSError):
        candidates.append(read_version(prev))
    for info in candidates:
        if info is not None and info.checksum == sha:
            return info
    log.warning("%s: no .version describes the previous binary %s; writing one with commit 'unknown'",
                prev.parent, sha[:12])
    return VersionInfo(commit="unknown", timestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                       checksum=sha)


def recover(journal: Journal) -> list[Intent]:
    """Finish every interrupted intent forward; return them so the caller reloads and health-checks.

    An intent whose binary is already in place gets its ``.version`` rewritten; one whose staged file
    is still there (and verifies) is swapped in; one with neither (the staged file was lost) is left
    with whatever verified binary is at the path and reported by a warning.
    """
    done = []
    for intent in journal.pending():
        current = _sha_or_none(intent.target)
        if current != intent.new_sha:
            staged_sha = _sha_or_none(intent.staged)
            if staged_sha == intent.new_sha:
                log.warning("%s: finishing an interrupted %s (swap)", intent.subsystem, intent.kind)
                swap(intent, keep_previous=intent.kind != "restore")
            else:
                intent.staged.unlink(missing_ok=True)
                log.warning("%s: interrupted %s had nothing staged; keeping the installed binary",
                            intent.subsystem, intent.kind)
                journal.remove(intent.subsystem)
                continue
        else:
            log.warning("%s: finishing an interrupted %s (.version)", intent.subsystem, intent.kind)
            if _read_text_or_none(intent.target.parent / VERSION_FILE) != intent.new_version:
                atomic_write_text(intent.target.parent / VERSION_FILE, intent.new_version)
            _repair_previous_version(intent)
        done.append(intent)
    return done


def _repair_previous_version(intent: Intent) -> None:
    """A crash inside save_previous can leave ``.previous/.version`` one generation behind its binary."""
    prev = Path(intent.bin_dir) / PREVIOUS_DIR
    if intent.old_sha and intent.old_version and _sha_or_none(prev / intent.binary) == intent.old_sha:
        if _read_text_or_none(prev / VERSION_FILE) != intent.old_version:
            atomic_write_text(prev / VERSION_FILE, intent.old_version)


def clean_stale(bin_dir: Path, binary: str, journal: Journal, subsystem: str) -> None:
    """Remove a staged file no intent refers to (a crash before the journal was written)."""
    if not journal.path(subsystem).exists():
        staged_path(bin_dir, binary).unlink(missing_ok=True)
        (bin_dir / PREVIOUS_DIR / f".{binary}.tmp").unlink(missing_ok=True)


def own_dir(path: Path) -> Path:
    """Make sure *path*, a directory of the install root's own state, is a real directory (created when
    missing) and not a symlink or something else put there: the agent never writes or deletes through a
    link out of its state. Returns *path*; raises InstallError naming what is in the way."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        modes = [(p, os.lstat(p).st_mode) for p in (path.parent, path)]
    except OSError as e:
        raise InstallError(f"cannot make {path}: {e.strerror or e}") from e
    for p, mode in modes:
        if not stat.S_ISDIR(mode):
            what = "a symlink" if stat.S_ISLNK(mode) else "not a directory"
            raise InstallError(f"{p} is {what}; the agent keeps its state only in a directory of its own "
                               f"(remove it and the agent recreates it)")
    return path


def clean_downloads(downloads: Path) -> list[str]:
    """Delete the partial downloads a crash left in *downloads*: regular files only, never through a link.
    What the agent did not create (a subdirectory, a link, a *downloads* that is itself a link or a file)
    is left alone, logged and returned."""
    try:
        st = os.lstat(downloads)
    except FileNotFoundError:
        return []
    if not stat.S_ISDIR(st.st_mode):
        log.warning("%s is not a directory the agent made (a symlink or a file); leaving it and what it "
                    "points to alone", downloads)
        return [str(downloads)]
    skipped = []
    try:
        with os.scandir(downloads) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.path)
                else:
                    skipped.append(entry.path)
    except OSError as e:
        log.warning("cannot clean %s: %s", downloads, e.strerror or e)
        return [str(downloads)]
    if skipped:
        log.warning("left in %s what the agent did not create: %s", downloads, ", ".join(sorted(skipped)))
    return skipped
