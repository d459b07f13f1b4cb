"""Running the relay in production as documented (issue #18): ``sync-tools relay --production`` from
any workspace, start-up errors as one line, local dispatch that needs its signing key up front and
never leaves a pin on an unreleased version, ports that do not clash with process-compose's."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from sync_tools.config import load_config
from sync_tools.errors import ConfigError
from sync_tools.relay.dispatch import LocalDispatcher
from sync_tools.relay.settings import load_settings
from tests.relay_support import delivery, env, tag_payload, write_config
from tests.servers.github_api import GitHubAPIServer
from tests.support import stop_group
from tests.workspace import make_workspace

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SYNC_TOOLS = BIN / "sync-tools"
GUNICORN = BIN / "gunicorn"
needs_gunicorn = pytest.mark.skipif(not GUNICORN.exists(), reason="needs sync-tools[prod] (gunicorn)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    err = stop_group(proc, 30)
    return proc.returncode, err.decode(errors="replace")


def _wait_healthy(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            if requests.get(url + "/health", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        assert proc.poll() is None, f"the relay exited: {proc.communicate()[1].decode()[-2000:]}"
        assert time.monotonic() < deadline, "the relay did not become healthy"
        time.sleep(0.1)


# ------------------------------------------------------------------ one command, from any workspace


@needs_gunicorn
def test_production_command_serves_from_a_workspace_outside_the_source_tree(tmp_path: Path) -> None:
    """`sync-tools relay --production --workers 2` in a workspace that is not the source checkout: gunicorn
    with the packaged settings, gevent workers, a webhook dispatched, a clean stop on SIGTERM."""
    ws = tmp_path / "workspace"
    config = write_config(ws)
    port = _free_port()
    with GitHubAPIServer() as api:
        api.state.add_repo("acme/plat-telemetry")
        e = {**os.environ, **env(ws), "GITHUB_API_URL": api.url}
        e.pop("SYNC_TOOLS_CONFIG", None)
        proc = subprocess.Popen([str(SYNC_TOOLS), "relay", "--production", "--workers", "2", "--port", str(port),
                                 "--config", str(config.path)], cwd=ws, env=e, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_healthy(url, proc)
            d = delivery("create", tag_payload(tag="v2.10.26"))
            assert requests.post(url + "/webhook", data=d.body, headers=d.headers, timeout=5).status_code == 202
            deadline = time.monotonic() + 20
            while not api.state.dispatches and time.monotonic() < deadline:
                time.sleep(0.05)
            assert api.state.dispatches[0]["client_payload"]["version"] == "v2.10.26"
        finally:
            code, err = _stop(proc)
    assert code == 0, err[-2000:]
    assert "Using worker: sync_tools.relay.gevent_worker.RelayGeventWorker" in err and err.count("Booting worker") == 2
    # nothing imported requests/ssl in the master before gevent patched them; no traceback on the way out
    assert "Traceback" not in err and "MonkeyPatchWarning" not in err, err[-3000:]


def _one_line_error(argv: list[str], cwd: Path, e: dict[str, str]) -> str:
    proc = subprocess.run(argv, cwd=cwd, env=e, capture_output=True, timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    return err.strip()


@needs_gunicorn
@pytest.mark.parametrize("drop, dispatch, extra, expected", [
    ("SYNC_TOOLS_WEBHOOK_SECRET", "github", {}, "SYNC_TOOLS_WEBHOOK_SECRET is not set"),
    ("GITHUB_TOKEN", "github", {}, "GITHUB_TOKEN is not set"),
    (None, "local", {}, "SYNC_TOOLS_SIGNING_KEY is not set"),
    (None, "github", {"SYNC_TOOLS_DB": "{root}/sync-tools.yaml/relay.db"}, "cannot make the relay database's directory"),
])
def test_production_start_up_errors_are_one_line(tmp_path: Path, drop: str | None, dispatch: str,
                                                 extra: dict[str, str], expected: str) -> None:
    config = write_config(tmp_path, dispatch=dispatch)
    e = {**os.environ, **env(tmp_path), **{k: v.format(root=tmp_path) for k, v in extra.items()}}
    if drop:
        e.pop(drop)
    err = _one_line_error([str(SYNC_TOOLS), "relay", "--production", "--port", str(_free_port()),
                           "--config", str(config.path)], tmp_path, e)
    assert err.startswith("Error: ") and expected in err


@needs_gunicorn
def test_gunicorn_with_the_source_tree_config_fails_without_tracebacks(tmp_path: Path) -> None:
    """`gunicorn -c relay/gunicorn.conf.py relay.wsgi:app` (the source checkout's wiring) checks the
    settings in the master: the error is one line of ours, and no worker_exit AttributeError."""
    config = write_config(tmp_path)
    e = {**os.environ, **env(tmp_path), "SYNC_TOOLS_CONFIG": str(config.path),
         "RELAY_BIND": f"127.0.0.1:{_free_port()}"}
    e.pop("GITHUB_TOKEN")
    proc = subprocess.run([str(GUNICORN), "-c", str(ROOT / "relay/gunicorn.conf.py"), "--chdir", str(ROOT),
                           "relay.wsgi:app"], cwd=tmp_path, env=e, capture_output=True, timeout=60)
    err = proc.stderr.decode()
    assert proc.returncode != 0
    assert "Traceback" not in err and "AttributeError" not in err and "Booting worker" not in err, err
    assert [line for line in err.splitlines() if "GITHUB_TOKEN is not set" in line] == [
        f"sync-tools relay: {config.path}: relay.dispatch is 'github' but GITHUB_TOKEN is not set (it needs a "
        "token allowed to create repository_dispatch events on acme/plat-telemetry)"]


def test_process_compose_runs_the_production_command_on_its_own_port() -> None:
    pc = yaml.safe_load((ROOT / "relay/process-compose.yaml").read_text())
    relay = pc["processes"]["relay"]
    argv = shlex.split(relay["command"])
    assert argv[:3] == ["sync-tools", "relay", "--production"]
    from sync_tools.cli.relay import relay as command

    ctx = command.make_context("relay", argv[2:])  # the entry's arguments are ones the command takes
    assert ctx.params["production"] and ctx.params["port"] == 9191
    for probe in ("readiness_probe", "liveness_probe"):
        assert relay[probe]["http_get"]["port"] == 9191
    tunnel = yaml.safe_load((ROOT / "relay/cloudflared.yml").read_text())
    services = {r["service"] for r in tunnel["ingress"] if r["service"].startswith("http:")}
    assert services == {"http://127.0.0.1:9191"}  # the ingest server (9193) is optional, off by default
    ingest = shlex.split(pc["processes"]["relay-ingest"]["command"])
    ctx = command.make_context("relay", ingest[2:])
    assert ctx.params["production"] and ctx.params["ingest"]
    assert ctx.get_parameter_source("port").name == "DEFAULT"  # so: 9193 (INGEST_PORT)
    from sync_tools.relay.production import INGEST_PORT

    assert pc["processes"]["relay-ingest"]["readiness_probe"]["http_get"]["port"] == INGEST_PORT == 9193


# ------------------------------------------------------------------------------------ default ports


def test_default_ports_do_not_clash_with_process_compose() -> None:
    """process-compose's API is 8080 (the agent's fallback); plat-telemetry's own sync service is 9090."""
    from sync_tools import doctor
    from sync_tools.cli.agent import watch
    from sync_tools.cli.relay import relay

    def default(cmd, name):  # type: ignore[no-untyped-def]
        return next(p.default for p in cmd.params if p.name == name)

    ports = {"relay": default(relay, "port"), "watch": default(watch, "port"), "process-compose": doctor.PC_DEFAULT_PORT}
    assert ports == {"relay": 9191, "watch": 9192, "process-compose": 8080}
    assert doctor.RELAY_DEFAULT_PORT == 9191
    from sync_tools.relay.gunicorn_conf import bind

    assert bind == "127.0.0.1:9191"


