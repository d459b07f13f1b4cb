"""The CLI as a user runs it (found by a review; each test failed before its fix): answers that are not
the relay's JSON, a missing token blamed on a config, bad push secrets, paths that cannot be made,
exception class names instead of causes, a rollback root that does not exist, status that hid a
corrupt state or a missing binary, start-up reports of agent-only configs, a failed rollback silent
on stderr. Real processes, or click's CliRunner as the other CLI tests do; no mocks."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from sync_tools.cli import cli
from tests.cli_support import SYNC_TOOLS, cli_workspace, closed_port
from tests.support import serve_http

NOISE = ("Traceback", "MaxRetryError", "HTTPConnectionPool", "NewConnectionError", "FileNotFoundError", "[Errno",
         "Error:  ", "NoneType")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNC_TOOLS_")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def _run(cwd: Path, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SYNC_TOOLS, *args], cwd=cwd, env=_env(**env), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The process failed with exit 1 and one clean line on stderr; that line."""
    for noise in NOISE:
        assert noise not in proc.stderr, proc.stderr
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ------------------------------------------------------------------ a relay that is not what it seems


class _NotARelay(http.server.BaseHTTPRequestHandler):
    """What sits at a relay URL that is a little wrong: a redirect (http:// in front of an https-only
    tunnel), or a web page answering 200 with HTML."""

    def _answer(self) -> None:
        if self.path.startswith("/moved"):
            self.send_response(301)
            self.send_header("Location", "https://relay.example.org" + self.path[len("/moved"):])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"<html><body>it works</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = _answer
    do_POST = _answer

    def log_message(self, *a: object) -> None:
        pass


@pytest.fixture
def not_a_relay() -> Iterator[str]:
    with serve_http(_NotARelay) as server:
        yield server.url


@pytest.mark.parametrize("path", ["/moved", ""], ids=["redirect", "html-200"])
@pytest.mark.parametrize("args", [["fleet"], ["rollout", "status", "nats"], ["rollout", "halt", "nats"]],
                         ids=["fleet", "rollout-status", "rollout-halt"])
def test_fleet_and_rollout_against_an_answer_that_is_not_the_relays_are_one_line_errors(
        tmp_path: Path, not_a_relay: str, path: str, args: list[str]) -> None:
    """sync_tools/cli/fleet.py `call` returns None for a 2xx/3xx answer that is not JSON, and the
    commands then index it: a TypeError traceback."""
    proc = _run(tmp_path, *args, "--relay", not_a_relay + path, SYNC_TOOLS_OPERATOR_TOKEN="op-token")
    line = _one_line_error(proc)
    assert not_a_relay in line


def test_fleet_json_against_a_redirect_is_not_null_and_exit_0(tmp_path: Path, not_a_relay: str) -> None:
    """`fleet --json` printed `null` and exited 0 when the relay URL redirected: a script reading it sees
    success and no data."""
    proc = _run(tmp_path, "fleet", "--json", "--relay", not_a_relay + "/moved", SYNC_TOOLS_OPERATOR_TOKEN="op-token")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert proc.stdout.strip() != "null"


def test_fleet_with_relay_but_no_token_names_the_token_not_a_missing_config(tmp_path: Path) -> None:
    """An operator's laptop has no sync-tools.yaml: `fleet --relay URL` without the operator token said
    "no sync-tools.yaml here; pass --config FILE", when what is missing is SYNC_TOOLS_OPERATOR_TOKEN."""
    proc = _run(tmp_path, "fleet", "--relay", f"http://127.0.0.1:{closed_port()}")
    line = _one_line_error(proc)
    assert "SYNC_TOOLS_OPERATOR_TOKEN" in line, line


@pytest.mark.parametrize("args, env", [
    (["fleet"], {"SYNC_TOOLS_OPERATOR_TOKEN": "op-token"}),
    (["rollout", "status", "nats"], {"SYNC_TOOLS_OPERATOR_TOKEN": "op-token"}),
    (["notify"], {"SYNC_TOOLS_NOTIFY_SECRET": "s"}),
], ids=["fleet", "rollout", "notify"])
def test_an_unreachable_relay_says_why_not_an_exception_class(tmp_path: Path, args: list[str],
                                                              env: dict[str, str]) -> None:
    """fleet/rollout/notify said "cannot reach the relay at URL: ConnectionError" (the class name of
    requests' exception) where `agent --once` says "connection refused" (sync_tools.errtext.describe):
    a refused port, an unknown host and a TLS failure all read the same."""
    cli_workspace(tmp_path, make_root=True)
    proc = _run(tmp_path, *args, "--relay", f"http://127.0.0.1:{closed_port()}", **env)
    line = _one_line_error(proc)
    assert line.endswith("connection refused"), line


