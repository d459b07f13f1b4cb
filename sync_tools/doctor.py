"""``doctor``: what a workspace being adopted needs before sync-tools can drive it, each with its fix.

Every check is a small function ``(ctx) -> list[Finding]`` (:data:`CHECKS`); :func:`diagnose` runs
them all, in order, and one check that fails to read something (a broken Taskfile) becomes an
``error`` finding of its own instead of sinking the others. Findings are grouped by subsystem
(workspace-wide ones first), in config order. Everything here only reads: the workspace's files and,
unless ``offline``, the upstreams' refs (each remote listed once, concurrently, through
:class:`~sync_tools.sources.Sources`). The checks and their fixes are listed in docs/doctor.md.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from sync_tools import taskfiles, versions
from sync_tools.config import Config, PinSource, Subsystem, load_yaml
from sync_tools.errors import ConfigError, DataError, SyncToolsError
from sync_tools.sources import Sources
from sync_tools.sources.remote import RemoteRefs, is_local

LEVELS = ("error", "warning", "info", "ok")
PROCESS_COMPOSE = "process-compose.yaml"
PC_DEFAULT_PORT = 8080  # process-compose's REST API without --port / -U (sync_tools.agent.reload's default too)
RELAY_DEFAULT_PORT = 9191  # `sync-tools relay` without --port (not process-compose's, nor plat-telemetry's 9090)
VERSION_MANIFEST = ".version-manifest.json"  # what `check` writes in the workspace root
_SHA = re.compile(r"[0-9a-f]{7,40}")


class Finding(NamedTuple):
    """One thing doctor found: ``level`` (error | warning | info | ok), the subsystem it is about
    (None: the workspace), a stable ``code``, a one-line ``message`` and, where there is one, the
    ``fix``."""

    level: str
    subsystem: str | None
    code: str
    message: str
    fix: str | None = None

    def line(self, width: int = 0) -> str:
        """``error  liftbridge  pin v1.10.0 is not a tag upstream ... -> fix: ...`` (one line)."""
        text = f"{self.level:<7}  {(self.subsystem or '-'):<{width}}  {self.message}"
        if self.fix:
            text += f" -> fix: {self.fix}"
        return " ".join(text.split("\n"))

    def to_json(self) -> dict[str, Any]:
        return self._asdict()


class Report(NamedTuple):
    findings: tuple[Finding, ...]

    @property
    def errors(self) -> int:
        return sum(f.level == "error" for f in self.findings)

    @property
    def warnings(self) -> int:
        return sum(f.level == "warning" for f in self.findings)

    def lines(self) -> list[str]:
        width = max((len(f.subsystem or "-") for f in self.findings), default=1)
        return [f.line(width) for f in self.findings]

    def to_json(self) -> dict[str, Any]:
        return {"findings": [f.to_json() for f in self.findings], "errors": self.errors, "warnings": self.warnings}


class Context:
    """What the checks share: the config, the sources (None when offline) and cached file reads."""

    def __init__(self, config: Config, *, offline: bool = False, sources: Sources | None = None):
        self.config = config
        self.root = config.root
        self.offline = offline
        self.sources = None if offline else (sources or Sources())
        self._cache: dict[Any, Any] = {}

    def _cached(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def taskfile(self, name: str) -> taskfiles.Taskfile | None:
        """``<name>/Taskfile.yml`` with the root's vars of its prefix (None when there is none)."""
        return self._cached(("tf", name), lambda: taskfiles.subsystem_taskfile(self.root, name))

    def root_taskfile(self) -> taskfiles.Taskfile | None:
        return self._cached("root-tf", lambda: taskfiles.root_taskfile(self.root))

    def yaml(self, path: Path) -> Any:
        """A YAML file's data (None when it does not exist); ConfigError when it is broken."""
        return self._cached(("yaml", path), lambda: load_yaml(path) if path.is_file() else None)

    def rel(self, path: Path | str) -> str:
        """*path* relative to the workspace root where it is inside it."""
        p = Path(path)
        try:
            return str(p.resolve().relative_to(self.root))
        except ValueError:
            return str(p)

    def task(self, task_name: str) -> tuple[taskfiles.Taskfile, taskfiles.Task] | None:
        """``NS:NAME`` through the root Taskfile's includes (a root task without a namespace), or
        None when it does not resolve."""
        rt = self.root_taskfile()
        if rt is None:
            return None
        if task_name in rt.tasks:
            return rt, rt.tasks[task_name]
        ns, sep, rest = task_name.partition(":")
        if not sep or ns not in rt.includes:
            return None
        tf = self._cached(("inc", ns), lambda: taskfiles.read(rt.includes[ns]))
        if tf is None or rest not in tf.tasks:
            return None
        return tf, tf.tasks[rest]

    def task_text(self, tf: taskfiles.Taskfile, task_name: str) -> str:
        """Every string in task *task_name* of *tf* (cmds, status, vars), one per line, with the
        file's literal ``{{.VAR}}`` values put in: what to search for a port."""
        data = self.yaml(tf.path)
        tasks = data.get("tasks") if isinstance(data, dict) else None
        body = tasks.get(task_name) if isinstance(tasks, dict) else None
        return _substitute("\n".join(_strings(body)), tf)


