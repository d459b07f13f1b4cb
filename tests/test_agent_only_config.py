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
