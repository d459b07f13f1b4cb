"""Listing a remote's refs with dulwich (``git ls-remote`` without git), with timeouts and a cache:
git://, smart HTTP(S) and ssh through dulwich's client, local paths read with dulwich's Repo.

One :class:`RefCache` lives for one ``check`` run: the same remote is asked once however many
subsystems track it, and concurrent askers of one URL wait for the single request in flight.
Every network call has a timeout and every listing a total deadline; every failure is a
:class:`~sync_tools.errors.RemoteError` whose message names the URL.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from sync_tools.deadline import Deadline, on_deadline, pool_classes, shutdown
from sync_tools.errors import DataError, RemoteError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
_PEELED = "^{}"
_OBJECT_ID = re.compile(rb"[0-9a-f]{40}|[0-9a-f]{64}")  # SHA-1 or SHA-256 object names
# Only what the strategies read; with protocol v2 the server filters, so a GitHub remote's thousands
# of refs/pull/* never cross the wire.
_REF_PREFIX = ("HEAD", "refs/heads/", "refs/tags/")


# what git's check-ref-format refuses in a ref name: control characters, space and DEL, ~^:?*[\,
# "..", "@{", "//", a component that starts with "." or ends with ".lock", a name that ends in "/" or "."
_BAD_REF = re.compile(rb"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|(?:^|/)\.|\.lock(?:/|$)|[/.]$")


def ref_name(name: bytes | str) -> str | None:
    """*name* as text when git could have made it (``git check-ref-format``'s rules, in UTF-8), else
    None. A server is hostile until its answer parses: a name git never makes (``v1.9.9\r``, an escape
    sequence, bytes that are no UTF-8) would be read as a version once its whitespace is stripped, and
    printed, written to the pin and handed to ``plan`` as it is."""
    try:
        raw = name.encode("utf-8") if isinstance(name, str) else name
        text = raw.decode("utf-8") if isinstance(name, bytes) else name
    except UnicodeError:
        return None
    if not raw or _BAD_REF.search(raw):
        return None
    return text


def listing_deadline(timeout: float) -> float:
    """Seconds one whole listing may take, connect to last byte, for a per-call *timeout*: a server
    that trickles a byte every so often never trips a per-read timeout, and must not hold a check."""
    return timeout * 2


def overall_bound(timeout: float) -> float:
    """The most anything waits on a listing, or a helper process lives for one: past
    :func:`listing_deadline`, with room for a listing that is ending anyway."""
    return timeout * 2 + 5


class RemoteRefs(NamedTuple):
    """A remote's refs as ``git ls-remote`` shows them.

    ``refs`` maps ref names to the sha they point at (an annotated tag's ref points at the tag object);
    ``peeled`` maps an annotated tag's ref to the commit it names; ``symrefs`` maps ``HEAD`` to the
    branch ref it names, when the server says.
    """

    url: str
    refs: Mapping[str, str]
    peeled: Mapping[str, str] = MappingProxyType({})
    symrefs: Mapping[str, str] = MappingProxyType({})

    def tags(self) -> dict[str, str]:
        """Tag name -> the commit it names (annotated tags peeled)."""
        out = {}
        for ref, sha in self.refs.items():
            if ref.startswith("refs/tags/"):
                out[ref[len("refs/tags/"):]] = self.peeled.get(ref, sha)
        return out

    def head_branch(self) -> str | None:
        """The branch the remote's HEAD names (``main``), or None when the server does not say."""
        target = self.symrefs.get("HEAD")
        if target and target.startswith("refs/heads/"):
            return target[len("refs/heads/"):]
        return None

    def branch(self, name: str) -> str | None:
        """The head commit of branch *name*, or None when there is no such branch."""
        return self.refs.get(f"refs/heads/{name}")


_SCP_LIKE = re.compile(r"^[\w.-]+@[\w.-]+:")  # git@github.com:owner/repo


def is_local(url: str) -> bool:
    """Whether *url* names a repository on this disk (a path or ``file://``) rather than a remote."""
    url = url.strip()
    if url.startswith("file://"):
        return True
    return "://" not in url and not _SCP_LIKE.match(url)


def _local_refs(path: str) -> RemoteRefs:
    """Refs of a repository on this disk, read directly (peeled and with HEAD's target)."""
    from dulwich.errors import NotGitRepository
    from dulwich.repo import Repo

    try:
        repo = Repo(path)
    except (NotGitRepository, FileNotFoundError, NotADirectoryError) as e:
        raise RemoteError(f"{path}: not a git repository") from e
    with repo:
        refs: dict[str, str] = {}
        peeled: dict[str, str] = {}
        for name, sha in repo.get_refs().items():
            ref = ref_name(name)
            if ref is None:  # as a server's listing (_parse_refs): never a version, never printed
                continue
            refs[ref] = sha.decode()
            if ref.startswith("refs/tags/"):
                p = repo.refs.get_peeled(name)
                if p is None:  # a loose ref: peel through the object store
                    obj = repo[sha]
                    while obj.type_name == b"tag":
                        obj = repo[obj.object[1]]
                    p = obj.id
                if p != sha:
                    peeled[ref] = p.decode()
        symrefs = {}
        head = repo.refs.read_ref(b"HEAD")
        target = ref_name(head[5:]) if head and head.startswith(b"ref: ") else None
        if target is not None:
            symrefs["HEAD"] = target
    return RemoteRefs(path, MappingProxyType(refs), MappingProxyType(peeled), MappingProxyType(symrefs))


@functools.cache
def _tcp_client_class():
    """dulwich's git:// client, connecting with a timeout: dulwich's own connects and reads without one,
    and a stalled daemon would otherwise hang the check for ever. Only ``upload-pack`` (ls-remote and
    fetch) is needed here."""
    from dulwich.client import TCPGitClient
    from dulwich.protocol import DEFAULT_GIT_PROTOCOL_VERSION_FETCH, Protocol

    class TimeoutTCPGitClient(TCPGitClient):
        timeout: float = DEFAULT_TIMEOUT

        def _connect(self, cmd, path, protocol_version=None):  # type: ignore[no-untyped-def]
            if cmd != b"upload-pack":
                return super()._connect(cmd, path, protocol_version)
            if not isinstance(path, bytes):
                path = path.encode("utf-8")
            host = self._host
            if host.isascii():
                host = host.encode()  # a str host costs an import of the idna codec (~5 ms at start-up)
            s = socket.create_connection((host, self._port), timeout=self.timeout)
            on_deadline(shutdown(s))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            rfile = io.BufferedReader(_QuickAckReader(s), buffer_size=1 << 16)
            wfile = s.makefile("wb", 0)

            def close() -> None:
                rfile.close()
                wfile.close()
                s.close()

            proto = Protocol(rfile.read, wfile.write, close, report_activity=self._report_activity)
            if path.startswith(b"/~"):
                path = path[1:]
            self.protocol_version = protocol_version or DEFAULT_GIT_PROTOCOL_VERSION_FETCH
            # the version advertisement hides behind two NULs, as git itself sends it
            extra = b"\0\0version=%d\0" % self.protocol_version if self.protocol_version == 2 else b""
            proto.send_cmd(b"git-upload-pack", path, b"host=" + self._host.encode("ascii") + extra)
            return proto, lambda: _readable(s), None

    return TimeoutTCPGitClient


class _QuickAckReader(io.RawIOBase):
    """Reads a socket, acknowledging every segment at once (Linux TCP_QUICKACK, re-armed per read).

    git's upload-pack writes its ls-refs answer in pieces; with Nagle on its side and delayed ACKs on
    ours, each piece after the first waits ~40 ms for our ACK. Measured on loopback with 1,000 tags:
    44 ms without, 2 ms with. Elsewhere (no TCP_QUICKACK) this is a plain socket reader.
    """

    _QUICKACK = getattr(socket, "TCP_QUICKACK", None)

    def __init__(self, sock: socket.socket):
        super().__init__()
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def, override]
        if self._QUICKACK is not None:
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, self._QUICKACK, 1)
            except OSError:
                pass
        return self._sock.recv_into(buffer)


