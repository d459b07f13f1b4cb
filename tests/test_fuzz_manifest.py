"""Property tests for the manifest core: hostile bytes only ever raise the project's own errors."""

from __future__ import annotations

import json
from types import MappingProxyType

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sync_tools import signing
from sync_tools.errors import DataError
from sync_tools.manifest import (
    Asset,
    Entry,
    empty_manifest,
    parse_manifest,
    sign_manifest,
    verify_manifest,
    with_entry,
)

KEY = signing.load_private_key(signing.generate_keypair().private_pem)
PUB = KEY.public_key()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
hexes = st.text("0123456789abcdef", min_size=64, max_size=64)


def _valid_doc() -> dict:
    asset = Asset("nats-server-linux-amd64.tar.gz", 10, "a" * 64, "b" * 64)
    entry = Entry("v1", "c0ffee", "2026-11-24T00:00:00Z", MappingProxyType({"linux/amd64": asset}))
    return with_entry(empty_manifest(), "nats", entry).to_json()


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_raise_only_data_errors(data: bytes) -> None:
    try:
        parse_manifest(data)
    except DataError:
        pass


@settings(max_examples=300)
@given(json_values)
def test_random_json_raises_only_data_errors(value) -> None:
    try:
        parse_manifest(json.dumps(value).encode())
    except DataError:
        pass


@settings(max_examples=300)
@given(st.sampled_from(["schema", "serial", "created", "expires", "subsystems"]), json_values)
def test_mutated_top_level_fields_raise_only_data_errors(field: str, value) -> None:
    doc = _valid_doc()
    doc[field] = value
    try:
        parse_manifest(json.dumps(doc).encode())
    except DataError:
        pass


@settings(max_examples=200)
@given(st.sampled_from(["name", "size", "sha256", "binary_sha256"]), json_values)
def test_mutated_asset_fields_raise_only_data_errors(field: str, value) -> None:
    doc = _valid_doc()
    doc["subsystems"]["nats"]["assets"]["linux/amd64"][field] = value
    try:
        m = parse_manifest(json.dumps(doc).encode())
    except DataError:
        return
    # Whatever got through is well-formed: a safe asset name and hex digests.
    a = m.subsystems["nats"].assets["linux/amd64"]
    assert "/" not in a.name and a.name.endswith(".tar.gz") and len(a.sha256) == 64


@settings(max_examples=100)
@given(st.binary(max_size=100))
def test_random_signatures_never_verify(sig: bytes) -> None:
    data, _ = sign_manifest(parse_manifest(json.dumps(_valid_doc()).encode()), KEY)
    try:
        verify_manifest(data, sig, PUB)
    except DataError:
        return
    raise AssertionError("a random signature verified")


@settings(max_examples=100)
@given(hexes, st.integers(min_value=0, max_value=2**31))
def test_signed_roundtrip_and_any_flipped_byte_fails(digest: str, position: int) -> None:
    asset = Asset("arc-linux-amd64.tar.gz", 5, digest, digest)
    m = with_entry(empty_manifest(), "arc", Entry("v2", "abc", "2026-11-24T00:00:00Z",
                                                  MappingProxyType({"linux/amd64": asset})))
    data, sig = sign_manifest(m, KEY)
    assert verify_manifest(data, sig, PUB) == parse_manifest(data)
    i = position % len(data)
    flipped = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:]
    try:
        verify_manifest(flipped, sig, PUB)
    except DataError:
        return
    raise AssertionError("a flipped byte verified")
