"""USER-side commands: ``agent``, ``status``, ``rollback``, ``watch``."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import click

from sync_tools.cli._common import config_option, echo_json, is_tty, json_option, load
from sync_tools.config import Config
from sync_tools.errors import ConfigError

log = logging.getLogger(__name__)

#: Seconds ``agent --once`` and ``rollback`` wait for another agent process installing in the same root.
ONE_SHOT_LOCK_WAIT = 30.0
#: Seconds each step (build, package, release) of a DEV machine's local build may take.
DEV_STEP_TIMEOUT = 3600.0


def _progress() -> Any:
    """A one-line progress bar on stderr, only when stderr is a terminal."""
    if not is_tty():
        return None

    def show(name: str, done: int, total: int | None) -> None:
        if total:
            pct = done * 100 // total
            click.echo(f"\r{name} [{'#' * (pct // 4):<25}] {pct:3d}% {done / 1e6:.1f}/{total / 1e6:.1f} MB",
                       err=True, nl=done >= total)

    return show


def _agent(config: Config, root: str | None = None, source: str | None = None, progress: bool = False,
           lock_timeout: float | None = None) -> Any:
    from sync_tools.agent.runner import LOCK_WAIT, Agent

    return Agent(config, root=Path(root).resolve() if root else None, source=source,
                 progress=_progress() if progress else None,
                 lock_timeout=LOCK_WAIT if lock_timeout is None else lock_timeout)


def _existing_root(ag: Any) -> Any:
    """*ag*, whose install root exists. Raises ConfigError before anything is made in a root that is a typo."""
    if not ag.root.is_dir():
        raise ConfigError(f"install root {ag.root} does not exist (--root, or agent.root in the config)")
    return ag


def _print_report(report: Any, as_json: bool) -> None:
    if as_json:
        echo_json(report.to_json())
        return
    if report.error:
        # "refused" only for a release that does not verify; a network fault or the config is not the release's
        what = "release refused" if report.refused else "cannot fetch the release" if report.retry else "error"
        click.echo(f"{what}: {report.error}", err=True)
        return
    click.echo(f"manifest serial {report.serial} ({report.seconds:.2f}s)")
    for r in report.results:
        line = f"  {r.name:<16} {r.action:<12} {(r.new_sha or '')[:12]}"
        if r.bytes:
            line += f"  {r.bytes} bytes"
        if getattr(r, "patch", None):
            line += f" by patch ({r.patch.saved} bytes saved)"
        if r.error:
            line += f"  ({r.error})"
        click.echo(line)


def _stop_on_signals(stop: Any) -> None:
    def handler(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping", signum)
        stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def _check_listen(listen: str, *, path: object = None, key: str = "agent.listen") -> None:
    """Raise ConfigError (one line naming *key*) when *listen* is not ``host:port`` or cannot be bound
    now (a port another program holds, an address not on this machine). The receiver itself opens after
    the start-up reconcile; finding this only then cost a reconcile per start, a loop under a supervisor."""
    import errno
    import socket

    from sync_tools.agent.runner import parse_listen

    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the receiver's server binds
            s.bind((host, port))
    except OSError as e:
        from sync_tools import errtext

        why = "the port is in use by another program" if e.errno == errno.EADDRINUSE else errtext.describe(e)
        raise ConfigError(f"cannot listen on {host}:{port} for pushes: {why}", path=path, key=key) from e


def _serve(config: Config, agent: Any, listen: str | None, as_json: bool) -> None:
    from sync_tools.agent.runner import serve

    ac = config.agent
    if listen:
        _check_listen(listen, path=config.path)
    token = os.environ.get(ac.token_env) or None
    secret = os.environ.get(ac.secret_env) or None
    if ac.transport == "nats":  # release events from NATS (docs/nats.md); pushes to agent.listen still taken
        from sync_tools.agent.nats_transport import serve_nats

        _stop_on_signals(agent.stop)
        serve_nats(agent, listen=listen, secret=secret, on_report=lambda r: _print_report(r, as_json),
                   on_ready=lambda info: click.echo(f"nats: {info['nats']} ({info['nats_subject']})", err=True))
        return
    # transport push: release events come only as the relay's signed pushes to agent.listen; agent.relay,
    # when set, still takes the agent's reports and answers the wave gate, but no SSE stream is followed
    events_from = None if ac.transport == "push" else ac.relay
    if ac.transport == "push" and not listen:
        raise ConfigError("agent.transport is 'push' but agent.listen is not set: the relay's pushes need an "
                          "address to reach (host:port), or use --once", path=config.path, key="agent.listen")
    if events_from and not token:
        log.warning("agent.relay is set but $%s is empty: subscribing without a token", ac.token_env)
    if not events_from and not listen:
        raise ConfigError("nothing to wait for: set agent.relay (SSE) and/or agent.listen (pushes), "
                          "or use --once", path=config.path, key="agent")
    _stop_on_signals(agent.stop)

    def ready(info: dict[str, Any]) -> None:
        for k, v in info.items():
            if isinstance(v, str):
                click.echo(f"{k}: {v}", err=True)

    serve(agent, relay=events_from, token=token, listen=listen, secret=secret,
          on_report=lambda r: _print_report(r, as_json), on_ready=ready)


@click.command()
@config_option
@click.option("--root", type=click.Path(file_okay=False), help="Install root holding <subsystem>/.bin/ "
              "(default: agent.root).")
@click.option("--source", help="Release source: a base URL or a local store directory (default: agent.source).")
@click.option("--once", is_flag=True, help="Reconcile once and exit (1 if anything failed, or if "
              "another agent process kept installing for 30 s).")
@json_option
def agent(config_path: str | None, root: str | None, source: str | None, once: bool, as_json: bool) -> None:
    """The USER agent: verify the signed release, install only what changed, reload, roll back on failure.

    Reconciles once at start, then follows the relay's SSE stream (agent.relay, token in
    $SYNC_TOOLS_AGENT_TOKEN) and/or signed pushes to agent.listen (secret in $SYNC_TOOLS_AGENT_SECRET).

    \b
    Example:
      sync-tools agent --once --source .releases --json
      sync-tools agent --root /opt/plat
    """
    config = load(config_path)
    ag = _agent(config, root, source, progress=not as_json, lock_timeout=ONE_SHOT_LOCK_WAIT if once else None)
    if once:
        for res in ag.recover():
            click.echo(f"recovered an interrupted install of {res.name}: {res.action}", err=True)
        report = ag.reconcile()
        _print_report(report, as_json)
        if not report.ok:
            failed = [f"{r.name} {r.action}: {r.error}" for r in report.results if not r.ok]
            if failed:
                click.echo("error: " + "; ".join(failed), err=True)
            sys.exit(1)
        return
    _serve(config, ag, config.agent.listen, as_json)


@click.command()
@config_option
@click.option("--root", type=click.Path(file_okay=False), help="Install root (default: agent.root).")
@json_option
def status(config_path: str | None, root: str | None, as_json: bool) -> None:
    """Installed version and sha256 per subsystem, drift between .version and the binary, running state.

    \b
    Example:
      sync-tools status --json
    """
    config = load(config_path)
    ag = _existing_root(_agent(config, root))
    info = ag.status()
    if as_json:
        echo_json(info)
        return
    from sync_tools.cli.status_text import status_lines

    for line in status_lines(info):
        click.echo(line)


@click.command()
@config_option
@click.argument("name")
@click.option("--root", type=click.Path(file_okay=False), help="Install root (default: agent.root).")
@json_option
def rollback(config_path: str | None, name: str, root: str | None, as_json: bool) -> None:
    """Swap .bin/.previous back in (the current binary becomes .previous), reload, check health.

    When healthy, the build rolled away from is held back: the agent skips it until the release
    publishes a new build of NAME (a different binary_sha256), then installs that one. Waits up to
    30 s for another agent process that is installing, then fails.

    \b
    Example:
      sync-tools rollback nats
    """
    config = load(config_path)
    res = _existing_root(_agent(config, root, lock_timeout=ONE_SHOT_LOCK_WAIT)).rollback(name)
    if as_json:
        echo_json({name: res.to_json()})
    else:
        click.echo(f"{name}: {res.old_sha and res.old_sha[:12]} -> {res.new_sha and res.new_sha[:12]} "
                   f"({'healthy' if res.error is None else res.error})")
    if res.error:
        click.echo(f"error: {name}: {res.error}", err=True)
        sys.exit(1)


def _is_dev(config: Config) -> bool:
    return any((config.root / s.name / ".src").is_dir() for s in config.subsystems.values())


def _dev_builder(config: Config) -> Any:
    """DEV mode: each verified event builds, packages and releases the subsystems it names (or whose
    upstream it came from) with ``sync-tools build/package/release --only X`` subprocesses, one at a time.
    An upstream's GitHub event builds the version it announced (``build --version``, which moves the
    pin here, as the relay's local dispatcher does); other events build the pin. Events for a
    subsystem already queued collapse onto it, keeping the newer version."""
    from sync_tools.agent.events import AgentEvent
    from sync_tools.procs import TERM_GRACE, stop_and_collect
    from sync_tools.versions import later

    pending: dict[str, str | None] = {}  # name -> version to build (None: the pin), in arrival order
    cond = threading.Condition()

    def names_for(event: AgentEvent) -> list[str]:
        if event.subsystems:
            return [n for n in event.subsystems if n in config.subsystems]
        if event.repo:
            want = event.repo.rstrip("/").removesuffix(".git").lower()
            return [s.name for s in config.subsystems.values()
                    if s.upstream.rstrip("/").removesuffix(".git").lower().endswith(want)]
        return []

    def newer(a: str | None, b: str | None) -> str | None:
        """The one of two queued versions to build: the later one, else the one that came last."""
        return a if a and b and later(a, b) else (b or a)

    def submit(event: AgentEvent) -> None:
        version = event.release if event.source == "github" else None
        with cond:
            for n in names_for(event):
                pending[n] = newer(pending[n], version) if n in pending else version
            cond.notify()

    def work() -> None:
        while True:
            with cond:
                while not pending:
                    cond.wait()
                name = next(iter(pending))
                version = pending.pop(name)
            for step in ("build", "package", "release"):
                cmd = [sys.executable, "-m", "sync_tools", step, "--only", name, "--config", str(config.path)]
                if step == "build" and version:
                    cmd += ["--version", version]
                # its own process group: on a timeout the step and what it started are stopped (build
                # turns the SIGTERM into stopping its commands and putting its pin back)
                try:
                    proc = subprocess.Popen(cmd, cwd=config.root, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                            errors="replace", start_new_session=True)
                except OSError as e:  # the builder thread must outlive one step that cannot start
                    log.error("%s: cannot run %s: %s", name, step, e)
                    break
                try:
                    _, stderr = proc.communicate(timeout=DEV_STEP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    stop_and_collect(proc, grace=TERM_GRACE)  # bounded: the builder must go on
                    log.error("%s: %s timed out after %g s", name, step, DEV_STEP_TIMEOUT)
                    break
                if proc.returncode != 0:
                    log.error("%s: %s failed (exit %d): %s", name, step, proc.returncode,
                              stderr.strip().splitlines()[-1:] or "")
                    break
                log.info("%s: %s done%s", name, step, f" ({version})" if version and step == "build" else "")

    threading.Thread(target=work, name="dev-builder", daemon=True).start()
    return submit


@click.command()
@config_option
@click.option("--port", type=int, default=9192, show_default=True, help="Port for POST /webhook, GET /health.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--mode", type=click.Choice(["auto", "dev", "user"]), default="auto", show_default=True,
              help="dev: build locally; user: act as the agent; auto: dev when a <subsystem>/.src/ exists.")
@click.option("--root", type=click.Path(file_okay=False), help="Install root in user mode (default: agent.root).")
def watch(config_path: str | None, port: int, host: str, mode: str, root: str | None) -> None:
    """The webhook receiver (secret in $SYNC_TOOLS_AGENT_SECRET): on a DEV machine it builds, packages and
    releases the changed subsystem locally; on a USER machine it is the agent's push receiver.

    \b
    Example:
      sync-tools watch --port 9192
    """
    config = load(config_path)
    secret = os.environ.get(config.agent.secret_env)
    if not secret:
        raise ConfigError(f"${config.agent.secret_env} is not set: refusing to accept unverified webhooks")
    listen = f"{host}:{port}"
    _check_listen(listen, key="--host/--port")
    if mode == "user" or (mode == "auto" and not _is_dev(config)):
        ag = _agent(config, root)
        from sync_tools.agent.runner import serve

        _stop_on_signals(ag.stop)
        serve(ag, listen=listen, secret=secret, on_report=lambda r: _print_report(r, False),
              on_ready=lambda info: click.echo(f"watching (user): {info.get('listen')}", err=True))
        return
    from sync_tools.agent.events import WebhookVerifier, create_receiver, make_receiver_server

    app = create_receiver(WebhookVerifier(secret, upstream=config), _dev_builder(config),
                          lambda: {"ready": True, "mode": "dev"})
    server = make_receiver_server(app, host, port)
    _stop_on_signals(lambda: threading.Thread(target=server.shutdown, daemon=True).start())
    click.echo(f"watching (dev): http://{host}:{server.server_port}", err=True)
    server.serve_forever()
