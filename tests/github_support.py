"""Shared material for the GitHubStore tests against the GitHub API double (tests/servers/github_api.py):
the repository, tag and asset they use, a store on the double, and a file to upload."""

from __future__ import annotations

from pathlib import Path

from sync_tools.stores.github import GitHubStore
from tests.servers.github_api import GitHubAPIServer

REPO = "joeblew999/plat-telemetry"
TAG = "latest"
ASSET = "nats-server-linux-amd64.tar.gz"


def github_store(server: GitHubAPIServer, **kw: object) -> GitHubStore:
    """A GitHubStore for REPO/TAG on *server* (timeout 5 s unless *kw* says otherwise)."""
    kw.setdefault("timeout", 5)
    return GitHubStore(REPO, TAG, base_url=server.url, **kw)  # type: ignore[arg-type]


def asset_file(tmp_path: Path, data: bytes, name: str = "asset.bin") -> Path:
    """*data* written to ``tmp_path/name``: a file to upload."""
    p = tmp_path / name
    p.write_bytes(data)
    return p
