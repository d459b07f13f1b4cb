"""Fuzzing the relay's front door: the webhook parser and classifier, and the Flask app itself.

- :func:`fuzz_webhook_parser`: ``verify_signature``, ``decode_body`` and ``classify`` (pure) over random
  bytes, random JSON, form bodies, and GitHub's own example payloads with random fields replaced or
  deleted. Only :class:`~sync_tools.relay.webhook.WebhookError` may escape, and what is accepted is
  well-formed.
- :func:`fuzz_relay_app`: requests through the Flask test client with fuzzed bodies, headers, content
  types, paths and signatures (missing, malformed, wrong, SHA-1 only, and *valid* over the fuzzed body,
  so the parser behind the signature check is reached). The relay must never answer 5xx, and must never
  accept a body whose signature is not valid.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import urllib.parse
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from sync_tools.config import Config
from sync_tools.relay import webhook as wh
from tests.relay_support import SECRET, TOKEN, fixture, fixture_names, settings, write_config
from tests.reliability.fuzz_common import FuzzReport, json_values, run_property

FIXTURES = {name: fixture(name) for name in fixture_names()}
EVENTS = ("push", "create", "release", "ping", "delete", "issues", "workflow_run", "")
_ascii = st.characters(min_codepoint=32, max_codepoint=126)
header_text = st.text(_ascii, max_size=80)
interesting = st.sampled_from([
    "", "v1.2.3", "v2.10.25", "refs/tags/v1.0.0", "refs/heads/master", "refs/heads/main", "0" * 40, "a" * 40,
    "https://github.com/nats-io/nats-server", "git@github.com:octocoders/hello-world.git", "/", "..", "../..",
    "file:///etc/passwd", "https://ghe.example.com/basekick/arc.git", "acme/plat-telemetry", "\x00", "é" * 10,
    "published", "released", "prereleased", "tag", "branch", "x" * 5000, "https://[github.com/a/b",
    "http://[::1]:99999/x", "git@[::1]:a/b.git",
])
content_types = st.sampled_from([
    None, "application/json", "application/json; charset=utf-8", "application/x-www-form-urlencoded",
    "application/vnd.github+json", "text/plain", "multipart/form-data; boundary=x", "APPLICATION/JSON", "",
]) | header_text


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


_FIXTURE_PATHS = {name: [p for p in _paths(doc) if p] for name, doc in FIXTURES.items()}


@st.composite
def mutated_payloads(draw: st.DrawFn) -> tuple[str, Any]:
    """(event, payload): a GitHub example payload with up to 4 fields replaced, retyped or deleted."""
    name = draw(st.sampled_from(sorted(FIXTURES)))
    doc = copy.deepcopy(FIXTURES[name])
    for _ in range(draw(st.integers(0, 4))):
        path = draw(st.sampled_from(_FIXTURE_PATHS[name]))
        parent = doc
        try:
            for key in path[:-1]:
                parent = parent[key]
            action = draw(st.sampled_from(["set", "set", "interesting", "delete"]))
            if action == "delete":
                del parent[path[-1]]
            elif action == "interesting":
                parent[path[-1]] = draw(interesting)
            else:
                parent[path[-1]] = draw(json_values)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or retyped this path
    event = name.split(".")[0]
    return draw(st.sampled_from([event, event, *EVENTS])), doc


@st.composite
def bodies(draw: st.DrawFn) -> tuple[str, bytes, str | None]:
    """(event, body, content type)."""
    kind = draw(st.sampled_from(["raw", "json", "mutated", "mutated", "mutated", "form", "form-raw"]))
    if kind == "raw":
        return draw(st.sampled_from(EVENTS)), draw(st.binary(max_size=300)), draw(content_types)
    if kind == "json":
        return draw(st.sampled_from(EVENTS)), json.dumps(draw(json_values)).encode(), draw(content_types)
    event, doc = draw(mutated_payloads())
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()))
    if kind == "mutated":
        return event, text.encode(), draw(st.sampled_from([None, "application/json", "application/json"]))
    if kind == "form":
        fields = [("payload", text)] + draw(st.lists(st.tuples(st.sampled_from(["payload", "x", ""]),
                                                               st.text(max_size=20)), max_size=2))
        return event, urllib.parse.urlencode(fields).encode(), "application/x-www-form-urlencoded"
    return event, draw(st.binary(max_size=200)), "application/x-www-form-urlencoded"


def _check_accepted(results: list[wh.Classification], delivery: str) -> None:
    assert results, "classify returned nothing"
    for r in results:
        assert r.delivery == delivery
        if isinstance(r, wh.UpstreamChange):
            p = r.client_payload()
            assert len(p) <= 10 and p["delivery"] == delivery and isinstance(r.version, str) and r.version
            assert len(json.dumps(p)) < 64 * 1024


def fuzz_webhook_parser(workdir: Path, max_examples: int, *, raise_on_violation: bool = True) -> FuzzReport:
    """Fuzz ``verify_signature`` + ``decode_body`` + ``classify`` (config from *workdir*)."""
    config: Config = write_config(workdir)
    secret = SECRET.encode()
    outcomes: Counter[str] = Counter()

    @given(bodies(), st.sampled_from(["valid", "valid", "valid", "random", "none", "upper", "other-secret"]),
           header_text, st.none() | st.sampled_from(sorted(config.subsystems)) | st.text(max_size=12))
    def prop(case: tuple[str, bytes, str | None], sig_kind: str, junk: str, path_sub: str | None) -> None:
        event, body, ctype = case
        good = wh.sign(secret, body)
        sig = {"valid": good, "random": junk, "none": None, "upper": good.upper().replace("SHA256=", "sha256="),
               "other-secret": wh.sign(b"not the secret", body)}[sig_kind]
        try:
            wh.verify_signature(secret, body, sig, junk or None)
        except wh.Unauthorized:
            assert not (sig and hmac.compare_digest(sig.lower(), good)), "a valid signature was refused"
            outcomes["401 signature"] += 1
            return
        assert sig is not None and sig.lower() == good, f"an invalid signature passed: {sig!r}"
        delivery = str(uuid.uuid4())
        try:
            payload = wh.decode_body(body, ctype)
            results = wh.classify(config, event, payload, delivery, path_sub)
        except wh.WebhookError as e:
            outcomes[f"{e.status} {type(e).__name__}"] += 1
            return
        _check_accepted(results, delivery)
        outcomes[" + ".join(sorted({type(r).__name__ for r in results}))] += 1

    return run_property("webhook parser + classifier", prop, max_examples, outcomes,
                        raise_on_violation=raise_on_violation)


def fuzz_relay_app(workdir: Path, max_examples: int, *, raise_on_violation: bool = True) -> FuzzReport:
    """Fuzz the relay app (Flask test client, real SQLite outbox in *workdir*; worker threads are not
    started, so nothing is dispatched)."""
    from sync_tools.relay.app import create_app, get_relay

    config = write_config(workdir, max_body=64 * 1024)
    app = create_app(config, settings(config, workdir))
    client = app.test_client()
    secret = SECRET.encode()
    outcomes: Counter[str] = Counter()
    wrong_tokens = st.sampled_from(["", "Bearer", "Bearer ", f"Basic {TOKEN}", f"Bearer {TOKEN}x",
                                    f"Bearer {TOKEN[:-1]}", f"bearer  {TOKEN.upper()}"]) | header_text

    @given(bodies(), st.sampled_from(["valid", "valid", "valid", "random", "none", "sha1", "other-secret"]),
           st.sampled_from(["/webhook", "/webhook", "/webhook/nats", "/webhook/hello", "/notify", "/events",
                            "fuzzed"]),
           header_text, st.sampled_from(["uuid", "uuid", "uuid", "text", "none", "long"]),
           st.sampled_from(["POST", "POST", "POST", "POST", "GET", "PUT"]),
           st.integers(0, 9).map(lambda i: i == 0), wrong_tokens)
    def prop(case: tuple[str, bytes, str | None], sig_kind: str, path: str, junk: str, delivery_kind: str,
             method: str, oversize: bool, auth: str) -> None:
        event, body, ctype = case
        if oversize:
            body = body + b" " * (64 * 1024 + 1 - len(body))
        if path == "fuzzed":
            path = "/webhook/" + urllib.parse.quote(junk or "x", safe="")
        sig = {"valid": wh.sign(secret, body), "random": junk, "none": None,
               "sha1": None, "other-secret": wh.sign(b"wrong", body)}[sig_kind]
        headers = {"X-GitHub-Event": event if junk[:1] != "!" else junk, "User-Agent": "GitHub-Hookshot/fuzz"}
        if sig is not None:
            headers["X-Hub-Signature-256"] = sig
        if sig_kind == "sha1":
            headers["X-Hub-Signature"] = "sha1=" + hmac.new(secret, body, hashlib.sha1).hexdigest()
        delivery = {"uuid": str(uuid.uuid4()), "text": junk, "none": None, "long": "d" * 200}[delivery_kind]
        if delivery is not None:
            headers["X-GitHub-Delivery"] = delivery
        if ctype is not None:
            headers["Content-Type"] = ctype
        if path == "/events":
            headers["Authorization"] = auth
            resp = client.get(path, headers=headers)
            assert resp.status_code in (400, 401), f"/events answered {resp.status_code} to {auth!r}"
            outcomes[f"GET /events {resp.status_code}"] += 1
            return
        resp = client.open(path, method=method, data=body, headers=headers)
        assert resp.status_code < 500, f"{method} {path} answered {resp.status_code}: {resp.get_data()[:300]!r}"
        if resp.status_code in (200, 202) and method == "POST":
            assert sig_kind == "valid", f"accepted a delivery signed {sig_kind}"
        outcomes[f"{method if method != 'POST' else ''}{' ' if method != 'POST' else ''}{resp.status_code}"
                 .strip()] += 1

    try:
        return run_property("relay app (Flask test client)", prop, max_examples, outcomes,
                            raise_on_violation=raise_on_violation)
    finally:
        get_relay(app).stop()
