"""The GitHub API test server answers like api.github.com: endpoints, errors, pagination, faults, schemas."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from github import Auth, Github, GithubException

from tests.servers.github_api import (
    GitHubAPIServer,
    OpenAPIChecker,
    _openapi_to_jsonschema,
    github_api_fixture,  # noqa: F401 -- registers fixture `github_api`
)

REPO = "acme/widgets"
T = 5  # seconds: every request in these tests has a timeout


def _gh(server: GitHubAPIServer, token: str | None = None) -> Github:
    return Github(
        auth=Auth.Token(token) if token else None,
        base_url=server.url,
        timeout=T,
        retry=None,
        seconds_between_requests=None,
        seconds_between_writes=None,
    )


def _upload(server: GitHubAPIServer, release: dict, name: str, data: bytes, **kw: object) -> requests.Response:
    url = release["upload_url"].split("{", 1)[0]
    return requests.post(
        url, params={"name": name}, data=data, headers={"Content-Type": "application/octet-stream"}, timeout=T, **kw
    )


# ---------------------------------------------------------------- plain requests, endpoint by endpoint


def test_repo_and_not_found(github_api: GitHubAPIServer) -> None:
    github_api.state.add_repo(REPO)
    r = requests.get(f"{github_api.url}/repos/{REPO}", timeout=T)
    assert r.status_code == 200
    assert r.json()["full_name"] == REPO and r.json()["owner"]["login"] == "acme"
    missing = requests.get(f"{github_api.url}/repos/acme/nope", timeout=T)
    assert missing.status_code == 404
    assert missing.json()["message"] == "Not Found"
    assert "documentation_url" in missing.json()


def test_every_response_has_rate_limit_and_request_id_headers(github_api: GitHubAPIServer) -> None:
    github_api.state.add_repo(REPO)
    first = requests.get(f"{github_api.url}/repos/{REPO}", timeout=T)
    second = requests.get(f"{github_api.url}/repos/acme/nope", timeout=T)
    for r in (first, second):
        for h in ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "X-RateLimit-Used", "X-RateLimit-Resource"):
            assert h in r.headers, h
        assert r.headers["X-GitHub-Request-Id"]
    assert int(second.headers["X-RateLimit-Remaining"]) == int(first.headers["X-RateLimit-Remaining"]) - 1
    rl = requests.get(f"{github_api.url}/rate_limit", timeout=T).json()
    assert rl["resources"]["core"]["used"] == 2 and rl["rate"]["limit"] == 5000


def test_primary_rate_limit_exhaustion(github_api: GitHubAPIServer) -> None:
    github_api.state.add_repo(REPO)
    github_api.set_rate_limit(remaining=1, reset_in=60)
    last = requests.get(f"{github_api.url}/repos/{REPO}", timeout=T)
    assert last.status_code == 200 and last.headers["X-RateLimit-Remaining"] == "0"
    limited = requests.get(f"{github_api.url}/repos/{REPO}", timeout=T)
    assert limited.status_code == 403
    assert limited.json()["message"].startswith("API rate limit exceeded")
    assert limited.headers["X-RateLimit-Remaining"] == "0"
    assert 0 < int(limited.headers["X-RateLimit-Reset"]) - time.time() <= 61
    assert requests.get(f"{github_api.url}/rate_limit", timeout=T).json()["rate"]["remaining"] == 0


def test_release_lifecycle_with_plain_requests(github_api: GitHubAPIServer) -> None:
    github_api.state.add_repo(REPO)
    base = f"{github_api.url}/repos/{REPO}"
    created = requests.post(f"{base}/releases", json={"tag_name": "v1", "name": "one"}, timeout=T)
    assert created.status_code == 201
    rel = created.json()
    assert created.headers["Location"] == rel["url"]
    assert rel["upload_url"].startswith(f"{github_api.url}/uploads/repos/{REPO}/releases/{rel['id']}/assets")
    assert rel["upload_url"].endswith("{?name,label}")

    dup = requests.post(f"{base}/releases", json={"tag_name": "v1"}, timeout=T)
    assert dup.status_code == 422
    assert dup.json()["errors"] == [{"resource": "Release", "code": "already_exists", "field": "tag_name"}]

    assert requests.get(f"{base}/releases/{rel['id']}", timeout=T).json()["name"] == "one"
    assert requests.get(f"{base}/releases/tags/v1", timeout=T).json()["id"] == rel["id"]
    assert requests.get(f"{base}/releases/tags/v2", timeout=T).status_code == 404

    patched = requests.patch(f"{base}/releases/{rel['id']}", json={"name": "uno", "body": "notes"}, timeout=T)
    assert patched.status_code == 200 and patched.json()["name"] == "uno" and patched.json()["body"] == "notes"

    assert requests.delete(f"{base}/releases/{rel['id']}", timeout=T).status_code == 204
    assert requests.get(f"{base}/releases/{rel['id']}", timeout=T).status_code == 404


def test_latest_is_newest_non_draft_non_prerelease(github_api: GitHubAPIServer) -> None:
    s = github_api.state
    s.add_repo(REPO)
    base = f"{github_api.url}/repos/{REPO}"
    assert requests.get(f"{base}/releases/latest", timeout=T).status_code == 404
    s.add_release(REPO, "v1", created_at="2026-01-01T00:00:00Z")
    s.add_release(REPO, "v2", created_at="2026-02-01T00:00:00Z")
    s.add_release(REPO, "v3-rc1", prerelease=True, created_at="2026-03-01T00:00:00Z")
    s.add_release(REPO, "v4", draft=True, created_at="2026-04-01T00:00:00Z")
    assert requests.get(f"{base}/releases/latest", timeout=T).json()["tag_name"] == "v2"
    listed = requests.get(f"{base}/releases", timeout=T).json()
    assert [r["tag_name"] for r in listed] == ["v4", "v3-rc1", "v2", "v1"]
    assert listed[0]["published_at"] is None and listed[1]["published_at"] is not None


def test_upload_download_rename_delete_with_plain_requests(github_api: GitHubAPIServer) -> None:
    s = github_api.state
    s.add_repo(REPO)
    rel = s.add_release(REPO, "latest")
    up = _upload(github_api, rel, "a.tar.gz", b"0123456789")
    assert up.status_code == 201
    asset = up.json()
    assert asset["size"] == 10 and asset["state"] == "uploaded" and asset["digest"].startswith("sha256:")
    assert asset["browser_download_url"] == f"{github_api.url}/{REPO}/releases/download/latest/a.tar.gz"

    dup = _upload(github_api, rel, "a.tar.gz", b"other")
    assert dup.status_code == 422
    assert dup.json()["message"] == "Validation Failed"
    assert dup.json()["errors"] == [{"resource": "ReleaseAsset", "code": "already_exists", "field": "name"}]
    assert s.assets(REPO, "latest") == {"a.tar.gz": b"0123456789"}

    # browser_download_url: a redirect to storage, as on github.com, with Range support there.
    full = requests.get(asset["browser_download_url"], timeout=T)
    assert full.status_code == 200 and full.content == b"0123456789" and len(full.history) == 1
    part = requests.get(asset["browser_download_url"], headers={"Range": "bytes=4-"}, timeout=T)
    assert part.status_code == 206 and part.content == b"456789"
    assert part.headers["Content-Range"] == "bytes 4-9/10"

    api_asset = f"{github_api.url}/repos/{REPO}/releases/assets/{asset['id']}"
    assert requests.get(api_asset, timeout=T).json()["name"] == "a.tar.gz"
    raw = requests.get(api_asset, headers={"Accept": "application/octet-stream"}, allow_redirects=False, timeout=T)
    assert raw.status_code == 302
    assert requests.get(raw.headers["Location"], timeout=T).content == b"0123456789"

    listing = requests.get(f"{github_api.url}/repos/{REPO}/releases/{rel['id']}/assets", timeout=T).json()
    assert [a["name"] for a in listing] == ["a.tar.gz"]

    _upload(github_api, rel, "b.tar.gz", b"b")
    clash = requests.patch(api_asset, json={"name": "b.tar.gz"}, timeout=T)
    assert clash.status_code == 422 and clash.json()["errors"][0]["code"] == "already_exists"
    renamed = requests.patch(api_asset, json={"name": "c.tar.gz", "label": "C"}, timeout=T)
    assert renamed.status_code == 200 and renamed.json()["name"] == "c.tar.gz" and renamed.json()["label"] == "C"
    assert requests.get(asset["browser_download_url"], timeout=T).status_code == 404

    assert requests.delete(api_asset, timeout=T).status_code == 204
    assert requests.delete(api_asset, timeout=T).status_code == 404
    assert s.assets(REPO, "latest") == {"b.tar.gz": b"b"}


def test_pagination_follows_github(github_api: GitHubAPIServer) -> None:
    s = github_api.state
    s.add_repo(REPO)
    for i in range(5):
        s.add_release(REPO, f"v{i}", created_at=f"2026-01-0{i + 1}T00:00:00Z")
    base = f"{github_api.url}/repos/{REPO}/releases"
    page1 = requests.get(base, params={"per_page": 2}, timeout=T)
    assert [r["tag_name"] for r in page1.json()] == ["v4", "v3"]
    links = requests.utils.parse_header_links(page1.headers["Link"])
    by_rel = {link["rel"]: link["url"] for link in links}
    assert set(by_rel) == {"next", "last"}
    assert "page=3" in by_rel["last"]
    page3 = requests.get(by_rel["last"], timeout=T)
    assert [r["tag_name"] for r in page3.json()] == ["v0"]
    assert {link["rel"] for link in requests.utils.parse_header_links(page3.headers["Link"])} == {"prev", "first"}
    assert "Link" not in requests.get(base, timeout=T).headers


def test_tags(github_api: GitHubAPIServer) -> None:
    s = github_api.state
    s.add_repo(REPO)
    s.add_tag(REPO, "v1.0.0", "a" * 40)
    s.add_tag(REPO, "v1.1.0", "b" * 40)
    tags = requests.get(f"{github_api.url}/repos/{REPO}/tags", timeout=T).json()
    assert [(t["name"], t["commit"]["sha"]) for t in tags] == [("v1.1.0", "b" * 40), ("v1.0.0", "a" * 40)]


def test_dispatch_accepts_and_validates(github_api: GitHubAPIServer) -> None:
    github_api.state.add_repo(REPO)
    url = f"{github_api.url}/repos/{REPO}/dispatches"
    ok = requests.post(url, json={"event_type": "upstream-release", "client_payload": {"subsystem": "nats"}}, timeout=T)
    assert ok.status_code == 204 and ok.content == b""
    assert github_api.state.dispatches == [
        {
            "repo": REPO,
            "event_type": "upstream-release",
            "client_payload": {"subsystem": "nats"},
            "body": {"event_type": "upstream-release", "client_payload": {"subsystem": "nats"}},
        }
    ]
    for bad in (
        {"client_payload": {}},
        {"event_type": "x" * 101},
        {"event_type": "e", "client_payload": {str(i): i for i in range(11)}},
    ):
        r = requests.post(url, json=bad, timeout=T)
        assert r.status_code == 422, bad
        assert r.json()["message"].startswith("Invalid request.")
    assert requests.post(url, data=b"{not json", timeout=T).status_code == 400
    assert requests.post(f"{github_api.url}/repos/acme/nope/dispatches", json={"event_type": "e"}, timeout=T).status_code == 404
    assert len(github_api.state.dispatches) == 1


# ---------------------------------------------------------------- auth, faults, request log


def test_required_token() -> None:
    with GitHubAPIServer(token="s3cret") as server:
        server.state.add_repo(REPO)
        anon = requests.get(f"{server.url}/repos/{REPO}", timeout=T)
        assert anon.status_code == 401 and anon.json()["message"] == "Bad credentials"
        wrong = requests.get(f"{server.url}/repos/{REPO}", headers={"Authorization": "token nope"}, timeout=T)
        assert wrong.status_code == 401
        ok = requests.get(f"{server.url}/repos/{REPO}", headers={"Authorization": "Bearer s3cret"}, timeout=T)
        assert ok.status_code == 200
        assert [r["authenticated"] for r in server.requests] == [False, False, True]
        # The log keeps the scheme, never the secret.
        assert server.requests[2]["headers"]["Authorization"] == "Bearer <redacted>"
        assert "s3cret" not in json.dumps(server.requests)
        with pytest.raises(GithubException) as err:
            _gh(server).get_repo(REPO)
        assert err.value.status == 401
        assert _gh(server, "s3cret").get_repo(REPO).full_name == REPO
        assert server.schema_errors == [] and server.internal_errors == []


def test_injected_status_times_and_delay(github_api: GitHubAPIServer) -> None:
    github_api.state.add_repo(REPO)
    url = f"{github_api.url}/repos/{REPO}"
    fault = github_api.inject("GET", r"^/repos/acme/widgets$", status=502, times=2, headers={"Retry-After": "1"})
    assert requests.get(url, timeout=T).status_code == 502
    r = requests.get(url, timeout=T)
    assert r.status_code == 502 and r.headers["Retry-After"] == "1"
    assert requests.get(url, timeout=T).status_code == 200
    assert fault.hits == 2
    github_api.inject("GET", r"^/repos/", status=None, delay=1.0)
    with pytest.raises(requests.Timeout):
        requests.get(url, timeout=0.2)


def test_injected_reset_cuts_upload(github_api: GitHubAPIServer) -> None:
    github_api.state.add_repo(REPO)
    rel = github_api.state.add_release(REPO, "latest")
    github_api.inject("POST", r"/assets$", reset=True)
    with pytest.raises(requests.ConnectionError):
        _upload(github_api, rel, "big.bin", b"x" * 200_000)
    assert github_api.state.assets(REPO, "latest") == {}
    assert github_api.requests[-1]["status"] == "reset"
    assert _upload(github_api, rel, "big.bin", b"x" * 10).status_code == 201


def test_hooks_see_state_between_requests(github_api: GitHubAPIServer) -> None:
    github_api.state.add_repo(REPO)
    rel = github_api.state.add_release(REPO, "latest")
    seen: list[tuple[str, list[str]]] = []
    github_api.hooks.append(lambda e: seen.append((e["method"], sorted(github_api.state.assets(REPO, "latest")))))
    _upload(github_api, rel, "a", b"1")
    _upload(github_api, rel, "b", b"2")
    assert seen == [("POST", ["a"]), ("POST", ["a", "b"])]


# ---------------------------------------------------------------- PyGithub against the server


def test_pygithub_release_flow(github_api: GitHubAPIServer, tmp_path: Path) -> None:
    github_api.state.add_repo(REPO)
    repo = _gh(github_api).get_repo(REPO)
    rel = repo.create_git_release("latest", "rolling", "all subsystems")
    f = tmp_path / "nats-server-linux-amd64.tar.gz"
    f.write_bytes(b"tarball")
    asset = rel.upload_asset(str(f), name=f.name, content_type="application/gzip")
    assert asset.size == 7 and asset.name == f.name
    with pytest.raises(GithubException) as dup:
        rel.upload_asset(str(f), name=f.name)
    assert dup.value.status == 422
    assert dup.value.data["errors"][0]["code"] == "already_exists"

    asset.update_asset(name="renamed.tar.gz")
    assert [a.name for a in repo.get_release("latest").get_assets()] == ["renamed.tar.gz"]
    assert repo.get_latest_release().tag_name == "latest"
    assert repo.get_release(rel.id).name == "rolling"
    assert asset.delete_asset() is True
    assert list(repo.get_release("latest").get_assets()) == []

    repo.create_repository_dispatch("upstream-release", {"subsystem": "nats", "version": "v2.10.25"})
    assert github_api.state.dispatches[-1]["client_payload"]["version"] == "v2.10.25"

    rel.update_release(name="rolling-2", message="updated")
    assert repo.get_release("latest").name == "rolling-2"
    rel.delete_release()
    assert github_api.state.releases(REPO) == []


def test_pygithub_pages_through_assets(github_api: GitHubAPIServer) -> None:
    s = github_api.state
    s.add_repo(REPO)
    s.add_release(REPO, "latest")
    for i in range(7):
        s.add_asset(REPO, "latest", f"a{i}", bytes([i]))
    g = Github(base_url=github_api.url, per_page=3, timeout=T, seconds_between_requests=None, seconds_between_writes=None)
    names = [a.name for a in g.get_repo(REPO).get_release("latest").get_assets()]
    assert names == [f"a{i}" for i in range(7)]
    assert len(github_api.requests_to("GET", r"/releases/\d+/assets$")) == 3


# ---------------------------------------------------------------- schema checking


def test_schema_check_catches_a_wrong_body() -> None:
    checker = OpenAPIChecker()
    path = "/repos/{owner}/{repo}/releases/assets/{asset_id}"
    with GitHubAPIServer() as server:
        server.state.add_repo(REPO)
        server.state.add_release(REPO, "latest")
        good = server.state.add_asset(REPO, "latest", "a", b"1")
    assert checker.check("GET", path, 200, good) == []
    wrong = dict(good, size="1")  # a string where GitHub sends an integer
    del wrong["browser_download_url"]
    errors = checker.check("GET", path, 200, wrong)
    assert any("'1' is not of type 'integer'" in e for e in errors)
    assert any("'browser_download_url' is a required property" in e for e in errors)
    # nullable fields accept null, non-nullable ones do not
    assert checker.check("GET", path, 200, dict(good, label=None)) == []
    assert checker.check("GET", path, 200, dict(good, name=None)) != []
    # an undocumented error status is still held to GitHub's error shape
    assert checker.check("GET", "/repos/{owner}/{repo}/tags", 404, {"message": 404}) != []


def test_server_records_a_schema_violation() -> None:
    with GitHubAPIServer() as server:
        server.state.add_repo(REPO)
        rel = server.state.add_release(REPO, "latest")
        server.state.add_asset(REPO, "latest", "a", b"1")
        # Corrupt the stored record the way a handler bug would: the answer no longer fits the schema.
        with server.state.lock:
            next(iter(server.state._assets.values()))["content_type"] = None
        r = requests.get(f"{server.url}/repos/{REPO}/releases/{rel['id']}/assets", timeout=T)
        assert r.status_code == 200
    assert server.schema_errors
    assert "content_type" in server.schema_errors[0]


def test_nullable_conversion() -> None:
    assert _openapi_to_jsonschema({"type": "string", "nullable": True}) == {"type": ["string", "null"]}
    assert _openapi_to_jsonschema({"type": "string", "enum": ["a"], "nullable": True}) == {
        "type": ["string", "null"],
        "enum": ["a", None],
    }
    assert _openapi_to_jsonschema({"allOf": [{"$ref": "#/x"}], "nullable": True}) == {
        "anyOf": [{"allOf": [{"$ref": "#/x"}]}, {"type": "null"}]
    }


def test_fixture_fails_the_test_at_teardown_on_a_schema_violation(tmp_path: Path) -> None:
    """A test whose server answered outside GitHub's schemas fails, even though its own asserts pass."""
    test_file = tmp_path / "test_bad_body.py"
    test_file.write_text(
        "import requests\n"
        "from tests.servers.github_api import github_api_fixture  # noqa: F401\n"
        "def test_corrupt(github_api):\n"
        "    github_api.state.add_repo('o/r')\n"
        "    rel = github_api.state.add_release('o/r', 'v1')\n"
        "    with github_api.state.lock:\n"
        "        github_api.state._releases[rel['id']]['draft'] = 'yes'\n"
        "    url = f\"{github_api.url}/repos/o/r/releases/{rel['id']}\"\n"
        "    assert requests.get(url, timeout=5).status_code == 200\n"
    )
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--color=no", "-p", "no:cacheprovider", "--rootdir", str(root), str(test_file)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "1 passed, 1 error" in proc.stdout
    assert "draft: 'yes' is not of type 'boolean'" in proc.stdout


