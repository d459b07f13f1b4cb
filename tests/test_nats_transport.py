"""The agent's NATS subscription (sync_tools/agent/nats_transport.py) against real nats-server processes:
a JetStream hub and a leaf node of it on loopback, joined by a link the tests can cut.

What each test proves is in its name and docstring; every server is a real process, every message
goes through the real client library and the relay's own publisher.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sync_tools.agent.events import AgentEvent
from sync_tools.agent.nats_transport import (
    LOOP_ENV,
    NatsSubscriber,
    connect_options,
    loop_factory,
    subject_for,
)
from sync_tools.config import NatsConfig, load_config
from sync_tools.errors import ConfigError, RemoteError
from sync_tools.relay.nats_publish import NatsPublisher
from tests.nats_support import DOMAIN, Link, NatsServer, Subscribed, publisher, raw_publish, tls_files
from tests.support import wait_for

EVENT = b'{"type": "release.updated", "release": "latest", "subsystems": ["nats"], "serial": %d, "manifest": "m"}'


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[NatsServer, Link, NatsServer]]:
    """A hub, and a leaf node joined to it through a cuttable link."""
    hub = NatsServer(tmp_path, "hub", hub=True).start()
    link = Link(hub.leaf_port or 0)
    leaf = NatsServer(tmp_path, "leaf", leaf_of=link.leaf_url).start()
    try:
        wait_for(lambda: hub.leafs() == 1, what="the leaf node's link")
        yield hub, link, leaf
    finally:
        leaf.stop()
        link.close()
        hub.stop()


def test_a_live_event_reaches_an_agent_on_the_leaf_and_an_agent_offline_for_days_catches_up_at_connect(
        tmp_path: Path, site: tuple[NatsServer, Link, NatsServer]) -> None:
    hub, _, leaf = site
    pub = publisher(tmp_path, hub)
    online = Subscribed(tmp_path, [leaf.url])
    try:
        assert online.sub.connected.wait(10)
        wait_for(lambda: hub.leaf_interest("sync.release.latest"), what="interest at the hub")
        pub.publish(subject_for("latest"), EVENT % 7, "latest:7:1")
        wait_for(lambda: online.serials() == [7], what="the live event")
        assert online.events[0] == AgentEvent(release="latest", subsystems=("nats",), serial=7, manifest="m",
                                              id="latest:7:1", source="nats")
        # the relay retrying a publish whose ack it lost: JetStream keeps one, the agent acts once
        pub.publish(subject_for("latest"), EVENT % 7, "latest:7:1")
        pub.publish(subject_for("latest"), EVENT % 8, "latest:8:2")
        wait_for(lambda: online.serials() == [7, 8], what="the next event")
    finally:
        online.close()
    # an agent that was away for all of it: its first connect's direct get hands it the newest event
    late = Subscribed(tmp_path, [leaf.url], catchup=0)
    try:
        wait_for(lambda: late.serials() == [8], what="the catch-up at connect")
        assert late.events[0].id == "latest:8:2"
    finally:
        late.close()


def test_messages_that_are_not_events_are_logged_and_ignored(
        tmp_path: Path, site: tuple[NatsServer, Link, NatsServer], caplog: pytest.LogCaptureFixture) -> None:
    hub, _, leaf = site
    caplog.set_level(logging.WARNING, logger="sync_tools.agent.nats_transport")
    s = Subscribed(tmp_path, [leaf.url], catchup=0)
    try:
        assert s.sub.connected.wait(10)
        wait_for(lambda: hub.leaf_interest("sync.release.latest"), what="interest at the hub")
        bad = [b"not json", b"[1, 2]", b'{"subsystems": "nats"}', b'{"serial": "7"}', b"",
               b'{"serial": true}', b"\xff\xfe"]
        raw_publish(hub.url, "sync.release.latest", [*bad, EVENT % 9])
        wait_for(lambda: s.serials() == [9], what="the one valid event")
        assert s.sub.ignored == len(bad)
        lines = [r.getMessage() for r in caplog.records if "not a release event" in r.getMessage()]
        assert len(lines) == len(bad) and all(line.startswith("NATS sync.release.latest: ignoring") for line in lines)
    finally:
        s.close()


def test_an_agent_behind_a_cut_off_leaf_gets_the_release_when_the_link_returns(
        tmp_path: Path, site: tuple[NatsServer, Link, NatsServer]) -> None:
    hub, link, leaf = site
    pub = publisher(tmp_path, hub)
    s = Subscribed(tmp_path, [leaf.url], catchup=0.5)
    try:
        assert s.sub.connected.wait(10)
        pub.publish(subject_for("latest"), EVENT % 1, "latest:1:1")
        wait_for(lambda: s.serials() == [1], what="the first event")
        link.cut()
        wait_for(lambda: hub.leafs() == 0, what="the hub to lose the leaf")
        pub.publish(subject_for("latest"), EVENT % 2, "latest:2:2")  # the hub has it; the site does not
        assert s.serials() == [1] and s.sub.connected.is_set()  # the agent's own connection stays up
        link.restore()
        wait_for(lambda: s.serials() == [1, 2], what="the release after the link came back")
    finally:
        s.close()


def test_a_hub_restarted_during_a_release_keeps_the_stream_and_agents_get_the_release_when_it_is_back(
        tmp_path: Path, site: tuple[NatsServer, Link, NatsServer]) -> None:
    hub, _, leaf = site
    pub = publisher(tmp_path, hub, timeout=2.0)
    on_leaf = Subscribed(tmp_path, [leaf.url], catchup=0.5)
    on_hub = Subscribed(tmp_path, [hub.url], catchup=0)  # reconnects with backoff, catches up each time
    try:
        assert on_leaf.sub.connected.wait(10) and on_hub.sub.connected.wait(10)
        pub.publish(subject_for("latest"), EVENT % 1, "latest:1:1")
        wait_for(lambda: on_leaf.serials() == [1] and on_hub.serials() == [1], what="the first event")
        hub.stop()
        with pytest.raises(RemoteError, match="cannot publish release event latest:2:2 to NATS"):
            pub.publish(subject_for("latest"), EVENT % 2, "latest:2:2")  # the outbox retries this
        wait_for(lambda: not on_hub.sub.connected.is_set(), what="the hub's agent to notice")
        hub.start()
        pub.publish(subject_for("latest"), EVENT % 2, "latest:2:2")
        wait_for(lambda: on_leaf.serials() == [1, 2], what="the leaf's agent")
        wait_for(lambda: on_hub.serials() == [1, 2], what="the hub's agent")
        assert on_hub.sub.connects >= 2
    finally:
        on_leaf.close()
        on_hub.close()


def test_refused_credentials_are_one_clear_error_then_retried_with_backoff(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="sync_tools.agent.nats_transport")
    with NatsServer(tmp_path, "hub", hub=True, token="the-right-token") as hub:
        wrong = Subscribed(tmp_path, [hub.url], environ={"SYNC_TOOLS_NATS_TOKEN": "a-wrong-token"})
        try:
            wait_for(lambda: wrong.sub.failures >= 4, what="several refused attempts")
        finally:
            wrong.close()
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, errors
        assert "refused the credentials" in errors[0] and "$SYNC_TOOLS_NATS_TOKEN" in errors[0]
        assert "a-wrong-token" not in caplog.text  # the secret itself is never logged
        assert wrong.events == [] and wrong.sub.connects == 0
        # the same subscriber code with the right token from the environment connects and catches up
        pub = NatsPublisher(NatsConfig(servers=(hub.url,), domain=DOMAIN), root=tmp_path,
                            environ={"SYNC_TOOLS_NATS_TOKEN": "the-right-token"})
        pub.publish(subject_for("latest"), EVENT % 3, "latest:3:1")
        right = Subscribed(tmp_path, [hub.url], environ={"SYNC_TOOLS_NATS_TOKEN": "the-right-token"})
        try:
            wait_for(lambda: right.serials() == [3], what="the catch-up with the right token")
        finally:
            right.close()
        with pytest.raises(RemoteError, match="refused the credentials.*SYNC_TOOLS_NATS_TOKEN"):
            NatsPublisher(NatsConfig(servers=(hub.url,), domain=DOMAIN), root=tmp_path,
                          environ={"SYNC_TOOLS_NATS_TOKEN": "wrong"}).publish("sync.release.latest", b"{}", "x")


def test_mutual_tls_an_agent_with_its_certificate_gets_the_release_and_a_refused_one_is_one_clear_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A hub that verifies client certificates (``tls { verify: true }``): the relay's publisher and an
    agent with ``tls_cert``/``tls_key`` get through; an agent without a certificate, or with one from
    another CA, is one ERROR line each that says so (not a line per retry, though the refusal shows up
    as two or three different errors in turn), and a server certificate from a CA the agent does not
    trust is named as that. Bad files are ConfigErrors before any connection."""
    caplog.set_level(logging.DEBUG, logger="sync_tools.agent.nats_transport")
    f, other = tls_files(tmp_path / "tls"), tls_files(tmp_path / "other-ca", ca_name="another test CA")
    verify = (f'tls {{ cert_file: "{f["server_cert"]}", key_file: "{f["server_key"]}", ca_file: "{f["ca"]}", '
              "verify: true, timeout: 2 }")
    with NatsServer(tmp_path, "hub", hub=True, extra=verify) as hub:
        url = f"tls://127.0.0.1:{hub.port}"
        mine = {"tls_ca": str(f["ca"]), "tls_cert": str(f["client_cert"]), "tls_key": str(f["client_key"])}
        NatsPublisher(NatsConfig(servers=(url,), domain=DOMAIN, **mine), root=tmp_path,
                      environ={}).publish(subject_for("latest"), EVENT % 4, "latest:4:1")
        agent = Subscribed(tmp_path, [url], catchup=0, **mine)
        try:
            wait_for(lambda: agent.serials() == [4], what="the release over mutual TLS")
        finally:
            agent.close()
        cases = {
            "requires a TLS client certificate": {"tls_ca": str(f["ca"])},
            "did not accept the TLS client certificate": {**mine, "tls_cert": str(other["client_cert"]),
                                                          "tls_key": str(other["client_key"])},
            "TLS certificate was not accepted here": {**mine, "tls_ca": str(other["ca"])},
        }
        for expected, tls in cases.items():
            caplog.clear()
            refused = Subscribed(tmp_path, [url], catchup=0, **tls)

            def logged() -> list[logging.LogRecord]:
                return [r for r in caplog.records if r.levelno >= logging.WARNING and "cannot connect" in r.msg]

            try:  # the refusal can also surface as a reset connection: wait for the attempt that names it
                wait_for(lambda refused=refused, expected=expected: refused.sub.failures >= 6 and any(
                    expected in str(r.args[1]) for r in logged()), what=f"several refused attempts, one '{expected}'")
            finally:
                refused.close()
            assert refused.events == [] and refused.sub.connects == 0
            whys = [str(r.args[1]) for r in logged()]
            assert len(set(whys)) == len(whys) < refused.sub.failures, whys  # each kind once, not once a try
            if "TLS client certificate" in expected:
                assert [r.levelno for r in logged() if expected in str(r.args[1])] == [logging.ERROR]
    # files that cannot work are refused when the options are made
    bad = NatsConfig(servers=("tls://127.0.0.1:1",), tls_ca=str(f["ca"]), tls_cert=str(f["client_cert"]),
                     tls_key=str(f["other_key"]))
    with pytest.raises(ConfigError, match="client certificate .* and key .* do not load together"):
        connect_options(bad, root=tmp_path, environ={})
    with pytest.raises(ConfigError, match="TLS CA file .* is not a PEM certificate"):
        connect_options(bad._replace(tls_ca=str(f["client_key"]), tls_cert=None, tls_key=None), root=tmp_path,
                        environ={})
    (tmp_path / "sync-tools.yaml").write_text(
        "release:\n  store: s\n  tag: latest\nsubsystems: {}\nagent:\n  nats:\n"
        "    servers: [tls://127.0.0.1:4222]\n    tls_cert: client.pem\n")
    with pytest.raises(ConfigError, match=r"agent\.nats\.tls_key: is required with tls_cert"):
        load_config(tmp_path / "sync-tools.yaml")


