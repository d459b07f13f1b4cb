"""``sync-tools check``: pinned versus newest upstream version per subsystem."""

from __future__ import annotations

import click

from sync_tools.check import VERSION_MANIFEST, write_version_manifest
from sync_tools.check import check as run_check
from sync_tools.cli._common import config_option, echo_json, json_option, load
from sync_tools.sources import Sources, lister
from sync_tools.sources.remote import RefCache

EXIT_UPDATE = 10
MIN_TIMEOUT, MAX_TIMEOUT = 0.1, 3600.0


def _finite(value: float) -> float:
    """click's FloatRange lets nan through (every comparison with it is false)."""
    if value != value:  # nan
        raise click.BadParameter(f"{value} is not a number of seconds ({MIN_TIMEOUT:g} to {MAX_TIMEOUT:g})")
    return value


@click.command("check")
@click.argument("names", nargs=-1, metavar="[NAME...]")
@json_option
@click.option("--exit-code", "exit_code", is_flag=True,
              help=f"Exit {EXIT_UPDATE} when any update is available, even if another subsystem failed "
                   "(its error is still printed); else 1 on an error, 0 when all are up to date.")
@click.option("--timeout", type=click.FloatRange(min=MIN_TIMEOUT, max=MAX_TIMEOUT), default=30.0,
              show_default=True, callback=lambda ctx, param, value: _finite(value),
              help=f"Seconds each network call may take ({MIN_TIMEOUT:g} to {MAX_TIMEOUT:g}).")
@config_option
def check(names: tuple[str, ...], as_json: bool, exit_code: bool, timeout: float, config_path: str | None) -> None:
    """Newest upstream version per subsystem, next to the pinned one.

    Asks every upstream at once (each remote once), prints a table or --json, and records the answer in
    .version-manifest.json. Exit 1 when any upstream failed (the others are still reported).

    \b
    Example:
      sync-tools check                      # all subsystems, a table
      sync-tools check nats --json          # {"nats": {"current": "v2.10.24", "latest": "v2.10.25", ...}}
      sync-tools check --exit-code || ...   # exit 10 when something is out of date
    """
    config = load(config_path)
    refs = RefCache(timeout=timeout, helper=lister.take())  # the helper sync_tools.__main__ started, if any
    report = run_check(config, names, sources=Sources(timeout=timeout, refs=refs))
    try:
        write_version_manifest(config.root / VERSION_MANIFEST, report)
    except OSError as e:
        raise click.ClickException(f"{config.root / VERSION_MANIFEST}: cannot write: {e}") from e
    if as_json:
        echo_json(report.to_json())
    else:
        _print_table(report)
    for r in report.errors:
        click.echo(f"Error: {r.name}: {r.error}", err=True)
    # with --exit-code an update wins over another subsystem's failure (still printed above): a
    # scheduled job must not miss nats' update because liftbridge's upstream was unreachable
    if exit_code and report.updates:
        raise SystemExit(EXIT_UPDATE)
    if report.errors:
        raise SystemExit(1)


def _short(value: str | None, strategy: str) -> str:
    if value is None:
        return "-"
    return value[:12] if strategy == "commits" or _is_sha(value) else value


def _is_sha(value: str) -> bool:
    return len(value) == 40 and all(c in "0123456789abcdef" for c in value)


def _print_table(report) -> None:  # type: ignore[no-untyped-def]
    rows = [("SUBSYSTEM", "CURRENT", "LATEST", "STATUS")]
    for r in report.results:
        if r.error:
            status = "error"
        elif r.update_available:
            status = "update available"
        else:
            status = "up to date"
        if r.major_available:
            status += f" (major {r.major_available} held back)"
        current = _short(r.current, r.strategy)
        if r.branch is not None:  # `main @ 1a2b3c4d5e6f`: the branch and the installed commit
            current = f"{r.current or r.branch} @ {r.current_commit[:12] if r.current_commit else 'nothing installed'}"
        rows.append((r.name, current, _short(r.latest, r.strategy), status))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        click.echo("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3])
