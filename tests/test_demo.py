"""The demo, run as a user runs it, judged by the state it leaves behind (not by what it prints)."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from sync_tools.fsutil import sha256_file
from sync_tools.manifest import parse_manifest


def _spawns(supervisord_log: Path, program: str) -> list[int]:
    return [int(m) for m in re.findall(rf"spawned: '{program}' with pid (\d+)", supervisord_log.read_text())]


@pytest.mark.slow
def test_demo_rebuilds_releases_and_reloads_only_nats(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "sync_tools", "demo", "--dir", str(work)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    ws = work / "workspace"
    store = ws / ".releases" / "latest"
    manifest = parse_manifest((store / "manifest.json").read_bytes())
    assert manifest.subsystems["nats"].version == "v1.1.0"
    assert manifest.subsystems["arc"].version == "v1.0.0"

    # The relay took the delivery once and ran exactly one local build, for nats.
    conn = sqlite3.connect(ws / "relay.db")
    dispatches = conn.execute("SELECT delivery, status FROM jobs WHERE kind = 'dispatch'").fetchall()
    conn.close()
    assert len(dispatches) == 1 and dispatches[0][1] == "done"
    assert [p.name for p in (ws / "relay-logs").iterdir()] == ["nats"]

    # The workspace rebuilt nats after arc's last build; arc's asset in the store is the one packaged first.
    assert (ws / "nats/.bin/.version").stat().st_mtime > (ws / "arc/.bin/.version").stat().st_mtime
    arc_asset = next(iter(manifest.subsystems["arc"].assets.values()))
    assert sha256_file(store / arc_asset.name) == arc_asset.sha256 == sha256_file(ws / ".dist" / arc_asset.name)

    for agent in ("agent-1", "agent-2"):
        root = work / agent
        nats_entry = next(iter(manifest.subsystems["nats"].assets.values()))
        arc_entry = next(iter(manifest.subsystems["arc"].assets.values()))
        assert sha256_file(root / "nats/.bin/nats-server") == nats_entry.binary_sha256
        assert sha256_file(root / "arc/.bin/arc") == arc_entry.binary_sha256
        assert "v1.0.0" in (root / "nats/.bin/.previous/nats-server").read_text()
        assert not (root / "arc/.bin/.previous").exists() or not any((root / "arc/.bin/.previous").iterdir())
        # supervisord's own log: nats was started for the install and again for the update; arc once.
        log = root / "logs/supervisord.log"
        assert len(_spawns(log, "nats")) == 2, log.read_text()
        assert len(_spawns(log, "arc")) == 1, log.read_text()

    result = json.loads((work / "demo-result.json").read_text())
    assert result["ok"] is True


@pytest.mark.slow
def test_fleet_demo_rolls_out_wave_by_wave_and_halts_a_bad_build_in_wave_one(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "sync_tools", "demo", "--fleet", "--dir", str(work)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((work / "demo-result.json").read_text())
    assert result["ok"] is True
    good, bad = result["builds"]["v1.1.0"], result["builds"]["v1.2.0"]

    # the relay's own records: the good build's three waves opened and it completed; the bad one halted
    # in wave 1 with exactly one failure, and the other three agents were only ever told to wait
    conn = sqlite3.connect(work / "workspace" / "relay.fleet.db")
    opened = {b: json.loads(o) for b, o in conn.execute("SELECT build, opened FROM rollouts")}
    halted = dict(conn.execute("SELECT build, halted_at FROM rollouts"))
    reports = conn.execute("SELECT agent, outcome FROM reports WHERE to_sha = ?", (bad,)).fetchall()
    conn.close()
    assert len(opened[good]) == 3 and halted[good] is None
    assert len(opened[bad]) == 1 and halted[bad] is not None
    rolled_back = {a for a, o in reports if o == "rolled_back"}
    assert len(rolled_back) == 1
    assert {a for a, o in reports if o == "held"} == {"agent-1", "agent-2", "agent-3", "agent-4"} - rolled_back

    for agent in ("agent-1", "agent-2", "agent-3", "agent-4"):
        assert sha256_file(work / agent / "nats/.bin/nats-server") == good
    # supervisord's log in wave 1's root: the bad build was started, crashed and the good one came back
    log = (work / rolled_back.pop() / "logs/supervisord.log").read_text()
    assert "exit status 1" in log
