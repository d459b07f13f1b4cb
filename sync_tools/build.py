"""Building subsystems and checking what is installed.

:func:`build` runs a subsystem's ``build`` commands (default ``task <name>:src:update`` then
``task <name>:bin:build``) through the shell in the workspace root, with ``GOOS``/``GOARCH`` set from
the target platform, streaming their output, then records ``<name>/.bin/.version``. It never writes
anything belonging to another subsystem. :func:`verify_installed` compares each installed binary with
its ``.version``.

Build commands see these environment variables:

- ``GOOS``, ``GOARCH``: the target platform;
- ``SYNC_TOOLS_SUBSYSTEM``, ``SYNC_TOOLS_VERSION``: what is being built (the version when known);
- ``<NAME>_VERSION`` (e.g. ``NATS_VERSION``): the version, so a plat-telemetry Taskfile var written
  ``'{{.NATS_VERSION | default "v2.10.24"}}'`` builds the version sync-tools asks for.
"""

from __future__ import annotations

import logging
import os
import platform as _platform
import re
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from sync_tools import pins
from sync_tools.config import Config, Subsystem
from sync_tools.errors import BuildError, ConfigError, DataError
from sync_tools.fsutil import sha256_file
from sync_tools.manifest import format_time
from sync_tools.procs import TERM_GRACE, stop_group
from sync_tools.versionfile import VersionInfo, read_version, write_version
from sync_tools.versions import new_major

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 3600.0
COMMIT_ENV = "SYNC_TOOLS_COMMIT"
_ARCH_ALIASES = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64",
                 "armv7l": "arm", "i386": "386", "i686": "386"}
_PLATFORM_RE = re.compile(r"^([a-z0-9]+)/([a-z0-9]+)$")


# ---------------------------------------------------------------------------------------- platforms


def host_platform() -> str:
    """This machine as ``os/arch`` in Go's names (``linux/amd64``, ``darwin/arm64``, ...)."""
    machine = _platform.machine().lower()
    return f"{_platform.system().lower()}/{_ARCH_ALIASES.get(machine, machine)}"


def parse_platform(value: str | None) -> tuple[str, str]:
    """``"linux/arm64"`` -> ``("linux", "arm64")``; None means this machine. Raises ConfigError."""
    value = value or host_platform()
    m = _PLATFORM_RE.match(value)
    if not m:
        raise ConfigError(f"bad platform {value!r} (expected os/arch, e.g. linux/amd64)")
    return m.group(1), m.group(2)


def env_prefix(name: str) -> str:
    """``nats`` -> ``NATS``; ``my-db`` -> ``MY_DB`` (the prefix of plat-telemetry's Taskfile vars)."""
    return re.sub(r"[^A-Z0-9]", "_", name.upper())


# ------------------------------------------------------------------------------------------- source


@dataclass(frozen=True)
class SourceCommit:
    sha: str
    time: int  # commit time, seconds since the epoch


def source_commit(src_dir: Path) -> SourceCommit | None:
    """HEAD of the git checkout at *src_dir* (read with dulwich), or None when there is none."""
    if not (src_dir / ".git").exists():
        return None
    from dulwich.errors import NotGitRepository
    from dulwich.repo import Repo

    try:
        with Repo(str(src_dir)) as repo:
            sha = repo.head()
            commit = repo[sha]
            return SourceCommit(sha.decode("ascii"), int(commit.commit_time))
    except (NotGitRepository, KeyError, OSError) as e:
        log.warning("cannot read HEAD of %s: %s", src_dir, e)
        return None


# ------------------------------------------------------------------------------------------- order


def build_order(config: Config, names: Sequence[str]) -> list[Subsystem]:
    """The named subsystems, dependencies first (``depends_on`` among the named ones), otherwise in
    the order given. Raises ConfigError for an unknown name."""
    chosen = {n: config.subsystem(n) for n in names}
    out: list[Subsystem] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for dep in chosen[name].depends_on:
            if dep in chosen:
                visit(dep)
        out.append(chosen[name])

    for n in chosen:
        visit(n)
    return out


# ------------------------------------------------------------------------------------------- build


