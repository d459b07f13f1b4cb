"""``python -m sync_tools`` and the ``sync-tools`` console script (``pyproject.toml`` points here).

This module imports nothing itself, so the garbage collector can be paused before click and the
command's module are imported: those imports make a few hundred thousand objects and no garbage,
and collecting on the way cost ~10 ms of a ~250 ms ``sync-tools check`` (measured). The CLI starts
the collector again, its import-time objects frozen, before the command runs
(:func:`sync_tools.cli.resume_collector`).
"""

import gc


def main() -> None:
    gc.disable()
    from sync_tools.cli import main as run

    run(collector_paused=True)


if __name__ == "__main__":
    main()
