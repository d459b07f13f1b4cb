"""One agent process at a time per install root: the daemon, ``agent --once`` and ``rollback`` take an
flock of ``<root>/.sync-tools/agent.lock``; a second one waits (bounded), then says who is busy."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from sync_tools.agent import install
from sync_tools.agent.fetch import HTTPFetcher
from sync_tools.agent.state import load_state
from sync_tools.cli import cli
from tests.agent_support import World


class _Gated(HTTPFetcher):
    """Holds asset downloads until the test opens the gate."""

    def __init__(self, url: str):
        super().__init__(url)
        self.gate = threading.Event()
        self.waiting = threading.Event()

    def _fetch(self, name: str, offset: int, *, deadline: float | None) -> Iterator[bytes]:
        if name.endswith(".tar.gz"):
            self.waiting.set()
            self.gate.wait(15)
        return super()._fetch(name, offset, deadline=deadline)


def test_a_second_agent_waits_for_the_one_installing_or_says_it_is_busy(world: World) -> None:
    v2 = world.publish("nats", "v2")
    fetcher = _Gated(world.server.url)
    daemon = world.agent(fetcher=fetcher)
    reports: dict[str, object] = {}
    t = threading.Thread(target=lambda: reports.setdefault("daemon", daemon.reconcile()), daemon=True)
    t.start()
    waiter = world.agent(lock_timeout=30)
    w = None
    try:
        assert fetcher.waiting.wait(10)  # the daemon is mid-install, holding the lock
        impatient = world.agent(lock_timeout=0.2)
        with pytest.raises(install.AgentBusy, match="another agent process is installing"):
            impatient.rollback("nats")
        with pytest.raises(install.AgentBusy, match="another agent process is installing"):
            impatient.reconcile()
        with pytest.raises(install.AgentBusy):
            impatient.update_state(lambda st: st.with_event_id("x"))
        w = threading.Thread(target=lambda: reports.setdefault("waiter", waiter.reconcile()), daemon=True)
        w.start()
    finally:
        fetcher.gate.set()
        t.join(20)
        if w is not None:
            w.join(20)
    assert reports["daemon"].result("nats").action == "updated"  # type: ignore[attr-defined]
    assert reports["waiter"].result("nats").action == "unchanged"  # type: ignore[attr-defined]
    assert world.bin_path("nats").read_bytes() == v2
    assert load_state(world.root).last_event_id is None


@pytest.mark.parametrize("command", [["rollback", "nats"], ["agent", "--once"]])
def test_one_shot_commands_report_a_busy_install_root(world: World, monkeypatch: pytest.MonkeyPatch,
                                                      command: list[str]) -> None:
    from sync_tools.cli import agent as agent_cli

    monkeypatch.setattr(agent_cli, "ONE_SHOT_LOCK_WAIT", 0.2)
    before = world.bin_path("nats").read_bytes()
    with install.AgentLock(world.root).hold(1):
        r = CliRunner().invoke(cli, [*command, "--config", str(world.config_path)])
    assert r.exit_code == 1
    assert "another agent process is installing" in r.stderr
    assert world.bin_path("nats").read_bytes() == before


def test_swap_refuses_when_the_staged_binary_is_gone(tmp_path: Path) -> None:
    """Another process deleted the staged file: the new .version must not be written over the old binary."""
    from sync_tools.versionfile import VersionInfo, read_version

    bin_dir = tmp_path / "nats" / ".bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "app").write_bytes(b"old")
    old_sha = install._sha_or_none(bin_dir / "app")
    (bin_dir / ".version").write_text(VersionInfo("a" * 40, "2024-01-01T00:00:00Z", old_sha, "v1").render())
    intent = install.begin(install.Journal(tmp_path), subsystem="nats", bin_dir=bin_dir, binary="app",
                           new_sha="b" * 64, new_version=VersionInfo("b" * 40, "2024-01-02T00:00:00Z",
                                                                     "b" * 64, "v2"))
    with pytest.raises(install.InstallError, match="staged binary .* is gone"):
        install.swap(intent)
    assert (bin_dir / "app").read_bytes() == b"old"
    assert read_version(bin_dir).checksum == old_sha