@dataclass(frozen=True)
class BuildResult:
    subsystem: str
    platform: str
    binary: Path
    info: VersionInfo
    seconds: float
    pin_updated: bool = False

    def to_json(self) -> dict[str, object]:
        return {"subsystem": self.subsystem, "platform": self.platform, "binary": str(self.binary),
                "version": self.info.version, "commit": self.info.commit, "timestamp": self.info.timestamp,
                "checksum": self.info.checksum, "seconds": round(self.seconds, 3),
                "pin_updated": self.pin_updated}


def run_command(command: str, *, cwd: Path, env: Mapping[str, str], timeout: float,
                output: int | IO[bytes] | IO[str] | None = None) -> None:
    """Run *command* through the shell, output going to *output* (default: inherited, i.e. streamed).

    Raises BuildError naming the command and its exit code, or the timeout (after killing the
    command's whole process group, so no stray child keeps running).
    """
    log.info("$ %s", command)
    try:
        proc = subprocess.Popen(command, shell=True, cwd=cwd, env=dict(env), stdout=output,
                                start_new_session=True)
    except OSError as e:
        raise BuildError(f"cannot run {command!r}: {e}") from e
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        raise BuildError(f"build command {command!r} timed out after {timeout:g}s") from e
    except BaseException:
        # Ctrl-C, SIGTERM (see stop_on_sigterm) or the like: do not leave the command running on its
        # own; one that ignores SIGTERM gets SIGKILL after a grace period
        stop_group(proc, grace=TERM_GRACE)
        raise
    if code != 0:
        raise BuildError(f"build command {command!r} failed with exit code {code}")


