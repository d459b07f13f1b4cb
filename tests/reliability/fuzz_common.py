"""What every fuzz suite shares: its report, JSON value strategies, and running a hypothesis property
a given number of times from a plain function (so the same code runs shortened in CI and long in
``bench/reliability``)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st


@dataclass(frozen=True)
class FuzzReport:
    """One fuzz target's figures: inputs tried, what they came to, and violations (must be empty)."""

    target: str
    inputs: int
    outcomes: dict[str, int]
    seconds: float
    violations: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "inputs": self.inputs, "outcomes": self.outcomes,
                "seconds": self.seconds, "violations": list(self.violations)}


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=16,
)


def run_property(target: str, test: Callable[..., None], max_examples: int, outcomes: Counter[str],
                 *, raise_on_violation: bool = True) -> FuzzReport:
    """Run the hypothesis-decorated *test* (``@given``, no ``@settings``) *max_examples* times.

    *test* counts each input in *outcomes* and raises AssertionError for a violation. With
    *raise_on_violation* the (shrunk) failure propagates and the inputs are the same on every run, as
    a test wants; otherwise it is returned in the report's violations and the inputs are new, as the
    benchmark wants.
    """
    # A test answers the same on every run (CI must not fail on the inputs one run happened to draw);
    # the benchmark draws new inputs each time, to find what the tests have not.
    runner = settings(max_examples=max_examples, deadline=None, database=None, derandomize=raise_on_violation,
                      suppress_health_check=list(HealthCheck))(test)
    started = time.monotonic()
    violations: tuple[str, ...] = ()
    try:
        runner()
    except Exception as e:  # noqa: BLE001 - the benchmark reports it instead of stopping
        if raise_on_violation:
            raise
        violations = (f"{type(e).__name__}: {str(e)[:500]}",)
    return FuzzReport(target, sum(outcomes.values()), dict(sorted(outcomes.items())),
                      round(time.monotonic() - started, 1), violations)
