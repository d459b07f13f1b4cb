"""Delivery threads: take due jobs from the outbox, run their handler, retry with backoff.

A handler is a callable ``(Job) -> list[NewJob]`` (follow-up jobs, created in the same
transaction that marks the job done). It signals "try again later" with
:class:`~sync_tools.errors.RemoteError` (``retry_after`` honoured when the remote gave one) and
"never with these bytes" with any other :class:`~sync_tools.errors.SyncToolsError`, which
dead-letters the job at once. Unexpected exceptions are retried like remote errors, so a bug
cannot silently drop a delivery; after ``max_attempts`` the job is dead-lettered either way.
:class:`Deferred` (wait for another job) and :class:`Interrupted` (this process is stopping) put
the job back without counting an attempt.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from sync_tools.errors import RemoteError, SyncToolsError
from sync_tools.relay.outbox import DEAD, Job, NewJob, Outbox, OutboxError

log = logging.getLogger(__name__)

Handler = Callable[[Job], list[NewJob]]
POLL = 1.0  # also pick up jobs another process (``relay --retry-dead``) put in the queue
MIN_WAIT = 0.05
RESUME_EVERY = 30.0  # seconds between looks for jobs left running by a process that died meanwhile
TAKE_BACK_DELAY = 1.0  # a job taken back again waits this long, doubling up to TAKE_BACK_CAP
TAKE_BACK_CAP = 60.0
DB_LOG_EVERY = 60.0  # seconds between two log lines about a failing database (a full disk)


class Interrupted(RemoteError):
    """A handler's work was stopped because this process is stopping (a local build's process
    group ended by :meth:`LocalDispatcher.stop`): the job goes back to the queue as it was, without
    counting an attempt, and runs again at the next start."""


class Deferred(RemoteError):
    """The job must wait for another one (an earlier push of the same branch in its backoff): it goes
    back to the queue due at *until* (a time of the outbox clock), without counting an attempt."""

    def __init__(self, message: str, *, until: float, quiet: bool = False):
        self.until = until
        self.quiet = quiet  # routine (a pace kept): logged at DEBUG, not INFO
        super().__init__(message)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: attempt n waits a random time in [d/2, d] with
    d = base * 2**(n-1), capped; a server's Retry-After wins when longer than d/2 (plus up to 10 %
    jitter, so a crowd of retries does not land at the same instant)."""

    base: float = 2.0
    cap: float = 600.0
    retry_after_cap: float = 3600.0

    def delay(self, attempt: int, retry_after: float | None, rand: Callable[[], float] = random.random) -> float:
        # the exponent is capped: 2 ** 1100 as a float overflows, and max_attempts has no ceiling
        d = min(self.cap, self.base * (2.0 ** min(max(0, attempt - 1), 60)))
        if retry_after is not None:
            # never under the backoff's own floor: a Retry-After of 0, or a rate-limit reset already
            # past by a skewed clock, must not turn the retries into a burst
            wait = max(d / 2, min(max(0.0, retry_after), self.retry_after_cap))
            return wait + wait * 0.1 * rand()
        return d / 2 + d / 2 * rand()