def test_certificates_renewed_on_disk_are_used_at_the_next_reconnect_without_a_restart(tmp_path: Path) -> None:
    """A site renews its whole chain (a new CA, server and client certificates) at the same paths and
    restarts its server: the agent, still running, reads the files again before it reconnects, so it
    trusts the new server and presents its new certificate. With the files it loaded at start it could
    not get back in (the new server's certificate is from a CA it does not know)."""
    import shutil

    old, new = tls_files(tmp_path / "v1", ca_name="CA 2026"), tls_files(tmp_path / "v2", ca_name="CA 2027")
    live = tmp_path / "live"
    live.mkdir()

    def install(chain: dict[str, Path]) -> None:
        for name, path in chain.items():
            shutil.copyfile(path, live / f"{name}.pem")

    install(old)
    verify = (f'tls {{ cert_file: "{live / "server_cert.pem"}", key_file: "{live / "server_key.pem"}", '
              f'ca_file: "{live / "ca.pem"}", verify: true, timeout: 2 }}')
    hub = NatsServer(tmp_path, "hub", hub=True, extra=verify).start()
    try:
        url = f"tls://127.0.0.1:{hub.port}"
        cfg = NatsConfig(servers=(url,), domain=DOMAIN, catchup_seconds=0, tls_ca=str(live / "ca.pem"),
                         tls_cert=str(live / "client_cert.pem"), tls_key=str(live / "client_key.pem"))
        events: list[AgentEvent] = []
        sub = NatsSubscriber(cfg, "latest", events.append, backoff_base=0.05, backoff_max=0.5,
                             options=lambda: connect_options(cfg, root=tmp_path, environ={}))
        thread = threading.Thread(target=sub.run, daemon=True)
        thread.start()
        try:
            assert sub.connected.wait(10)
            hub.stop()
            install(new)  # the renewal, while the server is down
            hub.start()
            NatsPublisher(cfg, root=tmp_path, environ={}).publish(subject_for("latest"), EVENT % 6, "latest:6:1")
            wait_for(lambda: [e.serial for e in events] == [6], what="the release after the renewal")
            assert sub.connects == 2
        finally:
            sub.stop()
            thread.join(10)
    finally:
        hub.stop()


