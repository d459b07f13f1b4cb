"""`check` against upstreams that misbehave on purpose (a review of hostile input): ref and release
names that git never makes, server text in error lines, a release list that pages for ever, and
two `check` runs writing `.version-manifest.json` at once."""

from __future__ import annotations

import json
import multiprocessing
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from sync_tools.check import CheckReport, CheckResult, write_version_manifest
from sync_tools.cli import cli
from sync_tools.sources.remote import ls_remote
from tests.servers.github_api import github_api_fixture  # noqa: F401 - fixture `github_api`
from tests.support import serve_advertisement, serve_once


def pkt(data: bytes) -> bytes:
    return b"%04x" % (len(data) + 4) + data


def _advertisement(names: list[bytes]) -> bytes:
    """A protocol v0 smart-HTTP ref advertisement of *names*, each at its own sha."""
    lines = []
    for i, name in enumerate(names):
        sha = b"%040x" % (i + 1)
        lines.append(pkt(sha + b" " + name + (b"\0side-band-64k symref=HEAD:refs/heads/main\n" if i == 0 else b"\n")))
    return pkt(b"# service=git-upload-pack\n") + b"0000" + b"".join(lines) + b"0000"


@pytest.fixture
def advertising_server():
    """A loopback HTTP server answering every request with ``answer["body"]`` as a ref advertisement."""
    yield from serve_advertisement()


def _config(tmp_path: Path, subsystems: dict) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir(exist_ok=True)
    path = ws / "sync-tools.yaml"
    path.write_text(yaml.safe_dump({"subsystems": subsystems}, sort_keys=False))
    return path


def _check(config: Path, *args: str):
    result = CliRunner().invoke(cli, ["check", "--config", str(config), *args])
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr
    return result


# a name git's check-ref-format refuses, each read by the version parser as v1.9.x (whitespace is stripped
# before a tag is parsed): taken as the newest tag, it was printed raw and went on to plan and the pin
_HOSTILE_TAGS = [b"refs/tags/v1.9.9 ", b"refs/tags/v1.9.8\r", b"refs/tags/v1.9.7\x0b", b"refs/tags/v1.9.6\t",
                 b"refs/tags/\x1cv1.9.5", b"refs/tags/v1.9.4\xff\xfe", b"refs/heads/ma\x1b[2Jin"]


def test_ref_names_git_never_makes_are_not_listed_nor_taken_as_versions(tmp_path, advertising_server):
    url, answer = advertising_server
    answer["body"] = _advertisement([b"refs/heads/main", b"refs/tags/v1.0.0", b"refs/tags/v1.1.0", *_HOSTILE_TAGS])
    refs = ls_remote(url, timeout=5)
    assert sorted(refs.refs) == ["refs/heads/main", "refs/tags/v1.0.0", "refs/tags/v1.1.0"]

    config = _config(tmp_path, {"x": {"upstream": url, "current": "v1.0.0"}})
    out = json.loads(_check(config, "--json").stdout)
    assert out["x"]["latest"] == "v1.1.0", out
    table = _check(config).stdout
    assert table.isascii() and all(line.isprintable() for line in table.splitlines()), repr(table)


def test_release_tags_git_never_makes_are_not_taken(tmp_path, github_api, monkeypatch):
    s = github_api.state
    s.add_repo("o/r")
    for i, tag in enumerate(["v1.0.0", "v1.1.0", "v1.9.9\n", "v1.9.8 ", "v1.9.7\r"]):
        s.add_release("o/r", tag, created_at=f"2026-01-0{i + 1}T00:00:00Z")
    monkeypatch.setenv("GITHUB_API_URL", github_api.url)
    config = _config(tmp_path, {"x": {"upstream": "o/r", "strategy": "releases", "current": "v1.0.0"}})
    out = json.loads(_check(config, "--json").stdout)
    assert out["x"] == {"current": "v1.0.0", "latest": "v1.1.0", "update_available": True}


def test_server_text_in_an_error_is_one_printable_line(tmp_path, github_api, monkeypatch):
    s = github_api.state
    s.add_repo("o/r")
    s.add_release("o/r", "v1.0.0")
    github_api.inject("GET", r"/releases$", status=403,
                      body={"message": "denied\n::error::forged line\x1b]0;pwned\x07\u2028more"})

    def handle(conn: socket.socket) -> None:  # a git daemon refusing with an ERR line of escapes
        try:
            conn.settimeout(2)
            conn.recv(65536)
            conn.sendall(pkt(b"ERR no\x1b[2J\x1b[31m such\x07 repository\r"))
        except OSError:
            pass

    monkeypatch.setenv("GITHUB_API_URL", github_api.url)
    for port in serve_once(handle):
        config = _config(tmp_path, {"rel": {"upstream": "o/r", "strategy": "releases", "current": "v1.0.0"},
                                    "git": {"upstream": f"git://127.0.0.1:{port}/r.git", "current": "v1.0.0"}})
        result = _check(config)
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 2, lines
    assert all(line.isprintable() for line in lines), lines
    assert lines[0].startswith("Error: rel: o/r: GitHub API error 403: denied") and "::error::" in lines[0]
    assert lines[1].startswith("Error: git: git://127.0.0.1:") and "such" in lines[1]
    manifest = json.loads((config.parent / ".version-manifest.json").read_text())
    assert all(sub["error"].isprintable() for sub in manifest["subsystems"].values())


def test_a_release_list_that_pages_for_ever_is_asked_a_few_pages_only(tmp_path, github_api, monkeypatch):
    github_api.state.add_repo("o/r")
    one = github_api.state.add_release("o/r", "v1.1.0")
    # every page one release long, each naming itself as the next: PyGithub follows it until the
    # count of releases read reaches the cap (300 of them, a request each)
    looping = f"<{github_api.url}/repos/o/r/releases?per_page=100&page=2>; rel=\"next\""
    github_api.inject("GET", r"^/repos/o/r/releases$", status=200, times=100_000, body=[one],
                      headers={"Link": looping})
    monkeypatch.setenv("GITHUB_API_URL", github_api.url)
    config = _config(tmp_path, {"x": {"upstream": "o/r", "strategy": "releases", "current": "v1.0.0"}})
    started = time.monotonic()
    out = json.loads(_check(config, "--json", "--timeout", "2").stdout)
    assert time.monotonic() - started < 2, "the check waited for its deadline"
    assert out["x"]["latest"] == "v1.1.0", out
    assert len(github_api.requests_to("GET", r"^/repos/o/r/releases$")) <= 3


def _write_one(args: tuple[str, str, float]) -> None:
    path, name, start = args
    while time.time() < start:  # every process starts its read-merge-write at once
        time.sleep(0.0005)
    report = CheckReport((CheckResult(name=name, upstream="u", strategy="tags", current="v1", latest="v1"),),
                         checked_at=datetime(2026, 12, 7, tzinfo=UTC))
    write_version_manifest(Path(path), report)


def test_concurrent_checks_keep_each_others_entries(tmp_path):
    """Two `check` runs of different subsystems at once (a cron job and a person): each read the old
    file, added its own entries and replaced it, so the later writer dropped the other's."""
    path = tmp_path / ".version-manifest.json"
    names = [f"s{i}" for i in range(8)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(len(names)) as pool:
        for round_ in range(3):
            path.unlink(missing_ok=True)
            pool.map(_write_one, [(str(path), f"{n}-{round_}", time.time() + 0.5) for n in names])
            kept = json.loads(path.read_text())["subsystems"]
            assert sorted(kept) == sorted(f"{n}-{round_}" for n in names), f"round {round_}: {sorted(kept)}"
