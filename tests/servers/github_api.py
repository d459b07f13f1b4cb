"""A GitHub REST API test server on loopback that answers like api.github.com.

It implements the part of the API sync-tools uses -- repositories, releases, release assets (upload
through the release's ``upload_url``, download through ``browser_download_url`` with Range support),
tags, ``repository_dispatch`` and ``/rate_limit`` -- with GitHub's status codes, error bodies,
pagination (``per_page``/``page``/``Link``) and rate-limit headers. Every JSON body it sends is
validated against the response schema of the operation in GitHub's published OpenAPI description
(the subset in ``tests/fixtures/github-openapi/``); violations are collected in ``schema_errors`` and
the ``github_api`` fixture fails the test at teardown when there are any.

Where GitHub's behaviour is recorded (real traffic, tests/fixtures/octokit/), the server follows the
recording, and tests/test_github_recordings.py checks it does: the uploads host's answers carry no
rate-limit headers and its 422 ``already_exists`` body holds ``request_id``; 204s carry
``X-GitHub-Media-Type`` and no Content-Type; ``Link`` URLs name the repository by id
(``/repositories/{id}/...``, which is served too); a renamed repository's old name answers 301 (GET)
or 307 to ``/repositories/{id}`` (``state.rename_repo``).

Use it as a fixture::

    from tests.servers.github_api import github_api_fixture  # noqa: F401 -- fixture `github_api`

    def test_x(github_api):
        github_api.state.add_repo("o/r")
        client = Github(base_url=github_api.url)   # or GITHUB_API_URL=github_api.url

or as a context manager: ``with GitHubAPIServer(token="t") as server: ...`` (with a token, API
requests without ``Authorization: token t`` / ``Bearer t`` get 401 "Bad credentials").

State (``server.state``, thread-safe): ``add_repo``, ``add_release``, ``add_asset``, ``add_tag``,
``releases(repo)``, ``assets(repo, tag) -> {name: bytes}``, ``asset_records(repo, tag)``,
``dispatches`` (``{"repo", "event_type", "client_payload", "body"}`` per accepted dispatch).

Observation: ``server.requests`` (method, path, query, headers with the Authorization value redacted,
authenticated, status), ``server.requests_to(method, path_regex)``, and ``server.hooks``: callables run
with each log entry after the request is handled and before it is answered, so a test sees the state
between any two requests of a client.

Faults: ``server.inject("POST", r"/assets$", status=500)`` answers the next matching request with a
500 (``times``, ``headers``, ``body`` adjustable; a 403/429 with ``Retry-After`` is a secondary rate
limit); ``reset=True`` cuts the connection without an answer (after reading half of any request
body); ``delay=`` sleeps first (with ``status=None`` the request is then answered normally).
``server.clear_faults()`` forgets unused ones; ``server.set_rate_limit(remaining=0)`` exhausts the
primary rate limit (403 "API rate limit exceeded").

Downloads: ``browser_download_url`` (``{url}/{owner}/{repo}/releases/download/{tag}/{name}``) and the
asset API with ``Accept: application/octet-stream`` answer 302 to ``{url}/_storage/...``, which serves
the bytes with Range support (206), as github.com redirects to its object storage.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import hashlib
import json
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jsonschema
import pytest
import referencing
import referencing.jsonschema
from werkzeug.exceptions import ClientDisconnected, HTTPException
from werkzeug.routing import Map, Rule
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

SUBSET_PATH = Path(__file__).resolve().parent.parent / "fixtures/github-openapi/api.github.com.subset.json"
DOCS = "https://docs.github.com/rest"
RATE_LIMIT = 5000
_SCHEMA_URI = "urn:github-openapi-subset"


def _request_id() -> str:
    """An ``X-GitHub-Request-Id`` of GitHub's form (``0680:6A2B:1F51D12:39C6C95:62D635B4``)."""
    return ":".join(secrets.token_hex(n).upper()[:w] for n, w in ((2, 4), (2, 4), (4, 7), (4, 7), (4, 8)))


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _node_id(kind: str, ident: int) -> str:
    return base64.b64encode(f"0:{kind}{ident}".encode()).decode()


# --------------------------------------------------------------------------------------------------
# Schema checking against GitHub's OpenAPI description


def _openapi_to_jsonschema(node: Any) -> Any:
    """OpenAPI 3.0 schema objects as JSON Schema draft 4: ``nullable: true`` becomes a null branch."""
    if isinstance(node, list):
        return [_openapi_to_jsonschema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _openapi_to_jsonschema(v) for k, v in node.items() if k != "nullable"}
    if node.get("nullable") is True:
        if "type" in out and "$ref" not in out:
            types = out["type"] if isinstance(out["type"], list) else [out["type"]]
            out["type"] = [*types, "null"]
            if "enum" in out and None not in out["enum"]:
                out["enum"] = [*out["enum"], None]
        else:
            # A nullable $ref/allOf/oneOf: null or the schema as written.
            out = {"anyOf": [out, {"type": "null"}]}
    return out


class OpenAPIChecker:
    """Validates response bodies against the operations of the OpenAPI subset."""

    def __init__(self, path: Path = SUBSET_PATH):
        self.doc = json.loads(path.read_text())
        converted = {"components": _openapi_to_jsonschema(self.doc["components"])}
        resource = referencing.Resource.from_contents(converted, default_specification=referencing.jsonschema.DRAFT4)
        self._registry = referencing.Registry().with_resource(_SCHEMA_URI, resource)
        self._validators: dict[tuple[str, str, int], jsonschema.Draft4Validator | None] = {}
        self._lock = threading.Lock()

    def _response_schema(self, method: str, path: str, status: int) -> dict | None:
        op = self.doc["paths"][path][method.lower()]
        responses = op["responses"]
        resp = responses.get(str(status))
        if resp is None:
            # Statuses an operation does not list (401, 403, 404 on list endpoints...) still carry
            # GitHub's error body.
            if status >= 400:
                return {"$ref": "#/components/schemas/validation-error" if status == 422 else "#/components/schemas/basic-error"}
            return None
        if "$ref" in resp:
            name = resp["$ref"].rsplit("/", 1)[1]
            resp = self.doc["components"]["responses"][name]
        content = resp.get("content", {})
        media = content.get("application/json")
        if media is None:
            return {"not": {}} if content == {} and status in (204, 302) else None
        return media.get("schema")

    def validator(self, method: str, path: str, status: int) -> jsonschema.Draft4Validator | None:
        key = (method.lower(), path, status)
        with self._lock:
            if key not in self._validators:
                schema = self._response_schema(method, path, status)
                if schema is None or schema == {"not": {}}:
                    self._validators[key] = None
                else:
                    schema = _openapi_to_jsonschema(schema)
                    schema = json.loads(json.dumps(schema).replace('"#/components/', f'"{_SCHEMA_URI}#/components/'))
                    self._validators[key] = jsonschema.Draft4Validator(schema, registry=self._registry)
            return self._validators[key]

    def check(self, method: str, path: str, status: int, body: Any) -> list[str]:
        """Schema violations of *body* as the answer of ``method path`` with *status* (empty: valid)."""
        v = self.validator(method, path, status)
        if v is None:
            return []
        return [
            f"{method.upper()} {path} {status}: {'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in v.iter_errors(body)
        ]


