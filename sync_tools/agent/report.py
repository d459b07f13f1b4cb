"""Reports to the relay: what each install attempt did, and what runs at start.

``POST <agent.relay>/report`` with the agent's bearer token and one JSON object per subsystem (the issue
15 contract): ``agent`` (``agent.id``, default the hostname), ``subsystem``, ``platform``, ``from``/``to``
(binary sha256s), ``version``, ``serial``, ``outcome`` (updated | rolled_back | failed | held | running),
``error`` (one line), ``times`` (seconds of the steps measured: download, install, health) and ``patch``.

Reports are advice for the fleet view and the wave gate, never a condition of an install: each POST has
a short timeout, a batch stops at its first failure, nothing is retried or queued, and a relay that
keeps failing is logged once (again only after it worked in between). Nothing is sent without
``agent.relay``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sync_tools.errors import DataError
from sync_tools.fsutil import sha256_file
from sync_tools.versionfile import read_version

from . import subsystems
from .httpclient import Client, HTTPError
from .state import load_state

if TYPE_CHECKING:
    from sync_tools.config import Config

    from .runner import Agent, SubsystemResult, UpdateReport

log = logging.getLogger(__name__)

#: (connect, read) seconds for one report.
REPORT_TIMEOUT = (2.0, 3.0)
MAX_REPORT_BYTES = 16 * 1024
MAX_ERROR_CHARS = 2000
#: SubsystemResult.action -> report outcome; other actions (unchanged, skipped, missing) were no attempt.
OUTCOMES = {"updated": "updated", "recovered": "updated", "rolled_back": "rolled_back", "failed": "failed",
            "held": "held"}


def agent_id(config: Config) -> str:
    """``agent.id``, else this machine's hostname."""
    return config.agent.id or socket.gethostname()


