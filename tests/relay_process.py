"""The real relay as a separate process (``sync-tools relay``), over a local release store, for the
fleet end-to-end test and the fleet benchmark.

- :func:`write_relay_workspace`: a relay-only ``sync-tools.yaml`` (local dispatch) whose release store
  is a :class:`tests.agent_support.ReleaseStore`'s, the store's public key, and a tokens file binding
  one token to each agent id (``SYNC_TOOLS_AGENT_TOKENS_FILE``).
- :class:`RelayProcess`: starts it on a loopback port, waits for ``/health``, posts signed ``/notify``
  (what the release job sends), asks the operator API, and stops it with SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import requests
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sync_tools.relay.webhook import sign
from tests.support import free_port

SECRET = "fleet-e2e-webhook-secret"
OPERATOR = "fleet-e2e-operator-token"
_PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy")


def agent_token(agent: str) -> str:
    return f"tok-{agent}-0123456789abcdef"


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without proxies or a config path, plus *extra*."""
    env = {k: v for k, v in os.environ.items() if k not in (*_PROXIES, "SYNC_TOOLS_CONFIG")}
    env.update(NO_PROXY="127.0.0.1,localhost", PYTHONUNBUFFERED="1", **extra)
    return env


def write_relay_workspace(ws: Path, store: Path, public_pem: bytes, agents: Iterable[str],
                          subsystems: dict[str, str], *, signing_key: Ed25519PrivateKey | None = None) -> Path:
    """``ws/sync-tools.yaml`` for a relay announcing ``<store>/latest`` (verified with *public_pem*),
    and ``ws/agent-tokens`` (``ID=TOKEN`` per agent). Returns the config path. Local dispatch, so no
    GitHub is needed; the relay then wants the release key (*signing_key*, written to keys/release.key
    and handed to it as SYNC_TOOLS_SIGNING_KEY) even though only /notify is used."""
    (ws / "keys").mkdir(parents=True, exist_ok=True)
    (ws / "keys" / "release.pub").write_bytes(public_pem)
    if signing_key is not None:
        from cryptography.hazmat.primitives import serialization

        key_file = ws / "keys" / "release.key"
        key_file.write_bytes(signing_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
        key_file.chmod(0o600)
    subs = "\n".join(f"  {n}:\n    upstream: /dev/null\n    binary: {b}" for n, b in subsystems.items())
    config = ws / "sync-tools.yaml"
    config.write_text(f"release:\n  store: {store}\n  tag: latest\n  public_key: keys/release.pub\n"
                      f"subsystems:\n{subs}\nrelay:\n  dispatch: local\n")
    (ws / "agent-tokens").write_text("".join(f"{a}={agent_token(a)}\n" for a in agents))
    return config


class RelayProcess:
    """``sync-tools relay`` in its own process on 127.0.0.1; its database and logs under the workspace."""

    def __init__(self, ws: Path, *, log: Path | None = None, port: int | None = None):
        self.ws = ws
        self.log = log or ws / "relay.log"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.session = requests.Session()
        self.session.trust_env = False

    @property
    def fleet_db(self) -> Path:
        return self.ws / "relay.fleet.db"

    def start(self, timeout: float = 30.0) -> RelayProcess:
        env = clean_env(SYNC_TOOLS_WEBHOOK_SECRET=SECRET, SYNC_TOOLS_DB=str(self.ws / "relay.db"),
                        SYNC_TOOLS_AGENT_TOKENS_FILE=str(self.ws / "agent-tokens"),
                        SYNC_TOOLS_OPERATOR_TOKEN=OPERATOR)
        if (self.ws / "keys" / "release.key").exists():
            env["SYNC_TOOLS_SIGNING_KEY"] = str(self.ws / "keys" / "release.key")
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sync_tools", "relay", "--config", str(self.ws / "sync-tools.yaml"),
                 "--host", "127.0.0.1", "--port", str(self.port)],
                env=env, cwd=self.ws, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the relay exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(requests.RequestException):
                if self.session.get(f"{self.url}/health", timeout=2).ok:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"the relay did not answer /health: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def notify(self) -> None:
        """What the release job sends after it wrote a new manifest (signed with the webhook secret)."""
        body = b"{}"
        r = self.session.post(f"{self.url}/notify", data=body, timeout=10, headers={
            "Content-Type": "application/json", "X-Hub-Signature-256": sign(SECRET.encode(), body)})
        if r.status_code != 202:
            raise RuntimeError(f"notify: HTTP {r.status_code} {r.text[:200]}")

    def operator(self, method: str, path: str, **kw: Any) -> requests.Response:
        return self.session.request(method, self.url + path, headers={"Authorization": f"Bearer {OPERATOR}"},
                                    timeout=10, **kw)

    def rollout(self, subsystem: str, build: str) -> dict[str, Any] | None:
        """The operator's view of *build*'s rollout of *subsystem* (None: the relay has none for it)."""
        r = self.operator("GET", f"/rollout/{subsystem}")
        r.raise_for_status()
        return next((x for x in r.json()["rollouts"] if x["build"] == build), None)

    def connected_agents(self) -> int:
        """Open SSE streams, from the relay's Prometheus metrics."""
        for line in self.session.get(f"{self.url}/metrics", timeout=5).text.splitlines():
            if line.startswith("sync_tools_relay_connected_agents"):
                return int(float(line.split()[-1]))
        return 0

    def fleet_rows(self, sql: str, *args: Any) -> list[tuple[Any, ...]]:
        """Rows of the relay's fleet database, read-only (the relay keeps writing it)."""
        conn = sqlite3.connect(f"file:{self.fleet_db}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()
