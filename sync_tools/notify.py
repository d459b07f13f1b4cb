"""``POST /notify``: tell the relay that the release changed, after a release made by hand (the
workflow's notify job does the same from Actions). The body only says "look again"; the relay reads
and verifies the manifest from its store itself. Signed like a GitHub webhook (``X-Hub-Signature-256``,
HMAC-SHA256 over the exact body) with the relay's notify secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import requests

from sync_tools import errtext
from sync_tools.errors import ConfigError, RemoteError

NOTIFY_SECRET_ENV = "SYNC_TOOLS_NOTIFY_SECRET"
WEBHOOK_SECRET_ENV = "SYNC_TOOLS_WEBHOOK_SECRET"  # the relay's default notify secret
TIMEOUT = (5.0, 30.0)
MAX_ANSWER = 64 << 10


def notify_body(release: str) -> bytes:
    return json.dumps({"release": release}, sort_keys=True).encode()


def signature(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def notify_relay(url: str, secret: bytes, release: str, *, delivery: str | None = None,
                 session: requests.Session | None = None, timeout: tuple[float, float] = TIMEOUT) -> dict[str, Any]:
    """Send the signed notification to the relay at *url* (its base URL). Returns the relay's JSON
    answer (``status``: accepted | duplicate). *delivery* makes a repeat of the same notification
    act once. Raises ConfigError for an empty secret, RemoteError when the relay cannot be reached or
    refuses (carrying its one-line error and status)."""
    if not secret:
        raise ConfigError(f"{NOTIFY_SECRET_ENV} is not set: the relay refuses unsigned notifications")
    body = notify_body(release)
    headers = {"Content-Type": "application/json", "Accept": "application/json",
               "X-Hub-Signature-256": signature(secret, body)}
    if delivery:
        headers["X-Sync-Tools-Delivery"] = delivery
    target = url.rstrip("/") + "/notify"
    http = session or requests.Session()
    try:
        resp = http.post(target, data=body, headers=headers, timeout=timeout, allow_redirects=False, stream=True)
        raw = resp.raw.read(MAX_ANSWER, decode_content=True) or b""
        resp.close()
    except (requests.RequestException, OSError) as e:
        raise RemoteError(f"cannot reach the relay at {target}: {errtext.describe(e)}") from e
    finally:
        if session is None:
            http.close()
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if resp.status_code >= 400 or not isinstance(answer, dict):
        message = answer.get("error") if isinstance(answer, dict) else None
        raise RemoteError(f"the relay at {target} answered {resp.status_code}: {message or resp.reason}",
                          status_code=resp.status_code)
    return answer
