"""The ``sync-tools`` console script.

Commands live in one module per area and are imported only when invoked (``LazyGroup``), so a
``sync-tools check`` does not pay for Flask, PyGithub or cryptography at start-up.
"""

from __future__ import annotations

import atexit
import errno
import gc
import importlib
import logging
import os
import sys

import click

from sync_tools import __version__, errtext
from sync_tools.errors import SyncToolsError

# command name -> ("module:attribute", one-line help); each module owns its area's commands. The help
# line is here so `sync-tools --help` lists commands without importing them.
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("sync_tools.cli.check:check", "Pinned vs newest upstream version per subsystem."),
    "plan": ("sync_tools.cli.pipeline:plan", "The GitHub Actions matrix of what to build."),
    "build": ("sync_tools.cli.pipeline:build", "Run a subsystem's build commands; write .bin/.version."),
    "package": ("sync_tools.cli.pipeline:package", "Reproducible .dist/<binary>-<os>-<arch>.tar.gz."),
    "release": ("sync_tools.cli.pipeline:release", "Upload only NAME's assets; re-sign manifest.json."),
    "verify": ("sync_tools.cli.pipeline:verify", "Check every installed binary against its .version."),
    "keys": ("sync_tools.cli.pipeline:keys", "Release signing keys (ed25519)."),
    "notify": ("sync_tools.cli.notify:notify", "Tell the relay the release changed (signed POST /notify)."),
    "relay": ("sync_tools.cli.relay:relay", "Run the webhook relay (verify, queue, dispatch, fan out)."),
    "watch": ("sync_tools.cli.agent:watch", "Webhook receiver on a DEV (build) or USER (agent) machine."),
    "agent": ("sync_tools.cli.agent:agent", "The USER agent: reconcile, then apply pushed events."),
    "status": ("sync_tools.cli.agent:status", "Installed version, checksum and running state per subsystem."),
    "rollback": ("sync_tools.cli.agent:rollback", "Swap .bin/.previous back in and reload."),
    "demo": ("sync_tools.cli.demo:demo", "The whole loop on loopback, self-contained."),
    "doctor": ("sync_tools.cli.doctor:doctor", "Check a workspace being adopted; each finding with its fix."),
    "fleet": ("sync_tools.cli.fleet:fleet", "What runs where: builds, rollouts, failed or silent agents."),
    "rollout": ("sync_tools.cli.fleet:rollout", "status|promote|halt|resume a staged rollout."),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use, and whose errors are one clear line."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return None
        module, attr = COMMANDS[cmd_name][0].split(":")
        command = getattr(importlib.import_module(module), attr)
        resume_collector()  # the command's imports are done; what it runs now may make garbage
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except SyncToolsError as e:
            raise click.ClickException(str(e)) from e
        except OSError as e:  # a path the user gave that cannot be made or written: its cause, not a traceback
            if e.errno == errno.EPIPE:  # click's own handling: `sync-tools status | head` ends quietly
                raise
            raise click.ClickException(errtext.describe(e)) from e


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sync-tools")
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-vv for debug).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), is_eager=True,
              help="Config file for the command (also accepted after it; env SYNC_TOOLS_CONFIG).")
def cli(verbose: int, config_path: str | None) -> None:
    """Keep a fleet of machines on the newest builds of the services they run: event-driven, incremental.

    \b
    Example:
      sync-tools check --json          # pinned vs newest upstream version per subsystem
      sync-tools demo                  # the whole loop on loopback
    """
    if config_path:
        # `sync-tools --config F check` as `sync-tools check --config F`: every command's --config
        # reads SYNC_TOOLS_CONFIG when it is not given itself, so one given after the command still wins
        from sync_tools.config import CONFIG_ENV

        os.environ[CONFIG_ENV] = config_path
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


_collector_paused = False


def resume_collector() -> None:
    """Start the garbage collector that ``sync_tools.__main__`` paused for the imports, with the objects
    they made frozen (never walked again, by any collection). A no-op when it was not paused."""
    global _collector_paused
    if _collector_paused:
        _collector_paused = False
        gc.freeze()
        gc.enable()


def main(*, collector_paused: bool = False) -> None:
    """The console script: run the command, then end the process.

    *collector_paused*: the caller disabled the garbage collector for the imports
    (``sync_tools.__main__``); it is started again before the command runs.
    """
    global _collector_paused
    _collector_paused = collector_paused and not gc.isenabled()
    try:
        cli(prog_name="sync-tools")
    except SystemExit as e:
        _end(e.code)
        raise
    finally:
        # Not ended by _end (a thread still runs, or an exception): the interpreter's last garbage
        # collection would walk every object the imports made only to free memory the OS takes back
        # anyway; frozen objects are skipped. Output is flushed, atexit handlers still run.
        gc.freeze()


def _end(code: object) -> None:
    """End the process with *code* (as SystemExit would) without the interpreter's teardown of every
    module and object, ~20 ms of a short command (measured on `check`): atexit handlers (logging's
    flush, pending temporary-directory cleanups) run and standard streams are flushed first. Returns,
    leaving the interpreter's own exit to run, when another thread is still alive (it must be waited
    for) or a stream cannot be flushed (the interpreter reports that as it always does)."""
    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        return
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:  # a message: the interpreter prints it
        return
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        return
    os._exit(status & 0xFF)
