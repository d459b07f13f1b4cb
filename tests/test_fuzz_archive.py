"""Fuzzing the agent's archive extractor (shortened; full size: bench/reliability)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.fuzz_archive import fuzz_extract
from tests.reliability.fuzz_atheris import run_atheris


def test_extractor_raises_only_archive_errors_and_leaves_nothing_behind(tmp_path: Path) -> None:
    r = fuzz_extract(tmp_path, 400)
    assert r.inputs >= 400 and r.violations == ()
    assert r.outcomes.get("extracted", 0) > 0  # valid archives still extract
    refusals = {k for k in r.outcomes if k.startswith("refused")}
    assert len(refusals) >= 5, r.outcomes  # many different hostile shapes were reached


def test_atheris_coverage_guided_extractor() -> None:
    pytest.importorskip("atheris", reason="atheris has wheels for Linux x86_64 only")
    r = run_atheris("archive", 2000)
    # libFuzzer checks -runs between inputs and now and then runs one more (seen: "Done 2001 runs")
    assert r.violations == () and r.inputs >= 2000 and r.outcomes["coverage edges"] > 10