def test_each_kind_of_connect_error_is_logged_once_until_a_connection_is_up(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The errors of one outage can alternate (a refused TLS handshake shows up as the alert, then as a
    reset connection, then as the alert again): one line per kind, not one per try; after a connection,
    the next outage is logged afresh. The relay's publisher turns a credentials file that does not load
    into a retried RemoteError (it may be mid-renewal), not a dead letter at the first try."""
    import ssl

    caplog.set_level(logging.DEBUG, logger="sync_tools.agent.nats_transport")
    cfg = NatsConfig(servers=("tls://127.0.0.1:1",))
    sub = NatsSubscriber(cfg, "latest", lambda ev: None, options={})
    alert = ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required")
    tries = [alert, ConnectionResetError("Connection lost"), alert, ConnectionResetError("Connection lost"), alert]

    def logged() -> list[tuple[int, str]]:
        return [(r.levelno, str(r.args[1])) for r in caplog.records
                if r.levelno >= logging.WARNING and "cannot connect" in r.msg]

    for e in tries:
        sub._report(e, 0.1)
    assert logged() == [
        (logging.ERROR, "the server refused the credentials (it requires a TLS client certificate: tls_cert, "
                        "tls_key); offered no credentials (set creds, nkey_seed, tls_cert, $SYNC_TOOLS_NATS_CREDS "
                        "or $SYNC_TOOLS_NATS_TOKEN)"),
        (logging.WARNING, "ConnectionResetError: Connection lost")]
    sub._errors_seen.clear()  # what a connection that came up does (_session)
    sub._report(alert, 0.1)
    assert len(logged()) == 3
    # the relay's publisher: a certificate without a loadable key is retried, with the reason
    half = NatsConfig(servers=("tls://127.0.0.1:1",), tls_cert="client.pem", tls_key="client-key.pem")
    with pytest.raises(RemoteError, match=r"cannot publish release event x to NATS .*client-key.pem cannot be read"):
        (tmp_path / "client.pem").write_text("renewed")
        NatsPublisher(half, root=tmp_path, environ={}).publish("sync.release.latest", b"{}", "x")


def test_nats_config_keys_and_credentials(tmp_path: Path) -> None:
    def config(agent: str, relay: str = "") -> object:
        (tmp_path / "sync-tools.yaml").write_text(
            "release:\n  store: s\n  tag: latest\nsubsystems: {}\n" + (f"relay:\n{relay}" if relay else "")
            + f"agent:\n{agent}")
        return load_config(tmp_path / "sync-tools.yaml")

    c = config("  transport: nats\n  nats:\n    servers: [nats://127.0.0.1:4222]\n    creds: agent.creds\n",
               "  nats:\n    servers: nats://hub.example.org:4222\n    domain: hub\n")
    assert c.agent.transport == "nats" and c.agent.nats.servers == ("nats://127.0.0.1:4222",)
    assert c.relay.nats == NatsConfig(servers=("nats://hub.example.org:4222",), domain="hub")
    assert config("  root: .\n").agent.nats is None and config("  root: .\n").agent.transport == "sse"
    with pytest.raises(ConfigError, match=r"agent\.transport: is 'nats' but agent\.nats"):
        config("  transport: nats\n")
    with pytest.raises(ConfigError, match="without credentials in it"):
        config("  nats:\n    servers: [nats://user:pw@127.0.0.1:4222]\n")
    with pytest.raises(ConfigError, match=r"agent\.nats\.servers: is required"):
        config("  nats:\n    stream: X\n")
    with pytest.raises(ConfigError, match=r"agent\.transport: unknown value 'mqtt'"):
        config("  transport: mqtt\n")
    with pytest.raises(ConfigError, match=r"agent\.nats\.stream: must be"):
        config("  nats:\n    servers: [nats://127.0.0.1:1]\n    stream: a.b\n")
    # credentials: files named in config (read from the config's folder), or the environment
    cfg = c.agent.nats
    with pytest.raises(ConfigError, match="credentials file .*agent.creds cannot be read"):
        connect_options(cfg, root=tmp_path, environ={})
    (tmp_path / "agent.creds").write_text("placeholder")
    opts = connect_options(cfg, root=tmp_path, environ={"SYNC_TOOLS_NATS_TOKEN": "t"})
    assert opts["user_credentials"] == str(tmp_path / "agent.creds") and opts["token"] == "t"
    (tmp_path / "env.creds").write_text("placeholder")
    bare = NatsConfig(servers=("tls://127.0.0.1:4222",))
    opts = connect_options(bare, root=tmp_path, environ={"SYNC_TOOLS_NATS_CREDS": "env.creds"})
    assert opts["user_credentials"] == str(tmp_path / "env.creds") and "tls" in opts
    with pytest.raises(ConfigError, match="cannot be a NATS subject"):
        subject_for("v1 *")


def test_an_agent_that_connects_while_its_leaf_is_cut_off_asks_again_until_the_hub_answers(
        tmp_path: Path, site: tuple[NatsServer, Link, NatsServer]) -> None:
    """Catch-up only at connect (catchup_seconds: 0), and the connect's direct get finds no responders
    (the leaf's own link to the hub is not up, as right after the site's nats-server restarted): the
    agent asks again with backoff instead of waiting for a live message that went out already."""
    hub, link, leaf = site
    link.cut()
    wait_for(lambda: hub.leafs() == 0, what="the cut")
    publisher(tmp_path, hub).publish(subject_for("latest"), EVENT % 5, "latest:5:1")
    s = Subscribed(tmp_path, [leaf.url], catchup=0)
    try:
        assert s.sub.connected.wait(10)
        assert s.serials() == []  # nothing could answer yet
        link.restore()
        wait_for(lambda: s.serials() == [5], what="the catch-up once the hub answers")
        assert s.sub.connects == 1  # the same connection: no reconnect was needed
    finally:
        s.close()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_the_subscription_runs_in_the_event_loop_chosen_and_a_bad_choice_is_one_clear_error(
        tmp_path: Path, site: tuple[NatsServer, Link, NatsServer], loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    hub, _, leaf = site
    pytest.importorskip(loop)  # uvloop is a dependency except on Windows
    monkeypatch.setenv(LOOP_ENV, loop)
    sub = Subscribed(tmp_path, [leaf.url])
    try:
        assert sub.sub.connected.wait(10)
        assert type(sub.sub._loop).__module__.split(".")[0] == loop  # what run() made, not what was asked
        wait_for(lambda: hub.leaf_interest("sync.release.latest"), what="interest at the hub")
        publisher(tmp_path, hub).publish(subject_for("latest"), EVENT % 3, "latest:3:1")
        wait_for(lambda: sub.serials() == [3], what="the live event")
    finally:
        sub.close()
    # uvloop is a dependency where it runs, so the default is it; a name that is no loop is refused when
    # the subscriber is made (serve_nats: at start-up), never in its thread
    assert loop_factory("auto") is loop_factory("uvloop") is not None and loop_factory("asyncio") is None
    monkeypatch.setenv(LOOP_ENV, "trio")
    with pytest.raises(ConfigError, match=r"SYNC_TOOLS_NATS_LOOP is 'trio': 'uvloop', 'asyncio' or 'auto'"):
        NatsSubscriber(NatsConfig(servers=(leaf.url,)), "latest", lambda ev: None, options={})