def stop_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit(143), so a terminated ``build`` still runs its cleanup: the build
    commands' process groups are stopped and a pin written for the build is put back."""
    def handler(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def build_env(sub: Subsystem, platform: str, version: str | None,
              base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment the build commands of *sub* run with (see the module docstring)."""
    goos, goarch = parse_platform(platform)
    env = dict(os.environ if base is None else base)
    env.update(GOOS=goos, GOARCH=goarch, SYNC_TOOLS_SUBSYSTEM=sub.name)
    if version:
        env["SYNC_TOOLS_VERSION"] = version
        env[f"{env_prefix(sub.name)}_VERSION"] = version
    return env


def build_subsystem(
    config: Config,
    sub: Subsystem,
    *,
    platform: str | None = None,
    version: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    output: int | IO[bytes] | IO[str] | None = None,
    env: Mapping[str, str] | None = None,
    now: datetime | None = None,
) -> BuildResult:
    """Run *sub*'s build commands, then write ``<sub>/.bin/.version``.

    *version* defaults to the subsystem's pin. Raises BuildError (a command failed or timed out, or
    the binary is missing afterwards) and ConfigError (bad platform).
    """
    plat = "/".join(parse_platform(platform))
    version = version or sub.current
    run_env = build_env(sub, plat, version, env)
    started = time.monotonic()
    for command in sub.build:
        run_command(command, cwd=config.root, env=run_env, timeout=timeout, output=output)
    binary = sub.binary_path(config.root)
    if not binary.is_file():
        raise BuildError(f"{sub.name}: the build finished but left no binary at {binary} "
                         f"(commands: {'; '.join(sub.build)})")
    src = source_commit(config.root / sub.name / ".src")
    commit = src.sha if src else (run_env.get(COMMIT_ENV) or "unknown")
    info = VersionInfo(commit=commit, timestamp=format_time(now or datetime.now(UTC)),
                       checksum=sha256_file(binary), version=version, platform=plat)
    write_version(sub.bin_dir(config.root), info)
    seconds = time.monotonic() - started
    log.info("built %s %s for %s in %.1fs (%s)", sub.name, version or "?", plat, seconds, info.checksum[:12])
    return BuildResult(sub.name, plat, binary, info, seconds)


def build(
    config: Config,
    names: Sequence[str],
    *,
    platform: str | None = None,
    version: str | None = None,
    update_pin: bool = True,
    allow_major: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
    output: int | IO[bytes] | IO[str] | None = None,
    env: Mapping[str, str] | None = None,
) -> list[BuildResult]:
    """Build the named subsystems in dependency order; the first failure stops the rest.

    *version* (one subsystem only) builds that upstream version instead of the pin, and on success,
    when *update_pin*, rewrites the pin where it was read from (:mod:`sync_tools.pins`). A *version*
    of a newer major than the pin of a ``major: manual`` subsystem needs *allow_major*. Raises
    BuildError, ConfigError.
    """
    if not names:
        raise ConfigError("name the subsystems to build (--only NAME[,NAME])")
    if version is not None and len(names) != 1:
        raise ConfigError("--version applies to exactly one subsystem (--only NAME)")
    results = []
    for sub in build_order(config, names):
        if version is not None and not allow_major and sub.major == "manual" and new_major(version, sub.current):
            raise ConfigError(f"{sub.name}: {version} is a new major over the pinned {sub.current} "
                              "(major: manual): pass --allow-major to build it")
        new_version = version is not None and version != sub.current
        if new_version and update_pin and sub.pin is None:
            raise ConfigError(f"{sub.name}: cannot build {version}: its pin has no known source to update")
        # go-task lets a plain Taskfile var win over the environment, so <NAME>_VERSION=... would not
        # reach the build: write the version into the Taskfile for the build, and put the old value
        # back if the build fails (or when the pin is not to be kept). Only this pin's value is put
        # back, never the whole file: builds of other subsystems may have moved their pins meanwhile.
        written = (new_version and sub.pin is not None and sub.pin.kind == "taskfile"
                   and not pins.is_template(sub.pin))
        if written:
            assert sub.pin is not None and version is not None
            pins.update_pin(sub.pin, version)
        try:
            result = build_subsystem(config, sub, platform=platform, version=version, timeout=timeout,
                                     output=output, env=env)
        except BaseException:
            if written:
                _put_back(sub)
            raise
        if new_version and update_pin:
            assert sub.pin is not None and version is not None
            if not written:
                pins.update_pin(sub.pin, version)
            result = BuildResult(result.subsystem, result.platform, result.binary, result.info,
                                 result.seconds, pin_updated=True)
        elif written:
            _put_back(sub)
        results.append(result)
    return results


def _put_back(sub: Subsystem) -> None:
    """Set *sub*'s Taskfile pin back to the value it had before the build wrote another one."""
    assert sub.pin is not None and sub.current is not None
    pins.update_pin(sub.pin, sub.current)


# ------------------------------------------------------------------------------------------ verify


@dataclass(frozen=True)
class VerifyResult:
    subsystem: str
    binary: Path
    status: str  # ok | mismatch | missing-binary | missing-version | bad-version
    expected: str | None = None
    actual: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, object]:
        return {"subsystem": self.subsystem, "binary": str(self.binary), "status": self.status,
                "expected": self.expected, "actual": self.actual, "detail": self.detail}


def verify_installed(config: Config, names: Sequence[str] | None = None,
                     root: Path | None = None) -> list[VerifyResult]:
    """Each named (default: every) subsystem's installed binary under *root* (default: the workspace)
    against the checksum in its ``.version``. Never raises for what it finds; ConfigError for an
    unknown name."""
    root = root or config.root
    results = []
    for sub in config.select(list(names) if names else None):
        binary = sub.binary_path(root)
        try:
            info = read_version(sub.bin_dir(root))
        except DataError as e:
            results.append(VerifyResult(sub.name, binary, "bad-version", detail=str(e)))
            continue
        if not binary.is_file():
            results.append(VerifyResult(sub.name, binary, "missing-binary",
                                        expected=info.checksum if info else None,
                                        detail=f"no binary at {binary}"))
            continue
        actual = sha256_file(binary)
        if info is None:
            results.append(VerifyResult(sub.name, binary, "missing-version", actual=actual,
                                        detail=f"no .version next to {binary}"))
        elif info.checksum != actual:
            results.append(VerifyResult(sub.name, binary, "mismatch", info.checksum, actual,
                                        detail=f"{binary} has sha256 {actual}, .version says {info.checksum}"))
        else:
            results.append(VerifyResult(sub.name, binary, "ok", info.checksum, actual))
    return results
