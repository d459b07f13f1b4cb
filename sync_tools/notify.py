"""``POST /notify``: tell the relay that the release changed, after a release made by hand (the
workflow's notify job does the same from Actions). The body only says "look again"; the relay reads
and verifies the manifest from its store itself. Signed like a GitHub webhook (``X-Hub-Signature-256``,
HMAC-SHA256 over the exact body) with the relay's notify secret.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from http.client import HTTPException
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter

from sync_tools import errtext
from sync_tools.deadline import Deadline, pool_classes, shutdown
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
    act once. Raises ConfigError for an empty secret, RemoteError when the relay cannot be reached,
    refuses (carrying its one-line error and status), redirects, answers with anything but a JSON
    object, or gives no complete answer within the connect and read timeouts together."""
    if not secret:
        raise ConfigError(f"{NOTIFY_SECRET_ENV} is not set: the relay refuses unsigned notifications")
    body = notify_body(release)
    headers = {"Content-Type": "application/json", "Accept": "application/json",
               "X-Hub-Signature-256": signature(secret, body)}
    if delivery:
        headers["X-Sync-Tools-Delivery"] = delivery
    target = url.rstrip("/") + "/notify"
    http = session or requests.Session()
    if session is None:
        for prefix in ("http://", "https://"):  # the deadline reaches the socket before there is a response
            http.mount(prefix, _WatchedAdapter())
    limit = timeout[0] + timeout[1]  # for the whole exchange: a socket timeout bounds each read only
    resp: requests.Response | None = None
    try:
        with Deadline(limit) as deadline:
            resp = http.post(target, data=body, headers=headers, timeout=timeout, allow_redirects=False,
                             stream=True)
            deadline.add(shutdown(getattr(getattr(resp.raw, "_connection", None), "sock", None)))
            raw = resp.raw.read(MAX_ANSWER, decode_content=True) or b""
    except (requests.RequestException, urllib3.exceptions.HTTPError, OSError, HTTPException) as e:
        if deadline.expired:
            raise RemoteError(f"the relay at {target} sent no complete answer within {limit:g} s") from e
        raise RemoteError(f"cannot reach the relay at {target}: {errtext.describe(e)}") from e
    finally:
        if resp is not None:
            resp.close()
        if session is None:
            http.close()
    if deadline.expired:  # a cut connection can read as a short answer
        raise RemoteError(f"the relay at {target} sent no complete answer within {limit:g} s")
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    if 300 <= resp.status_code < 400:
        # never followed: a POST turns into a GET on the way, and its signature would go to wherever
        # the Location names; the relay's URL is to be corrected instead
        where = resp.headers.get("Location") or "nowhere named"
        raise RemoteError(f"the relay at {target} answered {resp.status_code}: it redirects to {where[:200]} "
                          "(give the URL it names, without /notify, as --relay)", status_code=resp.status_code)
    if resp.status_code >= 400:
        message = answer.get("error") if isinstance(answer, dict) else None
        raise RemoteError(f"the relay at {target} answered {resp.status_code}: {message or resp.reason}",
                          status_code=resp.status_code)
    if not isinstance(answer, dict):
        kind = (resp.headers.get("Content-Type") or "no content type").split(";", 1)[0].strip()[:100]
        raise RemoteError(f"the relay at {target} answered {resp.status_code} with {kind}, not the relay's JSON: "
                          "is that the relay's URL?", status_code=resp.status_code)
    return answer


class _WatchedAdapter(HTTPAdapter):
    """requests' adapter whose connections register their socket with the thread's deadline while
    the status line and headers arrive (:mod:`sync_tools.deadline`)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = pool_classes()
