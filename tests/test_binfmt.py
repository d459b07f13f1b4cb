"""package's platform check reads real executable headers (point 3 of the adoption issue: package
refuses a binary whose format and architecture do not match its platform label)."""

from __future__ import annotations

import os
import shutil
import struct
import sys
from pathlib import Path

import pytest

from sync_tools import binfmt
from sync_tools.errors import DataError

HOST_ELF = Path(os.path.realpath(sys.executable))  # a real ELF executable of this machine
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)


def macho(path: Path, cpu: int) -> Path:
    # mach_header_64: magic, cputype, cpusubtype, filetype (MH_EXECUTE), ncmds, sizeofcmds, flags, reserved
    path.write_bytes(struct.pack("<IiiIIIII", 0xFEEDFACF, cpu, 3, 2, 0, 0, 0, 0) + b"\0" * 64)
    return path


def fat(path: Path, cpus: list[int]) -> Path:
    arches = b"".join(struct.pack(">iiIII", c, 0, 4096 * (i + 1), 4096, 12) for i, c in enumerate(cpus))
    path.write_bytes(struct.pack(">II", 0xCAFEBABE, len(cpus)) + arches + b"\0" * 64)
    return path


def pe(path: Path, machine: int) -> Path:
    dos = bytearray(b"MZ" + b"\0" * 0x3E)
    struct.pack_into("<I", dos, 0x3C, 0x40)
    path.write_bytes(bytes(dos) + b"PE\0\0" + struct.pack("<HH", machine, 0) + b"\0" * 64)
    return path


def test_the_hosts_own_executable_is_its_platform() -> None:
    assert binfmt.identify(HOST_ELF) == binfmt.Format("elf", (HOST_ARCH,))
    binfmt.check_platform(HOST_ELF, f"linux/{HOST_ARCH}")
    other = "arm64" if HOST_ARCH == "amd64" else "amd64"
    with pytest.raises(DataError, match=f"ELF executable for {HOST_ARCH}, not {other}"):
        binfmt.check_platform(HOST_ELF, f"linux/{other}")
    with pytest.raises(DataError, match="which darwin does not run"):
        binfmt.check_platform(HOST_ELF, f"darwin/{HOST_ARCH}")
    with pytest.raises(DataError, match="which windows does not run"):
        binfmt.check_platform(HOST_ELF, f"windows/{HOST_ARCH}")


def test_macho_thin_and_universal(tmp_path) -> None:
    arm = macho(tmp_path / "arm", 0x0100000C)
    binfmt.check_platform(arm, "darwin/arm64")
    with pytest.raises(DataError, match="for arm64, not amd64"):
        binfmt.check_platform(arm, "darwin/amd64")
    with pytest.raises(DataError, match="which linux does not run"):
        binfmt.check_platform(arm, "linux/arm64")
    both = fat(tmp_path / "both", [0x01000007, 0x0100000C])
    binfmt.check_platform(both, "darwin/amd64")
    binfmt.check_platform(both, "darwin/arm64")


def test_pe(tmp_path) -> None:
    exe = pe(tmp_path / "x.exe", 0x8664)
    binfmt.check_platform(exe, "windows/amd64")
    with pytest.raises(DataError, match="for amd64, not arm64"):
        binfmt.check_platform(exe, "windows/arm64")


def test_scripts_pass_everywhere_and_unknown_bytes_nowhere(tmp_path) -> None:
    script = tmp_path / "s"
    script.write_text("#!/bin/sh\necho hi\n")
    for plat in ("linux/amd64", "darwin/arm64", "windows/amd64"):
        binfmt.check_platform(script, plat)
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x00\x01garbage")
    with pytest.raises(DataError, match="not an executable"):
        binfmt.check_platform(junk, "linux/amd64")
    for short in (b"\x7fELF", b"MZ", b"\xca\xfe\xba\xbe\x00\x00\x00\x05"):
        (tmp_path / "short").write_bytes(short)
        with pytest.raises(DataError):
            binfmt.check_platform(tmp_path / "short", "linux/amd64")


def test_package_refuses_a_binary_labelled_with_another_platform(tmp_path) -> None:
    from sync_tools.build import build
    from sync_tools.package import package
    from tests.workspace import make_workspace

    ws = make_workspace(tmp_path / "ws", git=False)
    other = "arm64" if HOST_ARCH == "amd64" else "amd64"
    # the workspace's build makes a #! script; put this machine's real ELF in its place, as a build
    # that ignored GOARCH would
    build(ws.config(), ["nats"], platform=f"linux/{other}", env=ws.env())
    binary = ws.binary_path("nats")
    shutil.copy(HOST_ELF, binary)
    from sync_tools.fsutil import sha256_file
    from sync_tools.versionfile import read_version, write_version

    info = read_version(binary.parent)
    write_version(binary.parent, info.__class__(**{**info.__dict__, "checksum": sha256_file(binary)}))
    with pytest.raises(DataError, match=f"not a linux/{other} build"):
        package(ws.config(), "nats", platform=f"linux/{other}", dist=tmp_path / "dist")
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())