_CHECKER: OpenAPIChecker | None = None
_CHECKER_LOCK = threading.Lock()


def openapi_checker() -> OpenAPIChecker:
    """The process-wide checker (loading the description once keeps each test fast)."""
    global _CHECKER
    with _CHECKER_LOCK:
        if _CHECKER is None:
            _CHECKER = OpenAPIChecker()
        return _CHECKER


# --------------------------------------------------------------------------------------------------
# State


class GitHubState:
    """Repositories, releases, assets, tags and received dispatches. Every method is thread-safe."""

    def __init__(self, server: GitHubAPIServer):
        self._server = server
        self.lock = threading.RLock()
        self._ids = 1000
        self._repos: dict[str, dict] = {}
        self._renamed: dict[str, dict] = {}  # old full name (lower case) -> repository
        self._releases: dict[int, dict] = {}
        self._assets: dict[int, dict] = {}
        self.dispatches: list[dict] = []

    # -- ids and lookups
    def _next_id(self) -> int:
        with self.lock:
            self._ids += 1
            return self._ids

    def _repo(self, repo: str) -> dict:
        try:
            return self._repos[repo.lower()]
        except KeyError:
            raise KeyError(f"no repository {repo!r}; call add_repo first") from None

    def _release_of(self, repo: str, release_id_or_tag: int | str) -> dict:
        r = self._repo(repo)
        for rel in self._releases.values():
            if rel["repo"] is not r:
                continue
            if isinstance(release_id_or_tag, int) and rel["id"] == release_id_or_tag:
                return rel
            if isinstance(release_id_or_tag, str) and rel["tag_name"] == release_id_or_tag:
                return rel
        raise KeyError(f"no release {release_id_or_tag!r} in {repo}")

    def _by_id(self, ident: int) -> dict | None:
        return next((r for r in self._repos.values() if r["id"] == ident), None)

    def _moved(self, full_name: str) -> dict | None:
        """The repository once called *full_name*, when it has been renamed since (else None)."""
        if full_name.lower() in self._repos:
            return None
        return self._renamed.get(full_name.lower())

    # -- helpers tests use
    def rename_repo(self, full_name: str, new_name: str) -> dict:
        """Rename repository *full_name* to *new_name* ("owner/name"): the old name then answers
        301 (GET/HEAD) or 307 to ``/repositories/{id}``, as GitHub does. Returns the new representation."""
        owner, _, name = new_name.partition("/")
        if not owner or not name or "/" in name:
            raise ValueError(f"repository must be 'owner/name', got {new_name!r}")
        with self.lock:
            r = self._repo(full_name)
            del self._repos[full_name.lower()]
            self._renamed[full_name.lower()] = r
            r["owner"], r["name"] = owner, name
            self._repos[new_name.lower()] = r
            return self.render_repo(r)

    def add_repo(self, full_name: str, *, private: bool = False, default_branch: str = "main") -> dict:
        """Create repository *full_name* ("owner/name"); returns its GET /repos representation."""
        owner, _, name = full_name.partition("/")
        if not owner or not name or "/" in name:
            raise ValueError(f"repository must be 'owner/name', got {full_name!r}")
        with self.lock:
            if full_name.lower() not in self._repos:
                self._repos[full_name.lower()] = {
                    "id": self._next_id(),
                    "owner": owner,
                    "name": name,
                    "private": private,
                    "default_branch": default_branch,
                    "created_at": _now(),
                    "tags": [],
                }
            return self.render_repo(self._repos[full_name.lower()])

    def add_release(
        self,
        repo: str,
        tag: str,
        *,
        name: str | None = None,
        prerelease: bool = False,
        draft: bool = False,
        target_commitish: str = "main",
        created_at: str | None = None,
        body: str | None = None,
    ) -> dict:
        """Create a release (and its tag, when missing); returns its API representation."""
        with self.lock:
            r = self._repo(repo)
            now = _now()
            rel = {
                "id": self._next_id(),
                "repo": r,
                "tag_name": tag,
                "name": name,
                "body": body,
                "draft": draft,
                "prerelease": prerelease,
                "target_commitish": target_commitish,
                "created_at": created_at or now,
                "published_at": None if draft else (created_at or now),
                "updated_at": now,
                "asset_ids": [],
            }
            self._releases[rel["id"]] = rel
            if not draft and tag not in {t["name"] for t in r["tags"]}:
                r["tags"].append({"name": tag, "sha": hashlib.sha1(f"{repo}:{tag}".encode()).hexdigest()})
            return self.render_release(rel)

    def add_asset(
        self, repo: str, release_id_or_tag: int | str, name: str, data: bytes, *, content_type: str = "application/octet-stream", label: str | None = None
    ) -> dict:
        """Attach asset *name* with *data* to a release; returns its API representation.

        Raises ValueError when the release already has an asset of that name (GitHub's 422)."""
        with self.lock:
            rel = self._release_of(repo, release_id_or_tag)
            if any(self._assets[a]["name"] == name for a in rel["asset_ids"]):
                raise ValueError(f"asset {name!r} already exists in release {rel['tag_name']}")
            return self.render_asset(self._create_asset(rel, name, data, content_type, label))

    def _create_asset(self, rel: dict, name: str, data: bytes, content_type: str, label: str | None) -> dict:
        now = _now()
        asset = {
            "id": self._next_id(),
            "release": rel,
            "name": name,
            "label": label,
            "content_type": content_type,
            "data": bytes(data),
            "created_at": now,
            "updated_at": now,
            "download_count": 0,
        }
        self._assets[asset["id"]] = asset
        rel["asset_ids"].append(asset["id"])
        return asset

    def _delete_asset(self, asset: dict) -> None:
        asset["release"]["asset_ids"].remove(asset["id"])
        del self._assets[asset["id"]]

    def add_tag(self, repo: str, name: str, sha: str) -> None:
        """Add (or move) tag *name* pointing at commit *sha*."""
        with self.lock:
            r = self._repo(repo)
            r["tags"] = [t for t in r["tags"] if t["name"] != name]
            r["tags"].append({"name": name, "sha": sha})

    def releases(self, repo: str) -> list[dict]:
        """The API representations of *repo*'s releases, newest first."""
        with self.lock:
            return [self.render_release(rel) for rel in self._sorted_releases(self._repo(repo))]

    def assets(self, repo: str, tag: str) -> dict[str, bytes]:
        """Asset name -> bytes of the release tagged *tag* (empty when there is no such release)."""
        with self.lock:
            try:
                rel = self._release_of(repo, tag)
            except KeyError:
                return {}
            return {self._assets[a]["name"]: self._assets[a]["data"] for a in rel["asset_ids"]}

    def asset_records(self, repo: str, tag: str) -> list[dict]:
        """The API representations of the release's assets, in upload order."""
        with self.lock:
            rel = self._release_of(repo, tag)
            return [self.render_asset(self._assets[a]) for a in rel["asset_ids"]]

    def _sorted_releases(self, r: dict) -> list[dict]:
        rels = [rel for rel in self._releases.values() if rel["repo"] is r]
        return sorted(rels, key=lambda rel: (rel["created_at"], rel["id"]), reverse=True)

    # -- representations (exactly the fields GitHub sends)
    def _user(self, login: str) -> dict:
        api = self._server.url
        ident = int(hashlib.sha1(login.encode()).hexdigest()[:6], 16)
        return {
            "login": login,
            "id": ident,
            "node_id": _node_id("User", ident),
            "avatar_url": f"{self._server.url}/avatars/{login}",
            "gravatar_id": "",
            "url": f"{api}/users/{login}",
            "html_url": f"{self._server.url}/{login}",
            "followers_url": f"{api}/users/{login}/followers",
            "following_url": f"{api}/users/{login}/following{{/other_user}}",
            "gists_url": f"{api}/users/{login}/gists{{/gist_id}}",
            "starred_url": f"{api}/users/{login}/starred{{/owner}}{{/repo}}",
            "subscriptions_url": f"{api}/users/{login}/subscriptions",
            "organizations_url": f"{api}/users/{login}/orgs",
            "repos_url": f"{api}/users/{login}/repos",
            "events_url": f"{api}/users/{login}/events{{/privacy}}",
            "received_events_url": f"{api}/users/{login}/received_events",
            "type": "User",
            "user_view_type": "public",
            "site_admin": False,
        }

    def render_repo(self, r: dict) -> dict:
        api = self._server.url
        full = f"{r['owner']}/{r['name']}"
        base = f"{api}/repos/{full}"
        html = f"{self._server.url}/{full}"
        return {
            "id": r["id"],
            "node_id": _node_id("Repository", r["id"]),
            "name": r["name"],
            "full_name": full,
            "private": r["private"],
            "owner": self._user(r["owner"]),
            "html_url": html,
            "description": None,
            "fork": False,
            "url": base,
            "forks_url": f"{base}/forks",
            "keys_url": f"{base}/keys{{/key_id}}",
            "collaborators_url": f"{base}/collaborators{{/collaborator}}",
            "teams_url": f"{base}/teams",
            "hooks_url": f"{base}/hooks",
            "issue_events_url": f"{base}/issues/events{{/number}}",
            "events_url": f"{base}/events",
            "assignees_url": f"{base}/assignees{{/user}}",
            "branches_url": f"{base}/branches{{/branch}}",
            "tags_url": f"{base}/tags",
            "blobs_url": f"{base}/git/blobs{{/sha}}",
            "git_tags_url": f"{base}/git/tags{{/sha}}",
            "git_refs_url": f"{base}/git/refs{{/sha}}",
            "trees_url": f"{base}/git/trees{{/sha}}",
            "statuses_url": f"{base}/statuses/{{sha}}",
            "languages_url": f"{base}/languages",
            "stargazers_url": f"{base}/stargazers",
            "contributors_url": f"{base}/contributors",
            "subscribers_url": f"{base}/subscribers",
            "subscription_url": f"{base}/subscription",
            "commits_url": f"{base}/commits{{/sha}}",
            "git_commits_url": f"{base}/git/commits{{/sha}}",
            "comments_url": f"{base}/comments{{/number}}",
            "issue_comment_url": f"{base}/issues/comments{{/number}}",
            "contents_url": f"{base}/contents/{{+path}}",
            "compare_url": f"{base}/compare/{{base}}...{{head}}",
            "merges_url": f"{base}/merges",
            "archive_url": f"{base}/{{archive_format}}{{/ref}}",
            "downloads_url": f"{base}/downloads",
            "issues_url": f"{base}/issues{{/number}}",
            "pulls_url": f"{base}/pulls{{/number}}",
            "milestones_url": f"{base}/milestones{{/number}}",
            "notifications_url": f"{base}/notifications{{?since,all,participating}}",
            "labels_url": f"{base}/labels{{/name}}",
            "releases_url": f"{base}/releases{{/id}}",
            "deployments_url": f"{base}/deployments",
            "created_at": r["created_at"],
            "updated_at": r["created_at"],
            "pushed_at": r["created_at"],
            "git_url": f"git://127.0.0.1/{full}.git",
            "ssh_url": f"git@127.0.0.1:{full}.git",
            "clone_url": f"{html}.git",
            "svn_url": html,
            "homepage": None,
            "size": 0,
            "stargazers_count": 0,
            "watchers_count": 0,
            "language": None,
            "has_issues": True,
            "has_projects": True,
            "has_downloads": True,
            "has_wiki": True,
            "has_pages": False,
            "has_discussions": False,
            "forks_count": 0,
            "mirror_url": None,
            "archived": False,
            "disabled": False,
            "open_issues_count": 0,
            "license": None,
            "allow_forking": True,
            "is_template": False,
            "web_commit_signoff_required": False,
            "topics": [],
            "visibility": "private" if r["private"] else "public",
            "forks": 0,
            "open_issues": 0,
            "watchers": 0,
            "default_branch": r["default_branch"],
            "network_count": 0,
            "subscribers_count": 0,
        }

    def download_url(self, asset: dict) -> str:
        rel, r = asset["release"], asset["release"]["repo"]
        return f"{self._server.url}/{r['owner']}/{r['name']}/releases/download/{rel['tag_name']}/{asset['name']}"

    def render_asset(self, a: dict) -> dict:
        r = a["release"]["repo"]
        return {
            "url": f"{self._server.url}/repos/{r['owner']}/{r['name']}/releases/assets/{a['id']}",
            "id": a["id"],
            "node_id": _node_id("ReleaseAsset", a["id"]),
            "name": a["name"],
            "label": a["label"],
            "uploader": self._user(r["owner"]),
            "content_type": a["content_type"],
            "state": "uploaded",
            "size": len(a["data"]),
            "digest": "sha256:" + hashlib.sha256(a["data"]).hexdigest(),
            "download_count": a["download_count"],
            "created_at": a["created_at"],
            "updated_at": a["updated_at"],
            "browser_download_url": self.download_url(a),
        }

    def render_release(self, rel: dict) -> dict:
        r = rel["repo"]
        full = f"{r['owner']}/{r['name']}"
        base = f"{self._server.url}/repos/{full}/releases/{rel['id']}"
        return {
            "url": base,
            "assets_url": f"{base}/assets",
            "upload_url": f"{self._server.url}/uploads/repos/{full}/releases/{rel['id']}/assets{{?name,label}}",
            "html_url": f"{self._server.url}/{full}/releases/tag/{rel['tag_name']}",
            "id": rel["id"],
            "author": self._user(r["owner"]),
            "node_id": _node_id("Release", rel["id"]),
            "tag_name": rel["tag_name"],
            "target_commitish": rel["target_commitish"],
            "name": rel["name"],
            "draft": rel["draft"],
            "immutable": False,
            "prerelease": rel["prerelease"],
            "created_at": rel["created_at"],
            "updated_at": rel["updated_at"],
            "published_at": rel["published_at"],
            "assets": [self.render_asset(self._assets[a]) for a in rel["asset_ids"]],
            "tarball_url": f"{self._server.url}/repos/{full}/tarball/{rel['tag_name']}",
            "zipball_url": f"{self._server.url}/repos/{full}/zipball/{rel['tag_name']}",
            "body": rel["body"],
        }

    def render_tag(self, r: dict, tag: dict) -> dict:
        full = f"{r['owner']}/{r['name']}"
        return {
            "name": tag["name"],
            "zipball_url": f"{self._server.url}/repos/{full}/zipball/refs/tags/{tag['name']}",
            "tarball_url": f"{self._server.url}/repos/{full}/tarball/refs/tags/{tag['name']}",
            "commit": {"sha": tag["sha"], "url": f"{self._server.url}/repos/{full}/commits/{tag['sha']}"},
            "node_id": _node_id("Ref", hash(tag["name"]) & 0xFFFFFF),
        }