def _strings(obj: Any) -> Iterator[str]:
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)
    elif isinstance(obj, str | int | float) and not isinstance(obj, bool):
        yield str(obj)


def _substitute(text: str, tf: taskfiles.Taskfile | None, depth: int = 0) -> str:
    if tf is None or depth > 4 or "{{" not in text:
        return text

    def sub(m: re.Match[str]) -> str:
        v = tf.vars.get(m.group(1))
        return v.value if v is not None and v.value is not None else m.group(0)

    out = re.sub(r"\{\{\s*\.([A-Za-z_][A-Za-z0-9_]*)\s*(?:\|[^}]*)?\}\}", sub, text)
    return out if out == text else _substitute(out, tf, depth + 1)


def _fmt_pin_fix(ctx: Context, sub: Subsystem, value: str) -> str:
    """``set manifest.yaml subsystems.liftbridge.version to v1.9.0``: where this pin is written."""
    pin: PinSource | None = sub.pin
    if pin is None:
        return f"set subsystems.{sub.name}.current in {ctx.rel(ctx.config.path)} to {value}"
    if pin.kind == "taskfile":
        return f"set {pin.key} in {ctx.rel(pin.path)} to {value}"
    return f"set {ctx.rel(pin.path)} {pin.key} to {value}"


def _config_key(ctx: Context, sub: Subsystem, key: str, value: str) -> str:
    return f"set subsystems.{sub.name}.{key}: {value} in {ctx.rel(ctx.config.path)}"


def _task_names(command: str) -> list[str]:
    """The tasks a plain ``task A B`` command runs (none for anything else)."""
    words = command.split()
    if not words or Path(words[0]).name != "task" or any(w.startswith("-") for w in words[1:]):
        return []
    return [w for w in words[1:] if "=" not in w]


# ------------------------------------------------------------------------------------------- checks


def check_pins(ctx: Context) -> list[Finding]:
    """Each pin against its upstream's refs: a tag (``11.4.0`` matches ``v11.4.0``), a branch (it
    follows the branch's head), or neither (an error naming the newest tag)."""
    subs = [s for s in ctx.config.subsystems.values() if s.upstream]
    if ctx.offline or ctx.sources is None:
        return [Finding("info", None, "pins-offline", "pins not checked against their upstreams (--offline)")]
    out: list[Finding] = []
    resolved = {s.name: _resolve_upstream(ctx, s.upstream) for s in subs}
    ctx.sources.prefetch(s._replace(upstream=resolved[s.name]) for s in subs)
    for sub in subs:
        if sub.strategy == "releases":
            out.append(Finding("info", sub.name, "pin-releases",
                               "strategy releases: the pin is checked against GitHub releases by `sync-tools check`"))
            continue
        try:
            refs = ctx.sources.refs.get(resolved[sub.name])
        except SyncToolsError as e:
            out.append(Finding("error", sub.name, "upstream-unreachable", f"upstream cannot be listed: {e}",
                               f"check subsystems.{sub.name}.upstream, or run doctor --offline"))
            continue
        out.append(_pin_finding(ctx, sub, refs))
    return out


