"""Fuzzing the agent's archive extractor (shortened; full size: bench/reliability)."""

from __future__ import annotations

from pathlib import Path

from tests.reliability.fuzz_archive import fuzz_extract


def test_extractor_raises_only_archive_errors_and_leaves_nothing_behind(tmp_path: Path) -> None:
    r = fuzz_extract(tmp_path, 400)
    assert r.inputs >= 400 and r.violations == ()
    assert r.outcomes.get("extracted", 0) > 0  # valid archives still extract
    refusals = {k for k in r.outcomes if k.startswith("refused")}
    assert len(refusals) >= 5, r.outcomes  # many different hostile shapes were reached
