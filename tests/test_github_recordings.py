"""GitHub's behaviour as recorded or documented: the test double against recorded real traffic, and
our requests against GitHub's documented limits where no recording exists.

Recordings (tests/fixtures/octokit/):

For every recorded request that sync-tools makes (releases, release assets on both hosts, lists and
their Link headers, a renamed repository), the double (tests/servers/github_api.py) is sent the same
request, in the recorded order and from the same starting state, and must answer with the recorded
status, the headers that matter (Content-Type, Location, Link, X-RateLimit-*, X-GitHub-Media-Type,
X-GitHub-Request-Id), a body of the same shape (every recorded member present with the same JSON
type, lists of the same length) and the same values where values are the behaviour (names, labels,
sizes, states, error members, every URL once GitHub's hosts and ids are mapped to the double's).

Documented limits: repository_dispatch (event_type <= 100 characters, client_payload <= 10
top-level keys and under 64 KB, from GitHub's REST description) and the agent pushes (the
Standard Webhooks specification 1.0.0: headers, signature, idempotent id, status handling).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from standardwebhooks import Webhook
from werkzeug.serving import make_server
from werkzeug.wrappers import Request, Response

from sync_tools.config import AgentTarget
from sync_tools.errors import RemoteError
from sync_tools.relay.dispatch import (
    EVENT_TYPE,
    MAX_EVENT_TYPE,
    MAX_PAYLOAD_BYTES,
    MAX_PAYLOAD_KEYS,
    DispatchRefused,
    GitHubDispatcher,
    dispatch_body,
)
from sync_tools.relay.fanout import AgentEvent, AgentPusher
from sync_tools.relay.webhook import UpstreamChange
from sync_tools.stores.github import GitHubStore
from tests.servers.github_api import (
    SUBSET_PATH,
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


# ------------------------------------------- repository_dispatch: GitHub's documented limits
# No recording of a repository_dispatch exists; its limits are those of GitHub's REST description
# (the committed subset), and the double enforces the same ones.


def _dispatch_schema() -> dict:
    desc = json.loads(SUBSET_PATH.read_text())
    op = desc["paths"]["/repos/{owner}/{repo}/dispatches"]["post"]
    return op["requestBody"]["content"]["application/json"]["schema"]["properties"]


def _raw_dispatch(server: GitHubAPIServer, body: bytes) -> requests.Response:
    return requests.post(f"{server.url}/repos/o/r/dispatches", data=body, headers={"Content-Type": "application/json"}, timeout=T)


def test_our_dispatch_limits_are_githubs_documented_ones() -> None:
    props = _dispatch_schema()
    assert props["event_type"]["maxLength"] == MAX_EVENT_TYPE == 100
    assert props["event_type"]["minLength"] == 1
    assert props["client_payload"]["maxProperties"] == MAX_PAYLOAD_KEYS == 10
    assert "less than 64KB" in props["client_payload"]["description"] and MAX_PAYLOAD_BYTES == 64 * 1024
    assert 1 <= len(EVENT_TYPE) <= MAX_EVENT_TYPE
    change = UpstreamChange(delivery="d" * 36, event="release", subsystem="nats", version="v2.10.25", commit="a" * 40,
                            upstream="https://github.com/nats-io/nats-server")
    assert len(change.client_payload()) == 5  # what the relay sends: half the limit


def test_event_type_limit(github_api: GitHubAPIServer) -> None:
    github_api.state.add_repo("o/r")
    assert _raw_dispatch(github_api, dispatch_body("e" * 100, {})).status_code == 204  # at the limit
    with pytest.raises(DispatchRefused, match="event_type must be 1 to 100 characters, not 101"):
        dispatch_body("e" * 101, {})
    assert _raw_dispatch(github_api, json.dumps({"event_type": "e" * 101}).encode()).status_code == 422  # GitHub too
    with pytest.raises(DispatchRefused, match="not 0"):
        dispatch_body("", {})


def test_client_payload_key_limit(github_api: GitHubAPIServer) -> None:
    github_api.state.add_repo("o/r")
    dispatcher = GitHubDispatcher("o/r", github_api.url, None)
    dispatcher.dispatch({f"k{i}": i for i in range(10)})  # at the limit
    with pytest.raises(DispatchRefused, match="11 top-level keys; GitHub takes at most 10"):
        dispatcher.dispatch({f"k{i}": i for i in range(11)})
    assert [d["client_payload"] for d in github_api.state.dispatches] == [{f"k{i}": i for i in range(10)}]
    assert len(github_api.requests_to("POST", r"/dispatches$")) == 1  # the refused one was never sent
    over = json.dumps({"event_type": "x", "client_payload": {f"k{i}": i for i in range(11)}}).encode()
    assert _raw_dispatch(github_api, over).status_code == 422  # GitHub refuses it too


def test_client_payload_size_limit(github_api: GitHubAPIServer) -> None:
    github_api.state.add_repo("o/r")
    dispatcher = GitHubDispatcher("o/r", github_api.url, None)
    frame = len(json.dumps({"v": ""}))  # measured as json.dumps writes it (the largest usual form)
    dispatcher.dispatch({"v": "x" * (MAX_PAYLOAD_BYTES - 1 - frame)})  # one byte under 64 KiB of JSON
    with pytest.raises(DispatchRefused, match="65536 bytes of JSON; GitHub takes less than 65536"):
        dispatcher.dispatch({"v": "x" * (MAX_PAYLOAD_BYTES - frame)})
    assert len(github_api.state.dispatches) == 1 and len(github_api.requests_to("POST", r"/dispatches$")) == 1


# ----------------------------------- pushes to agents: the Standard Webhooks specification (1.0.0)


class _Agent:
    """A loopback agent endpoint: records each push, answers the statuses queued in ``answers``."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.answers: list[tuple[int, dict[str, str]]] = []
        self.server = make_server("127.0.0.1", 0, self._app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def _app(self, environ: dict, start_response: Any) -> Any:
        req = Request(environ)
        status, headers = self.answers.pop(0) if self.answers else (204, {})
        self.received.append((dict(req.headers.items()), req.get_data()))
        return Response(status=status, headers=headers)(environ, start_response)

    def __enter__(self) -> _Agent:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


SECRET = "whsec_" + base64.b64encode(b"s" * 32).decode()  # the spec: 24 to 64 random bytes, base64, whsec_


def _event(n: int = 3) -> dict[str, Any]:
    return AgentEvent(release="acme/plat@latest", subsystems=tuple(f"subsystem-{i:03d}" for i in range(n)), serial=7,
                      manifest="https://github.com/acme/plat/releases/download/latest/manifest.json").to_json()


def test_agent_pushes_are_standard_webhooks() -> None:
    # headers webhook-id / webhook-timestamp (integer seconds) / webhook-signature ("v1,<base64>",
    # space-delimited), signed over "{id}.{timestamp}.{body}"; the id stays the same across
    # retries (an idempotency key, without "."), the timestamp is each attempt's
    clock = [time.time()]
    with _Agent() as agent:
        pusher = AgentPusher((AgentTarget(agent.url, "AGENT_SECRET"),), environ={"AGENT_SECRET": SECRET},
                             now=lambda: clock[0])
        agent.answers.append((503, {}))
        with pytest.raises(RemoteError):
            pusher.push(agent.url, 42, _event())
        clock[0] += 5
        pusher.push(agent.url, 42, _event())
    (h1, b1), (h2, b2) = agent.received
    for h, body in agent.received:
        assert h["Content-Type"] == "application/json"
        assert re.fullmatch(r"[0-9]+", h["Webhook-Timestamp"])
        assert all(re.fullmatch(r"v1,[A-Za-z0-9+/]{43}=", sig) for sig in h["Webhook-Signature"].split(" "))
        assert "." not in h["Webhook-Id"] and "." not in h["Webhook-Timestamp"]
        Webhook(SECRET).verify(body, {k.lower(): v for k, v in h.items()})  # the reference library agrees
        assert re.fullmatch(r"[a-zA-Z0-9_]+(\.[a-zA-Z0-9_]+)+", json.loads(body)["type"])  # hierarchical type
    assert h1["Webhook-Id"] == h2["Webhook-Id"] == "evt_42" and b1 == b2
    assert int(h2["Webhook-Timestamp"]) - int(h1["Webhook-Timestamp"]) == 5


def test_agent_push_payload_stays_under_the_recommended_20kb() -> None:
    # The spec recommends payloads under 20 KB; an event names subsystems, never their contents:
    # 200 subsystems (the plat-telemetry repo has 9) stay far under it.
    assert len(json.dumps(_event(200), sort_keys=True)) < 20 * 1024


def test_agent_push_redirects_are_failures_not_followed() -> None:
    # The spec: 3xx is a failure (update the URL instead). The signed event never goes elsewhere.
    with _Agent() as agent, _Agent() as elsewhere:
        pusher = AgentPusher((AgentTarget(agent.url, "AGENT_SECRET"),), environ={"AGENT_SECRET": SECRET})
        agent.answers.append((307, {"Location": elsewhere.url}))
        with pytest.raises(DispatchRefused, match="HTTP 307"):
            pusher.push(agent.url, 1, _event())
        assert len(agent.received) == 1 and elsewhere.received == []


@pytest.mark.parametrize(("status", "retried"), [(429, True), (502, True), (504, True), (410, False), (404, False)])
def test_agent_push_statuses_are_handled_as_the_spec_says(status: int, retried: bool) -> None:
    # 429, 502 and 504: throttle and try again (RemoteError: the outbox retries with backoff);
    # 410 Gone and other 4xx: a failure a retry will not fix (dead-lettered).
    with _Agent() as agent:
        pusher = AgentPusher((AgentTarget(agent.url, "AGENT_SECRET"),), environ={"AGENT_SECRET": SECRET})
        agent.answers.append((status, {"Retry-After": "7"} if status == 429 else {}))
        with pytest.raises(RemoteError if retried else DispatchRefused) as e:
            pusher.push(agent.url, 1, _event())
        assert e.value.status_code == status
        if status == 429:
            assert e.value.retry_after == 7.0
