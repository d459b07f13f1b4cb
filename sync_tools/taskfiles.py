"""What a platform's Taskfiles say, read without running ``task``.

plat-telemetry keeps each subsystem's settings in its own ``<sub>/Taskfile.yml`` as vars with a
prefix of the Taskfile's own choosing (``NATS_*``, ``LB_*`` for liftbridge, ``GF_*`` for grafana), not
always the subsystem's name, and the root ``Taskfile.yml`` ``includes`` the subsystems and lists them
in ``SUBSYSTEMS_RELEASE``. This module finds, by any prefix:

- the version var a build reads (:func:`version_var`): the ``*_VERSION`` var whose literal or
  ``default`` is the pin, else the only one, else ``<NAME>_VERSION``;
- the upstream (``*_UPSTREAM_REPO``) and binary (``*_BIN_NAME``, ``*_BIN_PATH``) vars;
- the tasks a Taskfile defines and their ``status:`` guards;
- the root Taskfile's includes and ``SUBSYSTEMS_RELEASE`` / ``SUBSYSTEMS_BUILD`` lists.

Templates are read, never evaluated: ``{{.X | default "v"}}`` gives ``v``; ``{{.TASKFILE_DIR}}`` and
other vars of the same file are substituted where a path is needed (:func:`binary_subpath`).
Everything here is pure reading; errors in a Taskfile are ConfigErrors naming it.
"""

from __future__ import annotations

import functools
import re
import shlex
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

from sync_tools.config import _line, _scalar_text, _taskfile_value, load_yaml
from sync_tools.errors import ConfigError

TASKFILE = "Taskfile.yml"
# the names go-task looks for in a directory, in its order (the first that exists is the Taskfile)
TASKFILE_NAMES = ("Taskfile.yml", "taskfile.yml", "Taskfile.yaml", "taskfile.yaml",
                  "Taskfile.dist.yml", "taskfile.dist.yml", "Taskfile.dist.yaml", "taskfile.dist.yaml")
