"""The agent's HTTP client, on urllib3 (the transport requests itself is built on).

The agent idles for days on thousands of USER machines, so its resident memory is a target
(bench/agent "idle", <= 40 MB): urllib3 directly keeps requests, idna and charset_normalizer, about
4.6 MB, out of it. What requests would add for us is kept: proxies from the environment
(``HTTP(S)_PROXY``/``ALL_PROXY``, ``NO_PROXY``, read by :mod:`urllib.request`), redirects followed
(GitHub's release downloads redirect to its object storage; ``Authorization`` is dropped across
hosts), connect and read timeouts on every call, and no automatic retries (the callers resume or
reconnect themselves).

Redirects are followed here, not by urllib3: urllib3 reads each redirect's body to its end before it
follows, inside one call no deadline of ours reaches, so a redirect whose body never ends would hold
the caller for as long as the server keeps sending. Here a redirect's body is never read.
"""

from __future__ import annotations

import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping

import urllib3

HTTPError = urllib3.exceptions.HTTPError
Response = urllib3.BaseHTTPResponse


#: Redirects one GET follows; one more is an error.
MAX_REDIRECTS = 5
#: Headers not sent on to another scheme, host or port (what urllib3 drops when it follows).
_CROSS_ORIGIN_DROP = frozenset(h.lower() for h in urllib3.Retry.DEFAULT_REMOVE_HEADERS_ON_REDIRECT)
_DEFAULT_PORTS = {"http": 80, "https": 443}


class RedirectError(HTTPError):
    """Too many redirects, or one to a URL that is not http(s)."""


class OutOfTimeError(urllib3.exceptions.TimeoutError):
    """The GET (its redirects included) was not answered by its deadline."""


def _retries() -> urllib3.Retry:
    # never repeat a request on its own; redirects are followed by Client.get itself
    return urllib3.Retry(total=None, connect=0, read=0, status=0, other=0, redirect=0)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, (parts.hostname or ""), parts.port or _DEFAULT_PORTS.get(parts.scheme)


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
            timeout: tuple[float, float] = (5.0, 30.0), stream: bool = False,
            deadline: float | None = None) -> Response:
        """GET *url*, following up to MAX_REDIRECTS redirects. With *stream*, the body is left unread
        (``read1``/``stream``; close it after). *deadline*: a :func:`time.monotonic` time by which the
        answer (its headers; redirects included) must have come; each request's timeouts are cut to it.
        Raises :data:`HTTPError` (urllib3's family) on connection failures and timeouts, RedirectError,
        OutOfTimeError."""
        sent = dict(headers or {})
        for _ in range(MAX_REDIRECTS + 1):
            connect, read = timeout
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OutOfTimeError(f"{url}: no answer by the deadline")
                connect, read = min(connect, left), min(read, left)
            resp = self._manager(url).request(
                "GET", url, headers=sent, redirect=False, preload_content=False,
                timeout=urllib3.Timeout(connect=connect, read=read))
            location = resp.get_redirect_location()
            if not location:
                if not stream:
                    resp.read(cache_content=True)
                    resp.release_conn()
                return resp
            # closed, not drained: a redirect's body is never wanted and may never end
            resp.close()
            resp.release_conn()
            try:
                target = urllib.parse.urljoin(url, location)
                if urllib.parse.urlsplit(target).scheme not in _DEFAULT_PORTS:
                    raise RedirectError(f"{url}: redirected to {target!r}, not an http(s) URL")
                cross = _origin(target) != _origin(url)
            except ValueError as e:  # a port out of range, a bracket not closed: urllib.parse's words
                raise RedirectError(f"{url}: redirected to {location!r}, not a URL: {e}") from e
            if cross:
                sent = {k: v for k, v in sent.items() if k.lower() not in _CROSS_ORIGIN_DROP}
            url = target
        raise RedirectError(f"{url}: more than {MAX_REDIRECTS} redirects")

    def post(self, url: str, body: bytes, *, headers: Mapping[str, str] | None = None,
             timeout: tuple[float, float] = (5.0, 30.0)) -> Response:
        """POST *body* to *url* (redirects are not followed: a POST is not repeated elsewhere). The answer's
        body is left unread (read what is needed, then ``release_conn``). Raises :data:`HTTPError` on
        connection failures and timeouts."""
        return self._manager(url).request(
            "POST", url, body=body, headers=dict(headers or {}), redirect=False, preload_content=False,
            timeout=urllib3.Timeout(connect=timeout[0], read=timeout[1]))
