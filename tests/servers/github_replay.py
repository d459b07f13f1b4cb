"""Recorded GitHub traffic (tests/fixtures/octokit/) and a loopback server that replays it.

:func:`load_recording` reads one scenario of ``@octokit/fixtures`` (raw recordings of real
api.github.com / uploads.github.com traffic) as :class:`Exchange` records.

:class:`ReplayServer` answers requests from a chosen sequence of a recording's exchanges, in order,
and nothing else: each request must be the next exchange's method, host, path and query (``per_page``
may be added where the recorded answer was a complete list on one page), with the recorded body
(JSON compared parsed, uploads byte for byte) and content type. The answer is the recorded status,
headers and body with GitHub's hosts rewritten to the server (``https://api.github.com`` -> its URL,
``https://uploads.github.com`` -> its URL + ``/uploads``, ``https://github.com`` -> its URL + ``/web``).
A request that does not line up gets a 599 and is recorded in ``mismatches``; the test fails on it.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

RECORDINGS = Path(__file__).resolve().parent.parent / "fixtures/octokit"
API, UPLOADS, WEB = "https://api.github.com", "https://uploads.github.com", "https://github.com"


@dataclasses.dataclass(frozen=True)
class Exchange:
    """One recorded request and GitHub's answer."""

    index: int
    method: str  # upper case
    host: str  # "api.github.com" or "uploads.github.com"
    path: str  # with the query string
    request_headers: dict[str, str]  # lower-case names
    request_body: Any  # parsed JSON, a str (uploads), or "" when none
    status: int
    headers: tuple[tuple[str, str], ...]  # as sent, in order
    body: Any  # parsed JSON, or "" when none

    def header(self, name: str) -> str | None:
        """The first header *name* (any case) GitHub sent, or None."""
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def header_names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}

    @property
    def route(self) -> str:
        return urlsplit(self.path).path

    @property
    def query(self) -> list[tuple[str, str]]:
        return parse_qsl(urlsplit(self.path).query, keep_blank_values=True)


def load_recording(scenario: str) -> list[Exchange]:
    """The exchanges of *scenario* (a file name in tests/fixtures/octokit/ without ``.json``), in order."""
    raw = json.loads((RECORDINGS / f"{scenario}.json").read_text())
    out = []
    for i, r in enumerate(raw):
        h = r["rawHeaders"]
        out.append(Exchange(
            index=i,
            method=r["method"].upper(),
            host=urlsplit(r["scope"]).hostname or "",
            path=r["path"],
            request_headers={k.lower(): str(v) for k, v in r.get("reqheaders", {}).items()},
            request_body=r.get("body", ""),
            status=int(r["status"]),
            headers=tuple(zip(h[::2], h[1::2], strict=True)),
            body=r.get("response", ""),
        ))
    return out


def rewrite_hosts(value: Any, base: str) -> Any:
    """*value* with GitHub's hosts in every string replaced by the loopback *base* layout."""
    if isinstance(value, str):
        return value.replace(UPLOADS, base + "/uploads").replace(API, base).replace(WEB, base + "/web")
    if isinstance(value, list):
        return [rewrite_hosts(v, base) for v in value]
    if isinstance(value, dict):
        return {k: rewrite_hosts(v, base) for k, v in value.items()}
    return value


