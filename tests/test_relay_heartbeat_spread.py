"""SSE heartbeats: never further apart than the relay's heartbeat, and not in step across streams.

A release reaches every stream at once; with equal quiet gaps, every one of 10,000 streams would then
write its next heartbeat in the same instant, again and again. Each gap is drawn instead."""

from __future__ import annotations

import queue
from pathlib import Path

import pytest

from sync_tools.errors import ConfigError
from sync_tools.relay.fanout import HEARTBEAT_SPREAD, Broker
from sync_tools.relay.outbox import Outbox
from sync_tools.relay.settings import Settings, load_settings
from tests.relay_support import env, write_config


class _Quiet(queue.Queue):
    """A subscriber's queue on a quiet stream: every wait times out; after *n* waits, the close marker."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.asked: list[float] = []
        self.n = n

    def get(self, block: bool = True, timeout: float | None = None):  # noqa: ANN201 - queue.Queue's
        assert timeout is not None, "a stream must never wait without a bound"
        self.asked.append(timeout)
        if len(self.asked) > self.n:
            return None
        raise queue.Empty


def _gaps(tmp_path: Path, heartbeat: float, n: int) -> tuple[list[float], list[bytes]]:
    outbox = Outbox(tmp_path / "relay.db")
    try:
        broker = Broker(outbox, queue_size=10)
        sub = broker.subscribe()
        sub.queue = _Quiet(n)
        sent = list(broker.stream(sub, 0, heartbeat))
        return sub.queue.asked[:n], sent
    finally:
        outbox.close()


def test_quiet_gaps_stay_within_the_heartbeat_and_are_drawn(tmp_path: Path) -> None:
    gaps, sent = _gaps(tmp_path, 25.0, 400)
    assert sent[0].startswith(b"retry: 3000\n: connected")
    assert sent[1:] == [b": heartbeat\n\n"] * 400  # one comment per quiet gap
    assert all(25.0 * HEARTBEAT_SPREAD <= g <= 25.0 for g in gaps)
    # drawn, not one value: streams that a release put in step drift apart again
    assert len({round(g, 3) for g in gaps}) > 300
    assert min(gaps) < 25.0 * (HEARTBEAT_SPREAD + 0.05) and max(gaps) > 25.0 * 0.95


def test_the_default_heartbeat_keeps_the_contracts_30_s() -> None:
    # docs/ARCHITECTURE.md: a comment heartbeat at least every 30 s (the agent reads for 90 s)
    assert Settings.__dataclass_fields__["heartbeat"].default <= 30.0


def test_the_heartbeat_comes_from_the_environment_within_the_contract(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    assert load_settings(cfg, env(tmp_path)).heartbeat == Settings.heartbeat
    assert load_settings(cfg, env(tmp_path, SYNC_TOOLS_SSE_HEARTBEAT="10")).heartbeat == 10.0
    for bad in ("0", "0.5", "31", "90", "soon", "nan", "inf", "-5"):
        with pytest.raises(ConfigError, match="SYNC_TOOLS_SSE_HEARTBEAT"):
            load_settings(cfg, env(tmp_path, SYNC_TOOLS_SSE_HEARTBEAT=bad))