def _resolve_upstream(ctx: Context, upstream: str) -> str:
    """A relative local upstream is relative to the workspace root (as `check` reads it)."""
    up = upstream.strip()
    if not is_local(up) or up.startswith("file://") or Path(up).expanduser().is_absolute():
        return up
    return str(ctx.root / up)


def _pin_finding(ctx: Context, sub: Subsystem, refs: RemoteRefs) -> Finding:
    tags = refs.tags()
    pin = sub.current
    if not pin and sub.strategy != "commits" and not sub.branch:
        # check takes the newest tag for it, not a branch's head: say so, not "follows branch main"
        return Finding("warning", sub.name, "pin-missing", "no pin: every upstream version reads as an update",
                       _fmt_pin_fix(ctx, sub, _newest(sub, tags) or "<version>"))
    if sub.strategy == "commits" or not pin:
        branch = sub.branch or (pin if pin and not _SHA.fullmatch(pin) else None) or refs.head_branch()
        head = refs.branch(branch) if branch else None
        if branch and head:
            return Finding("info", sub.name, "pin-branch", f"follows branch {branch}: latest is its head ({head[:12]})")
        if not pin:
            return Finding("warning", sub.name, "pin-missing", "no pin: every upstream version reads as an update",
                           _fmt_pin_fix(ctx, sub, _newest(sub, tags) or "<version>"))
        return Finding("error", sub.name, "pin-branch-missing", f"branch {branch} is not a branch upstream "
                       f"(branches: {_branches(refs)})", f"set subsystems.{sub.name}.branch to one of them")
    if pin in tags:
        newest = _newest(sub, tags)
        tail = f" (newest {newest})" if newest and newest != pin else " (the newest)"
        return Finding("ok", sub.name, "pin-tag", f"pin {pin} is a tag upstream{tail}")
    for other in (f"v{pin}", pin[1:] if pin[:1] in "vV" else None):
        if other and other in tags:
            return Finding("info", sub.name, "pin-tag-prefix", f"pin {pin} matches upstream tag {other} "
                           "(the v prefix aside)")
    head = refs.branch(pin)
    if head:
        return Finding("info", sub.name, "pin-branch", f"follows branch {pin}: latest is its head ({head[:12]})")
    newest = _newest(sub, tags)
    if newest:
        return Finding("error", sub.name, "pin-not-upstream", f"pin {pin} is not a tag upstream (newest {newest})",
                       _fmt_pin_fix(ctx, sub, newest))
    return Finding("error", sub.name, "pin-not-upstream", f"pin {pin} is neither a tag nor a branch upstream (no "
                   f"version tags; branches: {_branches(refs)})",
                   _fmt_pin_fix(ctx, sub, refs.head_branch() or "<branch>"))


def _newest(sub: Subsystem, tags: dict[str, str]) -> str | None:
    """The newest tag under the subsystem's filters, within the pin's major where there is one."""
    sel = versions.select(tags, current=sub.current, include=sub.include, exclude=sub.exclude,
                          prereleases=sub.prereleases, major=sub.major)
    found = sel.latest or sel.major_available
    return found.tag if found else None


def _branches(refs: RemoteRefs) -> str:
    names = sorted(r[len("refs/heads/"):] for r in refs.refs if r.startswith("refs/heads/"))
    return ", ".join(names[:10]) + (", ..." if len(names) > 10 else "") if names else "none"


def _same_repo(a: str, b: str) -> bool:
    def norm(u: str) -> str:
        u = u.strip().rstrip("/")
        u = u[:-4] if u.endswith(".git") else u
        return re.sub(r"^(https?://|git://|ssh://git@|git@)", "", u).replace("github.com:", "github.com/").lower()

    return norm(a) == norm(b)


