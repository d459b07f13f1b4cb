"""Release signing and the manifest trust decisions: the pinned key verifies; another key, one flipped
byte, an expired or rolled-back manifest, or malformed bytes do not."""

from __future__ import annotations

import json
import os
import stat
from datetime import UTC, datetime, timedelta
from types import MappingProxyType

import pytest
from click.testing import CliRunner

from sync_tools import signing
from sync_tools.cli import cli
from sync_tools.errors import ConfigError, ManifestError, SignatureError
from sync_tools.manifest import (
    Asset,
    Entry,
    empty_manifest,
    format_time,
    parse_manifest,
    sign_manifest,
    verify_manifest,
    with_entry,
)

NOW = datetime(2026, 11, 24, 1, 0, tzinfo=UTC)


def _entry(version: str = "v2.10.25", platform: str = "linux/amd64") -> Entry:
    asset = Asset(f"nats-server-{platform.replace('/', '-')}.tar.gz", 1234, "a" * 64, "b" * 64)
    return Entry(version, "c" * 40, format_time(NOW), MappingProxyType({platform: asset}), binary="nats-server")


@pytest.fixture(scope="module")
def key():
    return signing.load_private_key(signing.generate_keypair().private_pem)


@pytest.fixture(scope="module")
def signed(key):
    m = with_entry(empty_manifest(), "nats", _entry(), now=NOW)
    return sign_manifest(m, key)


def test_verifies_with_the_pinned_key(key, signed) -> None:
    data, sig = signed
    m = verify_manifest(data, sig, key.public_key(), now=NOW)
    assert m.serial == 1
    assert m.subsystems["nats"].assets["linux/amd64"].binary_sha256 == "b" * 64
    assert m.dumps() == data  # canonical bytes round-trip


def test_pinned_key_from_a_pem_file_verifies(tmp_path, key, signed) -> None:
    pub = tmp_path / "release.pub"
    pub.write_bytes(signing.public_key_pem(key))
    data, sig = signed
    verify_manifest(data, sig, signing.load_public_key(str(pub)), now=NOW)


def test_another_key_fails(signed) -> None:
    other = signing.load_private_key(signing.generate_keypair().private_pem).public_key()
    data, sig = signed
    with pytest.raises(SignatureError):
        verify_manifest(data, sig, other, now=NOW)


@pytest.mark.parametrize("where", ["start", "serial", "sha", "end"])
def test_one_flipped_byte_in_the_manifest_fails(key, signed, where) -> None:
    data, sig = signed
    index = {"start": 0, "serial": data.index(b'"serial"') + 10, "sha": data.index(b"aaaa"),
             "end": len(data) - 1}[where]
    tampered = bytearray(data)
    tampered[index] ^= 0x01
    with pytest.raises(SignatureError):
        verify_manifest(bytes(tampered), sig, key.public_key(), now=NOW)


def test_one_flipped_bit_in_the_signature_fails(key, signed) -> None:
    import base64

    data, sig = signed
    raw = bytearray(base64.b64decode(sig))
    raw[10] ^= 0x80
    with pytest.raises(SignatureError):
        verify_manifest(data, base64.b64encode(bytes(raw)), key.public_key(), now=NOW)


@pytest.mark.parametrize("sig", [b"", b"not base64!!", b"AAAA", b"QUJD" * 30])
def test_malformed_signatures_fail(key, signed, sig) -> None:
    with pytest.raises(SignatureError):
        verify_manifest(signed[0], sig, key.public_key(), now=NOW)


def test_expired_manifest_is_refused(key, signed) -> None:
    data, sig = signed
    later = NOW + timedelta(days=31)
    with pytest.raises(ManifestError, match="expired"):
        verify_manifest(data, sig, key.public_key(), now=later)


def test_lower_serial_is_refused(key, signed) -> None:
    data, sig = signed
    with pytest.raises(ManifestError, match="rollback"):
        verify_manifest(data, sig, key.public_key(), min_serial=2, now=NOW)
    verify_manifest(data, sig, key.public_key(), min_serial=1, now=NOW)  # equal is fine


def _doc() -> dict:
    return with_entry(empty_manifest(), "nats", _entry(), now=NOW).to_json()