# --------------------------------------------------------------------------------------------------
# Faults and the request log


@dataclasses.dataclass
class Fault:
    """An injected answer for requests matching *method* and *path_regex* (``re.search`` on the path)."""

    method: str
    path_regex: str
    status: int | None = 500
    times: int = 1
    headers: dict[str, str] | None = None
    body: Any = None
    delay: float = 0.0
    reset: bool = False
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return self.times > 0 and self.method in ("*", method.upper()) and re.search(self.path_regex, path) is not None


class _Reset(Exception):
    """Cut the connection without an answer."""


class _Answer(Exception):
    def __init__(self, response: Response):
        self.response = response


def _error(status: int, message: str, *, errors: list[dict] | None = None, docs: str = DOCS) -> Response:
    body: dict[str, Any] = {"message": message, "documentation_url": docs, "status": str(status)}
    if errors is not None:
        body["errors"] = errors
    return _json(body, status)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    resp = Response(json.dumps(body), status=status, content_type="application/json; charset=utf-8")
    resp.headers["X-GitHub-Media-Type"] = "github.v3; format=json"
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    resp.json_body = body  # type: ignore[attr-defined]  # what the schema check validates
    return resp


def _no_content() -> Response:
    """204 as GitHub sends it: X-GitHub-Media-Type and no Content-Type (recorded)."""
    resp = Response(status=204)
    del resp.headers["Content-Type"]
    resp.headers["X-GitHub-Media-Type"] = "github.v3; format=json"
    return resp


