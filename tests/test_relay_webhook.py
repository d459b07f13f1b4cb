"""Every vendored @octokit/webhooks-examples payload (release, create, push, ping, delete) through the
relay with a valid signature, its classification asserted; and repository matching."""

from __future__ import annotations

from pathlib import Path

import pytest

from sync_tools.relay import webhook as wh
from sync_tools.relay.app import create_app, get_relay
from tests.relay_support import delivery, fixture, fixture_names, settings, tag_payload, write_config

# Expected classification of each example for subsystem "hello" = Codertocat/Hello-World.
# tags: strategy tags, no prereleases.  commits: strategy commits on master, prereleases taken.
EXPECTED_TAGS = {
    "create.0.json": ("change", "simple-tag"), "create.1.json": ("change", "simple-tag"),
    "create.2.json": ("change", "simple-tag"), "create.3.json": ("change", "simple-tag"),
    "create.4.json": ("change", "simple-tag"),
    "delete.0.json": ("ignored", None), "delete.1.json": ("ignored", None),
    "delete.2.json": ("ignored", None), "delete.3.json": ("ignored", None),
    "ping.0.json": ("ping", None), "ping.1.json": ("ping", None), "ping.2.json": ("ping", None),
    "ping.3.json": ("ping", None),
    "push.0.json": ("change", "simple-tag"),  # a tag pushed (created): strategy tags takes it
    "push.1.json": ("ignored", None), "push.2.json": ("ignored", None), "push.3.json": ("ignored", None),
    "push.6.json": ("ignored", None),  # tag deletions
    "push.4.json": ("ignored", None), "push.5.json": ("ignored", None),  # branch pushes: not followed
    "release.published.0.json": ("change", "0.0.1"), "release.published.10.json": ("change", "0.0.1"),
    "release.published.11.json": ("change", "0.0.1"), "release.released.12.json": ("change", "0.0.1"),
    "release.created.1.json": ("ignored", None), "release.created.2.json": ("ignored", None),
    "release.created.3.json": ("ignored", None), "release.deleted.4.json": ("ignored", None),
    "release.deleted.5.json": ("ignored", None), "release.edited.6.json": ("ignored", None),
    "release.edited.7.json": ("ignored", None),
    "release.prereleased.8.json": ("ignored", None), "release.prereleased.9.json": ("ignored", None),
}
EXPECTED_COMMITS = {  # a commits subsystem's version is its branch head: tags and releases do not move it
    name: ("ignored", None) if name.startswith(("create.", "release.")) else want
    for name, want in EXPECTED_TAGS.items()}
EXPECTED_COMMITS.update({
    "push.0.json": ("ignored", None),  # a tag push does not move the followed branch
    "push.4.json": ("change", "6113728f27ae82c7b1a177c8d03f9e96e0adf246"),
    "push.5.json": ("change", "6113728f27ae82c7b1a177c8d03f9e96e0adf246"),
})


def test_every_relevant_example_is_vendored() -> None:
    names = fixture_names()
    assert set(names) == set(EXPECTED_TAGS), "a vendored example has no expected classification"
    for event in ("release", "create", "push", "ping", "delete"):
        assert any(n.startswith(event + ".") for n in names)


def _client(tmp_path: Path, **cfg: str):  # type: ignore[no-untyped-def]
    config = write_config(tmp_path, **cfg)
    app = create_app(config, settings(config, tmp_path))
    return app, app.test_client()


@pytest.mark.parametrize("strategy", ["tags", "commits"])
def test_examples_through_the_relay(tmp_path: Path, strategy: str) -> None:
    extra = "branch: master\n    prereleases: true" if strategy == "commits" else ""
    app, client = _client(tmp_path, hello_strategy=strategy, hello_extra=extra)
    expected = EXPECTED_TAGS if strategy == "tags" else EXPECTED_COMMITS
    relay = get_relay(app)
    try:
        for name, (kind, version) in sorted(expected.items()):
            event = name.split(".")[0]
            payload = fixture(name)
            d = delivery(event, payload, form=name.endswith("1.json"))  # some as form-encoded payload=
            resp = client.post("/webhook", data=d.body, headers=d.headers)
            body = resp.get_json()
            results = wh.classify(app.extensions["sync_tools.relay"].config, event, payload, "x")
            if kind == "ping":
                assert (resp.status_code, body["status"]) == (200, "pong"), name
                assert isinstance(results[0], wh.Ping)
            elif kind == "ignored":
                assert (resp.status_code, body["status"]) == (200, "ignored"), (name, body)
                assert all(isinstance(r, wh.Ignored) for r in results)
            else:
                assert (resp.status_code, body["status"]) == (202, "accepted"), (name, body)
                (r,) = results
                assert isinstance(r, wh.UpstreamChange)
                assert (r.subsystem, r.event, r.version) == ("hello", event, version), name
                assert r.upstream == "https://github.com/Codertocat/Hello-World"
                job = relay.outbox.job(body["jobs"][0]) if body["jobs"] else None
                if job is not None:  # later deliveries of the same version coalesce onto the first
                    assert job.payload["subsystem"] == "hello"
                    assert job.payload["version"] == version
                    assert job.payload["delivery"] == d.headers["X-GitHub-Delivery"]
    finally:
        relay.outbox.close()