def _mutations():
    yield "not json", b"{nope"
    yield "a list", b"[]"
    for key in ("schema", "serial", "created", "expires", "subsystems"):
        d = _doc()
        del d[key]
        yield f"missing {key}", json.dumps(d).encode()
    d = _doc()
    d["schema"] = 2
    yield "schema 2", json.dumps(d).encode()
    d = _doc()
    d["serial"] = -1
    yield "negative serial", json.dumps(d).encode()
    d = _doc()
    d["serial"] = True
    yield "bool serial", json.dumps(d).encode()
    d = _doc()
    d["subsystems"]["nats"]["assets"]["linux/amd64"]["sha256"] = "A" * 64
    yield "upper-case sha", json.dumps(d).encode()
    d = _doc()
    d["subsystems"]["nats"]["assets"]["linux/amd64"]["name"] = "../../etc/passwd.tar.gz"
    yield "unsafe asset name", json.dumps(d).encode()
    d = _doc()
    d["subsystems"]["../x"] = d["subsystems"]["nats"]
    yield "unsafe subsystem", json.dumps(d).encode()
    d = _doc()
    d["subsystems"]["nats"]["assets"] = {"linux": d["subsystems"]["nats"]["assets"]["linux/amd64"]}
    yield "bad platform", json.dumps(d).encode()
    d = _doc()
    d["expires"] = "tomorrow"
    yield "bad time", json.dumps(d).encode()
    d = _doc()
    d["subsystems"]["nats"]["binary"] = "../sh"
    yield "binary path", json.dumps(d).encode()


@pytest.mark.parametrize("label,data", list(_mutations()), ids=[m[0] for m in _mutations()])
def test_malformed_manifests_are_refused_even_when_signed(key, label, data) -> None:
    with pytest.raises(ManifestError):
        parse_manifest(data)
    # A valid signature does not make malformed bytes acceptable.
    with pytest.raises(ManifestError):
        verify_manifest(data, signing.sign(data, key), key.public_key(), now=NOW)


def test_with_entry_changes_only_that_entry(key) -> None:
    base = with_entry(empty_manifest(), "arc", _entry("v1.0.0"), now=NOW)
    base = with_entry(base, "nats", _entry("v2.10.24"), now=NOW)
    new = with_entry(base, "nats", _entry("v2.10.25"), now=NOW + timedelta(hours=1))
    assert new.serial == base.serial + 1
    assert new.subsystems["arc"] == base.subsystems["arc"]
    assert new.subsystems["nats"].version == "v2.10.25"
    assert new.expires == format_time(NOW + timedelta(hours=1, days=30))


def test_load_private_key_from_env_path_and_pem(tmp_path, monkeypatch) -> None:
    priv, pub = signing.write_keypair(tmp_path / "keys")
    monkeypatch.setenv(signing.SIGNING_KEY_ENV, str(priv))
    from_path = signing.load_private_key()
    monkeypatch.setenv(signing.SIGNING_KEY_ENV, priv.read_text())
    from_pem = signing.load_private_key()
    assert signing.public_key_pem(from_path) == signing.public_key_pem(from_pem) == pub.read_bytes()
    monkeypatch.delenv(signing.SIGNING_KEY_ENV)
    with pytest.raises(ConfigError, match="SYNC_TOOLS_SIGNING_KEY"):
        signing.load_private_key()
    with pytest.raises(ConfigError, match="not a PEM private key"):
        signing.load_private_key(str(pub))


def test_keys_generate_cli_private_key_0600_and_never_overwrites(tmp_path) -> None:
    runner = CliRunner()
    out = tmp_path / "keys"
    result = runner.invoke(cli, ["keys", "generate", "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    paths = json.loads(result.output)
    priv = out / "release.key"
    assert paths == {"private_key": str(priv), "public_key": str(out / "release.pub")}
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    key = signing.load_private_key(str(priv))
    data = b"hello"
    signing.verify(data, signing.sign(data, key), signing.load_public_key(str(out / "release.pub")))
    before = priv.read_bytes()
    again = runner.invoke(cli, ["keys", "generate", "--out", str(out)])
    assert again.exit_code == 1
    assert "refusing to overwrite" in again.output
    assert priv.read_bytes() == before
