"""GitHubStore's real code (PyGithub underneath) against recorded GitHub traffic, replayed on loopback.

The replay server (tests/servers/github_replay.py) answers only the recorded exchanges, in order,
with what GitHub sent (its hosts rewritten to loopback: the release's ``upload_url`` then points at
the server's ``/uploads``), and fails any request the recording does not hold. So each step below is
proven against GitHub's real answers: the upload (201), the duplicate name (422 already_exists), the
rename (PATCH 200) and the delete (204).

One request is not in the scenarios: ``GET /repos/{owner}/{repo}``, which PyGithub makes first. It is
answered with the repository GitHub returned when the scenario created it (recorded exchange 0, the
same representation), status 200; the test declares it and checks it was the only stand-in.
"""

from __future__ import annotations

import pytest
from github import GithubException

from sync_tools.errors import RemoteError
from sync_tools.stores.github import GitHubStore
from tests.servers.github_replay import ReplayServer, load_recording, replay

DATA = b"Hello, world!\n"  # the recorded upload's bytes


def _store(server: ReplayServer, scenario: str) -> GitHubStore:
    repo = load_recording(scenario)[0].body["full_name"]
    return GitHubStore(repo, "v1.0.0", token="t", base_url=server.url, timeout=5)


def _stand_in(scenario: str) -> dict[int, tuple[str, str, int]]:
    repo = load_recording(scenario)[0].body["full_name"]
    return {0: ("GET", f"/repos/{repo}", 200)}


def _clean(server: ReplayServer) -> None:
    assert server.mismatches == []
    assert server.remaining == []


def test_upload_list_rename_delete_against_githubs_answers() -> None:
    # release-assets: #3 get the release by tag, #4 upload (uploads host, 201), #5 list,
    # #7 rename with PATCH, #8 delete (204). (#6, a GET of the asset's JSON, the store never makes.)
    with replay("release-assets", [3, 4, 5, 7, 8], stand_ins=_stand_in("release-assets")) as server:
        store = _store(server, "release-assets")
        asset = store._upload("test-upload.txt", data=DATA, label="test")
        assert (asset.name, asset.label, asset.size, asset.content_type) == ("test-upload.txt", "test", 14, "text/plain")
        assert store.list_assets() == {"test-upload.txt": 14}
        renamed = store._rename_retrying(asset, "new-filename.txt", "new label")
        assert (renamed.id, renamed.name, renamed.label) == (asset.id, "new-filename.txt", "new label")
        assert renamed.browser_download_url.endswith("/releases/download/v1.0.0/new-filename.txt")
        store._discard(renamed)
        _clean(server)
        assert [i for _, _, i in server.served] == [0, 3, 4, 5, 7, 8]
        assert server.served[0] == ("GET", f"/repos/{store.repo}", 0)  # the one stand-in


def test_upload_conflict_delete_and_upload_again_against_githubs_answers() -> None:
    # release-assets-conflict: #4 upload (201), #5 the same name again: 422 already_exists; the
    # store's failed-upload cleanup lists (#6) and deletes the asset of that name (#7); #8 the
    # upload then succeeds (201) as a new asset.
    with replay("release-assets-conflict", [3, 4, 5, 6, 7, 8], stand_ins=_stand_in("release-assets-conflict")) as server:
        store = _store(server, "release-assets-conflict")
        first = store._upload("test-upload.txt", data=DATA, label="test")
        with pytest.raises(GithubException) as refused:
            store._upload("test-upload.txt", data=DATA, label="test")
        assert refused.value.status == 422
        assert refused.value.data["errors"] == [{"resource": "ReleaseAsset", "code": "already_exists", "field": "name"}]
        again = store._upload("test-upload.txt", data=DATA, label="test")
        assert again.id != first.id and again.size == 14
        _clean(server)
        assert [i for _, _, i in server.served] == [0, 3, 4, 5, 6, 7, 8]


def test_the_replay_refuses_a_request_the_recording_does_not_hold() -> None:
    # The proof above is only as good as the replay's refusal of anything unrecorded.
    with replay("release-assets", [3], stand_ins=_stand_in("release-assets")) as server:
        store = _store(server, "release-assets")
        with pytest.raises(RemoteError) as e:
            store.list_assets()  # by tag (#3), then a list the sequence does not hold at this point
        assert e.value.status_code == 599
        # refused each time (the GET is retried on a 5xx, and refused again)
        assert server.mismatches and all("the recorded sequence is over" in m for m in server.mismatches)
    with replay("release-assets", [3, 4], stand_ins=_stand_in("release-assets")) as server:
        store = _store(server, "release-assets")
        with pytest.raises(GithubException):
            store._upload("other-name.txt", data=DATA, label="test")  # not the recorded name
        assert any("query" in m for m in server.mismatches)