def _upload_error(request: Request, status: int, message: str, *, errors: list[dict] | None = None) -> Response:
    """An error of the uploads host, as recorded: its request id in the body, GitHub's generic
    documentation URL, no ``status`` member."""
    body: dict[str, Any] = {"message": message, "request_id": request.environ.get("github.request_id", ""),
                            "documentation_url": DOCS}
    if errors is not None:
        body["errors"] = errors
    return _json(body, status)


def _not_found(docs: str = DOCS) -> Response:
    return _error(404, "Not Found", docs=docs)


class _QuietHandler(WSGIRequestHandler):
    """No access log on stderr: the request log is ``server.requests``."""

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


# /repos/{owner}/{repo}[/rest] and /repositories/{id}[/rest]
_REPO_PATH = re.compile(r"^/(?:repos/(?P<owner>[^/]+)/(?P<name>[^/]+)|repositories/(?P<id>[0-9]+))(?P<rest>/.*)?$")

_ROUTES = [
    # (rule, methods, handler, OpenAPI path template or None)
    ("/rate_limit", ["GET"], "rate_limit", "/rate_limit"),
    ("/repos/<owner>/<repo>", ["GET"], "get_repo", "/repos/{owner}/{repo}"),
    ("/repos/<owner>/<repo>/releases", ["GET", "POST"], "releases", "/repos/{owner}/{repo}/releases"),
    ("/repos/<owner>/<repo>/releases/latest", ["GET"], "latest_release", "/repos/{owner}/{repo}/releases/latest"),
    ("/repos/<owner>/<repo>/releases/tags/<path:tag>", ["GET"], "release_by_tag", "/repos/{owner}/{repo}/releases/tags/{tag}"),
    ("/repos/<owner>/<repo>/releases/<int:release_id>", ["GET", "PATCH", "DELETE"], "release", "/repos/{owner}/{repo}/releases/{release_id}"),
    ("/repos/<owner>/<repo>/releases/<int:release_id>/assets", ["GET"], "release_assets", "/repos/{owner}/{repo}/releases/{release_id}/assets"),
    ("/uploads/repos/<owner>/<repo>/releases/<int:release_id>/assets", ["POST"], "upload_asset", "/repos/{owner}/{repo}/releases/{release_id}/assets"),
    ("/repos/<owner>/<repo>/releases/assets/<int:asset_id>", ["GET", "PATCH", "DELETE"], "asset", "/repos/{owner}/{repo}/releases/assets/{asset_id}"),
    ("/repos/<owner>/<repo>/tags", ["GET"], "tags", "/repos/{owner}/{repo}/tags"),
    ("/repos/<owner>/<repo>/dispatches", ["POST"], "dispatch", "/repos/{owner}/{repo}/dispatches"),
    ("/<owner>/<repo>/releases/download/<tag>/<name>", ["GET"], "browser_download", None),
    ("/_storage/<int:asset_id>/<name>", ["GET"], "storage", None),
]