def check_upstreams(ctx: Context) -> list[Finding]:
    """The config's upstream against the Taskfile's ``*_UPSTREAM_REPO`` (any prefix)."""
    out = []
    for sub in ctx.config.subsystems.values():
        var = taskfiles.upstream_var(ctx.taskfile(sub.name))
        if var is None or not sub.upstream or var.value is None:
            continue
        if _same_repo(sub.upstream, var.value) or (
                is_local(sub.upstream) and is_local(var.value)
                and Path(_resolve_upstream(ctx, sub.upstream)).resolve() == Path(_resolve_upstream(ctx, var.value)).resolve()):
            continue
        where = ctx.rel(var.path)
        out.append(Finding(
            "warning", sub.name, "upstream-disagrees",
            f"{ctx.rel(ctx.config.path)} upstream {sub.upstream} and {where} {var.name} {var.value} disagree: "
            f"sync-tools checks {sub.upstream} (the config's); the Taskfile's tasks fetch {var.value}",
            f"make them the same: set {var.name} in {where} to {sub.upstream}, or subsystems.{sub.name}.upstream "
            f"in {ctx.rel(ctx.config.path)} to {var.value}"))
    return out


def check_status_guards(ctx: Context) -> list[Finding]:
    """Build tasks (and ``ensure``) guarded by ``status:``: task skips them when the binary exists."""
    out = []
    for sub in ctx.config.subsystems.values():
        seen: list[str] = []
        for command in sub.build:
            seen += [n for n in _task_names(command) if n not in seen]
        own = ctx.taskfile(sub.name)
        if own is not None and "ensure" in own.tasks:
            seen.append(f"{sub.name}:ensure")
        for name in seen:
            found = ctx.task(name)
            if found is None and name.startswith(f"{sub.name}:") and own is not None:
                task = own.tasks.get(name.split(":", 1)[1])  # not included from the root: its own file
                found = (own, task) if task is not None else None
            if found is None or not found[1].status:
                continue
            tf, task = found
            out.append(Finding(
                "info", sub.name, "status-guard",
                f"task {name} ({ctx.rel(tf.path)}:{task.line}) has a status: guard (`{task.status[0]}`): "
                "task skips the build when the binary exists; sync-tools build moves the old binary aside so "
                "the build runs"))
    return out


def check_version_vars(ctx: Context) -> list[Finding]:
    """The Taskfile var each build reads its version from: found (template or plain) or not, and
    whether its default is the pin."""
    out = []
    for sub in ctx.config.subsystems.values():
        tf = ctx.taskfile(sub.name)
        if tf is None:  # included from elsewhere (web: ./services/web): that Taskfile
            rt = ctx.root_taskfile()
            inc = rt.includes.get(sub.name) if rt is not None else None
            tf = ctx._cached(("inc", sub.name), lambda p=inc: taskfiles.read(p)) if inc is not None else None
        if tf is None:
            if sub.version_var:  # named in the config: nothing here can say otherwise
                continue
            if any(_task_names(c) for c in sub.build):
                out.append(Finding("warning", sub.name, "version-var-missing",
                                   f"no {sub.name}/Taskfile.yml, so no version var: the build gets the version "
                                   "only as $SYNC_TOOLS_VERSION",
                                   f"set subsystems.{sub.name}.version_var to the var the build reads"))
            continue
        var = tf.var(sub.version_var)
        if var is None:
            cands = [v.name for v in tf.by_suffix("VERSION") if not v.name.startswith("RELEASE_")]
            prefix = re.sub(r"[^A-Z0-9]", "_", sub.name.upper())
            if cands:
                several = "several candidates" if len(cands) > 1 else "a candidate"
                msg = f"no version var chosen in {ctx.rel(tf.path)}: {several} ({', '.join(cands)})"
                fix = _config_key(ctx, sub, "version_var", cands[0]) + " (the var the build reads)"
            else:
                msg = f"no *_VERSION var in {ctx.rel(tf.path)}: the build cannot be told which version to build"
                fix = (f"add {prefix}_VERSION: '{{{{.{prefix}_VERSION | default \"{sub.current or 'v1.0.0'}\"}}}}' "
                       f"to {ctx.rel(tf.path)} and use it in the build tasks, then "
                       + _config_key(ctx, sub, "version_var", f"{prefix}_VERSION"))
            out.append(Finding("warning", sub.name, "version-var-missing", msg, fix))
            continue
        where = f"{ctx.rel(var.path)}:{var.line}"
        if var.self_default:
            kind = f"a {{{{.{var.name} | default}}}} template: the environment overrides it, as sync-tools build sets it"
        elif var.template:
            kind = "a template without a self default: the environment may not reach it"
        else:
            kind = "a plain var: task prefers it to the environment, so the build must write the version into it"
        out.append(Finding("info", sub.name, "version-var", f"version var {var.name} = {var.value or var.raw} "
                           f"({where}), {kind}"))
        pin_is_var = sub.pin is not None and sub.pin.kind == "taskfile" and sub.pin.key == var.name
        if (sub.current and var.value and not pin_is_var
                and not taskfiles._same_version(var.value, sub.current)):
            out.append(Finding(
                "warning", sub.name, "version-default-differs",
                f"{var.name} defaults to {var.value} in {where} but the pin is {sub.current}: "
                f"`task {sub.name}:...` run by hand builds {var.value}",
                f"set {var.name}'s default in {ctx.rel(var.path)} to {sub.current}"))
    return out


