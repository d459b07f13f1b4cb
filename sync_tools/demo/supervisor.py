"""A real supervisord (PyPI ``supervisor``) per demo install root, driven over its XML-RPC socket."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import sys
import time
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path

from supervisor.xmlrpc import SupervisorTransport

from sync_tools.errors import SyncToolsError


@dataclass(frozen=True)
class Program:
    name: str
    command: str
    env: dict[str, str]


def write_conf(root: Path, programs: list[Program]) -> Path:
    """supervisord.conf for *root*: a unix socket in the root, logs under root/logs."""
    (root / "logs").mkdir(parents=True, exist_ok=True)
    sock = root / "supervisor.sock"
    lines = [
        "[unix_http_server]", f"file={sock}", "chmod=0700", "",
        "[supervisord]", f"logfile={root / 'logs' / 'supervisord.log'}", f"pidfile={root / 'supervisord.pid'}",
        "nodaemon=true", "loglevel=info", f"directory={root}", "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
        "[supervisorctl]", f"serverurl=unix://{sock}", "",
    ]
    for p in programs:
        env = ",".join(f'{k}="{v}"' for k, v in sorted(p.env.items()))
        lines += [
            f"[program:{p.name}]", f"command={p.command}", f"directory={root}", "autostart=true",
            "autorestart=true", "startsecs=0", "stopwaitsecs=5", f"environment={env}",
            f"stdout_logfile={root / 'logs' / (p.name + '.log')}", "redirect_stderr=true", "",
        ]
    conf = root / "supervisord.conf"
    conf.write_text("\n".join(lines))
    return conf


class Supervisor:
    """A supervisord process for one install root. ``with Supervisor(root, programs) as s:``"""

    def __init__(self, root: Path, programs: list[Program]):
        self.root = root
        self.conf = write_conf(root, programs)
        self.socket = root / "supervisor.sock"
        self.url = f"unix://{self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None

    def rpc(self) -> xmlrpc.client.ServerProxy:
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=SupervisorTransport(None, None, self.url))

    def start(self, timeout: float = 15.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SyncToolsError(f"supervisord exited with {self.proc.returncode}; see {self.root}/logs")
            try:
                if self.rpc().supervisor.getState()["statename"] == "RUNNING":
                    return
            except (OSError, xmlrpc.client.Fault):
                pass
            time.sleep(0.05)
        raise SyncToolsError(f"supervisord did not come up within {timeout:.0f}s")

    def info(self, name: str) -> dict:
        return self.rpc().supervisor.getProcessInfo(name)

    def pid(self, name: str) -> int:
        return int(self.info(name)["pid"])

    def stop(self) -> None:
        """Stop supervisord and, through it, every program it runs. The shutdown call's answer can be
        lost as supervisord closes its socket, so the call's errors are not taken as failure: it gets
        SIGTERM too (its own graceful shutdown) and only a supervisord still alive after that is
        killed, since a killed supervisord would orphan its programs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(OSError, xmlrpc.client.Fault, http.client.HTTPException):
            self.rpc().supervisor.shutdown()
        try:
            self.proc.wait(timeout=15)
            return
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)

    def __enter__(self) -> Supervisor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
