"""The GitHub test double against recorded real GitHub traffic (tests/fixtures/octokit/).

For every recorded request that sync-tools makes (releases, release assets on both hosts, lists and
their Link headers, a renamed repository), the double (tests/servers/github_api.py) is sent the same
request, in the recorded order and from the same starting state, and must answer with the recorded
status, the headers that matter (Content-Type, Location, Link, X-RateLimit-*, X-GitHub-Media-Type,
X-GitHub-Request-Id), a body of the same shape (every recorded member present with the same JSON
type, lists of the same length) and the same values where values are the behaviour (names, labels,
sizes, states, error members, every URL once GitHub's hosts and ids are mapped to the double's).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import requests

from sync_tools.stores.github import GitHubStore
from tests.servers.github_api import (
    GitHubAPIServer,
    github_api_fixture,  # noqa: F401 -- registers fixture `github_api`
)
from tests.servers.github_replay import API, RECORDINGS, UPLOADS, WEB, Exchange, load_recording

T = 10
# Members whose values are GitHub's behaviour for these requests (outside user objects).
VALUE_KEYS = {"tag_name", "name", "label", "size", "content_type", "state", "draft", "prerelease", "message",
              "errors", "documentation_url", "body", "full_name"}
# Nested objects describing a user: their shape is compared, their values are an account's.
USER_KEYS = {"author", "uploader", "owner", "organization"}
_RATE = re.compile(r"^x-ratelimit-")
_REQUEST_ID = re.compile(r"^[0-9A-F]{1,4}:[0-9A-F]{1,4}:[0-9A-F]{1,8}:[0-9A-F]{1,8}:[0-9A-F]{8}$")
_NUMBERED = re.compile(r"/(releases|assets|repositories)/([0-9]+)")


class Mapping:
    """Recorded ids and hosts -> the double's, learnt while walking a scenario."""

    def __init__(self, base: str):
        self.base = base
        self.ids: dict[int, int] = {}

    def learn(self, recorded: Any, sent: Any) -> None:
        if isinstance(recorded, dict) and isinstance(sent, dict):
            if isinstance(recorded.get("id"), int) and isinstance(sent.get("id"), int):
                self.ids[recorded["id"]] = sent["id"]
            for k, v in recorded.items():
                if k not in USER_KEYS and k in sent:
                    self.learn(v, sent[k])
        elif isinstance(recorded, list) and isinstance(sent, list):
            for a, b in zip(recorded, sent, strict=False):
                self.learn(a, b)

    def path(self, recorded_path: str) -> str:
        return _NUMBERED.sub(lambda m: f"/{m.group(1)}/{self.ids.get(int(m.group(2)), int(m.group(2)))}", recorded_path)

    def url(self, recorded_url: str) -> str:
        host = self.base.split("://", 1)[1].split(":")[0]
        u = recorded_url.replace(UPLOADS, self.base + "/uploads").replace(API, self.base).replace(WEB, self.base)
        u = u.replace("git://github.com/", f"git://{host}/").replace("git@github.com:", f"git@{host}:")
        return self.path(u)


def shape_diff(recorded: Any, sent: Any, where: str = "") -> list[str]:
    """How *sent* differs in shape from *recorded*: missing members, other JSON types, list lengths."""
    if isinstance(recorded, dict):
        if not isinstance(sent, dict):
            return [f"{where or '<root>'}: an object recorded, {type(sent).__name__} sent"]
        out = []
        for k, v in recorded.items():
            if k not in sent:
                out.append(f"{where}/{k}: recorded, not sent")
            else:
                out += shape_diff(v, sent[k], f"{where}/{k}")
        return out
    if isinstance(recorded, list):
        if not isinstance(sent, list):
            return [f"{where or '<root>'}: a list recorded, {type(sent).__name__} sent"]
        out = [] if len(recorded) == len(sent) else [f"{where}: {len(recorded)} items recorded, {len(sent)} sent"]
        for a, b in zip(recorded, sent, strict=False):
            out += shape_diff(a, b, f"{where}[]")
        return out
    if type(recorded) is not type(sent):
        return [f"{where}: {type(recorded).__name__} recorded, {type(sent).__name__} sent"]
    return []


def value_diff(recorded: Any, sent: Any, m: Mapping, where: str = "") -> list[str]:
    """Members of VALUE_KEYS and every URL that differ once hosts and ids are mapped."""
    out: list[str] = []
    if isinstance(recorded, dict) and isinstance(sent, dict):
        for k, v in recorded.items():
            if k not in sent or k in USER_KEYS:
                continue
            got = sent[k]
            if k in VALUE_KEYS or k == "url" or k.endswith("_url"):
                want = m.url(v) if isinstance(v, str) and (k == "url" or k.endswith("_url")) else v
                if want != got:
                    out.append(f"{where}/{k}: recorded {want!r}, sent {got!r}")
            else:
                out += value_diff(v, got, m, f"{where}/{k}")
    elif isinstance(recorded, list) and isinstance(sent, list):
        for a, b in zip(recorded, sent, strict=False):
            out += value_diff(a, b, m, f"{where}[]")
    return out


