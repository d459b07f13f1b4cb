"""The relay's settings: secrets and paths from the environment, limits from the config.

Secrets are held as bytes and never appear in ``repr`` (so never in a log line or a traceback).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sync_tools.config import Config
from sync_tools.errors import ConfigError

WEBHOOK_SECRET_ENV = "SYNC_TOOLS_WEBHOOK_SECRET"
NOTIFY_SECRET_ENV = "SYNC_TOOLS_NOTIFY_SECRET"
AGENT_TOKENS_ENV = "SYNC_TOOLS_AGENT_TOKENS"
AGENT_TOKENS_FILE_ENV = "SYNC_TOOLS_AGENT_TOKENS_FILE"
OPERATOR_TOKEN_ENV = "SYNC_TOOLS_OPERATOR_TOKEN"
AGENT_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")  # fullmatch
MAX_TOKENS_FILE = 64 << 20
DB_ENV = "SYNC_TOOLS_DB"
DEFAULT_GITHUB_API = "https://api.github.com"
STATE_DIR = ".sync-tools"

HEARTBEAT_ENV = "SYNC_TOOLS_SSE_HEARTBEAT"

@dataclass(frozen=True)
class Settings:
    """Everything the relay needs besides the Config. Build with :func:`load_settings`."""

    webhook_secret: bytes = field(repr=False)
    notify_secret: bytes = field(repr=False)
    db_path: Path
    logs_dir: Path
    github_token: str | None = field(default=None, repr=False)
    github_api_url: str = DEFAULT_GITHUB_API
    agent_tokens: tuple[bytes, ...] = field(default=(), repr=False)
    agent_secrets: Mapping[str, str] = field(default_factory=dict, repr=False)  # secret_env -> value
    # sha256(token) -> (agent id, token) for tokens bound to an agent id (``ID=TOKEN``): only those report
    agent_ids: Mapping[bytes, tuple[str, bytes]] = field(default_factory=dict, repr=False)
    operator_token: bytes | None = field(default=None, repr=False)
    fleet_db_path: Path | None = None  # default: beside db_path (relay.db -> relay.fleet.db)
    silent_after: float = 3600.0  # an agent with no report or stream connection this long is silent
    report_burst: float = 30.0  # per-agent token bucket for POST /report and GET /rollout: burst ...
    report_rate: float = 0.5  # ... and refill per second
    max_report_rows: int = 200  # reports kept per agent (the newest)
    max_body: int = 25 * 1024 * 1024
    max_attempts: int = 8
    # the longest quiet gap on an SSE stream before a comment (the contract: at least every 30 s;
    # Cloudflare cuts idle streams at ~100 s, the agent's read timeout is 90 s). Each heartbeat costs
    # the relay a write per agent: at 10,000 agents, the most CPU an idle relay spends
    heartbeat: float = 25.0
    backoff_base: float = 2.0  # first retry delay; doubles per attempt, with jitter
    backoff_cap: float = 600.0
    workers: int = 4  # delivery threads (local builds of different subsystems run side by side)
    # SYNC_TOOLS_DISPATCH_INTERVAL: seconds between two repository_dispatch calls; GitHub asks for at least
    # one between mutative requests ("best practices for using the REST API": secondary rate limits)
    dispatch_interval: float = 1.0
    http_timeout: tuple[float, float] = (5.0, 30.0)  # connect, read
    build_timeout: float = 3600.0
    retention: float = 7 * 86400.0  # SYNC_TOOLS_RETENTION_DAYS: finished rows older than this are pruned ...
    prune_every: float = 600.0  # ... every SYNC_TOOLS_PRUNE_EVERY seconds (relay/outbox.py Outbox.maintain)
    subscriber_queue: int = 1000  # events buffered for one slow SSE client before it is cut off


def load_settings(config: Config, environ: Mapping[str, str] | None = None, *, require_secret: bool = True,
                  **overrides: object) -> Settings:
    """Read the relay settings from *environ* (default ``os.environ``) and *config*.

    Raises ConfigError when ``SYNC_TOOLS_WEBHOOK_SECRET`` is missing or empty (unless
    *require_secret* is false, for the read-only ``--status`` views), when ``github`` dispatch
    is configured without ``GITHUB_TOKEN``, or ``local`` dispatch without a signing key that
    ``release`` can use (:func:`check_release_key`).
    """
    env = os.environ if environ is None else environ
    secret = env.get(WEBHOOK_SECRET_ENV, "")
    if require_secret and not secret.strip():
        raise ConfigError(f"{WEBHOOK_SECRET_ENV} is not set: the relay refuses to accept unsigned webhooks "
                          "(set it to the secret configured on the GitHub webhook)")
    token = env.get("GITHUB_TOKEN") or None
    if require_secret and config.relay.dispatch == "github" and not token:
        raise ConfigError("relay.dispatch is 'github' but GITHUB_TOKEN is not set "
                          "(it needs a token allowed to create repository_dispatch events on "
                          f"{config.release.repo or 'release.repo'})", path=config.path)
    if require_secret and config.relay.dispatch == "local":
        check_release_key(config, env)
    state = config.root / STATE_DIR
    db = Path(env[DB_ENV]) if env.get(DB_ENV) else state / "relay.db"
    bare, bound = parse_agent_tokens(env.get(AGENT_TOKENS_ENV, ""), AGENT_TOKENS_ENV)
    if env.get(AGENT_TOKENS_FILE_ENV):
        bound += read_tokens_file(Path(env[AGENT_TOKENS_FILE_ENV]))
    tokens = tuple(dict.fromkeys([*bare, *(t for _, t in bound)]))
    values: dict[str, object] = dict(
        webhook_secret=secret.encode(),
        notify_secret=(env.get(NOTIFY_SECRET_ENV) or secret).encode(),
        db_path=db,
        logs_dir=db.parent / "relay-logs",
        github_token=token,
        github_api_url=(env.get("GITHUB_API_URL") or DEFAULT_GITHUB_API).rstrip("/"),
        agent_tokens=tokens,
        agent_ids=bind_tokens(bound),
        operator_token=(env.get(OPERATOR_TOKEN_ENV) or "").strip().encode() or None,
        agent_secrets={a.secret_env: env[a.secret_env] for a in config.relay.agents if env.get(a.secret_env)},
        max_body=config.relay.max_body,
        max_attempts=max(1, config.relay.max_attempts),
        retention=_seconds(env, "SYNC_TOOLS_RETENTION_DAYS", 7.0) * 86400.0,
        prune_every=_seconds(env, "SYNC_TOOLS_PRUNE_EVERY", 600.0),
        dispatch_interval=_seconds(env, "SYNC_TOOLS_DISPATCH_INTERVAL", 1.0),
        heartbeat=_heartbeat(env),
    )
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def check_release_key(config: Config, env: Mapping[str, str]) -> None:
    """``dispatch: local`` ends every build with ``sync-tools release``, which signs the manifest with
    ``SYNC_TOOLS_SIGNING_KEY``: without it (or with a key agents do not pin) every job would build,
    then fail, so the relay refuses to start instead. Raises ConfigError (as ``release`` would)."""
    from sync_tools import signing  # not sync_tools.release: gunicorn's master must not import requests

    key = env.get(signing.SIGNING_KEY_ENV, "")
    if not key.strip():
        raise ConfigError(f"relay.dispatch is 'local' but {signing.SIGNING_KEY_ENV} is not set: each local build "
                          "ends with `sync-tools release`, which signs the manifest with it (set it to the key "
                          "file's path or its PEM text)", path=config.path)
    private = signing.load_private_key(key)
    if config.release.public_key:
        pub_path = config.resolve(config.release.public_key)
        public = signing.load_public_key(str(pub_path))
        if signing.public_key_pem(private) != signing.public_key_pem(public):
            raise ConfigError(f"{signing.SIGNING_KEY_ENV} does not belong to release.public_key: every local "
                              "release would be refused by the agents", path=pub_path)


def _heartbeat(env: Mapping[str, str]) -> float:
    """``SYNC_TOOLS_SSE_HEARTBEAT``: the longest quiet gap on an SSE stream, 1 to 30 seconds (the
    contract's "at least every 30 s"; shorter for a proxy that cuts idle connections sooner). Raises
    ConfigError."""
    value = _seconds(env, HEARTBEAT_ENV, Settings.heartbeat)
    if not 1.0 <= value <= 30.0:
        raise ConfigError(f"{HEARTBEAT_ENV}={env.get(HEARTBEAT_ENV)!r}: expected seconds from 1 to 30 (the agents "
                          "expect a heartbeat at least every 30 s)")
    return value


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    """A non-negative number from *env* (*default* when unset). Raises ConfigError."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise ConfigError(f"{name}={raw!r}: expected a number of at least 0")
    return value


def parse_agent_tokens(text: str, where: str) -> tuple[list[bytes], list[tuple[str, bytes]]]:
    """``SYNC_TOOLS_AGENT_TOKENS``: comma-separated tokens, each bare or ``ID=TOKEN``. Returns the bare
    tokens and the (id, token) pairs. An entry is ``ID=TOKEN`` when what comes before its first ``=``
    is an agent id and what follows is a token that does not start with ``=`` (a bare base64 token
    ending in ``==`` stays bare). Raises ConfigError for an empty token after ``ID=``."""
    bare: list[bytes] = []
    bound: list[tuple[str, bytes]] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        agent, sep, token = item.partition("=")
        if sep and AGENT_ID_RE.fullmatch(agent) and not token.startswith("="):
            if not token.strip():
                raise ConfigError(f"{where}: agent {agent!r} has an empty token")
            bound.append((agent, token.strip().encode()))
        else:
            bare.append(item.encode())
    return bare, bound


def read_tokens_file(path: Path) -> list[tuple[str, bytes]]:
    """``SYNC_TOOLS_AGENT_TOKENS_FILE``: one ``ID=TOKEN`` per line; blank lines and ``#`` comments are
    skipped. Raises ConfigError naming the file and line of anything else."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_TOKENS_FILE + 1)
    except OSError as e:
        raise ConfigError(f"cannot read the agent tokens file: {e.strerror or e}", path=path) from e
    if len(raw) > MAX_TOKENS_FILE:
        raise ConfigError(f"over {MAX_TOKENS_FILE >> 20} MiB: not a tokens file", path=path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError("not UTF-8 text", path=path) from e
    out: list[tuple[str, bytes]] = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        agent, sep, token = line.partition("=")
        if not sep or not AGENT_ID_RE.fullmatch(agent.strip()) or not token.strip():
            raise ConfigError("expected ID=TOKEN (an agent id of letters, digits and ._:@-, then its token)",
                              path=path, line=n)
        out.append((agent.strip(), token.strip().encode()))
    return out


def bind_tokens(pairs: list[tuple[str, bytes]]) -> dict[bytes, tuple[str, bytes]]:
    """sha256(token) -> (id, token). Raises ConfigError when an id has two tokens or a token two ids
    (a report could not say which agent sent it)."""
    out: dict[bytes, tuple[str, bytes]] = {}
    ids: set[str] = set()
    for agent, token in pairs:
        digest = hashlib.sha256(token).digest()
        if digest in out and out[digest][0] != agent:
            raise ConfigError(f"agents {out[digest][0]!r} and {agent!r} share a token; each agent needs its own")
        if agent in ids and digest not in out:
            raise ConfigError(f"agent {agent!r} is given two different tokens")
        ids.add(agent)
        out[digest] = (agent, token)
    return out
