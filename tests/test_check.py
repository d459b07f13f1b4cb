"""`sync-tools check` end to end: real git repos served over smart HTTP (and git://) on loopback, the
GitHub API test server for `releases`, the real CLI through CliRunner and the console script."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from sync_tools.check import VERSION_MANIFEST, check, write_version_manifest
from sync_tools.cli import cli
from sync_tools.config import load_config
from sync_tools.errors import RemoteError
from sync_tools.sources import Sources
from sync_tools.sources.remote import RefCache, ls_remote
from tests.gitrepos import GitRepo
from tests.servers.git_http import GitDaemon, GitHTTPServer, git_http_server_fixture  # noqa: F401 - fixture
from tests.servers.github_api import github_api_fixture  # noqa: F401 - fixture `github_api`
from tests.support import serve_once


def write_config(root: Path, subsystems: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / "sync-tools.yaml"
    path.write_text(yaml.safe_dump({"subsystems": subsystems}, sort_keys=False))
    return path


def run_check(config: Path, *args: str):
    result = CliRunner().invoke(cli, ["check", "--config", str(config), *args])
    assert "Traceback" not in (result.stdout + result.stderr)
    return result


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def upstreams(git_http_server: GitHTTPServer):
    """Upstream repos covering every case of issue 2, served over smart HTTP. Returns (urls, facts)."""
    root = git_http_server.root
    facts: dict[str, str] = {}

    light = GitRepo.create(root / "light.git")
    light.commit("one")
    light.tag("v1.0.0")
    facts["light_new"] = light.commit("two")
    light.tag("v1.1.0")

    annotated = GitRepo.create(root / "annotated.git")
    annotated.commit("one")
    annotated.tag("v1.0.0", annotated=True)
    facts["annotated_commit"] = annotated.commit("two")
    facts["annotated_tag_object"] = annotated.tag("v1.1.0", annotated=True, message="release 1.1.0")

    vprefix = GitRepo.create(root / "vprefix.git")
    vprefix.commit("one")
    for t in ("v1.2.0", "v1.9.0", "v1.10.0"):
        vprefix.tag(t)

    prerel = GitRepo.create(root / "prerel.git")
    prerel.commit("one")
    prerel.tag("v2.10.0")
    prerel.commit("two")
    prerel.tag("v2.11.0-RC.1", annotated=True)

    include = GitRepo.create(root / "include.git")
    include.commit("one")
    for t in ("v1.0.0", "v1.1.0", "nightly-20991231", "v1.2.0-fips", "helm-9.0.0"):
        include.tag(t)

    release_prefix = GitRepo.create(root / "prefix.git")
    release_prefix.commit("one")
    for t in ("release-1.2", "release-1.9", "release-1.10", "latest", "stable"):
        release_prefix.tag(t)

    major = GitRepo.create(root / "major.git")
    major.commit("one")
    major.tag("v2.10.24")
    facts["major_commit"] = major.commit("two")
    major.tag("v2.10.25")
    major.commit("three")
    major.tag("v3.0.0")

    branchy = GitRepo.create(root / "branchy.git", branch="trunk")
    facts["branchy_first"] = branchy.commit("one")
    facts["branchy_head"] = branchy.commit("two")
    facts["branchy_dev"] = branchy.commit("on dev", branch="dev")

    current = GitRepo.create(root / "current.git")
    current.commit("one")
    current.tag("v5.0.0")
    current.commit("two")
    current.tag("v5.1.0", annotated=True)

    urls = {p.path.name.removesuffix(".git"): git_http_server.url_for(p.path)
            for p in (light, annotated, vprefix, prerel, include, release_prefix, major, branchy, current)}
    return urls, facts


def test_check_json_gives_the_right_answer_for_every_case(tmp_path, upstreams, github_api, monkeypatch):
    urls, facts = upstreams
    github_api.state.add_repo("nats-io/nats-server")
    github_api.state.add_release("nats-io/nats-server", "v2.10.24", created_at="2026-01-01T00:00:00Z")
    github_api.state.add_release("nats-io/nats-server", "v2.10.25", created_at="2026-02-01T00:00:00Z",
                                 target_commitish="a" * 40)
    github_api.state.add_release("nats-io/nats-server", "v2.11.0-RC.1", prerelease=True,
                                 created_at="2026-03-01T00:00:00Z")
    github_api.state.add_release("nats-io/nats-server", "v2.12.0", draft=True, created_at="2026-04-01T00:00:00Z")
    monkeypatch.setenv("GITHUB_API_URL", github_api.url)

    config = write_config(tmp_path / "ws", {
        "light": {"upstream": urls["light"], "current": "v1.0.0"},
        "annotated": {"upstream": urls["annotated"], "current": "v1.0.0"},
        "vprefix": {"upstream": urls["vprefix"], "current": "v1.2.0"},
        "prerel": {"upstream": urls["prerel"], "current": "v2.10.0"},
        "prerel-wanted": {"upstream": urls["prerel"], "current": "v2.10.0", "prereleases": True},
        "include": {"upstream": urls["include"], "current": "v1.0.0", "include": r"^v\d+\.\d+\.\d+$"},
        "prefix": {"upstream": urls["prefix"], "current": "release-1.2"},
        "major": {"upstream": urls["major"], "current": "v2.10.24", "major": "manual"},
        "major-auto": {"upstream": urls["major"], "current": "v2.10.24", "major": "auto"},
        "head": {"upstream": urls["branchy"], "strategy": "commits", "current": facts["branchy_first"][:7]},
        "dev": {"upstream": urls["branchy"], "strategy": "commits", "branch": "dev",
                "current": facts["branchy_dev"][:10].upper()},
        "gh": {"upstream": "https://github.com/nats-io/nats-server", "strategy": "releases", "current": "v2.10.24"},
        "pinned": {"upstream": urls["current"], "current": "v5.1.0"},
        "gone": {"upstream": f"http://127.0.0.1:{closed_port()}/gone.git", "current": "v1.0.0"},
    })
    result = run_check(config, "--json")
    assert result.exit_code == 1, result.output
    out = json.loads(result.stdout)

    assert out["light"] == {"current": "v1.0.0", "latest": "v1.1.0", "update_available": True,
                            "commit": facts["light_new"]}
    # annotated tags are peeled: the commit, never the tag object
    assert out["annotated"]["latest"] == "v1.1.0"
    assert out["annotated"]["commit"] == facts["annotated_commit"] != facts["annotated_tag_object"]
    assert out["vprefix"]["latest"] == "v1.10.0"
    assert out["prerel"]["latest"] == "v2.10.0" and out["prerel"]["update_available"] is False
    assert out["prerel-wanted"]["latest"] == "v2.11.0-RC.1" and out["prerel-wanted"]["update_available"]
    assert out["include"]["latest"] == "v1.1.0"
    assert out["prefix"]["latest"] == "release-1.10"
    assert out["major"] == {"current": "v2.10.24", "latest": "v2.10.25", "update_available": True,
                            "commit": facts["major_commit"], "major_available": "v3.0.0"}
    assert out["major-auto"]["latest"] == "v3.0.0" and "major_available" not in out["major-auto"]
    # commits: the remote HEAD's branch (trunk) when none is given; an abbreviated pin is a prefix
    assert out["head"] == {"current": facts["branchy_first"][:7], "latest": facts["branchy_head"],
                           "update_available": True, "commit": facts["branchy_head"]}
    assert out["dev"]["latest"] == facts["branchy_dev"] and out["dev"]["update_available"] is False
    # releases: drafts and pre-releases left out
    assert out["gh"] == {"current": "v2.10.24", "latest": "v2.10.25", "update_available": True,
                         "commit": "a" * 40}
    assert out["pinned"] == {"current": "v5.1.0", "latest": "v5.1.0", "update_available": False,
                             "commit": out["pinned"]["commit"]}
    assert out["gone"]["latest"] is None and out["gone"]["update_available"] is False
    assert "gone.git" in out["gone"]["error"] and "cannot reach" in out["gone"]["error"]
    # exactly one error line on stderr, naming the subsystem
    assert [line for line in result.stderr.splitlines() if line] == [f"Error: gone: {out['gone']['error']}"]
    assert set(out) == {"light", "annotated", "vprefix", "prerel", "prerel-wanted", "include", "prefix", "major",
                        "major-auto", "head", "dev", "gh", "pinned", "gone"}


def test_same_remote_is_asked_once_even_concurrently(tmp_path, git_http_server):
    repo = GitRepo.create(git_http_server.root / "shared.git")
    repo.commit("one")
    repo.tag("v1.0.0")
    url = git_http_server.url_for(repo.path)
    config = load_config(write_config(tmp_path / "ws", {
        f"s{i}": {"upstream": url if i % 2 else url + "/", "current": "v1.0.0"} for i in range(6)}))
    sources = Sources(timeout=10)
    report = check(config, sources=sources, max_workers=6)
    assert [r.latest for r in report.results] == ["v1.0.0"] * 6
    assert sources.refs.requests == 1


def test_ref_cache_does_not_hold_an_asker_on_a_stuck_listing():
    release = threading.Event()

    def stuck(url, timeout):  # an ssh session whose server stops answering: no timeout of its own fires
        release.wait(30)
        raise RemoteError(f"{url}: gave up")

    cache = RefCache(timeout=0.2, lister=stuck)
    cache.prefetch(["ssh://127.0.0.1/x.git"])
    try:
        with pytest.raises(RemoteError, match="timed out"):
            cache.get("ssh://127.0.0.1/x.git")  # bounded by the cache's timeout, not the listing's
    finally:
        release.set()


def test_ref_cache_shares_an_error_too():
    calls = []

    def lister(url, timeout):
        calls.append(url)
        time.sleep(0.05)
        return ls_remote(url, timeout=timeout)

    cache = RefCache(timeout=2, lister=lister)
    url = f"http://127.0.0.1:{closed_port()}/x.git"
    errors = []

    def ask():
        try:
            cache.get(url)
        except RemoteError as e:
            errors.append(str(e))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(calls) == 1 and len(errors) == 4


def test_exit_code_10_when_an_update_is_available_and_0_when_current(tmp_path, git_http_server):
    repo = GitRepo.create(git_http_server.root / "n.git")
    repo.commit("zero")
    repo.tag("v1.0.0")
    repo.commit("one")
    repo.tag("v1.1.0")
    url = git_http_server.url_for(repo.path)
    old = write_config(tmp_path / "old", {"n": {"upstream": url, "current": "v1.0.0"}})
    new = write_config(tmp_path / "new", {"n": {"upstream": url, "current": "v1.1.0"}})
    assert run_check(old, "--exit-code").exit_code == 10
    assert run_check(old).exit_code == 0  # without --exit-code an update is not a failure
    assert run_check(new, "--exit-code").exit_code == 0


def test_table_output(tmp_path, git_http_server):
    repo = GitRepo.create(git_http_server.root / "n.git")
    repo.commit("one")
    repo.tag("v2.0.0")
    repo.tag("v3.0.0")
    config = write_config(tmp_path / "ws", {"nats": {"upstream": git_http_server.url_for(repo.path),
                                                     "current": "v2.0.0"}})
    result = run_check(config)
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["SUBSYSTEM", "CURRENT", "LATEST", "STATUS"]
    assert lines[1].split()[:3] == ["nats", "v2.0.0", "v2.0.0"]
    assert "up to date (major v3.0.0 held back)" in lines[1]


def test_named_subsystems_only_and_unknown_name_is_one_line(tmp_path, git_http_server):
    repo = GitRepo.create(git_http_server.root / "n.git")
    repo.commit("one")
    repo.tag("v1.0.0")
    url = git_http_server.url_for(repo.path)
    config = write_config(tmp_path / "ws", {"a": {"upstream": url}, "b": {"upstream": url}})
    result = run_check(config, "b", "--json")
    assert list(json.loads(result.stdout)) == ["b"]
    bad = run_check(config, "nope")
    assert bad.exit_code == 1
    assert bad.stderr.strip().count("\n") == 0 and "unknown subsystem 'nope'" in bad.stderr


def test_version_manifest_seed_schema_and_merge(tmp_path, git_http_server):
    repo = GitRepo.create(git_http_server.root / "n.git")
    c1 = repo.commit("one")
    repo.tag("v1.0.0", annotated=True)
    c2 = repo.commit("two")
    repo.tag("v1.1.0")
    url = git_http_server.url_for(repo.path)
    config = write_config(tmp_path / "ws", {
        "nats": {"upstream": url, "current": "v1.0.0"},
        "tip": {"upstream": url, "strategy": "commits", "current": c1},
    })
    assert run_check(config).exit_code == 0
    path = tmp_path / "ws" / VERSION_MANIFEST
    data = json.loads(path.read_text())
    assert set(data) == {"last_check", "subsystems"}
    assert data["subsystems"]["nats"] == {
        "name": "nats", "upstream_repo": url, "current_commit": c1, "current_tag": "v1.0.0",
        "latest_commit": c2, "latest_tag": "v1.1.0", "update_available": True,
        "last_updated": data["last_check"]}
    assert data["subsystems"]["tip"]["current_commit"] == c1
    assert data["subsystems"]["tip"]["latest_commit"] == c2 and data["subsystems"]["tip"]["latest_tag"] is None
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []

    # checking one subsystem keeps the other's entry; a failing upstream keeps its last good entry
    shutil.rmtree(repo.path)
    result = run_check(config, "nats")
    assert result.exit_code == 1
    after = json.loads(path.read_text())
    assert after["subsystems"]["tip"] == data["subsystems"]["tip"]
    kept = after["subsystems"]["nats"]
    assert kept["latest_tag"] == "v1.1.0" and "not a git repository" in kept["error"]


def test_unreadable_old_manifest_is_replaced(tmp_path, git_http_server):
    repo = GitRepo.create(git_http_server.root / "n.git")
    repo.commit("one")
    repo.tag("v1.0.0")
    cfg = load_config(write_config(tmp_path / "ws", {"n": {"upstream": git_http_server.url_for(repo.path)}}))
    path = tmp_path / "ws" / VERSION_MANIFEST
    path.write_text("{not json")
    written = write_version_manifest(path, check(cfg))
    assert json.loads(path.read_text()) == written and written["subsystems"]["n"]["latest_tag"] == "v1.0.0"


def test_local_paths_and_file_urls(tmp_path, monkeypatch):
    repo = GitRepo.create(tmp_path / "up" / "n.git")
    repo.commit("one")
    repo.tag("v1.0.0")
    commit = repo.commit("two")
    repo.tag("v1.1.0", annotated=True)
    config = write_config(tmp_path / "ws", {
        "path": {"upstream": str(repo.path), "current": "v1.0.0"},
        "url": {"upstream": f"file://{repo.path}", "current": "v1.0.0"},
        "relative": {"upstream": "../up/n.git", "current": "v1.0.0"},  # to the workspace, not the cwd
        "head": {"upstream": str(repo.path), "strategy": "commits"},
    })
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = run_check(config, "--json")
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["path"]["latest"] == out["url"]["latest"] == out["relative"]["latest"] == "v1.1.0"
    assert out["path"]["commit"] == commit
    assert out["head"]["latest"] == commit


def test_commits_errors_name_the_problem(tmp_path, git_http_server):
    repo = GitRepo.create(git_http_server.root / "n.git")
    repo.commit("one")
    url = git_http_server.url_for(repo.path)
    config = write_config(tmp_path / "ws", {
        "nobranch": {"upstream": url, "strategy": "commits", "branch": "release"},
        "notags": {"upstream": url},
    })
    result = run_check(config, "--json")
    out = json.loads(result.stdout)
    assert result.exit_code == 1
    assert "no branch 'release'" in out["nobranch"]["error"] and "main" in out["nobranch"]["error"]
    assert "no tags" in out["notags"]["error"]


def test_nothing_qualifies_says_why(tmp_path, git_http_server):
    repo = GitRepo.create(git_http_server.root / "n.git")
    repo.commit("one")
    repo.tag("v1.0.0-rc.1")
    repo.tag("nightly")
    config = write_config(tmp_path / "ws", {"n": {"upstream": git_http_server.url_for(repo.path)}})
    out = json.loads(run_check(config, "--json").stdout)
    assert "none of 2 tags qualifies" in out["n"]["error"] and "pre-releases left out" in out["n"]["error"]


def test_git_protocol_via_git_daemon(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git daemon needs the git binary (sync-tools itself does not)")
    repo = GitRepo.create(tmp_path / "up" / "n.git")
    repo.commit("one")
    repo.tag("v1.0.0")
    commit = repo.commit("two")
    repo.tag("v1.1.0", annotated=True)
    repo.many_tags([f"v0.{i}.0" for i in range(300)])
    with GitDaemon(tmp_path / "up") as daemon:
        refs = ls_remote(daemon.url_for(repo.path), timeout=10)
    assert refs.tags()["v1.1.0"] == commit
    assert len(refs.tags()) == 302 and refs.head_branch() == "main"


@pytest.fixture
def silent_server():
    """A loopback server that accepts connections and never answers them."""
    held: list[socket.socket] = []
    yield from serve_once(lambda conn: held.append(conn.dup()))  # the dup keeps it open, silent
    for conn in held:
        conn.close()


@pytest.mark.parametrize("scheme", ["git", "http"])
def test_a_silent_server_times_out(silent_server, scheme):
    started = time.monotonic()
    with pytest.raises(RemoteError, match="timed out"):
        ls_remote(f"{scheme}://127.0.0.1:{silent_server}/x.git", timeout=0.5)
    assert time.monotonic() - started < 5


def test_releases_strategy_lists_when_a_new_major_is_held_back(tmp_path, github_api, monkeypatch):
    s = github_api.state
    s.add_repo("o/r")
    for i, (tag, pre) in enumerate([("v1.0.0", False), ("v1.1.0", False), ("v1.2.0-rc.1", False),
                                    ("v1.2.0-beta.1", True), ("v2.0.0", False)]):
        s.add_release("o/r", tag, prerelease=pre, created_at=f"2026-01-0{i + 1}T00:00:00Z")
    monkeypatch.setenv("GITHUB_API_URL", github_api.url)
    config = write_config(tmp_path / "ws", {
        "manual": {"upstream": "o/r", "strategy": "releases", "current": "v1.0.0"},
        "auto": {"upstream": "git@github.com:o/r.git", "strategy": "releases", "current": "v1.0.0", "major": "auto"},
        "pre": {"upstream": "https://github.com/o/r", "strategy": "releases", "current": "v1.0.0",
                "prereleases": True},
        "missing": {"upstream": "o/nope", "strategy": "releases"},
    })
    result = run_check(config, "--json")
    out = json.loads(result.stdout)
    assert out["manual"]["latest"] == "v1.1.0" and out["manual"]["major_available"] == "v2.0.0"
    assert out["auto"]["latest"] == "v2.0.0"
    assert out["pre"]["latest"] == "v1.2.0-rc.1" and out["pre"]["major_available"] == "v2.0.0"
    assert "404" in out["missing"]["error"] and "o/nope" in out["missing"]["error"]
    assert result.exit_code == 1
    # the release list is read (no repository lookup first), never GitHub's releases/latest
    assert github_api.requests_to("GET", r"^/repos/o/r/releases$")
    assert not github_api.requests_to("GET", r"^/repos/o/r/releases/latest$")


def test_releases_strategy_picks_the_highest_version_not_the_last_published(tmp_path, github_api, monkeypatch):
    # GitHub's releases/latest would answer v2.9.25 (a backport published last) and does not know that
    # v2.11.0-rc.1, not flagged as a pre-release, is one
    s = github_api.state
    s.add_repo("o/r")
    for i, tag in enumerate(["v2.10.2", "v2.10.3", "v2.11.0-rc.1", "v2.9.25"]):
        s.add_release("o/r", tag, created_at=f"2026-01-0{i + 1}T00:00:00Z")
    monkeypatch.setenv("GITHUB_API_URL", github_api.url)
    config = write_config(tmp_path / "ws", {"nats": {"upstream": "o/r", "strategy": "releases",
                                                     "current": "v2.10.0"}})
    out = json.loads(run_check(config, "--json").stdout)
    assert out["nats"] == {"current": "v2.10.0", "latest": "v2.10.3", "update_available": True}


def test_releases_token_is_sent(tmp_path, monkeypatch):
    from tests.servers.github_api import GitHubAPIServer

    with GitHubAPIServer(token="sekrit") as server:
        server.state.add_repo("o/r")
        server.state.add_release("o/r", "v1.0.0")
        monkeypatch.setenv("GITHUB_API_URL", server.url)
        monkeypatch.setenv("GITHUB_TOKEN", "sekrit")
        config = write_config(tmp_path / "ws", {"r": {"upstream": "o/r", "strategy": "releases"}})
        out = json.loads(run_check(config, "--json").stdout)
        assert out["r"]["latest"] == "v1.0.0"
        assert all(r["authenticated"] for r in server.requests)


def test_console_script_end_to_end(tmp_path, git_http_server):
    repo = GitRepo.create(git_http_server.root / "n.git")
    repo.commit("one")
    repo.tag("v1.0.0")
    repo.tag("v1.1.0")
    config = write_config(tmp_path / "ws", {
        "n": {"upstream": git_http_server.url_for(repo.path), "current": "v1.0.0"}})
    exe = Path(sys.executable).parent / "sync-tools"
    p = subprocess.run([str(exe), "check", "--json", "--exit-code", "--config", str(config)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 10, p.stderr
    assert json.loads(p.stdout)["n"]["latest"] == "v1.1.0"
    assert p.stderr == ""


def test_releases_rate_limit_is_a_remote_error_with_retry_after(github_api, monkeypatch):
    from sync_tools.config import Subsystem
    from sync_tools.sources import find_latest

    github_api.state.add_repo("o/r")
    github_api.state.add_release("o/r", "v1.0.0")
    github_api.inject("GET", r"/releases$", status=403, headers={"Retry-After": "30"},
                      body={"message": "API rate limit exceeded",
                            "documentation_url": "https://docs.github.com/rest/rate-limit"})
    monkeypatch.setenv("GITHUB_API_URL", github_api.url)
    sub = Subsystem(name="r", upstream="o/r", strategy="releases")
    with pytest.raises(RemoteError, match="403.*rate limit") as info:
        find_latest(sub, Sources(timeout=5))
    assert info.value.status_code == 403 and info.value.retry_after == 30
    assert find_latest(sub, Sources(timeout=5)).latest == "v1.0.0"  # the fault was one answer


@pytest.mark.parametrize("url, words", [
    ("ftp://127.0.0.1/x.git", "unsupported scheme 'ftp'"),
    ("https://", "no host"),
    ("http://[::1/x.git", "not a valid URL"),
    ("http://127.0.0.1:99999/x.git", "not a valid URL"),
])
def test_urls_no_transport_can_use_are_refused_before_any_network(url, words):
    from sync_tools.errors import DataError

    with pytest.raises(DataError, match=re.escape(words)):
        ls_remote(url, timeout=1)


def test_check_of_git_upstreams_never_imports_pygithub_flask_or_cryptography(tmp_path):
    repo = GitRepo.create(tmp_path / "up" / "n.git")
    repo.commit("one")
    repo.tag("v1.0.0")
    config = write_config(tmp_path / "ws", {"n": {"upstream": str(repo.path)}})
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from sync_tools.cli import cli\n"
        f"r = CliRunner().invoke(cli, ['check', '--json', '--config', {str(config)!r}])\n"
        "assert r.exit_code == 0, r.output\n"
        "print(sorted(m for m in ('github', 'flask', 'cryptography', 'requests') if m in sys.modules))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[]"