class Worker:
    """``threads`` delivery threads over one outbox. ``start`` resumes interrupted jobs first."""

    def __init__(self, outbox: Outbox, handlers: dict[str, Handler], *, max_attempts: int = 8,
                 backoff: Backoff | None = None, threads: int = 2,
                 observe: Callable[[Job, str, float], None] | None = None,
                 rand: Callable[[], float] = random.random):
        self.outbox = outbox
        self.handlers = handlers
        self.max_attempts = max_attempts
        self.backoff = backoff or Backoff()
        self.threads = threads
        self._observe = observe
        self._rand = rand
        self._wake = threading.Condition()
        self._busy: set[str] = set()  # lanes a job of this process is running in
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._resumed = time.monotonic()  # start() resumes; then every RESUME_EVERY seconds
        self._taken_back: dict[int, int] = {}  # job id: times in a row its outcome could not be recorded
        self._taken_back_lock = threading.Lock()
        self._db_logged, self._db_errors = -DB_LOG_EVERY, 0

    def start(self) -> None:
        if self._threads:
            return
        self._stop.clear()
        self.outbox.resume()
        for i in range(self.threads):
            t = threading.Thread(target=self._loop, name=f"relay-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def request_stop(self) -> None:
        """Ask the threads to stop after their current job (no new job is claimed); returns at once."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the threads to stop after their current job and wait up to *timeout* seconds."""
        self.request_stop()
        for t in self._threads:
            t.join(timeout)
        self._threads = []

    def wake(self, lanes: Iterable[str | None] | None = None) -> None:
        """New work was queued: wake one idle thread now rather than at its next poll (a thread that
        takes a job wakes the next, so a burst spreads over the threads).

        *lanes* are the new jobs' lanes: when each is a lane a job of this process is running in,
        nobody is woken, as nobody could take them; that job's end wakes a thread. (A burst of
        deliveries for one busy lane would otherwise have a thread scan the queue for each.)
        """
        if lanes is not None and all(lane is not None and lane in self._busy for lane in lanes):
            return
        with self._wake:
            self._wake.notify()

    def _db_trouble(self, what: str, e: BaseException) -> None:
        """Log a database failure (a full disk, a locked file) once per DB_LOG_EVERY seconds, with a
        count of the rest: a worker polling a full disk must not fill the log too."""
        now = time.monotonic()
        with self._taken_back_lock:
            self._db_errors += 1
            if now < self._db_logged + DB_LOG_EVERY:
                return
            self._db_logged, n, self._db_errors = now, self._db_errors, 0
        log.error("%s: %s: %s (%d database failure(s) in the last %.0f s)", what, type(e).__name__, e, n,
                  DB_LOG_EVERY)

    def _idle_wait(self, failed: bool = False) -> None:
        now = time.monotonic()
        if now - self._resumed >= RESUME_EVERY:
            self._resumed = now
            try:
                self.outbox.resume(own=False)
            except Exception as e:  # noqa: BLE001 - keep polling through a database hiccup
                self._db_trouble("cannot take back the jobs of dead processes", e)
        try:
            self.outbox.maintain_if_due()
        except Exception as e:  # noqa: BLE001 - pruning waits for its next turn
            self._db_trouble("cannot prune the outbox", e)
        try:
            due = None if failed else self.outbox.next_due()
        except (OutboxError, Exception) as e:  # noqa: BLE001 - keep polling through a database hiccup
            self._db_trouble("cannot read the outbox", e)
            due = None
        # Never less than MIN_WAIT: a due job that could not be claimed (its lane is busy, or another
        # process took it) must not turn this loop into a spin, which under gevent would starve
        # every request of the process.
        wait = POLL if due is None else min(POLL, max(MIN_WAIT, due - self.outbox.now()))
        with self._wake:
            if not self._stop.is_set():
                self._wake.wait(wait)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                job = self.outbox.claim()
            except Exception as e:  # noqa: BLE001 - a locked or failing DB must not kill the thread
                self._db_trouble("cannot claim a job", e)
                self._idle_wait(failed=True)  # a full POLL: a due job that cannot be claimed is no spin
                continue
            if job is None:
                self._idle_wait()
                continue
            self.wake()  # there may be more: let another idle thread look
            try:
                self.run_one(job)
            except Exception as e:  # noqa: BLE001 - its outcome was not recorded: never strand the job
                self._db_trouble(f"job {job.id} ({job.kind}): its outcome could not be recorded; back to the queue",
                                 e)
                self._take_back(job, f"outcome not recorded: {type(e).__name__}: {e}")

    def _take_back(self, job: Job, error: str) -> None:
        """Return *job* to the queue, trying until the database lets us (or the worker stops): left
        ``running``, it would hold its lane until this process ended.

        The first time it goes back due at once (still first in its lane); when the same job comes
        back again, its outcome keeps failing to be recorded (a bug, a database that refuses), so it
        waits TAKE_BACK_DELAY seconds, doubling: never a loop re-running it as fast as it fails."""
        with self._taken_back_lock:
            n = self._taken_back.get(job.id, 0)
            self._taken_back[job.id] = n + 1
            if len(self._taken_back) > 10_000:  # jobs that later ran elsewhere: forget the oldest
                self._taken_back.pop(next(iter(self._taken_back)))
        retry_at = None if n == 0 else self.outbox.now() + min(TAKE_BACK_CAP, TAKE_BACK_DELAY * 2.0 ** min(n - 1, 16))
        while True:
            try:
                self.outbox.requeue(job.id, error, retry_at=retry_at)
                self.wake()
                return
            except Exception as e:  # noqa: BLE001
                self._db_trouble(f"job {job.id}: cannot put it back yet", e)
            if self._stop.wait(1.0):
                return

    def run_one(self, job: Job) -> str:
        """Run *job*'s handler and record the outcome; returns ``done``, ``retry`` or ``dead``."""
        handler = self.handlers.get(job.kind)
        started = time.monotonic()
        outcome: str
        follow: list[NewJob] = []
        if job.lane is not None:
            self._busy.add(job.lane)
        try:
            if handler is None:
                raise SyncToolsError(f"no handler for job kind {job.kind!r}")
            follow = handler(job)
        except Deferred as e:
            log.log(logging.DEBUG if e.quiet else logging.INFO, "job %d (%s) deferred: %s", job.id, job.kind, e)
            self.outbox.requeue(job.id, f"deferred: {e}", retry_at=e.until)
            outcome = "deferred"
        except Interrupted as e:
            log.warning("job %d (%s) interrupted, back to the queue: %s", job.id, job.kind, e)
            self.outbox.requeue(job.id, f"interrupted: {e}")
            outcome = "interrupted"
        except RemoteError as e:
            outcome = self._failed(job, str(e), retry_after=e.retry_after, retry=True)
        except SyncToolsError as e:
            outcome = self._failed(job, str(e), retry_after=None, retry=False)
        except Exception as e:  # noqa: BLE001 - an unexpected failure is retried, then dead-lettered
            log.exception("job %d (%s) failed unexpectedly", job.id, job.kind)
            outcome = self._failed(job, f"{type(e).__name__}: {e}", retry_after=None, retry=True)
        else:
            self.outbox.complete(job.id, follow)
            outcome = "done"
        finally:
            # after the outbox frees the lane, before the wake below (see wake)
            if job.lane is not None:
                self._busy.discard(job.lane)
        if self._taken_back:  # its outcome was recorded at last
            with self._taken_back_lock:
                self._taken_back.pop(job.id, None)
        if follow or job.lane is not None:
            self.wake()  # new jobs, or the lane this job held is free for the next one
        if self._observe is not None:
            self._observe(job, outcome, time.monotonic() - started)
        return outcome

    def _failed(self, job: Job, error: str, *, retry_after: float | None, retry: bool) -> str:
        attempt = job.attempts + 1
        if retry and attempt < self.max_attempts:
            delay = self.backoff.delay(attempt, retry_after, self._rand)
            self.outbox.fail(job.id, error, self.outbox.now() + delay)
            log.warning("job %d (%s) attempt %d failed, retrying in %.1f s: %s", job.id, job.kind, attempt,
                        delay, error)
            return "retry"
        self.outbox.fail(job.id, error, None)
        why = "after the retry limit" if retry else "(not retryable)"
        log.error("job %d (%s) dead-lettered %s: %s", job.id, job.kind, why, error)
        return DEAD
