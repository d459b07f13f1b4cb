"""Restarts through a process manager that fails (found by a review; each test failed before its fix):
an answer that trickles, a 500 that must not hold back a good build, an owed restart forgotten when
the build is skipped, a kill inside an owed restart with the release out of reach. Real processes, the process-compose
double (tests/servers/process_compose.py, subclassed only to make it fail the way a real manager can),
and loopback servers. Nothing of the code under test is mocked."""

from __future__ import annotations

import hashlib
import http.server
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sync_tools.agent.fetch import HTTPFetcher
from sync_tools.agent.reload import NoReloader, ProcessComposeReloader, ReloadError, SupervisorReloader
from sync_tools.agent.runner import Agent
from sync_tools.agent.state import load_state
from sync_tools.config import parse_config
from tests.agent_support import SERVICE_PY, ReleaseStore, StoreServer, service_binary, wait_http
from tests.servers.process_compose import ProcessComposeServer
from tests.support import free_port, in_thread, serve_http, trickle_until_stopped

# ------------------------------------------------------------------ a manager that answers slowly


class _TrickleManager(http.server.BaseHTTPRequestHandler):
    """A process manager (process-compose GET, or supervisord's XML-RPC POST) that answers 200 and
    then sends its body one byte every 0.2 s: every read succeeds well inside any socket timeout."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *a: object) -> None:
        pass

    def _reply(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "1000000")
        self.end_headers()
        trickle_until_stopped(self, 0.2)

    do_GET = do_POST = do_PATCH = _reply  # noqa: N815


@pytest.fixture
def trickle_manager() -> Iterator[str]:
    with serve_http(_TrickleManager) as srv:
        yield srv.url


@pytest.mark.parametrize("backend", ["process-compose", "supervisor"])
def test_a_process_manager_that_trickles_its_answer_cannot_hang_the_restart(trickle_manager: str,
                                                                            backend: str) -> None:
    """Each call has a 2 s timeout and the whole restart 3 s more; a manager that keeps the answer coming
    one byte at a time must still end the restart (ReloadError) in a bounded time, not after ~55 hours."""
    if backend == "process-compose":
        r: Any = ProcessComposeReloader(trickle_manager, timeout=2.0, ready_timeout=3.0, poll=0.05)
    else:
        r = SupervisorReloader(trickle_manager, timeout=2.0)
    err = in_thread(lambda: r.restart("nats"), 20.0,
                    "still waiting on the process manager after 20.0s: no total deadline")
    assert isinstance(err, ReloadError), err


# ---------------------------------------------------------- process-compose that fails on purpose


class _FlakyPC(ProcessComposeServer):
    """The double, with the calls named in *fail* (method -> call numbers, 1-based) answered HTTP 500 as a
    process-compose that is itself restarting or overloaded would."""

    def __init__(self, *a: Any, fail: dict[str, set[int]], **kw: Any):
        super().__init__(*a, validate=False, **kw)
        self.fail = fail
        self.calls: dict[str, int] = {}

    def _count(self, what: str) -> bool:
        self.calls[what] = self.calls.get(what, 0) + 1
        return self.calls[what] in self.fail.get(what, set())

    def restart(self, name: str) -> tuple[int, dict[str, Any]]:
        if self._count("restart"):
            return 500, {"error": "internal error"}
        return super().restart(name)

    def start(self, name: str) -> tuple[int, dict[str, Any]]:
        if self._count("start"):
            return 500, {"error": "internal error"}
        return super().start(name)


class _PCWorld:
    def __init__(self, base: Path):
        self.base = base
        (base / "svc.py").write_text(SERVICE_PY)
        self.store = ReleaseStore(base / "store", Ed25519PrivateKey.generate())
        self.root = base / "root"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/health"
        self.v1 = self.publish("v1")
        self.server = StoreServer(self.store.dir).__enter__()
        bare = parse_config(base / "sync-tools.yaml", {
            "subsystems": {"nats": {"upstream": "/dev/null", "binary": "nats"}}, "agent": {"root": str(self.root)}})
        first = Agent(bare, fetcher=HTTPFetcher(self.server.url), public_key=self.store.key.public_key(),
                      platform="linux/amd64", reloader=NoReloader()).reconcile()
        assert first.ok, first

    def publish(self, version: str, mode: str = "ok") -> bytes:
        data = service_binary(self.base / "svc.py", f"nats-{version}", mode=mode)
        self.store.publish("nats", "nats", data, version)
        return data

    @property
    def binary(self) -> Path:
        return self.root / "nats" / ".bin" / "nats"

    def procs(self) -> dict[str, tuple[list[str], dict[str, str]]]:
        return {"nats": ([str(self.binary)], {"PORT": str(self.port)})}

    def agent(self, reloader: Any) -> Agent:
        config = parse_config(self.base / "sync-tools.yaml", {
            "subsystems": {"nats": {"upstream": "/dev/null", "binary": "nats", "health": self.url}},
            "agent": {"root": str(self.root), "health_timeout": 2, "settle_seconds": 0}})
        return Agent(config, fetcher=HTTPFetcher(self.server.url), public_key=self.store.key.public_key(),
                     platform="linux/amd64", reloader=reloader)

    def close(self) -> None:
        self.server.__exit__(None, None, None)


@pytest.fixture
def pcw(tmp_path: Path) -> Iterator[_PCWorld]:
    w = _PCWorld(tmp_path)
    try:
        yield w
    finally:
        w.close()


def test_one_failed_restart_call_does_not_hold_back_a_good_build_for_good(pcw: _PCWorld) -> None:
    """process-compose answers the restart of a good build with one HTTP 500 (and works again a moment
    later). The agent may put the old binary back, but it never ran the new one: the build did not fail
    its health check, and once the manager answers again the next reconcile must install it, not skip it
    as "failed its health check" until the release changes."""
    good = pcw.publish("v2")
    with _FlakyPC(pcw.procs(), fail={"restart": {1}}) as pc:
        wait_http(pcw.url)
        reloader = ProcessComposeReloader(pc.url, ready_timeout=5)
        first = pcw.agent(reloader).reconcile().result("nats")
        assert first is not None and "reload failed" in (first.error or ""), first
        # the manager answers again: the good build goes in
        second = pcw.agent(reloader).reconcile().result("nats")
        assert second is not None and second.action == "updated", second
        assert pcw.binary.read_bytes() == good
        assert wait_http(pcw.url).startswith("nats-v2 ")
        assert hashlib.sha256(good).hexdigest() not in load_state(pcw.root).failed.values()


def test_a_failed_restart_of_the_restored_binary_is_finished_by_the_next_reconcile(pcw: _PCWorld) -> None:
    """stop-start: v2 is unhealthy, so the agent restores v1 and restarts it; that restart's start call
    fails once (HTTP 500) after its stop succeeded, leaving the service stopped. The failure is recorded
    (reload_failed), but the next reconcile, with the manager answering again, only says v2 is "skipped"
    and never restarts v1: the service stays down, the owed restart forgotten."""
    bad = pcw.publish("v2", mode="unhealthy")
    # start #1: the update's start of v2 (works); start #2: the restore's start of v1 (fails)
    with _FlakyPC(pcw.procs(), fail={"start": {2}}) as pc:
        wait_http(pcw.url)
        reloader = ProcessComposeReloader(pc.url, ready_timeout=5, stop_start=True)
        first = pcw.agent(reloader).reconcile().result("nats")
        assert first is not None and first.action == "failed" and "restoring the previous one failed" in first.error
        assert pcw.binary.read_bytes() == pcw.v1  # the good binary is on disk...
        assert not reloader.status("nats").running  # ...but nothing runs it
        assert "nats" in load_state(pcw.root).reload_failed
        # the manager answers again; the next reconcile must finish the restart it owes
        second = pcw.agent(reloader).reconcile().result("nats")
        assert second is not None
        assert load_state(pcw.root).failed.get("nats") == hashlib.sha256(bad).hexdigest()
        st = reloader.status("nats")
        assert st.running, f"nats left stopped after the next reconcile ({second.action}: {second.error})"
        assert wait_http(pcw.url, 5).startswith("nats-v1 ")


# ------------------------------------------ a kill inside the owed restart, then a start without the source


def test_a_kill_inside_an_owed_restart_is_recovered_at_the_next_start(tmp_path: Path) -> None:
    """A restart failed earlier (reload_failed in the agent state; the binary in place is the release's).
    The next ``agent --once`` finishes it through supervisord: stop, then - SIGKILLed right there (the
    test hook) - no start. No intent is in the journal for it, so the next start's recovery does nothing,
    and with the release source unreachable at that start the service stays STOPPED, although the
    binary on disk is verified and nothing needs the network to start it (docs/agent.md: "the service is
    not left stopped")."""
    import os
    import signal
    import subprocess

    from sync_tools.agent.install import PAUSE_ENV
    from sync_tools.agent.state import save_state
    from tests.agent_support import close_world, make_world
    from tests.support import wait_for

    world = make_world(tmp_path / "w", {"nats": "nats-server"})
    marker = tmp_path / "paused"
    try:
        save_state(world.root, load_state(world.root).with_reload_failed("nats", "supervisor: timed out"))
        cmd = [sys.executable, "-m", "sync_tools", "agent", "--once", "--config", str(world.config_path),
               "--source", world.server.url]
        proc = subprocess.Popen(cmd, env={**os.environ, PAUSE_ENV: f"stopped:{marker}"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(marker.exists, timeout=60, what="the agent to pause between stop and start")
            assert world.supervisor.info("nats")["statename"] == "STOPPED"
            os.kill(int(marker.read_text()), signal.SIGKILL)
        finally:
            proc.wait(30)
        # the next start: the release source cannot be reached right now
        dead_source = f"http://127.0.0.1:{free_port()}"
        again = subprocess.run([*cmd[:-1], dead_source], env=dict(os.environ), capture_output=True, timeout=120)
        state = world.supervisor.info("nats")["statename"]
        assert state == "RUNNING", (f"nats is {state} after the next start (exit {again.returncode}: "
                                    f"{again.stderr.decode()[-300:]})")
    finally:
        close_world(world)
