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
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from sync_tools import pins
from sync_tools.config import Config, PinSource, Subsystem
from sync_tools.errors import BuildError, ConfigError, DataError, SyncToolsError
from sync_tools.fsutil import sha256_file
from sync_tools.manifest import format_time
from sync_tools.procs import TERM_GRACE, stop_group
from sync_tools.versionfile import VERSION_FILE, VersionInfo, read_installed, write_version
from sync_tools.versions import in_pin_form, new_major

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
        if sub.version_var:  # the var the Taskfile reads, whatever its prefix (LB_VERSION for liftbridge)
            env[sub.version_var] = version
    return env


@dataclass(frozen=True)
class UpstreamVersion:
    """What the upstream says of a version to build: the commit it names (a tag peeled, a branch's
    head, a full sha), None when unknown; and whether it names a branch (whose head moves)."""

    commit: str | None = None
    branch: bool = False


def upstream_version(config: Config, sub: Subsystem, version: str | None) -> UpstreamVersion:
    """The commit *version* names upstream: a tag's (``v`` prefix aside, as :func:`pinned_tag` reads
    it), else a branch's head (a branch pin such as ``main``). Unknown when it names neither, or the
    upstream cannot be asked (a warning: the build then checks out the name, and records the commit
    it really built)."""
    from sync_tools.check import _resolve_upstream
    from sync_tools.sources.remote import RefCache
    from sync_tools.sources.tags import pinned_tag

    if not version or not sub.upstream or sub.strategy == "releases":
        return UpstreamVersion()
    if re.fullmatch(r"[0-9a-f]{40}", version):
        return UpstreamVersion(version)
    if re.fullmatch(r"[0-9a-f]{7,39}", version):
        return UpstreamVersion()
    try:
        refs = RefCache(timeout=30.0).get(_resolve_upstream(config, sub).upstream)
    except SyncToolsError as e:
        log.warning("%s: cannot ask %s what %s is (%s); building it by name", sub.name, sub.upstream, version, e)
        return UpstreamVersion()
    tags = refs.tags()
    tag = pinned_tag(version, tags)
    if tag is not None:
        return UpstreamVersion(tags[tag])
    head = refs.branch(version)
    return UpstreamVersion(head, branch=True) if head else UpstreamVersion()


def _clone_by_pin(config: Config, sub: Subsystem, version: str | None, src_dir: Path) -> str | None:
    """The command that makes *sub*'s first clone by its pin (``task <name>:src:clone``), when
    *version* is a full sha and there is no clone yet; None otherwise, or when the Taskfile has no
    such task (the build then clones *version* as it is)."""
    from sync_tools import taskfiles

    if (not version or not re.fullmatch(r"[0-9a-f]{40}", version) or not sub.version_var or src_dir.exists()
            or not sub.current or sub.current == version):
        return None
    command = f"task {sub.name}:src:clone"
    if not taskfiles.has_task(config.root, command):
        log.warning("%s: no %s to clone by %s before checking out %s; building it by name", sub.name,
                    command, sub.current, version[:12])
        return None
    # on the command line: go-task ranks a call's vars over a plain Taskfile var, which the build may
    # have written the sha into (the environment reaches only a template var)
    return f"{command} {sub.version_var}={shlex.quote(sub.current)}"


def _aside_path(config: Config, sub: Subsystem) -> Path:
    """Where the old binary waits during a build: beside ``.bin``, not in it (a ``src:update`` that
    clears ``.bin`` must not take it), one per subsystem."""
    return config.root / sub.name / f".{sub.binary}.before-build"


def _version_aside(aside: Path) -> Path:
    """Where the old binary's ``.version`` waits beside it: a ``src:update`` that clears ``.bin``
    (grafana's) takes it too, and a binary put back without it fails verify and cannot be packaged."""
    return aside.with_name(aside.name.removesuffix(".before-build") + ".version.before-build")


