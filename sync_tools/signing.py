"""Ed25519 keys and detached signatures (base64), with cryptography.

Pure: functions take bytes or key objects and return bytes; reading key files is the only I/O, in
:func:`load_private_key` / :func:`load_public_key`.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sync_tools.errors import ConfigError, SignatureError
from sync_tools.fsutil import atomic_write_bytes

SIGNING_KEY_ENV = "SYNC_TOOLS_SIGNING_KEY"


@dataclass(frozen=True)
class KeyPair:
    private_pem: bytes
    public_pem: bytes


def generate_keypair() -> KeyPair:
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return KeyPair(private_pem, public_pem)


def write_keypair(out_dir: Path, name: str = "release") -> tuple[Path, Path]:
    """Generate a key pair into ``out_dir/<name>.key`` (mode 0600) and ``<name>.pub``. Never overwrites.

    Directories it makes are 0755 at most, whatever the umask; a directory anyone may write to (not
    sticky, as /tmp is) is refused: anyone could put a pair of their own in place of this one before
    the public key is pinned and the private one stored as the signing secret."""
    _make_dirs(out_dir)
    if not out_dir.is_dir():
        raise ConfigError("not a directory", path=out_dir)
    mode = out_dir.stat().st_mode
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        raise ConfigError("anyone can write to this directory (mode "
                          f"{stat.S_IMODE(mode):o}), so anyone could replace the keys: use another "
                          "(or chmod o-w it)", path=out_dir)
    priv, pub = out_dir / f"{name}.key", out_dir / f"{name}.pub"
    for p in (priv, pub):
        if p.exists():
            raise ConfigError("already exists; refusing to overwrite a key", path=p)
    pair = generate_keypair()
    # exclusive: a key that appeared meanwhile (another run) is never replaced
    try:
        atomic_write_bytes(priv, pair.private_pem, mode=0o600, exclusive=True)
    except FileExistsError as e:
        raise ConfigError("already exists; refusing to overwrite a key", path=priv) from e
    try:
        atomic_write_bytes(pub, pair.public_pem, mode=0o644, exclusive=True)
    except BaseException as e:
        priv.unlink(missing_ok=True)  # ours, made just now: no half pair is left behind, whatever failed
        if isinstance(e, FileExistsError):
            raise ConfigError("already exists; refusing to overwrite a key", path=pub) from e
        raise
    return priv, pub


def _make_dirs(path: Path) -> None:
    """``mkdir -p`` with mode 0755 for each directory made (``Path.mkdir`` gives the parents it makes
    0777 less the umask)."""
    missing: list[Path] = []
    while not path.exists() and not path.is_symlink() and path != path.parent:
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o755)
        except FileExistsError:
            pass  # made meanwhile; a file there fails the writes below


def _pem_or_file(value: str | bytes, what: str) -> tuple[bytes, object]:
    if isinstance(value, bytes):
        return value, "<bytes>"
    if value.lstrip().startswith("-----BEGIN"):
        return value.encode(), f"<{what} PEM>"
    path = Path(os.path.expanduser(value))
    try:
        return path.read_bytes(), path
    except OSError as e:
        raise ConfigError(f"cannot read {what}: {e.strerror or e}", path=path) from e


def load_private_key(value: str | bytes | None = None) -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM text, a PEM file path, or $SYNC_TOOLS_SIGNING_KEY."""
    if value is None:
        value = os.environ.get(SIGNING_KEY_ENV)
        if not value:
            raise ConfigError(f"no signing key: set {SIGNING_KEY_ENV} to a key file path or its PEM text")
    data, where = _pem_or_file(value, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError("not a PEM private key", path=where) from e
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError("not an Ed25519 private key", path=where)
    return key


def load_public_key(value: str | bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM text or a PEM file path."""
    data, where = _pem_or_file(value, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise ConfigError("not a PEM public key", path=where) from e
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError("not an Ed25519 public key", path=where)
    return key


def public_key_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def sign(data: bytes, key: Ed25519PrivateKey) -> bytes:
    """The detached signature of *data*, base64-encoded (the bytes of ``manifest.json.sig``)."""
    return base64.b64encode(key.sign(data)) + b"\n"


def verify(data: bytes, signature_b64: bytes, key: Ed25519PublicKey) -> None:
    """Check a base64 detached signature over the exact bytes *data*. Raises SignatureError."""
    try:
        raw = base64.b64decode(signature_b64.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise SignatureError("signature is not valid base64") from e
    if len(raw) != 64:
        raise SignatureError(f"signature has {len(raw)} bytes, an Ed25519 signature has 64")
    try:
        key.verify(raw, data)
    except InvalidSignature as e:
        raise SignatureError("signature does not verify with the pinned public key") from e
