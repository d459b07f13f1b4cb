"""Strategy ``commits``: the head commit of the tracked branch on the upstream remote."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from sync_tools.errors import DataError
from sync_tools.sources import Latest, Sources

if TYPE_CHECKING:
    from sync_tools.config import Subsystem

_MIN_ABBREV = 4  # git's own minimum abbreviation
_HEX = re.compile(r"[0-9a-f]+")


def pin_matches(current: str | None, head: str) -> bool:
    """Whether the pinned commit *current* (full or abbreviated, any case) names *head*."""
    if not current:
        return False
    c = current.strip().lower()
    return len(c) >= _MIN_ABBREV and bool(_HEX.fullmatch(c)) and head.lower().startswith(c)


def find_latest(sub: Subsystem, sources: Sources) -> Latest:
    """The head of ``sub.branch``, or of the branch the remote's HEAD names when none is set.

    ``latest`` and ``commit`` are the full head sha; ``update_available`` unless the pin (an abbreviation
    is matched as a prefix) names that head. Raises RemoteError when the upstream cannot be listed and
    DataError when the branch does not exist or the remote does not say which branch HEAD is.
    """
    refs = sources.refs.get(sub.upstream)
    branch = sub.branch or refs.head_branch()
    if branch is None:
        raise DataError(f"{sub.upstream}: the remote does not name its HEAD branch; set 'branch'")
    head = refs.branch(branch)
    if head is None:
        known = sorted(r[len("refs/heads/"):] for r in refs.refs if r.startswith("refs/heads/"))
        raise DataError(f"{sub.upstream}: no branch {branch!r} (branches: {', '.join(known[:10]) or 'none'})")
    matched = pin_matches(sub.current, head)
    return Latest(latest=head, commit=head, current_commit=head if matched else None,
                  update_available=not matched)
