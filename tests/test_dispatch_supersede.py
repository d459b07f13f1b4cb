"""One pending dispatch per subsystem, of its newest version, and a second between two
repository_dispatch calls (GitHub's REST API best practices: secondary rate limits). Real parts: the
outbox on real SQLite, the relay under a real server, the GitHub API double."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import pytest
import requests

from sync_tools.relay.app import get_relay
from sync_tools.relay.outbox import NewJob, Outbox, Recorded
from sync_tools.versions import later
from tests.relay_support import delivery, running_relay, tag_payload
from tests.servers.github_api import GitHubAPIServer, github_api  # noqa: F401
from tests.support import wait_for


def _job(version: str, sub: str = "nats") -> NewJob:
    return NewJob("dispatch", {"subsystem": sub, "version": version}, lane="dispatch",
                  dedupe=f"dispatch:{sub}:{version}", supersedes=f"dispatch:{sub}:",
                  newer=lambda held: later(version, held["version"]))


def test_a_newer_version_replaces_the_pending_dispatch_and_an_older_one_is_dropped(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "relay.db")
    try:
        first = outbox.record("d1", "create", "x", [_job("v1.0.0")])
        newer = outbox.record("d2", "create", "x", [_job("v1.2.0")])
        assert newer.jobs == first.jobs and newer.coalesced == 0 and newer.replaced == 1  # the same job, now v1.2.0
        assert first.replaced == 0
        older = outbox.record("d3", "create", "x", [_job("v1.1.0")])
        assert older.jobs == () and older.coalesced == 1
        other = outbox.record("d4", "create", "x", [_job("v9.0.0", sub="arc")])  # its own slot
        assert other.jobs != first.jobs
        pending = {j.payload["subsystem"]: j.payload["version"] for j in outbox.jobs("pending")}
        assert pending == {"nats": "v1.2.0", "arc": "v9.0.0"}
        assert all(outbox.has_delivery(d) for d in ("d1", "d2", "d3", "d4"))  # every delivery recorded

        running = outbox.claim()  # the nats dispatch is running: a newer version queues behind it
        assert running is not None and running.payload["version"] == "v1.2.0"
        behind = outbox.record("d5", "create", "x", [_job("v1.3.0")])
        assert behind.jobs and behind.jobs != first.jobs
        again = outbox.record("d6", "create", "x", [_job("v1.4.0")])
        assert again.jobs == behind.jobs  # that one is the slot's pending job now
        assert running.id not in {j.id for j in outbox.jobs("pending")}
        assert outbox.jobs("running")[0].payload["version"] == "v1.2.0"  # untouched
    finally:
        outbox.close()


def test_a_burst_of_versions_dispatches_the_newest_a_second_apart(tmp_path: Path,
                                                                  github_api: GitHubAPIServer) -> None:  # noqa: F811
    with running_relay(tmp_path, github_api) as server:
        relay = get_relay(server.app)
        assert relay.settings.dispatch_interval == 1.0
        for i in range(40):
            d = delivery("create", tag_payload(tag=f"v3.1.{i}"))
            assert requests.post(server.url + "/webhook", data=d.body, headers=d.headers, timeout=10).status_code == 202
        wait_for(lambda: relay.outbox.stats().queue_depth == 0 and github_api.state.dispatches
                 and github_api.state.dispatches[-1]["client_payload"]["version"] == "v3.1.39",
                 what="the newest version dispatched")
        versions = [int(d["client_payload"]["version"].rsplit(".", 1)[1]) for d in github_api.state.dispatches]
        assert versions == sorted(set(versions)) and len(versions) < 40
        times = [r["at"] for r in github_api.requests_to("POST", "/dispatches$")]
        assert all(b - a >= 0.95 for a, b in zip(times, times[1:], strict=False)), times


def test_the_second_between_dispatches_counts_from_when_the_last_one_went_out(
        tmp_path: Path, github_api: GitHubAPIServer) -> None:  # noqa: F811
    """A first dispatch slow to leave (a new connection, a TLS handshake) reached GitHub late; the pace
    counted from its start, so the next one, quick on the kept connection, arrived 0.4 s after it."""
    with running_relay(tmp_path, github_api) as server:
        relay = get_relay(server.app)
        send = relay.dispatcher.dispatch
        calls: list[int] = []

        def slow_first(payload: dict) -> None:  # type: ignore[type-arg]
            calls.append(1)
            if len(calls) == 1:
                time.sleep(0.6)
            send(payload)

        relay.dispatcher.dispatch = slow_first  # type: ignore[method-assign]
        for tag in ("v3.2.0", "v3.2.1"):
            d = delivery("create", tag_payload(tag=tag))
            assert requests.post(server.url + "/webhook", data=d.body, headers=d.headers, timeout=10).status_code == 202
            if tag == "v3.2.0":  # the first is on its way before the second is queued
                wait_for(lambda: calls, what="the first dispatch to start")
        wait_for(lambda: len(github_api.requests_to("POST", "/dispatches$")) == 2, what="two dispatches")
        first, second = (r["at"] for r in github_api.requests_to("POST", "/dispatches$"))
        assert second - first >= 0.95, second - first


def _nightly(version: str) -> NewJob:
    from sync_tools.relay.app import _newer_than

    return NewJob("dispatch", {"subsystem": "nats", "version": version}, lane="dispatch",
                  dedupe=f"dispatch:nats:{version}", supersedes="dispatch:nats:", newer=_newer_than(version))


def test_tags_without_an_order_take_the_place_by_arrival_and_a_new_version_starts_its_attempts_afresh(
        tmp_path: Path) -> None:
    import sqlite3

    outbox = Outbox(tmp_path / "relay.db")
    try:
        first = outbox.record("d1", "create", "x", [_nightly("nightly-20241215")])
        with sqlite3.connect(tmp_path / "relay.db") as db:  # as after seven failed attempts
            db.execute("UPDATE jobs SET attempts = 7, last_error = 'GitHub 502' WHERE id = ?", (first.jobs[0],))
        latest = outbox.record("d2", "create", "x", [_nightly("latest")])
        assert latest.jobs == first.jobs and latest.replaced == 1  # never dropped for want of an order
        after = outbox.record("d3", "create", "x", [_nightly("v2.0.0")])
        assert after.jobs == first.jobs and after.replaced == 1
        (job,) = outbox.jobs("pending")
        assert (job.payload["version"], job.attempts, job.last_error) == ("v2.0.0", 0, None)
    finally:
        outbox.close()


def test_a_job_back_in_the_queue_beside_a_newer_version_is_skipped_at_its_turn(
        tmp_path: Path, github_api: GitHubAPIServer) -> None:  # noqa: F811
    """v1 runs; v2 arrives and is queued (nothing was pending); v1 goes back to the queue (paced, or in
    its backoff): two pending in one slot. v1's turn must not build v1."""
    from sync_tools.relay.app import create_app
    from tests.relay_support import RELEASE_REPO, settings, write_config

    github_api.state.add_repo(RELEASE_REPO)
    cfg = write_config(tmp_path)
    relay = get_relay(create_app(cfg, settings(cfg, tmp_path, github_api_url=github_api.url, dispatch_interval=0)))
    try:  # not started: no worker takes the jobs meanwhile
        relay.outbox.record("d1", "create", "x", relay.jobs_for([_change("v2.11.0")]))
        running = relay.outbox.claim()
        assert running is not None
        relay.outbox.record("d2", "create", "x", relay.jobs_for([_change("v2.12.0")]))
        relay.outbox.requeue(running.id, "deferred: paced")
        assert len(relay.outbox.jobs("pending")) == 2
        back = relay.outbox.claim()
        assert back is not None and back.payload["version"] == "v2.11.0"
        assert relay._dispatch_job(back) == []  # skipped: v2.12.0 is queued
        relay.outbox.complete(back.id)
        assert github_api.state.dispatches == []
        newer = relay.outbox.claim()
        assert newer is not None and newer.payload["version"] == "v2.12.0"
        relay._dispatch_job(newer)
        assert [d["client_payload"]["version"] for d in github_api.state.dispatches] == ["v2.12.0"]
    finally:
        relay.outbox.close()