def check_build_tasks(ctx: Context) -> list[Finding]:
    """Each ``task NS:NAME`` build command resolves through the root Taskfile's includes."""
    out = []
    rt = ctx.root_taskfile()
    for sub in ctx.config.subsystems.values():
        bad = []
        for command in sub.build:
            ok = taskfiles.has_task(ctx.root, command)
            if ok is False:
                bad.append(command)
        if not bad:
            if any(_task_names(c) for c in sub.build):
                out.append(Finding("ok", sub.name, "build-tasks", f"build tasks resolve: {'; '.join(sub.build)}"))
            continue
        names = [n for c in bad for n in _task_names(c)]
        ns = {n.partition(":")[0] for n in names}
        not_included = sorted(n for n in ns if rt is None or n not in rt.includes)
        if not_included and (ctx.root / not_included[0] / taskfiles.TASKFILE).is_file():
            why = f"the root Taskfile does not include {', '.join(not_included)}"
            fix = (f"add `{not_included[0]}: ./{not_included[0]}` to the root Taskfile's includes, or set "
                   f"subsystems.{sub.name}.build in {ctx.rel(ctx.config.path)} "
                   f"(e.g. [\"task -d {not_included[0]} src:update\", \"task -d {not_included[0]} bin:build\"])")
        else:
            why = "no such task" if rt is not None else "there is no root Taskfile.yml"
            fix = f"set subsystems.{sub.name}.build in {ctx.rel(ctx.config.path)} to commands that build it"
        out.append(Finding("error", sub.name, "build-task-missing",
                           f"build command {'; '.join(bad)} does not resolve ({why}): plan will not plan it", fix))
    return out


def check_binaries(ctx: Context) -> list[Finding]:
    """Each binary: present or not at ``<name>/.bin/<bin_path>``, and its ``.version`` (three lines
    with a matching checksum, a legacy one-line version, or none)."""
    from sync_tools.fsutil import read_capped, sha256_file
    from sync_tools.versionfile import MAX_VERSION_FILE, VERSION_FILE, parse_version_text

    out = []
    for sub in ctx.config.subsystems.values():
        binary = sub.binary_path(ctx.root)
        shown = ctx.rel(binary)
        build_fix = f"sync-tools build --only {sub.name}"
        own = sub.bin_dir(ctx.root) / VERSION_FILE
        # a binary in a subfolder of .bin (grafana's bin/grafana-server): the platform's Taskfile may
        # write .version at <name>/.bin, not next to the binary where sync-tools keeps it
        top = ctx.root / sub.name / ".bin" / VERSION_FILE
        vpath = top if own != top and not own.exists() and top.exists() else own
        note = f" (sync-tools keeps its own at {ctx.rel(own)})" if vpath != own else ""
        try:
            raw = read_capped(vpath, MAX_VERSION_FILE, missing_ok=True)
        except (OSError, DataError) as e:
            out.append(Finding("error", sub.name, "version-file-bad", f"{ctx.rel(vpath)}: {e}", build_fix))
            continue
        if not binary.is_file():
            others = sorted(p.name for p in sub.bin_dir(ctx.root).glob("*") if p.is_file() and p.name != VERSION_FILE)
            hint = f" (.bin holds {', '.join(others[:5])}: set subsystems.{sub.name}.binary if one is it)" if others else ""
            out.append(Finding("info", sub.name, "binary-absent", f"no binary at {shown} yet{hint}",
                               f"{build_fix} (or let the agent install a release)"))
            continue
        if raw is None:
            out.append(Finding("warning", sub.name, "version-file-missing",
                               f"binary {shown} has no .version: nothing to verify it against", build_fix))
            continue
        text = raw.decode("utf-8", "replace")
        content = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
        if len(content) == 1 and ":" not in content[0]:
            out.append(Finding("warning", sub.name, "version-file-legacy",
                               f"{ctx.rel(vpath)} is the one line {content[0]!r}: binary {shown} is unverified "
                               f"until the first verified install{note}", build_fix))
            continue
        try:
            info = parse_version_text(text, ctx.rel(vpath))
        except DataError as e:
            out.append(Finding("error", sub.name, "version-file-bad", str(e), build_fix))
            continue
        actual = sha256_file(binary)
        if info.checksum != actual:
            out.append(Finding("error", sub.name, "checksum-mismatch",
                               f"binary {shown} has sha256 {actual[:12]}, .version says {info.checksum[:12]}",
                               build_fix))
        else:
            out.append(Finding("ok", sub.name, "binary", f"binary {shown} matches its .version "
                               f"({info.version or info.commit[:12]}, sha256 {actual[:12]})"))
    return out


