"""The agent chaos suite, shortened for CI: a real agent process SIGKILLed during updates of a service
run by a real supervisord. Full size (100 cycles): ``bench/reliability`` (docs/reliability.md)."""

from __future__ import annotations

from pathlib import Path

from tests.reliability.agent_chaos import run_agent_chaos


def test_sigkilled_updates_always_leave_a_verified_binary_and_a_restorable_previous(tmp_path: Path) -> None:
    r = run_agent_chaos(tmp_path, cycles=10, seed=3)
    assert r.violations == (), r.to_json()
    assert r.kills >= 5 and r.recoveries == 10
    assert r.rollbacks_after_kill + r.rollbacks_after_recovery >= 3


def test_rollback_right_after_a_kill_at_any_install_step_keeps_previous_restorable(tmp_path: Path) -> None:
    """Each install step in turn: the agent's hook kills it right after the step, and `sync-tools
    rollback` runs at once (before any agent run could finish the interrupted install)."""
    r = run_agent_chaos(tmp_path, cycles=8, seed=5, hook_share=1.0, rollback_after_kill=1.0, every_step=True)
    assert r.violations == (), r.to_json()
    assert r.kill_points == dict.fromkeys(sorted(r.kill_points), 1) and len(r.kill_points) == 8
    assert r.rollbacks_after_kill >= 7
