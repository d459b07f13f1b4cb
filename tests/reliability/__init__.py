"""Reliability suites: crash, fault and hostile-input runs of the relay and the agent.

Each suite is a plain function parameterised by size, returning a frozen report with the figures
(``to_json()``). The CI tests (``tests/test_reliability_*.py``, ``tests/test_fuzz_*.py``,
``tests/test_security.py``) run them shortened; ``bench/reliability`` runs them full-size and writes
``docs/reliability.md``. Everything talks to loopback only.
"""