class StepTimes:
    """Seconds per named step: ``with times("download"): ...``; :meth:`done` is the mapping so far."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, step: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.times[step] = round(time.monotonic() - started, 3)

    def done(self) -> dict[str, float]:
        return dict(self.times)


def _one_line(text: str | None) -> str | None:
    if text is None:
        return None
    line = " ".join(text.split())
    return line if len(line) <= MAX_ERROR_CHARS else line[:MAX_ERROR_CHARS - 3] + "..."


@dataclass(frozen=True)
class Report:
    """One ``POST /report`` body."""

    agent: str
    subsystem: str
    platform: str
    outcome: str
    from_sha: str | None = None
    to_sha: str | None = None
    version: str | None = None
    serial: int | None = None
    error: str | None = None
    times: dict[str, float] = field(default_factory=dict)
    patch: dict[str, int] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"agent": self.agent, "subsystem": self.subsystem, "platform": self.platform,
                "from": self.from_sha, "to": self.to_sha, "version": self.version, "serial": self.serial,
                "outcome": self.outcome, "error": _one_line(self.error), "times": dict(self.times),
                "patch": self.patch}


def reports_for(update: UpdateReport, *, agent: str, platform: str) -> list[Report]:
    """One report per install attempt in *update* (updated, recovered, rolled_back, failed, held)."""
    out = []
    for r in update.results:
        outcome = OUTCOMES.get(r.action)
        if outcome is not None:
            out.append(_report(r, outcome, agent=agent, platform=platform, serial=update.serial))
    return out


def _report(r: SubsystemResult, outcome: str, *, agent: str, platform: str, serial: int | None) -> Report:
    return Report(agent=agent, subsystem=r.name, platform=platform, outcome=outcome, from_sha=r.old_sha,
                  to_sha=r.new_sha, version=r.version, serial=serial, error=r.error, times=dict(r.times),
                  patch=r.patch.to_json() if r.patch else None)


def running_reports(agent: Agent, *, agent_name: str) -> list[Report]:
    """A ``running`` report per subsystem with a binary installed (the configured ones, else, with an
    agent-only config, those found under the root, as ``status`` finds them): its sha256 and version."""
    try:
        serial: int | None = load_state(agent.root).serial or None
    except DataError:
        serial = None
    out = []
    for sub in subsystems.installed(agent.config, agent.root):
        bin_dir = sub.bin_dir(agent.root)
        try:
            sha = sha256_file(bin_dir / sub.binary)
        except OSError:
            continue  # not installed (yet)
        try:
            info = read_version(bin_dir)
        except DataError:
            info = None
        version = info.version if info is not None and info.checksum == sha else None
        out.append(Report(agent=agent_name, subsystem=sub.name, platform=agent.platform, outcome="running",
                          from_sha=sha, to_sha=sha, version=version, serial=serial))
    return out


class Reporter:
    """Sends reports to ``<relay>/report``. Never raises; every POST has a short timeout."""

    def __init__(self, relay: str | None, token: str | None, *, agent: str, platform: str,
                 client: Client | None = None, timeout: tuple[float, float] = REPORT_TIMEOUT):
        self.relay = relay.rstrip("/") if relay else None
        self.token = token
        self.agent = agent
        self.platform = platform
        self.timeout = timeout
        self._client = client
        self._lock = threading.Lock()
        self._failing = False  # the last batch failed and was logged: stay quiet until one works
        self.sent = 0
        self.failed = 0

    @classmethod
    def from_config(cls, config: Config, *, platform: str) -> Reporter:
        """From ``agent.relay``, ``agent.id`` and the token in ``$<agent.token_env>``."""
        ac = config.agent
        return cls(ac.relay, os.environ.get(ac.token_env) or None, agent=agent_id(config), platform=platform)

    @property
    def url(self) -> str | None:
        return f"{self.relay}/report" if self.relay else None

    def send_update(self, update: UpdateReport) -> int:
        """Report every install attempt of one reconcile. Returns how many the relay accepted."""
        return self.send(reports_for(update, agent=self.agent, platform=self.platform))

    def send_start(self, agent: Agent, recovered: Iterable[SubsystemResult] = ()) -> int:
        """At start: the installs recovery finished, then what runs now (``running``)."""
        reports = [_report(r, OUTCOMES[r.action], agent=self.agent, platform=self.platform, serial=None)
                   for r in recovered if r.action in OUTCOMES]
        return self.send([*reports, *running_reports(agent, agent_name=self.agent)])

    def send(self, reports: Iterable[Report]) -> int:
        """POST each report in turn; the first failure ends the batch (logged once). Returns how many the
        relay accepted (HTTP 2xx)."""
        reports = list(reports)
        if not reports or self.url is None:
            return 0
        with self._lock:  # one batch at a time: a failing relay is logged once, not once per thread
            done = 0
            for report in reports:
                error = self._post(report)
                if error is not None:
                    self.failed += len(reports) - done
                    if not self._failing:
                        log.warning("report to %s failed (%s); %d report(s) dropped (installs go on; "
                                    "logged again only after a report got through)", self.url, error,
                                    len(reports) - done)
                    self._failing = True
                    return done
                done += 1
                self.sent += 1
            self._failing = False
            return done

    def _post(self, report: Report) -> str | None:
        """One POST; None when accepted, else why not."""
        assert self.url is not None
        body = json.dumps(report.to_json(), separators=(",", ":")).encode()
        if len(body) > MAX_REPORT_BYTES:  # only an absurd version string gets here: drop it, keep the rest
            report = Report(**{**report.__dict__, "version": None, "error": _one_line(report.error)[:200]
                               if report.error else None})
            body = json.dumps(report.to_json(), separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self._client is None:
            self._client = Client()
        try:
            resp = self._client.post(self.url, body, headers=headers, timeout=self.timeout)
            try:
                resp.read(4096)  # the answer is a short status object; more is not waited for
            finally:
                resp.close()  # not returned to the pool: its body may not be read to the end
        except HTTPError as e:
            from sync_tools.errtext import describe

            return describe(e)
        if not 200 <= resp.status < 300:
            return f"HTTP {resp.status}"
        return None
