"""The fleet view for people: ``GET /fleet`` as a server-rendered page (checked in real headless
Chromium), and the ``sync-tools fleet`` / ``sync-tools rollout`` commands against a real relay."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from sync_tools.cli import cli
from sync_tools.relay.app import get_relay
from sync_tools.relay.server import RelayServer
from tests.fleet_support import (
    AGENTS,
    OPERATOR,
    Agent,
    Clock,
    fleet_relay,
    members,
    notify,
    publish,
    rollout_of,
    token,
    wait_for,
)

CHROMIUM = "/usr/bin/chromium"
NATS = {"waves": [10, 50, 100], "min_healthy": 1, "settle_seconds": 600, "max_failures": 3, "min_age_seconds": 0}
ARC = {"waves": [10, 100], "min_healthy": 3, "settle_seconds": 60, "max_failures": 1, "min_age_seconds": 0}


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[RelayServer, dict[str, Any]]]:
    """A relay whose fleet shows a bit of everything: nats rolling out (wave 2 of 3), arc halted by a
    failed install, agents that never connected (silent), one running a build no manifest named."""
    clock = Clock()
    session = requests.Session()
    with fleet_relay(tmp_path / "relay", clock) as server:
        config = get_relay(server.app).config
        nats = publish(config, "nats", "v2.10.26", rollout=NATS, built=clock())
        arc = publish(config, "arc", "v0.4.0", rollout=ARC, built=clock())
        notify(server)
        wait_for("both rollouts", lambda: rollout_of(server, "nats") and rollout_of(server, "arc"))
        agents = {a: Agent(server.url, a, session) for a in AGENTS}
        for a in members(nats, 10):
            assert agents[a].report("updated", nats, version="v2.10.26").status_code == 202
        clock.advance(601)
        wait_for("nats wave 2", lambda: rollout_of(server, "nats")["wave"] == 2)
        bad = members(arc, 10)[0]
        # builds are random, so wave members fall anywhere in AGENTS: the silent ones are picked from
        # the agents that report nothing else (at most 3 nats members and 1 failed: 18 left)
        silent = [a for a in AGENTS if agents[a].runs is None and a != bad][-6:]
        for a in AGENTS:  # the rest never connect: silent
            if agents[a].runs is None and a not in silent:
                agents[a].report("running", "e" * 64, version="v2.10.25")
        agents[bad].report("rolled_back", arc, subsystem="arc", frm="d" * 64, error="health check failed: exit 1")
        assert rollout_of(server, "arc")["state"] == "halted"
        assert all(agents[a].runs is None for a in silent) and len(silent) == 6
        yield server, {"nats": nats, "arc": arc, "failed": bad, "silent": silent}


def test_the_page_for_people(fleet: tuple[RelayServer, dict[str, Any]]) -> None:
    server, ids = fleet
    html = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    # a browser is asked for the token with a Basic challenge; a program gets the JSON
    r = requests.get(server.url + "/fleet", headers=html, timeout=5)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Basic ")
    r = requests.get(server.url + "/fleet", headers=html, auth=("operator", OPERATOR), timeout=5)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html")
    assert "<svg" in r.text and "<script" not in r.text  # readable without JavaScript
    r = requests.get(server.url + "/fleet", headers={"Authorization": f"Bearer {token(AGENTS[3])}"}, timeout=5)
    assert r.headers["Content-Type"] == "application/json" and "subsystems" in r.json()
    # agent ids and versions come from reports: escaped, never markup
    Agent(server.url, AGENTS[20], requests.Session()).report("running", "e" * 64, version="<b>x</b>")
    r = requests.get(server.url + "/fleet", headers=html, auth=("operator", OPERATOR), timeout=5)
    assert "<b>x</b>" not in r.text and "&lt;b&gt;x&lt;/b&gt;" in r.text


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "HOME": str(tmp_path)})


@pytest.mark.skipif(not Path(CHROMIUM).exists(),
                    reason=f"{CHROMIUM} is absent (apt-get install -y chromium); the page is still checked without it")
def test_the_page_in_headless_chromium(fleet: tuple[RelayServer, dict[str, Any]], tmp_path: Path) -> None:
    server, ids = fleet
    # the token as the Basic password in the URL: what a person types into the browser's prompt
    url = server.url.replace("http://", f"http://operator:{OPERATOR}@") + "/fleet"
    done = _chromium(tmp_path, "--dump-dom", url)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom))
    assert "Fleet" in text and f"{len(AGENTS)} agents known" in text
    # nats: the build rolling out, its state and wave; the chart drawn from the template
    nats = dom[dom.index('id="subsystem-nats"'):dom.index('id="subsystem-nats"') + 6000]
    assert ids["nats"][:12] in nats and "v2.10.26" in nats
    assert re.search(r"state-active\">active</span>\s*wave 2 of 3 \(50%\)", nats)
    assert "<svg" in nats and 'aria-label="rollout of nats: active' in nats
    # arc: halted, at the top of the page and in its section, with the reason
    halted = dom[dom.index('id="halted"'):]
    assert f"arc v0.4.0 (linux/amd64, build {ids['arc'][:12]})" in re.sub(r"<[^>]+>", "", halted)
    assert "1 agent(s) failed or rolled back this build (max_failures 1)" in text
    # the agents that failed or went silent
    attention = re.sub(r"<[^>]+>", " ", dom[dom.index('id="attention"'):dom.index("All agents")])
    assert ids["failed"] in attention and "health check failed: exit 1" in attention
    assert all(a in attention for a in ids["silent"])
    assert not any(a in attention for a in set(AGENTS) - set(ids["silent"]) - {ids["failed"]})
    assert "(not in a verified manifest)" in text  # the build no manifest named is shown as such

    shot = tmp_path / "fleet.png"
    done = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,800", url)
    assert done.returncode == 0 and shot.stat().st_size > 10_000, done.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("SYNC_TOOLS_UPDATE_SCREENSHOT"):  # docs/img/fleet.png is made this way
        shutil.copy(shot, Path(__file__).resolve().parent.parent / "docs" / "img" / "fleet.png")


def test_fleet_and_rollout_commands(fleet: tuple[RelayServer, dict[str, Any]]) -> None:
    server, ids = fleet
    env = {"SYNC_TOOLS_OPERATOR_TOKEN": OPERATOR, "SYNC_TOOLS_RELAY_URL": server.url}
    runner = CliRunner()

    out = runner.invoke(cli, ["fleet", "--json"], env=env)
    assert out.exit_code == 0, out.output
    view = json.loads(out.output)
    assert view["subsystems"]["nats"]["rollout"]["wave"] == 2
    assert view["subsystems"]["arc"]["rollout"]["state"] == "halted"

    out = runner.invoke(cli, ["fleet"], env=env)
    assert out.exit_code == 0, out.output
    assert f"{len(AGENTS)} agents" in out.output.splitlines()[0]
    assert f"rollout: arc v0.4.0 (linux/amd64, build {ids['arc'][:12]}): halted" in out.output
    assert ids["failed"] in out.output and "SILENT" in out.output

    out = runner.invoke(cli, ["rollout", "status", "nats"], env=env)
    assert out.exit_code == 0 and "active, wave 2 of 3 (50%)" in out.output, out.output
    out = runner.invoke(cli, ["rollout", "promote", "arc"], env=env)
    assert out.exit_code == 1 and "relay answered 409" in out.output and "resume it first" in out.output
    out = runner.invoke(cli, ["rollout", "resume", "arc", "--json"], env=env)
    assert out.exit_code == 0 and json.loads(out.output)["rollouts"][0]["state"] == "active", out.output
    out = runner.invoke(cli, ["rollout", "halt", "nats", "--reason", "error rate up"], env=env)
    assert out.exit_code == 0 and "halted" in out.output and "error rate up" in out.output
    out = runner.invoke(cli, ["rollout", "promote", "nats", "--build", ids["nats"]], env=env)
    assert out.exit_code == 1
    out = runner.invoke(cli, ["rollout", "resume", "nats"], env=env)
    out = runner.invoke(cli, ["rollout", "promote", "nats"], env=env)
    assert out.exit_code == 0 and "wave 3 of 3 (100%)" in out.output, out.output

    # one clear line on failure: a wrong token, a relay that is not there
    out = runner.invoke(cli, ["rollout", "status", "nats"], env={**env, "SYNC_TOOLS_OPERATOR_TOKEN": "wrong"})
    assert out.exit_code == 1 and "relay answered 401" in out.output
    out = runner.invoke(cli, ["fleet"], env={**env, "SYNC_TOOLS_RELAY_URL": "http://127.0.0.1:9"})
    assert out.exit_code == 1 and "cannot reach the relay" in out.output
