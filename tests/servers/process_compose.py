"""A stand-in for process-compose's REST API, on loopback TCP and a unix socket at once.

process-compose cannot be installed here, so this server follows its published OpenAPI description
(``tests/fixtures/process-compose/openapi.json``, process-compose v1.122.0): ``GET /live``,
``GET /processes``, ``GET /process/{name}``, ``POST /process/restart/{name}``,
``POST /process/start/{name}``, ``PATCH /process/stop/{name}``. It runs real child processes, so a
restart really runs the binary now on disk. Like process-compose, a restart answers at once and the
process passes through ``Restarting`` before ``Running`` again, so clients must poll its state.

Every JSON answer is validated against the response schema the description gives for that path,
method and status (``validate=True``); a mismatch is recorded in ``schema_errors`` for the test to
assert on. With ``token`` set, requests without a matching ``X-PC-Token-Key`` get 401.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import socketserver
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema

# the published description, vendored with its source named (PC_OPENAPI overrides)
SPEC_PATH = Path(os.environ.get("PC_OPENAPI") or
                 Path(__file__).resolve().parents[1] / "fixtures" / "process-compose" / "openapi.json")
_SPEC: dict[str, Any] | None = None


def spec() -> dict[str, Any]:
    global _SPEC
    if _SPEC is None:
        _SPEC = json.loads(SPEC_PATH.read_text())
    return _SPEC


def response_schema(path_template: str, method: str, status: int) -> dict[str, Any]:
    """The JSON schema of a documented response, with the spec's components alongside for $refs."""
    op = spec()["paths"][path_template][method.lower()]
    schema = op["responses"][str(status)]["content"]["application/json"]["schema"]
    return {**schema, "components": spec()["components"]}


@dataclass
class _Proc:
    name: str
    command: list[str]
    env: dict[str, str]
    popen: subprocess.Popen[bytes] | None = None
    status: str = "Pending"
    restarts: int = 0
    started: float = 0.0
    exit_code: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def spawn(self) -> None:
        self.popen = subprocess.Popen(self.command, env={**os.environ, **self.env}, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True)
        self.started = time.monotonic()
        self.status = "Running"

    def kill(self) -> None:
        p = self.popen
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        if p is not None:
            self.exit_code = p.returncode or 0

    def state(self) -> dict[str, Any]:
        p = self.popen
        running = p is not None and p.poll() is None and self.status == "Running"
        status = self.status
        if self.status == "Running" and p is not None and p.poll() is not None:
            status = "Completed" if p.returncode == 0 else "Error"
            running = False
        now = datetime.now(UTC).isoformat()
        return {
            "name": self.name, "namespace": ["default"], "status": status,
            "system_time": f"{int(time.monotonic() - self.started)}s" if running else "",
            "age": int((time.monotonic() - self.started) * 1e9) if running else 0,
            "is_ready": "-", "has_ready_probe": False, "restarts": self.restarts,
            "exit_code": (p.returncode if p is not None and p.poll() is not None else 0) or 0,
            "pid": p.pid if running and p is not None else 0, "is_elevated": False,
            "password_provided": False, "mem": 0, "cpu": 0.0, "is_running": running,
            "process_start_time": now, "success_exit_codes": [0],
        }


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Any

    def log_message(self, *a: object) -> None:
        pass

    def address_string(self) -> str:
        return "unix" if not self.client_address else str(self.client_address[0])

    def _reply(self, template: str, status: int, body: dict[str, Any]) -> None:
        owner: ProcessComposeServer = self.server.owner
        if owner.validate:
            try:
                jsonschema.validate(body, response_schema(template, self.command, status))
            except (jsonschema.ValidationError, KeyError) as e:
                owner.schema_errors.append(f"{self.command} {template} {status}: {e}")
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _route(self) -> None:
        owner: ProcessComposeServer = self.server.owner
        owner.requests.append((self.command, self.path, self.headers.get("X-PC-Token-Key")))
        if owner.token and self.headers.get("X-PC-Token-Key") != owner.token:
            data = b'{"error":"unauthorized"}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        routes = [
            ("GET", r"/live", "/live", lambda: (200, {"status": "alive"})),
            ("GET", r"/processes", "/processes",
             lambda: (200, {"data": [p.state() for p in owner.procs.values()]})),
            ("GET", r"/process/(?P<name>[^/]+)", "/process/{name}", owner.get),
            ("POST", r"/process/restart/(?P<name>[^/]+)", "/process/restart/{name}", owner.restart),
            ("POST", r"/process/start/(?P<name>[^/]+)", "/process/start/{name}", owner.start),
            ("PATCH", r"/process/stop/(?P<name>[^/]+)", "/process/stop/{name}", owner.stop),
        ]
        for method, pattern, template, fn in routes:
            m = re.fullmatch(pattern, self.path)
            if m and method == self.command:
                status, body = fn(**m.groupdict())
                self._reply(template, status, body)
                return
        data = b'{"error":"not found"}'
        self.send_response(404)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = _route  # noqa: N815