_TEMPLATE_VAR = re.compile(r"\{\{\s*\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_EXE_EXT = re.compile(r"\{\{\s*exeExt\s*\}\}")


class Var(NamedTuple):
    """One var of a Taskfile: its raw text, the literal value read through a ``default``, its line."""

    name: str
    raw: str | None  # None for `sh:` vars and the like
    value: str | None  # the literal, or the template's default; None when it has neither
    line: int | None
    path: Path  # the Taskfile it is written in

    @property
    def template(self) -> bool:
        """Written ``{{.X | default "v"}}``: an environment variable of the same name overrides it."""
        return self.raw is not None and "{{" in self.raw

    @property
    def self_default(self) -> bool:
        """``{{.X | default ...}}`` naming itself: the form that lets the environment choose."""
        return self.template and bool(re.search(r"\{\{\s*\." + re.escape(self.name) + r"\s*\|\s*default", self.raw or ""))


class Task(NamedTuple):
    name: str
    status: tuple[str, ...]  # the `status:` commands: task skips the task when they all succeed
    line: int | None


class Taskfile(NamedTuple):
    path: Path
    vars: dict[str, Var]
    tasks: dict[str, Task]
    includes: dict[str, Path]  # namespace -> the included Taskfile

    def var(self, name: str | None) -> Var | None:
        return self.vars.get(name) if name else None

    def by_suffix(self, suffix: str) -> list[Var]:
        """Vars named ``<PREFIX>_<suffix>``, in file order (any prefix)."""
        return [v for n, v in self.vars.items() if n.endswith("_" + suffix) and len(n) > len(suffix) + 1]


def find_taskfile(directory: Path) -> Path:
    """The Taskfile go-task reads in *directory* (:data:`TASKFILE_NAMES`, in order); ``Taskfile.yml``
    there when it has none."""
    for name in TASKFILE_NAMES:
        if (directory / name).is_file():
            return directory / name
    return directory / TASKFILE


def read(path: Path) -> Taskfile | None:
    """The Taskfile at *path*, or None when there is none. Raises ConfigError for a broken one.

    Parsed once per version of the file: loading a config reads the root Taskfile for every
    subsystem (its vars, its includes, discovery), and every command loads the config."""
    try:
        st = path.stat()
    except OSError:
        return None
    if not path.is_file():
        return None
    return _read(path, st.st_mtime_ns, st.st_size, st.st_ino)


@functools.lru_cache(maxsize=256)
def _read(path: Path, mtime_ns: int, size: int, inode: int) -> Taskfile:
    data = load_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("a Taskfile must be a mapping", path=path)
    vars_: dict[str, Var] = {}
    raw_vars = data.get("vars")
    if isinstance(raw_vars, dict):
        for k, v in raw_vars.items():
            raw = None if isinstance(v, dict | list) or v is None or isinstance(v, bool) else _scalar_text(v)
            vars_[k] = Var(k, raw, _taskfile_value(v), _line(raw_vars, k), path)
    tasks: dict[str, Task] = {}
    raw_tasks = data.get("tasks")
    if isinstance(raw_tasks, dict):
        for k, t in raw_tasks.items():
            status: tuple[str, ...] = ()
            if isinstance(t, dict) and isinstance(t.get("status"), list):
                status = tuple(_scalar_text(s) for s in t["status"] if isinstance(s, str | int | float))
            tasks[k] = Task(k, status, _line(raw_tasks, k))
    includes: dict[str, Path] = {}
    raw_inc = data.get("includes")
    if isinstance(raw_inc, dict):
        for ns, inc in raw_inc.items():
            target = inc.get("taskfile") if isinstance(inc, dict) else inc
            if not isinstance(target, str):
                continue
            p = path.parent / target
            includes[ns] = find_taskfile(p) if p.is_dir() else p
    return Taskfile(path, vars_, tasks, includes)


def subsystem_taskfile(root: Path, name: str) -> Taskfile | None:
    """``<root>/<name>/Taskfile.yml``, with the root Taskfile's vars of the subsystem's own prefix
    (``NATS_VERSION`` for nats) added where it does not set them itself; None when neither file
    says anything of the subsystem."""
    own = read(find_taskfile(root / name))
    rt = root_taskfile(root)
    prefix = re.sub(r"[^A-Z0-9]", "_", name.upper()) + "_"
    inherited = {k: v for k, v in (rt.vars if rt else {}).items() if k.startswith(prefix)}
    if own is None:
        if not inherited:
            return None
        return Taskfile(find_taskfile(root / name), inherited, {}, {})
    return own._replace(vars={**inherited, **own.vars})


def root_taskfile(root: Path) -> Taskfile | None:
    return read(find_taskfile(root))


def _words(value: str | None) -> list[str]:
    return [w for w in re.split(r"[\s,]+", value or "") if w]


def listed_subsystems(root_tf: Taskfile | None) -> list[str]:
    """The names the root Taskfile's ``SUBSYSTEMS_RELEASE`` (else ``SUBSYSTEMS_BUILD``) lists."""
    if root_tf is None:
        return []
    for key in ("SUBSYSTEMS_RELEASE", "SUBSYSTEMS_BUILD"):
        v = root_tf.var(key)
        if v is not None and v.value:
            return _words(v.value)
    return []


def upstream_var(tf: Taskfile | None) -> Var | None:
    """The ``*_UPSTREAM_REPO`` (else ``*_UPSTREAM``) var with a literal value, any prefix."""
    if tf is None:
        return None
    for suffix in ("UPSTREAM_REPO", "UPSTREAM"):
        found = [v for v in tf.by_suffix(suffix) if v.value]
        if found:
            return found[0]
    return None


def discover(root: Path) -> list[str]:
    """Subsystems the root Taskfile declares: the names ``SUBSYSTEMS_RELEASE`` lists (else every
    include) whose own Taskfile declares an upstream; in the order listed. Names without an upstream
    (tools such as ``gh`` or ``pc``) are not subsystems."""
    rt = root_taskfile(root)
    if rt is None:
        return []
    names = listed_subsystems(rt) or list(rt.includes)
    out = []
    for name in names:
        path = rt.includes.get(name) or find_taskfile(root / name)
        try:
            tf = read(path)
        except ConfigError:
            continue
        if upstream_var(tf) is not None and name not in out:
            out.append(name)
    return out


def _same_version(a: str | None, b: str | None) -> bool:
    """Whether two versions are the same but for a ``v`` prefix (``11.4.0`` and ``v11.4.0``)."""
    return bool(a and b) and (a == b or a.lstrip("vV") == b.lstrip("vV"))


def version_var(tf: Taskfile | None, name: str, pin: str | None, explicit: str | None = None) -> Var | None:
    """The var the subsystem's build reads its version from.

    *explicit* (config ``version_var``) wins when the Taskfile has it (a ConfigError when it does not).
    Else the ``*_VERSION`` var whose value is the pin (a ``v`` prefix aside), else the only
    ``*_VERSION`` var that defaults to itself, else the only ``*_VERSION`` var, else
    ``<NAME>_VERSION``. None when nothing fits.
    """
    if tf is None:
        return None
    if explicit:
        v = tf.var(explicit)
        if v is None:
            raise ConfigError(f"version_var {explicit!r} is not a var of {tf.path}", path=tf.path)
        return v
    candidates = [v for v in tf.by_suffix("VERSION") if not v.name.startswith("RELEASE_")]
    if pin:
        same = [v for v in candidates if _same_version(v.value, pin)]
        if len(same) == 1:
            return same[0]
    selfish = [v for v in candidates if v.self_default]
    if len(selfish) == 1:
        return selfish[0]
    if len(candidates) == 1:
        return candidates[0]
    prefix = re.sub(r"[^A-Z0-9]", "_", name.upper())
    return tf.var(f"{prefix}_VERSION")


def binary_var(tf: Taskfile | None) -> Var | None:
    if tf is None:
        return None
    found = [v for v in tf.by_suffix("BIN_NAME") if v.value and "{{" not in (v.raw or "")]
    return found[0] if found else None


def _expand(text: str, tf: Taskfile, taskfile_dir: str, depth: int = 0) -> str | None:
    """Substitute ``{{.TASKFILE_DIR}}``, ``{{exeExt}}`` and the file's own literal vars; None when a
    template is left that cannot be read without running task."""
    text = _EXE_EXT.sub("", text)

    def sub(m: re.Match[str]) -> str:
        key = m.group(1)
        if key in ("TASKFILE_DIR", "TASK_DIR"):
            return taskfile_dir
        v = tf.vars.get(key)
        if v is None or v.raw is None or depth > 8:
            return m.group(0)
        inner = v.raw if not v.self_default else (v.value or "")
        expanded = _expand(inner, tf, taskfile_dir, depth + 1)
        return expanded if expanded is not None else m.group(0)

    out = _TEMPLATE_VAR.sub(sub, text)
    return None if "{{" in out else out


def binary_subpath(tf: Taskfile | None, sub_dir: Path, name: str | None = None) -> str | None:
    """Where the Taskfile puts the binary, relative to ``<sub>/.bin`` (``bin/grafana-server``), from its
    ``*_BIN_PATH`` var; None when it has none that can be read.

    The subsystem's own var comes first: the prefix of *name* (``NATS_``) or of its ``*_BIN_NAME`` /
    ``*_UPSTREAM_REPO`` var (``GF_``). A var of another prefix outside ``.bin`` names a tool the
    Taskfile uses (``GO_BIN_PATH: /usr/local/go/bin/go``), not the binary: skipped. Raises
    ConfigError when the subsystem's own path escapes ``.bin``."""
    if tf is None:
        return None
    own = {re.sub(r"[^A-Z0-9]", "_", name.upper()) + "_"} if name else set()
    for v, suffix in ((binary_var(tf), "BIN_NAME"), (upstream_var(tf), "UPSTREAM_REPO"),
                      (upstream_var(tf), "UPSTREAM")):
        if v is not None and v.name.endswith("_" + suffix):
            own.add(v.name[: -len(suffix)])
    candidates = tf.by_suffix("BIN_PATH")
    candidates.sort(key=lambda v: v.name[: -len("BIN_PATH")] not in own)  # stable: file order otherwise
    bin_root = str(sub_dir / ".bin")
    for v in candidates:
        if v.raw is None:
            continue
        text = _expand(v.raw, tf, str(sub_dir))
        if text is None:
            continue
        if not text.startswith(bin_root + "/"):
            if v.name[: -len("BIN_PATH")] not in own:
                continue
            raise ConfigError(f"{v.name} ({v.raw}) is not inside {sub_dir.name}/.bin", path=tf.path,
                              line=v.line)
        rel = text[len(bin_root) + 1:]
        return check_subpath(rel, where=tf.path)
    return None


def check_subpath(rel: str, *, where: Path | str | None = None, key: str | None = None) -> str:
    """*rel* as a clean relative path inside ``.bin`` (``bin/grafana-server``); ConfigError when it
    is absolute, empty or climbs out with ``..``."""
    p = PurePosixPath(rel)
    if p.is_absolute() or not p.parts or any(part in ("..", "") for part in p.parts) or "\\" in rel:
        raise ConfigError(f"binary path {rel!r} must stay inside the subsystem's .bin", path=where, key=key)
    parts = [part for part in p.parts if part != "."]
    if not parts:
        raise ConfigError(f"binary path {rel!r} names no file", path=where, key=key)
    return "/".join(parts)


def has_task(root: Path, command: str) -> bool | None:
    """Whether ``task NS:NAME`` (the first task a build command names) exists through the root
    Taskfile's includes; None when *command* is not a plain ``task`` call this can judge (options,
    or shell operators: ``task a && task b``, ``task x 2>&1``, whose words are not all task names)."""
    if re.search(r"[;&|<>()`$\n]", command):
        return None
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    if not words or Path(words[0]).name != "task":
        return None
    names = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
    if not names or any(w.startswith("-") for w in words[1:]):
        return None
    rt = root_taskfile(root)
    if rt is None:
        return False
    for task_name in names:
        ns, sep, rest = task_name.partition(":")
        if task_name in rt.tasks:
            continue
        if not sep or ns not in rt.includes:
            return False
        tf = read(rt.includes[ns])
        if tf is None or rest not in tf.tasks:
            return False
    return True


def as_dict(tf: Taskfile) -> dict[str, Any]:
    """For ``doctor --json`` and debugging."""
    return {"path": str(tf.path), "vars": {k: v.value for k, v in tf.vars.items()}, "tasks": sorted(tf.tasks),
            "includes": {k: str(v) for k, v in tf.includes.items()}}