def check_health(ctx: Context) -> list[Finding]:
    """A health command per subsystem (configured, or the included Taskfile's ``health`` task)."""
    out = []
    for sub in ctx.config.subsystems.values():
        if sub.health:
            if taskfiles.has_task(ctx.root, sub.health) is False:
                out.append(Finding("error", sub.name, "health-task-missing",
                                   f"health command `{sub.health}` names a task the root Taskfile does not have",
                                   _config_key(ctx, sub, "health", "<a command that exits 0 when healthy>")))
            else:
                out.append(Finding("ok", sub.name, "health", f"health: {sub.health}"))
            continue
        own = ctx.taskfile(sub.name)
        if own is not None and "health" in own.tasks:
            fix = (f"add `{sub.name}: ./{sub.name}` to the root Taskfile's includes (its health task becomes "
                   f"`task {sub.name}:health`), or " + _config_key(ctx, sub, "health", f"task -d {sub.name} health"))
        else:
            fix = _config_key(ctx, sub, "health", "<command or http://127.0.0.1:PORT/health>")
        out.append(Finding("warning", sub.name, "health-missing",
                           "no health command: after an update the agent only asks the process manager "
                           "whether it runs (a bad binary that starts is kept)", fix))
    return out


def check_processes(ctx: Context) -> list[Finding]:
    """Every subsystem's process is a process of ``process-compose.yaml``, and nothing listens on the
    port of process-compose's API."""
    path = ctx.root / PROCESS_COMPOSE
    data = ctx.yaml(path)
    if data is None:
        if ctx.config.agent.reload == "process-compose":
            return [Finding("warning", None, "process-compose-missing",
                            f"agent.reload is process-compose but there is no {PROCESS_COMPOSE}",
                            "check agent.root, or the process-compose file's name")]
        return []
    procs = data.get("processes") if isinstance(data, dict) else None
    if not isinstance(procs, dict):
        return [Finding("error", None, "process-compose-bad", f"{PROCESS_COMPOSE} has no processes: mapping",
                        f"fix {PROCESS_COMPOSE}")]
    out = []
    for sub in ctx.config.subsystems.values():
        if sub.process in procs:
            continue
        guess = _guess_process(sub, procs)
        out.append(Finding("warning", sub.name, "process-missing",
                           f"process {sub.process} is not in {PROCESS_COMPOSE} (processes: {', '.join(procs)}): "
                           "the agent cannot restart it",
                           _config_key(ctx, sub, "process", guess or "<process-compose name>")))
    out += _port_clashes(ctx, procs)
    return out


def _guess_process(sub: Subsystem, procs: dict[str, Any]) -> str | None:
    for name, body in procs.items():
        text = "\n".join(_strings(body.get("command") if isinstance(body, dict) else None))
        if f"task {sub.name}:" in text or re.search(rf"(^|[/\s]){re.escape(sub.binary)}(\s|$)", text):
            return str(name)
    close = difflib.get_close_matches(sub.process, [str(p) for p in procs], n=1)
    return close[0] if close else None