def _move_aside(binary: Path, aside: Path) -> bool:
    """Move the installed binary (and its ``.version``) out of the way so the build's ``status:
    [test -f <binary>]`` guard cannot skip it, and so whatever is at *binary* afterwards was written
    by this build. A binary set aside by a build that was killed is put back first. Returns whether
    one was moved."""
    version, version_aside = binary.parent / VERSION_FILE, _version_aside(aside)
    if aside.is_file() and not binary.exists():
        _put_aside_back(binary, aside)
    aside.unlink(missing_ok=True)
    version_aside.unlink(missing_ok=True)
    if not binary.is_file():
        return False
    os.replace(binary, aside)
    if version.is_file():
        os.replace(version, version_aside)
    return True


def _put_aside_back(binary: Path, aside: Path) -> None:
    version, version_aside = binary.parent / VERSION_FILE, _version_aside(aside)
    binary.parent.mkdir(parents=True, exist_ok=True)
    os.replace(aside, binary)
    if version_aside.is_file():
        os.replace(version_aside, version)
    else:  # the old binary had none: one the failed build wrote would describe another binary
        version.unlink(missing_ok=True)


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
    upstream: UpstreamVersion | None = None,
) -> BuildResult:
    """Run *sub*'s build commands, then write ``<sub>/.bin/.version``.

    *version* defaults to the subsystem's pin; *upstream* is what the upstream says of it (asked when
    not given). A full sha with no ``.src`` yet (a branch pin's head, as ``plan`` gives it) is cloned
    by the pin first (``task <name>:src:clone``), and the build commands check the sha out. Raises
    BuildError (a command failed or timed out, the binary is missing afterwards, or the source built
    is not the commit *version* names upstream; the old binary is put back) and ConfigError (bad
    platform).
    """
    plat = "/".join(parse_platform(platform))
    version = version or sub.current
    run_env = build_env(sub, plat, version, env)
    if upstream is None:
        upstream = upstream_version(config, sub, version)
    src_dir = config.root / sub.name / ".src"
    if upstream.branch and upstream.commit and sub.version_var and src_dir.is_dir():
        # a branch pin over an existing clone: check out the head commit itself. `git checkout
        # main` there stays on the local branch, behind what `src:update` fetched, so the build
        # would never move (a first clone takes the branch name: `git clone --branch main`)
        run_env[sub.version_var] = upstream.commit
    clone = _clone_by_pin(config, sub, version, src_dir)
    started = time.monotonic()
    binary = sub.binary_path(config.root)
    aside = _aside_path(config, sub)
    moved = _move_aside(binary, aside)
    try:
        if clone is not None:
            # a sha (what plan gives a branch pin's head) cannot be cloned as `git clone --branch`:
            # clone by the pin's name, then the build commands check the sha out in the existing clone
            assert sub.version_var is not None
            run_command(clone, cwd=config.root, env={**run_env, sub.version_var: sub.current or ""},
                        timeout=timeout, output=output)
        for command in sub.build:
            run_command(command, cwd=config.root, env=run_env, timeout=timeout, output=output)
        if not binary.is_file():
            raise BuildError(f"{sub.name}: the build finished but wrote no binary at {binary} "
                             f"(commands: {'; '.join(sub.build)}); a task whose status: guard skipped it, "
                             f"or a Taskfile that builds elsewhere?" + (" The old binary is put back." if moved else ""))
        src = source_commit(src_dir)
        if upstream.commit and src is not None and src.sha != upstream.commit:
            # never label a binary with a version whose commit it was not built from
            raise BuildError(f"{sub.name}: asked for {version} ({upstream.commit[:12]} upstream) but {sub.name}/.src "
                             f"is at {src.sha[:12]}: not recorded as {version} (does the build read "
                             f"{sub.version_var or 'another var'}? set version_var)"
                             + ("; the old binary is put back" if moved else ""))
    except BaseException:
        if moved:
            _put_aside_back(binary, aside)
        raise
    if moved:
        aside.unlink(missing_ok=True)
        _version_aside(aside).unlink(missing_ok=True)
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
        # in the pin's own form: check names grafana's tag v11.6.0, its pin (and the Taskfile that
        # clones v{{.GF_VERSION}}) writes 11.6.0
        ver = in_pin_form(version, sub.current) if version is not None else None
        if ver is not None and not allow_major and sub.major == "manual" and new_major(ver, sub.current):
            raise ConfigError(f"{sub.name}: {ver} is a new major over the pinned {sub.current} "
                              "(major: manual): pass --allow-major to build it")
        new_version = ver is not None and ver != sub.current
        if new_version and update_pin and sub.pin is None:
            raise ConfigError(f"{sub.name}: cannot build {ver}: its pin has no known source to update")
        spot = _version_spot(config, sub)
        if ver is not None and spot is None:
            _refuse_unknown_version_var(config, sub, ver)
        upstream = upstream_version(config, sub, ver or sub.current)
        # the Taskfile var moves with the pin when it repeats it (or is it), so `task X:ensure` outside
        # sync-tools builds the same version; else a value written for the build is put back
        keep = spot is not None and (sub.version_pin is not None or _same_spot(spot[0], sub.pin))
        moves: list[tuple[PinSource, str, str | None]] = []  # (spot, new value, old value) on success
        if new_version and update_pin:
            assert sub.pin is not None and ver is not None
            moves.append((sub.pin, ver, sub.current))
            if keep and spot is not None and not _same_spot(spot[0], sub.pin):
                moves.append((spot[0], ver, spot[1]))
        for pin, value, _ in moves:  # both pins move or neither: found out before anything is built
            pins.check_update(pin, value)
        # go-task lets a plain Taskfile var win over the environment, so the version would not reach
        # the build: write it into the Taskfile for the build, and put the old value back if the build
        # fails (or when it is not to be kept). Only this var's value is put back, never the whole file:
        # builds of other subsystems may have moved their pins meanwhile.
        wanted = ver or sub.current
        if (upstream.branch and upstream.commit and spot is not None and not spot[2]
                and (config.root / sub.name / ".src").is_dir()):
            # a branch over an existing clone: its head commit, as build_subsystem puts it in the
            # environment for a template var (`git checkout main` would stay on the old local branch)
            wanted = upstream.commit
        written: tuple[PinSource, str] | None = None
        if wanted is not None and spot is not None and spot[1] is not None and not spot[2] and spot[1] != wanted:
            pins.update_pin(spot[0], wanted)
            written = (spot[0], spot[1])
        try:
            result = build_subsystem(config, sub, platform=platform, version=ver, timeout=timeout,
                                     output=output, env=env, upstream=upstream)
        except BaseException:
            if written:
                pins.update_pin(*written)
            raise
        done: list[tuple[PinSource, str | None]] = []
        try:
            for pin, value, old in moves:
                pins.update_pin(pin, value)
                done.append((pin, old))
            if written and not (moves and keep):
                pins.update_pin(*written)
        except BaseException:
            _put_pins_back(done, written)
            raise
        if moves:
            result = BuildResult(result.subsystem, result.platform, result.binary, result.info,
                                 result.seconds, pin_updated=True)
        results.append(result)
    return results


