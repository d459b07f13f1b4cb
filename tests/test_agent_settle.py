"""Health that means something (issue 15): a new build must pass its health check and keep passing over
``agent.settle_seconds`` with its process never restarted, or it is rolled back; and an agent SIGKILLed
between the supervisor's stop and start of a service starts it again when it comes back.

Real supervisord, real services (a health server that may exit on a timer), real agent processes. The
windows are short (config), and nothing asserts how fast anything is.
"""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import sys
from pathlib import Path

from sync_tools.agent.install import PAUSE_ENV
from sync_tools.agent.reload import ProcessComposeReloader, ProcessStatus, SupervisorReloader
from sync_tools.agent.settle import restarted, wait_settled
from sync_tools.agent.state import load_state
from tests.agent_support import SERVICE_PY, Supervisord, World, close_world, make_world, wait_http
from tests.servers.process_compose import ProcessComposeServer
from tests.support import free_port, wait_for

#: A health server that answers 200 and exits (status 1) *after* seconds after it starts.
DIES_PY = r'''
import http.server, os, sys, threading
version, after = sys.argv[1], float(sys.argv[2])
threading.Timer(after, lambda: os._exit(1)).start()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"{version} {os.getpid()}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
'''
SETTLE = 4.0


def _dies_binary(base: Path, version: str, after: float) -> bytes:
    script = base / "dies.py"
    script.write_text(DIES_PY)
    return f'#!/bin/sh\nexec "{sys.executable}" "{script}" "{version}" "{after}"\n'.encode()


def _settle_world(base: Path) -> World:
    # supervisord restarts nats when it exits, as a deployment would: the crash shows as a new pid
    return make_world(base, {"nats": "nats-server"}, settle_seconds=SETTLE, autorestart=("nats",))


def test_a_build_that_dies_after_passing_its_health_check_is_rolled_back(tmp_path: Path) -> None:
    """The nats-server build that crashed 5 s after start: its first 2xx used to keep it."""
    world = _settle_world(tmp_path)
    try:
        v1 = world.sha("nats")
        bad = _dies_binary(tmp_path, "nats-v2", 2.0)
        world.store.publish("nats", "nats-server", bad, "v2")
        res = world.agent().reconcile().result("nats")
        assert res.action == "rolled_back", res
        assert "settle window" in res.error and "previous restored" in res.error
        assert world.sha("nats") == v1 and world.health("nats").startswith("nats-v1")
        assert load_state(world.root).failed["nats"] == hashlib.sha256(bad).hexdigest()
        # the restored build was held to the same rule, and is still the one process
        pid = world.supervisor.pid("nats")
        assert world.supervisor.info("nats")["statename"] == "RUNNING"
        assert world.health("nats") == f"nats-v1 {pid}"
        # and the dying build is not tried again
        assert world.agent().reconcile().result("nats").action == "skipped"
    finally:
        close_world(world)


def test_a_build_that_stays_up_over_the_window_is_kept(tmp_path: Path) -> None:
    world = _settle_world(tmp_path)
    try:
        good = world.publish("nats", "v2")
        res = world.agent().reconcile().result("nats")
        assert res.action == "updated" and res.error is None
        assert world.sha("nats") == hashlib.sha256(good).hexdigest()
        pid = world.supervisor.pid("nats")
        assert world.health("nats") == f"nats-v2 {pid}"
        # behaviour, not speed: the health step included the whole window before "updated"
        assert res.times["health"] >= SETTLE
    finally:
        close_world(world)


