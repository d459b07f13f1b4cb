"""sync-tools.yaml, loaded into immutable records and validated.

When a workspace has no ``sync-tools.yaml``, plat-telemetry's own files are read instead: the root
``manifest.yaml`` (``subsystems: {nats: {version, upstream, branch}}``) and the Taskfile vars
``<NAME>_VERSION`` / ``<NAME>_UPSTREAM_REPO`` / ``<NAME>_BIN_NAME`` of the root and per-subsystem
Taskfiles, so the real repository works without rewriting.

Every problem is a :class:`~sync_tools.errors.ConfigError` naming the file, the key and the line.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import yaml

from sync_tools.errors import ConfigError, DataError

CONFIG_NAME = "sync-tools.yaml"
CONFIG_ENV = "SYNC_TOOLS_CONFIG"
STRATEGIES = ("tags", "commits", "releases")
MAJOR_POLICIES = ("manual", "auto")
DISPATCHERS = ("github", "local")
RELOADERS = ("process-compose", "supervisor", "command", "none")
DEFAULT_PLATFORMS = ("linux/amd64", "linux/arm64", "darwin/amd64", "darwin/arm64")
# bounds of the config's numbers: far above any sane use, well below what overflows a date or a
# buffer size (.inf, 1e9 days and the like are refused with the key's line, not a crash later)
MAX_EXPIRES_DAYS = 3650.0
MAX_BODY = 1 << 30
MAX_ATTEMPTS = 1000
MAX_HEALTH_TIMEOUT = 3600.0
# matched with fullmatch: "$" would let a trailing newline through
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
_PLATFORM_RE = re.compile(r"[a-z0-9]+/[a-z0-9]+")
_REPO_RE = re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+")


# --------------------------------------------------------------------------------------------- YAML


class _LineDict(dict):
    """A mapping that remembers the line (1-based) each key was written on."""

    lines: dict[str, int]
    start_line: int


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _LineDict:
    loader.flatten_mapping(node)
    out = _LineDict()
    out.lines = {}
    out.start_line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str | int | float | bool) and key is not None:
            raise ConfigError("mapping keys must be plain scalars", line=key_node.start_mark.line + 1)
        key = _scalar_text(key)
        if key in out:
            raise ConfigError(f"duplicate key {key!r}", line=key_node.start_mark.line + 1)
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = key_node.start_mark.line + 1
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _IntText(int):
    """An int YAML read from a plain scalar, keeping the scalar's text: ``010`` is 8 as a number but
    ``"010"`` as a version (YAML 1.1 reads it as octal)."""

    text: str


class _FloatText(float):
    """A float YAML read from a plain scalar, keeping its text: ``current: 1.20`` is the version
    ``"1.20"``, not ``"1.2"``."""

    text: str


def _construct_int(loader: _LineLoader, node: yaml.ScalarNode) -> int:
    out = _IntText(loader.construct_yaml_int(node))
    out.text = node.value
    return out


def _construct_float(loader: _LineLoader, node: yaml.ScalarNode) -> float:
    out = _FloatText(loader.construct_yaml_float(node))
    out.text = node.value
    return out


def _scalar_text(value: str | int | float) -> str:
    """A scalar as the text it was written as (numbers as written, not as Python prints them)."""
    return getattr(value, "text", None) or str(value)


_LineLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_LineLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


class _FastLineLoader(getattr(yaml, "CSafeLoader", _LineLoader)):  # type: ignore[misc]
    """The same constructors and resolver over libyaml's parser, where PyYAML has it: the pure-Python
    reader and scanner cost ~4 ms of every command. Its error wording differs, so a file it refuses
    is read again by :class:`_LineLoader`, whose verdict and message stand."""


_FastLineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_FastLineLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)
_FastLineLoader.add_constructor("tag:yaml.org,2002:float", _construct_float)


_BINARY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,99}")  # fullmatch
MAX_CONFIG_BYTES = 4 << 20  # a config, manifest.yaml or Taskfile is a few KB; anything near this is not one


def load_yaml(path: Path) -> Any:
    """Parse a YAML file with line tracking; errors become ConfigError naming file and line."""
    from sync_tools.fsutil import read_capped

    try:
        text = (read_capped(path, MAX_CONFIG_BYTES) or b"").decode("utf-8")
    except FileNotFoundError as e:
        raise ConfigError("file not found", path=path) from e
    except DataError as e:
        raise ConfigError(f"over {MAX_CONFIG_BYTES >> 20} MiB: not a config file", path=path) from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read: {e}", path=path) from e
    try:
        return _load(text, _FastLineLoader, path)
    except yaml.YAMLError:
        pass  # libyaml refused it: read again by the pure loader, whose verdict and words stand
    except RecursionError as e:  # collections nested thousands deep ([[[[...) are not a config
        raise ConfigError("invalid YAML: nested too deeply", path=path) from e
    try:
        return _load(text, _LineLoader, path)
    except RecursionError as e:
        raise ConfigError("invalid YAML: nested too deeply", path=path) from e
    except yaml.YAMLError as e:
        from sync_tools.yamlhint import describe

        message, line = describe(e)
        raise ConfigError(message, path=path, line=line) from e


def _load(text: str, loader: type, path: Path) -> Any:
    """*text* through *loader*; a ConfigError from the line-tracking constructor gets *path*."""
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 - CSafeLoader/SafeLoader subclasses
    except ConfigError as e:
        raise ConfigError(str(e).split(": ", 1)[-1], path=path, line=e.line) from e


def _printable(text: str) -> str:
    return text if text.isprintable() else repr(text)


def _line(obj: Any, key: str) -> int | None:
    if isinstance(obj, _LineDict):
        return obj.lines.get(key, obj.start_line)
    return None


class _Section:
    """Typed reads from one mapping of a YAML file, each error naming file, dotted key and line."""

    def __init__(self, path: Path, data: Any, prefix: str, allowed: tuple[str, ...], line: int | None = None):
        self.path = path
        self.prefix = _printable(prefix)  # a key with a newline in it must not break the one-line error
        self.line = line  # where this section's key is written (its parent's line for it)
        if data is None:
            data = _LineDict()
            data.lines, data.start_line = {}, line or 1
        if not isinstance(data, dict):
            raise ConfigError("must be a mapping", path=path, key=prefix or None, line=line)
        self.data = data
        for key in data:
            if key not in allowed:
                raise ConfigError(
                    f"unknown key (expected one of: {', '.join(allowed)})",
                    path=path, key=self.key(key), line=_line(data, key),
                )

    def key(self, name: str) -> str:
        name = _printable(name)
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, message: str) -> ConfigError:
        return ConfigError(message, path=self.path, key=self.key(name), line=_line(self.data, name))

    def raw(self, name: str, default: Any = None) -> Any:
        return self.data.get(name, default)

    def str(self, name: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.data.get(name)
        if value is None:
            if required:
                raise self.error(name, "is required")
            return default
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise self.error(name, f"must be a string, not {type(value).__name__}")
        return _scalar_text(value)

    def bool(self, name: str, default: bool) -> bool:
        value = self.data.get(name, default)
        if not isinstance(value, bool):
            raise self.error(name, "must be true or false")
        return value

    def number(self, name: str, default: float, *, maximum: float) -> float:
        """A finite number from 0 to *maximum* (YAML's .inf and .nan are refused here, not later)."""
        value = self.data.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(name, "must be a non-negative number")
        if not 0 <= value <= maximum:  # false for nan too
            raise self.error(name, f"must be a number from 0 to {maximum:g}, not {_scalar_text(value)}")
        return float(value)

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str:
        value = self.str(name, default)
        if value not in choices:
            raise self.error(name, f"unknown value {value!r} (expected one of: {', '.join(choices)})")
        return value

    def str_list(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.data.get(name)
        if value is None:
            return default
        if isinstance(value, str):
            return (value,)
        if not isinstance(value, list) or not all(isinstance(v, str | int | float) and not isinstance(v, bool)
                                                 for v in value):
            raise self.error(name, "must be a list of strings")
        return tuple(_scalar_text(v) for v in value)

    def regex(self, name: str) -> re.Pattern[str] | None:
        value = self.str(name)
        if value is None:
            return None
        shown = f"'{value}'" if value.isprintable() else repr(value)  # as written, backslashes not doubled
        if any(ord(c) < 32 for c in value):  # "\b" in double quotes is a backspace, not a word boundary
            raise self.error(name, f"regex {shown} holds a control character: write it in 'single quotes'")
        try:
            return re.compile(value)
        except re.error as e:
            raise self.error(name, f"bad regex {shown}: {e}") from e

    def section(self, name: str, allowed: tuple[str, ...]) -> _Section:
        return _Section(self.path, self.data.get(name), self.key(name), allowed, line=_line(self.data, name))


# ------------------------------------------------------------------------------------------ classes
#
# Immutable records as typing.NamedTuple rather than frozen dataclasses: the same fields, defaults,
# methods and equality, made at import ~7x cheaper (0.2 ms a class against 1.5 ms for a frozen
# dataclass, which compiles six methods; measured). Every command imports these, and `check`'s
# whole run, start-up included, is benchmarked against `git ls-remote`. Copy with ``._replace``.


class PinSource(NamedTuple):
    """Where a subsystem's pin was read from, so a pin update can rewrite exactly that spot."""

    path: Path
    kind: str  # "sync-tools.yaml" | "manifest.yaml" | "taskfile"
    key: str  # the YAML key path ("subsystems.nats.current") or Taskfile var name ("NATS_VERSION")
    line: int | None = None


class Subsystem(NamedTuple):
    name: str
    upstream: str
    strategy: str = "tags"
    branch: str | None = None
    include: re.Pattern[str] | None = None
    exclude: re.Pattern[str] | None = None
    prereleases: bool = False
    major: str = "manual"
    current: str | None = None
    binary: str = ""
    build: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    process: str = ""
    health: str | None = None
    depends_on: tuple[str, ...] = ()
    pin: PinSource | None = None
    # the Taskfile var the build reads its version from (NATS_VERSION, LB_VERSION, ...), when known
    version_var: str | None = None
    # that var's spot when it repeats the pin: moved with it, so `task X:ensure` builds the same version
    version_pin: PinSource | None = None
    # where the binary lives inside <name>/.bin (``bin/grafana-server``); empty: ``binary`` itself
    bin_path: str = ""
    line: int | None = None  # where the subsystem's section starts in its config file
    rollout: Any = None  # sync_tools.rollout.RolloutPolicy: the staged rollout release writes into the manifest

    def require_upstream(self, config_path: Path) -> None:
        """ConfigError unless an upstream is set: an agent-only config may leave it out, but check,
        plan and build need it."""
        if not self.upstream:
            raise ConfigError("is required (check, plan and build need it; only an agent-only config may "
                              "leave it out)", path=config_path, key=f"subsystems.{self.name}.upstream",
                              line=self.line)

    def bin_dir(self, root: Path) -> Path:
        """The directory the binary is in, with its ``.version`` and ``.previous/``: ``<name>/.bin``,
        or the subfolder of it that ``bin_path`` names (``grafana/.bin/bin``)."""
        base = root / self.name / ".bin"
        sub, _, _ = self.bin_path.rpartition("/")
        return base / sub if sub else base

    def binary_path(self, root: Path) -> Path:
        return self.bin_dir(root) / self.binary


class ReleaseConfig(NamedTuple):
    repo: str | None = None
    store: str | None = None
    tag: str = "latest"
    public_key: str | None = None
    expires_days: float = 30.0
    patches: int = 3  # binary patches per replaced asset, from that many earlier builds (0: none)

    @property
    def backend(self) -> str:
        """``local`` when a store directory is set or no GitHub repo is; ``github`` otherwise."""
        if self.store or not self.repo:
            return "local"
        return "github"

    def store_path(self, root: Path) -> Path:
        return (root / (self.store or ".releases")).resolve()


class AgentTarget(NamedTuple):
    url: str
    secret_env: str


class NatsConfig(NamedTuple):
    """``relay.nats`` / ``agent.nats`` (docs/nats.md). Secrets are files or environment variables, never inline."""

    servers: tuple[str, ...] = ()
    stream: str = "SYNC_RELEASES"
    creds: str | None = None  # a .creds file (user JWT + NKey seed); else $SYNC_TOOLS_NATS_CREDS
    nkey_seed: str | None = None  # a file holding an NKey seed
    token_env: str = "SYNC_TOOLS_NATS_TOKEN"
    tls_ca: str | None = None
    domain: str | None = None  # the hub's JetStream domain, when the local leaf runs JetStream too
    catchup_seconds: float = 120.0  # agent: ask for the newest release this often besides each (re)connect
    tls_cert: str | None = None  # a client certificate (PEM) for servers that verify clients (mutual TLS)
    tls_key: str | None = None  # its private key (PEM, unencrypted); a file, like every NATS secret here


class RelayConfig(NamedTuple):
    dispatch: str = "github"
    agents: tuple[AgentTarget, ...] = ()
    max_body: int = 25 * 1024 * 1024
    max_attempts: int = 8
    nats: NatsConfig | None = None


class AgentConfig(NamedTuple):
    root: str = "."
    source: str | None = None
    relay: str | None = None
    reload: str = "none"
    socket: str | None = None
    url: str | None = None
    command: str | None = None
    listen: str | None = None
    secret_env: str = "SYNC_TOOLS_AGENT_SECRET"
    token_env: str = "SYNC_TOOLS_AGENT_TOKEN"
    public_key: str | None = None
    platform: str | None = None
    health_timeout: float = 30.0
    supervisor_url: str | None = None
    restart: str = "restart"  # process-compose: "restart", or "stop-start" (stop, wait until stopped, start)
    id: str | None = None  # this agent's name in reports and rollouts (None: the machine's hostname)
    settle_seconds: float = 10.0  # a new binary must stay healthy, not restarted, this long
    transport: str = "sse"  # sse (agent.relay) | nats (agent.nats) | push (agent.listen)
    nats: NatsConfig | None = None


class Config(NamedTuple):
    path: Path
    root: Path
    release: ReleaseConfig = ReleaseConfig()
    platforms: tuple[str, ...] = DEFAULT_PLATFORMS
    subsystems: Mapping[str, Subsystem] = MappingProxyType({})
    relay: RelayConfig = RelayConfig()
    agent: AgentConfig = AgentConfig()

    def subsystem(self, name: str) -> Subsystem:
        try:
            return self.subsystems[name]
        except KeyError:
            known = ", ".join(self.subsystems) or "none"
            raise ConfigError(f"unknown subsystem {name!r} (configured: {known})", path=self.path) from None

    def select(self, names: list[str] | tuple[str, ...] | None) -> list[Subsystem]:
        """The named subsystems (all when none are named), in config order; unknown names raise."""
        if not names:
            return list(self.subsystems.values())
        return [self.subsystem(n) for n in names]

    def resolve(self, value: str | None) -> Path | None:
        """A path from the config, relative to the workspace root."""
        if value is None:
            return None
        return (self.root / os.path.expanduser(value)).resolve()


# ------------------------------------------------------------------------------------------ loading

_TOP_KEYS = ("release", "platforms", "subsystems", "relay", "agent")
_RELEASE_KEYS = ("repo", "store", "tag", "public_key", "expires_days", "patches")
_SUB_KEYS = ("upstream", "strategy", "branch", "include", "exclude", "prereleases", "major", "current",
             "binary", "build", "paths", "process", "health", "depends_on", "description", "version_var",
             "rollout")
_RELAY_KEYS = ("dispatch", "agents", "max_body", "max_attempts", "nats")
_NATS_KEYS = ("servers", "stream", "creds", "nkey_seed", "token_env", "tls_ca", "tls_cert", "tls_key", "domain",
              "catchup_seconds")
_AGENT_KEYS = ("root", "source", "relay", "reload", "socket", "url", "command", "listen", "secret_env",
               "token_env", "public_key", "platform", "health_timeout", "supervisor_url", "restart", "id",
               "settle_seconds", "transport", "nats")


def _parse_subsystem(sec: _Section, name: str, pin: PinSource | None, *, root: Path | None = None,
                     upstream_required: bool = True) -> Subsystem:
    """One subsystem's section. With *root*, what the section leaves out is read from the platform's
    Taskfiles (:func:`_taskfile_defaults`): upstream, version var, binary and its path, health."""
    from sync_tools import taskfiles

    if not _NAME_RE.fullmatch(name):
        raise ConfigError("subsystem names are lower-case letters, digits, - and _", path=sec.path,
                          key=sec.prefix, line=sec.line or _line(sec.data, name))
    strategy = sec.choice("strategy", STRATEGIES, "tags")
    found = (_taskfile_defaults(root, name, sec.str("current"), sec.str("version_var"),
                                binary_set=sec.str("binary") is not None) if root else {})
    upstream = sec.str("upstream") or found.get("upstream")
    if upstream is None:
        if upstream_required:
            raise sec.error("upstream", "is required")
        upstream = ""  # an agent-only config: the signed manifest names the subsystems
    elif not upstream.strip():
        raise sec.error("upstream", "must not be empty")
    binary = sec.str("binary") or found.get("binary") or name
    bin_path = found.get("bin_path", "") if sec.str("binary") is None else ""
    if "/" in binary:  # a binary in a subfolder of .bin (bin/grafana-server)
        bin_path = taskfiles.check_subpath(binary, where=sec.path, key=sec.key("binary"))
        binary = bin_path.rsplit("/", 1)[-1]
    if not _BINARY_NAME.fullmatch(binary):
        # it names the release assets (<binary>-<os>-<arch>.tar.gz), which agents and stores check
        raise sec.error("binary", "must be a file name of letters, digits and ._+- that starts with a letter or digit")
    if bin_path == binary:
        bin_path = ""
    build = sec.str_list("build", (f"task {name}:src:update", f"task {name}:bin:build"))
    return Subsystem(
        name=name,
        upstream=upstream,
        strategy=strategy,
        branch=sec.str("branch"),
        include=sec.regex("include"),
        exclude=sec.regex("exclude"),
        prereleases=sec.bool("prereleases", False),
        major=sec.choice("major", MAJOR_POLICIES, "manual"),
        current=sec.str("current"),
        binary=binary,
        build=build,
        # build inputs, not runtime config (nats.conf, configs/*.yaml): a pin change is found apart
        paths=sec.str_list("paths", (f"{name}/Taskfile.yml", f"{name}/Taskfile.yaml")),
        process=sec.str("process", name) or name,
        health=sec.str("health") or found.get("health"),
        depends_on=sec.str_list("depends_on"),
        pin=pin,
        version_var=found.get("version_var") or sec.str("version_var"),
        version_pin=found.get("version_pin"),
        bin_path=bin_path,
        line=_line(sec.data, "upstream"),
        rollout=_rollout(sec) if sec.raw("rollout") is not None else None,
    )


def _rollout(sec: _Section) -> Any:
    from sync_tools.rollout import POLICY_KEYS, policy_from_config  # only configs with one pay for the import

    return policy_from_config(sec.section("rollout", POLICY_KEYS))


def _taskfile_defaults(root: Path, name: str, pin: str | None, explicit_var: str | None, *,
                       binary_set: bool = False) -> dict[str, Any]:
    """What ``<root>/<name>/Taskfile.yml`` says of the subsystem, by any var prefix: ``upstream``
    (``*_UPSTREAM_REPO``), ``binary`` (``*_BIN_NAME``), ``bin_path`` (from ``*_BIN_PATH``), ``health``
    (``task <name>:health`` when the root Taskfile includes a Taskfile with a ``health`` task),
    ``version_var`` (the var the build reads) and ``version_pin`` (that var's spot when it repeats
    *pin*, to be moved with it). Empty when there is no such Taskfile. With *binary_set* (config
    ``binary``) the Taskfile's binary vars are not read at all."""
    from sync_tools import taskfiles

    tf = taskfiles.subsystem_taskfile(root, name)
    if tf is None:
        return {}
    out: dict[str, Any] = {}
    up = taskfiles.upstream_var(tf)
    if up is not None:
        out["upstream"] = up.value
    if not binary_set:  # the config's binary wins: a Taskfile's path that cannot be read must not stop it
        bv = taskfiles.binary_var(tf)
        if bv is not None and bv.value:
            out["binary"] = bv.value
        sub_path = taskfiles.binary_subpath(tf, root / name, name)
        if sub_path:
            out["bin_path"] = sub_path
            out.setdefault("binary", sub_path.rsplit("/", 1)[-1])
    if "health" in tf.tasks:
        rt = taskfiles.root_taskfile(root)
        if rt is not None and name in rt.includes and rt.includes[name].resolve() == tf.path.resolve():
            out["health"] = f"task {name}:health"
    vv = taskfiles.version_var(tf, name, pin, explicit_var)
    if vv is not None:
        out["version_var"] = vv.name
        if pin and vv.value is not None and taskfiles._same_version(vv.value, pin):
            out["version_pin"] = PinSource(vv.path, "taskfile", vv.name, vv.line)
    return out


def _check_graph(path: Path, subs: dict[str, Subsystem], data: Any) -> None:
    """Every ``depends_on`` names a configured subsystem and there is no cycle (iterative: a chain of
    thousands of subsystems must not hit Python's recursion limit); no two subsystems share a binary
    name, which names their release assets (one's release would replace the other's)."""
    owner: dict[str, str] = {}
    for sub in subs.values():
        if sub.binary in owner:
            body = data.get(sub.name) if isinstance(data, dict) else None
            raise ConfigError(f"binary {sub.binary!r} is also {owner[sub.binary]}'s: their release assets "
                              "would have the same names", path=path, key=f"subsystems.{sub.name}.binary",
                              line=_line(body, "binary"))
        owner[sub.binary] = sub.name
    for sub in subs.values():
        for dep in sub.depends_on:
            if dep not in subs:
                body = data.get(sub.name) if isinstance(data, dict) else None
                raise ConfigError(f"depends on unknown subsystem {dep!r}", path=path,
                                  key=f"subsystems.{sub.name}.depends_on", line=_line(body, "depends_on"))
    # depth-first with colours: 1 on the current trail, 2 done
    state: dict[str, int] = {}
    for start in subs:
        if state.get(start):
            continue
        state[start] = 1
        trail = [start]
        stack = [iter(subs[start].depends_on)]
        while stack:
            d = next(stack[-1], None)
            if d is None:
                state[trail.pop()] = 2
                stack.pop()
                continue
            if state.get(d) == 2:
                continue
            if state.get(d) == 1:
                cycle = " -> ".join(trail[trail.index(d):] + [d])
                raise ConfigError(f"dependency cycle: {cycle}", path=path, key=f"subsystems.{d}.depends_on")
            state[d] = 1
            trail.append(d)
            stack.append(iter(subs[d].depends_on))


def _positive(sec: _Section, name: str, default: float, *, maximum: float) -> float:
    value = sec.number(name, default, maximum=maximum)
    if value <= 0:
        raise sec.error(name, "must be more than 0 (an expired manifest is refused by every agent)")
    return value


def parse_config(path: Path, data: Any) -> Config:
    """Build a Config from parsed sync-tools.yaml data (as :func:`load_yaml` returns it)."""
    top = _Section(path, data, "", _TOP_KEYS)
    release, platforms = _release(top), _platforms(top)

    subs_raw = top.raw("subsystems")
    root = path.parent.resolve()
    if subs_raw is None:
        subs_raw = _discovered(root)  # none listed: the root Taskfile's subsystems, if it declares any
    if not isinstance(subs_raw, dict):
        raise top.error("subsystems", "must be a mapping of name -> settings")
    subs: dict[str, Subsystem] = {}
    for name, body in subs_raw.items():
        sec = _Section(path, body, f"subsystems.{name}", _SUB_KEYS, line=_line(subs_raw, name))
        pin = PinSource(path, "sync-tools.yaml", f"subsystems.{name}.current", _line(body, "current"))
        subs[name] = _parse_subsystem(sec, name, pin, root=root, upstream_required=False)
    _check_graph(path, subs, subs_raw)

    rl = top.section("relay", _RELAY_KEYS)
    agents_raw = rl.raw("agents") or []
    if not isinstance(agents_raw, list):
        raise rl.error("agents", "must be a list of {url, secret_env}")
    agents = []
    for i, item in enumerate(agents_raw):
        a = _Section(path, item, f"relay.agents[{i}]", ("url", "secret_env"), line=_line(rl.data, "agents"))
        url = a.str("url", required=True)
        assert url is not None
        if not url.startswith(("http://", "https://")):
            raise a.error("url", f"must be an http(s) URL, not {url!r}")
        agents.append(AgentTarget(url=url, secret_env=a.str("secret_env", required=True) or ""))
    relay = RelayConfig(
        dispatch=rl.choice("dispatch", DISPATCHERS, "github"),
        agents=tuple(agents),
        max_body=int(rl.number("max_body", 25 * 1024 * 1024, maximum=MAX_BODY)),
        max_attempts=int(rl.number("max_attempts", 8, maximum=MAX_ATTEMPTS)),
        nats=_nats(rl.section("nats", _NATS_KEYS)),
    )

    ag = top.section("agent", _AGENT_KEYS)
    agent = AgentConfig(
        root=ag.str("root", ".") or ".",
        source=ag.str("source"),
        relay=ag.str("relay"),
        reload=ag.choice("reload", RELOADERS, "none"),
        socket=ag.str("socket"),
        url=ag.str("url"),
        command=ag.str("command"),
        listen=ag.str("listen"),
        secret_env=ag.str("secret_env", "SYNC_TOOLS_AGENT_SECRET") or "SYNC_TOOLS_AGENT_SECRET",
        token_env=ag.str("token_env", "SYNC_TOOLS_AGENT_TOKEN") or "SYNC_TOOLS_AGENT_TOKEN",
        public_key=ag.str("public_key", release.public_key),
        platform=ag.str("platform"),
        health_timeout=ag.number("health_timeout", 30.0, maximum=MAX_HEALTH_TIMEOUT),
        supervisor_url=ag.str("supervisor_url"),
        restart=ag.choice("restart", ("restart", "stop-start"), "restart"),
        id=ag.str("id"),
        settle_seconds=ag.number("settle_seconds", 10.0, maximum=MAX_HEALTH_TIMEOUT),
        transport=ag.choice("transport", ("sse", "nats", "push"), "sse"),
        nats=_nats(ag.section("nats", _NATS_KEYS)),
    )
    if agent.transport == "nats" and agent.nats is None:
        raise ag.error("transport", "is 'nats' but agent.nats (servers) is not set")
    if agent.platform and not _PLATFORM_RE.fullmatch(agent.platform):
        raise ag.error("platform", f"bad platform {agent.platform!r} (expected os/arch)")
    if agent.id is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}", agent.id):
        raise ag.error("id", "must be 1-128 letters, digits and ._@:- (starting with a letter or digit)")
    if agent.reload == "command" and not agent.command:
        raise ag.error("command", "is required when reload is 'command'")
    return Config(
        path=path,
        root=root,
        release=release,
        platforms=platforms,
        subsystems=MappingProxyType(subs),
        relay=relay,
        agent=agent,
    )


def _release(top: _Section) -> ReleaseConfig:
    rel = top.section("release", _RELEASE_KEYS)
    release = ReleaseConfig(
        repo=rel.str("repo"),
        store=rel.str("store"),
        tag=rel.str("tag", "latest") or "latest",
        public_key=rel.str("public_key"),
        expires_days=_positive(rel, "expires_days", 30.0, maximum=MAX_EXPIRES_DAYS),
        patches=int(rel.number("patches", 3, maximum=16)),
    )
    if release.repo and not _REPO_RE.fullmatch(release.repo):
        raise rel.error("repo", f"must be owner/name, not {release.repo!r}")
    return release


def _platforms(top: _Section) -> tuple[str, ...]:
    platforms = top.str_list("platforms", DEFAULT_PLATFORMS)
    for p in platforms:
        if not _PLATFORM_RE.fullmatch(p):
            raise top.error("platforms", f"bad platform {p!r} (expected os/arch, e.g. linux/amd64)")
    return platforms


def _nats(sec: _Section) -> NatsConfig | None:
    if not sec.data:
        return None
    servers = sec.str_list("servers")
    for n, url in enumerate(servers):
        scheme, _, rest = url.partition("://")
        if "@" in url:  # user:password@ or token@, wherever it ends: the error must not show it
            raise sec.error("servers", f"server {n + 1} has credentials in it (not shown here): a nats:// or "
                            "tls:// URL without credentials in it (they come from creds, nkey_seed or the token_env variable)")
        if scheme not in ("nats", "tls") or not rest:
            raise sec.error("servers", f"{url!r}: a nats:// or tls:// URL without credentials in it "
                            "(they come from creds, nkey_seed or the token_env variable)")
    if not servers:
        raise sec.error("servers", "is required")
    stream, domain = sec.str("stream", "SYNC_RELEASES") or "", sec.str("domain")
    for key, value in (("stream", stream), ("domain", domain or "x")):
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
            raise sec.error(key, f"must be 1-64 letters, digits, _ or -, not {value!r}")
    cert, key = sec.str("tls_cert") or None, sec.str("tls_key") or None  # an empty value is no file
    if (cert is None) != (key is None):
        raise sec.error("tls_cert" if cert is None else "tls_key",
                        "is required with " + ("tls_key" if cert is None else "tls_cert") +
                        " (a client certificate and its key go together)")
    return NatsConfig(servers, stream, sec.str("creds"), sec.str("nkey_seed"),
                      sec.str("token_env", "SYNC_TOOLS_NATS_TOKEN") or "SYNC_TOOLS_NATS_TOKEN", sec.str("tls_ca"),
                      domain, sec.number("catchup_seconds", 120.0, maximum=86400.0), tls_cert=cert, tls_key=key)


# ------------------------------------------------------------------- plat-telemetry's existing files

_DEFAULT_TMPL = re.compile(r"""default\s+(?:"([^"]*)"|'([^']*)'|([^\s}|]+))""")


def _taskfile_value(raw: Any) -> str | None:
    """A Taskfile var's literal value, reading through ``{{.X | default "v1"}}`` templates."""
    if isinstance(raw, dict):  # `sh:` vars and the like cannot be read without running task
        return None
    if raw is None or isinstance(raw, bool):
        return None
    value = _scalar_text(raw)
    if "{{" in value:
        m = _DEFAULT_TMPL.search(value)
        if not m:
            return None
        return next(g for g in m.groups() if g is not None)
    return value


def _taskfile_vars(path: Path) -> dict[str, tuple[str, int | None]]:
    if not path.is_file():
        return {}
    data = load_yaml(path)
    if not isinstance(data, dict) or not isinstance(data.get("vars"), dict):
        return {}
    out: dict[str, tuple[str, int | None]] = {}
    for k, v in data["vars"].items():
        value = _taskfile_value(v)
        if value is not None:
            out[k] = (value, _line(data["vars"], k))
    return out


def _discovered(root: Path) -> _LineDict:
    """Subsystems the root Taskfile declares (:func:`sync_tools.taskfiles.discover`), as empty
    sections for :func:`_parse_subsystem` to fill from their Taskfiles."""
    from sync_tools import taskfiles

    out = _LineDict()
    out.lines, out.start_line = {}, 1
    for name in taskfiles.discover(root):
        body = _LineDict()
        body.lines, body.start_line = {}, 1
        out[name] = body
    return out


def load_plat_telemetry(root: Path) -> Config:
    """Read plat-telemetry's ``manifest.yaml`` and its Taskfiles into a Config (no sync-tools.yaml).

    The manifest's subsystems come first, then any more the root Taskfile declares
    (``SUBSYSTEMS_RELEASE``, or includes whose Taskfile names an upstream). A subsystem's pin is the
    manifest's ``version`` (or ``current``), else its Taskfile's version var; a ``branch`` without a
    version pins that branch. Upstream, binary and version var are read from the Taskfile by any
    prefix where the manifest leaves them out; where both say, the manifest wins. ``release`` and
    ``platforms`` are read as in sync-tools.yaml; ``relay`` and ``agent`` belong in a sync-tools.yaml.
    """
    from sync_tools import taskfiles

    manifest_path = root / "manifest.yaml"
    data = load_yaml(manifest_path)
    top = _Section(manifest_path, data, "", ("subsystems", "release", "platforms", "version", "description"))
    release, platforms = _release(top), _platforms(top)  # as sync-tools.yaml has them
    subs_raw = top.raw("subsystems")
    if subs_raw is None:  # no key, or `subsystems:` with nothing under it: the root Taskfile's only
        subs_raw = _LineDict()
        subs_raw.lines, subs_raw.start_line = {}, _line(data, "subsystems") or 1
    if not isinstance(subs_raw, dict):
        raise top.error("subsystems", "must be a mapping of name -> {version, upstream}")
    names = list(subs_raw) + [n for n in taskfiles.discover(root) if n not in subs_raw]
    subs: dict[str, Subsystem] = {}
    for name in names:
        body = subs_raw.get(name)
        line = _line(subs_raw, name)
        sec = _Section(manifest_path, body, f"subsystems.{name}", _SUB_KEYS + ("version",), line=line)
        tf = taskfiles.subsystem_taskfile(root, name)
        pin: PinSource | None = None
        version = sec.str("version") or sec.str("current")
        key = "version" if sec.str("version") is not None else "current"
        if version is not None:
            pin = PinSource(manifest_path, "manifest.yaml", f"subsystems.{name}.{key}", _line(body, key))
        elif sec.str("branch") is None:
            vv = taskfiles.version_var(tf, name, None, sec.str("version_var"))
            if vv is not None and vv.value is not None:
                version = vv.value
                pin = PinSource(vv.path, "taskfile", vv.name, vv.line)
        merged = _LineDict({k: v for k, v in (body or {}).items() if k not in ("version", "description")})
        merged.lines = dict(getattr(body, "lines", {}))
        merged.start_line = getattr(body, "start_line", line or 1)
        explicit = sec.str("strategy")
        merged["strategy"] = explicit or ("commits" if version is None and sec.str("branch") else "tags")
        if version is not None:
            merged["current"] = version
        if not sec.str("upstream") and not taskfiles.upstream_var(tf):
            prefix = re.sub(r"[^A-Z0-9]", "_", name.upper())
            raise ConfigError(f"no upstream: set subsystems.{name}.upstream or a {prefix}_UPSTREAM_REPO var "
                              f"(any prefix) in {name}/Taskfile.yml", path=manifest_path, key=f"subsystems.{name}", line=line)
        sub = _parse_subsystem(_Section(manifest_path, merged, f"subsystems.{name}", _SUB_KEYS, line=line),
                               name, pin, root=root)
        if pin is not None and pin.kind == "taskfile":
            sub = sub._replace(version_pin=None)  # the Taskfile var is the pin itself
        subs[name] = sub
    _check_graph(manifest_path, subs, subs_raw)
    return Config(path=manifest_path, root=root.resolve(), release=release, platforms=platforms,
                  subsystems=MappingProxyType(subs))


def find_config_path(explicit: str | os.PathLike[str] | None = None, cwd: Path | None = None) -> Path:
    """The config file to read: --config, then $SYNC_TOOLS_CONFIG, then ./sync-tools.yaml, then
    ./manifest.yaml (plat-telemetry's own). Raises ConfigError when there is none."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env)
    here = cwd or Path.cwd()
    for name in (CONFIG_NAME, "manifest.yaml"):
        if (here / name).is_file():
            return here / name
    raise ConfigError(f"no {CONFIG_NAME} (or plat-telemetry manifest.yaml) here; pass --config FILE",
                      path=here / CONFIG_NAME)


def load_config(path: str | os.PathLike[str] | None = None, cwd: Path | None = None) -> Config:
    """Load and validate the workspace configuration. Raises ConfigError."""
    p = find_config_path(path, cwd)
    if p.name == "manifest.yaml":
        return load_plat_telemetry(p.parent)
    return parse_config(p, load_yaml(p))
