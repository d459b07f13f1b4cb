"""The relay crash suite: signed deliveries to a relay subprocess that is SIGKILLed and restarted.

:func:`run_relay_crash` starts ``python -m sync_tools relay`` (dispatch: github) against the GitHub API
test server in this process, sends *deliveries* signed ``push`` deliveries (a commits subsystem's branch) from a pool of
concurrent senders, SIGKILLs the relay *crashes* times at random moments (after a random share of a
phase's sends have been answered, plus a random sub-second delay, so requests and dispatches are in
flight) and restarts it. Every delivery that got no 2xx is redelivered with the same
``X-GitHub-Delivery``, as GitHub's redelivery would. At the end it waits until the relay's queue is
empty and counts, by ``client_payload.delivery``, what the test server received: every delivery must
have been dispatched, and the extra dispatches (a SIGKILL between the test server recording a
dispatch and the relay marking the job done) must not exceed one per crash.

With ``fault_rate`` > 0 the test server fails that share of dispatch calls, picking among: 500, 502,
403 primary rate limit (``X-RateLimit-Remaining: 0``, reset 1-3 s ahead), a timeout (the connection is
held past the relay's 30 s read timeout, then cut, without recording the dispatch) and a connection
reset. A timeout holds the relay's single dispatch lane for 30 s, so their number is capped by
``timeout_budget``; past the budget a drawn timeout becomes a reset (both are "no answer" faults;
the report counts each kind).

Loopback only; every loop is bounded by a deadline.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

from sync_tools.relay import webhook as wh
from tests.relay_support import fixture, tag_payload, write_config
from tests.servers.github_api import Fault, GitHubAPIServer

RELEASE_REPO = "acme/plat-telemetry"
SECRET = "rel-crash-webhook-secret-5b1f0c"
TOKEN = "ghs_relcrash_token_9d3e7a"
# Settings.http_timeout's read part: a "timeout" fault holds the connection past it
READ_TIMEOUT = 30.0
_LISTEN_RE = re.compile(r"relay listening on (http://\S+)")


@dataclass(frozen=True)
class RelayCrashReport:
    """The figures of one run. ``lost`` and ``violations`` must be 0/empty for a pass."""

    deliveries: int
    crashes: int
    fault_rate: float
    posts: int  # HTTP attempts by the senders, first deliveries and redeliveries
    redeliveries: int
    accepted: int  # answered 202
    acknowledged_duplicates: int  # answered 200 "duplicate" (a redelivery of something already recorded)
    never_acknowledged: int  # no 2xx even after every redelivery (GitHub would show these as failed)
    dispatch_calls: int  # POST /dispatches the test server recorded (204), ours
    dispatched: int  # distinct client_payload.delivery among them
    duplicated: int  # dispatch_calls - dispatched
    duplicate_bound: int  # one per crash
    max_copies: int
    lost: int  # acknowledged with a 2xx but never dispatched
    dead_letters: int
    faults: dict[str, int]
    dispatch_attempts: int  # every POST /dispatches the test server saw, failed or not
    restarts: int
    seconds: float
    violations: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["violations"] = list(self.violations)
        return d


class FlakyGitHub(GitHubAPIServer):
    """The GitHub API test server, failing *rate* of ``POST .../dispatches`` at random (seeded)."""

    KINDS = ("500", "502", "403-rate-limit", "timeout", "reset")

    def __init__(self, rate: float, rng: random.Random, *, timeout_budget: int, timeout_hold: float,
                 token: str | None = None):
        super().__init__(token)
        self.rate = rate
        self.rng = rng
        self.timeout_budget = timeout_budget
        self.timeout_hold = timeout_hold
        self.fault_counts: Counter[str] = Counter()
        self._flaky_lock = threading.Lock()

    def _take_fault(self, method: str, path: str) -> Fault | None:
        injected = super()._take_fault(method, path)
        if injected is not None or self.rate <= 0 or method != "POST" or not path.endswith("/dispatches"):
            return injected
        with self._flaky_lock:
            if self.rng.random() >= self.rate:
                return None
            kind = self.rng.choice(self.KINDS)
            if kind == "timeout":
                if self.timeout_budget <= 0:
                    kind = "reset"
                else:
                    self.timeout_budget -= 1
            self.fault_counts[kind] += 1
            reset_at = int(time.time() + self.rng.uniform(1, 3))
        if kind == "500":
            return Fault("POST", "", status=500)
        if kind == "502":
            return Fault("POST", "", status=502, body="<html><body><h1>502 Bad Gateway</h1></body></html>",
                         headers={"Content-Type": "text/html"})
        if kind == "403-rate-limit":
            return Fault("POST", "", status=403, headers={
                "X-RateLimit-Limit": "5000", "X-RateLimit-Remaining": "0", "X-RateLimit-Used": "5000",
                "X-RateLimit-Reset": str(reset_at), "X-RateLimit-Resource": "core"},
                body={"message": "API rate limit exceeded for installation ID 1.",
                      "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api"})
        if kind == "timeout":
            return Fault("POST", "", status=None, delay=self.timeout_hold, reset=True)
        return Fault("POST", "", status=None, reset=True)


def relay_env(workdir: Path, api_url: str, *, secret: str = SECRET, token: str = TOKEN,
              extra: dict[str, str] | None = None) -> dict[str, str]:
    """The relay subprocess's environment: this one minus proxies, plus its settings."""
    env = {k: v for k, v in os.environ.items()
           if k.lower() not in ("http_proxy", "https_proxy", "all_proxy") and not k.startswith("SYNC_TOOLS_")}
    env.update({"SYNC_TOOLS_WEBHOOK_SECRET": secret, "SYNC_TOOLS_DB": str(workdir / "relay.db"),
                "GITHUB_API_URL": api_url, "GITHUB_TOKEN": token, "NO_PROXY": "127.0.0.1,localhost,::1",
                "PYTHONUNBUFFERED": "1",
                # the pace GitHub asks for (a second between dispatches) is not what crashes test: off
                "SYNC_TOOLS_DISPATCH_INTERVAL": "0"})
    env.update(extra or {})
    return env


