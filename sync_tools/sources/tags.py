"""Strategy ``tags``: the newest version tag on the upstream remote."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sync_tools import versions
from sync_tools.errors import DataError
from sync_tools.sources import Latest, Sources

if TYPE_CHECKING:
    from sync_tools.config import Subsystem


def find_latest(sub: Subsystem, sources: Sources) -> Latest:
    """The newest tag of *sub*'s upstream under its include/exclude/prereleases/major settings.

    Annotated tags are peeled: ``commit`` is always a commit sha. Tags that cannot be ordered as
    versions are skipped. Raises RemoteError when the upstream cannot be listed and DataError when it
    has no tag that qualifies (the message says why).
    """
    refs = sources.refs.get(sub.upstream)
    tags = refs.tags()
    pin = sub.current
    pin_tag = pinned_tag(pin, tags) if pin else None
    if pin and pin_tag is None:
        head = refs.branch(pin)
        if head is not None:  # `main`, `master`: the pin follows that branch
            return Latest(latest=head, commit=head, branch=pin, update_available=True)
    if not tags:
        raise DataError(f"{sub.upstream}: the upstream has no tags" + (f" and no branch {pin!r}" if pin else ""))
    sel = versions.select(tags, current=pin, include=sub.include, exclude=sub.exclude,
                          prereleases=sub.prereleases, major=sub.major)
    major_available = sel.major_available.tag if sel.major_available else None
    if pin and pin_tag is None:
        newest = sel.latest.tag if sel.latest else major_available
        raise DataError(f"pinned {pin} is not a tag or branch of {sub.upstream}"
                        + (f" (newest: {newest})" if newest else ""))
    current_commit = tags.get(pin_tag) if pin_tag else None
    if sel.latest is None:
        if major_available:  # every candidate is a newer major: nothing to apply without --allow-major
            return Latest(latest=None, major_available=major_available, current_commit=current_commit)
        raise DataError(f"{sub.upstream}: none of {len(tags)} tags qualifies ({_why(sub)})")
    latest = sel.latest.tag
    return Latest(latest=latest, commit=tags[latest], major_available=major_available,
                  current_commit=current_commit,
                  update_available=latest != pin_tag and versions.update_available(pin, latest))


def pinned_tag(pin: str, tags: dict[str, str]) -> str | None:
    """The upstream tag the pin names: itself, or the same version with or without the ``v`` prefix
    (a pin ``11.4.0`` of an upstream that tags ``v11.4.0``). None when there is no such tag."""
    if pin in tags:
        return pin
    for other in (f"v{pin}", pin[1:] if pin[:1] in "vV" else None):
        if other and other in tags:
            return other
    return None


def _why(sub: Subsystem) -> str:
    parts = []
    if sub.include is not None:
        parts.append(f"include {sub.include.pattern!r}")
    if sub.exclude is not None:
        parts.append(f"exclude {sub.exclude.pattern!r}")
    if not sub.prereleases:
        parts.append("pre-releases left out")
    parts.append("tags that are not versions skipped")
    return "; ".join(parts)
