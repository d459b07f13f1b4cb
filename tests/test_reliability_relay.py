"""The relay crash suite, shortened for CI: a real relay subprocess SIGKILLed while deliveries flow.

Full size (1,000 deliveries, 10 crashes): ``bench/reliability`` (figures in docs/reliability.md).
"""

from __future__ import annotations

from pathlib import Path

from tests.reliability.relay_crash import run_relay_crash


def test_no_delivery_is_lost_across_sigkills(tmp_path: Path) -> None:
    """100 deliveries, 2 SIGKILLs at random moments, redelivery of whatever got no 2xx: every delivery
    reaches the GitHub API test server, with at most one extra dispatch per crash."""
    r = run_relay_crash(tmp_path, deliveries=100, crashes=2, seed=11, settle_timeout=60)
    assert r.violations == (), r.to_json()
    assert r.dispatched == 100 and r.lost == 0 and r.never_acknowledged == 0
    assert r.duplicated <= r.crashes
    assert r.restarts == 2
    assert r.redeliveries > 0  # the kills did cut requests, and GitHub-style redelivery closed the gap


def test_no_delivery_is_lost_across_sigkills_and_github_faults(tmp_path: Path) -> None:
    """The same with 30 % of dispatch calls failing (500, 502, 403 rate limit with a near reset,
    connection resets; timeouts only in the full run, each holds a relay thread for 30 s)."""
    r = run_relay_crash(tmp_path, deliveries=100, crashes=2, fault_rate=0.3, timeout_budget=0, seed=12,
                        settle_timeout=400)  # one commits branch: each push waits out the backoff of the one before
    assert r.violations == (), r.to_json()
    assert r.dispatched == 100 and r.lost == 0 and r.dead_letters == 0
    assert r.duplicated <= r.crashes
    assert sum(r.faults.values()) > 10 and set(r.faults) >= {"500", "502", "403-rate-limit", "reset"}
    assert r.dispatch_attempts > r.dispatch_calls  # failed calls were retried
