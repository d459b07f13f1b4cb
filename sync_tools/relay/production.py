"""``sync-tools relay --production``: the relay under gunicorn with the packaged settings
(:mod:`sync_tools.relay.gunicorn_conf`), from any workspace once ``sync-tools[prod]`` is installed;
``--production --ingest``: the ingest server beside it (:mod:`sync_tools.relay.ingest`, under granian).

The command checks the config and the secrets first, as the server's workers will, so a start-up
error is one line on stderr and a non-zero exit; then it becomes the gunicorn master (``exec``), so
a supervisor's SIGTERM reaches gunicorn itself.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import NoReturn

from sync_tools.config import CONFIG_ENV, Config
from sync_tools.errors import ConfigError, SyncToolsError
from sync_tools.relay.cpus import ingest_cpus

GUNICORN_CONF = "python:sync_tools.relay.gunicorn_conf"
WSGI_APP = "sync_tools.relay.wsgi:app"
INGEST_APP = "sync_tools.relay.ingest:build"
DEFAULT_PORT = 9191  # not process-compose's 8080, nor the 9090 plat-telemetry's own sync service uses
INGEST_PORT = 9193  # the ingest server beside it (9192 is `watch`)
INGEST_NICE = 10
INGEST_CONNECTIONS = 20_000  # as the relay's gunicorn (RELAY_CONNECTIONS): the soft limit is raised toward it
HEADER_TIMEOUT_MS = 10_000  # the ingest server cuts a request whose headers take longer (GitHub sends at once)


def check(config: Config, environ: Mapping[str, str] | None = None) -> None:
    """Everything the relay checks before it serves, without opening its database. Raises ConfigError
    (no webhook secret, github dispatch without GITHUB_TOKEN or release.repo, local dispatch without
    what ``release`` needs, a database directory that cannot be made)."""
    from sync_tools.relay.settings import load_settings

    settings = load_settings(config, environ)
    try:
        settings.db_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot make the relay database's directory {settings.db_path.parent}: "
                          f"{e.strerror or e}") from e
    if config.relay.dispatch == "github" and not config.release.repo:
        raise ConfigError("relay.dispatch is 'github' but release.repo is not set", path=config.path)


def preflight() -> None:
    """gunicorn's ``on_starting`` hook: :func:`check` the config the workers will load; on an error,
    one line on stderr and exit 1 before any worker is forked."""
    from sync_tools.config import load_config

    try:
        check(load_config())
    except SyncToolsError as e:
        print(f"sync-tools relay: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def gunicorn_command(config: Config, host: str, port: int, workers: int,
                     environ: Mapping[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run the relay under gunicorn for *config*."""
    env = dict(os.environ if environ is None else environ)
    if config.path is not None:
        env[CONFIG_ENV] = str(config.path)
    env["RELAY_BIND"] = bind_address(host, port)
    env["RELAY_WORKERS"] = str(workers)
    return [sys.executable, "-m", "gunicorn", "-c", GUNICORN_CONF, WSGI_APP], env


def run(config: Config, host: str, port: int, workers: int) -> NoReturn:
    """Check, then replace this process with the gunicorn master. Raises ConfigError when the
    config or the secrets are wrong, or gunicorn is not installed."""
    if importlib.util.find_spec("gunicorn") is None:
        raise ConfigError("the production server needs gunicorn: pip install 'sync-tools[prod]'")
    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    check(config)
    argv, env = gunicorn_command(config, host, port, workers)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)


def ingest_command(config: Config, host: str, port: int, workers: int,
                   environ: Mapping[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run the ingest server (:mod:`sync_tools.relay.ingest`) under granian."""
    from sync_tools.relay.ingest import METRICS_ENV, metrics_dir
    from sync_tools.relay.settings import load_settings

    env = dict(os.environ if environ is None else environ)
    if config.path is not None:
        env[CONFIG_ENV] = str(config.path)
    # the workers' counters in one place, so /metrics answers for all of them whichever one it reaches
    env[METRICS_ENV] = str(metrics_dir(load_settings(config, env).db_path))
    return [sys.executable, "-m", "granian", "--interface", "asgi", "--factory", "--host", host, "--port", str(port),
            "--workers", str(workers), "--no-ws", "--log-level", "warning",
            "--http1-header-read-timeout", str(HEADER_TIMEOUT_MS), INGEST_APP], env


def lower_priority(environ: Mapping[str, str]) -> None:
    """Run the ingest server below the relay's CPU priority (``nice`` + RELAY_INGEST_NICE, default
    10), every thread of it (set before the exec, so granian's threads inherit it): when both are
    busy, a release reaches the SSE agents first. A delivery has 10 s for its answer; a fan-out is a
    second's burst, and the deliveries it holds up wait milliseconds."""
    raw = environ.get("RELAY_INGEST_NICE", str(INGEST_NICE)).strip()
    try:
        step = int(raw)
    except ValueError:
        raise ConfigError(f"RELAY_INGEST_NICE={raw!r}: expected a whole number") from None
    if step > 0:
        os.nice(step)
        if os.getsid(0) == os.getpid():
            # with autogroup scheduling (most desktop and many server kernels) a session competes with
            # other sessions as one group whatever its processes' nice; a session of its own gets the
            # step through the group's own nice
            with contextlib.suppress(OSError):
                Path("/proc/self/autogroup").write_text(f"{step}\n")


def _port_free(host: str, port: int) -> None:
    """granian binds with SO_REUSEPORT, so a second server on a taken port would start without a word
    and share the deliveries; a plain bind first makes that a one-line error. Raises ConfigError."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {bind_address(host, port)}: {e.strerror or e} "
                              "(another server there? --port)") from None


def _fresh_metrics(folder: Path) -> None:
    """Make the workers' metrics folder, and empty it: counters start again with the server, and the
    files of an earlier run's workers would otherwise be summed into them. Raises ConfigError."""
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        if folder.is_symlink() or not folder.is_dir():
            raise ConfigError(f"{folder} (the ingest server's metrics) is not a directory; move it aside")
        for old in folder.glob("*.db"):
            old.unlink(missing_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot prepare {folder} for the ingest server's metrics: {e.strerror or e}") from e


def run_ingest(config: Config, host: str, port: int, workers: int) -> NoReturn:
    """Check, then replace this process with granian serving the ingest server. Raises ConfigError
    when the config or the secrets are wrong, or granian is not installed."""
    if importlib.util.find_spec("granian") is None:
        raise ConfigError("the ingest server needs granian: pip install 'sync-tools[prod]'")
    check(config)
    ingest_cpus(os.environ)  # a bad RELAY_INGEST_CPUS is one line here, not one per worker
    _port_free(host, port)
    argv, env = ingest_command(config, host, port, workers)
    _fresh_metrics(Path(env["PROMETHEUS_MULTIPROC_DIR"]))
    lower_priority(env)
    from sync_tools.relay.connections import raise_nofile

    # granian keeps a connection that never sends a byte (its header timeout starts at the first byte):
    # the open-files limit is the ingest server's only bound on idle connections, so raise it as the
    # relay does for its own (toward INGEST_CONNECTIONS, up to the hard limit)
    raise_nofile(INGEST_CONNECTIONS)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)
