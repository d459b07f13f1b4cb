"""``manifest.json``: the signed USER contract, as frozen dataclasses with a pure parse/verify core.

Nothing here does I/O. :func:`verify_manifest` takes the exact bytes of ``manifest.json`` and its
``.sig`` and returns a :class:`Manifest` only if the signature verifies against the pinned key, the
manifest has not expired, and its serial is not lower than the last one applied.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sync_tools import signing
from sync_tools.errors import ManifestError
from sync_tools.rollout import RolloutPolicy

SCHEMA = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.json.sig"
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ASSET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*\.tar\.gz$")
_PLATFORM = re.compile(r"^[a-z0-9]+/[a-z0-9]+$")
_SUBSYSTEM = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_PATCH_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_PATCH_FORMAT = re.compile(r"^[a-z0-9][a-z0-9.-]{0,31}$")
MAX_PATCHES = 16


def utcnow() -> datetime:
    return datetime.now(UTC)


def format_time(t: datetime) -> str:
    return t.astimezone(UTC).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: Any, what: str) -> datetime:
    if not isinstance(value, str):
        raise ManifestError(f"{what} must be an ISO 8601 string")
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as e:
        raise ManifestError(f"{what} is not an ISO 8601 time: {value!r}") from e
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t


def asset_name(binary: str, platform: str) -> str:
    """``<binary>-<os>-<arch>.tar.gz``."""
    os_, arch = platform.split("/", 1)
    return f"{binary}-{os_}-{arch}.tar.gz"


@dataclass(frozen=True)
class Patch:
    """A patch asset that turns the binary whose sha256 is *from_sha* into the asset's binary."""

    from_sha: str
    name: str
    size: int
    sha256: str
    format: str

    def to_json(self) -> dict[str, Any]:
        return {"from": self.from_sha, "name": self.name, "size": self.size, "sha256": self.sha256,
                "format": self.format}


@dataclass(frozen=True)
class Asset:
    name: str
    size: int
    sha256: str
    binary_sha256: str
    patches: tuple[Patch, ...] = ()  # optional; agents that do not know the key ignore it

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "size": self.size, "sha256": self.sha256,
                               "binary_sha256": self.binary_sha256}
        if self.patches:
            out["patches"] = [p.to_json() for p in self.patches]
        return out


@dataclass(frozen=True)
class Entry:
    """One subsystem's line in the manifest."""

    version: str
    commit: str
    built: str
    assets: Mapping[str, Asset] = field(default_factory=lambda: MappingProxyType({}))
    binary: str | None = None
    rollout: RolloutPolicy | None = None  # a staged rollout (sync_tools.rollout); None: everyone at once
    path: str | None = None  # where the binary goes under <sub>/.bin when not right there: bin/grafana-server

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version,
            "commit": self.commit,
            "built": self.built,
            "assets": {p: a.to_json() for p, a in sorted(self.assets.items())},
        }
        if self.binary:
            out["binary"] = self.binary
        if self.rollout is not None:
            out["rollout"] = self.rollout.to_json()
        if self.path:
            out["path"] = self.path
        return out


