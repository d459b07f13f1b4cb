"""Strategy ``releases``: the newest GitHub release of the upstream (by version), through PyGithub.

Honours ``GITHUB_TOKEN`` (optional: public repos answer without one, within a lower rate limit) and
``GITHUB_API_URL`` (GitHub Enterprise, and the tests' loopback server). PyGithub is imported only
when this strategy runs, so ``check`` of tag-tracked subsystems never pays for it.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from sync_tools import versions
from sync_tools.deadline import Deadline, pool_classes
from sync_tools.errors import DataError, RemoteError
from sync_tools.sources import Latest, Sources
from sync_tools.sources.remote import listing_deadline, ref_name

if TYPE_CHECKING:
    from sync_tools.config import Subsystem

log = logging.getLogger(__name__)

DEFAULT_API_URL = "https://api.github.com"
_SHA = re.compile(r"[0-9a-f]{40}")
_PER_PAGE = 100
_MAX_PAGES = 3  # the newest 300 releases: plenty to find the newest in a major


def repo_slug(upstream: str) -> str:
    """``owner/name`` of a GitHub upstream given as a URL (https, ssh, git@host:) or as ``owner/name``.
    Raises DataError when there is no owner/name in it."""
    text = upstream.strip().removesuffix("/").removesuffix(".git")
    if "://" in text:
        text = text.split("://", 1)[1].split("/", 1)[-1] if "/" in text.split("://", 1)[1] else ""
    elif re.match(r"^[\w.-]+@[\w.-]+:", text):
        text = text.split(":", 1)[1]
    parts = [p for p in text.split("/") if p]
    if len(parts) < 2:
        raise DataError(f"{upstream}: not a GitHub repository (expected owner/name or its URL)")
    return "/".join(parts[-2:])


def make_github(timeout: float) -> Any:
    """A PyGithub client from the environment: GITHUB_TOKEN (if set), GITHUB_API_URL (default
    api.github.com), *timeout* seconds per request, no automatic retries (a retry loop could outlast
    the check; the next check simply asks again). Its connections can be cut by a :class:`Deadline`."""
    from github import Auth, Github

    token = os.environ.get("GITHUB_TOKEN") or None
    base_url = (os.environ.get("GITHUB_API_URL") or DEFAULT_API_URL).rstrip("/")
    gh = Github(auth=Auth.Token(token) if token else None, base_url=base_url, timeout=max(1, int(timeout)),
                retry=None, per_page=_PER_PAGE, seconds_between_requests=None, lazy=True)
    _cut_on_deadline(gh)
    return gh


def _cut_on_deadline(gh: Any) -> None:
    """Make *gh*'s connections register their sockets with the thread's :class:`Deadline`: a per-read
    timeout never trips on an API that trickles its answer. PyGithub has no public hook for its HTTP
    session, so this sets the connection class of this client's requester (not PyGithub's global
    ``injectConnectionClasses``); a PyGithub without that attribute keeps its own, and the deadline
    is then only checked afterwards."""
    requester = getattr(gh, "requester", None)
    attr = "_Requester__connectionClass"
    base = getattr(requester, attr, None)
    if base is None:
        log.debug("PyGithub without %s: its connections cannot be cut at the deadline", attr)
        return

    class DeadlineConnection(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            try:
                self.adapter.poolmanager.pool_classes_by_scheme = pool_classes()
            except AttributeError:  # another PyGithub's connection: used as it is
                log.debug("PyGithub connection without a requests adapter: not cut at the deadline")

    setattr(requester, attr, DeadlineConnection)


def find_latest(sub: Subsystem, sources: Sources) -> Latest:
    """The newest release of *sub*'s upstream on GitHub.

    Drafts are always left out; pre-releases (GitHub's flag, or a pre-release version in the tag) unless
    ``prereleases``. The release list (the newest :data:`_MAX_PAGES` pages) is read and chosen from with
    the same rules as tags: never GitHub's ``releases/latest``, which is the most recently *published*
    release (a backport published after a newer line would hide it) and trusts only GitHub's
    pre-release flag. Raises RemoteError (network, HTTP errors, rate limits) or DataError (no such
    repository or no release qualifies).
    """
    slug = repo_slug(sub.upstream)
    gh = sources.github() if sources.github else make_github(sources.timeout)
    # the whole exchange (every page) is bounded as a git listing is: a trickling API cannot hold check
    total = listing_deadline(sources.timeout)
    deadline = Deadline(total)
    try:
        with deadline:
            latest = _ask(sub, slug, gh)
    except Exception as e:
        if deadline.expired:  # whatever the cut connection made the client raise
            raise RemoteError(f"{slug}: GitHub API timed out (no complete answer within {total:g}s)") from e
        raise
    if deadline.expired:  # a cut connection can read as a short, well-formed answer: not trusted
        raise RemoteError(f"{slug}: GitHub API timed out (no complete answer within {total:g}s)")
    return latest


def _ask(sub: Subsystem, slug: str, gh: Any) -> Latest:
    from github import GithubException

    try:
        repo = gh.get_repo(slug)  # lazy (see make_github): no GET /repos/{slug} round trip
        try:
            return _from_list(sub, slug, repo)
        except GithubException as e:
            if e.status != 404:
                raise
            raise DataError(f"{slug}: no such repository (GitHub answered 404)") from e
    except GithubException as e:
        retry_after = _retry_after(getattr(e, "headers", None) or {})
        hint = f" (rate limited; retry in {retry_after:.0f}s)" if retry_after is not None else ""
        raise RemoteError(f"{slug}: GitHub API error {e.status}: {_message(e)}{hint}", status_code=e.status,
                          retry_after=retry_after) from e
    except (OSError, ValueError) as e:
        # requests' ConnectionError/Timeout are OSErrors; JSON decode problems are ValueErrors
        raise RemoteError(f"{slug}: GitHub API unreachable: {e}") from e


def _pages(repo: Any) -> Iterator[Any]:
    """The releases of the newest :data:`_MAX_PAGES` pages, a request each. The pages are asked by
    number (``?page=N``), not by following each answer's ``Link: next``: an API whose every page is
    short and names itself as the next was asked a page per release until the cap of releases, 300
    requests. A page shorter than :data:`_PER_PAGE` is the last. A stand-in without ``get_page`` is
    iterated up to the same count of releases."""
    listing = repo.get_releases()
    if not hasattr(listing, "get_page"):
        yield from (rel for i, rel in zip(range(_PER_PAGE * _MAX_PAGES), listing, strict=False))
        return
    for n in range(_MAX_PAGES):
        page = listing.get_page(n)
        yield from page[:_PER_PAGE]
        if len(page) < _PER_PAGE:
            return


def _from_list(sub: Subsystem, slug: str, repo: Any) -> Latest:
    releases = []
    for rel in _pages(repo):
        # a tag name git never makes (a newline, an escape sequence) is no version: read as one once
        # its whitespace is stripped, it went on as it is to the output, the pin and `plan`
        if rel.draft or not isinstance(rel.tag_name, str) or ref_name(f"refs/tags/{rel.tag_name}") is None:
            continue
        releases.append(rel)
    if not releases:
        raise DataError(f"{slug}: no published release")
    by_tag = {r.tag_name: r for r in releases}
    sel = versions.select(by_tag, current=sub.current, include=sub.include, exclude=sub.exclude,
                          prereleases=sub.prereleases, major=sub.major,
                          prerelease_tags=[r.tag_name for r in releases if r.prerelease])
    major_available = sel.major_available.tag if sel.major_available else None
    if sel.latest is None:
        if major_available:
            return Latest(latest=None, major_available=major_available)
        raise DataError(f"{slug}: none of {len(releases)} releases qualifies")
    tag = sel.latest.tag
    return _result(sub, tag, by_tag[tag].target_commitish, major_available)


def _result(sub: Subsystem, tag: str, target: str | None, major_available: str | None) -> Latest:
    # target_commitish is a branch name unless the release was made from a sha
    commit = target if target and _SHA.fullmatch(target) else None
    return Latest(latest=tag, commit=commit, major_available=major_available,
                  update_available=versions.update_available(sub.current, tag))


def _message(e: Any) -> str:
    data = getattr(e, "data", None)
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"])
    return str(e)[:200]


def _retry_after(headers: Any) -> float | None:
    """Seconds to wait before asking again, from GitHub's Retry-After or an exhausted rate limit."""
    h = {str(k).lower(): str(v) for k, v in dict(headers).items()}
    try:
        if "retry-after" in h:
            return max(0.0, float(h["retry-after"]))
        if h.get("x-ratelimit-remaining") == "0" and "x-ratelimit-reset" in h:
            return max(0.0, float(h["x-ratelimit-reset"]) - time.time())
    except ValueError:
        return None
    return None
