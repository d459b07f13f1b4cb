"""Fleet state: what agents report, what runs where, and the staged rollouts, in SQLite beside the outbox.

Two layers:

- :class:`FleetStore`: the SQLite file (WAL, ``synchronous=FULL``; a report is on disk before the
  relay answers 202), with the outbox's discipline: one writer lock, pooled readers, every error an
  :class:`~sync_tools.relay.outbox.OutboxError`.
- :class:`Fleet`: the relay's view over it. It parses untrusted reports (:func:`parse_report`),
  records them, learns builds and rollout policies from verified manifests, and judges rollouts with
  the pure :mod:`sync_tools.rollout` core. It does no HTTP and writes no outbox row: the relay's
  glue (:mod:`sync_tools.relay.fleet_views`) turns its answers into fan-out events and timer jobs.

Tables: ``agents`` (every agent id the relay knows: from the token map and from reports; last seen,
platform), ``reports`` (the newest ``max_report_rows`` per agent), ``running`` (per agent and
subsystem: the build it runs now), ``builds`` (every build a verified manifest named), ``outcomes``
(per build and agent: first healthy and first failed report, only for known builds), ``rollouts``
(per subsystem and build: policy, wave open times, halts), ``state`` (small key/values).
"""

from __future__ import annotations

import json
import logging
import math
import queue
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sync_tools.errors import DataError
from sync_tools.manifest import Manifest, parse_time
from sync_tools.relay.outbox import OutboxError, open_wal
from sync_tools.rollout import (
    COMPLETE,
    FAILED_OUTCOMES,
    HALTED,
    HEALTHY_OUTCOMES,
    OUTCOMES,
    UNKNOWN,
    Decision,
    RolloutPolicy,
    RolloutStatus,
    decide,
    evaluate,
)

log = logging.getLogger(__name__)

