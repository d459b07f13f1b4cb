"""Fuzzing the agent's archive extractor (``sync_tools.agent.extract.extract_binary``).

Inputs: random bytes; gzip of random bytes; tar.gz archives built from random members (the right
binary, wrong names, ``..``, absolute paths, symlinks, hard links, devices, fifos, directories, several
members, sizes over the cap); and any of those with bytes flipped, cut or inserted, before or after
compression. Properties: only ArchiveError/DataError escape; on refusal nothing is left in the
destination directory; on success the single file written is the archive's binary, its sha256 is
returned, and it is no larger than the cap.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import zlib
from collections import Counter
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from sync_tools.agent.extract import extract_binary
from sync_tools.errors import DataError
from tests.reliability.fuzz_common import FuzzReport, run_property

BINARY = "nats-server"
CAP = 4096
_names = st.sampled_from([BINARY, f"./{BINARY}", f"/{BINARY}", f"../{BINARY}", f"a/../{BINARY}", f"dir/{BINARY}",
                          "other", "", ".", "..", f"{BINARY}/", f"{BINARY}\x00x", "é" * 50, "a" * 300])
_types = st.sampled_from([tarfile.REGTYPE, tarfile.REGTYPE, tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.SYMTYPE,
                          tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE, tarfile.DIRTYPE,
                          tarfile.CONTTYPE, tarfile.GNUTYPE_SPARSE])


@st.composite
def members(draw: st.DrawFn) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(draw(_names))
    info.type = draw(_types)
    info.mode = draw(st.sampled_from([0o755, 0o644, 0o4755, 0o7777, 0]))
    info.mtime = draw(st.integers(0, 2**33))
    if info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = draw(st.sampled_from(["/etc/passwd", "../x", BINARY, "x"]))
    if info.type in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    if info.isreg():
        data = draw(st.binary(max_size=64)) * draw(st.sampled_from([1, 1, 1, 80]))  # sometimes over CAP
        info.size = len(data)
        return info, data
    return info, None


def _tar_gz(ms: list[tuple[tarfile.TarInfo, bytes | None]], fmt: int) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=fmt) as tf:
        for info, data in ms:
            try:
                tf.addfile(info, io.BytesIO(data) if data is not None else None)
            except (ValueError, tarfile.TarError, UnicodeError):
                continue  # a member the writer itself refuses (e.g. a name USTAR cannot hold)
    return raw.getvalue()


def _mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    b = bytearray(data)
    for op, pos, val in ops:
        if not b:
            break
        i = pos % len(b)
        if op == "flip":
            b[i] ^= (val % 255) + 1
        elif op == "cut":
            del b[i:]
        elif op == "insert":
            b[i:i] = bytes([val % 256]) * (1 + val % 7)
        elif op == "zero":
            b[i:i + 1 + val % 512] = bytes(len(b[i:i + 1 + val % 512]))
    return bytes(b)


_ops = st.lists(st.tuples(st.sampled_from(["flip", "cut", "insert", "zero"]), st.integers(0, 2**20),
                          st.integers(0, 2**16)), max_size=4)


@st.composite
def archives(draw: st.DrawFn) -> tuple[str, bytes]:
    kind = draw(st.sampled_from(["random", "gzip-random", "tar", "tar", "tar", "tar-mutated", "tar-mutated",
                                 "gz-mutated"]))
    if kind == "random":
        return kind, draw(st.binary(max_size=2048))
    if kind == "gzip-random":
        return kind, gzip.compress(draw(st.binary(max_size=2048)), mtime=0)
    ms = draw(st.lists(members(), min_size=0, max_size=3))
    if draw(st.booleans()):
        ms.insert(0, (tarfile.TarInfo(BINARY), None))
        ms[0][0].size = 0
        ms[0] = (ms[0][0], b"")
    fmt = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]))
    raw = _tar_gz(ms, fmt)
    if kind == "tar-mutated":
        raw = _mutate(raw, draw(_ops))
    gz = gzip.compress(raw, compresslevel=draw(st.integers(0, 9)), mtime=0)
    if kind == "gz-mutated":
        gz = _mutate(gz, draw(_ops))
    return kind, gz


def fuzz_extract(workdir: Path, max_examples: int, *, raise_on_violation: bool = True) -> FuzzReport:
    """Fuzz ``extract_binary`` with archives written under *workdir*."""
    workdir.mkdir(parents=True, exist_ok=True)
    outcomes: Counter[str] = Counter()
    counter = iter(range(10**9))

    @given(archives())
    def prop(case: tuple[str, bytes]) -> None:
        kind, data = case
        n = next(counter)
        src = workdir / f"in-{n}.tar.gz"
        out_dir = workdir / f"out-{n}"
        out_dir.mkdir()
        src.write_bytes(data)
        dest = out_dir / f".{BINARY}.staged"
        try:
            try:
                sha = extract_binary(src, BINARY, dest, max_bytes=CAP)
            except DataError as e:
                assert list(out_dir.iterdir()) == [], f"refused ({e}) but left {list(out_dir.iterdir())}"
                outcomes[f"refused: {_reason(str(e))}"] += 1
                return
            assert [p.name for p in out_dir.iterdir()] == [dest.name]
            written = dest.read_bytes()
            assert hashlib.sha256(written).hexdigest() == sha and len(written) <= CAP
            assert written == _the_binary(data), "extracted bytes differ from the archive's binary"
            outcomes["extracted"] += 1
        finally:
            src.unlink(missing_ok=True)
            for p in out_dir.iterdir():
                p.unlink()
            out_dir.rmdir()

    return run_property("archive extractor", prop, max_examples, outcomes, raise_on_violation=raise_on_violation)


def _the_binary(gz: bytes) -> bytes:
    """The first member's bytes, read independently with tarfile (for the success check). Decompresses
    only the readable prefix: like the extractor, it never needs what follows the end-of-archive block."""
    d = zlib.decompressobj(31)
    raw = b""
    for i in range(len(gz)):  # byte by byte, so nothing before a corrupt byte is dropped
        try:
            raw += d.decompress(gz[i:i + 1])
        except zlib.error:
            break
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tf:
        m = tf.next()
        assert m is not None
        f = tf.extractfile(m)
        assert f is not None
        return f.read()


def _reason(message: str) -> str:
    """A short class of refusal for the outcome table (the message minus names and numbers)."""
    for key in ("not a readable tar.gz", "corrupt archive", "empty archive", "absolute path", "leaves the archive",
                "link", "device or fifo", "not a regular file", "expected the binary", "over the", "more than one",
                "data filter", "holds more", "ended after", "has no data"):
        if key in message:
            return key
    return "other"
