"""Options and helpers every command shares."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from sync_tools.config import CONFIG_ENV, Config, load_config

F = TypeVar("F", bound=Callable[..., Any])


def config_option(f: F) -> F:
    """``--config FILE`` (env SYNC_TOOLS_CONFIG; default ./sync-tools.yaml, then ./manifest.yaml)."""
    return click.option(
        "--config", "config_path", envvar=CONFIG_ENV, type=click.Path(dir_okay=False),
        help="Config file (default ./sync-tools.yaml; env SYNC_TOOLS_CONFIG).",
    )(f)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(f)


def load(config_path: str | None) -> Config:
    """Load the config; ConfigError becomes one line on stderr and exit 1 (via the group)."""
    return load_config(config_path)


def echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True))


def split_names(values: tuple[str, ...] | list[str]) -> list[str]:
    """``--only a,b --only c`` -> [a, b, c], order kept, duplicates dropped."""
    out: list[str] = []
    for v in values:
        for name in v.split(","):
            name = name.strip()
            if name and name not in out:
                out.append(name)
    return out


def is_tty() -> bool:
    return sys.stderr.isatty()
