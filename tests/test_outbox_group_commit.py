"""The outbox's group commit gives every delivery the answer a commit of its own would: random
batches (seeded, so a failure repeats) through ``Outbox._write_batch`` whole, against the same
deliveries one transaction each, on two real SQLite files, with the worker's bookkeeping between
batches done alike on both. Jobs are shaped as the relay makes them (sync_tools/relay/app.py
``jobs_for``): dispatches of ordered subsystems (slots, versions with and without an order), of a
``commits`` subsystem, fan-outs and rollout jobs."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from sync_tools.relay.app import _newer_than
from sync_tools.relay.outbox import NewJob, Outbox, _Pending

VERSIONS = ["v1.0.0", "v1.1.0", "v1.2.0", "v1.3.0", "v2.0.0", "v2.0.0-rc1", "latest", "nightly-1", "nightly-2", "1.0"]


def _job(rng: random.Random) -> NewJob:
    r = rng.random()
    if r < 0.65:
        sub, v = rng.choice(["nats", "arc", "lb"]), rng.choice(VERSIONS)
        return NewJob("dispatch", {"subsystem": sub, "version": v}, lane="dispatch", dedupe=f"dispatch:{sub}:{v}",
                      supersedes=f"dispatch:{sub}:", newer=_newer_than(v))
    if r < 0.8:  # strategy: commits, pushes one by one
        sha = rng.choice(["a" * 40, "b" * 40, "c" * 40])
        return NewJob("dispatch", {"subsystem": "cm", "version": sha}, lane="dispatch", dedupe=f"dispatch:cm:{sha}")
    if r < 0.9:
        return NewJob("fanout", {"tag": "latest"}, lane="fanout")
    k = rng.randrange(3)
    return NewJob("rollout", {"k": k}, lane="rollout", dedupe=f"rollout:x:{k}")


def _answer(p: _Pending) -> tuple:
    r = p.outcome()
    return (type(r).__name__,) if isinstance(r, Exception) else (r.duplicate, r.jobs, r.coalesced, r.replaced, r.digest)


def _tables(path: Path) -> tuple[list, list]:
    with sqlite3.connect(path) as c:
        return (c.execute("SELECT * FROM jobs ORDER BY id").fetchall(),
                c.execute("SELECT * FROM deliveries ORDER BY delivery").fetchall())


@pytest.mark.parametrize("seed", range(40))
def test_a_batch_answers_as_one_commit_per_delivery_would(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    t = [1_000_000.0]
    clock: Callable[[], float] = lambda: t[0]  # noqa: E731 - both outboxes on one clock
    one, batched = Outbox(tmp_path / "one.db", now=clock), Outbox(tmp_path / "batched.db", now=clock)
    try:
        seen: list[str] = []
        for _ in range(rng.randint(3, 10)):
            items = []
            for _ in range(rng.randint(1, 12)):
                delivery = rng.choice(seen) if seen and rng.random() < 0.2 else f"d{len(seen)}"
                if delivery not in seen:
                    seen.append(delivery)
                state = rng.getstate()  # the same jobs for both: drawn twice from one state
                items.append((delivery, state, rng.choice([0, 1, 1, 1, 2, 3]), rng.choice([None, "x", "y"])))
                for _ in range(items[-1][2]):
                    _job(rng)

            def pendings(items: list = items) -> list[_Pending]:
                out = []
                for delivery, state, n, digest in items:
                    draw = random.Random()
                    draw.setstate(state)
                    out.append(_Pending(delivery, "create", "s", [_job(draw) for _ in range(n)], digest))
                return out

            alone = pendings()
            for p in alone:
                one._write_batch([p])
            together = pendings()
            batched._write_batch(together)
            assert [_answer(p) for p in together] == [_answer(p) for p in alone]
            # the worker's bookkeeping between batches, alike on both
            for _ in range(rng.randint(0, 4)):
                op = rng.random()
                if op < 0.4:
                    a, b = one.claim(), batched.claim()
                    assert (a and a.id) == (b and b.id)
                else:
                    running = [j.id for j in one.jobs("running", limit=1000)]
                    if running:
                        job = rng.choice(running)
                        for o in (one, batched):
                            o.complete(job) if op < 0.75 else o.fail(job, "e", None)
                t[0] += rng.choice([0.0, 10.0, 1800.0, 3600.0, 3601.0])
        assert _tables(tmp_path / "batched.db") == _tables(tmp_path / "one.db")
    finally:
        one.close()
        batched.close()
