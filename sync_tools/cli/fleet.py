"""``sync-tools fleet`` and ``sync-tools rollout``: what runs where, and a person's hand on a staged
rollout. Both ask the relay over HTTP (``GET /fleet``, ``GET|POST /rollout/NAME[/ACTION]``) with the
operator token."""

from __future__ import annotations

import os
from typing import Any

import click

from sync_tools import errtext
from sync_tools.cli._common import config_option, echo_json, json_option, load
from sync_tools.errors import ConfigError, RemoteError

OPERATOR_TOKEN_ENV = "SYNC_TOOLS_OPERATOR_TOKEN"
RELAY_URL_ENV = "SYNC_TOOLS_RELAY_URL"
TIMEOUT = (5.0, 30.0)


def relay_option(f: Any) -> Any:
    return click.option("--relay", "relay_url", envvar=RELAY_URL_ENV, metavar="URL",
                        help="The relay's base URL (env SYNC_TOOLS_RELAY_URL; default: agent.relay in the config).")(f)


def _target(config_path: str | None, relay_url: str | None) -> tuple[str, str]:
    """The relay URL and the token to send: the operator token, else the agent's own."""
    url = relay_url
    token_env = "SYNC_TOOLS_AGENT_TOKEN"
    if not url or not os.environ.get(OPERATOR_TOKEN_ENV):
        try:
            config = load(config_path)
        except ConfigError:
            if not url or config_path:  # the config was asked for, or is where the URL must come from
                raise
        else:  # an operator's laptop has no config: the URL was given, what may be missing is the token
            url = url or config.agent.relay
            token_env = config.agent.token_env
    if not url:
        raise ConfigError(f"no relay URL: pass --relay URL, set {RELAY_URL_ENV} or agent.relay in the config")
    token = os.environ.get(OPERATOR_TOKEN_ENV) or os.environ.get(token_env)
    if not token:
        raise ConfigError(f"{OPERATOR_TOKEN_ENV} is not set (the relay's operator token)")
    return url.rstrip("/"), token


def call(method: str, url: str, token: str, json_body: dict[str, Any] | None = None, *,
         not_found: str = "") -> Any:
    """One request to the relay; its JSON object. Raises RemoteError with the relay's one-line error, or
    naming *url* and the status when the answer is not a 2xx JSON object (a redirect, a web page), with
    *not_found* after it for a 404 that is not the relay's."""
    import requests

    try:
        resp = requests.request(method, url, json=json_body, timeout=TIMEOUT, allow_redirects=False,
                                headers={"Authorization": f"Bearer {token}", "Accept": "application/json"})
    except requests.RequestException as e:
        raise RemoteError(f"cannot reach the relay at {url}: {errtext.describe(e)}") from e
    try:
        body = resp.json()
    except ValueError:
        body = None
    message = body.get("error") if isinstance(body, dict) else None
    if resp.status_code >= 400 and message:  # the relay's own refusal
        raise RemoteError(f"relay answered {resp.status_code}: {message}", status_code=resp.status_code)
    if not 200 <= resp.status_code < 300 or not isinstance(body, dict):
        moved = resp.headers.get("Location")
        what = f" (redirects to {moved})" if moved else f" {resp.reason}" if resp.reason else ""
        hint = f" {not_found}" if not_found and resp.status_code == 404 else ""
        raise RemoteError(f"{url} answered {resp.status_code}{what}, not the relay's JSON: is the relay URL right?"
                          f"{hint}", status_code=resp.status_code)
    return body


def _rollout_line(r: dict[str, Any]) -> str:
    wave = f"wave {r['wave']} of {len(r['waves'])}" + (f" ({r['percent']}%)" if r.get("percent") else "")
    return (f"{r['subsystem']} {r['version']} ({r['platform']}, build {r['build'][:12]}): {r['state']}, {wave}, "
            f"{r['healthy']}/{r['needed']} healthy, {r['failed']} failed: {r['reason']}")


@click.command()
@config_option
@relay_option
@json_option
def fleet(config_path: str | None, relay_url: str | None, as_json: bool) -> None:
    """What runs where: per subsystem the builds running and how many agents run each, the rollout's
    wave and state, and the agents that failed or went silent.

    Needs SYNC_TOOLS_OPERATOR_TOKEN (or an agent token).

    The relay's Cloudflare Tunnel (relay/cloudflared.yml) keeps /fleet private: run this on the relay's
    host, or through an ingress rule of your own.

    \b
    Example:
      SYNC_TOOLS_OPERATOR_TOKEN=... sync-tools fleet --relay http://127.0.0.1:9191
      sync-tools fleet --json | jq '.subsystems.nats.rollout'
    """
    url, token = _target(config_path, relay_url)
    view = call("GET", f"{url}/fleet", token,
                not_found="The relay's tunnel answers 404 for /fleet, which it keeps private: run this on the "
                          "relay's host (--relay http://127.0.0.1:9191)")
    if as_json:
        echo_json(view)
        return
    counts = view["counts"]
    click.echo(f"{counts['agents']} agents, {counts['silent']} silent, {counts['failed']} failed")
    for name, sub in view["subsystems"].items():
        click.echo(f"\n{name}")
        for b in sub["builds"]:
            note = "" if b["known"] else "  (not in a verified manifest)"
            click.echo(f"  {(b['sha256'] or 'none')[:12]:12}  {b['version'] or '?':16} {b['agents']:>6} agents{note}")
        for r in sub["rollouts"]:
            click.echo(f"  rollout: {_rollout_line(r)}")
    attention = [a for a in view["agents"] if a["silent"]
                 or any(s["outcome"] in ("failed", "rolled_back") for s in a["subsystems"].values())]
    if attention:
        click.echo("\nagents that failed or went silent")
        for a in attention:
            what = ", ".join(f"{n}: {s['outcome']}" + (f" ({s['error']})" if s.get("error") else "")
                             for n, s in a["subsystems"].items())
            click.echo(f"  {a['id']:24} last seen {a['last_seen'] or 'never'}{'  SILENT' if a['silent'] else ''}"
                       f"{'  ' + what if what else ''}")


@click.command()
@click.argument("action", type=click.Choice(["status", "promote", "halt", "resume"]))
@click.argument("name")
@click.option("--build", metavar="SHA256", help="Only this build (the binary's sha256); default: every current one.")
@click.option("--reason", default="", help="Why (halt): shown in the fleet view and /health.")
@config_option
@relay_option
@json_option
def rollout(action: str, name: str, build: str | None, reason: str, config_path: str | None,
            relay_url: str | None, as_json: bool) -> None:
    """A person's hand on the staged rollout of subsystem NAME.

    \b
    status   the rollout's state, wave, healthy and failed reports
    promote  open the next wave now, without waiting for reports or the settle time
    halt     stop it: no agent that does not run the build installs it
    resume   clear a halt (forgiving the failures so far) and tell held agents to ask again

    Needs SYNC_TOOLS_OPERATOR_TOKEN.

    \b
    Example:
      sync-tools rollout status nats --relay https://relay.example.org
      sync-tools rollout halt nats --reason "error rate up on wave 1"
    """
    url, token = _target(config_path, relay_url)
    if action == "status":
        body = call("GET", f"{url}/rollout/{name}", token)
    else:
        payload: dict[str, Any] = {"reason": reason}
        if build:
            payload["build"] = build
        body = call("POST", f"{url}/rollout/{name}/{action}", token, payload)
    if as_json:
        echo_json(body)
        return
    if not body["rollouts"]:
        click.echo(f"{name}: no staged rollout of a current build")
    for r in body["rollouts"]:
        click.echo(_rollout_line(r))
