"""``sync-tools relay``: run the webhook relay, or inspect and retry its outbox."""

from __future__ import annotations

import click
from click.core import ParameterSource

from sync_tools.cli._common import config_option, echo_json, load
from sync_tools.errors import ConfigError


def _halted(settings) -> list:  # type: ignore[no-untyped-def]
    """The halted rollouts, from the fleet database beside the outbox (none when it does not exist)."""
    from sync_tools.relay.fleet import Fleet, FleetStore

    path = settings.fleet_db_path or settings.db_path.with_suffix(".fleet.db")
    if not path.is_file():
        return []
    store = FleetStore(path)
    try:
        return Fleet(store, silent_after=settings.silent_after).halted()
    finally:
        store.close()


def _status(outbox, settings=None) -> dict:  # type: ignore[no-untyped-def]
    st = outbox.stats()
    return {
        "rollouts_halted": _halted(settings) if settings is not None else [],
        "queue_depth": st.queue_depth,
        "running": st.running,
        "done": st.done,
        "dead_letters": st.dead,
        "oldest_pending_age": st.oldest_pending_age,
        "last_event_id": st.last_event_id,
        "dead": [{"id": j.id, "kind": j.kind, "delivery": j.delivery, "attempts": j.attempts,
                  "subsystem": j.payload.get("subsystem") or j.payload.get("url") or j.payload.get("tag"),
                  "error": j.last_error} for j in outbox.jobs("dead")],
        "pending": [{"id": j.id, "kind": j.kind, "delivery": j.delivery, "attempts": j.attempts,
                     "next_attempt": j.next_attempt, "error": j.last_error} for j in outbox.jobs("pending")],
    }


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=9191, show_default=True, type=click.IntRange(0, 65535),
              help="Port (0: any). With --ingest the default is 9193.")
@config_option
@click.option("--production", is_flag=True,
              help="Run under gunicorn + gevent with the packaged settings (pip install 'sync-tools[prod]').")
@click.option("--ingest", is_flag=True,
              help="With --production: run the ingest server instead (POST /webhook only, on granian), beside the "
                   "relay and on its database; route /webhook to it (relay/README.md).")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="With --production: worker processes (gunicorn's hold thousands of SSE agents each).")
@click.option("--status", "show_status", is_flag=True, help="Print the outbox status (JSON) and exit.")
@click.option("--retry-dead", metavar="ID|all", help="Put a dead-lettered job (or all of them) back in the queue.")
def relay(host: str, port: int, config_path: str | None, production: bool, ingest: bool, workers: int,
          show_status: bool, retry_dead: str | None) -> None:
    """Run the webhook relay: verify GitHub deliveries, queue them durably, dispatch, fan out.

    Needs SYNC_TOOLS_WEBHOOK_SECRET (the secret set on the GitHub webhook); GITHUB_TOKEN for
    dispatch: github; SYNC_TOOLS_SIGNING_KEY for dispatch: local (its builds end with `release`);
    SYNC_TOOLS_AGENT_TOKENS (comma-separated) for agents on GET /events; SYNC_TOOLS_DB to put the
    database elsewhere than .sync-tools/relay.db.

    \b
    Example:
      SYNC_TOOLS_WEBHOOK_SECRET=... GITHUB_TOKEN=... sync-tools relay --production --workers 1
      sync-tools relay --production --ingest   # optional: POST /webhook on port 9193 (the relay's environment)
      sync-tools relay --status            # queue depth, dead letters
      sync-tools relay --retry-dead all    # after fixing the cause
    """
    from sync_tools.relay.outbox import Outbox
    from sync_tools.relay.settings import load_settings

    config = load(config_path)
    if show_status or retry_dead:
        settings = load_settings(config, require_secret=False)
        if not settings.db_path.is_file():  # a wrong SYNC_TOOLS_DB would make an empty one and report zeros
            raise ConfigError(f"{settings.db_path}: no relay database here (has the relay run? is SYNC_TOOLS_DB "
                              "the one it uses?)")
        outbox = Outbox(settings.db_path)
        try:
            if retry_dead:
                if retry_dead == "all":
                    n = outbox.retry_dead(None)
                elif retry_dead.isdigit():
                    n = outbox.retry_dead(int(retry_dead))
                    if n == 0:
                        raise ConfigError(f"no dead-lettered job with id {retry_dead}")
                else:
                    raise click.UsageError("--retry-dead takes a job id or 'all'")
                click.echo(f"{n} job(s) put back in the queue", err=True)
            if show_status:
                echo_json(_status(outbox, settings))
        finally:
            outbox.close()
        return

    if ingest and not production:
        raise click.UsageError("--ingest runs with --production (the ingest server sits beside the production relay)")
    if production:
        from sync_tools.relay.production import INGEST_PORT, run, run_ingest

        if ingest:
            given = click.get_current_context().get_parameter_source("port") != ParameterSource.DEFAULT
            run_ingest(config, host, port if given else INGEST_PORT, workers)
        run(config, host, port, workers)
    from sync_tools.relay.app import create_app
    from sync_tools.relay.server import serve

    serve(create_app(config, load_settings(config)), host, port)
