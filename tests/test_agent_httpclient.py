"""The agent's urllib3 client keeps what requests gave it: env proxies, NO_PROXY, redirects, timeouts."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from sync_tools.agent.httpclient import Client, HTTPError


@contextmanager
def _server(handler_body) -> Iterator[tuple[str, list[str]]]:
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a: object) -> None:
            pass

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            seen.append(self.requestline.split()[1])
            status, headers, body = handler_body(self)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_requests_go_through_the_environment_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    with _server(lambda h: (200, {}, b"via proxy")) as (proxy, seen):
        monkeypatch.setenv("HTTP_PROXY", proxy)
        monkeypatch.setenv("NO_PROXY", "")
        # 127.0.0.2 is loopback with nothing listening: only the proxy can answer
        resp = Client().get("http://127.0.0.2:9/manifest.json", timeout=(2, 2))
        assert resp.status == 200 and resp.data == b"via proxy"
        assert seen == ["http://127.0.0.2:9/manifest.json"]  # absolute-form: a proxy request


def test_no_proxy_goes_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    with _server(lambda h: (200, {}, b"direct")) as (origin, seen):
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.2:9")  # would fail if used
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        resp = Client().get(f"{origin}/x", timeout=(2, 2))
        assert resp.status == 200 and resp.data == b"direct" and seen == ["/x"]


def test_redirects_are_followed_and_streams_read() -> None:
    with _server(lambda h: (200, {}, b"asset bytes")) as (store, _):
        with _server(lambda h: (302, {"Location": f"{store}/blob"}, b"")) as (front, _):
            resp = Client().get(f"{front}/asset.tar.gz", stream=True, timeout=(2, 2))
            try:
                assert resp.status == 200 and resp.read1(1024) == b"asset bytes"
            finally:
                resp.close()


def test_a_dead_address_is_an_http_error_within_the_timeout() -> None:
    with pytest.raises(HTTPError):
        Client().get("http://127.0.0.2:9/x", timeout=(1, 1))
