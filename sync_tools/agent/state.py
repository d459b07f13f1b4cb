"""The agent's durable state in the install root: ``<root>/.sync-tools/agent-state.json``.

It holds the highest manifest serial the agent has verified and acted on (a manifest with a lower
serial is refused: rollback attack), the last SSE event id (resume), and per subsystem the binary
sha256 that failed its health check (so the same bad build is not installed again and again until
the release changes it) and the build a rollout holds back, with the reason (for ``sync-tools status``).
Written atomically; a missing file is the empty state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from sync_tools.errors import DataError
from sync_tools.fsutil import atomic_write_json

from .install import STATE_DIR

STATE_NAME = "agent-state.json"


FAILED_HEALTH = "failed its health check"
ROLLED_BACK = "was rolled back by hand (sync-tools rollback)"


@dataclass(frozen=True)
class AgentState:
    serial: int = 0
    last_event_id: str | None = None
    failed: MappingProxyType[str, str] = field(default_factory=lambda: MappingProxyType({}))
    #: subsystem -> why its ``failed`` build is held back (FAILED_HEALTH, ROLLED_BACK); absent: FAILED_HEALTH
    failed_reason: MappingProxyType[str, str] = field(default_factory=lambda: MappingProxyType({}))
    #: subsystem -> {"build": sha256, "reason": one line}: a build the wave gate holds back
    held: MappingProxyType[str, MappingProxyType[str, str]] = field(default_factory=lambda: MappingProxyType({}))
    #: subsystem -> the error of a restart that failed: the binary in place may not be the one running
    reload_failed: MappingProxyType[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def with_serial(self, serial: int) -> AgentState:
        return replace(self, serial=max(self.serial, serial))

    def with_event_id(self, event_id: str | None) -> AgentState:
        return replace(self, last_event_id=event_id)

    def with_failed(self, subsystem: str, sha: str | None, reason: str = "") -> AgentState:
        failed, why = dict(self.failed), dict(self.failed_reason)
        why.pop(subsystem, None)
        if sha is None:
            failed.pop(subsystem, None)
        else:
            failed[subsystem] = sha
            if reason and reason != FAILED_HEALTH:
                why[subsystem] = reason
        return replace(self, failed=MappingProxyType(failed), failed_reason=MappingProxyType(why))

    def failed_because(self, subsystem: str) -> str:
        """Why the build in ``failed`` is held back, as a phrase: FAILED_HEALTH or ROLLED_BACK."""
        return self.failed_reason.get(subsystem) or FAILED_HEALTH

    def with_held(self, subsystem: str, build: str | None, reason: str = "") -> AgentState:
        """*build* of *subsystem* held back for *reason*; None: nothing held."""
        held = dict(self.held)
        if build is None:
            if subsystem not in held:
                return self
            held.pop(subsystem)
        else:
            held[subsystem] = MappingProxyType({"build": build, "reason": reason})
        return replace(self, held=MappingProxyType(held))

    def with_reload_failed(self, subsystem: str, error: str | None) -> AgentState:
        """*subsystem*'s restart failed with *error* (None: it was restarted)."""
        if self.reload_failed.get(subsystem) == error:
            return self
        pending = {k: v for k, v in self.reload_failed.items() if k != subsystem}
        if error is not None:
            pending[subsystem] = error
        return replace(self, reload_failed=MappingProxyType(pending))

    def to_json(self) -> dict[str, Any]:
        out = {"serial": self.serial, "last_event_id": self.last_event_id, "failed": dict(self.failed)}
        if self.held:
            out["held"] = {k: dict(v) for k, v in self.held.items()}
        if self.failed_reason:
            out["failed_reason"] = dict(self.failed_reason)
        if self.reload_failed:
            out["reload_failed"] = dict(self.reload_failed)
        return out


def state_path(root: Path) -> Path:
    return Path(root) / STATE_DIR / STATE_NAME


def load_state(root: Path) -> AgentState:
    """The saved state, or the empty one. Raises DataError when the file is unreadable."""
    path = state_path(root)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return AgentState()
    except OSError as e:
        raise DataError(f"{path}: cannot read agent state: {e}") from e
    try:
        obj = json.loads(raw)
        serial = obj["serial"]
        failed = obj.get("failed") or {}
        event_id = obj.get("last_event_id")
        if not isinstance(serial, int) or serial < 0 or not isinstance(failed, dict):
            raise ValueError("bad types")
        if event_id is not None and not isinstance(event_id, str):
            raise ValueError("bad last_event_id")
        held = obj.get("held") or {}
        if not isinstance(held, dict) or not all(
                isinstance(v, dict) and isinstance(v.get("build"), str) and isinstance(v.get("reason"), str)
                for v in held.values()):
            raise ValueError("bad held")
        failed_reason = obj.get("failed_reason") or {}
        if not isinstance(failed_reason, dict) or not all(isinstance(v, str) for v in failed_reason.values()):
            raise ValueError("bad failed_reason")
        reload_failed = obj.get("reload_failed") or {}
        if not isinstance(reload_failed, dict) or not all(isinstance(v, str) for v in reload_failed.values()):
            raise ValueError("bad reload_failed")
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: corrupt agent state ({e}); remove it to start over") from e
    return AgentState(serial=serial, last_event_id=event_id,
                      failed=MappingProxyType({str(k): str(v) for k, v in failed.items()}),
                      held=MappingProxyType({str(k): MappingProxyType({"build": v["build"], "reason": v["reason"]})
                                             for k, v in held.items()}),
                      failed_reason=MappingProxyType({str(k): v for k, v in failed_reason.items()}),
                      reload_failed=MappingProxyType({str(k): v for k, v in reload_failed.items()}))


def save_state(root: Path, state: AgentState) -> None:
    """Write the state atomically (tmp, fsync, rename)."""
    atomic_write_json(state_path(root), state.to_json())