def test_push_to_a_tag_counts_only_for_strategy_tags_and_the_tag_filter(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    p = fixture("push.0.json")
    p["repository"] = tag_payload("nats-io/nats-server")["repository"]
    (r,) = wh.classify(config, "push", p, "d1")
    assert isinstance(r, wh.Ignored) and "include" in r.reason  # simple-tag does not match ^v\d+...
    p["ref"] = "refs/tags/v2.11.0"
    (r,) = wh.classify(config, "push", p, "d1")
    assert isinstance(r, wh.UpstreamChange) and r.version == "v2.11.0" and r.commit == p["after"]


def test_a_branch_push_whose_after_is_no_commit_id_is_a_bad_request(tmp_path: Path) -> None:
    config = write_config(tmp_path, hello_strategy="commits", hello_extra="branch: master")
    p = fixture("push.4.json")
    (r,) = wh.classify(config, "push", p, "d1")
    assert isinstance(r, wh.UpstreamChange) and r.version == p["after"]
    p["after"] = "6113728f27ae82c7b1a177c8d03f9e96e0adf246\ncommit: forged"  # would land in .version
    with pytest.raises(wh.BadRequest, match="not a commit id"):
        wh.classify(config, "push", p, "d1")


@pytest.mark.parametrize("event, tag, major, version", [
    ("release", "v2.10.25", "manual", "v2.10.25"),
    ("release", "v3.0.0", "manual", None),   # a new major: check reports it; building it needs --allow-major
    ("release", "v3.0.0", "auto", "v3.0.0"),
    ("release", "v2.9.9", "manual", None),   # a backport released after the pin: no update
    ("release", "v2.10.24", "manual", None),  # the pin itself (a re-published release)
    ("create", "v2.10.25", "manual", "v2.10.25"),
    ("create", "v3.0.0", "manual", None),
    ("create", "v2.10.3", "auto", None),
    ("push", "v3.1.0", "manual", None),
    ("push", "v2.11.0", "manual", "v2.11.0"),
])
def test_only_newer_versions_within_the_major_policy_are_built(tmp_path: Path, event, tag, major, version) -> None:
    config = write_config(tmp_path, hello_extra=f"current: v2.10.24\n    major: {major}")
    if event == "release":
        p = fixture("release.published.0.json")
        p["release"]["tag_name"] = tag
    elif event == "create":
        p = fixture("create.0.json")
        p["ref"] = tag
    else:
        p = fixture("push.0.json")
        p["ref"] = f"refs/tags/{tag}"
    (r,) = wh.classify(config, event, p, "d1")
    if version is None:
        assert isinstance(r, wh.Ignored) and tag in r.reason and "hello" in r.reason, r
    else:
        assert isinstance(r, wh.UpstreamChange) and r.version == version, r


@pytest.mark.parametrize("upstream, repo, match", [
    ("https://github.com/nats-io/nats-server", {"full_name": "NATS-IO/Nats-Server"}, True),
    ("https://github.com/nats-io/nats-server.git", {"html_url": "https://github.com/nats-io/nats-server"}, True),
    ("git@github.com:nats-io/nats-server.git", {"clone_url": "https://github.com/nats-io/nats-server.git"}, True),
    ("nats-io/nats-server", {"html_url": "https://ghe.corp.example/nats-io/nats-server"}, True),
    ("https://ghe.corp.example/Team/App/", {"html_url": "https://ghe.corp.example/team/app",
                                            "full_name": "team/app"}, True),
    ("https://ghe.corp.example/team/app", {"html_url": "https://github.com/team/app", "full_name": "team/app"},
     False),
    ("https://github.com/nats-io/nats-server", {"full_name": "nats-io/nats-streaming-server"}, False),
    ("/tmp/up/nats", {"clone_url": "file:///tmp/up/nats.git"}, True),
    ("/tmp/up/nats", {"full_name": "up/nats"}, False),
])
def test_repository_matching(upstream: str, repo: dict, match: bool) -> None:
    assert wh.repo_matches(upstream, repo) is match
