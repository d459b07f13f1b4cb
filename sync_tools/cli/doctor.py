"""``sync-tools doctor``: what a workspace being adopted needs, one line per finding with its fix."""

from __future__ import annotations

import click

from sync_tools.cli._common import config_option, echo_json, json_option, load
from sync_tools.errors import ConfigError


def _finite(value: float) -> float:
    if value != value:  # nan: click's FloatRange lets it through (every comparison with it is false)
        raise click.BadParameter(f"{value} is not a number of seconds")
    return value


@click.command("doctor")
@json_option
@click.option("--offline", is_flag=True, help="Do not list the upstreams (pins are not checked against them).")
@click.option("--timeout", type=click.FloatRange(min=0.1, max=3600.0), default=30.0, show_default=True,
              callback=lambda ctx, param, value: _finite(value), help="Seconds each upstream listing may take.")
@config_option
def doctor(as_json: bool, offline: bool, timeout: float, config_path: str | None) -> None:
    """Check a workspace being adopted: one line per finding, with its fix.

    Pins against their upstreams, upstream disagreements between the config and the Taskfiles,
    version vars, build and health tasks, status: guards, installed binaries and their .version,
    process-compose process names and port clashes, .gitignore. Exit 1 when any finding is an error.

    \b
    Example:
      sync-tools doctor                     # error  liftbridge  pin v1.10.0 is not a tag upstream ...
      sync-tools doctor --offline --json    # {"findings": [...], "errors": 1, "warnings": 4}
    """
    from sync_tools.doctor import Finding, Report, diagnose
    from sync_tools.sources import Sources
    from sync_tools.sources.remote import RefCache

    try:
        config = load(config_path)
    except ConfigError as e:  # the config itself is the first finding of a workspace being adopted
        report = Report((Finding("error", None, "config", str(e), "fix the file and key it names"),))
    else:
        sources = None if offline else Sources(timeout=timeout, refs=RefCache(timeout=timeout))
        report = diagnose(config, offline=offline, sources=sources)
    if as_json:
        echo_json(report.to_json())
    else:
        for line in report.lines():
            click.echo(line)
        click.echo(f"{report.errors} error(s), {report.warnings} warning(s)", err=True)
    if report.errors:
        raise SystemExit(1)