# Headers of the transport, not of GitHub's answer: werkzeug sets its own framing.
_HOP = {"connection", "content-length", "transfer-encoding", "date", "server"}


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class ReplayServer:
    """Serves exchanges *indexes* of *recording*, in that order, on 127.0.0.1 (module docstring).

    ``stand_ins`` maps a recorded exchange's index to ``(method, path, status)``: a request the
    scenario does not hold is answered with that exchange's recorded body and headers (its Location
    dropped) and *status*. A test declares each one; ``served`` lists every answer given.
    """

    def __init__(self, recording: list[Exchange], indexes: list[int], *,
                 stand_ins: dict[int, tuple[str, str, int]] | None = None):
        self.recording = recording
        self.exchanges = [recording[i] for i in indexes]
        self.stand_ins = stand_ins or {}
        self.url = ""
        self.served: list[tuple[str, str, int]] = []  # (method, path, recorded index)
        self.mismatches: list[str] = []
        self._next = 0
        self._lock = threading.Lock()
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def __enter__(self) -> ReplayServer:
        self._server = make_server("127.0.0.1", 0, self._wsgi, threaded=True, request_handler=_QuietHandler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def remaining(self) -> list[Exchange]:
        """Exchanges of the sequence not requested yet."""
        return self.exchanges[self._next:]

    # -- matching
    def _mismatch(self, request: Request, why: str) -> Response:
        self.mismatches.append(f"{request.method} {request.full_path.rstrip('?')}: {why}")
        return Response(json.dumps({"message": f"replay: {why}"}), status=599, content_type="application/json")

    def _split(self, request: Request) -> tuple[str, str]:
        path = request.path
        if path.startswith("/uploads/"):
            return "uploads.github.com", path[len("/uploads"):]
        return "api.github.com", path

    def _query_matches(self, e: Exchange, got: list[tuple[str, str]]) -> bool:
        want = e.query
        if sorted(got) == sorted(want):
            return True
        # per_page added by the client: the same answer when the recorded list was complete on one page
        extra = [kv for kv in got if kv[0] == "per_page"]
        rest = [kv for kv in got if kv[0] != "per_page"]
        if (len(extra) == 1 and sorted(rest) == sorted(want) and isinstance(e.body, list)
                and e.header("Link") is None and int(extra[0][1]) >= len(e.body)):
            return True
        return False

    def _body_matches(self, e: Exchange, request: Request) -> str | None:
        raw = request.get_data()
        want = e.request_body
        if want in ("", None):
            return None if not raw else f"a body of {len(raw)} bytes; the recording has none"
        if isinstance(want, str):
            if raw != want.encode():
                return f"body {raw[:60]!r} is not the recorded {want[:60]!r}"
        else:
            try:
                got = json.loads(raw)
            except ValueError:
                return "the body is not JSON"
            if got != want:
                return f"JSON body {got} is not the recorded {want}"
        ct = e.request_headers.get("content-type")
        if ct is not None and (request.content_type or "").split(";")[0] != ct.split(";")[0]:
            return f"Content-Type {request.content_type!r} is not the recorded {ct!r}"
        return None

    def _answer(self, e: Exchange, status: int | None = None, drop: tuple[str, ...] = ()) -> Response:
        body = rewrite_hosts(e.body, self.url)
        resp = Response(json.dumps(body) if body != "" else b"", status=status or e.status)
        resp.headers.clear()
        for k, v in e.headers:
            if k.lower() in _HOP or k.lower() in drop:
                continue
            resp.headers.add(k, rewrite_hosts(v, self.url))
        return resp

    def _wsgi(self, environ: dict, start_response: Callable) -> Any:
        request = Request(environ)
        host, path = self._split(request)
        got_query = parse_qsl(request.query_string.decode(), keep_blank_values=True)
        with self._lock:
            for index, (method, stand_path, status) in self.stand_ins.items():
                if request.method == method and path == stand_path:
                    self.served.append((request.method, path, index))
                    return self._answer(self.recording[index], status, drop=("location",))(environ, start_response)
            if self._next >= len(self.exchanges):
                return self._mismatch(request, "the recorded sequence is over")(environ, start_response)
            e = self.exchanges[self._next]
            why = None
            if (request.method, host, path) != (e.method, e.host, e.route):
                why = f"expected recorded #{e.index} {e.method} {e.host}{e.path}"
            elif not self._query_matches(e, got_query):
                why = f"query {got_query} is not the recorded #{e.index} {e.query}"
            else:
                why = self._body_matches(e, request)
            if why is not None:
                return self._mismatch(request, why)(environ, start_response)
            self._next += 1
            self.served.append((request.method, path, e.index))
        return self._answer(e)(environ, start_response)


def replay(scenario: str, indexes: list[int], *, stand_ins: dict[int, tuple[str, str, int]] | None = None) -> ReplayServer:
    """A ReplayServer (start it with ``with``) for exchanges *indexes* of *scenario*."""
    return ReplayServer(load_recording(scenario), indexes, stand_ins=stand_ins)
