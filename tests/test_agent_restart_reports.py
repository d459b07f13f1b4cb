"""What the agent says when the process manager's restart fails while it puts a binary back (found by a
review; each test failed before its fix): a restore or rollback whose restart never happened blamed the
binary ("unhealthy too", "unhealthy after rollback") although nothing ran it, and a recovery restart
that failed was listed twice in one reconcile's report (the recovery's result, then the owed restart
tried again at once). Real processes under the process-compose double (tests/servers/process_compose.py,
subclassed in tests/test_agent_restart_faults.py only to answer HTTP 500 on chosen calls) and a release
served over loopback HTTP; the crash is the in-process stand-in tests/test_agent_faults.py uses."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from sync_tools.agent import install
from sync_tools.agent.reload import ProcessComposeReloader
from sync_tools.agent.report import reports_for
from sync_tools.agent.state import load_state
from tests.agent_support import wait_http
from tests.test_agent_restart_faults import _FlakyPC, _PCWorld


@pytest.fixture
def pcw(tmp_path: Path) -> Iterator[_PCWorld]:
    w = _PCWorld(tmp_path)
    try:
        yield w
    finally:
        w.close()


def _blames_the_binary(error: str | None) -> bool:
    return "unhealthy" in (error or "")


def test_a_restore_whose_restart_the_manager_fails_does_not_call_the_previous_binary_unhealthy(
        pcw: _PCWorld) -> None:
    """v2 is unhealthy; v1 goes back, and the manager answers its start with HTTP 500 (stop-start). v1
    never ran: the error must say the restart failed (and is owed), not that v1 is unhealthy too."""
    pcw.publish("v2", mode="unhealthy")
    with _FlakyPC(pcw.procs(), fail={"start": {2}}) as pc:
        wait_http(pcw.url)
        reloader = ProcessComposeReloader(pc.url, ready_timeout=5, stop_start=True)
        res = pcw.agent(reloader).reconcile().result("nats")
        assert res is not None and res.action == "failed", res
        assert pcw.binary.read_bytes() == pcw.v1
        assert "unhealthy too" not in res.error, res.error
        assert "back in place" in res.error and "tried again at the next run" in res.error, res.error
        assert "nats" in load_state(pcw.root).reload_failed  # what "tried again" rests on


def test_a_rollback_whose_restart_the_manager_fails_does_not_call_the_previous_binary_unhealthy(
        pcw: _PCWorld) -> None:
    """`rollback`: the manager answers the restart onto v1 with HTTP 500 (and the one putting v2 back,
    too). Neither binary ran: no "unhealthy after rollback", no "unhealthy too"."""
    pcw.publish("v2")
    with _FlakyPC(pcw.procs(), fail={"restart": {2, 3}}) as pc:
        wait_http(pcw.url)
        reloader = ProcessComposeReloader(pc.url, ready_timeout=5)
        assert pcw.agent(reloader).reconcile().result("nats").action == "updated"  # restart #1
        res = pcw.agent(reloader).rollback("nats")  # restart #2 (onto v1), #3 (v2 back)
        assert res.action == "failed", res
        assert not _blames_the_binary(res.error), res.error
        assert "the binary it replaced is back" in res.error, res.error
        assert "restart" in res.error and "tried again at the next run" in res.error, res.error


class _Killed(BaseException):
    """Stands in for SIGKILL inside this process: nothing after the crash point runs."""


def _crash_inside_the_restore(pcw: _PCWorld, reloader: ProcessComposeReloader,
                              monkeypatch: pytest.MonkeyPatch) -> str:
    """v2 fails its health check and the agent dies in the swap back to v1: a ``restore`` intent is
    left in the journal. Returns v2's sha256."""
    bad = pcw.publish("v2", mode="unhealthy")
    real = install.crash_point
    swaps: list[str] = []

    def crash_point(step: str) -> None:
        if step == "swapped":
            swaps.append(step)
            if len(swaps) == 2:  # the second swap is the restore of v1
                raise _Killed(step)
        real(step)

    monkeypatch.setattr(install, "crash_point", crash_point)
    with pytest.raises(_Killed):
        pcw.agent(reloader).reconcile()
    monkeypatch.setattr(install, "crash_point", real)
    assert [i.kind for i in install.Journal(pcw.root).pending()] == ["restore"]
    return hashlib.sha256(bad).hexdigest()


def test_a_recovery_restart_that_fails_is_listed_once_and_tried_again_at_the_next_run(
        pcw: _PCWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    """The next reconcile finishes the restore; the manager answers its restart with HTTP 500. The
    report listed that failure twice: the recovery's result, then the restart it had just failed, owed
    and tried again at once ("failed before and still does"), with two ``failed`` reports to the relay.
    And the recovery's error called v1, which never ran, "unhealthy too"."""
    with _FlakyPC(pcw.procs(), fail={"restart": {2, 3}}) as pc:
        wait_http(pcw.url)
        reloader = ProcessComposeReloader(pc.url, ready_timeout=5)
        bad = _crash_inside_the_restore(pcw, reloader, monkeypatch)  # restart #1: v2's
        report = pcw.agent(reloader).reconcile()
        actions = [r.action for r in report.results_for("nats")]
        failed = [r for r in reports_for(report, agent="a", platform="linux/amd64")
                  if r.subsystem == "nats" and r.outcome == "failed"]
        assert actions == ["failed", "skipped"], [(r.action, r.error) for r in report.results_for("nats")]
        assert len(failed) == 1, [r.error for r in failed]
        assert [e["action"] for e in report.to_json()["subsystems"]["nats"]["earlier"]] == ["failed"]
        assert pc.calls["restart"] == 2, pc.calls  # the recovery's restart, not once more right after
        error = report.results_for("nats")[0].error
        assert not _blames_the_binary(error), error
        assert "back in place" in error and "tried again at the next run" in error, error
        assert pcw.binary.read_bytes() == pcw.v1 and "nats" in load_state(pcw.root).reload_failed

        pc.fail["restart"] = set()  # the manager answers again: the next run finishes the restart
        again = pcw.agent(reloader).reconcile()
        assert [r.action for r in again.results_for("nats")] == ["recovered", "skipped"], again
        assert wait_http(pcw.url).startswith("nats-v1 ")
        assert load_state(pcw.root).failed["nats"] == bad and not load_state(pcw.root).reload_failed
