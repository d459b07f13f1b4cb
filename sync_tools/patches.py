"""Binary patches between two builds of one binary: made by ``release``, applied by the agent.

The format is HDiffPatch's (PyPI ``hdiffpatch``) with LZMA2 compression, chosen by measurement on
real nats-server binaries (docs/decisions.md, bench/delta): 7.3% of the gzip'd asset for a patch
release, 3 s to make, 0.08 s to apply. Nothing here writes or parses the patch bytes itself.

Making a patch runs in a child process of its own (``python -m sync_tools.patches make OLD NEW OUT``),
killed at its deadline: the library holds several times the binary in memory and takes minutes for a
large one (benchmarks.md, section 4). ``release`` gives all its patches together :data:`MAKE_BUDGET`
seconds and makes none for a binary over :data:`MAX_MAKE_BYTES`, so a release always goes out, with
full assets only for what did not fit.

The apply runs in a child process (``python -m sync_tools.patches apply OLD PATCH OUT``): the library
holds the old and new binaries in memory while it works (about twice the binary's size), and that
transient peak, like any crash of the C code, then stays out of the long-lived agent. The child has a
deadline and its output file is created exclusively and removed on any failure.

Names: a patch asset is ``<asset stem>.<from sha256[:16]>-<to sha256[:16]>.hdiff`` beside the full
asset ``<asset stem>.tar.gz``; the store keeps the full assets of earlier builds it still makes
patches from as ``<asset stem>.base-<sha256[:16]>.tar.gz``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from sync_tools.errors import DataError
from sync_tools.fsutil import atomic_writer

log = logging.getLogger(__name__)

#: The one format this sync-tools makes and applies (the manifest's ``format``); agents skip others.
FORMAT = "hdiffpatch"
FORMATS = frozenset({FORMAT})
SUFFIX = {FORMAT: "hdiff"}
#: A patch over this share of the full asset is not published: the download it saves is small, and a
#: delta must never cost more than the full download.
MAX_SHARE = 0.5
#: How many earlier builds of an asset ``release`` makes patches from.
DEFAULT_FROM = 3
#: Seconds the agent's apply may take (0.1 s for nats-server; a small, busy machine gets room).
APPLY_TIMEOUT = 300.0
#: No patch is made for a binary over this size: making one holds about six times the binary in memory
#: (a GitHub runner has 7 GB), and takes minutes for one the size of grafana's server.
MAX_MAKE_BYTES = 512 << 20
#: Seconds one patch may take to make when the caller gives no deadline (the child is killed past it).
MAKE_TIMEOUT = 600.0
#: Seconds all the patches of one ``release`` may take together (bases fetched, patches made and
#: uploaded): past it no more are made and the rest of the release's assets go out as full assets only.
#: The release job has a 30-minute timeout, and the full assets and the manifest must still fit in it.
MAKE_BUDGET = 600.0
# LZMA2 with an 8 MiB dictionary: the applying side holds that much beside the two binaries.
_LZMA2_LEVEL, _LZMA2_WINDOW = 9, 23
_STEM = re.compile(r"^(?P<stem>.+)\.tar\.gz$")


class PatchError(DataError):
    """A patch could not be made or applied (bad patch, wrong base, the library failed)."""


def stem(asset_name: str) -> str:
    """``nats-server-linux-amd64.tar.gz`` -> ``nats-server-linux-amd64``."""
    m = _STEM.match(asset_name)
    if m is None:
        raise DataError(f"{asset_name!r} is not a .tar.gz asset name")
    return m.group("stem")


def patch_name(asset_name: str, from_sha: str, to_sha: str, fmt: str = FORMAT) -> str:
    return f"{stem(asset_name)}.{from_sha[:16]}-{to_sha[:16]}.{SUFFIX[fmt]}"


def base_name(asset_name: str, binary_sha: str) -> str:
    return f"{stem(asset_name)}.base-{binary_sha[:16]}.tar.gz"


def is_patch_of(name: str, asset_name: str) -> bool:
    """True when *name* is a patch asset (any format) of *asset_name*'s stem."""
    return re.fullmatch(re.escape(stem(asset_name)) + r"\.[0-9a-f]{16}-[0-9a-f]{16}\.[a-z0-9]+", name) is not None


def is_base_of(name: str, asset_name: str) -> bool:
    return re.fullmatch(re.escape(stem(asset_name)) + r"\.base-[0-9a-f]{16}\.tar\.gz", name) is not None