def _ct(value: str | None) -> str | None:
    return None if value is None else value.replace(" ", "").lower()


def header_diff(e: Exchange, resp: requests.Response, m: Mapping) -> list[str]:
    """The headers that matter, recorded vs sent."""
    out = []
    if _ct(e.header("Content-Type")) != _ct(resp.headers.get("Content-Type")):
        out.append(f"Content-Type: recorded {e.header('Content-Type')!r}, sent {resp.headers.get('Content-Type')!r}")
    rec_loc, got_loc = e.header("Location"), resp.headers.get("Location")
    if (rec_loc and m.url(rec_loc)) != got_loc:
        out.append(f"Location: recorded {rec_loc!r} (here {rec_loc and m.url(rec_loc)!r}), sent {got_loc!r}")
    if (e.header("Link") is None) != ("Link" not in resp.headers):
        out.append(f"Link: recorded {e.header('Link')!r}, sent {resp.headers.get('Link')!r}")
    rec_rate = {k for k in e.header_names() if _RATE.match(k)}
    got_rate = {k.lower() for k in resp.headers if _RATE.match(k.lower())}
    if rec_rate != got_rate:
        out.append(f"rate-limit headers: recorded {sorted(rec_rate)}, sent {sorted(got_rate)}")
    for k in got_rate & rec_rate:
        rec_v, got_v = e.header(k) or "", resp.headers[k]
        if rec_v.isdigit() != got_v.isdigit() or (not rec_v.isdigit() and rec_v != got_v):
            out.append(f"{k}: recorded {rec_v!r}, sent {got_v!r}")
    if e.header("X-GitHub-Media-Type") != resp.headers.get("X-GitHub-Media-Type"):
        out.append(f"X-GitHub-Media-Type: recorded {e.header('X-GitHub-Media-Type')!r}, sent {resp.headers.get('X-GitHub-Media-Type')!r}")
    rid = resp.headers.get("X-GitHub-Request-Id", "")
    if not _REQUEST_ID.match(rid) or not _REQUEST_ID.match(e.header("X-GitHub-Request-Id") or ""):
        out.append(f"X-GitHub-Request-Id: recorded {e.header('X-GitHub-Request-Id')!r}, sent {rid!r}")
    return out


def send(server: GitHubAPIServer, e: Exchange, m: Mapping) -> requests.Response:
    """Exchange *e*'s request, to the double (the uploads host is the double's ``/uploads``)."""
    url = (server.url + "/uploads" if e.host == "uploads.github.com" else server.url) + m.path(e.path)
    headers = {"Accept": e.request_headers.get("accept", "application/vnd.github+json")}
    if "content-type" in e.request_headers:
        headers["Content-Type"] = e.request_headers["content-type"]
    body = e.request_body
    data = b"" if body in ("", None) else body.encode() if isinstance(body, str) else json.dumps(body).encode()
    return requests.request(e.method, url, data=data or None, headers=headers, timeout=T, allow_redirects=False)


def check(server: GitHubAPIServer, e: Exchange, m: Mapping, resp: requests.Response | None = None) -> list[str]:
    """Everything that differs between the recorded answer to *e* and the double's."""
    resp = resp if resp is not None else send(server, e, m)
    where = f"#{e.index} {e.method} {e.path}"
    if resp.status_code != e.status:
        return [f"{where}: status recorded {e.status}, sent {resp.status_code}: {resp.text[:200]}"]
    sent = resp.json() if resp.content else ""
    m.learn(e.body, sent)
    problems = header_diff(e, resp, m) + shape_diff(e.body, sent) + value_diff(e.body, sent, m)
    return [f"{where}: {p}" for p in problems]


def _repo_of(exchanges: list[Exchange]) -> str:
    return exchanges[0].body["full_name"]  # the scenario's setup created its repository


def _walk(server: GitHubAPIServer, scenario: str, indexes: list[int]) -> tuple[list[str], list[Exchange]]:
    ex = load_recording(scenario)
    server.state.add_repo(_repo_of(ex))
    m = Mapping(server.url)
    problems = []
    for i in indexes:
        problems += check(server, ex[i], m)
    return problems, ex


# ----------------------------------------------------------------------------------- the copies