def _put_pins_back(done: list[tuple[PinSource, str | None]], written: tuple[PinSource, str] | None) -> None:
    """After a failed pin update: the pins already moved, and a Taskfile var written for the build,
    back to what they were (as far as each can be; the error being raised says what failed)."""
    for pin, old in reversed(done + ([written] if written else [])):
        if old is None:
            log.warning("cannot put %s in %s back: it had no value", pin.key, pin.path)
            continue
        try:
            pins.update_pin(pin, old)
        except ConfigError as e:
            log.warning("cannot put %s in %s back to %s: %s", pin.key, pin.path, old, e)


def _refuse_unknown_version_var(config: Config, sub: Subsystem, version: str) -> None:
    """ConfigError when *sub*'s Taskfile has ``*_VERSION`` vars but none is known to be the one its
    build reads (``LB_VERSION`` beside ``GO_VERSION``): *version* would not reach the build, which
    would build the Taskfile's default."""
    from sync_tools import taskfiles

    tf = taskfiles.subsystem_taskfile(config.root, sub.name)
    names = [v.name for v in tf.by_suffix("VERSION") if not v.name.startswith("RELEASE_")] if tf else []
    if names:
        raise ConfigError(f"{sub.name}: cannot build {version}: which of {', '.join(names)} does the build "
                          f"read? set subsystems.{sub.name}.version_var", path=config.path)


