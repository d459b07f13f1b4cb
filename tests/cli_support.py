"""Shared material for the tests that run the sync-tools CLI as a process: the venv's console script,
a loopback port nothing listens on, and a workspace with release keys and a one-subsystem config."""

from __future__ import annotations

import sys
from pathlib import Path

from sync_tools.signing import write_keypair
from tests.support import free_port

SYNC_TOOLS = str(Path(sys.executable).with_name("sync-tools"))


def closed_port() -> int:
    """A loopback port free a moment ago and closed again: connecting to it is refused."""
    return free_port()


def cli_workspace(root: Path, source: str = "store", extra: str = "", *, make_root: bool = False) -> Path:
    """*root* with ``keys/`` (a fresh keypair) and a ``sync-tools.yaml`` releasing one subsystem (nats)
    whose agent reads *source*; *extra*: more ``agent:`` lines; *make_root*: also create the agent's
    install root (``root/``). Returns the config's path."""
    root.mkdir(parents=True, exist_ok=True)
    write_keypair(root / "keys")
    cfg = root / "sync-tools.yaml"
    cfg.write_text("release:\n  store: .releases\n  public_key: keys/release.pub\n"
                   "subsystems:\n  nats:\n    upstream: https://github.com/nats-io/nats-server\n"
                   "    binary: nats-server\n    current: v1.0.0\n"
                   f"agent:\n  root: root\n  source: {source}\n  reload: none\n{extra}")
    if make_root:
        (root / "root").mkdir(exist_ok=True)
    return cfg
