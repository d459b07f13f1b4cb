"""The relay's outbox, worker and NATS path against damaged rows and hostile messages (found by a
review; each test failed before its fix): a job or event row that is not JSON, publishes out of
order, JSON nested past the recursion limit on the subject, a forged message under the next event's
id. Real SQLite files, real nats-server processes, the real worker threads and client
library; nothing of the code under test is mocked.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from pathlib import Path

import nats
import pytest

from sync_tools.agent.nats_transport import subject_for
from sync_tools.relay.outbox import NewJob, Outbox
from sync_tools.relay.worker import Backoff, Worker
from tests.nats_support import DOMAIN, NatsServer, Subscribed, publisher, raw_publish
from tests.support import wait_for


def _raw(db: Path, sql: str, *args: object) -> list[tuple]:
    """A statement on the database file itself, as another tool (or a damaged page) would change it."""
    conn = sqlite3.connect(db, timeout=30)
    try:
        with conn:
            return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


# ------------------------------------------------------------------------ a malformed stored row


def test_a_job_whose_stored_payload_is_not_json_is_dead_lettered_and_its_lane_goes_on(tmp_path: Path) -> None:
    """Outbox._claim marks the job running and only then decodes its payload (Outbox._job): a row
    whose payload is not JSON raises out of claim() after the UPDATE, so the job stays ``running``
    under a live owner forever (resume() never takes back a live process's jobs) and every later job
    of its lane waits behind it, restart after restart."""
    db = tmp_path / "relay.db"
    outbox = Outbox(db)
    ran: list[int] = []
    worker = Worker(outbox, {"dispatch": lambda job: ran.append(job.payload["n"]) or []},
                    backoff=Backoff(base=0.05, cap=0.1), threads=2)
    try:
        bad, good = outbox.add_jobs([NewJob("dispatch", {"n": 1}, lane="local:nats"),
                                     NewJob("dispatch", {"n": 2}, lane="local:nats")])
        _raw(db, "UPDATE jobs SET payload = ? WHERE id = ?", '{"n": 1', bad)  # a torn / hand-edited row
        worker.start()
        try:
            wait_for(lambda: _raw(db, "SELECT status FROM jobs WHERE id = ?", good)[0][0] == "done", timeout=8,
                     what="the next job of the lane to run")
        finally:
            status = _raw(db, "SELECT status, last_error FROM jobs WHERE id = ?", bad)[0]
        assert ran == [2]
        assert status[0] == "dead", status  # one clear error on the row, not a lane held forever
    finally:
        worker.stop(2)
        outbox.close()


def test_an_event_row_that_is_not_json_does_not_hide_the_events_after_it(tmp_path: Path) -> None:
    """Outbox.events_since decodes every row of the batch and raises on the first bad one: the SSE
    broker (fanout.Broker._loop) asks from the same id again at every poll, logs a traceback each
    time and never hands a later release event to any subscriber; every new stream's replay
    (fanout.Broker.stream) fails at the same row."""
    db = tmp_path / "relay.db"
    outbox = Outbox(db)
    try:
        ids = [outbox.append_event("release.updated", {"serial": n}) for n in (1, 2, 3)]
        _raw(db, "UPDATE events SET data = ? WHERE id = ?", "{not json", ids[1])
        after = outbox.events_since(ids[0])
        assert ids[2] in [e.id for e in after]
    finally:
        outbox.close()


# ------------------------------------------------------------------------------- NATS ordering


def _last_on_stream(url: str, subject: str) -> dict:
    async def go() -> dict:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream(domain=DOMAIN)
            msg = await js.get_last_msg("SYNC_RELEASES", subject, direct=True)
            return json.loads(msg.data)
        finally:
            await nc.close()

    return asyncio.run(go())


def test_release_events_reach_the_stream_in_the_order_they_were_made(tmp_path: Path) -> None:
    """docs/nats.md and nats_publish: "Publishes share one lane, so events go out in the order they
    were made". The lane's head is its pending job with the earliest next_attempt (Outbox._heads), so
    an event made while an earlier one waits out its backoff goes out first, and the earlier one is
    then the stream's last message on the subject: the one every agent's catch-up is handed."""
    hub = NatsServer(tmp_path, "hub", hub=True)  # its port is fixed now; it starts later
    db = tmp_path / "relay.db"
    outbox = Outbox(db)
    pub = publisher(tmp_path, hub, timeout=3.0, outbox=outbox)
    worker = Worker(outbox, {"nats": pub.handle}, backoff=Backoff(base=3.0, cap=3.0), threads=2,
                    max_attempts=20, rand=lambda: 1.0)

    def event(serial: int) -> int:
        ev = {"type": "release.updated", "release": "latest", "subsystems": ["nats"], "serial": serial,
              "manifest": "m"}
        eid = outbox.append_event("release.updated", ev, jobs=lambda i: pub.jobs_for(i, ev))
        worker.wake()
        return eid

    try:
        worker.start()
        event(1)  # the hub is down: the publish fails and waits out its backoff
        wait_for(lambda: _raw(db, "SELECT attempts FROM jobs WHERE kind = 'nats'")[0][0] >= 1, timeout=10,
                 what="the first publish to fail")
        hub.start()
        event(2)  # made after event 1
        wait_for(lambda: _raw(db, "SELECT COUNT(*) FROM jobs WHERE kind = 'nats' AND status = 'done'")[0][0] == 2,
                 timeout=20, what="both publishes")
        assert _last_on_stream(hub.url, subject_for("latest"))["serial"] == 2
    finally:
        worker.stop(5)
        outbox.close()
        hub.stop()


# ---------------------------------------------------------------------- a hostile NATS message


def test_a_deeply_nested_message_on_the_subject_is_ignored_with_one_line_and_does_not_drop_the_connection(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """NatsSubscriber._handle catches ValueError and DataError, but json.loads of a deeply nested
    array (well under MAX_EVENT_BYTES) raises RecursionError. Handed over by the catch-up, it
    escapes catch_up() and tears the session down (every agent on the subject reconnects at once);
    live, nats-py swallows it at DEBUG, so the "ignoring" line and the ``ignored`` count never come.
    Anybody who may publish on sync.release.> puts such a message in the stream (its subjects take
    core publishes too)."""
    caplog.set_level(logging.DEBUG, logger="sync_tools.agent.nats_transport")
    with NatsServer(tmp_path, "hub", hub=True) as hub:
        hostile = b"[" * 100_000
        # stored: the stream's last message
        publisher(tmp_path, hub).publish(subject_for("latest"), hostile, "hostile-1")
        with Subscribed(tmp_path, [hub.url], catchup=0, backoff_max=0.2) as subscribed:
            sub = subscribed.sub
            assert sub.connected.wait(10)
            wait_for(lambda: sub.ignored >= 1 or sub.connects >= 2, timeout=10, what="the catch-up to be handled")
            time.sleep(0.5)  # a reconnect, if the session broke, has happened by now
            assert sub.connects == 1, "the hostile catch-up message dropped the connection"
            assert sub.ignored == 1
            lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert any("ignoring a catch-up message that is not a release event" in m for m in lines), lines


def test_a_deeply_nested_live_message_is_logged_and_counted_as_ignored(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The live side of the same gap: the RecursionError leaves NatsSubscriber._handle from nats-py's
    callback, which hands it to the client's error callback (logged at DEBUG): no WARNING line, no
    ``ignored`` count, where docs/nats.md promises a line for every message that is not an event."""
    caplog.set_level(logging.DEBUG, logger="sync_tools.agent.nats_transport")
    with NatsServer(tmp_path, "hub", hub=True) as hub, \
            Subscribed(tmp_path, [hub.url], catchup=0, backoff_max=0.2) as subscribed:
        assert subscribed.sub.connected.wait(10)
        raw_publish(hub.url, "sync.release.latest", [b"[" * 100_000, b'{"type": "release.updated", "serial": 5}'])
        wait_for(lambda: subscribed.serials() == [5], timeout=10, what="the valid event after it")
        assert subscribed.sub.ignored == 1
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert any("ignoring a live message that is not a release event" in m for m in lines), lines


def test_a_forged_message_with_the_next_events_msg_id_does_not_suppress_that_release(tmp_path: Path) -> None:
    """The publish's Nats-Msg-Id is ``<tag>:<serial>:<event id>`` (nats_transport.event_key): both
    numbers count up by one and every subscriber sees the last key in the message headers. A message
    forged on the subject with the next key is stored first; the relay's real publish of that event is
    then a JetStream duplicate, which NatsPublisher.publish takes as success ("already stored"): the
    job is done, the real event never reaches the stream, and the catch-up hands agents the forgery.
    docs/nats.md: "a forged message on the subject can at most make agents look at the release early"."""
    hub = NatsServer(tmp_path, "hub", hub=True).start()
    db = tmp_path / "relay.db"
    outbox = Outbox(db)
    pub = publisher(tmp_path, hub, timeout=3.0, outbox=outbox)
    worker = Worker(outbox, {"nats": pub.handle}, backoff=Backoff(base=0.2, cap=0.5), threads=1)
    try:
        pub.publish(subject_for("latest"), b'{"type": "release.updated", "serial": 43}', "latest:43:1")
        outbox.append_event("seen", {})  # the relay's event log is at id 1, as the key above says

        async def forge() -> None:  # the next release will be serial 44, event id 2
            nc = await nats.connect(hub.url)
            await nc.publish("sync.release.latest", b"not an event", headers={"Nats-Msg-Id": "latest:44:2"})
            await nc.flush()
            await nc.close()

        asyncio.run(forge())
        ev = {"type": "release.updated", "release": "latest", "subsystems": ["nats"], "serial": 44, "manifest": "m"}
        assert outbox.append_event("release.updated", ev, jobs=lambda i: pub.jobs_for(i, ev)) == 2
        worker.start()
        wait_for(lambda: _raw(db, "SELECT status FROM jobs WHERE kind = 'nats'")[0][0] != "pending", timeout=15,
                 what="the publish job to run")
        time.sleep(0.3)

        async def last() -> bytes:
            nc = await nats.connect(hub.url)
            try:
                msg = await nc.jetstream(domain=DOMAIN).get_last_msg("SYNC_RELEASES", "sync.release.latest",
                                                                     direct=True)
                return msg.data
            finally:
                await nc.close()

        data = asyncio.run(last())
        assert data != b"not an event", "the forgery took the release event's place on the stream"
        assert json.loads(data)["serial"] == 44
    finally:
        worker.stop(5)
        outbox.close()
        hub.stop()



def test_a_read_of_a_file_that_is_not_the_database_is_an_outbox_error(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """(failed before the fix: sqlite3.OperationalError, a 500 from /webhook, in a CI run) A restore
    copies the database back while the relay runs: a reader opened during the copy finds no tables.
    The read is an OutboxError (503, or tried again later) and that connection is not kept."""
    from sync_tools.relay import outbox as ob

    other = sqlite3.connect(tmp_path / "other.db")  # a database, but none of the relay's tables
    other.execute("CREATE TABLE x (y)")
    other.commit()
    other.close()
    outbox = ob.Outbox(tmp_path / "relay.db")
    try:
        real = ob._connect
        monkeypatch.setattr(ob, "_connect", lambda path, create=True: real(tmp_path / "other.db", create=create))
        with pytest.raises(ob.OutboxError, match="cannot read the relay database"):
            outbox.get_state("dispatched:nats")
        monkeypatch.setattr(ob, "_connect", real)
        assert outbox.get_state("dispatched:nats") is None  # a new reader, on the database: the bad one was dropped
    finally:
        outbox.close()
