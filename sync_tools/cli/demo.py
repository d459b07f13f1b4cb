"""``sync-tools demo``."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--keep", is_flag=True, help="Leave the temporary directory (its path is printed).")
@click.option("--dir", "workdir", type=click.Path(file_okay=False, path_type=Path),
              help="Run in this directory instead of a new temporary one (kept afterwards).")
@click.option("--fleet", is_flag=True, help="Four agents and a rollout policy instead: a good build goes out "
              "wave by wave, then a build that crashes is halted after the first wave.")
def demo(keep: bool, workdir: Path | None, fleet: bool) -> None:
    """The whole loop on loopback: an upstream release becomes exactly one rebuilt, released,
    downloaded and reloaded service, on two agents, while the other service is left alone.

    Runs the relay, two agents and their supervisords as real processes in a temporary directory,
    and stops every one of them on exit or Ctrl-C. Exits 0 only if every check held.

    With --fleet: four agents, and nats released with a rollout policy (waves 25/50/100 %). A good
    version goes out wave by wave; then a version that passes its health check and crashes a second
    later reaches only the first wave, which rolls back, and the relay halts the rollout by itself.

    \b
    Example:
      sync-tools demo
      sync-tools demo --keep      # then look around the printed workdir
      sync-tools demo --fleet     # a staged rollout and a halt
    """
    if fleet:
        from sync_tools.demo.fleet import run_fleet_demo as run
    else:
        from sync_tools.demo.run import run_demo as run

    try:
        result = run(keep=keep, workdir=workdir, say=click.echo)
    except KeyboardInterrupt:
        raise click.ClickException("interrupted; every process the demo started was stopped") from None
    if keep or workdir:
        click.echo(f"kept: {result.workdir}")
    if not result.ok:
        failed = [c for c, ok, _ in result.checks if not ok]
        raise click.ClickException(f"demo checks failed: {'; '.join(failed)}")
    click.echo("demo: every check held")