def test_recordings_are_the_published_copies() -> None:
    source = json.loads((RECORDINGS / "SOURCE.json").read_text())
    assert source["package"] == "@octokit/fixtures" and re.fullmatch(r"\d+\.\d+\.\d+", source["version"])
    for name, meta in source["files"].items():
        assert hashlib.sha256((RECORDINGS / name).read_bytes()).hexdigest() == meta["sha256"], name
    assert sorted(p.name for p in Path(RECORDINGS).glob("*.json") if p.name != "SOURCE.json") == sorted(source["files"])


# ------------------------------------------------------------------------------ release assets


def test_release_assets_answer_as_github_did(github_api: GitHubAPIServer) -> None:
    # create the release (201 + Location), get it by tag, upload on the uploads host (201, no
    # rate-limit headers), list, get the asset, rename it with PATCH, delete it (204)
    problems, ex = _walk(github_api, "release-assets", [2, 3, 4, 5, 6, 7, 8])
    assert problems == []
    assert [(e.method, e.host, e.status) for e in ex[2:9]] == [
        ("POST", "api.github.com", 201), ("GET", "api.github.com", 200), ("POST", "uploads.github.com", 201),
        ("GET", "api.github.com", 200), ("GET", "api.github.com", 200), ("PATCH", "api.github.com", 200),
        ("DELETE", "api.github.com", 204)]
    assert github_api.state.assets(_repo_of(ex), "v1.0.0") == {}


def test_upload_conflict_answers_as_github_did(github_api: GitHubAPIServer) -> None:
    # an upload under a name the release has: 422 already_exists from the uploads host, with its
    # request id in the body; then list, delete and upload again (201)
    problems, ex = _walk(github_api, "release-assets-conflict", [2, 3, 4, 5, 6, 7, 8])
    assert problems == []
    conflict = ex[5]
    assert conflict.status == 422 and conflict.body["errors"] == [{"resource": "ReleaseAsset", "code": "already_exists", "field": "name"}]
    assert conflict.body["request_id"] == conflict.header("X-GitHub-Request-Id")
    answers = github_api.requests_to("POST", r"^/uploads/")
    assert [a["status"] for a in answers] == [201, 422, 201]
    assert github_api.state.assets(_repo_of(ex), "v1.0.0") == {"test-upload.txt": b"Hello, world!\n"}


def test_the_uploads_hosts_422_carries_its_request_id(github_api: GitHubAPIServer) -> None:
    _walk(github_api, "release-assets-conflict", [2, 3, 4])
    rel = github_api.state.releases(_repo_of(load_recording("release-assets-conflict")))[0]
    url = rel["upload_url"].split("{")[0]
    dup = requests.post(url, params={"name": "test-upload.txt"}, data=b"x", headers={"Content-Type": "text/plain"}, timeout=T)
    assert dup.status_code == 422
    assert dup.json()["request_id"] == dup.headers["X-GitHub-Request-Id"]
    assert "status" not in dup.json()


def test_a_validation_error_has_githubs_shape(github_api: GitHubAPIServer) -> None:
    # errors: a 422 of api.github.com (a label with a bad colour). The double's 422 for a release
    # without a tag has the same members, types and headers.
    e = load_recording("errors")[1]
    github_api.state.add_repo("o/r")
    resp = requests.post(f"{github_api.url}/repos/o/r/releases", json={"name": "x"}, timeout=T)
    assert resp.status_code == e.status == 422
    assert shape_diff(e.body, resp.json()) == []
    assert header_diff(e, resp, Mapping(github_api.url)) == []
    assert resp.json()["message"] == e.body["message"] == "Validation Failed"


# Members of a repository GitHub sends only to an authenticated caller with admin rights (the
# recording's token), or only for an organisation's repository, and the repository's own topics.
# sync-tools reads none of them; the double serves the anonymous view of a user's repository.
CALLER_DEPENDENT = {"/permissions", "/temp_clone_token", "/allow_squash_merge", "/allow_merge_commit",
                    "/allow_rebase_merge", "/allow_auto_merge", "/delete_branch_on_merge", "/allow_update_branch",
                    "/use_squash_pr_title_as_default", "/organization", "/topics"}


def _outside_caller_dependent(problems: list[str]) -> list[str]:
    return [p for p in problems if p.split(": ")[1] not in CALLER_DEPENDENT]


def test_get_repository_has_githubs_shape(github_api: GitHubAPIServer) -> None:
    ex = load_recording("get-repository")
    github_api.state.add_repo(ex[0].body["full_name"])
    problems = check(github_api, ex[0], Mapping(github_api.url))
    assert _outside_caller_dependent(problems) == []
    assert len(problems) == len(CALLER_DEPENDENT)  # each of them is the difference, and nothing else


