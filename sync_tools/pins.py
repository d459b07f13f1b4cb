"""Pin updates that change one line and nothing else.

A subsystem's pin lives where the config read it (:class:`~sync_tools.config.PinSource`):
``sync-tools.yaml`` (``subsystems.X.current``), plat-telemetry's ``manifest.yaml``
(``subsystems.X.version``) or a Taskfile var (``NATS_VERSION: v2.10.24`` or the template form
``'{{.NATS_VERSION | default "v2.10.24"}}'``). :func:`update_pin` edits the value on that exact line,
keeping its quoting, comment, indentation and line ending, and every other byte of the file; the YAML
is never re-dumped. The result is parsed again before it replaces the file.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
import re
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sync_tools.config import PinSource, _taskfile_value, load_yaml
from sync_tools.errors import ConfigError
from sync_tools.fsutil import atomic_write_bytes

log = logging.getLogger(__name__)

_SAFE_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+/@-]*$")
# the default's quotes are escaped (\") when the whole template is in double quotes
_DEFAULT_ARG = re.compile(r"""(default\s+)(?:\\"([^"\\]*)\\"|"([^"]*)"|'([^']*)'|([^\s}|"'\\]+))""")


@dataclass(frozen=True)
class _Scalar:
    """A scalar value on one line: ``prefix`` + quote + ``content`` + quote + ``suffix``."""

    prefix: str
    quote: str  # '"', "'" or "" (plain)
    content: str
    suffix: str  # trailing spaces, comment, line ending

    def render(self, content: str) -> str:
        return f"{self.prefix}{self.quote}{content}{self.quote}{self.suffix}"


def _split_scalar(line: str, key: str, where: str) -> _Scalar:
    m = re.match(r"^(\s*(?:" + re.escape(key) + r"|\"" + re.escape(key) + r"\"|'" + re.escape(key)
                 + r"')\s*:[ \t]*)(.*?)(\r?\n)?$", line, re.S)
    if not m:
        raise ConfigError(f"expected '{key}: <value>' on this line, found {line.rstrip()!r}", path=where)
    prefix, rest, eol = m.group(1), m.group(2), m.group(3) or ""
    if rest.startswith('"'):
        i = 1
        while i < len(rest):
            if rest[i] == "\\":
                i += 2
                continue
            if rest[i] == '"':
                return _Scalar(prefix, '"', rest[1:i], rest[i + 1:] + eol)
            i += 1
        raise ConfigError(f"{key}: unterminated double-quoted value", path=where)
    if rest.startswith("'"):
        i = 1
        while i < len(rest):
            if rest[i] == "'":
                if rest[i + 1:i + 2] == "'":
                    i += 2
                    continue
                return _Scalar(prefix, "'", rest[1:i], rest[i + 1:] + eol)
            i += 1
        raise ConfigError(f"{key}: unterminated single-quoted value", path=where)
    cm = re.search(r"\s#", rest)
    value = rest[:cm.start()] if cm else rest
    value_stripped = value.rstrip()
    if not value_stripped or value_stripped[0] in "|>{[&*!":
        raise ConfigError(f"{key}: the value is not a plain one-line scalar; edit it by hand", path=where)
    return _Scalar(prefix, "", value_stripped, rest[len(value_stripped):] + eol)


def _plain_ok(value: str) -> bool:
    """Whether *value* reads back as the same string when written unquoted."""
    try:
        return yaml.safe_load(f"k: {value}") == {"k": value}
    except yaml.YAMLError:
        return False


def _walk(data: Any, parts: list[str], where: str) -> Any:
    node = data
    for part in parts:
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"no {'.'.join(parts)} to update", path=where)
        node = node[part]
    return node


def _new_content(scalar: _Scalar, value: str, taskfile: bool, where: str) -> str:
    if taskfile and "{{" in scalar.content:
        m = _DEFAULT_ARG.search(scalar.content)
        if not m:
            raise ConfigError("the Taskfile var is a template without a 'default' to update", path=where)
        g = next(i for i in (2, 3, 4, 5) if m.group(i) is not None)
        return scalar.content[:m.start(g)] + value + scalar.content[m.end(g):]
    return value


def update_pin(pin: PinSource, value: str) -> bool:
    """Set the pin at *pin* to *value*, changing only that value's characters in the file.

    Returns False when the pin already is *value* (the file is not touched). A ``sync-tools.yaml`` or
    ``manifest.yaml`` subsystem without the key gets one new line (indented like its siblings) right
    under the subsystem's name. Raises ConfigError when the value is not a plain version/commit string,
    the spot cannot be found or is not a one-line scalar, or the edited file would not read back.
    """
    _check_value(pin, value)
    with _exclusive(Path(pin.path)):
        return _update_pin(pin, value)


def check_update(pin: PinSource, value: str) -> None:
    """Raise the ConfigError :func:`update_pin` would raise for *value* at *pin*, writing nothing: a
    build that moves two pins checks both before it writes either."""
    _check_value(pin, value)
    _edit(pin, value)


def _check_value(pin: PinSource, value: str) -> None:
    if not _SAFE_VALUE.match(value):
        raise ConfigError(f"refusing to write pin {value!r}: letters, digits and ._+/@- only", path=pin.path)


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file now at *path* while it is read, edited and replaced:
    builds of two subsystems whose pins share a file (sync-tools.yaml, a root Taskfile) each
    change their own line, and neither loses the other's. The replace makes a new file, so a waiter
    that wakes up holding the old one tries again."""
    while True:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as e:
            raise ConfigError("file not found", path=path) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                yield
                return
        finally:
            os.close(fd)