def make_patch(old: Path, new: Path, out: Path, *, timeout: float = MAKE_TIMEOUT) -> int:
    """Write the patch that turns the file *old* into *new* to *out* (atomically); return its size.

    Made in a child process that is killed after *timeout* seconds; *out* never stays behind on a
    failure. A file over :data:`MAX_MAKE_BYTES` is refused before anything is read. The library checks
    its own output against *new* before returning. Raises PatchError."""
    old, new, out = Path(old), Path(new), Path(out)
    for f in (old, new):
        if f.stat().st_size > MAX_MAKE_BYTES:
            raise PatchError(f"{f.name} is {f.stat().st_size} bytes, over the {MAX_MAKE_BYTES}-byte limit for "
                             "making patches")
    if timeout <= 0:
        raise PatchError(f"no time left to make a patch {old.name} -> {new.name}")
    cmd = [sys.executable, "-m", "sync_tools.patches", "make", str(old), str(new), str(out)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:  # run() has killed the child
        out.unlink(missing_ok=True)
        raise PatchError(f"making a patch {old.name} -> {new.name} took over {timeout:g}s; stopped") from e
    except OSError as e:
        raise PatchError(f"cannot start making a patch {old.name} -> {new.name}: {e}") from e
    size = proc.stdout.strip()
    if proc.returncode != 0 or not size.isdigit() or not out.is_file() or out.stat().st_size != int(size):
        out.unlink(missing_ok=True)
        lines = proc.stderr.strip().splitlines()
        why = lines[-1] if lines else (f"killed by signal {-proc.returncode} (out of memory?)" if proc.returncode < 0
                                       else f"exit status {proc.returncode}")
        raise PatchError(f"making a patch {old.name} -> {new.name} failed: {why}")
    return int(size)


def make_here(old: Path, new: Path, out: Path) -> int:
    """:func:`make_patch`'s work, in this process (the child it starts). Raises PatchError, OSError."""
    import hdiffpatch

    old_data, new_data = Path(old).read_bytes(), Path(new).read_bytes()
    try:
        data = hdiffpatch.diff(old_data, new_data,
                               hdiffpatch.Lzma2Config(level=_LZMA2_LEVEL, window=_LZMA2_WINDOW), validate=True)
    except (hdiffpatch.HDiffPatchError, ValueError, MemoryError) as e:
        raise PatchError(f"making a patch {Path(old).name} -> {Path(new).name} failed: {e}") from e
    with atomic_writer(out, mode=0o644) as fh:
        fh.write(data)
    return len(data)


def apply_here(old: Path, patch: Path, out: Path, *, max_bytes: int) -> str:
    """Apply *patch* to *old* in this process, writing *out* (created exclusively, mode 0755, fsynced;
    removed on failure). Returns the sha256 of what was written. Raises PatchError, OSError."""
    import hdiffpatch

    try:
        new = hdiffpatch.apply(Path(old).read_bytes(), Path(patch).read_bytes())
    except MemoryError as e:  # the address-space limit _main set: a patch whose output is over the cap
        raise PatchError(f"{Path(patch).name}: needs more memory than its output cap of {max_bytes} bytes "
                         "allows") from e
    except (hdiffpatch.HDiffPatchError, ValueError) as e:
        raise PatchError(f"{Path(patch).name}: does not apply to {Path(old).name}: {e}") from e
    if len(new) > max_bytes:
        raise PatchError(f"{Path(patch).name}: makes {len(new)} bytes, over the {max_bytes}-byte cap")
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o755)
    try:
        view = memoryview(new)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
        os.fchmod(fd, 0o755)
    except BaseException:
        os.close(fd)
        Path(out).unlink(missing_ok=True)
        raise
    os.close(fd)
    return hashlib.sha256(new).hexdigest()


def apply_patch(old: Path, patch: Path, out: Path, *, fmt: str = FORMAT, max_bytes: int,
                timeout: float = APPLY_TIMEOUT) -> str:
    """Apply *patch* (format *fmt*) to the file *old*, writing *out*, in a child process with a
    deadline of *timeout* seconds. Returns the sha256 of *out*; the caller compares it with the
    manifest before using the file. *out* never stays behind half-written. Raises PatchError."""
    if fmt not in FORMATS:
        raise PatchError(f"{Path(patch).name}: unknown patch format {fmt!r}")
    cmd = [sys.executable, "-m", "sync_tools.patches", "apply", str(old), str(patch), str(out), str(max_bytes)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        Path(out).unlink(missing_ok=True)
        raise PatchError(f"{Path(patch).name}: apply took over {timeout:g}s") from e
    except OSError as e:
        raise PatchError(f"{Path(patch).name}: cannot start the apply: {e}") from e
    sha = proc.stdout.strip()
    if proc.returncode != 0 or not re.fullmatch(r"[0-9a-f]{64}", sha):
        Path(out).unlink(missing_ok=True)
        lines = proc.stderr.strip().splitlines()
        why = lines[-1] if lines else f"exit status {proc.returncode}"
        raise PatchError(f"{Path(patch).name}: apply failed: {why}")
    return sha


def _limit_memory(old: Path, patch: Path, max_bytes: int) -> None:
    """Bound this (the apply child's) address space by what an honest apply needs: the interpreter as
    it is now, the old binary and the patch read in, and the output up to *max_bytes*, each twice over
    for the library's buffers. The library builds the whole output before anyone can compare its
    size with the cap, so a small patch that names gigabytes must fail on allocation instead of
    taking the machine's memory. Linux only (elsewhere RLIMIT_AS is absent or not enforced)."""
    try:
        import resource

        status = Path("/proc/self/status").read_text()
        vm = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmSize:"))
    except (ImportError, OSError, StopIteration, ValueError):
        return
    need = vm + 2 * (old.stat().st_size + patch.stat().st_size + max_bytes) + (64 << 20)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        need = min(need, hard)
    resource.setrlimit(resource.RLIMIT_AS, (need, hard))


def _main(argv: list[str]) -> int:
    """``python -m sync_tools.patches apply OLD PATCH OUT MAX_BYTES``: print the sha256 of OUT;
    ``python -m sync_tools.patches make OLD NEW OUT``: print the size of the patch written to OUT."""
    if len(argv) == 4 and argv[0] == "make":
        try:
            print(make_here(Path(argv[1]), Path(argv[2]), Path(argv[3])))
        except (PatchError, OSError) as e:
            print(f"{type(e).__name__}: {e}", file=sys.stderr)
            return 1
        return 0
    if len(argv) != 5 or argv[0] != "apply":
        print("usage: python -m sync_tools.patches apply OLD PATCH OUT MAX_BYTES | make OLD NEW OUT", file=sys.stderr)
        return 2
    try:
        old, patch, cap = Path(argv[1]), Path(argv[2]), int(argv[4])
        _limit_memory(old, patch, cap)
        print(apply_here(old, patch, Path(argv[3]), max_bytes=cap))
    except (PatchError, OSError, ValueError) as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
