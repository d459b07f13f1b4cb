"""The agent's commands, and SIGKILL of a real agent process between every pair of install steps."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sync_tools.agent.install import CRASH_ENV, STEPS
from sync_tools.cli import cli
from sync_tools.versionfile import read_version
from tests.agent_support import World, snapshot


def _cli(world: World, *args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, [*args, "--config", str(world.config_path)], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def _agent_proc(world: World, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "sync_tools", "agent", "--once", "--json", "--source",
                           world.server.url, "--config", str(world.config_path)],
                          env=env, capture_output=True, text=True, timeout=60)


def test_sigkill_between_every_install_step_leaves_a_verified_binary(world: World) -> None:
    """For each step: the agent SIGKILLs itself right after it; the binary at the path is then exactly
    the old or the new one (never partial), and a restarted agent ends with the new one healthy."""
    others = snapshot([world.root / "arc"]), world.supervisor.pid("arc")
    path = world.bin_path("nats")
    for i, step in enumerate(STEPS):
        old = path.read_bytes()
        new = world.publish("nats", f"v{i + 2}")
        crashed = _agent_proc(world, {CRASH_ENV: step})
        assert crashed.returncode == -9, (step, crashed.stderr[-2000:])
        assert path.read_bytes() in (old, new), step
        assert os.access(path, os.X_OK)
        restarted = _agent_proc(world)
        assert restarted.returncode == 0, (step, restarted.stderr[-2000:])
        assert path.read_bytes() == new, step
        assert read_version(path.parent).checksum == hashlib.sha256(new).hexdigest(), step
        assert world.health("nats").startswith(f"nats-v{i + 2}"), step
        assert not list(path.parent.glob(".*.staged")), step
        assert not list((world.root / ".sync-tools" / "journal").glob("*.json")), step
        assert not list((world.root / ".sync-tools" / "downloads").iterdir()), step
    assert (snapshot([world.root / "arc"]), world.supervisor.pid("arc")) == others


def test_agent_once_installs_from_scratch_and_reports_json(world: World) -> None:
    world.supervisor.rpc().supervisor.stopProcess("nats", True)
    bin_dir = world.root / "nats" / ".bin"
    for p in sorted(bin_dir.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    code, out, err = _cli(world, "agent", "--once", "--json", "--source", world.server.url)
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"] and report["subsystems"]["nats"]["action"] == "updated"
    assert report["subsystems"]["arc"]["action"] == "unchanged"
    assert world.health("nats").startswith("nats-v1")
    assert not (bin_dir / ".previous").exists()


def test_agent_once_reads_a_local_store_too(world: World) -> None:
    world.publish("nats", "v2")
    code, out, err = _cli(world, "agent", "--once", "--source", str(world.store.store))
    assert code == 0, err
    assert "nats" in out and "updated" in out
    assert world.health("nats").startswith("nats-v2")


def test_agent_once_exits_1_on_a_refused_release(world: World) -> None:
    world.store.expire()
    code, out, err = _cli(world, "agent", "--once", "--json", "--source", world.server.url)
    assert code == 1
    assert "expired" in json.loads(out)["error"]


def test_agent_once_exits_1_with_one_line_when_an_update_rolls_back(world: World) -> None:
    world.publish("nats", "v2", mode="crash")
    cfg = world.config_path.read_text().replace("health_timeout: 5.0", "health_timeout: 3")
    world.config_path.write_text(cfg)
    code, out, err = _cli(world, "agent", "--once", "--source", world.server.url)
    assert code == 1
    assert "rolled_back" in out
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "nats rolled_back: new binary unhealthy" in line[0]
    assert world.health("nats").startswith("nats-v1")


def test_status_reports_versions_running_state_and_drift(world: World) -> None:
    code, out, err = _cli(world, "status", "--json")
    assert code == 0, err
    st = json.loads(out)
    assert st["nats"]["version"] == "v1" and st["nats"]["running"]["status"] == "RUNNING"
    assert st["nats"]["sha256"] == world.sha("nats") and st["nats"]["drift"] is False
    world.bin_path("arc").write_bytes(b"hand-edited\n")
    st = json.loads(_cli(world, "status", "--json")[1])
    assert st["arc"]["drift"] is True
    code, out, _ = _cli(world, "status")
    assert code == 0 and "DRIFT" in out and "RUNNING" in out


def test_rollback_command(world: World) -> None:
    v1 = world.bin_path("nats").read_bytes()
    world.publish("nats", "v2")
    assert _cli(world, "agent", "--once", "--source", world.server.url)[0] == 0
    code, out, err = _cli(world, "rollback", "nats")
    assert code == 0, err
    assert "healthy" in out
    assert world.bin_path("nats").read_bytes() == v1
    assert world.health("nats").startswith("nats-v1")
    code, out, err = _cli(world, "rollback", "nope")
    assert code == 1 and "unknown subsystem 'nope'" in err


def test_errors_are_one_line(world: World, tmp_path: Path) -> None:
    cfg = tmp_path / "bare.yaml"
    cfg.write_text("subsystems:\n  a:\n    upstream: /dev/null\n")
    r = CliRunner().invoke(cli, ["agent", "--once", "--config", str(cfg)])
    assert r.exit_code == 1 and "no release source" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = CliRunner().invoke(cli, ["watch", "--config", str(cfg)], env={"SYNC_TOOLS_AGENT_SECRET": ""})
    assert r.exit_code == 1 and "refusing to accept unverified webhooks" in r.stderr
    r = CliRunner().invoke(cli, ["agent", "--config", str(world.config_path)])
    assert r.exit_code == 1 and "nothing to wait for" in r.stderr


@pytest.mark.parametrize("command", ["agent", "status", "rollback", "watch"])
def test_every_agent_command_has_help_with_an_example(command: str) -> None:
    r = CliRunner().invoke(cli, [command, "--help"])
    assert r.exit_code == 0 and "Example:" in r.stdout and "--config" in r.stdout


def test_watch_in_dev_mode_builds_the_named_subsystem_and_an_upstream_release_newer_than_the_pin(tmp_path: Path) -> None:
    import time
    from datetime import UTC, datetime

    import requests
    from standardwebhooks.webhooks import Webhook

    from tests.agent_support import free_port, wait_http
    from tests.workspace import make_workspace

    ws = make_workspace(tmp_path / "ws", platforms=("linux/amd64",), git=False)
    secret = "whsec_ZGV2LXdhdGNoLXNlY3JldC0wMTIz"
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sync_tools", "watch", "--mode", "dev", "--port", str(port),
                             "--config", str(ws.config_path)], cwd=ws.root,
                            env=ws.env(SYNC_TOOLS_AGENT_SECRET=secret), stderr=subprocess.DEVNULL)
    try:
        assert json.loads(wait_http(f"http://127.0.0.1:{port}/health", timeout=20))["mode"] == "dev"
        body = json.dumps({"type": "release.updated", "subsystems": ["nats"]})
        ts = datetime.now(UTC)
        headers = {"webhook-id": "dev-1", "webhook-timestamp": str(int(ts.timestamp())),
                   "webhook-signature": Webhook(secret).sign("dev-1", ts, body),
                   "content-type": "application/json"}
        r = requests.post(f"http://127.0.0.1:{port}/webhook", data=body, headers=headers, timeout=5)
        assert r.status_code == 202
        manifest = ws.release_dir / "manifest.json"
        deadline = time.monotonic() + 90
        while not manifest.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert manifest.exists(), "no release after the event"
        subs = json.loads(manifest.read_text())["subsystems"]
        assert list(subs) == ["nats"] and "linux/amd64" in subs["nats"]["assets"]
        assert not (ws.root / "arc" / ".bin").exists()

        # An upstream's own GitHub webhook, classified as the relay does: the announced version is built
        # (and the pin moves here); a new major under major: manual, or a malformed body, is not.
        import hmac

        from tests.relay_support import fixture

        new_commit = ws.release_upstream("nats", "v1.1.0")
        ws.release_upstream("nats", "v2.0.0")

        def github(tag: str, delivery: str, body: bytes | None = None) -> requests.Response:
            if body is None:
                payload = fixture("release.published.0.json")
                payload["release"]["tag_name"] = tag
                payload["repository"]["clone_url"] = f"file://{ws.upstreams['nats']}.git"
                # every repository field must name the upstream (issue #20), not only clone_url
                payload["repository"]["full_name"] = "local/nats"
                for k in ("html_url", "git_url", "ssh_url", "svn_url"):
                    payload["repository"].pop(k, None)
                body = json.dumps(payload).encode()
            sig = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
            return requests.post(f"http://127.0.0.1:{port}/webhook", data=body, timeout=5, headers={
                "X-Hub-Signature-256": sig, "X-GitHub-Event": "release", "X-GitHub-Delivery": delivery,
                "content-type": "application/json"})

        r = github("v2.0.0", "gh-1")
        assert (r.status_code, r.json()["status"]) == (200, "ignored") and "new major" in r.json()["reason"]
        r = github("", "gh-2", body=b'{"action": "published"}')
        assert r.status_code == 400 and "release" in r.json()["error"]
        r = github("v1.1.0", "gh-3")
        assert r.status_code == 202, r.text
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            nats = json.loads(manifest.read_text())["subsystems"]["nats"]
            if nats.get("version") == "v1.1.0":
                break
            time.sleep(0.1)
        assert nats["version"] == "v1.1.0" and nats["commit"] == new_commit, nats
        assert "current: v1.1.0" in ws.config_path.read_text()  # built with --version: the pin moved
        assert github("v1.1.0", "gh-3").json()["status"] == "duplicate"
    finally:
        proc.terminate()
        proc.wait(10)


def test_rollback_help_says_the_build_rolled_away_from_is_held_back() -> None:
    r = CliRunner().invoke(cli, ["rollback", "--help"])
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "held back" in text and "until the release publishes a new build of NAME" in text
