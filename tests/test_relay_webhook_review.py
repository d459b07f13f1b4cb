"""The relay's webhook path (classify, prepare/recorded, dispatch jobs, local builds), found by a review;
each test failed before its fix: pre-release tags, tags off the pin's line, the same version dispatched twice, an older version accepted while a newer one is
on its way, a local build orphaned by a killed relay, a timed-out build's command left running. The
real relay under its real server on loopback, real payloads, the GitHub API test server."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from sync_tools.relay.app import create_app, get_relay
from sync_tools.relay.outbox import COALESCE_WINDOW
from sync_tools.relay.server import RelayServer
from tests.relay_support import (
    RELEASE_REPO,
    delivery,
    fixture,
    running_relay,
    settings,
    tag_payload,
    write_config,
)
from tests.servers.github_api import GitHubAPIServer, github_api  # noqa: F401
from tests.support import wait_for

PIN = "current: v2.10.24\n    major: {major}"


def send(server: RelayServer, d) -> requests.Response:  # type: ignore[no-untyped-def]
    return requests.post(server.url + "/webhook", data=d.body, headers=d.headers, timeout=10)


def _create(tag: str) -> dict:
    p = fixture("create.0.json")  # Codertocat/Hello-World, as GitHub sends a tag's creation
    p["ref"] = tag
    return p


def _tag_push(tag: str) -> dict:
    p = fixture("push.0.json")  # Codertocat/Hello-World, a tag pushed
    p["ref"] = f"refs/tags/{tag}"
    return p


def _settled(server: RelayServer) -> None:
    outbox = get_relay(server.app).outbox
    wait_for(lambda: outbox.stats().queue_depth == 0 and outbox.stats().running == 0, timeout=15,
             what="an empty queue")


# ------------------------------------------------------- 1. a pre-release tag is built as a release


@pytest.mark.parametrize("event, make", [("create", _create), ("push", _tag_push)])
def test_a_prerelease_tag_is_not_dispatched_for_a_subsystem_without_prereleases(
        tmp_path: Path, github_api: GitHubAPIServer, event: str, make) -> None:  # noqa: F811
    """hello follows tags, pinned v2.10.24, prereleases not taken (the default). `check` drops
    v2.11.0-rc.1 by its text (versions.select); the relay's create/tag-push path checks only the
    include/exclude filters and "newer than the pin", so the release candidate is built and released."""
    with running_relay(tmp_path, github_api, hello_extra=PIN.format(major="manual")) as server:
        r = send(server, delivery(event, make("v2.11.0-rc.1")))
        assert (r.status_code, r.json()["status"]) == (200, "ignored"), r.json()
        assert any("rc.1" in reason for reason in r.json()["reasons"]), r.json()
        _settled(server)
        assert github_api.state.dispatches == []


# ------------------------------------------- 2. a tag that is not a version replaces a version pin


@pytest.mark.parametrize("tag, major", [("simple-tag", "manual"), ("nightly-20241215", "auto")])
def test_a_tag_that_is_no_version_of_the_pins_line_is_not_dispatched(
        tmp_path: Path, github_api: GitHubAPIServer, tag: str, major: str) -> None:  # noqa: F811
    """hello is pinned to the version v2.10.24. A tag that is not a version (the vendored example's own
    `simple-tag`), or a date-stamped nightly of another tag line, is not an update of that pin: `check`
    skips both (versions.select: unparseable, or another family / a date for a major). The relay's
    held_back lets an unorderable tag through, and under major: auto ranks the nightly's date as a
    major 20241215, so either is dispatched and `build --version` would move the pin off the version line."""
    with running_relay(tmp_path, github_api, hello_extra=PIN.format(major=major)) as server:
        r = send(server, delivery("create", _create(tag)))
        assert (r.status_code, r.json()["status"]) == (200, "ignored"), r.json()
        _settled(server)
        assert github_api.state.dispatches == []


# ---------------------------------- 3. the same version dispatched again once the coalesce hour is over


class Clock:
    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
def clocked_relay(tmp_path: Path, github_api: GitHubAPIServer) -> Iterator[tuple[RelayServer, Clock]]:  # noqa: F811
    github_api.state.add_repo(RELEASE_REPO)
    config = write_config(tmp_path)
    clock = Clock()
    server = RelayServer(create_app(config, settings(config, tmp_path, github_api_url=github_api.url), now=clock),
                         "127.0.0.1", 0).start()
    try:
        yield server, clock
    finally:
        server.stop()


def test_a_version_already_dispatched_is_not_dispatched_again_after_the_coalesce_window(
        clocked_relay: tuple[RelayServer, Clock], github_api: GitHubAPIServer) -> None:  # noqa: F811
    """nats v2.10.25's tag is created (dispatched), and its release is published more than an hour
    later (a common upstream routine: tag, CI, then the release page). The version is not newer than
    the one dispatched, so the release's delivery must be a 200 with the reason; the relay's
    _not_older only refuses a *strictly* older version, and the dedupe only covers the hour, so the
    same version is dispatched (built and released) a second time."""
    server, clock = clocked_relay
    r = send(server, delivery("create", tag_payload(tag="v2.10.25")))
    assert r.status_code == 202, r.text
    wait_for(lambda: len(github_api.state.dispatches) == 1, what="the first dispatch")
    _settled(server)
    clock.offset = COALESCE_WINDOW + 60
    time.sleep(0.6)  # past DISPATCHED_TTL
    rel = fixture("release.published.0.json")
    rel["release"]["tag_name"] = "v2.10.25"
    rel["repository"] = tag_payload()["repository"]
    again = send(server, delivery("release", rel))
    _settled(server)
    assert len(github_api.state.dispatches) == 1, [d["client_payload"] for d in github_api.state.dispatches]
    assert (again.status_code, again.json()["status"]) == (200, "ignored"), again.json()


# ------------------------------ 4. an older version accepted while a newer one is going out, then dropped


def test_an_older_version_arriving_while_a_newer_one_is_dispatching_is_answered_ignored(
        tmp_path: Path, github_api: GitHubAPIServer) -> None:  # noqa: F811
    """v2.10.26's dispatch is under way (GitHub slow to answer) when v2.10.25's tag arrives. The
    relay answers 202 "accepted" (the slot it supersedes holds only pending jobs, and "dispatched"
    is written after GitHub's answer), then the worker skips the job once v2.10.26 is out: a delivery
    older than one dispatched, answered as if it would be acted on and silently dropped."""
    with running_relay(tmp_path, github_api) as server:
        github_api.inject("POST", "/dispatches$", status=None, delay=2.0, times=1)
        assert send(server, delivery("create", tag_payload(tag="v2.10.26"))).status_code == 202
        outbox = get_relay(server.app).outbox
        wait_for(lambda: outbox.stats().running == 1, what="the v2.10.26 dispatch under way")
        # on its way to GitHub: past the claim, whose first steps (reads) a loaded machine had not yet taken
        wait_for(lambda: github_api.requests_to("POST", "/dispatches$"), what="the v2.10.26 dispatch at GitHub")
        r = send(server, delivery("create", tag_payload(tag="v2.10.25")))
        _settled(server)
        assert [d["client_payload"]["version"] for d in github_api.state.dispatches] == ["v2.10.26"]
        assert (r.status_code, r.json()["status"]) == (200, "ignored"), r.json()


# ------------------------------- 5. a local build orphaned by a killed relay runs beside its own re-run


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_a_local_build_left_by_a_killed_relay_does_not_run_beside_its_rerun(tmp_path: Path) -> None:
    """dispatch: local. The relay is SIGKILLed (OOM killer, systemd's stop timeout) while nats builds.
    The build runs in a session of its own (start_new_session), so it survives its relay; the restarted
    relay resumes the job and starts `sync-tools build --only nats` again while the first is still
    writing the same workspace: two builds of one subsystem at once, the second's pin notes taken
    from a pin the orphan may still move."""
    import os
    import signal
    import subprocess
    import sys

    from tests.relay_support import env as relay_env
    from tests.test_relay_local import tag_event
    from tests.workspace import make_workspace

    starts = tmp_path / "starts"
    ws = make_workspace(tmp_path / "ws", {"nats": {"build": f'["echo $$ >> {starts}; exec sleep 8"]'}},
                        extra_config="relay:\n  dispatch: local\n")
    ws.release_upstream("nats", "v1.1.0")
    e = {**ws.env(), **relay_env(tmp_path), "PYTHONUNBUFFERED": "1"}
    port_file = tmp_path / "port"
    script = (
        "import threading; from pathlib import Path\n"
        "from sync_tools.config import load_config\n"
        "from sync_tools.relay.app import create_app\n"
        "from sync_tools.relay.server import RelayServer\n"
        f"server = RelayServer(create_app(load_config({str(ws.config_path)!r})), '127.0.0.1', 0).start()\n"
        f"Path({str(port_file)!r}).write_text(str(server.port))\n"
        "threading.Event().wait()\n"
    )

    def start() -> tuple[subprocess.Popen, str]:
        port_file.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", script], env=e, cwd=ws.root)
        port = wait_for(lambda: port_file.exists() and port_file.read_text(), what="the relay port")
        return proc, f"http://127.0.0.1:{port}"

    def pids() -> list[int]:
        return [int(x) for x in starts.read_text().split()] if starts.exists() else []

    proc, url = start()
    second = None
    try:
        d = delivery("create", tag_event(ws.upstreams["nats"], "v1.1.0"))
        assert requests.post(url + "/webhook", data=d.body, headers=d.headers, timeout=10).status_code == 202
        wait_for(lambda: len(pids()) == 1, timeout=60, what="the first build running")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        (first,) = pids()
        assert _alive(first)  # the relay is gone, its build is not
        second, url = start()
        time.sleep(0.5)
        # the resumed job's build starts (within the worker's poll); the first must be over by then
        wait_for(lambda: len(pids()) == 2 or not _alive(first), timeout=30, what="the resumed build")
        overlapping = [p for p in pids() if _alive(p)]
        assert len(overlapping) <= 1, f"two builds of nats at once: {overlapping}"
    finally:
        for p in (proc, second):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGKILL)
                p.wait(10)
        for pid in pids():
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


# ------------------------ 6. a build command that ignores SIGTERM outlives a local build's timeout


def test_a_timed_out_local_build_leaves_no_build_command_running(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """dispatch: local, build_timeout 2 s. At the timeout the relay SIGTERMs `sync-tools build`, which
    then stops its build command's own process group (TERM, then KILL after TERM_GRACE). The relay
    gives `sync-tools build` the same TERM_GRACE and SIGKILLs it at the same moment, before it gets to
    SIGKILL its command: a command that ignores SIGTERM (a compiler's wrapper, `trap '' TERM`) lives on
    in its own session after the job is dead-lettered, and the next delivery builds beside it."""
    import os
    import signal

    from tests.test_relay_local import tag_event
    from tests.workspace import make_workspace

    pidfile = tmp_path / "cmd.pid"
    ws = make_workspace(tmp_path / "ws", {"nats": {"build": f'["trap \'\' TERM; echo $$ > {pidfile}; exec sleep 300"]'}},
                        extra_config="relay:\n  dispatch: local\n")
    ws.release_upstream("nats", "v1.1.0")
    for k, v in ws.env().items():
        monkeypatch.setenv(k, v)
    config = ws.config()
    pid = 0
    with serve_relay_local(config, tmp_path, build_timeout=2.0) as server:
        try:
            d = delivery("create", tag_event(ws.upstreams["nats"], "v1.1.0"))
            assert send(server, d).status_code == 202
            wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=30, what="the build command")
            pid = int(pidfile.read_text())
            outbox = get_relay(server.app).outbox
            wait_for(lambda: outbox.stats().dead == 1, timeout=60, what="the timed-out job dead-lettered")
            (job,) = outbox.jobs("dead")
            assert "timed out" in (job.last_error or "")
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and _alive(pid):
                time.sleep(0.1)
            assert not _alive(pid), "the build command of the timed-out build is still running"
        finally:
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)


@contextmanager
def serve_relay_local(config, root: Path, **overrides):  # type: ignore[no-untyped-def]
    server = RelayServer(create_app(config, settings(config, root, **overrides)), "127.0.0.1", 0).start()
    try:
        yield server
    finally:
        server.stop()