def test_a_process_compose_process_that_exits_inside_the_window_is_unhealthy(tmp_path: Path) -> None:
    """process-compose (its API double) reports the exited process as not running."""
    port = free_port()
    (tmp_path / "svc.py").write_text(SERVICE_PY)
    binary = tmp_path / "nats-server"
    binary.write_bytes(f'#!/bin/sh\nexec "{sys.executable}" "{tmp_path / "svc.py"}" nats-v1 ok\n'.encode())
    binary.chmod(0o755)
    url = f"http://127.0.0.1:{port}/health"
    with ProcessComposeServer({"nats": (["/bin/sh", str(binary)], {"PORT": str(port)})}) as srv:
        pc = ProcessComposeReloader(srv.url, ready_timeout=10)
        wait_http(url)
        binary.write_bytes(_dies_binary(tmp_path, "nats-v2", 1.0))
        pc.restart("nats")
        res = wait_settled(url, reloader=pc, process="nats", health_timeout=5, settle_seconds=SETTLE)
        assert not res.ok and "settle window" in res.detail
        # seen by the status (exited) or, when it died between the two looks of one tick, by the check
        assert "no longer running (Error)" in res.detail or "after it first passed" in res.detail

        binary.write_bytes(f'#!/bin/sh\nexec "{sys.executable}" "{tmp_path / "svc.py"}" nats-v3 ok\n'.encode())
        pc.restart("nats")
        res = wait_settled(url, reloader=pc, process="nats", health_timeout=5, settle_seconds=1.0)
        assert res.ok and "settled for 1s" in res.detail
        assert wait_http(url).startswith("nats-v3")
        assert srv.schema_errors == []


def test_what_counts_as_restarted() -> None:
    up = ProcessStatus("nats", True, "RUNNING", pid=10, restarts=2)
    assert restarted(up, up) is None
    assert "no longer running" in restarted(up, ProcessStatus("nats", False, "EXITED"))
    assert "pid 10 -> 11" in restarted(up, ProcessStatus("nats", True, "RUNNING", pid=11, restarts=2))
    assert "1 restart(s)" in restarted(up, ProcessStatus("nats", True, "Running", pid=None, restarts=3))
    unknown = ProcessStatus("nats", None, "unknown")  # command/none backends cannot tell
    assert restarted(unknown, ProcessStatus("nats", False, "EXITED")) is None


def test_settle_is_skipped_when_nothing_can_be_watched(tmp_path: Path) -> None:
    """No health check and a backend that cannot tell: healthy by definition, without a window."""
    from sync_tools.agent.reload import NoReloader

    slept: list[float] = []
    res = wait_settled(None, reloader=NoReloader(), process="nats", health_timeout=1, settle_seconds=30,
                       sleep=slept.append)
    assert res.ok and res.detail == "none: unknown" and slept == []


# --------------------------------------------------------------- SIGKILL between stop and start


def test_an_agent_killed_between_stop_and_start_starts_the_service_when_it_comes_back(tmp_path: Path) -> None:
    """The agent runs under supervisord (autorestart, as docs/agent.md's example has it). It is paused by
    the test hook right after supervisord stopped nats for the restart onto v2, SIGKILLed there (nats is
    STOPPED at that moment), restarted by supervisord, and its start-up recovery starts nats on v2."""
    listen = f"127.0.0.1:{free_port()}"
    world = make_world(tmp_path / "w", {"nats": "nats-server"}, agent_extra=f"  listen: {listen}\n")
    marker = tmp_path / "paused"
    env = {"SYNC_TOOLS_AGENT_SECRET": "whsec_" + base64.b64encode(b"chaos-secret-0123456789").decode(),
           PAUSE_ENV: f"stopped:{marker}"}
    cmd = f"{sys.executable} -m sync_tools agent --config {world.config_path} --source {world.server.url}"
    agents = Supervisord([("agent", cmd, env)], autorestart=("agent",))
    journal = world.root / ".sync-tools" / "journal" / "nats.json"
    try:
        v2 = world.publish("nats", "v2")
        agents.start()
        wait_for(marker.exists, timeout=60, what="the agent to pause between stop and start")
        pid = int(marker.read_text())
        assert pid == agents.pid("agent")
        assert world.supervisor.info("nats")["statename"] == "STOPPED" and journal.exists()
        os.kill(pid, signal.SIGKILL)

        world.wait_version("nats", "v2", timeout=60)
        wait_for(lambda: not journal.exists(), timeout=30, what="the recovered install to end")
        assert world.bin_path("nats").read_bytes() == v2
        assert world.supervisor.info("nats")["statename"] == "RUNNING"
        assert agents.pid("agent") != pid and agents.info("agent")["statename"] == "RUNNING"
        assert isinstance(SupervisorReloader(world.supervisor.url).status("nats").pid, int)
    finally:
        agents.stop()
        close_world(world)