def _pc_port(ctx: Context) -> tuple[int | None, str]:
    """The TCP port of process-compose's API and where that comes from; None for the port when it
    listens on a unix socket (``agent.socket``, or a Taskfile that starts it with ``-U``)."""
    ag = ctx.config.agent
    # agent.url and agent.socket name process-compose's API whatever agent.reload says (doctor's own
    # port-clash fix sets agent.url without it)
    if ag.url:
        try:
            port = urllib.parse.urlsplit(ag.url).port  # [::1]:9999 too
        except ValueError:
            port = None
        return port or (443 if ag.url.startswith("https") else 80), "agent.url"
    if ag.reload == "process-compose" and ag.socket:
        return None, "agent.socket"
    where = _pc_socket_task(ctx)
    if where:
        return None, where
    found = _pc_port_task(ctx)
    if found:
        return found
    return PC_DEFAULT_PORT, "by default"


def _pc_tasks(ctx: Context) -> list[tuple[taskfiles.Taskfile, str]]:
    """(Taskfile, task name) of the root Taskfile and its includes."""
    rt = ctx.root_taskfile()
    if rt is None:
        return []
    files = [rt] + [ctx._cached(("inc", ns), lambda p=p: taskfiles.read(p)) for ns, p in rt.includes.items()]
    return [(tf, name) for tf in files if tf is not None for name in tf.tasks]


_PC_UP = r"(process-compose|PC_BIN\w*\s*\}\})\S*\s+(?:\S+\s+)*?up\b[^\n]*?"


def _pc_port_task(ctx: Context) -> tuple[int, str] | None:
    """The port a task starts process-compose's API on (``process-compose up --port N`` / ``-p N``)."""
    port = re.compile(_PC_UP + r"\s(?:--port|-p)[ =](\d+)\b")
    for tf, name in _pc_tasks(ctx):
        m = port.search(ctx.task_text(tf, name))
        if m:
            return int(m.group(2)), f"{ctx.rel(tf.path)} task {name} runs it with --port {m.group(2)}"
    return None


def _pc_socket_task(ctx: Context) -> str | None:
    """A task of the root Taskfile or its includes that starts process-compose on a unix socket
    (``process-compose up -U``), as ``<file> task <name>``; None when there is none."""
    starts = re.compile(_PC_UP + r"(\s-U\b|\s--use-uds\b)")
    for tf, name in _pc_tasks(ctx):
        if starts.search(ctx.task_text(tf, name)):
            return f"{ctx.rel(tf.path)} task {name} runs it with -U"
    return None


def _port_clashes(ctx: Context, procs: dict[str, Any]) -> list[Finding]:
    pc_port, pc_where = _pc_port(ctx)
    port = pc_port if pc_port is not None else RELAY_DEFAULT_PORT
    if pc_port is not None:
        whose = f"which process-compose's API uses ({pc_where})" if pc_where != "by default" else \
            "which process-compose's API uses by default"
        if port == RELAY_DEFAULT_PORT:
            whose += " (as does sync-tools relay)"
        fix_tail = ("or start process-compose with --port N (and set agent.url: http://127.0.0.1:N) or -U "
                    "(and set agent.socket)")
    else:  # process-compose is on a socket: the relay's default port is still taken
        whose = f"which sync-tools relay uses by default (process-compose's API is on a unix socket: {pc_where})"
        fix_tail = "or run sync-tools relay with --port N"
    mention = re.compile(rf"(?<![\w.]){port}(?![\w.])")
    by_process = {s.process: s.name for s in ctx.config.subsystems.values()}
    found: list[tuple[str | None, str, str]] = []  # (subsystem, who, where)
    for name, body in procs.items():
        where = _port_in_process(ctx, body, mention, port, relay=pc_port is not None) if isinstance(body, dict) else None
        if where:
            found.append((by_process.get(str(name)), f"process {name}", where))
    listen_port = (ctx.config.agent.listen or "").rpartition(":")[2]
    if listen_port.isdigit() and int(listen_port) == port:
        found.append((None, f"the agent (agent.listen {ctx.config.agent.listen})", ctx.rel(ctx.config.path)))
    return [Finding("warning", subsystem, "port-clash", f"{who} uses port {port} ({where}), {whose}",
                    f"move {who.split(' (')[0]} to another port, {fix_tail}")
            for subsystem, who, where in found]


