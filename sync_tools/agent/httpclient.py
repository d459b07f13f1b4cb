"""The agent's HTTP client, on urllib3 (the transport requests itself is built on).

The agent idles for days on thousands of USER machines, so its resident memory is a target
(bench/agent "idle", <= 40 MB): urllib3 directly keeps requests, idna and charset_normalizer, about
4.6 MB, out of it. What requests would add for us is kept: proxies from the environment
(``HTTP(S)_PROXY``/``ALL_PROXY``, ``NO_PROXY``, read by :mod:`urllib.request`), redirects followed
(GitHub's release downloads redirect to its object storage; ``Authorization`` is dropped across
hosts by urllib3), connect and read timeouts on every call, and no automatic retries (the callers
resume or reconnect themselves).
"""

from __future__ import annotations

import threading
import urllib.parse
import urllib.request
from collections.abc import Mapping

import urllib3

HTTPError = urllib3.exceptions.HTTPError
Response = urllib3.BaseHTTPResponse


def _retries() -> urllib3.Retry:
    # follow up to 5 redirects, never repeat a request on its own
    return urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=5)


class Client:
    """GET and POST with timeouts through the environment's proxy (if any). Thread-safe; pools connections."""

    def __init__(self) -> None:
        self._direct = urllib3.PoolManager(retries=_retries())
        self._proxied: dict[str, urllib3.ProxyManager] = {}
        self._lock = threading.Lock()

    def _manager(self, url: str) -> urllib3.PoolManager:
        parts = urllib.parse.urlsplit(url)
        proxies = urllib.request.getproxies()
        proxy = proxies.get(parts.scheme) or proxies.get("all")
        if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
            return self._direct
        with self._lock:
            if proxy not in self._proxied:
                self._proxied[proxy] = urllib3.ProxyManager(proxy, retries=_retries())
            return self._proxied[proxy]

    def close(self) -> None:
        """Close every pooled connection."""
        self._direct.clear()
        with self._lock:
            for manager in self._proxied.values():
                manager.clear()

    def get(self, url: str, *, headers: Mapping[str, str] | None = None,
            timeout: tuple[float, float] = (5.0, 30.0), stream: bool = False) -> Response:
        """GET *url*. With *stream*, the body is left unread (``read1``/``stream``; close it after).
        Raises :data:`HTTPError` (urllib3's family) on connection failures and timeouts."""
        return self._manager(url).request(
            "GET", url, headers=dict(headers or {}), preload_content=not stream,
            timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]))

    def post(self, url: str, body: bytes, *, headers: Mapping[str, str] | None = None,
             timeout: tuple[float, float] = (5.0, 30.0)) -> Response:
        """POST *body* to *url* (redirects are not followed: a POST is not repeated elsewhere). The answer's
        body is left unread (read what is needed, then ``release_conn``). Raises :data:`HTTPError` on
        connection failures and timeouts."""
        return self._manager(url).request(
            "POST", url, body=body, headers=dict(headers or {}), redirect=False, preload_content=False,
            timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]))