class RelayProcess:
    """``python -m sync_tools relay --port 0`` as a subprocess; its stderr goes to ``relay-<n>.log``."""

    def __init__(self, workdir: Path, env: dict[str, str], *, verbosity: str = "-v"):
        self.workdir = workdir
        self.env = env
        self.verbosity = verbosity
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.starts = 0
        self.logs: list[Path] = []

    def start(self, timeout: float = 30.0) -> str:
        log_path = self.workdir / f"relay-{self.starts}.log"
        self.starts += 1
        self.logs.append(log_path)
        with open(log_path, "wb") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sync_tools", self.verbosity, "relay", "--config",
                 str(self.workdir / "sync-tools.yaml"), "--host", "127.0.0.1", "--port", "0"],
                env=self.env, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = _LISTEN_RE.search(log_path.read_text(errors="replace"))
            if m:
                self.url = m.group(1)
                return self.url
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"the relay did not start: {log_path.read_text(errors='replace')[-2000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM (a clean stop), SIGKILL after 15 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.logs if p.exists())


@dataclass
class _Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    posts: int = 0
    accepted: int = 0
    duplicates: int = 0
    odd: list[str] = field(default_factory=list)
    answered: int = 0


def _signed(delivery_id: str, commit: str) -> tuple[bytes, dict[str, str]]:
    """A push of *commit* to the branch the ``octo`` subsystem (strategy commits) follows. Each one
    must be dispatched: commits have no order, so none supersedes another (an older tag announced
    after a newer one went out is skipped on purpose, which would blur what this suite counts)."""
    payload = fixture("push.4.json")
    payload["repository"] = tag_payload("octocoders/hello-world")["repository"]
    payload["ref"], payload["after"], payload["deleted"] = "refs/heads/master", commit, False
    body = json.dumps(payload).encode()
    return body, {"X-GitHub-Event": "push", "X-GitHub-Delivery": delivery_id, "Content-Type": "application/json",
                  "X-Hub-Signature-256": wh.sign(SECRET.encode(), body), "User-Agent": "GitHub-Hookshot/reliability"}


def _send(url: str, item: tuple[str, bytes, dict[str, str]], tally: _Tally, done: set[str]) -> None:
    delivery_id, body, headers = item
    try:
        r = requests.post(url + "/webhook", data=body, headers=headers, timeout=(2, 12))
        status, text = r.status_code, r.text
    except requests.RequestException:
        status, text = None, ""
    with tally.lock:
        tally.posts += 1
        tally.answered += 1
        if status is not None and 200 <= status < 300:
            done.add(delivery_id)
            what = json.loads(text).get("status") if text else None
            if status == 202 and what == "accepted":
                tally.accepted += 1
            elif status == 200 and what == "duplicate":
                tally.duplicates += 1
            else:  # a tracked tag must be accepted or recognised as a redelivery, nothing else
                tally.odd.append(f"{delivery_id}: HTTP {status} {text[:200]}")