class GitHubAPIServer:
    """The test server. ``url`` is its base (use as GITHUB_API_URL and PyGithub ``base_url``).

    Attributes: ``state`` (:class:`GitHubState`), ``requests`` (log of dicts: method, path, query,
    headers with the Authorization value redacted, authenticated, status), ``schema_errors``,
    ``internal_errors`` (handler crashes), ``hooks`` (callables run with each log entry after the
    request is handled and before it is answered: a test can observe the state between requests).
    """

    def __init__(self, token: str | None = None, *, check_schemas: bool = True):
        self.token = token
        self.url = ""
        self.state = GitHubState(self)
        self.requests: list[dict] = []
        self.schema_errors: list[str] = []
        self.internal_errors: list[str] = []
        self.hooks: list[Callable[[dict], None]] = []
        self._faults: list[Fault] = []
        self._faults_lock = threading.Lock()
        self._rate_limit = RATE_LIMIT
        self._rate_used = 0
        self._rate_reset = int(time.time()) + 3600
        self._rate_lock = threading.Lock()
        self._stopping = threading.Event()
        self._checker = openapi_checker() if check_schemas else None
        self._map = Map(
            [Rule(rule, methods=methods, endpoint=(handler, spec)) for rule, methods, handler, spec in _ROUTES],
            strict_slashes=False,
        )
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> GitHubAPIServer:
        self._server = make_server("127.0.0.1", 0, self._wsgi, threaded=True, request_handler=_QuietHandler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> GitHubAPIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults
    def inject(
        self,
        method: str,
        path_regex: str,
        *,
        status: int | None = 500,
        times: int = 1,
        headers: dict[str, str] | None = None,
        body: Any = None,
        delay: float = 0.0,
        reset: bool = False,
    ) -> Fault:
        """Answer the next *times* requests matching *method* ("*" for any) and *path_regex* with
        *status* (and *headers*/*body*), after sleeping *delay* seconds; ``reset`` closes the
        connection without an answer; ``status=None`` with a delay answers normally after the delay."""
        fault = Fault(method.upper(), path_regex, status, times, headers, body, delay, reset)
        with self._faults_lock:
            self._faults.append(fault)
        return fault

    def set_rate_limit(self, *, remaining: int, limit: int = RATE_LIMIT, reset_in: float = 3600) -> None:
        """Put the core rate limit at *remaining* of *limit*, resetting in *reset_in* seconds. At zero,
        API requests get GitHub's 403 "API rate limit exceeded" (secondary limits: inject a 403 or
        429 with ``Retry-After``)."""
        with self._rate_lock:
            self._rate_limit = limit
            self._rate_used = limit - remaining
            self._rate_reset = int(time.time() + reset_in)

    def clear_faults(self) -> None:
        """Forget every injected fault not used up yet."""
        with self._faults_lock:
            self._faults.clear()

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._faults_lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.times -= 1
                    fault.hits += 1
                    return fault
        return None

    def requests_to(self, method: str, path_regex: str) -> list[dict]:
        """Logged requests matching *method* and *path_regex*."""
        return [r for r in list(self.requests) if r["method"] == method.upper() and re.search(path_regex, r["path"])]

    # -- WSGI
    def _rate_headers(self) -> dict[str, str]:
        used = self._rate_used
        return {
            "X-RateLimit-Limit": str(self._rate_limit),
            "X-RateLimit-Remaining": str(max(0, self._rate_limit - used)),
            "X-RateLimit-Reset": str(self._rate_reset),
            "X-RateLimit-Used": str(used),
            "X-RateLimit-Resource": "core",
        }

    def _wsgi(self, environ: dict, start_response: Callable) -> Any:
        request = Request(environ)
        request_id = _request_id()
        environ["github.request_id"] = request_id
        headers = {k: v for k, v in request.headers.items()}
        auth = headers.get("Authorization")
        if auth is not None:
            headers["Authorization"] = auth.split(" ", 1)[0] + " <redacted>"
        entry = {
            "method": request.method,
            "path": request.path,
            "query": request.args.to_dict(),
            "headers": headers,
            "authenticated": self._authenticated(auth),
            "status": None,
            "request_id": request_id,
            "at": time.monotonic(),
        }
        self.requests.append(entry)
        try:
            response = self._dispatch(request, entry)
        except _Reset:
            entry["status"] = "reset"
            self._run_hooks(entry)
            self._reset_connection(environ)
            return []
        entry["status"] = response.status_code
        self._run_hooks(entry)
        response.headers["X-GitHub-Request-Id"] = request_id
        # uploads.github.com sends no rate-limit headers (recorded), except on a rate-limit answer
        if not request.path.startswith("/uploads/") or response.status_code in (403, 429):
            for k, v in self._rate_headers().items():
                response.headers.setdefault(k, v)
        return response(environ, start_response)

    def _run_hooks(self, entry: dict) -> None:
        for hook in list(self.hooks):
            try:
                hook(entry)
            except Exception as e:  # a failing observation fails the test at teardown
                self.internal_errors.append(f"hook {hook!r} failed on {entry['method']} {entry['path']}: {e!r}")

    def _reset_connection(self, environ: dict) -> None:
        # Read part of the body first so an upload is cut halfway, then close without an answer.
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length:
            try:
                environ["wsgi.input"].read(max(1, length // 2))
            except OSError:
                pass
        sock: socket.socket = environ["werkzeug.socket"]
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _authenticated(self, auth: str | None) -> bool:
        if auth is None or self.token is None:
            return False
        scheme, _, value = auth.partition(" ")
        return scheme.lower() in ("token", "bearer") and secrets.compare_digest(value.strip(), self.token)

    def _dispatch(self, request: Request, entry: dict) -> Response:
        fault = self._take_fault(request.method, request.path)
        if fault is not None:
            if fault.delay:
                self._stopping.wait(fault.delay)
            if fault.reset:
                raise _Reset
            if fault.status is not None:
                body = fault.body if fault.body is not None else {"message": "Server Error" if fault.status >= 500 else "Injected fault", "documentation_url": DOCS}
                resp = Response(
                    body if isinstance(body, bytes | str) else json.dumps(body),
                    status=fault.status,
                    content_type="application/json; charset=utf-8",
                )
                for k, v in (fault.headers or {}).items():
                    resp.headers[k] = v
                return resp
        path_info = request.path
        m = _REPO_PATH.match(path_info)
        if m is not None:
            with self.state.lock:
                if m.group("id") is not None:
                    r = self.state._by_id(int(m.group("id")))
                    if r is None:
                        return _not_found()
                    path_info = f"/repos/{r['owner']}/{r['name']}{m.group('rest') or ''}"
                elif (moved := self.state._moved(f"{m.group('owner')}/{m.group('name')}")) is not None:
                    return self._redirect(request, moved, m.group("rest") or "")
        adapter = self._map.bind_to_environ(request.environ)
        try:
            (handler, spec_path), args = adapter.match(path_info=path_info)
        except HTTPException as e:
            if e.code == 405:
                return _error(404, "Not Found")
            return _error(e.code or 404, "Not Found")
        response = self._answer(request, entry, handler, spec_path, args)
        if spec_path is not None and self._checker is not None and hasattr(response, "json_body"):
            self.schema_errors.extend(self._checker.check(request.method, spec_path, response.status_code, response.json_body))
        return response

    def _redirect(self, request: Request, r: dict, rest: str) -> Response:
        """A renamed repository's old name, as recorded (rename-repository): 301 for GET/HEAD, 307
        for other methods, to ``/repositories/{id}`` plus the rest of the path."""
        spent = self._spend_rate()
        if spent is not None:
            return spent
        location = f"{self.url}/repositories/{r['id']}{rest}"
        if request.query_string:
            location += "?" + request.query_string.decode()
        body = {"message": "Moved Permanently", "url": location, "documentation_url": "https://docs.github.com/v3/#http-redirects"}
        return _json(body, 301 if request.method in ("GET", "HEAD") else 307, headers={"Location": location})

    def _spend_rate(self) -> Response | None:
        """Count one request against the core limit; GitHub's 403 when it is spent."""
        with self._rate_lock:
            if self._rate_used >= self._rate_limit:
                # GitHub's primary rate limit answer (403; X-RateLimit-Remaining: 0).
                return _error(
                    403,
                    "API rate limit exceeded for 127.0.0.1. (But here's the good news: "
                    "Authenticated requests get a higher rate limit. Check out the documentation "
                    "for more details.)",
                    docs="https://docs.github.com/rest/overview/resources-in-the-rest-api#rate-limiting",
                )
            self._rate_used += 1
        return None

    def _answer(self, request: Request, entry: dict, handler: str, spec_path: str | None, args: dict) -> Response:
        if spec_path is not None and request.path != "/rate_limit":
            spent = self._spend_rate()
            if spent is not None:
                return spent
        anonymous_ok = request.path == "/rate_limit" and "Authorization" not in request.headers
        if spec_path is not None and self.token is not None and not entry["authenticated"] and not anonymous_ok:
            return _error(401, "Bad credentials")
        try:
            return getattr(self, "_h_" + handler)(request, **args)
        except _Answer as a:
            return a.response
        except ClientDisconnected:
            # the client went away before its body arrived (a killed process): no answer to give,
            # and nothing wrong with this server
            return _error(400, "Problems parsing JSON")
        except Exception as e:
            self.internal_errors.append(f"{request.method} {request.path}: {e!r}")
            return _error(500, "Server Error")

    # -- helpers for handlers
    def _repo_or_404(self, owner: str, repo: str) -> dict:
        try:
            return self.state._repo(f"{owner}/{repo}")
        except KeyError:
            raise _Answer(_not_found()) from None

    def _release_or_404(self, r: dict, release_id: int) -> dict:
        rel = self.state._releases.get(release_id)
        if rel is None or rel["repo"] is not r:
            raise _Answer(_not_found())
        return rel

    def _asset_or_404(self, r: dict, asset_id: int) -> dict:
        a = self.state._assets.get(asset_id)
        if a is None or a["release"]["repo"] is not r:
            raise _Answer(_not_found())
        return a

    @staticmethod
    def _json_body(request: Request) -> dict:
        raw = request.get_data()
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            raise _Answer(_error(400, "Problems parsing JSON")) from None
        if not isinstance(body, dict):
            raise _Answer(_error(400, "Body should be a JSON object"))
        return body

    def _paginate(self, request: Request, items: list, repo: dict | None = None) -> tuple[list, dict[str, str]]:
        """GitHub pagination: per_page (default 30, max 100), page (from 1) and a Link header whose
        URLs name the repository by id (``/repositories/{id}/...``, recorded in paginate-issues)."""
        try:
            per_page = min(100, max(1, int(request.args.get("per_page", 30))))
            page = max(1, int(request.args.get("page", 1)))
        except ValueError:
            per_page, page = 30, 1
        last = max(1, -(-len(items) // per_page))
        path = request.path
        if repo is not None and (m := _REPO_PATH.match(path)):
            path = f"/repositories/{repo['id']}{m.group('rest') or ''}"
        chunk = items[(page - 1) * per_page : page * per_page]
        links = []

        def link(p: int, rel: str) -> str:
            args = request.args.to_dict()
            args["per_page"] = str(per_page)
            args["page"] = str(p)
            return f'<{self.url}{path}?{urlencode(args)}>; rel="{rel}"'

        if page > 1:
            links.append(link(page - 1, "prev"))
        if page < last:
            links.append(link(page + 1, "next"))
            links.append(link(last, "last"))
        if page > 1:
            links.append(link(1, "first"))
        return chunk, ({"Link": ", ".join(links)} if links else {})

    # -- handlers
    def _h_rate_limit(self, request: Request) -> Response:
        core = {"limit": self._rate_limit, "remaining": max(0, self._rate_limit - self._rate_used), "reset": self._rate_reset, "used": self._rate_used, "resource": "core"}

        def other(name: str, limit: int) -> dict:
            return {"limit": limit, "remaining": limit, "reset": self._rate_reset, "used": 0, "resource": name}

        return _json(
            {
                "resources": {
                    "core": core,
                    "search": other("search", 30),
                    "graphql": other("graphql", 5000),
                    "integration_manifest": other("integration_manifest", 5000),
                    "code_search": other("code_search", 10),
                },
                "rate": core,
            }
        )

    def _h_get_repo(self, request: Request, owner: str, repo: str) -> Response:
        with self.state.lock:
            return _json(self.state.render_repo(self._repo_or_404(owner, repo)))

    def _h_releases(self, request: Request, owner: str, repo: str) -> Response:
        with self.state.lock:
            r = self._repo_or_404(owner, repo)
            if request.method == "GET":
                items, headers = self._paginate(request, self.state._sorted_releases(r), r)
                return _json([self.state.render_release(rel) for rel in items], headers=headers)
            body = self._json_body(request)
            tag = body.get("tag_name")
            if not isinstance(tag, str) or not tag:
                return _error(422, "Validation Failed", errors=[{"resource": "Release", "code": "missing_field", "field": "tag_name"}])
            if any(rel["repo"] is r and rel["tag_name"] == tag for rel in self.state._releases.values()):
                return _error(
                    422,
                    "Validation Failed",
                    errors=[{"resource": "Release", "code": "already_exists", "field": "tag_name"}],
                    docs="https://docs.github.com/rest/releases/releases#create-a-release",
                )
            created = self.state.add_release(
                f"{r['owner']}/{r['name']}",
                tag,
                name=body.get("name"),
                prerelease=bool(body.get("prerelease", False)),
                draft=bool(body.get("draft", False)),
                target_commitish=body.get("target_commitish") or r["default_branch"],
                body=body.get("body"),
            )
            return _json(created, 201, headers={"Location": created["url"]})

    def _h_latest_release(self, request: Request, owner: str, repo: str) -> Response:
        with self.state.lock:
            r = self._repo_or_404(owner, repo)
            for rel in self.state._sorted_releases(r):
                if not rel["draft"] and not rel["prerelease"]:
                    return _json(self.state.render_release(rel))
            return _not_found("https://docs.github.com/rest/releases/releases#get-the-latest-release")

    def _h_release_by_tag(self, request: Request, owner: str, repo: str, tag: str) -> Response:
        with self.state.lock:
            r = self._repo_or_404(owner, repo)
            for rel in self.state._sorted_releases(r):
                # Drafts have no tag yet as far as the by-tag lookup is concerned.
                if rel["tag_name"] == tag and not rel["draft"]:
                    return _json(self.state.render_release(rel))
            return _not_found("https://docs.github.com/rest/releases/releases#get-a-release-by-tag-name")

    def _h_release(self, request: Request, owner: str, repo: str, release_id: int) -> Response:
        with self.state.lock:
            r = self._repo_or_404(owner, repo)
            rel = self._release_or_404(r, release_id)
            if request.method == "GET":
                return _json(self.state.render_release(rel))
            if request.method == "DELETE":
                for asset_id in list(rel["asset_ids"]):
                    self.state._delete_asset(self.state._assets[asset_id])
                del self.state._releases[rel["id"]]
                return _no_content()
            body = self._json_body(request)
            if "tag_name" in body and body["tag_name"] != rel["tag_name"]:
                if any(o["repo"] is r and o["tag_name"] == body["tag_name"] for o in self.state._releases.values()):
                    return _error(422, "Validation Failed", errors=[{"resource": "Release", "code": "already_exists", "field": "tag_name"}])
            for key in ("tag_name", "target_commitish", "name", "body", "prerelease"):
                if key in body:
                    rel[key] = body[key]
            if "draft" in body:
                rel["draft"] = bool(body["draft"])
                if not rel["draft"] and rel["published_at"] is None:
                    rel["published_at"] = _now()
            rel["updated_at"] = _now()
            return _json(self.state.render_release(rel))

    def _h_release_assets(self, request: Request, owner: str, repo: str, release_id: int) -> Response:
        with self.state.lock:
            r = self._repo_or_404(owner, repo)
            rel = self._release_or_404(r, release_id)
            items, headers = self._paginate(request, [self.state._assets[a] for a in rel["asset_ids"]], r)
            return _json([self.state.render_asset(a) for a in items], headers=headers)

    def _h_upload_asset(self, request: Request, owner: str, repo: str, release_id: int) -> Response:
        name = request.args.get("name")
        data = request.get_data()
        with self.state.lock:
            r = self._repo_or_404(owner, repo)
            rel = self._release_or_404(r, release_id)
            if not name:
                return _upload_error(request, 422, "Validation Failed", errors=[{"resource": "ReleaseAsset", "code": "missing_field", "field": "name"}])
            if request.content_type is None:
                return _upload_error(request, 422, "Validation Failed", errors=[{"resource": "ReleaseAsset", "code": "missing_field", "field": "content_type"}])
            if any(self.state._assets[a]["name"] == name for a in rel["asset_ids"]):
                # recorded (release-assets-conflict): exactly this body from uploads.github.com
                return _upload_error(request, 422, "Validation Failed",
                                     errors=[{"resource": "ReleaseAsset", "code": "already_exists", "field": "name"}])
            asset = self.state._create_asset(rel, name, data, request.content_type, request.args.get("label") or None)
            return _json(self.state.render_asset(asset), 201)

    def _h_asset(self, request: Request, owner: str, repo: str, asset_id: int) -> Response:
        with self.state.lock:
            r = self._repo_or_404(owner, repo)
            a = self._asset_or_404(r, asset_id)
            if request.method == "GET":
                if "application/octet-stream" in request.headers.get("Accept", ""):
                    resp = Response(status=302)
                    resp.headers["Location"] = self._storage_url(a)
                    return resp
                return _json(self.state.render_asset(a))
            if request.method == "DELETE":
                self.state._delete_asset(a)
                return _no_content()
            body = self._json_body(request)
            new_name = body.get("name")
            if new_name is not None and new_name != a["name"]:
                siblings = [self.state._assets[i] for i in a["release"]["asset_ids"] if i != a["id"]]
                if any(s["name"] == new_name for s in siblings):
                    return _error(
                        422,
                        "Validation Failed",
                        errors=[{"resource": "ReleaseAsset", "code": "already_exists", "field": "name"}],
                        docs="https://docs.github.com/rest/releases/assets#update-a-release-asset",
                    )
                a["name"] = new_name
            if "label" in body:
                a["label"] = body["label"]
            a["updated_at"] = _now()
            return _json(self.state.render_asset(a))

    def _storage_url(self, a: dict) -> str:
        return f"{self.url}/_storage/{a['id']}/{a['name']}"

    def _h_tags(self, request: Request, owner: str, repo: str) -> Response:
        with self.state.lock:
            r = self._repo_or_404(owner, repo)
            items, headers = self._paginate(request, list(reversed(r["tags"])), r)
            return _json([self.state.render_tag(r, t) for t in items], headers=headers)

    def _h_dispatch(self, request: Request, owner: str, repo: str) -> Response:
        with self.state.lock:
            r = self._repo_or_404(owner, repo)
        body = self._json_body(request)
        docs = "https://docs.github.com/rest/repos/repos#create-a-repository-dispatch-event"
        event_type = body.get("event_type")
        payload = body.get("client_payload", {})
        problems = []
        if not isinstance(event_type, str) or not event_type:
            problems.append("For 'properties/event_type', nil is not a string." if event_type is None else f"For 'properties/event_type', {json.dumps(event_type)} is not a non-empty string.")
        elif len(event_type) > 100:
            problems.append(f"For 'properties/event_type', {json.dumps(event_type)} is too long (maximum is 100 characters).")
        if not isinstance(payload, dict):
            problems.append(f"For 'properties/client_payload', {json.dumps(payload)} is not an object.")
        elif len(payload) > 10:
            problems.append(f"For 'properties/client_payload', No more than 10 properties are allowed; {len(payload)} were supplied.")
        if len(json.dumps(payload)) >= 64 * 1024:
            problems.append("client_payload is too large (must be less than 64KB).")
        if problems:
            return _error(422, "Invalid request.\n\n" + "\n".join(problems), docs=docs)
        with self.state.lock:
            self.state.dispatches.append(
                {"repo": f"{r['owner']}/{r['name']}", "event_type": event_type, "client_payload": payload, "body": body}
            )
        return _no_content()

    def _h_browser_download(self, request: Request, owner: str, repo: str, tag: str, name: str) -> Response:
        with self.state.lock:
            try:
                rel = self.state._release_of(f"{owner}/{repo}", tag)
            except KeyError:
                return Response("Not Found", status=404, content_type="text/plain; charset=utf-8")
            for asset_id in rel["asset_ids"]:
                a = self.state._assets[asset_id]
                if a["name"] == name:
                    # As on github.com: a redirect to the object storage that holds the bytes.
                    resp = Response(status=302)
                    resp.headers["Location"] = self._storage_url(a)
                    return resp
        return Response("Not Found", status=404, content_type="text/plain; charset=utf-8")

    def _h_storage(self, request: Request, asset_id: int, name: str) -> Response:
        with self.state.lock:
            a = self.state._assets.get(asset_id)
            if a is None:
                return Response("Not Found", status=404, content_type="text/plain; charset=utf-8")
            data = a["data"]
            a["download_count"] += 1
        resp = Response(data, content_type="application/octet-stream")
        resp.headers["Content-Disposition"] = f"attachment; filename={name}"
        resp.set_etag(hashlib.sha256(data).hexdigest())
        resp.last_modified = _dt.datetime.strptime(a["updated_at"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=_dt.UTC)
        return resp.make_conditional(request, accept_ranges=True, complete_length=len(data))


@pytest.fixture(name="github_api")
def github_api_fixture() -> Iterator[GitHubAPIServer]:
    """A started :class:`GitHubAPIServer` (no token required); fails the test at teardown when any
    answer broke GitHub's response schemas or a handler crashed."""
    server = GitHubAPIServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
    problems = server.schema_errors + server.internal_errors
    if problems:
        pytest.fail("GitHub API test server problems:\n" + "\n".join(problems), pytrace=False)


# Both spellings register the fixture `github_api`. Import `github_api_fixture` to keep ruff's F811
# quiet in modules whose tests take a `github_api` argument; `github_api` is kept for plain imports (silence F401 and F811).
github_api = github_api_fixture

__all__ = ["github_api_fixture", "Fault", "GitHubAPIServer", "GitHubState", "OpenAPIChecker", "github_api", "openapi_checker"]
