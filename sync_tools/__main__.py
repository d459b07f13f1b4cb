"""``python -m sync_tools`` and the ``sync-tools`` console script (``pyproject.toml`` points here).

This module imports nothing itself, so the garbage collector can be paused before click and the
command's module are imported: those imports make a few hundred thousand objects and no garbage,
and collecting on the way cost ~10 ms of a ~250 ms ``sync-tools check`` (measured). The CLI starts
the collector again, its import-time objects frozen, before the command runs
(:func:`sync_tools.cli.resume_collector`). For ``check``, a helper process that lists the remotes is
forked first, while this process is still one small thread (:mod:`sync_tools.sources.lister`).
"""

import gc
import sys


def main() -> None:
    gc.disable()
    if "check" in sys.argv:
        from sync_tools.sources import lister

        if lister.wanted(sys.argv[1:]):
            lister.start()  # lists the remotes on the second core while this process starts
    from sync_tools.cli import main as run

    run(collector_paused=True)


if __name__ == "__main__":
    main()