def run_relay_crash(workdir: Path, *, deliveries: int = 1000, crashes: int = 10, fault_rate: float = 0.0,
                    timeout_budget: int = 0, seed: int = 0, senders: int = 8,
                    settle_timeout: float = 600.0) -> RelayCrashReport:
    """Run the suite in *workdir* (created). Never raises for what it measures: a lost delivery or a
    broken bound is a violation in the report. Raises RuntimeError when the relay cannot start."""
    started = time.monotonic()
    rng = random.Random(seed)
    workdir.mkdir(parents=True, exist_ok=True)
    write_config(workdir, dispatch="github", max_attempts=40)
    items = []
    for i in range(deliveries):
        did = str(uuid.UUID(int=rng.getrandbits(128)))
        body, headers = _signed(did, hashlib.sha1(f"{seed}:{i}".encode()).hexdigest())
        items.append((did, body, headers))
    ids = {i[0] for i in items}
    tally = _Tally()
    done: set[str] = set()
    violations: list[str] = []
    # Kill points: phase k sends its share of new deliveries plus every redelivery due, and is cut
    # after a random share of its answers.
    phases = crashes + 1
    chunks = [items[k * deliveries // phases:(k + 1) * deliveries // phases] for k in range(phases)]

    api = FlakyGitHub(fault_rate, random.Random(seed + 1), timeout_budget=timeout_budget,
                      timeout_hold=READ_TIMEOUT + 2)
    api.start()
    relay = RelayProcess(workdir, relay_env(workdir, api.url))
    pool = ThreadPoolExecutor(senders, thread_name_prefix="sender")
    try:
        api.state.add_repo(RELEASE_REPO)
        for k in range(phases):
            url = relay.start()
            # redeliveries of earlier phases' unanswered deliveries, then this phase's new ones
            batch = [it for c in chunks[:k] for it in c if it[0] not in done] + chunks[k]
            if k < crashes:
                kill_after = rng.randint(1, max(1, len(batch) - 1))
                base = tally.answered
                futures = [pool.submit(_send, url, it, tally, done) for it in batch]
                limit = time.monotonic() + 120
                while tally.answered - base < kill_after and time.monotonic() < limit:
                    time.sleep(0.001)
                time.sleep(rng.uniform(0, 0.05))
                relay.kill()
                for f in futures:
                    f.result()
            else:
                for f in [pool.submit(_send, url, it, tally, done) for it in batch]:
                    f.result()
        # Redeliver until every delivery has had a 2xx (bounded).
        for _ in range(20):
            todo = [it for it in items if it[0] not in done]
            if not todo:
                break
            for f in [pool.submit(_send, relay.url, it, tally, done) for it in todo]:
                f.result()
            time.sleep(0.2)
        health = _settle(relay.url, api, ids & done, settle_timeout)
        relay.stop()
    finally:
        pool.shutdown(wait=True)
        relay.kill()
        api.stop()

    copies = Counter(d["client_payload"].get("delivery") for d in api.state.dispatches
                     if d["client_payload"].get("delivery") in ids)
    dispatched = len(copies)
    calls = sum(copies.values())
    lost = len((ids & done) - set(copies))
    bound = crashes
    if lost:
        violations.append(f"{lost} acknowledged deliveries were never dispatched")
    if calls - dispatched > bound:
        violations.append(f"{calls - dispatched} duplicate dispatches for {crashes} crashes (bound {bound})")
    if len(done) != deliveries:
        violations.append(f"{deliveries - len(done)} deliveries never got a 2xx after every redelivery")
    if tally.odd:
        violations.append(f"{len(tally.odd)} unexpected answers, e.g. {tally.odd[0]}")
    dead = int(health.get("dead_letters") or 0)
    if dead:
        violations.append(f"{dead} dead-lettered jobs")
    if api.schema_errors or api.internal_errors:
        violations.append(f"GitHub API test server problems: {(api.schema_errors + api.internal_errors)[:3]}")
    return RelayCrashReport(
        deliveries=deliveries, crashes=crashes, fault_rate=fault_rate, posts=tally.posts,
        redeliveries=tally.posts - deliveries, accepted=tally.accepted, acknowledged_duplicates=tally.duplicates,
        never_acknowledged=deliveries - len(done), dispatch_calls=calls, dispatched=dispatched,
        duplicated=calls - dispatched, duplicate_bound=bound, max_copies=max(copies.values(), default=0),
        lost=lost, dead_letters=dead, faults=dict(sorted(api.fault_counts.items())),
        dispatch_attempts=len(api.requests_to("POST", r"/dispatches$")), restarts=relay.starts - 1,
        seconds=round(time.monotonic() - started, 1), violations=tuple(violations))


def _settle(url: str, api: GitHubAPIServer, acknowledged: set[str], timeout: float) -> dict[str, Any]:
    """Wait until every acknowledged delivery reached the test server and the relay's queue is empty;
    returns the relay's last /health answer (empty if it never answered)."""
    deadline = time.monotonic() + timeout
    health: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            health = requests.get(url + "/health", timeout=5).json()
        except (requests.RequestException, ValueError):
            health = {}
        seen = {d["client_payload"].get("delivery") for d in api.state.dispatches}
        if acknowledged <= seen and health.get("queue_depth") == 0 and health.get("running") == 0:
            return health
        time.sleep(0.1)
    return health
