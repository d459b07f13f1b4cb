"""The ``command`` reload backend: an exit that says the manager was never asked (the shell could not
find or run the command, 127 and 126, or the command's own EX_TEMPFAIL, 75) holds nothing against the
build. Before, every non-zero exit was the binary's failure: a typo in ``agent.command`` marked every new
build as failed, and fixing the command did not bring it back until the release changed. Real shells,
a real release store over HTTP and a real agent; nothing of the code under test is mocked."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sync_tools.agent.fetch import HTTPFetcher
from sync_tools.agent.reload import CommandReloader, NoReloader, ReloadError, StartError
from sync_tools.agent.runner import Agent
from sync_tools.agent.state import load_state
from sync_tools.config import parse_config
from tests.agent_support import SERVICE_PY, ReleaseStore, StoreServer, service_binary


@pytest.mark.parametrize(("command", "status"), [
    ("no-such-process-manager-here restart {process}", 127),
    ("./not-executable restart {process}", 126),
    ("echo 'supervisord is not answering'; exit 75", 75),
])
def test_an_exit_that_says_the_manager_was_not_asked_is_not_the_binarys_failure(
        tmp_path: Path, command: str, status: int) -> None:
    (tmp_path / "not-executable").write_text("#!/bin/sh\nexit 0\n")
    os.chmod(tmp_path / "not-executable", 0o644)
    with pytest.raises(ReloadError) as e:
        CommandReloader(command, cwd=tmp_path).restart("nats")
    assert not isinstance(e.value, StartError)
    assert f"exited {status} (" in str(e.value)


@pytest.mark.parametrize("status", [1, 2, 3, 124, 125])
def test_any_other_non_zero_exit_is_still_the_new_binarys_failure(tmp_path: Path, status: int) -> None:
    with pytest.raises(StartError, match=f"exited {status}:"):
        CommandReloader(f"exit {status}", cwd=tmp_path).restart("nats")


def test_a_reload_command_that_is_not_found_does_not_hold_back_the_build(tmp_path: Path) -> None:
    (tmp_path / "svc.py").write_text(SERVICE_PY)
    store = ReleaseStore(tmp_path / "store", Ed25519PrivateKey.generate())
    root = tmp_path / "root"

    def publish(version: str) -> bytes:
        data = service_binary(tmp_path / "svc.py", f"nats-{version}")
        store.publish("nats", "nats", data, version)
        return data

    v1 = publish("v1")
    with StoreServer(store.dir) as server:
        def agent(reloader: object) -> Agent:
            config = parse_config(tmp_path / "sync-tools.yaml", {
                "subsystems": {"nats": {"upstream": "/dev/null", "binary": "nats"}},
                "agent": {"root": str(root), "settle_seconds": 0}})
            return Agent(config, fetcher=HTTPFetcher(server.url), public_key=store.key.public_key(),
                         platform="linux/amd64", reloader=reloader)  # type: ignore[arg-type]

        assert agent(NoReloader()).reconcile().ok
        v2 = publish("v2")
        binary = root / "nats" / ".bin" / "nats"
        typo = agent(CommandReloader("supervisorclt restart {process}", cwd=tmp_path)).reconcile().result("nats")
        assert typo is not None and typo.action == "failed", typo
        assert "exited 127" in (typo.error or "") and "unhealthy" not in (typo.error or ""), typo.error
        assert binary.read_bytes() == v1  # the build that was running goes back
        state = load_state(root)
        assert hashlib.sha256(v2).hexdigest() not in state.failed.values()
        assert "nats" in state.reload_failed  # the restart is owed
        # the operator fixes the command: the next run installs the build it never tried
        fixed = agent(CommandReloader("true", cwd=tmp_path)).reconcile().result("nats")
        assert fixed is not None and fixed.action == "updated", fixed
        assert binary.read_bytes() == v2