# ------------------------------------------------------------------------------------ dispatch: local


def test_local_dispatch_refuses_to_start_without_the_signing_key(tmp_path: Path) -> None:
    config = write_config(tmp_path, dispatch="local")
    with pytest.raises(ConfigError, match="relay.dispatch is 'local' but SYNC_TOOLS_SIGNING_KEY is not set"):
        load_settings(config, env(tmp_path))
    other = write_config(tmp_path / "other")  # a key pair of its own: not the one agents pin
    with pytest.raises(ConfigError, match="does not belong to release.public_key"):
        load_settings(config, env(tmp_path, SYNC_TOOLS_SIGNING_KEY=str(other.root / "keys/release.key")))
    good = load_settings(config, env(tmp_path, SYNC_TOOLS_SIGNING_KEY=str(tmp_path / "keys/release.key")))
    assert good.webhook_secret
    # the read-only views (--status, --retry-dead) need no key
    assert load_settings(config, {}, require_secret=False).db_path.name == "relay.db"


def test_a_pin_moves_only_when_its_release_succeeded(tmp_path: Path) -> None:
    ws = make_workspace(tmp_path / "ws", ["nats"], platforms=("linux/amd64",))
    ws.release_upstream("nats", "v1.1.0")
    before = ws.config_path.read_bytes()
    no_key = ws.env()
    no_key.pop("SYNC_TOOLS_SIGNING_KEY")
    disp = LocalDispatcher(ws.config_path, tmp_path / "logs", env=no_key, timeout=300)
    with pytest.raises(Exception, match="sync-tools release --only nats exited"):
        disp.dispatch({"subsystem": "nats", "version": "v1.1.0", "delivery": "d-1"})
    log = next((tmp_path / "logs" / "nats").iterdir()).read_text()
    assert "(pin updated)" in log and "no signing key" in log  # the build ran and moved the pin first
    assert ws.config_path.read_bytes() == before  # ... and it was put back, byte for byte
    assert load_config(ws.config_path).subsystems["nats"].current == "v1.0.0"

    LocalDispatcher(ws.config_path, tmp_path / "logs", env=ws.env(), timeout=300).dispatch(
        {"subsystem": "nats", "version": "v1.1.0", "delivery": "d-2"})
    assert load_config(ws.config_path).subsystems["nats"].current == "v1.1.0"


