"""The relay's settings: secrets and paths from the environment, limits from the config.

Secrets are held as bytes and never appear in ``repr`` (so never in a log line or a traceback).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sync_tools.config import Config
from sync_tools.errors import ConfigError

WEBHOOK_SECRET_ENV = "SYNC_TOOLS_WEBHOOK_SECRET"
NOTIFY_SECRET_ENV = "SYNC_TOOLS_NOTIFY_SECRET"
AGENT_TOKENS_ENV = "SYNC_TOOLS_AGENT_TOKENS"
DB_ENV = "SYNC_TOOLS_DB"
DEFAULT_GITHUB_API = "https://api.github.com"
STATE_DIR = ".sync-tools"


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
    max_body: int = 25 * 1024 * 1024
    max_attempts: int = 8
    heartbeat: float = 15.0  # seconds between SSE comment heartbeats (Cloudflare cuts idle at ~100 s)
    backoff_base: float = 2.0  # first retry delay; doubles per attempt, with jitter
    backoff_cap: float = 600.0
    workers: int = 4  # delivery threads (local builds of different subsystems run side by side)
    http_timeout: tuple[float, float] = (5.0, 30.0)  # connect, read
    build_timeout: float = 3600.0
    subscriber_queue: int = 1000  # events buffered for one slow SSE client before it is cut off


def load_settings(config: Config, environ: Mapping[str, str] | None = None, *, require_secret: bool = True,
                  **overrides: object) -> Settings:
    """Read the relay settings from *environ* (default ``os.environ``) and *config*.

    Raises ConfigError when ``SYNC_TOOLS_WEBHOOK_SECRET`` is missing or empty (unless
    *require_secret* is false, for the read-only ``--status`` views), or when ``github`` dispatch
    is configured without ``GITHUB_TOKEN``.
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
    state = config.root / STATE_DIR
    db = Path(env[DB_ENV]) if env.get(DB_ENV) else state / "relay.db"
    tokens = tuple(t.strip().encode() for t in env.get(AGENT_TOKENS_ENV, "").split(",") if t.strip())
    values: dict[str, object] = dict(
        webhook_secret=secret.encode(),
        notify_secret=(env.get(NOTIFY_SECRET_ENV) or secret).encode(),
        db_path=db,
        logs_dir=db.parent / "relay-logs",
        github_token=token,
        github_api_url=(env.get("GITHUB_API_URL") or DEFAULT_GITHUB_API).rstrip("/"),
        agent_tokens=tokens,
        agent_secrets={a.secret_env: env[a.secret_env] for a in config.relay.agents if env.get(a.secret_env)},
        max_body=config.relay.max_body,
        max_attempts=max(1, config.relay.max_attempts),
    )
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]