def _port_in_process(ctx: Context, body: dict[str, Any], mention: re.Pattern[str], port: int, *,
                     relay: bool = True) -> str | None:
    """Where a process-compose process says it uses *port*: its own command, environment or probes,
    a `sync-tools relay` without --port (the relay's default), or the run/health task its
    ``task X:run`` command runs. None when nowhere."""
    own = "\n".join(_strings({k: body.get(k) for k in ("command", "environment", "readiness_probe", "liveness_probe")}))
    if mention.search(own):
        return PROCESS_COMPOSE
    command = "\n".join(_strings(body.get("command")))
    if relay and port == RELAY_DEFAULT_PORT and re.search(r"sync-tools\s+relay\b", command) and "--port" not in command:
        return f"{PROCESS_COMPOSE}: sync-tools relay without --port"
    for task_name in _task_names(command):
        hit = ctx.task(task_name)
        if hit is None:
            continue
        tf = hit[0]
        for t in dict.fromkeys((task_name.split(":", 1)[-1], "run", "health")):
            if t in tf.tasks and mention.search(ctx.task_text(tf, t)):
                return f"{ctx.rel(tf.path)} task {t}"
    return None


def _ignored(lines: list[str], name: str) -> bool:
    """Whether a root-level file *name* is ignored by these .gitignore lines (last match wins)."""
    ignored = False
    for raw in lines:
        line = raw.rstrip("\n").rstrip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pat = line[1:] if negate else line
        if pat.endswith("/"):
            continue  # directories only
        pat = pat.lstrip("/")
        if pat.startswith("**/"):
            pat = pat[3:]
        if "/" in pat:
            continue
        if fnmatch.fnmatchcase(name, pat):
            ignored = not negate
    return ignored


def check_gitignore(ctx: Context) -> list[Finding]:
    """``.gitignore`` ignores ``.version-manifest.json`` (what every `check` rewrites)."""
    path = ctx.root / ".gitignore"
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        lines = []
    except OSError as e:
        return [Finding("warning", None, "gitignore-unreadable", f".gitignore: {e}", None)]
    if _ignored(lines, VERSION_MANIFEST):
        return [Finding("ok", None, "gitignore", f".gitignore ignores {VERSION_MANIFEST}")]
    return [Finding("warning", None, "gitignore", f".gitignore lacks {VERSION_MANIFEST} (every `sync-tools check` "
                    "rewrites it: the checkout reads as changed)", f"add the line `{VERSION_MANIFEST}` to .gitignore")]


#: (name, check) in the order they run; the name labels a check that fails to run
CHECKS: tuple[tuple[str, Callable[[Context], list[Finding]]], ...] = (
    ("gitignore", check_gitignore),
    ("pins", check_pins),
    ("upstreams", check_upstreams),
    ("version-vars", check_version_vars),
    ("build-tasks", check_build_tasks),
    ("status-guards", check_status_guards),
    ("binaries", check_binaries),
    ("health", check_health),
    ("processes", check_processes),
)


def diagnose(config: Config, *, offline: bool = False, sources: Sources | None = None,
             checks: tuple[tuple[str, Callable[[Context], list[Finding]]], ...] = CHECKS) -> Report:
    """Run *checks* on *config*'s workspace. Never raises for what it finds: a check that cannot read
    something (a broken Taskfile, an unreadable file) is an ``error`` finding naming the check."""
    ctx = Context(config, offline=offline, sources=sources)
    found: list[tuple[int, Finding]] = []
    for i, (name, fn) in enumerate(checks):
        try:
            found += [(i, f) for f in fn(ctx)]
        except (ConfigError, DataError, OSError) as e:
            found.append((i, Finding("error", None, f"{name}-failed", f"{name} check could not run: {e}",
                                     "fix the file it names")))
    order = {name: n for n, name in enumerate(config.subsystems)}
    found.sort(key=lambda item: (-1 if item[1].subsystem is None else order.get(item[1].subsystem, len(order)),
                                 item[0]))
    return Report(tuple(f for _, f in found))
