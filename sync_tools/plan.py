"""What to build: the GitHub Actions matrix ``{"include": [{subsystem, platform, os, arch, runner}]}``.

Three sources of "what changed", each a pure function over data it is handed, plus two edges that do
I/O (:func:`changed_files` reads a git repository with dulwich, never the git binary; the ``check``
source asks upstreams):

- a dispatch event (:func:`names_from_event`): ``repository_dispatch`` carries
  ``client_payload.subsystem`` (a name, a comma list or a JSON list); ``workflow_dispatch`` carries
  ``inputs.subsystems`` (a comma list; empty or ``all`` means every subsystem);
- changed repository files (:func:`names_from_files`): each subsystem's ``paths`` globs, then every
  subsystem that depends on a changed one (``depends_on``, transitively);
- ``check`` (subsystems whose upstream has a newer version).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sync_tools.config import MAX_CONFIG_BYTES, Config
from sync_tools.errors import ConfigError, DataError
from sync_tools.fsutil import read_capped

log = logging.getLogger(__name__)

RUNNERS: Mapping[str, str] = {
    "linux/amd64": "ubuntu-latest",
    "linux/arm64": "ubuntu-24.04-arm",
    "darwin/amd64": "macos-15-intel",  # the last Intel image (macos-13 was retired in Dec 2025)
    "darwin/arm64": "macos-latest",
    "windows/amd64": "windows-latest",
}
#: Platforms without a native runner are cross-built (GOOS/GOARCH) on Linux.
DEFAULT_RUNNER = "ubuntu-latest"
ZERO_SHA = "0" * 40
_MAX_EVENT = 25 * 1024 * 1024
_SAFE_VERSION = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._+/@-]{0,127}\Z")  # \Z: $ would take a trailing newline
#: GitHub runs at most this many jobs from one matrix (per workflow run); a bigger one fails the job
#: that uses it, after the plan job has already reported work.
MAX_MATRIX_JOBS = 256


@dataclass(frozen=True)
class MatrixItem:
    subsystem: str
    platform: str
    os: str
    arch: str
    runner: str
    version: str | None = None  # the upstream version to build, when the trigger named one

    def to_json(self) -> dict[str, str]:
        out = {"subsystem": self.subsystem, "platform": self.platform, "os": self.os, "arch": self.arch,
               "runner": self.runner}
        if self.version:
            out["version"] = self.version
        return out


@dataclass(frozen=True)
class Plan:
    subsystems: tuple[str, ...]
    items: tuple[MatrixItem, ...]
    reason: str = ""
    notices: tuple[str, ...] = ()  # subsystems asked for but left out, and why

    @property
    def has_work(self) -> bool:
        return bool(self.items)

    def matrix(self) -> dict[str, list[dict[str, str]]]:
        return {"include": [i.to_json() for i in self.items]}

    def github_output(self) -> str:
        """The lines for ``$GITHUB_OUTPUT``: ``matrix=<json>``, ``has_work=``, ``changed=``."""
        return (f"matrix={json.dumps(self.matrix(), separators=(',', ':'), sort_keys=True)}\n"
                f"has_work={'true' if self.has_work else 'false'}\n"
                f"changed={','.join(self.subsystems)}\n")


# ---------------------------------------------------------------------------------------- the plan


def make_plan(config: Config, names: Iterable[str], platforms: Sequence[str] | None = None,
              reason: str = "", versions: Mapping[str, str] | None = None) -> Plan:
    """One matrix item per named subsystem (in config order) and platform (default: the config's);
    *versions* adds a ``version`` key to the items of the subsystems it names.

    Raises ConfigError for an unknown subsystem or a malformed platform, DataError for a version that
    is no version or more items than a GitHub Actions matrix runs (:data:`MAX_MATRIX_JOBS`).
    """
    wanted = set(names)
    for n in wanted:
        config.subsystem(n)
    for n, v in (versions or {}).items():
        # a version reaches --version and the build's shell commands (a tag may hold `$(...)`)
        if not _SAFE_VERSION.match(v):
            raise DataError(f"{n}: version {v!r} has characters a version never has")
    plats = list(platforms) if platforms else list(config.platforms)
    for p in plats:
        if not re.match(r"^[a-z0-9]+/[a-z0-9]+$", p):
            raise ConfigError(f"bad platform {p!r} (expected os/arch, e.g. linux/amd64)")
    notices: list[str] = []
    ordered = []
    for n in config.subsystems:
        if n not in wanted:
            continue
        why = left_out(config, config.subsystems[n], (versions or {}).get(n))
        if why:
            notices.append(f"{n}: not planned: {why}")
        else:
            ordered.append(n)
    items = []
    for n in ordered:
        for p in plats:
            os_, arch = p.split("/")
            items.append(MatrixItem(n, p, os_, arch, RUNNERS.get(p, DEFAULT_RUNNER),
                                    (versions or {}).get(n)))
    if len(items) > MAX_MATRIX_JOBS:
        raise DataError(f"the plan has {len(items)} build legs ({len(ordered)} subsystems x {len(plats)} "
                        f"platforms); a GitHub Actions matrix runs at most {MAX_MATRIX_JOBS} jobs: name fewer "
                        "subsystems or platforms, and build the rest in another run")
    return Plan(tuple(ordered), tuple(items), reason, tuple(notices))


def left_out(config: Config, sub: Any, version: str | None) -> str | None:
    """Why a leg for *sub* (building *version*, when the trigger named one) must not be planned: its
    build would fail or refuse. None when it may. A build command ``task X:Y`` must name a task the
    root Taskfile reaches (an include that is not there, such as grafana's, fails every time); a
    dispatched version must be one ``build`` takes: newer than the pin and, under ``major: manual``,
    within its major."""
    from sync_tools import taskfiles
    from sync_tools.versions import held_back

    for command in sub.build:
        if taskfiles.has_task(config.root, command) is False:
            return (f"its build command {command!r} names a task the root Taskfile does not reach "
                    f"(include {sub.name}/Taskfile.yml, or set subsystems.{sub.name}.build)")
    if version is not None:
        why = held_back(version, sub.current, major=sub.major)
        if why:
            return why + (" (build it by hand with --allow-major)" if "new major" in why else "")
    return None


# ------------------------------------------------------------------------------------------ events


def _names(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [n.strip() for n in value.replace(" ", ",").split(",") if n.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [n.strip() for v in value for n in v.split(",") if n.strip()]
    raise DataError(f"{where} must be a subsystem name, a comma list or a list of names")


def names_from_event(config: Config, event: Mapping[str, Any]) -> list[str]:
    """The subsystems a ``repository_dispatch`` or ``workflow_dispatch`` event asks for.

    Raises DataError for an event that names no subsystem or names one that is not configured.
    """
    if not isinstance(event, Mapping):
        raise DataError("the event must be a JSON object")
    if isinstance(event.get("client_payload"), Mapping):
        names = _names(event["client_payload"].get("subsystem"), "client_payload.subsystem")
        if not names:
            raise DataError("repository_dispatch event without client_payload.subsystem")
    elif isinstance(event.get("inputs"), Mapping):
        names = _names(event["inputs"].get("subsystems"), "inputs.subsystems")
        if not names or names == ["all"]:
            return list(config.subsystems)
    else:
        raise DataError("not a repository_dispatch (client_payload) or workflow_dispatch (inputs) event")
    unknown = [n for n in names if n not in config.subsystems]
    if unknown:
        raise DataError(f"the event names unknown subsystem(s): {', '.join(unknown)} "
                        f"(configured: {', '.join(config.subsystems) or 'none'})")
    return list(dict.fromkeys(names))


def versions_from_event(event: Mapping[str, Any]) -> dict[str, str]:
    """``{subsystem: version}`` when a repository_dispatch names exactly one subsystem and a version
    (the relay's payload), else empty. Raises DataError for a version that is not a string (a number
    from ``gh api -F``) or holds characters a version never has."""
    payload = event.get("client_payload") if isinstance(event, Mapping) else None
    if not isinstance(payload, Mapping):
        return {}
    names = list(dict.fromkeys(_names(payload.get("subsystem"), "client_payload.subsystem")))
    version = payload.get("version")
    if version is not None and not isinstance(version, str):
        # `gh api -F client_payload[version]=1.10` sends the number 1.1: building the pin instead, as
        # if no version had been sent, would release something nobody asked for.
        raise DataError(f"client_payload.version must be a string, not {type(version).__name__}")
    if len(names) == 1 and isinstance(version, str) and version.strip():
        # The version reaches shell commands in the workflow: only plain version/commit characters.
        if not _SAFE_VERSION.match(version.strip()):
            raise DataError(f"client_payload.version {version!r} has characters a version never has")
        return {names[0]: version.strip()}
    return {}


def load_event(path: Path) -> dict[str, Any]:
    """Read an Actions event file (``$GITHUB_EVENT_PATH``). Raises DataError."""
    try:
        raw = read_capped(path, _MAX_EVENT) or b""
    except OSError as e:
        raise DataError(f"{path}: cannot read the event file: {e.strerror or e}") from e
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise DataError(f"{path}: not JSON: {e}") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: the event must be a JSON object")
    return obj


# ------------------------------------------------------------------------------------ changed files


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """A path glob as a regex: ``**`` crosses directories, ``*`` and ``?`` do not, ``[...]`` classes;
    a trailing ``/`` or ``/**`` matches everything below."""
    out = []
    i = 0
    p = pattern[2:] if pattern.startswith("./") else pattern
    if p.endswith("/"):
        p += "**"
    while i < len(p):
        c = p[i]
        if p.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif p.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            j = p.find("]", i + 2)
            if j == -1:
                out.append(re.escape(c))
                i += 1
            else:
                body = p[i + 1:j]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append(f"[{body}]")
                i = j + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("^" + "".join(out) + "$")


def with_dependents(config: Config, names: Iterable[str]) -> list[str]:
    """*names* plus every subsystem that depends on one of them, transitively, in config order."""
    chosen = set(names)
    grew = True
    while grew:
        grew = False
        for sub in config.subsystems.values():
            if sub.name not in chosen and chosen.intersection(sub.depends_on):
                chosen.add(sub.name)
                grew = True
    return [n for n in config.subsystems if n in chosen]


def names_from_files(config: Config, files: Iterable[str]) -> list[str]:
    """Subsystems whose ``paths`` match a changed file (paths relative to the repository root), with
    their dependents."""
    patterns = {s.name: [glob_to_regex(g) for g in s.paths] for s in config.subsystems.values()}
    hit = set()
    for f in files:
        f = f.strip().lstrip("/")
        if f.startswith("./"):
            f = f[2:]
        for name, regs in patterns.items():
            if any(r.match(f) for r in regs):
                hit.add(name)
    return with_dependents(config, hit)


def read_changed_files(text: str) -> list[str]:
    """A changed-files list: one path per line, or a JSON list of paths."""
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            obj = json.loads(stripped)
        except ValueError as e:
            raise DataError(f"changed files: not a JSON list: {e}") from e
        if not isinstance(obj, list) or not all(isinstance(x, str) for x in obj):
            raise DataError("changed files: a JSON list of path strings is expected")
        return obj
    return [line.strip() for line in text.splitlines() if line.strip()]


_SUFFIX = re.compile(r"^(.*?)((?:[~^]\d*)*)$")


def _resolve(repo: Any, spec: str) -> Any:
    """A commit from a sha (full or abbreviated), a ref name, optionally with ``~N``/``^`` suffixes.
    Raises KeyError when it cannot be found."""
    from dulwich.objectspec import parse_commit

    m = _SUFFIX.match(spec)
    assert m is not None
    base, suffix = m.group(1), m.group(2)
    commit = parse_commit(repo, base.encode())
    for step in re.findall(r"[~^]\d*", suffix):
        n = int(step[1:] or "1")
        if step[0] == "^":
            if n == 0:
                continue
            commit = repo[commit.parents[n - 1]]  # n-th parent
        else:
            for _ in range(n):
                commit = repo[commit.parents[0]]
    return commit


def changed_files(repo_path: Path, base: str, head: str = "HEAD") -> list[str] | None:
    """Files that differ between the merge base of *base* and *head*, and *head*, read with dulwich.

    Returns None when *base* is all zeros (a new branch) or is not in the repository (e.g. a shallow
    clone): the caller then plans everything. Raises DataError when *repo_path* is not a repository
    or *head* cannot be resolved.
    """
    diff = diff_from_base(repo_path, base, head)
    return None if diff is None else diff[0]


def diff_from_base(repo_path: Path, base: str, head: str = "HEAD",
                   read: Iterable[str] = ()) -> tuple[list[str], dict[str, bytes | None]] | None:
    """:func:`changed_files`, and the content at the merge base of each of *read* (paths relative to
    *repo_path*) that changed: None where it did not exist there. None as changed_files gives it."""
    from dulwich.diff_tree import tree_changes
    from dulwich.errors import NotGitRepository, NotTreeError
    from dulwich.graph import find_merge_base
    from dulwich.object_store import tree_lookup_path
    from dulwich.repo import Repo

    if not base or set(base) == {"0"}:
        return None
    try:
        repo = Repo.discover(str(repo_path))
    except NotGitRepository as e:
        raise DataError(f"{repo_path}: not a git repository (needed for --base)") from e
    with repo:
        try:
            head_commit = _resolve(repo, head)
        except (KeyError, IndexError, ValueError) as e:
            raise DataError(f"cannot resolve {head!r} in {repo.path}") from e
        try:
            base_commit = _resolve(repo, base)
        except (KeyError, IndexError, ValueError):
            log.warning("base %r is not in %s (shallow clone?): planning everything", base, repo.path)
            return None
        bases = find_merge_base(repo, [base_commit.id, head_commit.id])
        old_tree = repo[bases[0]].tree if bases else base_commit.tree
        files = set()
        for change in tree_changes(repo.object_store, old_tree, head_commit.tree):
            for entry in (change.old, change.new):
                if entry is not None and entry.path is not None:
                    files.add(entry.path.decode("utf-8", "surrogateescape"))
        # Repo paths are relative to the repository root; subsystems' paths to the workspace root.
        prefix = Path(repo_path).resolve().relative_to(Path(repo.path).resolve()).as_posix()
        if prefix and prefix != ".":
            files = {f[len(prefix) + 1:] for f in files if f.startswith(prefix + "/")}
        old: dict[str, bytes | None] = {}
        for rel in set(read) & files:
            full = f"{prefix}/{rel}" if prefix and prefix != "." else rel
            try:
                _, sha = tree_lookup_path(repo.object_store.__getitem__, old_tree, full.encode())
                old[rel] = repo[sha].as_raw_string()
            except (KeyError, NotTreeError):
                old[rel] = None
        return sorted(files), old


def names_from_pins(config: Config, files: Iterable[str], old: Mapping[str, bytes | None]) -> list[str]:
    """Subsystems whose pin changed: the file holding it is among *files* and the pin's value there
    differs from what *old* (that file at the base, see :func:`diff_from_base`) held; with their
    dependents. A push that only bumps ``current:`` builds that subsystem, and no other subsystem
    whose pin shares the file. A base file that cannot be read counts as changed."""
    changed = set(files)
    hit = set()
    for sub in config.subsystems.values():
        rel = pin_file(config, sub)
        if rel is None or rel not in changed:
            continue
        if _pin_at(sub, old.get(rel)) != sub.current:
            hit.add(sub.name)
    return with_dependents(config, hit) if hit else []


def config_file(config: Config) -> str | None:
    """The config file's path relative to the workspace root (None outside it)."""
    try:
        return Path(config.path).resolve().relative_to(Path(config.root).resolve()).as_posix()
    except ValueError:
        return None


def names_from_config(config: Config, files: Iterable[str], old: Mapping[str, bytes | None]) -> list[str]:
    """Subsystems whose own section of the config file changed since the base (their build commands,
    binary, upstream, paths ...), with their dependents; *old* holds the config file at the base (see
    :func:`diff_from_base`). Other sections (``release``, ``relay``) build nothing. A config file that
    cannot be read at the base, or is not a mapping there, counts every subsystem as changed."""
    rel = config_file(config)
    if rel is None or rel not in set(files):
        return []

    def sections(raw: bytes | None) -> Mapping[str, Any] | None:
        if raw is None or len(raw) > MAX_CONFIG_BYTES:
            return None
        try:
            data = yaml.safe_load(raw)
        except (yaml.YAMLError, RecursionError, ValueError):
            return None
        subs = data.get("subsystems") if isinstance(data, Mapping) else None
        return subs if isinstance(subs, Mapping) else None

    before = sections(old.get(rel))
    try:
        now = sections(read_capped(Path(config.path), MAX_CONFIG_BYTES))
    except (OSError, DataError):
        now = None
    if before is None or now is None:
        return with_dependents(config, set(config.subsystems))
    hit = {n for n in config.subsystems if before.get(n) != now.get(n)}
    return with_dependents(config, hit) if hit else []


def pin_file(config: Config, sub: Any) -> str | None:
    """Where *sub*'s pin lives, relative to the workspace root (None outside it, or no pin)."""
    if sub.pin is None:
        return None
    try:
        return Path(sub.pin.path).resolve().relative_to(config.root.resolve()).as_posix()
    except ValueError:
        return None


def _pin_at(sub: Any, data: bytes | None) -> str | None:
    """*sub*'s pin value in *data* (its pin file's bytes at the base), or None when it cannot be read."""
    from sync_tools.config import _taskfile_value

    if data is None:
        return None
    try:
        doc = yaml.safe_load(data)
    except yaml.YAMLError:
        return None
    if sub.pin.kind == "taskfile":
        tvars = doc.get("vars") if isinstance(doc, dict) else None
        return _taskfile_value(tvars.get(sub.pin.key)) if isinstance(tvars, dict) else None
    for key in sub.pin.key.split("."):
        if not isinstance(doc, dict):
            return None
        doc = doc.get(key)
    return None if doc is None or isinstance(doc, dict | list) else str(doc)


# ------------------------------------------------------------------------------------------- check


def names_from_check(config: Config, sources: Any = None) -> tuple[list[str], dict[str, str]]:
    """Subsystems whose upstream has a newer version (asking :func:`sync_tools.check.check`, with
    *sources* injected when given) and the version each would move to. Upstreams that fail are
    logged and left out. Raises ConfigError."""
    from sync_tools import check  # lazy: pulls in the upstream clients only when asked

    report = check.check(config, sources=sources)
    for failed in report.errors:
        log.warning("check %s failed, not planned: %s", failed.name, failed.error)
    names: list[str] = []
    versions: dict[str, str] = {}
    for r in report.updates:
        if r.latest and not _SAFE_VERSION.match(r.latest):
            # an upstream tag may hold `$(...)`, and the version reaches the build's shell commands
            log.warning("check %s: newest tag %r has characters a version never has; not planned", r.name, r.latest)
            continue
        names.append(r.name)
        if r.latest:
            versions[r.name] = r.latest
    return names, versions
