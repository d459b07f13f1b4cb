"""Shared fixtures. Real servers run in threads on loopback port 0; nothing leaves this machine."""

from __future__ import annotations

import os

import pytest

_PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


@pytest.fixture(autouse=True)
def _no_proxies_no_leaks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback only: no proxy may redirect test traffic, and no real GitHub token is used."""
    for var in _PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost,::1")
    for var in ("GITHUB_TOKEN", "GITHUB_API_URL", "SYNC_TOOLS_CONFIG", "SYNC_TOOLS_SIGNING_KEY"):
        monkeypatch.delenv(var, raising=False)
    # Any accidental call to the real GitHub fails fast instead of leaving the machine.
    monkeypatch.setenv("GITHUB_API_URL", "http://127.0.0.1:9")
    os.environ.setdefault("GIT_TERMINAL_PROMPT", "0")


@pytest.fixture
def world(tmp_path):  # type: ignore[no-untyped-def]
    """An agent world (tests.agent_support) with nats and arc installed at v1 and running; closed after."""
    from tests.agent_support import close_world, make_world

    w = make_world(tmp_path, {"nats": "nats-server", "arc": "arc"})
    try:
        yield w
    finally:
        close_world(w)
