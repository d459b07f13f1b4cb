"""Fuzzing the agent's archive extractor (shortened; full size: bench/reliability)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability.fuzz_archive import fuzz_extract
from tests.reliability.fuzz_atheris import run_atheris


def test_extractor_raises_only_archive_errors_and_leaves_nothing_behind(tmp_path: Path) -> None:
    r = fuzz_extract(tmp_path, 400)
    assert r.inputs >= 400 and r.violations == ()
    assert r.outcomes.get("extracted", 0) > 0  # valid archives still extract
    refusals = {k for k in r.outcomes if k.startswith("refused")}
    assert len(refusals) >= 5, r.outcomes  # many different hostile shapes were reached


def test_atheris_coverage_guided_extractor() -> None:
    pytest.importorskip("atheris", reason="atheris has wheels for Linux x86_64 only")
    r = run_atheris("archive", 2000)
    # libFuzzer checks -runs between inputs and now and then runs one more (seen: "Done 2001 runs")
    assert r.violations == () and r.inputs >= 2000 and r.outcomes["coverage edges"] > 10


def test_a_gzip_header_with_reserved_flag_bits_is_refused(tmp_path: Path) -> None:
    """Found by the fuzzer: Python's gzip module reads past reserved FLG bits, which RFC 1952 says a
    decompressor must refuse (zlib does); the extractor refuses them too."""
    import gzip
    import io
    import tarfile

    from sync_tools.agent.extract import extract_binary
    from sync_tools.errors import ArchiveError

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("nats-server")
        info.size = 4
        tf.addfile(info, io.BytesIO(b"\x7fELF"))
    gz = bytearray(gzip.compress(buf.getvalue(), mtime=0))
    src = tmp_path / "a.tar.gz"
    src.write_bytes(bytes(gz))
    assert extract_binary(src, "nats-server", tmp_path / "ok", max_bytes=1 << 20)  # the clean one extracts
    gz[3] |= 0xC0
    src.write_bytes(bytes(gz))
    with pytest.raises(ArchiveError, match="reserved flag bits"):
        extract_binary(src, "nats-server", tmp_path / "bad", max_bytes=1 << 20)
    assert not (tmp_path / "bad").exists()
