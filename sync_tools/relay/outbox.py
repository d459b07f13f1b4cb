"""The relay's durable outbox, event log and small state table, in one SQLite file (WAL).

A delivery is committed (fsynced: ``synchronous=FULL``) before the relay answers 202, so an
accepted delivery survives a SIGKILL or power cut. Concurrent webhook requests share commits: a
single committer thread takes every delivery waiting at that moment and writes them in one
transaction (group commit), so throughput is not bounded by one fsync per request.

Tables:

- ``deliveries``: one row per accepted ``X-GitHub-Delivery`` (primary key: a redelivery is found
  and not acted on twice).
- ``jobs``: the work: ``kind`` (dispatch | fanout | push), ``status`` (pending | running | done |
  dead), ``attempts``, ``next_attempt``, ``last_error``. ``lane`` serialises jobs that must not run
  side by side (a local build per subsystem). ``owner`` names the process running a job; at start,
  :meth:`Outbox.resume` puts back to ``pending`` the ``running`` rows whose owner process is gone
  (killed), and only those, so a second process sharing the file (a gunicorn worker starting while
  the old one drains) never re-runs a job that is still in progress.
- ``events``: the agent event log; the row id is the SSE ``id:``.
- ``state``: key/value (the last fanned-out manifest).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sync_tools.errors import SyncToolsError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

PENDING, RUNNING, DONE, DEAD = "pending", "running", "done", "dead"
PROBE_INTERVAL = 1.0  # seconds between two write probes of /health (Outbox.problem)
#: The WAL is checkpointed into the database every WAL_PAGES pages (SQLite's default, 1000, let it grow to
#: ~4 MiB) and truncated back to WAL_LIMIT bytes when it restarts (by default it never shrinks).
WAL_PAGES = 128
WAL_LIMIT = 512 * 1024
#: Finished rows (done jobs, their deliveries, events) older than RETENTION seconds are pruned every
#: PRUNE_EVERY seconds (SYNC_TOOLS_RETENTION_DAYS, SYNC_TOOLS_PRUNE_EVERY for the relay).
RETENTION = 7 * 86400.0
PRUNE_EVERY = 600.0
MIN_FREE = 256 * 1024  # bytes free under which /health says the disk is full (a commit may still fit)
COALESCE_WINDOW = 3600.0  # a second delivery naming the same subsystem+version within this is not re-dispatched

_SCHEMA = """
CREATE TABLE IF NOT EXISTS deliveries (
    delivery TEXT PRIMARY KEY,
    event TEXT NOT NULL,
    received REAL NOT NULL,
    summary TEXT NOT NULL,
    digest TEXT
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    delivery TEXT,
    kind TEXT NOT NULL,
    lane TEXT,
    dedupe TEXT,
    payload TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    last_error TEXT,
    owner TEXT
);
-- the head of each lane is one seek, however many jobs wait behind a busy lane (Outbox._heads);
-- it replaces jobs_due (status, next_attempt)
DROP INDEX IF EXISTS jobs_due;
CREATE INDEX IF NOT EXISTS jobs_lane_due ON jobs (status, lane, next_attempt);
CREATE INDEX IF NOT EXISTS jobs_dedupe ON jobs (dedupe);
CREATE INDEX IF NOT EXISTS jobs_pending_dedupe ON jobs (dedupe) WHERE status = 'pending';
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class OutboxError(SyncToolsError):
    """The outbox database cannot be opened or written."""


@dataclass(frozen=True)
class NewJob:
    """A job to create with a delivery (or on its own).

    *supersedes*: a dedupe prefix naming a slot that holds at most one pending job (``dispatch:nats:``).
    When a pending job is in the slot, this one takes its place if ``newer(pending payload)`` says it
    is newer, and is dropped (counted as coalesced) otherwise: a burst of versions queues one
    dispatch of the newest, not one per version. Running jobs are never touched."""

    kind: str
    payload: dict[str, Any]
    lane: str | None = None
    dedupe: str | None = None
    supersedes: str | None = None
    newer: Callable[[dict[str, Any]], bool] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        # a group commit keeps each slot's pending job for the whole transaction (Outbox._write_batch):
        # that is only the job a query would find when every job in a slot's key range is a job of the
        # slot, with a key of its own, and no slot's range holds another's (the relay's slots are
        # "dispatch:<subsystem>:", and a subsystem's name has no colon)
        if self.supersedes is not None and (self.newer is None or self.dedupe is None
                                            or not self.dedupe.startswith(self.supersedes)
                                            or self.dedupe == self.supersedes):
            raise ValueError(f"a job that supersedes {self.supersedes!r} needs newer() and a dedupe key under it "
                             f"(got {self.dedupe!r})")


@dataclass(frozen=True)
class Job:
    id: int
    kind: str
    payload: dict[str, Any]
    delivery: str | None
    lane: str | None
    status: str
    attempts: int
    next_attempt: float
    created: float
    last_error: str | None