def _readable(s: socket.socket) -> bool:
    import select

    return bool(select.select([s], [], [], 0)[0])


def _client_for(url: str, timeout: float):  # type: ignore[no-untyped-def]
    from dulwich.client import (
        default_urllib3_manager,
        get_transport_and_path,
        get_transport_and_path_from_url,
    )

    parts = urlsplit(url)
    if parts.scheme in ("http", "https"):
        from urllib3.util import Retry

        pool = default_urllib3_manager(None, base_url=url, timeout=timeout)
        # urllib3 retries refused connections three times by default, logging a warning each time;
        # the next check asks again anyway, so fail at once (redirects are still followed)
        pool.connection_pool_kw["retries"] = Retry(total=5, connect=0, read=0, status=0, redirect=5)
        # connections that the listing's deadline can cut (a per-read timeout never trips on a trickle)
        pool.pool_classes_by_scheme = pool_classes()
        # dulwich's own URL handling: credentials in the URL, dumb-HTTP fallback
        return get_transport_and_path_from_url(url, pool_manager=pool)
    if parts.scheme == "git":
        cls = _tcp_client_class()
        client = cls(parts.hostname or "localhost", port=parts.port)
        client.timeout = timeout
        return client, parts.path
    # ssh (ssh://host/x or user@host:x) runs the ssh program: bound its connect, and a stalled
    # session (keep-alives unanswered for ~timeout), never prompt
    alive = max(1, int(timeout // 3))
    ssh = (f"ssh -o BatchMode=yes -o ConnectTimeout={max(1, int(timeout))} "
           f"-o ServerAliveInterval={alive} -o ServerAliveCountMax=3")
    client, path = get_transport_and_path(url, ssh_command=ssh)
    if hasattr(client, "ssh_vendor"):
        client.ssh_vendor = _deadline_ssh_vendor()()
    return client, path


@functools.cache
def _deadline_ssh_vendor() -> type:
    """dulwich's ssh-program vendor, the ssh process killed at the listing's deadline (its own
    keep-alives bound only a dead peer, not a live one that stops answering)."""
    from dulwich.client import SubprocessSSHVendor

    class DeadlineSSHVendor(SubprocessSSHVendor):
        def run_command(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            con = super().run_command(*args, **kwargs)
            on_deadline(con.proc.kill)
            return con

    return DeadlineSSHVendor


_SCHEMES = ("http", "https", "git", "ssh", "git+ssh", "ssh+git")


def _check_url(url: str) -> None:
    """Refuse URLs no transport here can use, before anything touches the network."""
    if _SCP_LIKE.match(url):
        return
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as e:
        raise DataError(f"{url}: not a valid URL ({e})") from e
    if parts.scheme not in _SCHEMES:
        raise DataError(f"{url}: unsupported scheme {parts.scheme!r} (use one of: {', '.join(_SCHEMES[:4])}, "
                        "a local path or file://)")
    if not parts.hostname:
        raise DataError(f"{url}: no host in the URL")


def ls_remote(url: str, *, timeout: float = DEFAULT_TIMEOUT) -> RemoteRefs:
    """List *url*'s refs: smart HTTP(S), git://, ssh, ``file://`` or a local path.

    *timeout* bounds each connect and read; the whole listing is bounded by
    :func:`listing_deadline` (its connection is cut then), so a server that trickles bytes cannot hold
    it. Raises RemoteError (naming the URL) when the remote cannot be reached, times out, is not a git
    repository or answers garbage (whatever the parsers raise on it), and for a local repository that
    cannot be read; DataError for a URL no transport can use (bad scheme, no host).
    """
    url = url.strip()
    if is_local(url):
        path = url[len("file://"):] if url.startswith("file://") else url
        try:
            return _local_refs(os.path.expanduser(path))
        except RemoteError:
            raise
        except Exception as e:  # a broken repository: a missing object (KeyError), a corrupt or unreadable file
            log.debug("ls-remote %s: unreadable repository", url, exc_info=True)
            raise RemoteError(f"{path}: cannot read the repository's refs ({_garbled(e)})") from e
    _check_url(url)
    started = time.monotonic()
    total = listing_deadline(timeout)
    deadline = Deadline(total)
    try:
        with deadline:
            refs, peeled, symrefs = _dulwich_refs(url, timeout)
        if deadline.expired:  # a cut connection can read as a short, well-formed answer: not trusted
            raise RemoteError(f"{url}: timed out (no complete answer within {total:g}s)")
    except (OSError, RemoteError) as e:
        if deadline.expired:  # whatever the cut connection made the transport raise
            raise RemoteError(f"{url}: timed out (no complete answer within {total:g}s)") from e
        if isinstance(e, RemoteError):
            raise
        raise RemoteError(f"{url}: {_describe(e)}") from e
    finally:
        log.debug("ls-remote %s took %.3fs", url, time.monotonic() - started)
    return RemoteRefs(url, MappingProxyType(refs), MappingProxyType(peeled), MappingProxyType(symrefs))


def _dulwich_refs(url: str, timeout: float) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    """``(refs, peeled, symrefs)`` through dulwich's client (git://, smart HTTP(S), ssh). Raises RemoteError;
    OSError passes through."""
    from dulwich.errors import GitProtocolError, HangupException

    try:
        client, path = _client_for(url, timeout)
        result = client.get_refs(path.encode() if isinstance(path, str) else path,
                                 ref_prefix=[p.encode() for p in _REF_PREFIX])
    except (GitProtocolError, HangupException) as e:
        raise RemoteError(f"{url}: {_describe(e)}") from e
    except OSError:
        raise
    except Exception as e:
        # urllib3 and dulwich raise assorted types, and dulwich's parsers builtin ones (ValueError,
        # KeyError, UnicodeDecodeError) on a garbled answer: all are the remote's fault, wrapped here
        if type(e).__module__.startswith(("urllib3", "dulwich")):
            raise RemoteError(f"{url}: {_describe(e)}") from e
        log.debug("ls-remote %s: unreadable answer", url, exc_info=True)
        raise RemoteError(f"{url}: the server's answer is not a git ref listing ({_garbled(e)})") from e
    try:
        return _parse_refs(url, result)
    except (UnicodeDecodeError, AttributeError, TypeError, ValueError) as e:
        log.debug("ls-remote %s: unreadable answer", url, exc_info=True)
        raise RemoteError(f"{url}: the server's answer is not a git ref listing ({_garbled(e)})") from e


def _garbled(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}".rstrip(": ")


def _parse_refs(url: str, result: Any) -> tuple[dict[str, str], dict[str, str], dict[str, str]]:
    refs: dict[str, str] = {}
    peeled: dict[str, str] = {}
    dropped = 0
    for name, sha in result.refs.items():
        if sha is None:  # an unborn HEAD
            continue
        if not _OBJECT_ID.fullmatch(sha):  # the server is hostile until its answer parses
            raise RemoteError(f"{url}: the server answered a malformed ref line for {name[:200]!r}")
        is_peeled = name.endswith(_PEELED.encode())
        ref = ref_name(name[: -len(_PEELED)] if is_peeled else name)
        if ref is None:  # a name git never makes: left out, as if the server had not sent it
            dropped += 1
        elif is_peeled:
            peeled[ref] = sha.decode()
        else:
            refs[ref] = sha.decode()
    if dropped:
        log.info("ls-remote %s: left out %d ref names git never makes", url, dropped)
    symrefs = {}
    for k, v in (result.symrefs or {}).items():
        key, target = ref_name(k), ref_name(v)
        if key is not None and target is not None:
            symrefs[key] = target
    return refs, peeled, symrefs


def _describe(e: BaseException) -> str:
    """A short reason for a transport failure (urllib3 and dulwich nest long reprs)."""
    if type(e).__module__.startswith("dulwich"):
        from dulwich.errors import NotGitRepository

        if isinstance(e, NotGitRepository):
            return "not a git repository (or not served here)"
    text = str(getattr(e, "reason", None) or e).strip() or type(e).__name__
    m = re.search(r"\[Errno -?\d+\] ([^\"')]+)", text)
    if m:
        return f"cannot reach: {m.group(1).strip()}"
    if "timed out" in text.lower():
        return "timed out"
    return text.splitlines()[0][:300]


def warm_up() -> None:
    """Import dulwich's client now, ahead of the first listing (the helper process does this while
    its parent starts; see :mod:`sync_tools.sources.lister`)."""
    _tcp_client_class()


class RefCache:
    """Per-run cache of :func:`ls_remote`: each URL is asked once; concurrent askers share the answer
    (or the error). Thread-safe. *lister* is the injected seam (default :func:`ls_remote`);
    *helper*, a :class:`~sync_tools.sources.lister.Helper`, lists the first :meth:`prefetch`'s
    remotes in its own process (whatever it does not answer is listed here)."""

    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT,
                 lister: Callable[..., RemoteRefs] | None = None, helper: Any = None):
        self.timeout = timeout
        self._lister = lister or ls_remote
        self._helper = helper
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self.requests = 0  # how many remote listings were actually made (tests read it)

    def get(self, url: str) -> RemoteRefs:
        """The refs of *url*, listed at most once per cache (a listing already started by
        :meth:`prefetch` or another thread is waited for). Raises RemoteError, or DataError for a URL
        no transport can use."""
        entry, owner = self._claim(url)
        if owner:
            self._fill(entry, url)
        elif not entry.done.wait(overall_bound(self.timeout)):
            # the listing in flight is stuck past every timeout it has (ssh bounds only a dead
            # peer, not a live one that stops answering): this asker is not held with it
            raise RemoteError(f"{url.strip()}: timed out")
        if entry.error is not None:
            raise entry.error
        assert entry.value is not None
        return entry.value

    def prefetch(self, urls: Iterable[str]) -> None:
        """Start listing each of *urls* not asked yet, and return at once: by the cache's helper
        process when it has one (the first call only), else each in a background thread. The servers'
        answers then overlap whatever the caller does next, and :meth:`get` waits for the listing in
        flight. Never raises; a listing's error is raised by :meth:`get`. Every listing is bounded by
        the cache's timeout."""
        claimed = []
        for url in urls:
            entry, owner = self._claim(url)
            if owner:
                claimed.append((entry, url))
        helper, self._helper = self._helper, None
        if helper is not None:
            if claimed and helper.ask([url for _, url in claimed], self.timeout):
                threading.Thread(target=self._fill_from, args=(helper, claimed), name="ls-remote-helper",
                                 daemon=True).start()
                return
            helper.close()
        for entry, url in claimed:
            threading.Thread(target=self._fill, args=(entry, url), name="ls-remote", daemon=True).start()

    def _fill_from(self, helper: Any, claimed: list[tuple[_Entry, str]]) -> None:
        """Fill *claimed* from the helper's answers as they arrive; each URL it did not answer is then
        listed here."""
        waiting = {url: entry for entry, url in claimed}
        try:
            for url, got in helper.answers():
                entry = waiting.get(url)
                if entry is None:
                    continue
                if len(got) == 4 and got[0] == "ok" and all(isinstance(m, dict) for m in got[1:]):
                    entry.value = RemoteRefs(url.strip(), MappingProxyType(got[1]), MappingProxyType(got[2]),
                                             MappingProxyType(got[3]))
                elif len(got) == 2 and isinstance(got[1], str) and got[0] in _ERRORS:
                    entry.error = _ERRORS[got[0]](got[1])
                else:
                    continue
                del waiting[url]
                entry.done.set()
        except Exception as e:  # noqa: BLE001 - whatever went wrong, the rest is listed here
            log.debug("ls-remote helper: %s", e)
        finally:
            for url, entry in waiting.items():
                threading.Thread(target=self._fill, args=(entry, url), name="ls-remote", daemon=True).start()

    def _claim(self, url: str) -> tuple[_Entry, bool]:
        """*url*'s entry, and whether the caller is the one to fill it."""
        key = url.strip().rstrip("/")
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                return entry, False
            entry = self._entries[key] = _Entry()
            self.requests += 1
            return entry, True

    def _fill(self, entry: _Entry, url: str) -> None:
        try:
            entry.value = self._lister(url, timeout=self.timeout)
        except Exception as e:  # kept for every asker, raised in its own thread by get()
            entry.error = e
        finally:
            entry.done.set()


_ERRORS: dict[str, type[Exception]] = {"RemoteError": RemoteError, "DataError": DataError}


class _Entry:
    """One URL's listing in a RefCache: set once by its owner, waited on by the rest."""

    __slots__ = ("done", "value", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: RemoteRefs | None = None
        self.error: Exception | None = None
