"""Restarts that failed: remembered in the agent state and finished by the next reconcile.

A restart that fails (``reload failed``) leaves a binary in place that the process may not run: a
first install has nothing to roll back to, and the next reconcile would find the binary already the
manifest's and call it ``unchanged``. The failure is recorded per subsystem; the next reconcile
restarts it again and checks its health before it decides anything about the release's build (a restore
whose restart failed leaves the service stopped while the build is skipped or held), and also when the
release cannot be fetched: the binary in place needs no network (a kill inside that restart leaves no
intent in the journal, so this is what finishes it at the next start).

A restart the process manager's call failed (:class:`NotRestarted`) never ran the binary: what the agent
says about it blames the restart, not the binary (:func:`put_back_error`, :func:`rollback_error`).
"""

from __future__ import annotations

import logging
from typing import Any

from sync_tools.agent.health import HealthResult
from sync_tools.agent.state import load_state
from sync_tools.config import Subsystem
from sync_tools.errors import DataError
from sync_tools.fsutil import sha256_file
from sync_tools.versionfile import read_version

log = logging.getLogger(__name__)

OWED = "the restart is tried again at the next run"


class NotRestarted(HealthResult):
    """Not healthy because the process manager's call failed (unreachable, an error, an answer that
    is not one, its deadline): the binary in place may never have run, so this says nothing against
    its build."""


def put_back_error(health: HealthResult) -> str:
    """Why the previous binary, just put back in place, is not known healthy: the manager's restart
    failed (it never ran; :func:`note_reload` recorded the restart as owed), or it is unhealthy."""
    if isinstance(health, NotRestarted):
        return (f"the previous binary is back in place, but the process manager's restart failed "
                f"({health.detail}), so it may not be running; {OWED}")
    return f"the previous binary is unhealthy too: {health.detail}"


def rollback_error(health: HealthResult, back: HealthResult | Exception) -> str:
    """A failed ``rollback``: the restart onto the previous binary gave *health*, and putting back the
    binary it replaced gave *back* (its restart's result, or the error that stopped it)."""
    if isinstance(health, NotRestarted):
        error = f"the restart onto the previous binary failed ({health.detail}); it never ran"
    else:
        error = f"unhealthy after rollback: {health.detail}"
    if isinstance(back, Exception):
        return f"{error}; putting back the binary it replaced failed: {back}"
    error += "; the binary it replaced is back"
    if back.ok:
        return error
    if isinstance(back, NotRestarted):
        return f"{error}, but the process manager's restart failed too ({back.detail}); {OWED}"
    return f"{error}, unhealthy too: {back.detail}"


def note_reload(agent: Any, name: str, error: str | None) -> None:
    """Record that *name*'s restart failed with *error*, or (None) that it succeeded. Never raises: a
    state that cannot be written is logged, and the reload's own outcome still stands."""
    try:
        agent.update_state(lambda st: st.with_reload_failed(name, error))
    except Exception:  # noqa: BLE001 - see the docstring
        log.exception("%s: cannot record the outcome of its restart in the agent state", name)


def finish_reload(agent: Any, sub: Subsystem, sha: str, version: str | None) -> Any:
    """When *sub*'s last restart failed: restart it again and check its health. Returns the
    SubsystemResult (``recovered``, or ``failed`` with the reason), or None when no restart is owed."""
    from sync_tools.agent.runner import SubsystemResult

    error = load_state(agent.root).reload_failed.get(sub.name)
    if error is None:
        return None
    log.warning("%s: its last restart failed (%s); restarting it again", sub.name, error)
    health = agent._restart_and_check(sub)
    if not health.ok:
        return SubsystemResult(sub.name, "failed", sha, sha, version,
                               error=f"the restart onto this build failed before and still does: {health.detail}")
    # the build was never unhealthy, its restart was: it is no longer held back as a failed build
    agent.update_state(lambda st: st.with_failed(sub.name, None) if st.failed.get(sub.name) == sha else st)
    return SubsystemResult(sub.name, "recovered", sha, sha, version)


def finish_owed(agent: Any, sub: Subsystem) -> Any:
    """:func:`finish_reload` onto the binary in place of *sub*: the SubsystemResult, or None when no
    restart is owed or there is no binary to restart."""
    bin_dir = sub.bin_dir(agent.root)
    target = bin_dir / sub.binary
    if sub.name not in load_state(agent.root).reload_failed or not target.is_file():
        return None
    try:
        info = read_version(bin_dir)
    except DataError:  # only the report's version: status and verify say what is wrong with it
        info = None
    return finish_reload(agent, sub, sha256_file(target), info.version if info else None)