def test_every_route_is_an_operation_of_the_subset() -> None:
    from tests.servers.github_api import _ROUTES

    doc = OpenAPIChecker().doc
    implemented = {(m.lower(), spec) for _, methods, _, spec in _ROUTES if spec for m in methods}
    in_subset = {(m, p) for p, item in doc["paths"].items() for m in item if m != "parameters"}
    assert implemented == in_subset
    assert doc["info"]["x-source"] == {"package": "@octokit/openapi", "version": "23.0.2", "file": "generated/api.github.com.json"}


def test_extractor_follows_references_recursively() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
    try:
        import extract_openapi_subset as ex
    finally:
        sys.path.pop(0)
    ref = {"$ref": "#/components/schemas/a"}
    description = {
        "openapi": "3.0.3",
        "info": {"title": "t", "version": "1"},
        "paths": {
            "/x": {"get": {"responses": {"200": {"content": {"application/json": {"schema": ref, "examples": {"e": {}}}}}}}},
            "/unused": {"get": {"responses": {"200": {"$ref": "#/components/responses/r"}}}},
        },
        "components": {
            "schemas": {
                "a": {"type": "object", "properties": {"b": {"$ref": "#/components/schemas/b"}}, "example": {}},
                "b": {"type": "string"},
                "unused": {"type": "string"},
                "basic-error": {"type": "object"},
                "validation-error": {"type": "object"},
            },
            "responses": {"r": {"description": "r"}},
        },
    }
    subset = ex.extract(description, (("get", "/x"),))
    assert list(subset["paths"]) == ["/x"]
    assert set(subset["components"]["schemas"]) == {"a", "b", "basic-error", "validation-error"}
    assert "example" not in subset["components"]["schemas"]["a"]
    assert "examples" not in subset["paths"]["/x"]["get"]["responses"]["200"]["content"]["application/json"]
    description["components"]["schemas"]["b"] = {"$ref": "#/components/schemas/missing"}
    with pytest.raises(KeyError):
        ex.extract(description, (("get", "/x"),))