def _same_spot(a: PinSource | None, b: PinSource | None) -> bool:
    return a is not None and b is not None and Path(a.path) == Path(b.path) and a.key == b.key


def _version_spot(config: Config, sub: Subsystem) -> tuple[PinSource, str | None, bool] | None:
    """The Taskfile var the build reads its version from: its spot, its value now, and whether an
    environment variable overrides it (``{{.X | default "v"}}``). None when there is none."""
    from sync_tools import taskfiles

    if not sub.version_var:
        if sub.pin is not None and sub.pin.kind == "taskfile":
            return sub.pin, sub.current, pins.is_template(sub.pin)
        return None
    tf = taskfiles.subsystem_taskfile(config.root, sub.name)
    var = tf.var(sub.version_var) if tf is not None else None
    if var is None:
        return None
    return PinSource(var.path, "taskfile", var.name, var.line), var.value, var.self_default


# ------------------------------------------------------------------------------------------ verify


@dataclass(frozen=True)
class VerifyResult:
    subsystem: str
    binary: Path
    status: str  # ok | unverified (a legacy one-line .version) | mismatch | missing-binary | missing-version | bad-version
    expected: str | None = None
    actual: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        """Nothing wrong found: verified, or a legacy ``.version`` that has nothing to verify with."""
        return self.status in ("ok", "unverified")

    def to_json(self) -> dict[str, object]:
        return {"subsystem": self.subsystem, "binary": str(self.binary), "status": self.status,
                "expected": self.expected, "actual": self.actual, "detail": self.detail}


def verify_installed(config: Config, names: Sequence[str] | None = None,
                     root: Path | None = None) -> list[VerifyResult]:
    """Each named (default: every) subsystem's installed binary under *root* (default: the workspace)
    against the checksum in its ``.version``. With an agent-only config (no subsystems), those
    installed under *root* (default: ``agent.root``), as ``status`` finds them. Never raises for what
    it finds; ConfigError for an unknown name of a configured subsystem."""
    from sync_tools.agent import subsystems

    if config.subsystems:
        root = root or config.root
        chosen = config.select(list(names) if names else None)
    else:
        root = root or config.resolve(config.agent.root) or config.root
        found = {sub.name: sub for sub in subsystems.installed(config, root)}
        # a name not installed is checked too: it is reported missing, not passed over
        chosen = [found.get(n) or subsystems.from_manifest(n, None) for n in names] if names else list(found.values())
    results = []
    for sub in chosen:
        binary = sub.binary_path(root)
        try:
            info = read_installed(root, sub.name, sub.bin_dir(root))
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
        elif info.legacy:
            results.append(VerifyResult(sub.name, binary, "unverified", actual=actual,
                                        detail=f"legacy one-line .version ({info.version}): nothing to verify "
                                               "against until the first verified install replaces it"))
        elif info.checksum != actual:
            results.append(VerifyResult(sub.name, binary, "mismatch", info.checksum, actual,
                                        detail=f"{binary} has sha256 {actual}, .version says {info.checksum}"))
        else:
            results.append(VerifyResult(sub.name, binary, "ok", info.checksum, actual))
    return results
