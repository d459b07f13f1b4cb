"""A helper process that lists remotes for ``sync-tools check``, forked as the command starts.

``check`` is CPU-bound on one core: most of its time is imports (click, the config's YAML, dulwich's
client), then parsing thousands of refs. The helper is forked by ``sync_tools.__main__`` before
any of that is imported, while the process is one small thread. It imports dulwich's client on
the second core while the parent imports the CLI and reads the config, then lists the remotes the
parent sends it (:meth:`RefCache.prefetch <sync_tools.sources.remote.RefCache.prefetch>`) and
answers with their refs. The parent never imports dulwich's client for them. Measured on the
benchmark's 5 remotes of 1,000 tags, 21 interleaved runs: 264 -> 217 ms for the whole ``check``.

The helper is only a faster path to the same answer:

- Linux only (fork without exec is unsafe with some macOS system libraries; Windows has no fork).
- One request per process: ``(urls, timeout)``, answered with one length-prefixed message per
  remote as soon as it is listed (the parent reads one remote's tags while the helper lists the
  rest), all ``marshal`` (the two ends are the same Python binary). A remote's failure comes back
  as its RemoteError or DataError message and is raised as that in the parent, as an in-process
  listing would.
- Anything else (no helper, a dead one, a short or garbled answer, a URL missing from it) and the
  parent lists that URL itself. Nothing waits on a helper past the listing timeouts.
- The helper reads nothing but its request and writes nothing but its answer (its stdin, stdout
  and stderr are /dev/null, so it never holds a caller's pipe open either). It exits when the
  request is answered, or when the parent goes away without sending one (end of file on the pipe).
- It never outlives its purpose: the kernel kills it when the parent ends (``PR_SET_PDEATHSIG``),
  and SIGALRM ends it at the bound the parent waits for a listing
  (:func:`~sync_tools.sources.remote.overall_bound`), whatever a server does meanwhile.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from typing import Any

_MAX_ANSWER = 256 << 20  # one remote's refs; a longer frame is garbage and ends the answers
_started: Helper | None = None


class Helper:
    """The parent's end of a forked helper: :meth:`ask` once, then read :meth:`answers` once."""

    def __init__(self, pid: int, request_fd: int, answer_fd: int):
        self.pid = pid
        self._request_fd: int | None = request_fd
        self._answer_fd: int | None = answer_fd

    def ask(self, urls: list[str], timeout: float) -> bool:
        """Send the one request. False (and the helper is given up) when it cannot be sent."""
        import marshal

        fd, self._request_fd = self._request_fd, None
        if fd is None:
            return False
        try:
            _write_all(fd, marshal.dumps((list(urls), float(timeout))))
            return True
        except OSError:
            self.close()
            return False
        finally:
            os.close(fd)

    def answers(self) -> Iterator[tuple[str, tuple[Any, ...]]]:
        """The helper's answers as they come, one per URL: ``(url, ("ok", refs, peeled, symrefs))``
        or ``(url, (error type, message))``. Ends when the helper is done, died, or sent garbage;
        the caller lists the URLs left unanswered itself."""
        import marshal

        fd, self._answer_fd = self._answer_fd, None
        if fd is None:
            return
        try:
            while True:
                head = _read_exactly(fd, 4)
                size = int.from_bytes(head, "big") if len(head) == 4 else 0
                if not 0 < size <= _MAX_ANSWER:
                    return
                body = _read_exactly(fd, size)
                if len(body) != size:
                    return
                try:
                    url, answer = marshal.loads(body)
                except (EOFError, ValueError, TypeError):
                    return
                if isinstance(url, str) and isinstance(answer, tuple):
                    yield url, answer
        except OSError:
            return
        finally:
            os.close(fd)

    def close(self) -> None:
        for name in ("_request_fd", "_answer_fd"):
            fd = getattr(self, name)
            setattr(self, name, None)
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