# ---------------------------------------------------------------------------------- pagination


def _links(header: str) -> list[tuple[str, str, dict[str, str]]]:
    """(rel, path with the repository id as {id}, query) of each link, in order."""
    out = []
    for part in header.split(", "):
        url, rel = re.fullmatch(r'<([^>]+)>; rel="(\w+)"', part).groups()  # type: ignore[union-attr]
        path, _, query = url.partition("?")
        path = re.sub(r"^https?://[^/]+", "", path)
        path = re.sub(r"^/repositories/[0-9]+/", "/repositories/{id}/", path)
        out.append((rel, path, dict(q.split("=", 1) for q in query.split("&"))))
    return out


def test_link_headers_page_like_githubs(github_api: GitHubAPIServer) -> None:
    # paginate-issues: 13 issues read 3 per page. GitHub's Link names the repository by id
    # (/repositories/{id}/...) whatever the request's form, rels in the order prev, next, last, first.
    ex = load_recording("paginate-issues")
    pages = [e for e in ex if e.method == "GET" and "per_page=3" in e.path]
    assert len(pages) == 5 and len(pages[0].body) == 3
    github_api.state.add_repo("o/r")
    for n in range(13):
        github_api.state.add_tag("o/r", f"v1.{n}.0", f"{n:040x}")
    repo_id = requests.get(f"{github_api.url}/repos/o/r", timeout=T).json()["id"]
    url: str | None = f"{github_api.url}/repos/o/r/tags?per_page=3"
    seen = []
    for recorded in pages:
        assert url is not None
        resp = requests.get(url, timeout=T)
        assert resp.status_code == 200 and len(resp.json()) == len(recorded.body)
        got, want = _links(resp.headers["Link"]), _links(recorded.header("Link") or "")
        assert [(rel, q) for rel, _, q in got] == [(rel, q) for rel, _, q in want]
        assert {p for _, p, _ in got} == {"/repositories/{id}/tags"} and {p for _, p, _ in want} == {"/repositories/{id}/issues"}
        assert all(f"/repositories/{repo_id}/tags?" in part for part in resp.headers["Link"].split(", "))
        seen += [t["name"] for t in resp.json()]
        url = next((u for rel, u in re.findall(r'<([^>]+)>; rel="(\w+)"', resp.headers["Link"])[::-1] if rel == "next"), None)
        url = dict((rel, u) for u, rel in re.findall(r'<([^>]+)>; rel="(\w+)"', resp.headers["Link"])).get("next")
    assert url is None and len(seen) == len(set(seen)) == 13


# ----------------------------------------------------------------------------------- redirects


def test_a_renamed_repository_redirects_as_github_does(github_api: GitHubAPIServer) -> None:
    # rename-repository: GET of the old name is a 301, PATCH a 307, both to /repositories/{id}
    ex = load_recording("rename-repository")
    old = ex[0].body["full_name"]
    new = ex[1].body["full_name"]
    github_api.state.add_repo(old)
    created = requests.get(f"{github_api.url}/repos/{old}", timeout=T).json()
    github_api.state.rename_repo(old, new)
    m = Mapping(github_api.url)
    m.ids[ex[0].body["id"]] = created["id"]
    get_old, by_id, patch_old = ex[2], ex[3], ex[4]
    assert (get_old.status, patch_old.status) == (301, 307)
    assert check(github_api, get_old, m) == []
    assert _outside_caller_dependent(check(github_api, by_id, m)) == []
    patch = requests.patch(f"{github_api.url}/repos/{old}", json=patch_old.request_body, timeout=T, allow_redirects=False)
    assert check(github_api, patch_old, m, patch) == []


def test_the_store_follows_a_renamed_release_repository(github_api: GitHubAPIServer, tmp_path: Path) -> None:
    # A release repository renamed after the config was written: PyGithub follows the 301 of the
    # repository lookup and the store works on under the new name.
    github_api.state.add_repo("o/old-name")
    github_api.state.add_release("o/old-name", "latest")
    github_api.state.rename_repo("o/old-name", "o/new-name")
    f = tmp_path / "a.tar.gz"
    f.write_bytes(b"payload")
    store = GitHubStore("o/old-name", "latest", base_url=github_api.url, timeout=5)
    store.upload_asset(f, "a.tar.gz")
    assert store.list_assets() == {"a.tar.gz": 7}
    assert github_api.state.assets("o/new-name", "latest") == {"a.tar.gz": b"payload"}
    assert [r["status"] for r in github_api.requests_to("GET", r"^/repos/o/old-name$")] == [301]