@dataclass(frozen=True)
class Recorded:
    """What :meth:`Outbox.record` did: ``duplicate`` when the delivery id was already known (nothing
    written); ``jobs`` the ids created; ``coalesced`` how many jobs an earlier one already covers."""

    duplicate: bool
    jobs: tuple[int, ...] = ()
    coalesced: int = 0
    digest: str | None = None  # a duplicate's: the body digest recorded the first time (None: unknown)
    replaced: int = 0  # of ``jobs``, how many took a pending job's place (NewJob.supersedes): no new work


@dataclass(frozen=True)
class Event:
    id: int
    type: str
    data: dict[str, Any]
    created: float


@dataclass(frozen=True)
class Stats:
    queue_depth: int
    running: int
    dead: int
    done: int
    oldest_pending_age: float | None
    last_event_id: int


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclass
class _Pending:
    delivery: str
    event: str
    summary: str
    jobs: list[NewJob]
    digest: str | None
    # held until the committer has filled in result/error: a bare lock is the cheapest one-shot
    # signal between two threads (threading.Event builds a Condition, and a waiter lock per wait)
    done: threading.Lock = field(default_factory=_held_lock)
    result: Recorded | None = None
    error: BaseException | None = None
    notify: Callable[[], None] | None = None  # called by the committer instead of releasing *done*

    def outcome(self) -> Recorded | OutboxError:
        """What the commit gave, once it finished."""
        if self.error is not None:
            failure = OutboxError(f"cannot record delivery {self.delivery}: {self.error}")
            failure.__cause__ = self.error
            return failure
        assert self.result is not None
        return self.result


@dataclass
class _Slot:
    """A supersede slot's pending job as one transaction has made it so far (``Outbox._add_jobs``)."""

    id: int
    payload: dict[str, Any]  # as a read of the row gives it: the JSON text's, not the caller's object
    dedupe: str | None = None
    delivery: str | None = None
    updated: float = 0.0
    text: str = ""  # the payload's JSON, to write back
    changed: bool = False


#: rows per multi-row statement: far below SQLite's 32,766 bound variables (999 before SQLite 3.32)
_CHUNK = 100


def _insert_deliveries(conn: sqlite3.Connection, items: list[_Pending], now: float) -> list[bool]:
    """Insert the deliveries of *items*, a known id ignored; returns, per item, whether it was new
    (an id twice in *items*: the first is)."""
    inserted: set[str] = set()
    for i in range(0, len(items), _CHUNK):
        chunk = items[i:i + _CHUNK]
        rows = conn.execute("INSERT OR IGNORE INTO deliveries (delivery, event, received, summary, digest) VALUES "
                            + ", ".join(["(?, ?, ?, ?, ?)"] * len(chunk)) + " RETURNING delivery",
                            [v for it in chunk for v in (str(it.delivery), it.event, now, it.summary, it.digest)])
        inserted.update(r[0] for r in rows)
    fresh = []
    for it in items:  # RETURNING gives the id as stored: text
        fresh.append(str(it.delivery) in inserted)
        inserted.discard(str(it.delivery))
    return fresh


def _covering(conn: sqlite3.Connection, keys: list[str | None], now: float) -> dict[str, set[int]]:
    """By dedupe key of *keys*, the jobs that cover it: pending or running, or done within
    COALESCE_WINDOW (a second delivery of the same subsystem and version is not dispatched again)."""
    wanted = list(dict.fromkeys(k for k in keys if k is not None))
    cover: dict[str, set[int]] = {}
    for i in range(0, len(wanted), _CHUNK):
        chunk = wanted[i:i + _CHUNK]
        for key, job in conn.execute(f"SELECT dedupe, id FROM jobs WHERE dedupe IN ({', '.join('?' * len(chunk))}) "
                                     "AND (status IN ('pending', 'running') OR (status = 'done' AND updated >= ?))",
                                     (*chunk, now - COALESCE_WINDOW)):
            cover.setdefault(key, set()).add(int(job))
    return cover


def _write_slots(conn: sqlite3.Connection, slots: dict[str, _Slot]) -> None:
    """Write back the slots whose pending job a newer version replaced: one UPDATE per slot, however
    many versions of it the transaction saw (a burst of tags in one group commit)."""
    for kept in slots.values():
        if kept.changed:
            conn.execute("UPDATE jobs SET payload = ?, dedupe = ?, delivery = ?, updated = ?, attempts = 0, "
                         "last_error = NULL WHERE id = ?", (kept.text, kept.dedupe, kept.delivery, kept.updated, kept.id))
            kept.changed = False


def _slot_range(slot: str) -> tuple[str, str]:
    """The dedupe keys that start with *slot*, as a range an index can seek: [slot, slot with its last
    character moved up by one)."""
    return slot, slot[:-1] + chr(ord(slot[-1]) + 1)