def wanted(argv: list[str]) -> bool:
    """Whether *argv* (without the program name) runs ``check``: its first word that is not an
    option. The group's options take no values (-v, --verbose, --version, -h, --help)."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg == "check"
        if arg in ("--help", "-h", "--version"):
            return False
    return False


def start() -> Helper | None:
    """Fork the helper (see the module's docstring), or None where there is no helper. Call before
    any thread starts; the helper is then :func:`take`-n by the command."""
    global _started
    if not sys.platform.startswith("linux"):
        return None
    try:
        request_r, request_w = os.pipe()
        answer_r, answer_w = os.pipe()
    except OSError:
        return None
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    parent = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        for fd in (request_r, request_w, answer_r, answer_w):
            os.close(fd)
        return None
    if pid == 0:  # the helper
        _die_with(parent)
        os.close(request_w)
        os.close(answer_r)
        _serve(request_r, answer_w)  # never returns
    os.close(request_r)
    os.close(answer_w)
    _started = Helper(pid, request_w, answer_r)
    return _started


def take() -> Helper | None:
    """The helper started in this process, once (a second caller gets None)."""
    global _started
    helper, _started = _started, None
    return helper


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when *parent* ends (Linux ``PR_SET_PDEATHSIG``): a helper
    must not go on listing for a check that is gone. Best effort: without it the pipe's end of file
    and the helper's own time bound (:func:`_serve`) still end it."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the parent died before the request to the kernel was made
        os._exit(1)


_PR_SET_PDEATHSIG = 1
_REQUEST_WAIT = 120  # seconds the helper waits for its request: the parent sends it within a second


def _serve(request_fd: int, answer_fd: int) -> None:
    """The helper's life: import dulwich's client, read the request, list, answer, exit. Its whole
    life is bounded by SIGALRM (whose default action ends the process): first while it waits for the
    request, then by the bound the parent waits for listings (:func:`remote.overall_bound`)."""
    import signal

    status = 1
    try:
        try:
            signal.signal(signal.SIGALRM, signal.SIG_DFL)  # its default action ends the process
        except ValueError:
            pass  # forked from a thread other than the main one: SIGALRM is left as it was
        signal.alarm(_REQUEST_WAIT)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):  # nor holds a caller's pipe open: its failures reach the parent as no answer
            os.dup2(devnull, fd)
        import marshal

        from sync_tools.sources import remote

        remote.warm_up()  # dulwich's client, while the parent imports the CLI
        request = _read_all(request_fd)
        if request:
            urls, timeout = marshal.loads(request)
            bound = remote.overall_bound(float(timeout))
            signal.alarm(max(1, math.ceil(bound)))
            _list(remote, urls, timeout, answer_fd, bound)
        status = 0
    except BaseException:  # noqa: BLE001 - the parent sees a missing answer and lists by itself
        pass
    finally:
        os._exit(status)


def _list(remote: Any, urls: list[str], timeout: float, answer_fd: int, bound: float) -> None:
    """List every URL in its own thread, each answer sent as soon as it is known, so the parent
    reads one remote's tags while the others are still being listed. Returns within *bound*
    seconds: a listing still running then is left to die with the process."""
    import marshal
    import threading
    import time

    from sync_tools.errors import DataError, RemoteError

    lock = threading.Lock()

    def one(url: str) -> None:
        try:
            refs = remote.ls_remote(url, timeout=timeout)
            answer: tuple[Any, ...] = ("ok", dict(refs.refs), dict(refs.peeled), dict(refs.symrefs))
        except RemoteError as e:
            answer = ("RemoteError", str(e))
        except DataError as e:
            answer = ("DataError", str(e))
        except Exception:  # noqa: BLE001 - not ours to describe: the parent lists it again
            return
        data = marshal.dumps((url, answer))
        with lock:
            _write_all(answer_fd, len(data).to_bytes(4, "big") + data)

    threads = [threading.Thread(target=one, args=(url,), daemon=True) for url in dict.fromkeys(urls)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + bound
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))


def _read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 1 << 16):
        parts.append(chunk)
    return b"".join(parts)


def _read_exactly(fd: int, n: int) -> bytes:
    parts = []
    while n > 0 and (chunk := os.read(fd, min(n, 1 << 20))):
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