def _change(version: str):  # type: ignore[no-untyped-def]
    from sync_tools.relay import webhook as wh

    return wh.UpstreamChange(delivery=f"d-{version}", event="create", subsystem="nats", version=version,
                             commit=None, upstream="https://github.com/nats-io/nats-server")


def test_a_waiter_that_cannot_be_told_does_not_stop_the_committer(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "relay.db")
    try:
        def closed_loop() -> None:
            raise RuntimeError("Event loop is closed")

        item = outbox.submit("d1", "create", "x", [], digest=None, notify=closed_loop)
        assert outbox.record("d2", "create", "x", [], timeout=10).duplicate is False  # the committer lives
        assert item.outcome().duplicate is False
    finally:
        outbox.close()


def _one_commit(outbox: Outbox, jobs: list[tuple[str, NewJob]]) -> list[Recorded]:
    """Hand *jobs* (delivery id, job) to the committer while another process holds the turn to write
    (the flock of ``<db>.lock``, as a second ingest process would); returns the answers, checking
    they came from one durable transaction."""
    transactions = []
    real_tx = outbox._tx

    def counted(durable: bool = True):  # noqa: ANN202
        transactions.append(durable)
        return real_tx(durable)

    other = os.open(f"{outbox.path}.lock", os.O_RDWR)
    outbox._tx = counted  # type: ignore[method-assign]
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        notified = threading.Semaphore(0)
        waiting = [outbox.submit(jobs[0][0], "create", "x", [jobs[0][1]], digest=None, notify=notified.release)]
        # the committer took the first and waits for its turn: the rest come while it waits
        wait_for(lambda: transactions == [True], what="the committer waiting for its turn to write")
        waiting += [outbox.submit(d, "create", "x", [job], digest=None, notify=notified.release) for d, job in jobs[1:]]
        fcntl.flock(other, fcntl.LOCK_UN)
        for _ in waiting:
            assert notified.acquire(timeout=10)
    finally:
        del outbox._tx
        os.close(other)
    assert transactions == [True]  # all of them, one durable commit
    answers = [w.outcome() for w in waiting]
    assert all(isinstance(a, Recorded) for a in answers)
    return answers  # type: ignore[return-value]


