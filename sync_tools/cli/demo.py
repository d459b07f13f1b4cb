"""``sync-tools demo``."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--keep", is_flag=True, help="Leave the temporary directory (its path is printed).")
@click.option("--dir", "workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Run in this directory instead of a new temporary one (kept afterwards).")
def demo(keep: bool, workdir: Path | None) -> None:
    """The whole loop on loopback: an upstream release becomes exactly one rebuilt, released,
    downloaded and reloaded service, on two agents, while the other service is left alone.

    Runs the relay, two agents and their supervisords as real processes in a temporary directory,
    and stops every one of them on exit or Ctrl-C. Exits 0 only if every check held.

    \b
    Example:
      sync-tools demo
      sync-tools demo --keep      # then look around the printed workdir
    """
    from sync_tools.demo.run import run_demo

    try:
        result = run_demo(keep=keep, workdir=workdir, say=click.echo)
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; every process the demo started was stopped") from None
    if keep or workdir:
        click.echo(f"kept: {result.workdir}")
    if not result.ok:
        failed = [c for c, ok, _ in result.checks if not ok]
        raise click.ClickException(f"demo checks failed: {'; '.join(failed)}")
    click.echo("demo: every check held")
