"""RELAY_INGEST_CPUS and the core each ingest worker takes (sync_tools.relay.cpus): what the setting
accepts, and that a core is held by one live process at a time and freed when it dies (real processes,
real flocks, the kernel's affinity)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sync_tools.errors import ConfigError
from sync_tools.relay import cpus


def test_the_setting_takes_auto_off_and_lists_of_cores_and_refuses_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpus, "_allowed", lambda: [0, 1, 2, 3])
    assert cpus.ingest_cpus({}) == [0, 1, 2, 3]
    assert cpus.ingest_cpus({"RELAY_INGEST_CPUS": " Auto "}) == [0, 1, 2, 3]
    assert cpus.ingest_cpus({"RELAY_INGEST_CPUS": "off"}) == []
    assert cpus.ingest_cpus({"RELAY_INGEST_CPUS": "2,0"}) == [2, 0]
    assert cpus.ingest_cpus({"RELAY_INGEST_CPUS": "1-2, 2,3"}) == [1, 2, 3]
    for bad, says in [("x", "expected 'auto', 'off' or cores"), ("2-1", "is not a range"),
                      ("-1", "expected"), ("4", "only run on cores 0,1,2,3, not 4"),
                      ("0-99999999999", "not 0-99999999999"), ("1,,2", "expected")]:
        with pytest.raises(ConfigError, match=says):
            cpus.ingest_cpus({"RELAY_INGEST_CPUS": bad})
    monkeypatch.setattr(cpus, "_allowed", lambda: None)  # a platform without affinity
    assert cpus.ingest_cpus({}) == []
    with pytest.raises(ConfigError, match="cannot pin"):
        cpus.ingest_cpus({"RELAY_INGEST_CPUS": "0"})


HOLDER = r"""
import os, sys, threading
from pathlib import Path
from sync_tools.relay.cpus import pin_worker
early = threading.Thread(target=threading.Event().wait, daemon=True)  # a thread from before the pin
early.start()
core = pin_worker(Path(sys.argv[1]), [int(c) for c in sys.argv[2].split(",")])
later = threading.Thread(target=threading.Event().wait, daemon=True)
later.start()
mine = {frozenset(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}
print(core, sorted(sorted(m) for m in mine), flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_a_core_is_held_by_one_live_worker_and_freed_when_it_dies(tmp_path: Path) -> None:
    first, second = sorted(os.sched_getaffinity(0))[:2]
    db = tmp_path / "relay.db"

    def holder() -> tuple[subprocess.Popen[str], str]:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(db), f"{first},{second}"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        return proc, proc.stdout.readline().strip()

    a, said_a = holder()
    b, said_b = holder()
    c, said_c = holder()
    try:
        # every thread of a pinned process is on its core, those started before the pin too
        assert said_a == f"{first} [[{first}]]" and said_b == f"{second} [[{second}]]", (said_a, said_b)
        assert said_c.startswith("None "), said_c  # both taken: the third runs where it is put
        a.kill()
        a.wait(10)
        d, said_d = holder()  # a worker started after one died (granian's respawn) takes its core
        try:
            assert said_d == f"{first} [[{first}]]", said_d
        finally:
            d.kill()
            d.wait(10)
    finally:
        for p in (a, b, c):
            p.kill()
            p.wait(10)
