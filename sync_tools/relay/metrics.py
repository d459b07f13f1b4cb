"""Prometheus metrics of one relay, in its own registry (no process-global state).

Counters and the latency histogram are updated where things happen; queue depth, dead letters
and connected agents are read when scraped, so they are never stale.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sync_tools.relay.outbox import Outbox

log = logging.getLogger(__name__)


class _Live(Collector):
    def __init__(self, outbox: Outbox, connected: Callable[[], int]):
        self.outbox = outbox
        self.connected = connected

    def collect(self) -> Iterator[Metric]:
        try:
            st = self.outbox.stats()
        except Exception:  # noqa: BLE001 - a scrape must not fail because the DB is busy
            log.exception("cannot read outbox stats for /metrics")
            return
        yield GaugeMetricFamily("sync_tools_relay_queue_depth", "Jobs pending or running.", value=st.queue_depth)
        yield GaugeMetricFamily("sync_tools_relay_dead_letters", "Jobs dead-lettered after the retry limit.",
                                value=st.dead)
        age = GaugeMetricFamily("sync_tools_relay_oldest_pending_seconds", "Age of the oldest unfinished job.",
                                value=st.oldest_pending_age or 0.0)
        yield age
        yield GaugeMetricFamily("sync_tools_relay_connected_agents", "SSE subscribers connected now.",
                                value=self.connected())


class Metrics:
    """The relay's metrics; ``registry`` is what ``/metrics`` exposes."""

    def __init__(self, outbox: Outbox, connected: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.deliveries = Counter("sync_tools_relay_deliveries", "Webhook deliveries by result.", ["result"],
                                  registry=self.registry)
        self.jobs = Counter("sync_tools_relay_jobs", "Outbox job attempts by kind and outcome.",
                            ["kind", "outcome"], registry=self.registry)
        self.dispatch_seconds = Histogram(
            "sync_tools_relay_dispatch_seconds", "Time one job attempt took (dispatch, fan-out, push).", ["kind"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800),
            registry=self.registry)
        self.registry.register(_Live(outbox, connected))
        self._results: dict[str, Any] = {}

    def delivery(self, result: str) -> Any:
        """The deliveries counter for *result* (the labelled child, looked up once per result)."""
        child = self._results.get(result)
        if child is None:
            child = self._results[result] = self.deliveries.labels(result=result)
        return child