def test_deliveries_that_arrive_while_another_process_writes_join_the_next_commit(tmp_path: Path) -> None:
    """Two ingest processes on one database take turns to write. What a process's committer
    receives while it waits for its turn goes into the same transaction: one fsync for all, as the
    ingest server's throughput needs. The answers are those of one commit per delivery, in order."""
    outbox = Outbox(tmp_path / "relay.db")
    try:
        first = outbox.record("d0", "create", "x", [_job("v1.0.0")])
        # newer, newer, older, the same again, another subsystem's, a delivery id seen before
        got = _one_commit(outbox, [("d1", _job("v1.1.0")), ("d2", _job("v1.3.0")), ("d3", _job("v1.2.0")),
                                   ("d4", _job("v1.3.0")), ("d5", _job("v9.0.0", sub="arc")),
                                   ("d1", _job("v1.4.0")), ("d0", _job("v1.5.0"))])
        assert [(r.duplicate, r.replaced, r.coalesced) for r in got] == [
            (False, 1, 0), (False, 1, 0), (False, 0, 1), (False, 0, 1), (False, 0, 0), (True, 0, 0), (True, 0, 0)]
        assert got[0].jobs == got[1].jobs == first.jobs and got[2].jobs == got[3].jobs == ()
        assert all(outbox.has_delivery(f"d{i}") for i in range(6))
        pending = {j.payload["subsystem"]: (j.payload["version"], j.delivery) for j in outbox.jobs("pending")}
        assert pending == {"nats": ("v1.3.0", "d2"), "arc": ("v9.0.0", "d5")}

        # tags with no order take the slot by arrival; a tag the batch moved the slot away from is
        # not covered any more, and comes back; the one after it is
        def nightly(tag: str) -> NewJob:  # as the relay's _newer_than for a tag it cannot order
            return NewJob("dispatch", {"subsystem": "lb", "version": tag}, lane="dispatch",
                          dedupe=f"dispatch:lb:{tag}", supersedes="dispatch:lb:", newer=lambda held: True)

        outbox.record("n0", "create", "x", [nightly("nightly-1")])
        got = _one_commit(outbox, [("n1", nightly("nightly-2")), ("n2", nightly("nightly-1")),
                                   ("n3", nightly("nightly-1"))])
        assert [(r.replaced, r.coalesced) for r in got] == [(1, 0), (1, 0), (0, 1)]
        lb = [j for j in outbox.jobs("pending") if j.payload["subsystem"] == "lb"]
        assert [(j.payload["version"], j.delivery) for j in lb] == [("nightly-1", "n2")]
    finally:
        outbox.close()


def test_a_job_that_supersedes_needs_newer_and_a_key_of_its_own_under_the_slot() -> None:
    """A group commit keeps a slot's pending job for its whole transaction, which is only right when
    the slot's key range holds the slot's own jobs: a job that breaks that is refused when made."""
    with pytest.raises(ValueError, match="needs newer"):
        NewJob("dispatch", {}, dedupe="dispatch:nats:v1", supersedes="dispatch:nats:")
    for key in (None, "dispatch:arc:v1", "dispatch:nats:"):
        with pytest.raises(ValueError, match="a dedupe key under it"):
            NewJob("dispatch", {}, dedupe=key, supersedes="dispatch:nats:", newer=lambda held: True)
    assert _job("v1.0.0").supersedes == "dispatch:nats:"
