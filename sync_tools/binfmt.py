"""What platform an executable was built for, from its header: ELF, Mach-O (thin or universal), PE.

``package`` labels an asset ``<binary>-<os>-<arch>.tar.gz``; a label that disagrees with the bytes
sends agents of that platform a binary they cannot run. :func:`check_platform` reads the first bytes
of the file and refuses such a mismatch. A ``#!`` script runs anywhere its interpreter does and passes
for every platform. Only the few fixed header fields that name the format and the CPU are read (the
ELF, Mach-O and PE specifications' magic numbers and machine codes); nothing is executed.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import NamedTuple

from sync_tools.errors import DataError

# e_machine (ELF), cputype (Mach-O), Machine (PE) -> Go's GOARCH
_ELF_MACHINES = {0x03: "386", 0x3E: "amd64", 0x28: "arm", 0xB7: "arm64", 0xF3: "riscv64", 0x15: "ppc64",
                 0x16: "s390x", 0x08: "mips", 0x102: "loong64"}
_MACHO_CPUS = {0x7: "386", 0x01000007: "amd64", 0xC: "arm", 0x0100000C: "arm64", 0x01000012: "ppc64"}
_PE_MACHINES = {0x14C: "386", 0x8664: "amd64", 0x1C0: "arm", 0x1C4: "arm", 0xAA64: "arm64"}
# GOOS values whose executables are ELF (darwin is Mach-O, windows PE)
_ELF_OSES = {"linux", "freebsd", "netbsd", "openbsd", "dragonfly", "solaris", "illumos", "android", "aix"}


class Format(NamedTuple):
    kind: str  # "elf" | "mach-o" | "pe" | "script" | "unknown"
    arches: tuple[str, ...]  # GOARCH names (several for a universal Mach-O); () when unknown


def identify(path: Path) -> Format:
    """The executable format and architecture(s) of the file at *path*. Never raises for odd bytes."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
    if head.startswith(b"#!"):
        return Format("script", ())
    if head.startswith(b"\x7fELF") and len(head) >= 20:
        endian = "<" if head[5] == 1 else ">"
        (machine,) = struct.unpack_from(endian + "H", head, 18)
        arch = _ELF_MACHINES.get(machine)
        if machine == 0x15 and head[5] == 1:
            arch = "ppc64le"
        elif machine == 0x08:  # Go's mips, mipsle, mips64, mips64le share EM_MIPS: class and byte order tell
            arch = "mips" + ("64" if head[4] == 2 else "") + ("le" if head[5] == 1 else "")
        return Format("elf", (arch,) if arch else ())
    magic = head[:4]
    if magic in (b"\xcf\xfa\xed\xfe", b"\xce\xfa\xed\xfe") and len(head) >= 8:  # thin, little-endian
        (cpu,) = struct.unpack_from("<I", head, 4)
        arch = _MACHO_CPUS.get(cpu)
        return Format("mach-o", (arch,) if arch else ())
    if magic in (b"\xfe\xed\xfa\xcf", b"\xfe\xed\xfa\xce") and len(head) >= 8:  # thin, big-endian
        (cpu,) = struct.unpack_from(">I", head, 4)
        arch = _MACHO_CPUS.get(cpu)
        return Format("mach-o", (arch,) if arch else ())
    if magic == b"\xca\xfe\xba\xbe" and len(head) >= 8:  # universal (fat) Mach-O; Java classes share it
        (count,) = struct.unpack_from(">I", head, 4)
        if 0 < count <= 20 and len(head) >= 8 + 20 * count:
            cpus = [struct.unpack_from(">I", head, 8 + 20 * i)[0] for i in range(count)]
            return Format("mach-o", tuple(a for a in (_MACHO_CPUS.get(c) for c in cpus) if a))
    if head.startswith(b"MZ") and len(head) >= 0x40:
        (off,) = struct.unpack_from("<I", head, 0x3C)
        if off + 6 <= len(head) and head[off:off + 4] == b"PE\0\0":
            (machine,) = struct.unpack_from("<H", head, off + 4)
            arch = _PE_MACHINES.get(machine)
            return Format("pe", (arch,) if arch else ())
    return Format("unknown", ())


def expected_kind(goos: str) -> str | None:
    if goos == "darwin" or goos == "ios":
        return "mach-o"
    if goos == "windows":
        return "pe"
    if goos in _ELF_OSES:
        return "elf"
    return None


def check_platform(path: Path, platform: str) -> Format:
    """Raise DataError unless the executable at *path* can run on *platform* (``os/arch``): its
    format is the one that OS runs and its CPU is the arch. A ``#!`` script passes; a file that is no
    known executable format is refused (an asset that names a platform must be runnable there)."""
    goos, _, goarch = platform.partition("/")
    fmt = identify(path)
    if fmt.kind == "script":
        return fmt
    want = expected_kind(goos)
    if fmt.kind == "unknown":
        raise DataError(f"{path}: not an executable this tool knows (no ELF, Mach-O or PE header, no #!): "
                        f"refusing to label it {platform}")
    if want is not None and fmt.kind != want:
        raise DataError(f"{path} is a {fmt.kind.upper()} executable, which {goos} does not run: it is not a "
                        f"{platform} build (build it with --platform {platform})")
    if fmt.arches and goarch not in fmt.arches:
        raise DataError(f"{path} is a {fmt.kind.upper()} executable for {'/'.join(fmt.arches)}, not {goarch}: "
                        f"it is not a {platform} build (build it with --platform {platform})")
    if not fmt.arches:
        raise DataError(f"{path}: a {fmt.kind.upper()} executable for a CPU this tool does not know; "
                        f"refusing to label it {platform}")
    return fmt