def _payload(raw: Any) -> dict[str, Any] | None:
    """A stored JSON object, or None when the column holds something else."""
    try:
        value = json.loads(raw)
    except (TypeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _start_time(pid: int) -> str | None:
    """The kernel's start time of *pid* (Linux /proc), telling a live process from a reused pid."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rsplit(")", 1)[1].split()[19]


def process_id() -> str:
    """This process as a job owner: ``<pid>:<start time>``."""
    pid = os.getpid()
    return f"{pid}:{_start_time(pid) or 0}"


def owner_alive(owner: str | None) -> bool:
    if not owner or ":" not in owner:
        return False
    pid_s, start = owner.split(":", 1)
    try:
        pid = int(pid_s)
    except ValueError:
        return False
    if Path("/proc/self/stat").exists():
        return _start_time(pid) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _identity(path: Path) -> tuple[tuple[int, int], ...]:
    """(device, inode) of the database and its WAL. Raises OSError when either is missing."""
    return tuple((st.st_dev, st.st_ino) for st in (os.stat(path), os.stat(f"{path}-wal")))


def _connect(path: Path, *, create: bool = True) -> sqlite3.Connection:
    # a connection opened after the file was removed must not create an empty database in its place
    target = path if create else f"file:{urllib.parse.quote(str(path))}?mode=rw"
    conn = sqlite3.connect(target, timeout=30.0, isolation_level=None, check_same_thread=False, uri=not create)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA synchronous = FULL")  # in WAL mode, FULL fsyncs the log at every commit
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_PAGES}")
    conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT}")
    return conn


def open_wal(path: Path, schema: str) -> sqlite3.Connection:
    """The writer connection to the database at *path* (made, with its folder, when missing), in WAL
    mode with *schema* applied. Raises sqlite3.Error / OSError; OutboxError when WAL is refused."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = _connect(path)
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if mode.lower() != "wal":
        conn.close()
        raise OutboxError(f"{path}: SQLite would not switch to WAL (got {mode})")
    conn.executescript(schema)
    return conn


class Outbox:
    """The SQLite outbox. Thread-safe; several processes may share the file (writes take
    ``BEGIN IMMEDIATE``). Raises OutboxError when the database cannot be opened."""

    def __init__(self, path: Path, *, now: Callable[[], float] = time.time, batch: int = 512,
                 retention: float = RETENTION, prune_every: float = PRUNE_EVERY):
        self.path = Path(path)
        self.now = now
        self.retention, self.prune_every = retention, prune_every
        self._pruned = time.monotonic()
        self.owner = process_id()
        self._batch = batch
        try:
            self._w = open_wal(self.path, _SCHEMA)
            if "digest" not in {r[1] for r in self._w.execute("PRAGMA table_info(deliveries)")}:
                self._w.execute("ALTER TABLE deliveries ADD COLUMN digest TEXT")  # databases from before it
            # a damaged page would otherwise surface later, as a traceback from a start-up thread
            check = [" ".join(str(r[0]).split()) for r in self._w.execute("PRAGMA quick_check(3)")]
            if check != ["ok"]:
                raise OutboxError(f"the relay database {self.path} is corrupt ({'; '.join(check)}); "
                                  "move it aside (or restore a backup) and start again")
            # bookkeeping writes (claims, outcomes) skip the fsync: their own connection, so no
            # transaction has to switch ``synchronous`` back and forth
            self._fast = _connect(self.path)
            self._fast.execute("PRAGMA synchronous = NORMAL")
            # writers' queue across processes (see _tx); Windows has no flock and keeps SQLite's
            self._lockfile = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o600) if fcntl else None
            # the files this process writes: a commit is only acknowledged while they are still the
            # ones at the path (a restart reads the path, not our open descriptors)
            self._files = _identity(self.path)
        except (sqlite3.Error, OSError) as e:
            raise OutboxError(f"cannot open the relay database {self.path}: {e}; if it is corrupt, move it "
                              "aside (or restore a backup) and start again") from e
        self._probe_lock = threading.Lock()
        self._probed: tuple[float, str | None] = (-PROBE_INTERVAL, None)
        self._wlock = threading.RLock()
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all: list[sqlite3.Connection] = [self._w, self._fast]
        self._inbox: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._committer: threading.Thread | None = None
        self._bad_events: set[int] = set()  # ids of event rows that do not decode, logged once each
        self._closed = False
        self._stop_taken = False  # the committer took the stop sentinel (close)
        self._start_lock = threading.Lock()
        self._claim_lock = threading.Lock()

    # ---------------------------------------------------------------------------------- plumbing

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A pooled read connection (WAL readers never wait for the writer)."""
        try:
            conn = self._readers.get_nowait()
        except queue.Empty:
            try:
                conn = _connect(self.path, create=False)
            except sqlite3.Error as e:  # removed or unreadable: the caller answers 503, not 500
                raise OutboxError(f"cannot open the relay database {self.path}: {e}") from e
            with self._wlock:
                self._all.append(conn)
        keep = True
        try:
            yield conn
        except sqlite3.Error as e:
            # a file at the path that is not the database (a restore half copied, a replacement): the
            # caller answers 503 or tries again later, never 500; this connection is not kept
            keep = False
            with self._wlock, suppress(ValueError, sqlite3.Error):
                self._all.remove(conn)
                conn.close()
            raise OutboxError(f"cannot read the relay database {self.path}: {e}") from e
        finally:
            if keep:
                self._readers.put(conn)

    def check_files(self) -> None:
        """Raise OutboxError unless the database and its WAL at the path are still the files this
        process opened: removed or replaced, a commit would land in a file no restart reads."""
        try:
            now = _identity(self.path)
        except OSError as e:
            raise OutboxError(f"the relay database {self.path} (or its -wal) is gone: {e.strerror or e}; "
                              "restart the relay") from e
        if now != self._files:
            raise OutboxError(f"the relay database {self.path} was replaced while the relay ran; restart it")

    def problem(self) -> str | None:
        """Why a delivery could not be committed now (None: it could): the files were removed or
        replaced, the disk has less than MIN_FREE bytes free, or a real write (read-only database,
        unwritable directory) fails. The
        probe writes at most once per PROBE_INTERVAL seconds; its answer is kept in between."""
        with self._probe_lock:
            at, found = self._probed
            if time.monotonic() - at < PROBE_INTERVAL:
                return found
            try:
                self.check_files()
                fs = os.statvfs(self.path.parent)
                if fs.f_bavail * fs.f_frsize < MIN_FREE:
                    raise OutboxError(f"the disk holding {self.path} is full "
                                      f"({fs.f_bavail * fs.f_frsize} bytes free)")
                with self._tx(durable=False) as conn:  # not fsynced: the probe must not slow the commits
                    conn.execute("INSERT OR REPLACE INTO state (key, value) VALUES ('health_probe', ?)",
                                 (str(self.now()),))
                found = None
            except (OutboxError, sqlite3.Error, OSError) as e:
                found = str(e)
            self._probed = (time.monotonic(), found)
            return found

    @contextmanager
    def _tx(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction. ``durable=False`` skips the fsync at commit (the next durable commit
        carries it to disk): for bookkeeping whose loss in a crash only repeats work, like a claim.

        Writers of every process sharing the file queue on an flock of ``<db>.lock`` first: the
        kernel hands the lock to the next waiter the moment it is free, where SQLite's own busy
        handler would sleep and retry (1, 2, 5, 10 ... 100 ms), which put whole seconds into the
        latency tail once two processes took webhooks. The lock dies with its process.
        """
        with self._writer() as conn:
            if not durable:
                conn = self._fast
            else:
                self.check_files()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def _writer(self) -> Iterator[sqlite3.Connection]:
        """This process's turn to write (the thread lock, then the cross-process flock); yields the
        durable connection. A single statement run here is its own transaction."""
        with self._wlock:
            if self._lockfile is not None:
                fcntl.flock(self._lockfile, fcntl.LOCK_EX)
            try:
                yield self._w
            finally:
                if self._lockfile is not None:
                    fcntl.flock(self._lockfile, fcntl.LOCK_UN)

    def close(self) -> None:
        """Stop the committer and close every connection."""
        with self._start_lock:
            self._closed = True
            if self._committer is not None:
                self._inbox.put(None)
                self._committer.join(timeout=10)
                self._committer = None
        with self._wlock:
            for conn in self._all:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._all = []
            if self._lockfile is not None:
                os.close(self._lockfile)
                self._lockfile = None

    # ------------------------------------------------------------------------------------ ingest

    def record(self, delivery: str, event: str, summary: str, jobs: list[NewJob],
               timeout: float = 8.0, digest: str | None = None) -> Recorded:
        """Durably record a delivery, its body's *digest* and its jobs; returns once the commit is on disk.

        A known delivery id writes nothing and returns ``duplicate=True`` with the digest recorded the
        first time. Raises OutboxError if the write fails or does not finish within *timeout* seconds
        (GitHub waits 10 s).
        """
        self._ensure_committer()
        item = _Pending(delivery, event, summary, jobs, digest)
        self._inbox.put(item)
        if not item.done.acquire(timeout=timeout):
            raise OutboxError(f"the outbox did not commit delivery {delivery} within {timeout:.0f} s")
        outcome = item.outcome()
        if isinstance(outcome, OutboxError):
            raise outcome
        return outcome

    def submit(self, delivery: str, event: str, summary: str, jobs: list[NewJob], *, digest: str | None,
               notify: Callable[[], None]) -> _Pending:
        """:meth:`record` for an event loop: queue the delivery for the next group commit and return at
        once; the committer thread calls *notify* (which must be thread-safe and quick, e.g. a
        ``loop.call_soon_threadsafe``) when the commit finished, and the item's :meth:`_Pending.outcome`
        then says how."""
        self._ensure_committer()
        item = _Pending(delivery, event, summary, jobs, digest, notify=notify)
        self._inbox.put(item)
        return item

    def _ensure_committer(self) -> None:
        if self._committer is not None:
            return
        with self._start_lock:
            if self._closed:
                raise OutboxError("the outbox is closed")
            if self._committer is None:
                t = threading.Thread(target=self._commit_loop, name="outbox-committer", daemon=True)
                t.start()
                self._committer = t

    def _commit_loop(self) -> None:
        while True:
            first = self._inbox.get()
            if first is None:
                return
            items = [first]
            stop = self._take_waiting(items)
            try:
                self._write_batch(items, more=not stop)
            except BaseException as e:  # noqa: BLE001 - handed to every waiting request
                for it in items:
                    it.result, it.error = None, e
            for it in items:
                if it.notify is None:
                    it.done.release()
                    continue
                try:
                    it.notify()
                except Exception:  # noqa: BLE001 - one waiter gone (its loop closed) must not stop the others
                    log.exception("outbox: telling the waiter of delivery %s failed", it.delivery)
            if stop or self._stop_taken:
                return

    def _take_waiting(self, items: list[_Pending]) -> bool:
        """Move what waits in the inbox into *items*, up to the batch size; returns whether the stop
        sentinel was among it (and remembers it in ``_stop_taken``)."""
        while len(items) < self._batch:
            try:
                nxt = self._inbox.get_nowait()
            except queue.Empty:
                return False
            if nxt is None:
                self._stop_taken = True
                return True
            items.append(nxt)
        return False

    def _write_batch(self, items: list[_Pending], *, more: bool = False) -> None:
        """Write *items* in one durable transaction. With *more*, what reached the inbox while this
        process waited for its turn to write joins the batch (appended to *items*): with two processes
        on one file each waits for the other's commit, and without this each commit would carry only
        what came before the wait.

        The answers are those of one transaction per delivery, in order, but the statements are few:
        the deliveries go in with one INSERT, the jobs that cover their dedupe keys are read with one
        SELECT, and each supersede slot is read once and written once. The lock this holds is the one
        the other ingest process waits for."""
        with self._tx() as conn:
            if more:
                self._take_waiting(items)
            now = self.now()
            fresh = _insert_deliveries(conn, items, now)
            cover = _covering(conn, [j.dedupe for it, new in zip(items, fresh, strict=True) if new for j in it.jobs],
                              now)
            slots: dict[str, _Slot] = {}
            for it, new in zip(items, fresh, strict=True):
                if not new:
                    row = conn.execute("SELECT digest FROM deliveries WHERE delivery = ?", (it.delivery,)).fetchone()
                    it.result = Recorded(duplicate=True, digest=row[0] if row else None)
                    continue
                ids, coalesced, replaced = self._add_jobs(conn, it.jobs, it.delivery, now, slots, cover)
                it.result = Recorded(duplicate=False, jobs=tuple(ids), coalesced=coalesced, replaced=replaced)
            _write_slots(conn, slots)

    def _add_jobs(self, conn: sqlite3.Connection, jobs: list[NewJob], delivery: str | None, now: float,
                  slots: dict[str, _Slot] | None = None,
                  cover: dict[str, set[int]] | None = None) -> tuple[list[int], int, int]:
        """Insert *jobs*; returns their ids, how many were coalesced, how many replaced a pending job.

        A group commit passes what it keeps for the whole transaction (:meth:`_write_batch`): *slots*,
        the supersede slots read so far, written back by the caller (:func:`_write_slots`), and
        *cover*, by dedupe key, the jobs that cover it now (:func:`_covering`), kept current here as
        jobs are added and slots change. Without them both are made for *jobs* and the slots are
        written before this returns."""
        own = slots is None
        slots = {} if slots is None else slots
        cover = _covering(conn, [j.dedupe for j in jobs], now) if cover is None else cover
        ids: list[int] = []
        coalesced = replaced = 0
        for job in jobs:
            if job.dedupe is not None and cover.get(job.dedupe):
                coalesced += 1
                continue
            slot = job.supersedes if job.newer is not None else None
            if slot is not None and slot not in slots:
                # the slot's pending job, through the partial index of pending jobs (done ones are many);
                # read once per transaction, then kept in *slots* as this transaction changes it
                held = conn.execute("SELECT id, payload, dedupe FROM jobs INDEXED BY jobs_pending_dedupe WHERE "
                                    "status = 'pending' AND dedupe >= ? AND dedupe < ? ORDER BY id DESC LIMIT 1",
                                    _slot_range(slot)).fetchone()
                if held is not None:
                    slots[slot] = _Slot(int(held[0]), json.loads(held[1]), held[2], text=held[1])
            if slot is not None and slot in slots:
                assert job.newer is not None
                kept = slots[slot]
                if job.newer(kept.payload):
                    # a new version starts its own count of attempts (the wait of a backoff stays: the
                    # remote that failed is the same); written back by _write_slots
                    if kept.dedupe is not None:
                        cover.get(kept.dedupe, set()).discard(kept.id)
                    kept.text = json.dumps(job.payload, sort_keys=True)
                    kept.payload, kept.dedupe, kept.delivery, kept.updated = json.loads(kept.text), job.dedupe, delivery, now
                    kept.changed = True
                    if job.dedupe is not None:
                        cover.setdefault(job.dedupe, set()).add(kept.id)
                    ids.append(kept.id)
                    replaced += 1
                else:
                    coalesced += 1
                continue
            text = json.dumps(job.payload, sort_keys=True)
            cur = conn.execute(
                "INSERT INTO jobs (delivery, kind, lane, dedupe, payload, status, attempts, next_attempt, "
                "created, updated) VALUES (?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?)",
                (delivery, job.kind, job.lane, job.dedupe, text, now, now, now))
            ids.append(int(cur.lastrowid or 0))
            if job.dedupe is not None:
                cover.setdefault(job.dedupe, set()).add(ids[-1])
            if slot is not None:
                slots[slot] = _Slot(ids[-1], json.loads(text), job.dedupe, text=text)
        if own:
            _write_slots(conn, slots)
        return ids, coalesced, replaced

    def pending_in_slot(self, slot: str, exclude: int) -> list[dict[str, Any]]:
        """The payloads of the pending jobs whose dedupe starts with *slot* (NewJob.supersedes), but *exclude*."""
        with self._read() as conn:
            rows = conn.execute("SELECT payload FROM jobs INDEXED BY jobs_pending_dedupe WHERE status = 'pending' "
                                "AND dedupe >= ? AND dedupe < ? AND id != ?", (*_slot_range(slot), exclude)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def add_jobs(self, jobs: list[NewJob], delivery: str | None = None) -> list[int]:
        """Create jobs outside a delivery (a fan-out after a local release). Raises OutboxError."""
        try:
            with self._tx() as conn:
                return self._add_jobs(conn, jobs, delivery, self.now())[0]
        except sqlite3.Error as e:
            raise OutboxError(f"cannot add jobs: {e}") from e

    def has_delivery(self, delivery: str) -> bool:
        with self._read() as conn:
            return conn.execute("SELECT 1 FROM deliveries WHERE delivery = ?", (delivery,)).fetchone() is not None

    # -------------------------------------------------------------------------------------- jobs

    @staticmethod
    def _job(row: tuple[Any, ...]) -> Job:
        """A job from its row; a payload that does not decode to an object (a row damaged on disk or
        written by hand) is an empty one, which :meth:`_claim` dead-letters and listings show."""
        payload = _payload(row[2])
        return Job(id=row[0], kind=row[1], payload=payload if payload is not None else {}, delivery=row[3],
                   lane=row[4], status=row[5], attempts=row[6], next_attempt=row[7], created=row[8],
                   last_error=row[9])

    _COLS = "id, kind, payload, delivery, lane, status, attempts, next_attempt, created, last_error"

    def resume(self, *, own: bool = True) -> int:
        """Put ``running`` jobs whose owner process has died back to ``pending``; returns how many.
        Call at start, before this process's workers run (*own*: this process's leftovers too, from
        an outbox opened before); workers also call it now and then with *own* False, for processes
        that died while this one ran (a server's old worker killed after its graceful timeout)."""
        n = 0
        with self._tx() as conn:
            owners = [r[0] for r in conn.execute("SELECT DISTINCT owner FROM jobs WHERE status = 'running'")]
            for owner in owners:
                if (own and owner == self.owner) or (owner != self.owner and not owner_alive(owner)):
                    cur = conn.execute("UPDATE jobs SET status = 'pending', owner = NULL, updated = ? "
                                       "WHERE status = 'running' AND owner IS ?", (self.now(), owner))
                    n += cur.rowcount
        if n:
            log.warning("resumed %d job(s) interrupted by a previous stop", n)
        return n

    # the lanes that have pending jobs, one index seek each (SQLite has no loose index scan of its own)
    _PENDING_LANES = (
        "WITH RECURSIVE lanes(lane) AS ("
        " SELECT MIN(lane) FROM jobs WHERE status = 'pending' AND lane IS NOT NULL"
        " UNION ALL SELECT (SELECT MIN(lane) FROM jobs WHERE status = 'pending' AND lane > lanes.lane)"
        " FROM lanes WHERE lanes.lane IS NOT NULL"
        ") SELECT lane FROM lanes WHERE lane IS NOT NULL")

    def _heads(self, conn: sqlite3.Connection) -> list[tuple[float, int]]:
        """``(next_attempt, id)`` of the first pending job of every free lane and of the jobs without
        a lane: the only jobs a worker could take next. A few index seeks, however deep the queue
        behind a busy lane is (a burst of deliveries queues behind the one GitHub dispatch lane)."""
        busy = {r[0] for r in conn.execute("SELECT lane FROM jobs WHERE status = 'running' AND lane IS NOT NULL")}
        head = "SELECT next_attempt, id FROM jobs WHERE status = 'pending' AND lane {} ORDER BY next_attempt, id LIMIT 1"
        heads = [tuple(r) for r in conn.execute(head.format("IS NULL"))]
        for (lane,) in conn.execute(self._PENDING_LANES).fetchall():
            if lane not in busy:
                heads += [tuple(r) for r in conn.execute(head.format("= ?"), (lane,))]
        return heads  # type: ignore[return-value]

    def claim(self) -> Job | None:
        """Take the next due pending job (oldest first) whose lane is free, marking it running."""
        with self._claim_lock:  # this process's threads look one at a time instead of racing for one job
            return self._claim()

    def _claim(self) -> Job | None:
        for _ in range(3):  # another thread or process may take the job between the look and the take
            now = self.now()
            # look on a reader, without the write lock, so the committer answering webhooks never waits
            with self._read() as conn:
                due = [h for h in self._heads(conn) if h[0] <= now]
            if not due:
                return None
            job_id = min(due)[1]
            # take it only if it is still pending and its lane still free, in one statement (so two
            # workers never run one lane). Not durable: a claim lost in a crash leaves the job
            # pending, which is what resume() would do.
            with self._writer():
                row = self._fast.execute(
                    "UPDATE jobs SET status = 'running', owner = ?, updated = ? WHERE id = ? AND status = 'pending' "
                    "AND (lane IS NULL OR NOT EXISTS (SELECT 1 FROM jobs AS r WHERE r.status = 'running' "
                    f"AND r.lane = jobs.lane)) RETURNING {self._COLS}", (self.owner, now, job_id)).fetchone()
            if row is not None:
                if _payload(row[2]) is not None:
                    return self._job(row)
                # claimed, so no other worker takes it meanwhile; it could never run, and left running
                # it would hold up its lane for good
                why = "its stored payload is not a JSON object (the row was damaged or written by hand)"
                with self._writer():
                    self._fast.execute("UPDATE jobs SET status = ?, owner = NULL, updated = ?, last_error = ? "
                                       "WHERE id = ?", (DEAD, now, why, job_id))
                log.error("job %d (%s) dead-lettered: %s", job_id, row[1], why)
        return None

    def next_due(self) -> float | None:
        """When the earliest pending job that could be claimed becomes due: jobs waiting for a busy
        lane are left out (the lane's job wakes the workers when it finishes). None: nothing."""
        with self._read() as conn:
            heads = self._heads(conn)
        return min(heads)[0] if heads else None

    def complete(self, job_id: int, follow: list[NewJob] | None = None) -> None:
        """Mark a job done and create its follow-up jobs, in one transaction."""
        now = self.now()
        # WAL without fsync survives a killed process (the frames are in the OS cache); only a power
        # loss could forget it, and then the job runs once more: at-least-once, and no fsync here to
        # hold up the commits that answer GitHub.
        done = "UPDATE jobs SET status = 'done', updated = ?, last_error = NULL WHERE id = ?"
        if not follow:
            with self._writer():
                self._fast.execute(done, (now, job_id))
            return
        with self._tx(durable=False) as conn:
            conn.execute(done, (now, job_id))
            self._add_jobs(conn, follow, None, now)

    def fail(self, job_id: int, error: str, retry_at: float | None) -> str:
        """Record a failed attempt: back to pending at *retry_at*, or dead when it is None.
        Returns the new status."""
        status = DEAD if retry_at is None else PENDING
        with self._tx(durable=False) as conn:  # lost only on power loss: one more attempt
            conn.execute("UPDATE jobs SET status = ?, attempts = attempts + 1, next_attempt = ?, updated = ?, "
                         "last_error = ? WHERE id = ?",
                         (status, retry_at if retry_at is not None else self.now(), self.now(), error[:2000],
                          job_id))
        return status

    def requeue(self, job_id: int, error: str, *, retry_at: float | None = None) -> None:
        """Put a running job of this process back in the queue without counting an attempt: its
        outcome could not be recorded (the database failed), so it runs again (at least once). As
        it was (still due, still first in its lane), or due at *retry_at* when given."""
        with self._tx() as conn:
            if retry_at is None:
                conn.execute("UPDATE jobs SET status = 'pending', owner = NULL, updated = ?, last_error = ? "
                             "WHERE id = ? AND status = 'running'", (self.now(), error[:2000], job_id))
            else:
                conn.execute("UPDATE jobs SET status = 'pending', owner = NULL, updated = ?, last_error = ?, "
                             "next_attempt = ? WHERE id = ? AND status = 'running'",
                             (self.now(), error[:2000], retry_at, job_id))

    def earlier_unfinished(self, job: Job, dedupe_prefix: str) -> Job | None:
        """The first job created before *job* (a lower id) of the same kind whose ``dedupe`` starts
        with *dedupe_prefix* and that is still pending or running, if any."""
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {self._COLS} FROM jobs WHERE kind = ? AND id < ? AND status IN ('pending', 'running') "
                "AND substr(dedupe, 1, ?) = ? ORDER BY id LIMIT 1",
                (job.kind, job.id, len(dedupe_prefix), dedupe_prefix)).fetchone()
        return self._job(row) if row else None

    def running_dedupes(self, prefix: str) -> list[str]:
        """The dedupe keys starting with *prefix* of the jobs running now (a dispatch on its way out)."""
        with self._read() as conn:
            return [r[0] for r in conn.execute(
                "SELECT dedupe FROM jobs WHERE status = 'running' AND substr(dedupe, 1, ?) = ?",
                (len(prefix), prefix))]

    def earlier_in_lane(self, job: Job) -> Job | None:
        """The first job of *job*'s lane created before it (a lower id) that is still pending or
        running, if any (a lane runs its jobs one at a time, but the next due first, not the oldest)."""
        if job.lane is None:
            return None
        with self._read() as conn:
            row = conn.execute(
                f"SELECT {self._COLS} FROM jobs WHERE lane = ? AND id < ? AND status IN ('pending', 'running') "
                "ORDER BY id LIMIT 1", (job.lane, job.id)).fetchone()
        return self._job(row) if row else None

    def retry_dead(self, job_id: int | None = None) -> int:
        """Put dead jobs (one, or all when *job_id* is None) back in the queue with a fresh attempt
        count; returns how many."""
        now = self.now()
        with self._tx() as conn:
            if job_id is None:
                cur = conn.execute("UPDATE jobs SET status = 'pending', attempts = 0, next_attempt = ?, "
                                   "updated = ? WHERE status = 'dead'", (now, now))
            else:
                cur = conn.execute("UPDATE jobs SET status = 'pending', attempts = 0, next_attempt = ?, "
                                   "updated = ? WHERE status = 'dead' AND id = ?", (now, now, job_id))
            return cur.rowcount

    def job(self, job_id: int) -> Job | None:
        with self._read() as conn:
            row = conn.execute(f"SELECT {self._COLS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job(row) if row else None

    def jobs(self, status: str | None = None, limit: int = 100) -> list[Job]:
        with self._read() as conn:
            if status is None:
                rows = conn.execute(f"SELECT {self._COLS} FROM jobs ORDER BY id DESC LIMIT ?", (limit,))
            else:
                rows = conn.execute(f"SELECT {self._COLS} FROM jobs WHERE status = ? ORDER BY id LIMIT ?",
                                    (status, limit))
            return [self._job(r) for r in rows.fetchall()]

    def stats(self) -> Stats:
        now = self.now()
        with self._read() as conn:
            counts = dict(conn.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
            oldest = conn.execute("SELECT MIN(created) FROM jobs WHERE status IN ('pending', 'running')"
                                  ).fetchone()[0]
            last = conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
        return Stats(queue_depth=counts.get(PENDING, 0) + counts.get(RUNNING, 0), running=counts.get(RUNNING, 0),
                     dead=counts.get(DEAD, 0), done=counts.get(DONE, 0),
                     oldest_pending_age=None if oldest is None else max(0.0, now - oldest), last_event_id=last)

    # ------------------------------------------------------------------------------- maintenance

    def maintain(self) -> tuple[int, int, int]:
        """Delete finished rows older than ``retention`` seconds (done jobs; deliveries none of whose
        jobs is left; events but the newest) and checkpoint the WAL down to nothing. Pending, running
        and dead jobs are never touched. Returns how many jobs, deliveries and events went.
        Raises OutboxError (a full disk: the next call tries again)."""
        cutoff = self.now() - self.retention
        try:
            with self._tx(durable=False) as conn:
                jobs = conn.execute("DELETE FROM jobs WHERE status = 'done' AND updated < ?", (cutoff,)).rowcount
                deliveries = conn.execute(
                    "DELETE FROM deliveries WHERE received < ? AND NOT EXISTS "
                    "(SELECT 1 FROM jobs WHERE jobs.delivery = deliveries.delivery)", (cutoff,)).rowcount
                events = conn.execute("DELETE FROM events WHERE created < ? AND id < (SELECT MAX(id) FROM events)",
                                      (cutoff,)).rowcount
            with self._writer():
                self._fast.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as e:
            raise OutboxError(f"cannot prune the relay database: {e}") from e
        self._pruned = time.monotonic()
        if jobs or deliveries or events:
            log.info("pruned %d done job(s), %d deliver(ies), %d event(s) older than %.0f s",
                     jobs, deliveries, events, self.retention)
        return jobs, deliveries, events

    def maintain_if_due(self) -> None:
        """:meth:`maintain` when ``prune_every`` seconds have passed since the last one."""
        if time.monotonic() - self._pruned >= self.prune_every:
            self._pruned = time.monotonic()  # a failure waits for the next turn too
            self.maintain()

    # ------------------------------------------------------------------------------ events, state

    def append_event(self, type_: str, data: dict[str, Any], jobs: Callable[[int], list[NewJob]] | None = None,
                     state: dict[str, str] | None = None) -> int:
        """Append an agent event, and in the same transaction the jobs built from its id (the
        pushes) and state updates; returns the event id."""
        now = self.now()
        with self._tx() as conn:
            cur = conn.execute("INSERT INTO events (type, data, created) VALUES (?, ?, ?)",
                               (type_, json.dumps(data, sort_keys=True), now))
            event_id = int(cur.lastrowid or 0)
            if jobs is not None:
                self._add_jobs(conn, jobs(event_id), None, now)
            for k, v in (state or {}).items():
                conn.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (k, v))
        return event_id

    def events_since(self, after: int, limit: int = 1000) -> list[Event]:
        with self._read() as conn:
            rows = conn.execute("SELECT id, type, data, created FROM events WHERE id > ? ORDER BY id LIMIT ?",
                                (after, limit)).fetchall()
        out = []
        for r in rows:
            data = _payload(r[2])
            if data is None:
                # a row damaged on disk: skipped, so the events after it still reach every subscriber
                # (the broker asks again from the last id it handed on), and logged once
                if r[0] not in self._bad_events:
                    self._bad_events.add(r[0])
                    log.error("event %d (%s) is not a JSON object in the database; skipped", r[0], r[1])
                continue
            out.append(Event(id=r[0], type=r[1], data=data, created=r[3]))
        return out

    def last_event_id(self) -> int:
        with self._read() as conn:
            return int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0])

    def get_state(self, key: str) -> str | None:
        with self._read() as conn:
            row = conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_state(self, key: str, value: str) -> None:
        with self._tx() as conn:
            conn.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)", (key, value))
