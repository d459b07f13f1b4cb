"""A USER machine's agent-only config: no `subsystems:`, no `upstream`: the signed manifest names the
subsystems (issue: real plat-telemetry adoption, point 10). The example config in docs/agent.md is this
one, so the test also keeps the docs honest."""

from __future__ import annotations

import re
from pathlib import Path

from sync_tools.config import load_config
from tests.agent_support import PLATFORM, close_world, make_world

DOCS = Path(__file__).resolve().parent.parent / "docs" / "agent.md"


def test_agent_only_config_installs_what_the_manifest_names(tmp_path) -> None:
    world = make_world(tmp_path / "w")
    try:
        # the documented agent-only config, with this test's paths and supervisor
        cfg = tmp_path / "w" / "agent.yaml"
        cfg.write_text(
            "release:\n  public_key: keys/release.pub\n"
            f"agent:\n  root: root\n  reload: supervisor\n  supervisor_url: {world.supervisor.url}\n"
            f"  platform: {PLATFORM}\n  health_timeout: 5\n  settle_seconds: 1\n")
        config = load_config(cfg)
        assert not config.subsystems  # nothing listed, no upstream anywhere
        world.config_path = cfg
        world.publish("nats", "v2")
        pid_arc = world.supervisor.pid("arc")
        report = world.agent().reconcile()
        assert report.ok, report
        actions = {r.name: r.action for r in report.results}
        assert actions["nats"] == "updated" and actions["arc"] == "unchanged"
        world.wait_version("nats", "v2")
        assert world.supervisor.pid("arc") == pid_arc
        status = world.agent().status()
        assert set(status) == {"nats", "arc", "web"} and status["nats"]["sha256"] == world.sha("nats")
        assert not status["nats"]["drift"]
    finally:
        close_world(world)


def test_docs_show_a_complete_agent_only_config() -> None:
    text = DOCS.read_text()
    m = re.search(r"<!-- agent-only config -->\s*```yaml\n(.*?)```", text, re.S)
    assert m, "docs/agent.md has no agent-only config example"
    example = m.group(1)
    assert "upstream" not in example and "subsystems" not in example
    for key in ("agent:", "relay:", "public_key:", "reload:"):
        assert key in example


def test_an_install_under_a_manifest_path_is_the_one_found_over_a_file_left_at_the_top(tmp_path: Path) -> None:
    """An agent-only root that had grafana at ``.bin/grafana-server`` (before manifests carried
    ``path``) and now has it at ``.bin/bin/grafana-server`` with its ``.version`` there: status, verify
    and owed restarts look at the one the platform runs, not the file left at the top."""
    from sync_tools.agent.subsystems import installed

    (tmp_path / "agent.yaml").write_text(f"agent:\n  root: {tmp_path / 'root'}\n  reload: none\n")
    bin_dir = tmp_path / "root" / "grafana" / ".bin"
    (bin_dir / "bin").mkdir(parents=True)
    for d in (bin_dir, bin_dir / "bin"):
        (d / "grafana-server").write_bytes(b"\x7fELF")
        (d / ".version").write_text("{}")
    [sub] = installed(load_config(tmp_path / "agent.yaml"), tmp_path / "root")
    assert sub.binary_path(tmp_path / "root") == bin_dir / "bin" / "grafana-server"
    (bin_dir / "bin" / ".version").unlink()  # no .version beside it: not an install, the top one is
    [sub] = installed(load_config(tmp_path / "agent.yaml"), tmp_path / "root")
    assert sub.binary_path(tmp_path / "root") == bin_dir / "grafana-server"