# ------------------------------------------------------------------------- push secrets


def _wait_or_stop(proc: subprocess.Popen[str], seconds: float) -> tuple[str, str, bool]:
    """(stdout, stderr, still_running): wait up to *seconds*, then stop it."""
    try:
        out, err = proc.communicate(timeout=seconds)
        return out, err, False
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        return out, err, True


def test_watch_in_dev_mode_takes_a_github_webhook_secret_of_any_length(tmp_path: Path) -> None:
    """A DEV machine's `watch` verifies GitHub's X-Hub-Signature-256 (HMAC with any text secret), yet
    WebhookVerifier (sync_tools/agent/events.py:242) also feeds the secret to standardwebhooks, which
    base64-decodes it: a GitHub secret of 5 characters ("abcde") kills `watch` with a binascii traceback."""
    cli_workspace(tmp_path, make_root=True)
    (tmp_path / "nats" / ".src").mkdir(parents=True)
    proc = subprocess.Popen([SYNC_TOOLS, "watch", "--mode", "dev", "--port", "0"], cwd=tmp_path,
                            env=_env(SYNC_TOOLS_AGENT_SECRET="abcde"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err, running = _wait_or_stop(proc, 10)
    assert "Traceback" not in err, err
    assert running and "watching (dev)" in err, err


def test_a_push_secret_that_is_not_whsec_base64_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    """USER mode: a malformed $SYNC_TOOLS_AGENT_SECRET (here "abcde") ended `watch` (and `agent` with
    agent.listen) with a binascii.Error traceback from standardwebhooks, after a full reconcile."""
    cli_workspace(tmp_path, make_root=True)
    proc = subprocess.Popen([SYNC_TOOLS, "watch", "--mode", "user", "--port", "0"], cwd=tmp_path,
                            env=_env(SYNC_TOOLS_AGENT_SECRET="abcde"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err, running = _wait_or_stop(proc, 20)
    assert "Traceback" not in err and "binascii" not in err, err
    if not running:
        assert proc.returncode == 1, err


# --------------------------------------------------------------------- paths the user gives


def test_keys_generate_into_a_directory_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    """`keys generate --out DIR` where DIR cannot be created (read-only mount, no permission; here: under
    a file) ended with a NotADirectoryError traceback (sync_tools/signing.py:44 via cli/pipeline.py)."""
    (tmp_path / "afile").write_text("x")
    proc = _run(tmp_path, "keys", "generate", "--out", str(tmp_path / "afile" / "keys"))
    line = _one_line_error(proc)
    assert str(tmp_path / "afile") in line


def test_package_into_a_dist_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    """`package --dist DIR` that cannot be created: a traceback (sync_tools/package.py mkdir)."""
    from tests.workspace import make_workspace

    ws = make_workspace(tmp_path / "ws", ["nats"])
    built = subprocess.run([SYNC_TOOLS, "build", "--only", "nats", "--platform", "linux/amd64"], cwd=ws.root,
                           env=ws.env(), capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    (tmp_path / "afile").write_text("x")
    proc = subprocess.run([SYNC_TOOLS, "package", "--only", "nats", "--platform", "linux/amd64", "--dist",
                           str(tmp_path / "afile" / "dist")], cwd=ws.root, env=ws.env(), capture_output=True,
                          text=True, timeout=120)
    _one_line_error(proc)


def test_rollback_with_a_root_that_does_not_exist_is_that_error_and_creates_nothing(tmp_path: Path) -> None:
    """`status --root NOPE` says the root does not exist; `rollback nats --root NOPE` (a typo) made
    NOPE/.sync-tools/agent.lock and said "NOPE/nats/.bin: no previous binary to go back to"."""
    cli_workspace(tmp_path, make_root=True)
    nope = tmp_path / "nope"
    proc = _run(tmp_path, "rollback", "nats", "--root", str(nope))
    line = _one_line_error(proc)
    assert "does not exist" in line, line
    assert not nope.exists()


# ------------------------------------------------------------------------- status shows what is true


def _cli(config_path: Path, *args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(cli, [*args, "--config", str(config_path)])
    return r.exit_code, r.stdout, r.stderr


def test_status_text_says_when_the_agent_state_is_corrupt(world) -> None:  # type: ignore[no-untyped-def]
    """With a corrupt agent-state.json every agent run fails ("corrupt agent state ... remove it to start
    over"), and held-back builds cannot be known; `status --json` carries `state_error`, but the text
    status printed a clean table and exit 0 (sync_tools/cli/status_text.py `_notes` ignores it)."""
    state = world.root / ".sync-tools" / "agent-state.json"
    state.parent.mkdir(parents=True, exist_ok=True)
    state.write_text("{not json")
    code, out, err = _cli(world.config_path, "agent", "--once", "--source", world.server.url)
    assert code == 1 and "corrupt agent state" in err
    code, out, err = _cli(world.config_path, "status")
    assert "agent-state.json" in out + err, (code, out, err)


def test_status_says_when_the_installed_binary_is_gone(world) -> None:  # type: ignore[no-untyped-def]
    """.version says v1 with a checksum, the binary is gone: `verify` says missing-binary and exits 1,
    `status` shows arc at v1 with `drift: false` and no note at all."""
    world.supervisor.rpc().supervisor.stopProcess("arc", True)
    world.bin_path("arc").unlink()
    code, out, err = _cli(world.config_path, "verify", "--root", str(world.root))
    assert code == 1 and "missing-binary" in out
    code, out, err = _cli(world.config_path, "status")
    notes = [line for line in out.splitlines()[3:] if line.startswith("arc: ")]
    assert notes, out
    st = json.loads(_cli(world.config_path, "status", "--json")[1])["arc"]
    assert st["drift"] is True or st.get("version") is None, st


# ------------------------------------------------------------------ reports to the relay at start


def test_an_agent_only_config_reports_what_runs_at_start(tmp_path: Path) -> None:
    """docs/agent.md: at start the daemon sends one `running` report per installed subsystem. With the
    documented agent-only config (no `subsystems:`), `running_reports` (sync_tools/agent/report.py:130)
    walks `config.subsystems` only, so such an agent reports nothing: the fleet view does not know what
    it runs until its next install."""
    from sync_tools.agent.report import running_reports
    from tests.agent_support import PLATFORM, close_world, make_world

    world = make_world(tmp_path / "w", {"nats": "nats-server", "arc": "arc"})
    try:
        cfg = tmp_path / "w" / "agent.yaml"
        cfg.write_text("release:\n  public_key: keys/release.pub\n"
                       f"agent:\n  root: root\n  reload: supervisor\n  supervisor_url: {world.supervisor.url}\n"
                       f"  platform: {PLATFORM}\n  health_timeout: 5\n  settle_seconds: 0\n")
        world.config_path = cfg
        agent = world.agent()
        assert set(agent.status()) == {"nats", "arc"}  # status does find them
        reports = running_reports(agent, agent_name="web-01")
        assert {r.subsystem: r.to_sha for r in reports} == {"nats": world.sha("nats"), "arc": world.sha("arc")}
    finally:
        close_world(world)


def test_a_failed_rollback_says_so_on_stderr(world) -> None:  # type: ignore[no-untyped-def]
    """A rollback whose previous binary is unhealthy exits 1, but its error went to stdout only (inside
    the "nats: a -> b (...)" line) and stderr stayed empty, unlike `agent --once`, which ends a failure
    with one `error:` line on stderr (README: "1 on an error (one line on stderr)")."""
    world.publish("nats", "v2")
    code, out, err = _cli(world.config_path, "agent", "--once", "--source", world.server.url)
    assert code == 0, err
    cfg = world.config_path.read_text()
    health = f"http://127.0.0.1:{world.ports['nats']}/health"
    world.config_path.write_text(cfg.replace(health, f"http://127.0.0.1:{closed_port()}/health")
                                 .replace("health_timeout: 5.0", "health_timeout: 1"))
    code, out, err = _cli(world.config_path, "rollback", "nats")
    assert code == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "unhealthy" in lines[0], (out, err)


def test_a_health_url_that_refuses_is_described_not_named_by_exception_class(world) -> None:  # type: ignore[no-untyped-def]
    """A health URL that refuses connections: the agent's one-line error (and the report sent to the
    relay, and `rollback`'s line) read "http://.../health: MaxRetryError" (sync_tools/agent/health.py:40
    formats type(e).__name__), the very text the rules exclude, where errtext.describe says "connection
    refused"."""
    world.publish("nats", "v2")
    cfg = world.config_path.read_text()
    health = f"http://127.0.0.1:{world.ports['nats']}/health"
    world.config_path.write_text(cfg.replace(health, f"http://127.0.0.1:{closed_port()}/health")
                                 .replace("health_timeout: 5.0", "health_timeout: 1"))
    code, out, err = _cli(world.config_path, "agent", "--once", "--source", world.server.url)
    assert code == 1, (out, err)
    assert "MaxRetryError" not in out + err, (out, err)
    assert "connection refused" in err, err
