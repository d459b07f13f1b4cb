"""Where newest versions come from: one small module per strategy, each exposing ``find_latest``.

``tags`` and ``commits`` read a remote's refs (:mod:`sync_tools.sources.remote`: git://, smart HTTP
and ssh through dulwich's client; no git binary); ``releases`` asks the GitHub API
(PyGithub, imported only when that strategy runs).
:class:`Latest` is what every strategy returns; :class:`Sources` carries the injected clients.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from sync_tools.sources.remote import DEFAULT_TIMEOUT, RefCache, is_local

if TYPE_CHECKING:
    from sync_tools.config import Subsystem


class Latest(NamedTuple):
    """A strategy's answer for one subsystem.

    ``latest``: the newest acceptable version (a tag, or a commit sha for ``commits``);
    ``commit``: the commit it names, when known; ``major_available``: a newer major held back by
    ``major: manual``; ``current_commit``: the commit the pinned version names upstream, when known.
    """

    latest: str | None
    commit: str | None = None
    major_available: str | None = None
    current_commit: str | None = None
    update_available: bool = False
    branch: str | None = None  # the pin names this upstream branch: latest is its head commit


class Sources:
    """The clients strategies use, built once per run: a shared ref cache and a GitHub factory.

    ``timeout``: seconds each network call may take; ``refs``: the ref cache (a new one by default);
    ``github`` is called with no arguments and returns a PyGithub ``Github`` (or a stand-in with the
    same methods); the default builds one from GITHUB_TOKEN / GITHUB_API_URL on first use.
    """

    def __init__(self, timeout: float = DEFAULT_TIMEOUT, refs: RefCache | None = None,
                 github: Callable[[], Any] | None = None):
        self.timeout = timeout
        self.refs = refs if refs is not None else RefCache(timeout=timeout)
        self.github = github

    def __repr__(self) -> str:
        return f"Sources(timeout={self.timeout!r})"

    def prefetch(self, subs: Iterable[Subsystem]) -> None:
        """Start listing the remotes that *subs*' ``tags`` and ``commits`` strategies will read, in the
        background (:meth:`RefCache.prefetch`): their servers answer while the caller goes on. Local
        repositories are left to the strategies (no server to wait for, and a relative path is only
        resolved against the workspace later). Never raises; a listing's error is raised when a
        strategy asks for those refs."""
        self.refs.prefetch(s.upstream for s in subs
                           if s.strategy in _REF_STRATEGIES and not is_local(s.upstream))


_REF_STRATEGIES = ("tags", "commits")  # the strategies that read a remote's refs
_STRATEGY_MODULES = {"tags": "sync_tools.sources.tags", "commits": "sync_tools.sources.commits",
                     "releases": "sync_tools.sources.releases"}


def find_latest(sub: Subsystem, sources: Sources) -> Latest:
    """Dispatch to *sub*'s strategy module (imported on first use). Raises what the strategy raises:
    RemoteError for unreachable upstreams, DataError for upstreams with nothing usable."""
    module = importlib.import_module(_STRATEGY_MODULES[sub.strategy])
    return module.find_latest(sub, sources)
