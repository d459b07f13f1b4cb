"""Release events over NATS in hostile or unlucky conditions (found by a review; each test failed before
its fix): credentials files that are not what they claim to be, a catch-up answer that is an error
status, a stream an operator made that agents cannot catch up from, a relay domain that names no
JetStream, a server URL with a password in it. Real nats-server processes and real files; nothing of
the code under test is mocked.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from pathlib import Path

import nats
import nkeys
import pytest
from nats.js.api import RetentionPolicy, StreamConfig

from sync_tools.agent.nats_transport import NatsSubscriber, connect_options, subject_for
from sync_tools.config import NatsConfig, load_config
from sync_tools.errors import ConfigError, RemoteError
from sync_tools.relay.nats_publish import NatsPublisher
from tests.nats_support import DOMAIN, NatsServer, Subscribed, publisher
from tests.support import wait_for

EVENT = b'{"type": "release.updated", "release": "latest", "subsystems": ["nats"], "serial": %d, "manifest": "m"}'


def _seed(prefix: int = nkeys.PREFIX_BYTE_USER) -> str:
    return nkeys.encode_seed(secrets.token_bytes(32), prefix).decode()


def _public(seed: str) -> str:
    return nkeys.from_seed(bytearray(seed.encode())).public_key.decode()


def _creds(jwt: str | None, seed: str | None) -> str:
    parts = []
    if jwt is not None:
        parts.append(f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n")
    if seed is not None:
        parts.append(f"-----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n")
    return "\n".join(parts)


# ---------------------------------------------------------------------------- credentials files


def test_a_creds_file_without_its_jwt_is_one_clear_error_not_a_publish_that_never_returns(tmp_path: Path) -> None:
    """nats-py reads a .creds file's JWT with ``while True: readline()`` until it sees the JWT's BEGIN
    line, when the server asks for a signature (every server with NKey or JWT users does): a .creds
    file without that block (an NKey seed file named as ``creds:``, a renewal written seed first) spun
    forever at full CPU inside the connect, in the relay's publishing thread (the outbox job stayed
    running and held the NATS lane: no release went out again) and in the agent's thread (no retry,
    and stop() could not end it). A file that does not load is now refused before any connection."""
    seed = _seed()
    (tmp_path / "seed-only.creds").write_text(_creds(None, seed))
    with NatsServer(tmp_path, "hub", hub=True, extra=f'authorization {{ users: [ {{ nkey: "{_public(seed)}" }} ] }}') as hub:
        cfg = NatsConfig(servers=(hub.url,), domain=DOMAIN, creds="seed-only.creds")
        outcome: list[BaseException | None] = []

        def publish() -> None:
            try:
                NatsPublisher(cfg, root=tmp_path, environ={}, timeout=1.0).publish(subject_for("latest"), EVENT % 1, "k")
                outcome.append(None)
            except BaseException as e:  # noqa: BLE001 - what publish raised is the subject of the test
                outcome.append(e)

        t = threading.Thread(target=publish, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), "the publish never returned (nats-py reading the .creds file for ever)"
        assert isinstance(outcome[0], RemoteError)  # retried by the outbox: the file may be mid-renewal
        assert "no user JWT" in str(outcome[0]) and seed not in str(outcome[0])
        # the agent: a file that does not load stops it at start (serve_nats makes the options first)
        with pytest.raises(ConfigError, match="seed-only.creds .*no user JWT"):
            NatsSubscriber(cfg, "latest", lambda ev: None,
                           options=lambda: connect_options(cfg, root=tmp_path, environ={}))


def test_malformed_credentials_files_are_named_at_start_never_with_the_secret(tmp_path: Path) -> None:
    """A .creds file without its seed was ``TypeError: object of type 'NoneType' has no len()`` at every
    connect; an NKey seed file with no seed in it ``ErrInvalidSeed``, retried for ever by an agent that
    docs/nats.md says stops at start when a file does not load; an account's seed (``SA...``) given where
    the user's belongs was only "refused the credentials" by the server. Each is now one ConfigError
    that names the file and what is wrong with it, and never shows the seed."""
    user, account = _seed(), _seed(nkeys.PREFIX_BYTE_ACCOUNT)
    files = {
        "no-seed.creds": ("creds", _creds("eyJhbGciOiJlZDI1NTE5In0.e30.c2ln", None), "no user NKey seed"),
        "junk.creds": ("creds", "not a creds file\n", "no user JWT"),
        "account.creds": ("creds", _creds("eyJhbGciOiJlZDI1NTE5In0.e30.c2ln", account), "an account seed"),
        "junk.nk": ("nkey_seed", "hello world\n", "not an NKey seed"),
        "empty.nk": ("nkey_seed", "", "not an NKey seed"),
        "account.nk": ("nkey_seed", account + "\n", "an account seed"),
    }
    seed = _seed()
    with NatsServer(tmp_path, "hub", hub=True, extra=f'authorization {{ users: [ {{ nkey: "{_public(seed)}" }} ] }}') as hub:
        for name, (key, text, expected) in files.items():
            (tmp_path / name).write_text(text)
            cfg = NatsConfig(servers=(hub.url,), domain=DOMAIN, **{key: name})  # type: ignore[arg-type]
            with pytest.raises(ConfigError, match=expected) as caught:
                NatsSubscriber(cfg, "latest", lambda ev: None,
                               options=lambda cfg=cfg: connect_options(cfg, root=tmp_path, environ={}))
            assert name in str(caught.value) and user not in str(caught.value) and account not in str(caught.value)
            with pytest.raises(RemoteError, match=expected):
                NatsPublisher(cfg, root=tmp_path, environ={}, timeout=2.0).publish(subject_for("latest"), b"{}", "k")
        # the user's own seed in a file is what the server takes
        (tmp_path / "user.nk").write_text(seed + "\n")
        good = NatsConfig(servers=(hub.url,), domain=DOMAIN, nkey_seed="user.nk")
        NatsPublisher(good, root=tmp_path, environ={}).publish(subject_for("latest"), EVENT % 2, "latest:2:1")
        with Subscribed(tmp_path, [hub.url], catchup=0, nkey_seed="user.nk") as agent:
            wait_for(lambda: agent.serials() == [2], what="the catch-up with the user's seed")


# ------------------------------------------------------------------------------ the catch-up answer


@pytest.mark.parametrize("status", ["400", "408", "abc", "503"])
def test_a_stored_message_with_a_status_header_and_no_body_does_not_make_every_agent_reconnect(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, status: str) -> None:
    """nats-py's direct get takes any answer without a body and with a ``Status`` header for an error
    status, and then raises KeyError on the missing description: the exception left catch_up(), tore
    the session down, and the agent reconnected and asked again, about twice a second and with a WARNING
    each time, for as long as the message was the subject's last (until the next release). One core
    publish by anybody who may publish on sync.release.> did it to every agent. The answer is now read
    by the agent: a stored message is a message (here: no body, ignored once), whatever headers it has.
    (With ``Status: 503`` nats-py took it for "no responders": the agent asked again every few seconds
    for as long, logging that the hub was away.)"""
    caplog.set_level(logging.DEBUG, logger="sync_tools.agent.nats_transport")
    with NatsServer(tmp_path, "hub", hub=True) as hub:
        publisher(tmp_path, hub).publish(subject_for("latest"), EVENT % 1, "latest:1:1")

        async def poison() -> None:
            nc = await nats.connect(hub.url)
            await nc.publish("sync.release.latest", b"", headers={"Status": status})
            await nc.flush()
            await nc.close()

        asyncio.run(poison())
        with Subscribed(tmp_path, [hub.url], catchup=0.2, backoff_max=0.2) as s:
            assert s.sub.connected.wait(10)
            wait_for(lambda: s.sub.ignored >= 1 or s.sub.connects >= 3, what="the catch-up to be handled")
            time.sleep(1.0)  # several catch-ups, and the reconnects had the session broken
            assert s.sub.connects == 1, f"{s.sub.connects} connects: the catch-up answer broke the session"
            assert s.sub.ignored == 1 and s.events == []
            lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert lines == ["NATS sync.release.latest: ignoring a catch-up message that is not a release event: "
                             "payload of 0 bytes (an event is 1 to 1048576)"], lines
            # the next release replaces it, live and for the catch-up
            publisher(tmp_path, hub).publish(subject_for("latest"), EVENT % 2, "latest:2:2")
            wait_for(lambda: s.serials() == [2], what="the next release")


def test_a_catch_up_answer_that_is_no_stored_message_of_the_subject_is_ignored_and_asked_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Anything in the account that may subscribe to the stream's direct-get subject can answer an
    agent's catch-up first (here: a stream without allow_direct, and a responder in its place). An
    answer without JetStream's headers raised TypeError/KeyError in nats-py and broke the session
    (a reconnect a second); one naming another subject was handed on as the subject's release. Both are
    now one line, and the agent asks again with backoff on the same connection."""
    caplog.set_level(logging.DEBUG, logger="sync_tools.agent.nats_transport")
    with NatsServer(tmp_path, "hub", hub=True) as hub:
        answers = [(b"", None), (EVENT % 9, {"Nats-Stream": "SYNC_RELEASES", "Nats-Subject": "sync.release.other",
                                             "Nats-Sequence": "9"})]
        served: list[int] = []
        ready = threading.Event()
        done = threading.Event()

        async def responder() -> None:
            nc = await nats.connect(hub.url)

            async def answer(msg: nats.aio.msg.Msg) -> None:
                data, headers = answers[len(served) % len(answers)]
                served.append(1)
                await nc.publish(msg.reply, data, headers=headers)

            for api in (f"$JS.{DOMAIN}.API", "$JS.API"):
                await nc.subscribe(f"{api}.DIRECT.GET.SYNC_RELEASES.>", cb=answer)
            await nc.flush()
            ready.set()
            while not done.is_set():
                await asyncio.sleep(0.05)
            await nc.close()

        t = threading.Thread(target=lambda: asyncio.run(responder()), daemon=True)
        t.start()
        assert ready.wait(10)
        try:
            with Subscribed(tmp_path, [hub.url], catchup=0, backoff_max=0.2) as s:
                assert s.sub.connected.wait(10)
                wait_for(lambda: len(served) >= 6, what="several catch-up answers")
                assert s.sub.connects == 1 and s.events == []
        finally:
            done.set()
            t.join(10)
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO and "catch-up" in r.getMessage()]
        assert any("not a stored message" in m for m in lines), lines
        assert any("sync.release.other" in m for m in lines), lines
        assert not any("reconnecting" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------- the stream


def _make_stream(url: str, **config: object) -> None:
    async def go() -> None:
        nc = await nats.connect(url)
        await nc.jetstream().add_stream(StreamConfig(name="SYNC_RELEASES", **config))
        await nc.close()

    asyncio.run(go())


@pytest.mark.parametrize("config, expected", [
    (dict(subjects=["sync.release.>"], retention=RetentionPolicy.INTEREST, allow_direct=True),
     "retention interest"),
    (dict(subjects=["sync.release.>"], retention=RetentionPolicy.WORK_QUEUE, allow_direct=True),
     "retention workqueue"),
    (dict(subjects=["sync.release.v1", "sync.release.*.x"], allow_direct=True),
     r"its subjects \(sync.release.v1, sync.release.\*.x\) do not take sync.release.latest"),
    (dict(subjects=["sync.release.>"], allow_direct=True, no_ack=True), "no_ack"),
], ids=["interest", "workqueue", "subjects", "no-ack"])
def test_a_stream_made_beforehand_that_agents_cannot_catch_up_from_is_refused_clearly(
        tmp_path: Path, config: dict, expected: str) -> None:
    """``The relay uses a stream that exists as it is``: one made with retention interest dropped every
    release at once (no consumers), and the relay logged "published ... seq 1" while no agent could
    ever catch up; one whose subjects do not take the release's was "no response from stream"; one with
    no_ack a timeout at every try while it stored each. Each is now a retried error (dead-lettered and
    shown in /health in the end) that names the stream and what is wrong with it."""
    with NatsServer(tmp_path, "hub", hub=True) as hub:
        _make_stream(hub.url, **config)
        with pytest.raises(RemoteError, match=f"JetStream stream SYNC_RELEASES .*{expected}"):
            publisher(tmp_path, hub, timeout=2.0).publish(subject_for("latest"), EVENT % 1, "latest:1:1")


def test_an_operators_stream_with_other_subjects_that_take_the_release_is_used(tmp_path: Path) -> None:
    """The check reads NATS wildcards: a stream on ``sync.>`` (or ``sync.release.*``) takes the
    release's subject, and the relay publishes into it as before."""
    with NatsServer(tmp_path, "hub", hub=True) as hub:
        _make_stream(hub.url, subjects=["other.x", "sync.*.latest"], allow_direct=True)
        publisher(tmp_path, hub).publish(subject_for("latest"), EVENT % 3, "latest:3:1")
        with Subscribed(tmp_path, [hub.url], catchup=0) as s:
            wait_for(lambda: s.serials() == [3], what="the catch-up")


def test_a_relay_domain_that_names_no_jetstream_says_so(tmp_path: Path) -> None:
    """A typo in relay.nats.domain was ``ServiceUnavailableError: code=None err_code=None
    description='None'`` at every try."""
    with NatsServer(tmp_path, "hub", hub=True) as hub:
        cfg = NatsConfig(servers=(hub.url,), domain="hbu")
        with pytest.raises(RemoteError, match=r"no JetStream answered in domain 'hbu' \(relay\.nats\.domain"):
            NatsPublisher(cfg, root=tmp_path, environ={}, timeout=2.0).publish(subject_for("latest"), b"{}", "k")


# ------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("url", ["nats://sync:s3cret-pw@127.0.0.1:4222", "NATS://sync:s3cret-pw@hub:4222",
                                 "sync:s3cret-pw@hub:4222", "nats://sync:s3cret/pw@hub:4222",
                                 "tls://s3cret-pw@hub:4222"])
def test_a_server_url_with_credentials_in_it_is_refused_without_showing_them(tmp_path: Path, url: str) -> None:
    """The refusal of a ``user:password@`` URL quoted the URL, password and all, in the error that
    ``sync-tools agent`` and the relay print at start (and a service manager keeps in its journal);
    a password with a ``/`` in it was not even refused (only the part before the first ``/`` was
    looked at), and went on to every "cannot connect" line."""
    (tmp_path / "sync-tools.yaml").write_text(
        f"release:\n  store: s\n  tag: latest\nsubsystems: {{}}\nagent:\n  nats:\n    servers: ['{url}']\n")
    with pytest.raises(ConfigError, match="credentials") as caught:
        load_config(tmp_path / "sync-tools.yaml")
    assert "s3cret" not in str(caught.value)
