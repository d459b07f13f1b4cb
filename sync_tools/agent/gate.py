"""The wave gate: before downloading a build whose manifest entry carries a rollout policy, ask the relay.

``GET <agent.relay>/rollout/<subsystem>/<build sha256>`` with the agent's bearer token answers
``{"allowed": bool, "state": ..., "wave": n, "percent": p, "reason": "..."}`` (see the issue 15
contract). The relay decides which agents are in the open wave; the agent only obeys. It fails closed:
not allowed, an answer that is not that object, a refused token, or a relay that cannot be reached all
hold the build back (no download). A hold for a transient reason (network, timeout, HTTP 5xx) asks the
reconcile to be retried with the agent's usual backoff; otherwise the next release event (the relay sends
one when a wave opens) makes the agent ask again.

Entries without a policy are never gated. :func:`has_rollout` reads the policy defensively, so this
module works with manifests (and ``Entry`` classes) that do not know the key.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sync_tools.errors import DataError

from .httpclient import Client, HTTPError
from .state import load_state

if TYPE_CHECKING:
    from pathlib import Path

    from sync_tools.config import Config

log = logging.getLogger(__name__)

#: (connect, read) seconds for one question to the relay.
GATE_TIMEOUT = (3.0, 5.0)
MAX_ANSWER_BYTES = 64 * 1024


@dataclass(frozen=True)
class GateDecision:
    """The relay's answer for one build, or why none could be had. ``retry``: the relay could not be
    asked (network, timeout, 5xx), so asking again soon may work."""

    allowed: bool
    reason: str = ""
    retry: bool = False
    state: str | None = None
    wave: int | None = None
    percent: float | None = None


ALLOWED = GateDecision(True, "no rollout policy")


def has_rollout(entry: Any) -> bool:
    """Whether a manifest entry carries a rollout policy (``Entry.rollout``; absent on entries that predate
    the key)."""
    return getattr(entry, "rollout", None) is not None


def _short(sha: str) -> str:
    return sha[:12]


def _finite(value: Any) -> float | None:
    """*value* as a finite float, else None (an int too large for a float cannot be formatted as one)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


class Gate:
    """Asks ``<relay>/rollout/...`` with *token*. Thread-safe; every call has a timeout; never raises."""

    def __init__(self, relay: str | None, token: str | None, *, client: Client | None = None,
                 timeout: tuple[float, float] = GATE_TIMEOUT):
        self.relay = relay.rstrip("/") if relay else None
        self.token = token
        self.timeout = timeout
        self._client = client

    @classmethod
    def from_config(cls, config: Config) -> Gate:
        """From ``agent.relay`` and the token in ``$<agent.token_env>``."""
        ac = config.agent
        return cls(ac.relay, os.environ.get(ac.token_env) or None)

    @property
    def client(self) -> Client:
        if self._client is None:
            self._client = Client()
        return self._client

    def decide(self, subsystem: str, build: str, *, has_policy: bool) -> GateDecision:
        """May *build* (a binary sha256) of *subsystem* be downloaded now? Without a policy always; with
        one only when the relay says so."""
        if not has_policy:
            return ALLOWED
        if not self.relay:
            return GateDecision(False, f"the release rolls {subsystem} out in waves, but agent.relay is not "
                                       "set: this agent cannot ask whether its wave is open (set agent.relay "
                                       "and its token to take part)")
        return self.ask(subsystem, build)

    def ask(self, subsystem: str, build: str) -> GateDecision:
        """``GET /rollout/<subsystem>/<build>``; fails closed (see the module docstring)."""
        url = f"{self.relay}/rollout/{quote(subsystem, safe='')}/{quote(build, safe='')}"
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        what = f"rollout of {subsystem} {_short(build)}"
        try:
            resp = self.client.get(url, headers=headers, timeout=self.timeout, stream=True)
            try:
                body = resp.read(MAX_ANSWER_BYTES + 1)
            finally:
                resp.close()  # not returned to the pool: its body may not be read to the end
        except HTTPError as e:
            from sync_tools.errtext import describe

            log.info("%s: the relay cannot be asked (%s); held", what, describe(e))
            return GateDecision(False, f"{what}: the relay at {self.relay} cannot be reached "
                                       f"({describe(e)}); held until it can", retry=True)
        if resp.status != 200:
            return GateDecision(False, f"{what}: the relay answered HTTP {resp.status}; held",
                                retry=resp.status >= 500 or resp.status == 429)
        try:
            if len(body) > MAX_ANSWER_BYTES:
                raise ValueError(f"over {MAX_ANSWER_BYTES} bytes")
            obj = json.loads(body)
            if not isinstance(obj, dict) or not isinstance(obj.get("allowed"), bool):
                raise ValueError("no boolean 'allowed'")
        except (ValueError, RecursionError) as e:  # RecursionError: nested deeper than json can follow
            return GateDecision(False, f"{what}: the relay's answer is not a rollout decision ({e}); held")
        state = obj.get("state") if isinstance(obj.get("state"), str) else None
        wave = obj.get("wave") if isinstance(obj.get("wave"), int) and not isinstance(obj.get("wave"), bool) else None
        percent = _finite(obj.get("percent"))
        reason = obj.get("reason") if isinstance(obj.get("reason"), str) else ""
        reason = " ".join(reason.split())[:300]  # one line, bounded: it goes into reports and status
        if obj["allowed"]:
            return GateDecision(True, reason or "allowed", state=state, wave=wave, percent=percent)
        where = ", ".join(x for x in (f"rollout {state}" if state else "",
                                      f"wave {wave}" if wave is not None else "",
                                      f"{percent:g}%" if percent is not None else "") if x)
        return GateDecision(False, f"{what}: not allowed yet" + (f" ({where})" if where else "")
                            + (f": {reason}" if reason else ""), state=state, wave=wave, percent=percent)


def held_info(root: Path, subsystem: str, installed_sha: str | None) -> dict[str, str] | None:
    """For ``sync-tools status``: the build the wave gate holds back for *subsystem* and why (from the
    agent state), or None (nothing held, or that build is installed since, or the state is unreadable)."""
    try:
        held = load_state(root).held.get(subsystem)
    except DataError:
        return None
    if held is None or held["build"] == installed_sha:
        return None
    return dict(held)
