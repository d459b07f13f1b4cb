"""The patch path, packaging and the platform check against hostile and real input (found by a review;
each test failed before its fix): a small patch that names 512 MiB, Go's four MIPS targets, a
SOURCE_DATE_EPOCH in milliseconds.

Real hdiffpatch patches applied in the agent's real child process, real ELF headers, a real workspace
build packaged through the CLI. Nothing of the code under test is mocked."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sync_tools import binfmt
from sync_tools.errors import DataError

ROOT = Path(__file__).resolve().parent.parent

# Runs apply_patch (which itself starts the apply child) and reports the child's peak RSS in KiB:
# RUSAGE_CHILDREN of this helper covers only that one child.
_MEASURE = r"""
import resource, sys
from pathlib import Path
from sync_tools import patches
old, patch, out, cap = sys.argv[1:5]
try:
    patches.apply_patch(Path(old), Path(patch), Path(out), max_bytes=int(cap))
    print("applied")
except patches.PatchError as e:
    print("refused", e)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def _apply_measured(old: Path, patch: Path, out: Path, cap: int) -> tuple[str, int]:
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(old), str(patch), str(out), str(cap)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, check=True)
    lines = proc.stdout.strip().splitlines()
    return lines[0], int(lines[-1]) * 1024


def test_a_patch_making_far_more_than_the_cap_is_refused_before_its_output_is_built(tmp_path) -> None:
    """A patch (whose sha256 the signed manifest may well vouch for) that expands 1 MiB of old binary
    into 512 MiB must be refused by the agent's cap (here 1 MiB) without the apply child ever holding
    the 512 MiB: the docs promise the apply's memory is bounded by max_binary_bytes. apply_here only
    compares len(new) with the cap after hdiffpatch.apply has built the whole output in memory."""
    import hdiffpatch

    old = tmp_path / "old"
    old.write_bytes(bytes(1 << 20))
    body = hdiffpatch.diff(old.read_bytes(), bytes(512 << 20), "zstd")
    assert len(body) < 64 * 1024  # a small download, well under any asset's size
    patch = tmp_path / "bomb.hdiff"
    patch.write_bytes(body)
    del body

    outcome, peak = _apply_measured(old, patch, tmp_path / "out", 1 << 20)
    assert outcome.startswith("refused") and "cap" in outcome  # it is refused, and leaves nothing
    assert not (tmp_path / "out").exists()
    # an interpreter, 1 MiB of old binary and a tiny patch: far under 160 MiB. The child held the
    # whole 512 MiB output (a patch naming a few GiB takes the machine's memory the same way).
    assert peak < 160 << 20, f"the apply child peaked at {peak >> 20} MiB for a 1 MiB cap"


def _elf(path: Path, *, bits: int, little: bool, machine: int) -> Path:
    """A minimal ELF header: e_ident (class, data, version), e_type EXEC, e_machine, e_version."""
    end = "<" if little else ">"
    ident = b"\x7fELF" + bytes([1 if bits == 32 else 2, 1 if little else 2, 1, 0]) + b"\0" * 8
    path.write_bytes(ident + struct.pack(end + "HHI", 2, machine, 1) + b"\0" * 64)
    return path


EM_MIPS = 0x08


def test_a_little_endian_mips_build_is_labelled_mipsle_not_mips(tmp_path) -> None:
    """Go's GOARCH has mips, mipsle, mips64 and mips64le, all ELF e_machine EM_MIPS, told apart only by
    the ELF data encoding and class. binfmt maps EM_MIPS to "mips" whatever those say: package refuses
    every linux/mipsle (and mips64, mips64le) build, and labels a little-endian binary linux/mips,
    which big-endian agents then download and cannot run."""
    mipsle = _elf(tmp_path / "mipsle", bits=32, little=True, machine=EM_MIPS)
    binfmt.check_platform(_elf(tmp_path / "mips", bits=32, little=False, machine=EM_MIPS), "linux/mips")
    binfmt.check_platform(mipsle, "linux/mipsle")  # raises: "ELF executable for mips, not mipsle"
    with pytest.raises(DataError):
        binfmt.check_platform(mipsle, "linux/mips")
    binfmt.check_platform(_elf(tmp_path / "m64le", bits=64, little=True, machine=EM_MIPS), "linux/mips64le")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from sync_tools.build import build
    from tests.workspace import make_workspace

    ws = make_workspace(tmp_path_factory.mktemp("review-pkg") / "ws", git=False)
    build(ws.config(), ["nats"], platform="linux/amd64", env=ws.env())
    return ws


def test_a_source_date_epoch_in_milliseconds_is_a_one_line_error(built, tmp_path) -> None:
    """SOURCE_DATE_EPOCH in milliseconds (a common slip: Date.now(), `%ct000`) passes the check in
    package.source_date_epoch (a non-negative int), then USTAR's 11-digit octal mtime field overflows
    inside tarfile: a ValueError traceback out of `sync-tools package` instead of one line naming
    SOURCE_DATE_EPOCH."""
    from sync_tools.cli import cli

    args = ["package", "--only", "nats", "--platform", "linux/amd64", "--dist", str(tmp_path / "d"),
            "--config", str(built.config_path)]
    result = CliRunner().invoke(cli, args, env={"SOURCE_DATE_EPOCH": "1700000000000"})
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not a traceback
    assert "SOURCE_DATE_EPOCH" in result.output
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())