class _TCP(http.server.ThreadingHTTPServer):
    daemon_threads = True


class _Unix(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class ProcessComposeServer:
    """Runs *processes* (name -> (argv, env)) and serves the API; use as a context manager."""

    def __init__(self, processes: dict[str, tuple[list[str], dict[str, str]]], *, token: str | None = None,
                 validate: bool = True, restart_delay: float = 0.1, answer_first: float = 0.0):
        self.procs = {n: _Proc(n, argv, env) for n, (argv, env) in processes.items()}
        self.token = token
        self.validate = validate
        self.restart_delay = restart_delay
        # seconds a restart leaves the old process reported running after answering (0: "Restarting" at once)
        self.answer_first = answer_first
        self.schema_errors: list[str] = []
        self.requests: list[tuple[str, str, str | None]] = []
        self.dir = tempfile.mkdtemp(prefix="pc")
        self.socket_path = os.path.join(self.dir, "pc.sock")
        self._tcp = _TCP(("127.0.0.1", 0), _Handler)
        self._unix = _Unix(self.socket_path, _Handler)
        for s in (self._tcp, self._unix):
            s.owner = self  # type: ignore[attr-defined]
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (self._tcp, self._unix)]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._tcp.server_address[1]}"

    def __enter__(self) -> ProcessComposeServer:
        for p in self.procs.values():
            p.spawn()
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for s in (self._tcp, self._unix):
            s.shutdown()
            s.server_close()
        for p in self.procs.values():
            p.kill()
        for t in self._threads:
            t.join(5)
        try:
            os.unlink(self.socket_path)
            os.rmdir(self.dir)
        except OSError:
            pass

    def _missing(self, name: str) -> tuple[int, dict[str, Any]]:
        return 400, {"error": f"process {name} does not exist"}

    def get(self, name: str) -> tuple[int, dict[str, Any]]:
        p = self.procs.get(name)
        return (200, p.state()) if p else self._missing(name)

    def restart(self, name: str) -> tuple[int, dict[str, Any]]:
        p = self.procs.get(name)
        if p is None:
            return self._missing(name)

        def later() -> None:
            time.sleep(self.answer_first)
            with p.lock:
                p.status = "Restarting"
                p.kill()
                time.sleep(self.restart_delay)
                p.restarts += 1
                p.spawn()

        if not self.answer_first:
            p.status = "Restarting"
        threading.Thread(target=later, daemon=True).start()
        return 200, {"name": name}

    def start(self, name: str) -> tuple[int, dict[str, Any]]:
        p = self.procs.get(name)
        if p is None:
            return self._missing(name)
        with p.lock:
            if p.popen is None or p.popen.poll() is not None:
                p.spawn()
        return 200, {"name": name}

    def stop(self, name: str) -> tuple[int, dict[str, Any]]:
        p = self.procs.get(name)
        if p is None:
            return self._missing(name)
        with p.lock:
            p.kill()
            p.status = "Completed"
        return 200, {"name": name}
