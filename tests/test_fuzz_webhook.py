"""Fuzzing the relay's webhook parser, classifier and app (shortened; full size: bench/reliability)."""

from __future__ import annotations

from pathlib import Path

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
