"""POST /webhook request logic through the Flask test client: each bad input, the size cap,
redelivery, /health, /metrics, settings."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from sync_tools.errors import ConfigError
from sync_tools.relay.app import create_app, get_relay
from sync_tools.relay.settings import load_settings
from sync_tools.relay.webhook import sign
from tests.relay_support import SECRET, delivery, env, fixture, settings, tag_payload, write_config


@pytest.fixture
def relay_app(tmp_path: Path):  # type: ignore[no-untyped-def]
    config = write_config(tmp_path, max_body=16384)
    app = create_app(config, settings(config, tmp_path))
    try:
        yield app
    finally:
        get_relay(app).outbox.close()


@pytest.fixture
def client(relay_app):  # type: ignore[no-untyped-def]
    return relay_app.test_client()


def post(client, d, path: str = "/webhook"):  # type: ignore[no-untyped-def]
    return client.post(path, data=d.body, headers=d.headers)


# ------------------------------------------------------------------------------------------- 401


def test_missing_signature_is_401(client) -> None:  # type: ignore[no-untyped-def]
    d = delivery("create", tag_payload())
    del d.headers["X-Hub-Signature-256"]
    r = post(client, d)
    assert r.status_code == 401 and "missing" in r.get_json()["error"]


def test_sha1_only_signature_is_401(client) -> None:  # type: ignore[no-untyped-def]
    d = delivery("create", tag_payload())
    del d.headers["X-Hub-Signature-256"]
    d.headers["X-Hub-Signature"] = "sha1=" + "0" * 40
    r = post(client, d)
    assert r.status_code == 401 and "SHA-1" in r.get_json()["error"]


@pytest.mark.parametrize("value", ["sha256=zz", "sha1=" + "0" * 40, "sha256=" + "0" * 63, "sha256 abc", ""])
def test_malformed_signature_is_401(client, value: str) -> None:  # type: ignore[no-untyped-def]
    d = delivery("create", tag_payload())
    d.headers["X-Hub-Signature-256"] = value
    assert post(client, d).status_code == 401


def test_wrong_secret_is_401(client) -> None:  # type: ignore[no-untyped-def]
    assert post(client, delivery("create", tag_payload(), secret="not the secret")).status_code == 401


def test_signature_over_other_bytes_is_401(client) -> None:  # type: ignore[no-untyped-def]
    d = delivery("create", tag_payload())
    r = client.post("/webhook", data=d.body + b" ", headers=d.headers)
    assert r.status_code == 401
    assert get_relay(client.application).outbox.stats().queue_depth == 0


# ------------------------------------------------------------------------------------------- 400


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"a string"', b"\xff\xfe", b""])
def test_bad_json_is_400(client, body: bytes) -> None:  # type: ignore[no-untyped-def]
    d = delivery("create", None, body=body)
    assert post(client, d).status_code == 400


def test_form_without_payload_field_is_400(client) -> None:  # type: ignore[no-untyped-def]
    d = delivery("create", None, body=b"other=1", form=True)
    assert post(client, d).status_code == 400


@pytest.mark.parametrize("mutate", [
    lambda p: p.pop("ref"),
    lambda p: p.update(ref=5),
    lambda p: p.update(ref_type=None),
    lambda p: p.pop("repository"),
    lambda p: p.update(repository="nats-io/nats-server"),
    lambda p: p["repository"].update(full_name=7, html_url=None, clone_url=None),
])
def test_missing_or_mistyped_fields_are_400(client, mutate) -> None:  # type: ignore[no-untyped-def]
    p = tag_payload()
    mutate(p)
    r = post(client, delivery("create", p))
    assert r.status_code == 400, r.get_json()


def test_release_with_mistyped_release_is_400(client) -> None:  # type: ignore[no-untyped-def]
    p = fixture("release.published.0.json")
    p["release"]["tag_name"] = ["v1"]
    assert post(client, delivery("release", p)).status_code == 400
    p["release"] = "v1"
    assert post(client, delivery("release", p)).status_code == 400


def test_missing_event_or_delivery_header_is_400(client) -> None:  # type: ignore[no-untyped-def]
    d = delivery("create", tag_payload())
    del d.headers["X-GitHub-Event"]
    assert post(client, d).status_code == 400
    d = delivery("create", tag_payload())
    del d.headers["X-GitHub-Delivery"]
    assert post(client, d).status_code == 400


def test_path_subsystem_that_disagrees_with_the_payload_is_400(client) -> None:  # type: ignore[no-untyped-def]
    d = delivery("create", tag_payload("nats-io/nats-server"))
    r = post(client, d, "/webhook/arc")
    assert r.status_code == 400 and "arc" in r.get_json()["error"]
    assert post(client, delivery("create", tag_payload()), "/webhook/nope").status_code == 400
    r = post(client, delivery("create", tag_payload("nats-io/nats-server")), "/webhook/nats")
    assert r.status_code == 202


# ------------------------------------------------------------------------------------------- 413


def test_over_the_cap_by_content_length_is_413_without_reading(client) -> None:  # type: ignore[no-untyped-def]
    body = b"x" * 20000
    d = delivery("create", None, body=body)
    consumed = []

    class Tracking(io.BytesIO):
        def read(self, n: int = -1) -> bytes:
            chunk = super().read(n)
            consumed.append(len(chunk))
            return chunk

    r = client.post("/webhook", input_stream=Tracking(body), headers={**d.headers, "Content-Length": "20000"})
    assert r.status_code == 413
    assert sum(consumed) == 0
    assert r.headers["Connection"] == "close"


def test_over_the_cap_while_streaming_is_413(client) -> None:  # type: ignore[no-untyped-def]
    sent = []

    class Endless(io.RawIOBase):
        """A chunked body with no Content-Length that never ends: reading must stop at the cap."""

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
            n = min(len(b), 1024)
            b[:n] = b"y" * n
            sent.append(n)
            if sum(sent) > 10 * 1024 * 1024:
                raise AssertionError("the relay kept reading past its cap")
            return n

    from werkzeug.test import EnvironBuilder, run_wsgi_app

    d = delivery("create", None, body=b"")
    environ = EnvironBuilder(path="/webhook", method="POST", headers=d.headers).get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ["HTTP_TRANSFER_ENCODING"] = "chunked"
    environ["wsgi.input"] = io.BufferedReader(Endless())
    environ["wsgi.input_terminated"] = True
    _, status, _ = run_wsgi_app(client.application, environ, buffered=True)
    assert status.startswith("413")
    assert sum(sent) <= 16384 + 128 * 1024


# ------------------------------------------------------------------------------------ 200 / 202


def test_ping_is_200(client) -> None:  # type: ignore[no-untyped-def]
    r = post(client, delivery("ping", fixture("ping.0.json")))
    assert r.status_code == 200 and r.get_json()["status"] == "pong"


def test_untracked_repository_and_event_are_ignored(client) -> None:  # type: ignore[no-untyped-def]
    r = post(client, delivery("create", tag_payload("someone/else")))
    assert (r.status_code, r.get_json()["status"]) == (200, "ignored")
    r = post(client, delivery("issues", {"action": "opened", "repository": tag_payload()["repository"]}))
    assert (r.status_code, r.get_json()["status"]) == (200, "ignored")
    r = post(client, delivery("delete", fixture("delete.0.json")))
    assert (r.status_code, r.get_json()["status"]) == (200, "ignored")
    assert get_relay(client.application).outbox.stats().queue_depth == 0


def test_form_encoded_body_is_accepted(client) -> None:  # type: ignore[no-untyped-def]
    r = post(client, delivery("create", tag_payload(), form=True))
    assert r.status_code == 202


def test_github_enterprise_host_is_matched(client) -> None:  # type: ignore[no-untyped-def]
    p = fixture("push.4.json")
    p["repository"] = tag_payload("BaseKick/Arc", host="ghe.example.com")["repository"]
    p["ref"] = "refs/heads/" + p["repository"].get("default_branch", "master")
    p["repository"]["default_branch"] = "master"
    r = post(client, delivery("push", p))
    assert r.status_code == 202
    job = get_relay(client.application).outbox.job(r.get_json()["jobs"][0])
    assert job is not None and job.payload["subsystem"] == "arc" and job.payload["commit"] == p["after"]


def test_redelivery_is_acknowledged_once(client) -> None:  # type: ignore[no-untyped-def]
    d = delivery("create", tag_payload(), delivery_id="72d3162e-cc78-11e3-81ab-4c9367dc0958")
    first = post(client, d)
    second = post(client, d)
    assert first.status_code == 202 and first.get_json()["status"] == "accepted"
    assert second.status_code == 200 and second.get_json()["status"] == "duplicate"
    outbox = get_relay(client.application).outbox
    assert len(outbox.jobs()) == 1


def test_same_version_from_another_event_is_coalesced(client) -> None:  # type: ignore[no-untyped-def]
    assert post(client, delivery("create", tag_payload(tag="v2.11.0"))).status_code == 202
    r = post(client, delivery("create", tag_payload(tag="v2.11.0")))
    assert r.status_code == 202 and r.get_json()["status"] == "accepted"
    assert r.get_json()["coalesced"] == 1 and r.get_json()["jobs"] == []
    assert len(get_relay(client.application).outbox.jobs()) == 1


# ---------------------------------------------------------------------------------- health etc.


def test_health_and_metrics(client) -> None:  # type: ignore[no-untyped-def]
    post(client, delivery("create", tag_payload()))
    post(client, delivery("create", tag_payload(), secret="bad"))
    h = client.get("/health")
    assert h.status_code == 200
    body = h.get_json()
    assert body["status"] == "ok" and body["queue_depth"] == 1 and body["dead_letters"] == 0
    assert body["oldest_pending_age"] is not None
    m = client.get("/metrics")
    text = m.data.decode()
    assert m.status_code == 200 and m.mimetype == "text/plain"
    assert 'sync_tools_relay_deliveries_total{result="accepted"} 1.0' in text
    assert 'sync_tools_relay_deliveries_total{result="unauthorized"} 1.0' in text
    assert "sync_tools_relay_queue_depth 1.0" in text
    assert "sync_tools_relay_connected_agents 0.0" in text


def test_refuses_to_start_without_the_secret(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    e = env(tmp_path)
    del e["SYNC_TOOLS_WEBHOOK_SECRET"]
    with pytest.raises(ConfigError, match="SYNC_TOOLS_WEBHOOK_SECRET"):
        create_app(config, environ=e)
    with pytest.raises(ConfigError, match="GITHUB_TOKEN"):
        load_settings(config, {**env(tmp_path), "GITHUB_TOKEN": ""})


def test_secrets_never_in_repr_or_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = write_config(tmp_path)
    s = settings(config, tmp_path)
    assert SECRET not in repr(s) and "ghs_test" not in repr(s) and "agent-token" not in repr(s)
    app = create_app(config, s)
    c = app.test_client()
    caplog.set_level("DEBUG")
    p = tag_payload()
    p["marker"] = "PAYLOAD-MARKER"
    post(c, delivery("create", p))
    post(c, delivery("create", p, secret="wrong"))
    c.get("/events", headers={"Authorization": "Bearer wrong-token"})
    get_relay(app).outbox.close()
    text = caplog.text
    for secret in (SECRET, "ghs_test", "wrong-token", "PAYLOAD-MARKER", sign(SECRET.encode(), b"")[:20]):
        assert secret not in text
    assert json.dumps(p)[:40] not in text


def test_cli_refuses_to_start_without_the_secret(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from sync_tools.cli import cli

    write_config(tmp_path)
    e = {k: v for k, v in env(tmp_path).items() if k != "SYNC_TOOLS_WEBHOOK_SECRET"}
    e["SYNC_TOOLS_WEBHOOK_SECRET"] = ""
    r = CliRunner().invoke(cli, ["relay", "--port", "0", "--config", str(tmp_path / "sync-tools.yaml")], env=e)
    assert r.exit_code == 1
    assert "SYNC_TOOLS_WEBHOOK_SECRET is not set" in r.output and len(r.output.strip().splitlines()) == 1
    help_ = CliRunner().invoke(cli, ["relay", "--help"])
    assert help_.exit_code == 0 and "Example:" in help_.output and "--retry-dead" in help_.output


# ------------------------------------------------------------------------------ the webhook front


def test_webhook_path_answers_only_post(client) -> None:  # type: ignore[no-untyped-def]
    """/webhook is served ahead of Flask's routing: other methods get 405 with Allow, and paths that
    only look like it fall through to Flask's 404."""
    r = client.get("/webhook")
    assert r.status_code == 405 and r.headers["Allow"] == "POST" and r.json["status"] == "error"
    assert client.put("/webhook/nats").status_code == 405
    d = delivery("create", tag_payload())
    for path in ("/webhook/", "/webhook/nats/extra", "/webhooks", "/webhook.json"):
        assert client.post(path, data=d.body, headers=d.headers).status_code == 404, path


def test_strict_json_nan_and_deep_nesting_are_400(client) -> None:  # type: ignore[no-untyped-def]
    """orjson is stricter than the stdlib: NaN and Infinity are not JSON, and nesting deeper than
    1,024 levels is refused rather than recursed into."""
    for body in (b'{"ref": NaN}', b'{"ref": Infinity}', b'{"a": ' * 2000 + b"1" + b"}" * 2000):
        d = delivery("create", {}, body=body)
        r = post(client, d)
        assert r.status_code == 400, body[:20]
        assert "not valid JSON" in r.json["error"]


def test_answers_are_json_with_a_length(client) -> None:  # type: ignore[no-untyped-def]
    d = delivery("create", tag_payload())
    r = post(client, d)
    assert r.status_code == 202
    assert r.headers["Content-Type"] == "application/json"
    assert int(r.headers["Content-Length"]) == len(r.data)
    assert r.json == {"status": "accepted", "delivery": d.headers["X-GitHub-Delivery"], "jobs": [1], "coalesced": 0}
