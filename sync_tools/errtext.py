"""Foreign exceptions as the short phrase a one-line error needs: what a person can act on
("connection refused", "host not found", "/x/manifest.json: no such file or directory"), never a
connection pool's repr or an exception class chain."""

from __future__ import annotations

import socket


def _chain(e: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and all(cur is not x for x in out) and len(out) < 16:
        out.append(cur)
        reason = getattr(cur, "reason", None)  # urllib3's MaxRetryError carries the cause here
        cur = reason if isinstance(reason, BaseException) else (cur.__cause__ or cur.__context__)
    return out


def describe(e: BaseException) -> str:
    """*e* (and what caused it) in a few words, for the end of a one-line error."""
    chain = _chain(e)
    for c in chain:
        if isinstance(c, socket.gaierror):
            return "host not found"
    for c in chain:
        if isinstance(c, ConnectionRefusedError):
            return "connection refused"
        if isinstance(c, ConnectionResetError):
            return "connection reset"
    for c in chain:
        name = type(c).__name__
        if name in ("ReadTimeoutError", "ConnectTimeoutError", "ReadTimeout", "ConnectTimeout") or \
                isinstance(c, (TimeoutError, socket.timeout)):
            return "timed out"
        if name in ("SSLError", "SSLCertVerificationError"):
            return f"TLS: {getattr(c, 'verify_message', None) or getattr(c, 'reason', None) or 'handshake failed'}"
    for c in chain:
        if isinstance(c, OSError) and c.strerror:
            text = c.strerror[:1].lower() + c.strerror[1:]
            return f"{c.filename}: {text}" if c.filename else text
    text = " ".join(str(e).split())
    return text if text else type(e).__name__
