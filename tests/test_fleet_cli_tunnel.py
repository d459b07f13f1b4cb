"""`sync-tools fleet` pointed at the relay's public tunnel, which answers 404 for /fleet (relay/cloudflared.yml
keeps it private): the error says why and what to do, in one line. A real loopback server answers as
cloudflared's `http_status:404` rule does."""

from __future__ import annotations

import http.server

from click.testing import CliRunner

from sync_tools.cli import cli
from tests.support import serve_http


class _Tunnel(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = b"<html><body>404 Not Found</body></html>"
        self.send_response(404)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_fleet_through_the_tunnel_says_the_page_is_private(monkeypatch) -> None:
    monkeypatch.setenv("SYNC_TOOLS_OPERATOR_TOKEN", "op-token")
    with serve_http(_Tunnel) as tunnel:
        result = CliRunner().invoke(cli, ["fleet", "--relay", tunnel.url])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "answered 404" in lines[0] and "keeps private" in lines[0] and "127.0.0.1:9191" in lines[0]


def test_the_fleet_help_example_is_the_relays_own_host() -> None:
    result = CliRunner().invoke(cli, ["fleet", "--help"])
    assert "--relay http://127.0.0.1:9191" in result.output and "relay.example.org" not in result.output
