"""Fuzzing the relay's webhook parser, classifier and app (shortened; full size: bench/reliability)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.fuzz_atheris import run_atheris
from tests.reliability.fuzz_webhook import fuzz_relay_app, fuzz_webhook_parser


def test_parser_and_classifier_raise_only_webhook_errors(tmp_path: Path) -> None:
    r = fuzz_webhook_parser(tmp_path, 400)
    assert r.inputs >= 400 and r.violations == ()
    # the fuzzing reached past the signature check into every kind of outcome
    assert r.outcomes.get("401 signature", 0) > 0
    assert any(k.startswith("400") for k in r.outcomes)
    assert any("Ignored" in k or "UpstreamChange" in k or "Ping" in k for k in r.outcomes), r.outcomes


def test_relay_never_answers_5xx_to_a_fuzzed_request(tmp_path: Path) -> None:
    r = fuzz_relay_app(tmp_path, 300)
    assert r.inputs >= 300 and r.violations == ()
    statuses = set(r.outcomes)
    assert {"401", "400"} <= statuses, r.outcomes
    assert statuses & {"200", "202"}, r.outcomes  # some validly signed fuzz got through to a decision


def test_atheris_coverage_guided_webhook_parser() -> None:
    """libFuzzer-guided mutation of validly signed bodies through decode_body and classify."""
    pytest.importorskip("atheris", reason="atheris has wheels for Linux x86_64 only")
    r = run_atheris("webhook", 2000)
    # libFuzzer checks -runs between inputs and now and then runs one more (seen: "Done 2001 runs")
    assert r.violations == () and r.inputs >= 2000 and r.outcomes["coverage edges"] > 50


@pytest.mark.parametrize("event,field,value", [
    ("create", "ref", ""), ("create", "ref", "   "), ("create", "ref", "v1.0\n"), ("release", "tag_name", ""),
    ("push", "ref", "refs/tags/"), ("push", "ref", "refs/tags/v1 2"),
])
def test_a_blank_or_malformed_tag_is_refused_not_dispatched(tmp_path: Path, event: str, field: str,
                                                             value: str) -> None:
    """Found by the fuzzer: a create with ``ref: ""`` became a dispatch of version ``""``."""
    from sync_tools.relay import webhook as wh
    from tests.relay_support import fixture, write_config

    config = write_config(tmp_path)
    payload = fixture({"create": "create.0.json", "release": "release.published.0.json",
                       "push": "push.0.json"}[event])
    (payload["release"] if event == "release" else payload)[field] = value
    if event == "push":
        payload["after"] = "a" * 40
    with pytest.raises(wh.BadRequest):
        wh.classify(config, event, payload, "d-1")


@pytest.mark.parametrize("url", ["https://[github.com/nats-io/nats-server", "https://[::1/x", "http://]/a"])
def test_a_repository_url_urllib_cannot_split_is_not_a_500(tmp_path: Path, url: str) -> None:
    """Found by atheris: ``urlsplit`` raises ValueError ("Invalid IPv6 URL") on a '[' host, which
    escaped classify and became a 500."""
    from sync_tools.relay.app import create_app, get_relay
    from tests.relay_support import delivery, settings, tag_payload, write_config

    config = write_config(tmp_path)
    app = create_app(config, settings(config, tmp_path))
    try:
        payload = tag_payload()
        payload["repository"]["html_url"] = url
        d = delivery("create", payload)
        r = app.test_client().post("/webhook", data=d.body, headers=d.headers)
        assert r.status_code < 500, r.get_data()
    finally:
        get_relay(app).stop()