@dataclass(frozen=True)
class Manifest:
    serial: int
    created: str
    expires: str
    subsystems: Mapping[str, Entry] = field(default_factory=lambda: MappingProxyType({}))
    schema: int = SCHEMA

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "serial": self.serial,
            "created": self.created,
            "expires": self.expires,
            "subsystems": {n: e.to_json() for n, e in sorted(self.subsystems.items())},
        }

    def dumps(self) -> bytes:
        """Canonical bytes: sorted keys, two-space indent, trailing newline."""
        return (json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n").encode("utf-8")

    def expired(self, now: datetime | None = None) -> bool:
        return parse_time(self.expires, "expires") <= (now or utcnow())


def empty_manifest() -> Manifest:
    """The manifest before the first release: serial 0, nothing in it."""
    now = utcnow()
    return Manifest(serial=0, created=format_time(now), expires=format_time(now))


def _expect(obj: Any, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ManifestError(f"{where}: missing {key!r}")
    value = obj[key]
    if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
        raise ManifestError(f"{where}.{key}: wrong type {type(value).__name__}")
    return value


def _parse_asset(obj: Any, where: str) -> Asset:
    name = _expect(obj, "name", str, where)
    if not _ASSET_NAME.match(name):
        raise ManifestError(f"{where}.name: unsafe asset name {name!r}")
    size = _expect(obj, "size", int, where)
    if size < 0:
        raise ManifestError(f"{where}.size: negative")
    digests = {}
    for key in ("sha256", "binary_sha256"):
        value = _expect(obj, key, str, where)
        if not _HEX64.match(value):
            raise ManifestError(f"{where}.{key}: not a lower-case hex sha256")
        digests[key] = value
    patches_raw = obj.get("patches", [])
    if not isinstance(patches_raw, list) or len(patches_raw) > MAX_PATCHES:
        raise ManifestError(f"{where}.patches: must be a list of at most {MAX_PATCHES}")
    patches = tuple(_parse_patch(p, f"{where}.patches[{i}]") for i, p in enumerate(patches_raw))
    return Asset(name=name, size=size, **digests, patches=patches)


def _parse_patch(obj: Any, where: str) -> Patch:
    name = _expect(obj, "name", str, where)
    if not _PATCH_NAME.match(name) or name in (MANIFEST_NAME, SIGNATURE_NAME):
        raise ManifestError(f"{where}.name: unsafe patch name {name!r}")
    size = _expect(obj, "size", int, where)
    if size < 0:
        raise ManifestError(f"{where}.size: negative")
    digests = {}
    for key in ("from", "sha256"):
        value = _expect(obj, key, str, where)
        if not _HEX64.match(value):
            raise ManifestError(f"{where}.{key}: not a lower-case hex sha256")
        digests[key] = value
    fmt = _expect(obj, "format", str, where)
    if not _PATCH_FORMAT.match(fmt):
        raise ManifestError(f"{where}.format: bad format name {fmt!r}")
    return Patch(from_sha=digests["from"], name=name, size=size, sha256=digests["sha256"], format=fmt)


def _binary_subpath(path: Any, binary: str | None) -> bool:
    """Whether *path* is a relative path of plain segments (no ``..``, nothing absolute) whose last
    segment is *binary*: the only place under ``<sub>/.bin`` a signed entry may send the binary."""
    if not isinstance(path, str) or not binary or len(path) > 255 or "\\" in path or "\0" in path:
        return False
    parts = path.split("/")
    return len(parts) >= 2 and parts[-1] == binary and all(p not in ("", ".", "..") for p in parts)


def _parse_entry(obj: Any, where: str) -> Entry:
    assets_raw = _expect(obj, "assets", dict, where)
    assets = {}
    for platform, a in assets_raw.items():
        if not _PLATFORM.match(platform):
            raise ManifestError(f"{where}.assets: bad platform {platform!r}")
        assets[platform] = _parse_asset(a, f"{where}.assets.{platform}")
    binary = obj.get("binary")
    if binary is not None and (not isinstance(binary, str) or "/" in binary or binary in ("", ".", "..")):
        raise ManifestError(f"{where}.binary: bad binary name")
    path = obj.get("path")
    if path is not None and not _binary_subpath(path, binary):
        raise ManifestError(f"{where}.path: not a path inside .bin that ends in the binary's name")
    entry = Entry(
        version=_expect(obj, "version", str, where),
        commit=_expect(obj, "commit", str, where),
        built=_expect(obj, "built", str, where),
        assets=MappingProxyType(assets),
        binary=binary,
        rollout=None if obj.get("rollout") is None else RolloutPolicy.from_json(obj["rollout"], where=f"{where}.rollout"),
        path=path,
    )
    parse_time(entry.built, f"{where}.built")
    return entry


def parse_manifest(data: bytes) -> Manifest:
    """Parse and validate manifest bytes (no signature check). Raises ManifestError."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} cap")
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ManifestError(f"manifest is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ManifestError("manifest must be a JSON object")
    schema = _expect(obj, "schema", int, "manifest")
    if schema != SCHEMA:
        raise ManifestError(f"unsupported manifest schema {schema} (this sync-tools reads {SCHEMA})")
    serial = _expect(obj, "serial", int, "manifest")
    if serial < 0:
        raise ManifestError("manifest.serial: negative")
    subs_raw = _expect(obj, "subsystems", dict, "manifest")
    subs = {}
    for name, e in subs_raw.items():
        if not _SUBSYSTEM.match(name):
            raise ManifestError(f"manifest.subsystems: bad subsystem name {name!r}")
        subs[name] = _parse_entry(e, f"subsystems.{name}")
    m = Manifest(
        serial=serial,
        created=_expect(obj, "created", str, "manifest"),
        expires=_expect(obj, "expires", str, "manifest"),
        subsystems=MappingProxyType(subs),
        schema=schema,
    )
    parse_time(m.created, "created")
    parse_time(m.expires, "expires")
    return m


def verify_manifest(
    data: bytes,
    signature: bytes,
    public_key: Ed25519PublicKey,
    *,
    min_serial: int = 0,
    now: datetime | None = None,
) -> Manifest:
    """Verify the signature over the exact *data*, then parse; refuse expired or rolled-back manifests.

    Raises SignatureError (bad signature) or ManifestError (malformed, expired, serial < min_serial).
    """
    signing.verify(data, signature, public_key)
    m = parse_manifest(data)
    if m.serial < min_serial:
        raise ManifestError(f"manifest serial {m.serial} is lower than {min_serial} already applied "
                            "(rollback refused)")
    if m.expired(now):
        raise ManifestError(f"manifest expired at {m.expires} (freeze refused)")
    return m


def with_entry(
    base: Manifest,
    name: str,
    entry: Entry,
    *,
    now: datetime | None = None,
    expires_days: float = 30.0,
) -> Manifest:
    """A new manifest with only *name*'s entry replaced, serial raised and expiry renewed.

    Platforms of the previous entry that the new one does not carry are kept (a per-platform
    matrix job releases one platform at a time).
    """
    now = now or utcnow()
    subs = dict(base.subsystems)
    previous = subs.get(name)
    if previous is not None and previous.version == entry.version and previous.commit == entry.commit:
        merged = {**previous.assets, **entry.assets}
        entry = replace(entry, assets=MappingProxyType(merged))
    subs[name] = entry
    return renewed(replace(base, subsystems=MappingProxyType(subs)), now=now, expires_days=expires_days)


def renewed(base: Manifest, *, now: datetime | None = None, expires_days: float = 30.0) -> Manifest:
    """*base* with serial raised, and created and expiry renewed from *now*; entries unchanged."""
    now = now or utcnow()
    return replace(base, serial=base.serial + 1, created=format_time(now),
                   expires=format_time(now + timedelta(days=expires_days)))


def sign_manifest(m: Manifest, key: Ed25519PrivateKey) -> tuple[bytes, bytes]:
    """The canonical manifest bytes and their ``.sig`` bytes."""
    data = m.dumps()
    return data, signing.sign(data, key)