def _update_pin(pin: PinSource, value: str) -> bool:
    edited = _edit(pin, value)
    if edited is None:
        return False
    new_text, lineno = edited
    path = Path(pin.path)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    atomic_write_bytes(path, new_text.encode("utf-8"), mode=mode)
    log.info("pin %s in %s:%d is now %s", pin.key, path, lineno, value)
    return True


def _edit(pin: PinSource, value: str) -> tuple[str, int] | None:
    """The file at *pin* with the pin set to *value*, and the line it is on; None when it already is."""
    path = Path(pin.path)
    where = str(path)
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("not UTF-8 text", path=path) from e
    lines = text.splitlines(keepends=True)
    data = load_yaml(path)
    taskfile = pin.kind == "taskfile"
    if taskfile:
        parent_path, key = ["vars"], pin.key
    else:
        *parent_path, key = pin.key.split(".")
    parent = _walk(data, parent_path, where)
    if not isinstance(parent, dict):
        raise ConfigError(f"{'.'.join(parent_path)} is not a mapping", path=path)

    if key in parent:
        lineno = parent.lines[key]
        scalar = _split_scalar(lines[lineno - 1], key, where)
        content = _new_content(scalar, value, taskfile, where)
        if content == scalar.content:
            return None
        if scalar.quote == "" and not _plain_ok(content):
            # e.g. an all-digit commit, which YAML would read as a number: quote it (the only
            # characters that change besides the value itself).
            scalar = dataclasses.replace(scalar, quote='"')
        lines[lineno - 1] = scalar.render(content)
    else:
        if taskfile or not parent:
            raise ConfigError(f"no {pin.key} to update", path=path)
        grand = _walk(data, parent_path[:-1], where)
        parent_line = grand.lines[parent_path[-1]]
        first_child_line = min(parent.lines.values())
        if first_child_line == parent_line:
            raise ConfigError(f"{'.'.join(parent_path)} is a flow mapping; add {key}: by hand", path=path)
        sibling = lines[first_child_line - 1]
        indent = sibling[: len(sibling) - len(sibling.lstrip())]
        eol = "\r\n" if sibling.endswith("\r\n") else "\n"
        if not _plain_ok(value):
            value_text = f'"{value}"'
        else:
            value_text = value
        lines.insert(parent_line, f"{indent}{key}: {value_text}{eol}")
        lineno = parent_line + 1

    new_text = "".join(lines)
    _check_reads_back(new_text, parent_path, key, value, taskfile, where)
    return new_text, lineno


def is_template(pin: PinSource) -> bool:
    """Whether a Taskfile pin is the ``{{.X | default "v"}}`` form, which an environment variable of
    the same name overrides when go-task runs (a plain var wins over the environment)."""
    if pin.kind != "taskfile":
        return False
    data = load_yaml(Path(pin.path))
    raw = data.get("vars", {}).get(pin.key) if isinstance(data, dict) and isinstance(data.get("vars"), dict) else None
    return isinstance(raw, str) and "{{" in raw


def _check_reads_back(text: str, parent_path: list[str], key: str, value: str, taskfile: bool,
                      where: str) -> None:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        # one line: the parser's message spans several
        raise ConfigError(f"the edited file would not parse ({' '.join(str(e).split())}); left unchanged",
                          path=where) from e
    got = _walk(data, parent_path + [key], where)
    if taskfile:
        got = _taskfile_value(got)
    if str(got) != value:
        raise ConfigError(f"the edited pin would read back as {got!r}, not {value!r}; left unchanged", path=where)