# -------------------------------------------------------------------- an older version: 200 ignored


def test_a_version_older_than_the_one_dispatched_is_answered_ignored(tmp_path: Path) -> None:
    from tests.relay_support import running_relay
    from tests.support import wait_for

    with GitHubAPIServer() as api, running_relay(tmp_path, api) as server:
        api.state.add_repo("acme/plat-telemetry")
        d = delivery("create", tag_payload(tag="v2.10.26"))
        assert requests.post(server.url + "/webhook", data=d.body, headers=d.headers, timeout=5).status_code == 202
        from sync_tools.relay.app import get_relay

        outbox = get_relay(server.app).outbox  # the job is done once the dispatched version is recorded
        wait_for(lambda: outbox.get_state("dispatched:nats") == "v2.10.26", timeout=20, what="the dispatch")
        old = delivery("create", tag_payload(tag="v2.10.25"))
        r = requests.post(server.url + "/webhook", data=old.body, headers=old.headers, timeout=5)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ignored"
        assert r.json()["reasons"] == ["nats v2.10.25 is older than v2.10.26, which was already dispatched"]
        newer = delivery("create", tag_payload(tag="v2.10.27"))
        assert requests.post(server.url + "/webhook", data=newer.body, headers=newer.headers,
                             timeout=5).status_code == 202
        wait_for(lambda: len(api.state.dispatches) == 2, timeout=20, what="the dispatch of v2.10.27")
    assert [x["client_payload"]["version"] for x in api.state.dispatches] == ["v2.10.26", "v2.10.27"]


# ------------------------------------------------------------------------------ sync-tools notify


def test_notify_sends_the_signed_notification_after_a_release_by_hand(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from sync_tools.cli import cli
    from sync_tools.relay.app import get_relay
    from tests.relay_support import SECRET, publish, running_relay
    from tests.support import wait_for

    runner = CliRunner()
    with GitHubAPIServer() as api, running_relay(tmp_path, api) as server:
        config = load_config(tmp_path / "sync-tools.yaml")
        publish(config, "nats", "v2.10.25")  # what `sync-tools release` by hand leaves in the store
        args = ["notify", "--config", str(config.path), "--relay", server.url]
        r = runner.invoke(cli, [*args, "--delivery", "by-hand-1"], env={"SYNC_TOOLS_NOTIFY_SECRET": SECRET})
        assert r.exit_code == 0, r.output
        assert r.output.strip() == "relay accepted: release latest (delivery by-hand-1)"
        outbox = get_relay(server.app).outbox
        wait_for(lambda: outbox.last_event_id() == 1, timeout=20, what="the release event")
        assert [e.data["subsystems"] for e in outbox.events_since(0)] == [["nats"]]
        # the same notification again acts once
        r = runner.invoke(cli, [*args, "--delivery", "by-hand-1"], env={"SYNC_TOOLS_NOTIFY_SECRET": SECRET})
        assert r.output.strip() == "relay duplicate: release latest (delivery by-hand-1)"
        # a wrong secret: the relay's refusal, one line, exit 1
        r = runner.invoke(cli, args, env={"SYNC_TOOLS_NOTIFY_SECRET": "wrong"})
        assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
        assert r.output.startswith(f"Error: the relay at {server.url}/notify answered 401: ")
        r = runner.invoke(cli, args, env={"SYNC_TOOLS_NOTIFY_SECRET": "", "SYNC_TOOLS_WEBHOOK_SECRET": ""})
        assert r.exit_code == 1 and "SYNC_TOOLS_NOTIFY_SECRET is not set" in r.output
    r = runner.invoke(cli, [*args], env={"SYNC_TOOLS_NOTIFY_SECRET": SECRET})  # the relay has stopped
    assert r.exit_code == 1 and r.output == f"Error: cannot reach the relay at {server.url}/notify: connection refused\n"
