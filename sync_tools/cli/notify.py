"""``sync-tools notify``: the signed ``POST /notify`` after a release made by hand."""

from __future__ import annotations

import os

import click

from sync_tools.cli._common import config_option, echo_json, json_option, load
from sync_tools.errors import ConfigError

RELAY_URL_ENV = "SYNC_TOOLS_RELAY_URL"


@click.command()
@config_option
@click.option("--relay", "relay_url", envvar=RELAY_URL_ENV, metavar="URL",
              help="The relay's base URL (env SYNC_TOOLS_RELAY_URL; default: agent.relay in the config).")
@click.option("--delivery", metavar="ID", help="An id for this notification: a repeat with the same id acts once.")
@json_option
def notify(config_path: str | None, relay_url: str | None, delivery: str | None, as_json: bool) -> None:
    """Tell the relay the release changed, so agents hear about it now (after `sync-tools release`
    by hand; the workflow's notify job does the same). The relay reads and verifies the manifest
    itself. Signed with SYNC_TOOLS_NOTIFY_SECRET (else SYNC_TOOLS_WEBHOOK_SECRET, as the relay does).

    \b
    Example:
      SYNC_TOOLS_NOTIFY_SECRET=... sync-tools notify --relay https://relay.example.org
    """
    from sync_tools.notify import NOTIFY_SECRET_ENV, WEBHOOK_SECRET_ENV, notify_relay

    config = load(config_path)
    url = relay_url or config.agent.relay
    if not url:
        raise ConfigError(f"no relay URL: pass --relay URL, set {RELAY_URL_ENV} or agent.relay in the config")
    # as the relay uses it: as it is (a secret of only whitespace is none)
    secret = os.environ.get(NOTIFY_SECRET_ENV) or os.environ.get(WEBHOOK_SECRET_ENV) or ""
    secret = secret if secret.strip() else ""
    answer = notify_relay(url, secret.encode(), config.release.tag, delivery=delivery)
    if as_json:
        echo_json(answer)
    else:
        click.echo(f"relay {answer.get('status')}: release {config.release.tag} (delivery {answer.get('delivery')})")