MAX_REPORT_BYTES = 16 * 1024
# subsystems one agent may report on: a platform runs a handful, and each is a row of ``running`` and
# a section of the fleet view kept for good, so an agent that names new ones without end is refused
MAX_AGENT_SUBSYSTEMS = 64
_HEX64 = re.compile(r"[0-9a-f]{64}")
_SUBSYSTEM = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_PLATFORM = re.compile(r"[a-z0-9]{1,32}/[a-z0-9]{1,32}")
_AGENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
SEEN_EVERY = 30.0  # seconds between two last-seen writes for one agent's asks (silent_after is an hour)
CACHE_SECONDS = 2.0  # a rollout's judgement is reused this long (other processes' writes show after it)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    id TEXT PRIMARY KEY,
    platform TEXT,
    source TEXT NOT NULL,
    first_seen REAL,
    last_seen REAL,
    last_report REAL,
    reports INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS reports (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    agent TEXT NOT NULL,
    received REAL NOT NULL,
    subsystem TEXT NOT NULL,
    platform TEXT,
    from_sha TEXT,
    to_sha TEXT,
    version TEXT,
    serial INTEGER,
    outcome TEXT NOT NULL,
    error TEXT,
    times TEXT,
    known INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS reports_agent ON reports (agent, id);
CREATE TABLE IF NOT EXISTS running (
    agent TEXT NOT NULL,
    subsystem TEXT NOT NULL,
    sha256 TEXT,
    version TEXT,
    outcome TEXT NOT NULL,
    error TEXT,
    at REAL NOT NULL,
    PRIMARY KEY (agent, subsystem)
);
CREATE TABLE IF NOT EXISTS builds (
    subsystem TEXT NOT NULL,
    build TEXT NOT NULL,
    platform TEXT NOT NULL,
    version TEXT NOT NULL,
    serial INTEGER NOT NULL,
    current INTEGER NOT NULL DEFAULT 1,
    staged INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (subsystem, build)
);
CREATE TABLE IF NOT EXISTS outcomes (
    subsystem TEXT NOT NULL,
    build TEXT NOT NULL,
    agent TEXT NOT NULL,
    healthy_at REAL,
    failed_at REAL,
    PRIMARY KEY (subsystem, build, agent)
);
CREATE TABLE IF NOT EXISTS rollouts (
    subsystem TEXT NOT NULL,
    build TEXT NOT NULL,
    platform TEXT NOT NULL,
    version TEXT NOT NULL,
    policy TEXT NOT NULL,
    built REAL NOT NULL,
    created REAL NOT NULL,
    opened TEXT NOT NULL DEFAULT '[]',
    halt TEXT,
    halted_at REAL,
    forgiven INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL,
    PRIMARY KEY (subsystem, build)
);
CREATE TABLE IF NOT EXISTS state (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class BadReport(DataError):
    """A report that is not one (400), or names another agent than its token's (``status`` 401)."""

    def __init__(self, message: str, status: int = 400):
        self.status = status
        super().__init__(message)


@dataclass(frozen=True)
class Report:
    """One agent report (``POST /report``), validated. Times are seconds."""

    agent: str
    subsystem: str
    outcome: str
    platform: str | None = None
    from_sha: str | None = None
    to_sha: str | None = None
    version: str | None = None
    serial: int | None = None
    error: str | None = None
    times: Mapping[str, float] = field(default_factory=dict)

    @property
    def runs(self) -> str | None:
        """The build the agent runs after this report: the new one when it is running or updated,
        else the one it had (a failed or held install, or a rollback, leaves the old binary)."""
        return self.to_sha if self.outcome in HEALTHY_OUTCOMES else self.from_sha


def is_text(value: str) -> bool:
    """Whether *value* can be stored and shown: JSON's ``\\udcff`` decodes to a lone surrogate, which
    is no character (SQLite cannot take it, UTF-8 cannot encode it)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _opt_str(obj: Mapping[str, Any], key: str, pattern: re.Pattern[str] | None = None,
             limit: int = 128) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if (not isinstance(value, str) or len(value) > limit or not is_text(value)
            or (pattern is not None and not pattern.fullmatch(value))):
        raise BadReport(f"report: {key!r} is malformed")
    return value


def parse_report(body: bytes, agent: str) -> Report:
    """Parse the untrusted JSON *body* of a report sent with *agent*'s token. Keys this relay does not
    know are ignored (``patch``, later ones). Raises BadReport: 400 malformed, 401 when the body
    names another agent than the token's."""
    if len(body) > MAX_REPORT_BYTES:
        raise BadReport(f"report is over {MAX_REPORT_BYTES} bytes", 413)
    try:
        obj = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise BadReport(f"report is not JSON: {type(e).__name__}") from e
    if not isinstance(obj, dict):
        raise BadReport("report must be a JSON object")
    named = obj.get("agent")
    if not isinstance(named, str) or not _AGENT.fullmatch(named):
        raise BadReport("report: 'agent' must be the agent id")
    if named != agent:
        raise BadReport("report: 'agent' is not the id this token belongs to", 401)
    subsystem = obj.get("subsystem")
    if not isinstance(subsystem, str) or not _SUBSYSTEM.fullmatch(subsystem):
        raise BadReport("report: 'subsystem' must be a subsystem name")
    outcome = obj.get("outcome")
    if outcome not in OUTCOMES:
        raise BadReport(f"report: 'outcome' must be one of {', '.join(OUTCOMES)}")
    serial = obj.get("serial")
    if serial is not None and (isinstance(serial, bool) or not isinstance(serial, int) or not 0 <= serial < 2**63):
        raise BadReport("report: 'serial' must be a non-negative integer")
    error = obj.get("error")
    if error is not None:
        if not isinstance(error, str) or len(error) > 4096:
            raise BadReport("report: 'error' must be a line of text")
        # kept, whatever it says: a failure must count. Text that is no characters (an error naming a
        # file whose name is not UTF-8, sent as \\udcxx) is shown with replacement characters
        error = (error.strip().splitlines() or [""])[0][:500].encode("utf-8", "replace").decode("utf-8")
    times_raw = obj.get("times") or {}
    if not isinstance(times_raw, dict) or len(times_raw) > 16:
        raise BadReport("report: 'times' must be an object of seconds")
    times: dict[str, float] = {}
    for k, v in times_raw.items():
        if (not isinstance(k, str) or not re.fullmatch(r"[a-z_]{1,32}", k) or isinstance(v, bool)
                or not isinstance(v, int | float) or not math.isfinite(v) or not 0 <= v < 1e7):
            raise BadReport("report: 'times' must map names to seconds")
        times[k] = float(v)
    return Report(agent=agent, subsystem=subsystem, outcome=outcome,
                  platform=_opt_str(obj, "platform", _PLATFORM),
                  from_sha=_opt_str(obj, "from", _HEX64), to_sha=_opt_str(obj, "to", _HEX64),
                  version=_opt_str(obj, "version"), serial=serial, error=error, times=times)


@dataclass(frozen=True)
class RolloutRecord:
    """One row of ``rollouts``."""

    subsystem: str
    build: str
    platform: str
    version: str
    policy: RolloutPolicy
    built: float
    created: float
    opened: tuple[float, ...]
    halt: str | None
    halted_at: float | None
    forgiven: int
    current: bool


@dataclass(frozen=True)
class AgentRecord:
    id: str
    platform: str | None
    source: str
    first_seen: float | None
    last_seen: float | None
    last_report: float | None
    reports: int


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA synchronous = FULL")
    return conn


class FleetStore:
    """The fleet's SQLite file. Thread-safe; several processes may share it (writes take ``BEGIN
    IMMEDIATE``). Raises OutboxError when the database cannot be opened or written."""

    def __init__(self, path: Path, *, max_report_rows: int = 200):
        self.path = Path(path)
        self.max_report_rows = max(1, max_report_rows)
        try:
            self._w = open_wal(self.path, _SCHEMA)
        except (sqlite3.Error, OSError) as e:
            raise OutboxError(f"cannot open the fleet database {self.path}: {e}") from e
        self._wlock = threading.RLock()
        self._readers: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all = [self._w]

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        try:
            conn = self._readers.get_nowait()
        except queue.Empty:
            try:
                conn = _connect(self.path)
            except sqlite3.Error as e:
                raise OutboxError(f"cannot read the fleet database: {e}") from e
            with self._wlock:
                self._all.append(conn)
        try:
            yield conn
        except sqlite3.Error as e:
            raise OutboxError(f"cannot read the fleet database: {e}") from e
        finally:
            self._readers.put(conn)

    @contextmanager
    def _tx(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction, committed (fsynced unless *durable* is false) when the block ends."""
        with self._wlock:
            conn = self._w
            try:
                if not durable:
                    conn.execute("PRAGMA synchronous = NORMAL")
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as e:
                raise OutboxError(f"cannot write the fleet database: {e}") from e
            finally:
                if not durable:
                    conn.execute("PRAGMA synchronous = FULL")

    def close(self) -> None:
        with self._wlock:
            for conn in self._all:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass
            self._all = []

    # ---------------------------------------------------------------------------------- agents

    def register_agents(self, ids: Iterable[str], now: float) -> int:
        """Know these agent ids (the token map) before they report; returns how many were new."""
        rows = [(a, now) for a in ids]
        if not rows:
            return 0
        with self._tx() as conn:
            before = conn.total_changes
            conn.executemany("INSERT OR IGNORE INTO agents (id, source, first_seen) VALUES (?, 'token', ?)", rows)
            return conn.total_changes - before

    def touch(self, agent: str, now: float) -> bool:
        """*agent* was seen (it asked, or its stream connected or closed). Not fsynced: losing it in a
        power cut only makes the agent look older. Returns True when the agent was new."""
        with self._tx(durable=False) as conn:
            cur = conn.execute("UPDATE agents SET last_seen = ? WHERE id = ?", (now, agent))
            if cur.rowcount:
                return False
            conn.execute("INSERT INTO agents (id, source, first_seen, last_seen) VALUES (?, 'seen', ?, ?)",
                         (agent, now, now))
            return True

    def agents(self) -> list[AgentRecord]:
        with self._read() as conn:
            rows = conn.execute("SELECT id, platform, source, first_seen, last_seen, last_report, reports "
                                "FROM agents ORDER BY id").fetchall()
        return [AgentRecord(*r) for r in rows]

    def fleet_ids(self, platform: str | None = None) -> list[str]:
        """Every known agent id; with *platform*, those not known to run another platform (an agent
        that cannot install a build is not part of its rollout)."""
        with self._read() as conn:
            if platform is None:
                rows = conn.execute("SELECT id FROM agents").fetchall()
            else:
                rows = conn.execute("SELECT id FROM agents WHERE platform IS NULL OR platform = ?",
                                    (platform,)).fetchall()
        return [r[0] for r in rows]

    def runs(self, agent: str, subsystem: str) -> str | None:
        with self._read() as conn:
            row = conn.execute("SELECT sha256 FROM running WHERE agent = ? AND subsystem = ?",
                               (agent, subsystem)).fetchone()
        return row[0] if row else None

    def running(self) -> list[tuple[str, str, str | None, str | None, str, str | None, float]]:
        """(agent, subsystem, sha256, version, outcome, error, at) for every agent and subsystem."""
        with self._read() as conn:
            return conn.execute("SELECT agent, subsystem, sha256, version, outcome, error, at FROM running "
                                "ORDER BY agent, subsystem").fetchall()

    # --------------------------------------------------------------------------------- reports

    def record_report(self, r: Report, now: float, *, known: bool) -> bool:
        """Durably record *r* (on disk when this returns). *known*: its ``to`` build is one a verified
        manifest named for its subsystem; only then does it count for a rollout. Returns whether it may
        change a rollout's judgement: a healthy or failed outcome counted, or an agent new to the fleet
        or now on another platform (a ``held`` report from a known agent changes none)."""
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM running WHERE agent = ? AND subsystem = ?",
                            (r.agent, r.subsystem)).fetchone() is None:
                (count,) = conn.execute("SELECT COUNT(*) FROM running WHERE agent = ?", (r.agent,)).fetchone()
                if count >= MAX_AGENT_SUBSYSTEMS:
                    raise BadReport(f"report: agent {r.agent} already reports on {count} subsystems, the most "
                                    f"one agent may (a {r.subsystem!r} report is refused)", 422)
            row = conn.execute("SELECT platform FROM agents WHERE id = ?", (r.agent,)).fetchone()
            fleet_changed = row is None or (r.platform is not None and row[0] != r.platform)
            conn.execute(
                "INSERT INTO reports (agent, received, subsystem, platform, from_sha, to_sha, version, serial, "
                "outcome, error, times, known) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (r.agent, now, r.subsystem, r.platform, r.from_sha, r.to_sha, r.version, r.serial, r.outcome,
                 r.error, json.dumps(dict(r.times), sort_keys=True), int(known)))
            # the newest rows per agent only: a flood cannot fill the disk
            conn.execute("DELETE FROM reports WHERE agent = ? AND id <= (SELECT id FROM reports WHERE agent = ? "
                         "ORDER BY id DESC LIMIT 1 OFFSET ?)", (r.agent, r.agent, self.max_report_rows))
            conn.execute("INSERT INTO agents (id, source, first_seen) VALUES (?, 'report', ?) "
                         "ON CONFLICT (id) DO NOTHING", (r.agent, now))
            conn.execute("UPDATE agents SET last_seen = ?, last_report = ?, reports = reports + 1, "
                         "platform = COALESCE(?, platform) WHERE id = ?", (now, now, r.platform, r.agent))
            conn.execute("INSERT OR REPLACE INTO running (agent, subsystem, sha256, version, outcome, error, at) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (r.agent, r.subsystem, r.runs,
                          r.version if r.outcome in HEALTHY_OUTCOMES else None, r.outcome, r.error, now))
            if known and r.to_sha is not None:
                healthy = now if r.outcome in HEALTHY_OUTCOMES else None
                failed = now if r.outcome in FAILED_OUTCOMES else None
                if healthy is not None or failed is not None:
                    conn.execute(
                        "INSERT INTO outcomes (subsystem, build, agent, healthy_at, failed_at) VALUES (?, ?, ?, ?, ?) "
                        "ON CONFLICT (subsystem, build, agent) DO UPDATE SET "
                        "healthy_at = COALESCE(healthy_at, excluded.healthy_at), "
                        "failed_at = COALESCE(failed_at, excluded.failed_at)",
                        (r.subsystem, r.to_sha, r.agent, healthy, failed))
                    return True
            return fleet_changed

    def reports(self, agent: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        cols = ("id", "agent", "received", "subsystem", "platform", "from", "to", "version", "serial", "outcome",
                "error", "times", "known")
        with self._read() as conn:
            if agent is None:
                rows = conn.execute("SELECT id, agent, received, subsystem, platform, from_sha, to_sha, version, "
                                    "serial, outcome, error, times, known FROM reports ORDER BY id DESC LIMIT ?",
                                    (limit,)).fetchall()
            else:
                rows = conn.execute("SELECT id, agent, received, subsystem, platform, from_sha, to_sha, version, "
                                    "serial, outcome, error, times, known FROM reports WHERE agent = ? "
                                    "ORDER BY id DESC LIMIT ?", (agent, limit)).fetchall()
        out = []
        for row in rows:
            d = dict(zip(cols, row, strict=True))
            d["times"] = json.loads(d["times"] or "{}")
            d["known"] = bool(d["known"])
            out.append(d)
        return out

    def outcomes(self, subsystem: str, build: str) -> tuple[dict[str, float], dict[str, float]]:
        """(agent -> first healthy time, agent -> first failed time) for one build."""
        with self._read() as conn:
            rows = conn.execute("SELECT agent, healthy_at, failed_at FROM outcomes WHERE subsystem = ? AND build = ?",
                                (subsystem, build)).fetchall()
        return ({a: h for a, h, _ in rows if h is not None}, {a: f for a, _, f in rows if f is not None})

    # ---------------------------------------------------------------------------- builds, rollouts

    def record_manifest(self, m: Manifest, now: float) -> list[RolloutRecord]:
        """Learn every build *m* (verified by the caller) names, mark them the current ones, and create
        a rollout for each build whose entry carries a policy. Returns the rollouts created now."""
        created: list[tuple[str, str]] = []
        with self._tx() as conn:
            prior = conn.execute("SELECT value FROM state WHERE key = 'manifest_serial'").fetchone()
            if prior is not None and int(prior[0]) > m.serial:
                log.info("manifest serial %d is older than %s already seen; not marking its builds current",
                         m.serial, prior[0])
                return []
            conn.execute("INSERT OR REPLACE INTO state (key, value) VALUES ('manifest_serial', ?)", (str(m.serial),))
            conn.execute("UPDATE builds SET current = 0")
            for name, entry in m.subsystems.items():
                built = parse_time(entry.built, f"subsystems.{name}.built").timestamp()
                for platform, asset in entry.assets.items():
                    conn.execute(
                        "INSERT INTO builds (subsystem, build, platform, version, serial, current, staged) "
                        "VALUES (?, ?, ?, ?, ?, 1, ?) ON CONFLICT (subsystem, build) DO UPDATE SET current = 1, "
                        "staged = MAX(staged, excluded.staged)",
                        (name, asset.binary_sha256, platform, entry.version, m.serial, int(entry.rollout is not None)))
                    if entry.rollout is None:
                        continue
                    # a first wave already due opens in the same transaction: no reader ever sees the
                    # rollout of a build that may go out as "waiting"
                    opened = [now] if built + entry.rollout.min_age_seconds <= now else []
                    cur = conn.execute(
                        "INSERT OR IGNORE INTO rollouts (subsystem, build, platform, version, policy, built, created, "
                        "opened, updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (name, asset.binary_sha256, platform, entry.version,
                         json.dumps(entry.rollout.to_json(), sort_keys=True), built, now, json.dumps(opened), now))
                    if cur.rowcount:
                        created.append((name, asset.binary_sha256))
        return [r for r in (self.rollout(s, b) for s, b in created) if r is not None]

    def build(self, subsystem: str, build: str) -> tuple[str, str, bool, bool] | None:
        """(platform, version, current, staged) of a build a verified manifest named, else None.
        *staged*: its entry carried a rollout policy."""
        with self._read() as conn:
            row = conn.execute("SELECT platform, version, current, staged FROM builds WHERE subsystem = ? AND build = ?",
                               (subsystem, build)).fetchone()
        return None if row is None else (row[0], row[1], bool(row[2]), bool(row[3]))

    def builds(self) -> dict[tuple[str, str], tuple[str, str, bool]]:
        """(subsystem, build) -> (platform, version, current) for every known build."""
        with self._read() as conn:
            rows = conn.execute("SELECT subsystem, build, platform, version, current FROM builds").fetchall()
        return {(s, b): (p, v, bool(c)) for s, b, p, v, c in rows}

    _ROLLOUT_COLS = ("r.subsystem, r.build, r.platform, r.version, r.policy, r.built, r.created, r.opened, r.halt, "
                     "r.halted_at, r.forgiven, COALESCE(b.current, 0)")

    def _rollout(self, row: tuple[Any, ...]) -> RolloutRecord:
        return RolloutRecord(subsystem=row[0], build=row[1], platform=row[2], version=row[3],
                             policy=RolloutPolicy.from_json(json.loads(row[4])), built=row[5], created=row[6],
                             opened=tuple(json.loads(row[7])), halt=row[8], halted_at=row[9], forgiven=row[10],
                             current=bool(row[11]))

    def rollout(self, subsystem: str, build: str) -> RolloutRecord | None:
        with self._read() as conn:
            row = conn.execute(f"SELECT {self._ROLLOUT_COLS} FROM rollouts r LEFT JOIN builds b ON "
                               "b.subsystem = r.subsystem AND b.build = r.build WHERE r.subsystem = ? AND r.build = ?",
                               (subsystem, build)).fetchone()
        return None if row is None else self._rollout(row)

    def rollouts(self, *, current: bool = True, subsystem: str | None = None) -> list[RolloutRecord]:
        """Rollouts (of builds in the newest manifest, unless *current* is false), by subsystem."""
        sql = (f"SELECT {self._ROLLOUT_COLS} FROM rollouts r LEFT JOIN builds b ON b.subsystem = r.subsystem "
               "AND b.build = r.build WHERE 1 = 1")
        args: list[Any] = []
        if current:
            sql += " AND b.current = 1"
        if subsystem is not None:
            sql += " AND r.subsystem = ?"
            args.append(subsystem)
        with self._read() as conn:
            rows = conn.execute(sql + " ORDER BY r.subsystem, r.platform, r.created", args).fetchall()
        return [self._rollout(r) for r in rows]

    def open_wave(self, subsystem: str, build: str, expected: int, at: float) -> bool:
        """Record that wave ``expected + 1`` opened at *at*, only if exactly *expected* waves were open
        (two threads or processes judging the same rollout open a wave once). Returns whether it did."""
        with self._tx() as conn:
            row = conn.execute("SELECT opened FROM rollouts WHERE subsystem = ? AND build = ?",
                               (subsystem, build)).fetchone()
            if row is None:
                return False
            opened = json.loads(row[0])
            if len(opened) != expected:
                return False
            conn.execute("UPDATE rollouts SET opened = ?, updated = ? WHERE subsystem = ? AND build = ?",
                         (json.dumps([*opened, at]), at, subsystem, build))
            return True

    def set_halt(self, subsystem: str, build: str, reason: str | None, now: float, *,
                 forgive: int | None = None) -> None:
        """Halt (*reason*, may be empty) or resume (None; *forgive*: failed agents to forgive)."""
        with self._tx() as conn:
            if reason is not None:
                conn.execute("UPDATE rollouts SET halt = ?, halted_at = COALESCE(halted_at, ?), updated = ? "
                             "WHERE subsystem = ? AND build = ?", (reason, now, now, subsystem, build))
            else:
                conn.execute("UPDATE rollouts SET halt = NULL, halted_at = NULL, forgiven = COALESCE(?, forgiven), "
                             "updated = ? WHERE subsystem = ? AND build = ?", (forgive, now, subsystem, build))

    def mark_halted(self, subsystem: str, build: str, now: float) -> bool:
        """Note the time a rollout was first judged halted; True only for the call that noted it."""
        with self._tx(durable=False) as conn:
            cur = conn.execute("UPDATE rollouts SET halted_at = ?, updated = ? WHERE subsystem = ? AND build = ? "
                               "AND halted_at IS NULL", (now, now, subsystem, build))
            return cur.rowcount > 0

    def get_state(self, key: str) -> str | None:
        with self._read() as conn:
            row = conn.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None


# ------------------------------------------------------------------------------------------ fleet


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class TokenBuckets:
    """Per-agent token buckets: *burst* requests at once, refilled at *rate* per second."""

    def __init__(self, burst: float, rate: float, now: Callable[[], float] = time.monotonic):
        self.burst = max(1.0, burst)
        self.rate = max(1e-6, rate)
        self._now = now
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, key: str) -> float:
        """Take one token for *key*; returns 0 when allowed, else the seconds until one is free."""
        now = self._now()
        with self._lock:
            tokens, last = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate


@dataclass(frozen=True)
class Judged:
    """A rollout and what the pure core says about it now."""

    record: RolloutRecord
    status: RolloutStatus

    def to_json(self) -> dict[str, Any]:
        r, st = self.record, self.status
        return {"subsystem": r.subsystem, "build": r.build, "platform": r.platform, "version": r.version,
                "state": st.state, "wave": st.wave, "percent": st.percent, "waves": list(r.policy.waves),
                "healthy": st.healthy, "needed": st.needed, "failed": st.failed, "failed_total": st.failed_total,
                "fleet": st.fleet, "members": st.members, "reason": st.reason,
                "opened": [iso(t) for t in r.opened], "next": iso(st.due) if st.due is not None and not
                st.open_next and st.state != HALTED else None, "halted_at": iso(r.halted_at),
                "policy": r.policy.to_json()}


class Fleet:
    """The relay's fleet: reports in, rollout judgements out. Clock and store are passed in."""

    def __init__(self, store: FleetStore, *, now: Callable[[], float] = time.time, silent_after: float = 3600.0):
        self.store = store
        self.now = now
        self.silent_after = silent_after
        self._connected: dict[str, int] = {}  # agent id -> open SSE streams in this process
        self._lock = threading.Lock()
        self._gen = 0  # bumped by every write of this process that changes a judgement
        self._cache: dict[tuple[str, str], tuple[int, float, Judged]] = {}
        self._seen: dict[str, float] = {}  # agent id -> when seen() last wrote its last-seen time
        self._touch_logged = -60.0  # monotonic time of the last log line about a failing touch

    def _changed(self) -> None:
        with self._lock:
            self._gen += 1

    # --------------------------------------------------------------------------------- agents

    def connected(self, agent: str) -> None:
        with self._lock:
            self._connected[agent] = self._connected.get(agent, 0) + 1
        if self._touch(agent):
            self._changed()

    def disconnected(self, agent: str) -> None:
        with self._lock:
            n = self._connected.get(agent, 0) - 1
            if n > 0:
                self._connected[agent] = n
            else:
                self._connected.pop(agent, None)
        self._touch(agent)

    def _touch(self, agent: str) -> bool:
        """A stream's last-seen bookkeeping. A database that cannot take it (a full disk) must not end
        the stream, nor leave its agent counted as connected (the raise came before the stream's
        ``finally``): logged at most once a minute, and the stream goes on."""
        try:
            return self.store.touch(agent, self.now())
        except OutboxError as e:
            now = time.monotonic()
            with self._lock:
                quiet = now < self._touch_logged + 60.0
                if not quiet:
                    self._touch_logged = now
            if not quiet:
                log.error("cannot record that agent %s connected or left: %s", agent, e)
            return False

    def seen(self, agent: str) -> None:
        """*agent* asked something. Its last-seen time is written at most every SEEN_EVERY seconds: when
        a wave opens, the whole fleet asks at once, and a write per ask queued the asks behind the
        reports' fsyncs on the write lock (bench/fleet)."""
        now = self.now()
        with self._lock:
            last = self._seen.get(agent)
            if last is not None and 0 <= now - last < SEEN_EVERY:
                return
            self._seen[agent] = now
        if self.store.touch(agent, now):
            self._changed()

    def live(self, agents: Iterable[AgentRecord] | None = None) -> set[str]:
        """Agents not silent: seen within ``silent_after``, or with a stream open to this process."""
        cutoff = self.now() - self.silent_after
        with self._lock:
            out = set(self._connected)
        for a in agents if agents is not None else self.store.agents():
            if a.last_seen is not None and a.last_seen >= cutoff:
                out.add(a.id)
        return out

    # ------------------------------------------------------------------------------- judgement

    def judge(self, record: RolloutRecord, *, fresh: bool = False) -> Judged:
        """The pure core's verdict on *record* now (reused for CACHE_SECONDS unless *fresh*)."""
        key = (record.subsystem, record.build)
        now = self.now()
        if not fresh:
            hit = self._cache.get(key)
            if hit is not None:
                gen, at, judged = hit
                due = judged.status.due
                if (gen == self._gen and now - at < CACHE_SECONDS and judged.record == record
                        and (due is None or now < due or judged.status.open_next)):
                    return judged
        agents = self.store.agents()
        fleet = [a.id for a in agents if a.platform is None or a.platform == record.platform]
        healthy, failed = self.store.outcomes(record.subsystem, record.build)
        ids = set(fleet)
        own = [a for a in agents if a.id in ids]
        st = evaluate(record.policy, record.build, agents=fleet, opened=record.opened, built_at=record.built,
                      healthy=healthy, failed=failed, now=now, live=self.live(agents), operator_halt=record.halt,
                      forgiven=record.forgiven,
                      joined={a.id: a.first_seen for a in own if a.first_seen is not None},
                      silent_at={a.id: a.last_seen + self.silent_after for a in own if a.last_seen is not None})
        judged = Judged(record, st)
        self._cache[key] = (self._gen, now, judged)
        if st.state == HALTED and record.halted_at is None and self.store.mark_halted(record.subsystem,
                                                                                         record.build, now):
            log.warning("rollout of %s %s (%s, build %s) halted: %s", record.subsystem, record.version,
                        record.platform, record.build[:12], st.reason)
        return judged

    def judged(self, *, subsystem: str | None = None, current: bool = True) -> list[Judged]:
        return [self.judge(r) for r in self.store.rollouts(current=current, subsystem=subsystem)]

    def decide(self, agent: str, subsystem: str, build: str) -> Decision:
        """May *agent* install *build* of *subsystem*? Fails closed: a build no verified manifest named,
        or one whose rollout the relay has not set up yet, is not allowed."""
        self.seen(agent)
        runs = self.store.runs(agent, subsystem) == build
        record = self.store.rollout(subsystem, build)
        if record is None:
            known = self.store.build(subsystem, build)
            if known is not None and known[2] and not known[3]:
                return Decision(True, COMPLETE, 0, 100, "this build has no staged rollout")
            if runs:
                return Decision(True, UNKNOWN, 0, None, "this agent already runs the build")
            return Decision(False, UNKNOWN, 0, None, "the relay knows no rollout of this build (yet)")
        judged = self.judge(record)
        return decide(judged.status, record.policy, agent, runs_build=runs)

    # -------------------------------------------------------------------------------- changes

    def on_manifest(self, m: Manifest) -> list[RolloutRecord]:
        """A verified manifest was fanned out: learn its builds and create rollouts for entries with
        a policy (returned)."""
        created = self.store.record_manifest(m, self.now())
        self._changed()
        for r in created:
            log.warning("rollout of %s %s (%s, build %s) created: waves %s, %s", r.subsystem, r.version, r.platform,
                        r.build[:12], r.policy.waves, "wave 1 open" if r.opened else "waiting for its minimum age")
        return created

    def record(self, report: Report) -> bool:
        """Durably record *report*; returns whether it names a build a verified manifest named (only
        those count for a rollout)."""
        known = report.to_sha is not None and self.store.build(report.subsystem, report.to_sha) is not None
        # only a report that can change a judgement drops the cached ones: when a wave opens, the whole
        # fleet asks and the held agents report "held" at once, and re-judging the rollout (the fleet
        # ranked again) for each of those 1,000 asks choked the relay (bench/fleet)
        if self.store.record_report(report, self.now(), known=known):
            self._changed()
        return known

    def advance(self, subsystem: str, build: str) -> tuple[Judged | None, int]:
        """Open every wave that is due now. Returns the judgement after it and how many waves opened."""
        opened = 0
        for _ in range(64):  # waves are at most MAX_WAVES; a bound all the same
            record = self.store.rollout(subsystem, build)
            if record is None:
                return None, opened
            judged = self.judge(record, fresh=True)
            if not judged.status.open_next or not record.current:
                return judged, opened
            if self.store.open_wave(subsystem, build, len(record.opened), self.now()):
                opened += 1
                log.warning("rollout of %s %s (%s, build %s): wave %d of %d opened (%g%%)", subsystem,
                            record.version, record.platform, build[:12], len(record.opened) + 1,
                            len(record.policy.waves), record.policy.waves[len(record.opened)])
            self._changed()
        return None, opened

    def promote(self, record: RolloutRecord) -> bool:
        """Open the next wave now, whatever the reports and clocks say. False when all are open."""
        if len(record.opened) >= len(record.policy.waves):
            return False
        done = self.store.open_wave(record.subsystem, record.build, len(record.opened), self.now())
        self._changed()
        if done:
            log.warning("rollout of %s %s (build %s) promoted by an operator to wave %d", record.subsystem,
                        record.version, record.build[:12], len(record.opened) + 1)
        return done

    def halt(self, record: RolloutRecord, reason: str) -> None:
        self.store.set_halt(record.subsystem, record.build, reason, self.now())
        self._changed()
        log.warning("rollout of %s %s (build %s) halted by an operator: %s", record.subsystem, record.version,
                    record.build[:12], reason or "no reason given")

    def resume(self, record: RolloutRecord) -> None:
        """Clear an operator's halt and forgive the failures so far (they halted it, or would again)."""
        _, failed = self.store.outcomes(record.subsystem, record.build)
        self.store.set_halt(record.subsystem, record.build, None, self.now(), forgive=len(failed))
        self._changed()
        log.warning("rollout of %s %s (build %s) resumed by an operator (%d failure(s) forgiven)",
                    record.subsystem, record.version, record.build[:12], len(failed))

    # ---------------------------------------------------------------------------------- views

    def halted(self) -> list[dict[str, Any]]:
        """The halted rollouts of current builds, for /health, ``relay --status`` and metrics."""
        return [{"subsystem": j.record.subsystem, "build": j.record.build, "version": j.record.version,
                 "platform": j.record.platform, "reason": j.status.reason, "halted_at": iso(j.record.halted_at)}
                for j in self.judged() if j.status.state == HALTED]

    def view(self) -> dict[str, Any]:
        """The fleet view (``GET /fleet``): per subsystem the builds running and how many agents run
        each, the rollout(s), and every agent with what it runs, when it was last seen and whether it
        is silent."""
        now = self.now()
        agents = self.store.agents()
        live = self.live(agents)
        builds = self.store.builds()
        running = self.store.running()
        subsystems: dict[str, dict[str, Any]] = {}

        def sub(name: str) -> dict[str, Any]:
            return subsystems.setdefault(name, {"builds": [], "rollout": None, "rollouts": [], "failed": []})

        counts: dict[tuple[str, str | None], int] = {}
        versions: dict[tuple[str, str | None], str | None] = {}
        per_agent: dict[str, dict[str, Any]] = {}
        for agent, name, sha, version, outcome, error, at in running:
            counts[(name, sha)] = counts.get((name, sha), 0) + 1
            versions.setdefault((name, sha), version)
            per_agent.setdefault(agent, {})[name] = {"sha256": sha, "outcome": outcome, "error": error,
                                                     "version": version, "at": iso(at)}
            if outcome in FAILED_OUTCOMES:
                sub(name)["failed"].append(agent)
        for (name, sha), n in sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[1], kv[0][1] or "")):
            info = builds.get((name, sha)) if sha is not None else None
            sub(name)["builds"].append({"sha256": sha, "version": info[1] if info else versions[(name, sha)],
                                        "platform": info[0] if info else None, "agents": n,
                                        "known": info is not None, "current": bool(info and info[2])})
        judged = self.judged()
        for j in judged:
            sub(j.record.subsystem)["rollouts"].append(j.to_json())
        for s in subsystems.values():
            if s["rollouts"]:  # the one most agents can take part in is the headline
                s["rollout"] = max(s["rollouts"], key=lambda r: (r["fleet"], r["platform"] == "linux/amd64"))
        for (name, _sha), (_p, _v, current) in builds.items():
            if current:
                sub(name)
        out_agents = []
        for a in agents:
            out_agents.append({"id": a.id, "platform": a.platform, "last_seen": iso(a.last_seen),
                               "last_report": iso(a.last_report), "silent": a.id not in live,
                               "connected": a.id in self._connected, "reports": a.reports,
                               "subsystems": per_agent.get(a.id, {})})
        return {"generated": iso(now), "silent_after": self.silent_after,
                "subsystems": dict(sorted(subsystems.items())), "agents": out_agents,
                "halted": [j.to_json() for j in judged if j.status.state == HALTED],
                "counts": {"agents": len(agents), "silent": sum(1 for a in out_agents if a["silent"]),
                           "failed": sum(1 for a in out_agents
                                         if any(s["outcome"] in FAILED_OUTCOMES for s in a["subsystems"].values()))}}
