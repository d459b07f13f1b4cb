"""An agent-only install whose binary moved place (found by a review; the tests marked so failed before
the fix): grafana at ``grafana/.bin/grafana-server``, then a manifest whose entry says
``path: bin/grafana-server``. The new build went to ``.bin/bin/`` and the old file stayed at the top for
good; nothing kept the old build for a rollback either (``.previous/`` of the new place was empty, so an
unhealthy first build there had "nothing to roll back to", and ``rollback`` nothing to go back to).

Real processes under the process-compose double (tests/servers/process_compose.py: a restart really runs
the file on disk), a signed release served over loopback HTTP, real files. The "binaries" are sh scripts
that stay the process the manager started (no ``exec``), so ``/proc/<pid>/cmdline`` names the file run."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sync_tools.agent.fetch import HTTPFetcher
from sync_tools.agent.reload import ProcessComposeReloader
from sync_tools.agent.runner import Agent
from sync_tools.config import parse_config
from sync_tools.versionfile import VersionInfo, read_version, write_version
from tests.agent_support import PLATFORM, ReleaseStore, StoreServer
from tests.servers.process_compose import ProcessComposeServer
from tests.support import wait_for

BINARY = "grafana-server"


def script(version: str, *, ok: bool = True) -> bytes:
    """A "binary": runs until stopped (its sh stays the process: the manager's pid), or exits 3."""
    return f"#!/bin/sh\n# grafana {version}\n{'sleep 600' if ok else 'exit 3'}\n".encode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Moved:
    base: Path
    store: ReleaseStore
    server: StoreServer
    v1: bytes

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def top(self) -> Path:  # where the binary was
        return self.root / "grafana" / ".bin" / BINARY

    @property
    def new(self) -> Path:  # where the manifest's path puts it
        return self.root / "grafana" / ".bin" / "bin" / BINARY

    def publish(self, version: str, data: bytes) -> None:
        self.store.publish("grafana", BINARY, data, version, path=f"bin/{BINARY}")

    def manager(self, runs: Path) -> ProcessComposeServer:
        """process-compose running *runs* (through sh, so a file not there yet is a process that exited)."""
        return ProcessComposeServer({"grafana": (["/bin/sh", "-c", 'exec "$0"', str(runs)], {})})

    def agent(self, pc: ProcessComposeServer, settle: float = 0) -> Agent:
        """The documented agent-only config: no ``subsystems:``, the manifest names grafana."""
        config = parse_config(self.base / "agent.yaml", {"agent": {
            "root": str(self.root), "health_timeout": 3, "settle_seconds": settle}})
        return Agent(config, fetcher=HTTPFetcher(self.server.url), public_key=self.store.key.public_key(),
                     platform=PLATFORM, reloader=ProcessComposeReloader(pc.url, ready_timeout=3))


@pytest.fixture
def moved(tmp_path: Path) -> Iterator[Moved]:
    """grafana v1 installed at the top of ``.bin`` with its ``.version`` (before manifests carried
    ``path``); the release's grafana entry now names ``bin/grafana-server``."""
    store = ReleaseStore(tmp_path / "store", Ed25519PrivateKey.generate())
    v1 = script("v1")
    store.publish("grafana", BINARY, v1, "v1")
    w = Moved(tmp_path, store, StoreServer(store.dir).__enter__(), v1)
    try:
        w.top.parent.mkdir(parents=True)
        w.top.write_bytes(v1)
        w.top.chmod(0o755)
        entry = store.manifest().subsystems["grafana"]
        write_version(w.top.parent, VersionInfo(entry.commit, entry.built, sha(v1), "v1"))
        yield w
    finally:
        w.server.__exit__(None, None, None)


def _running(pc: ProcessComposeServer) -> bool:
    return bool(pc.get("grafana")[1]["is_running"])


def test_the_old_copy_goes_once_the_moved_build_is_healthy_and_rollback_still_works(moved: Moved) -> None:
    """(failed before the fix) v2 goes to ``.bin/bin/`` and is healthy: the file left at the top goes
    (with its ``.version``), v1 is kept in ``.bin/bin/.previous/``, and ``rollback`` puts v1 back where
    grafana now runs."""
    v2 = script("v2")
    moved.publish("v2", v2)
    with moved.manager(runs=moved.new) as pc:
        res = moved.agent(pc).reconcile().result("grafana")
        assert res is not None and res.action == "updated", res
        assert res.old_sha == sha(moved.v1) and res.new_sha == sha(v2)
        assert moved.new.read_bytes() == v2
        assert not moved.top.exists(), "the top-level copy is still there"
        assert not (moved.top.parent / ".version").exists()
        prev = moved.new.parent / ".previous"
        assert (prev / BINARY).read_bytes() == moved.v1 and read_version(prev).checksum == sha(moved.v1)
        st = moved.agent(pc).status()["grafana"]
        assert st["sha256"] == sha(v2) and st["previous"] and not st["drift"]

        back = moved.agent(pc).rollback("grafana")
        assert back.action == "updated" and back.error is None, back
        assert moved.new.read_bytes() == moved.v1 and (prev / BINARY).read_bytes() == v2
        assert _running(pc) and read_version(moved.new.parent).checksum == sha(moved.v1)


def test_an_unhealthy_moved_build_puts_the_old_build_back_at_the_new_place(moved: Moved) -> None:
    """(failed before the fix: "unhealthy and nothing to roll back to", the bad build left in place) v2
    exits at once: v1, kept from the top, is restored at ``.bin/bin/``; the top-level copy stays (no
    build proved healthy)."""
    moved.publish("v2", script("v2", ok=False))
    with moved.manager(runs=moved.new) as pc:
        # a settle window: without one, a loaded machine looked before the exit and saw v2 running
        res = moved.agent(pc, settle=1.5).reconcile().result("grafana")
        assert res is not None and res.action == "rolled_back", res
        assert moved.new.read_bytes() == moved.v1
        assert wait_for(lambda: _running(pc), timeout=10, what="v1 running at the new place")
        assert moved.top.read_bytes() == moved.v1


def test_a_copy_the_process_manager_still_runs_is_left_in_place(moved: Moved,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """(failed before the fix: nothing was said) The manager still runs the top-level file (its config
    not moved with the release): that file is not removed, and the warning says why."""
    moved.publish("v2", script("v2"))
    with moved.manager(runs=moved.top) as pc, caplog.at_level(logging.WARNING, "sync_tools.agent.relocated"):
        res = moved.agent(pc).reconcile().result("grafana")
        assert res is not None and res.action == "updated", res
        assert moved.top.read_bytes() == moved.v1
        assert any("runs it" in r.getMessage() for r in caplog.records), caplog.text


def test_the_only_copy_of_a_build_is_left_in_place(moved: Moved, caplog: pytest.LogCaptureFixture) -> None:
    """(failed before the fix: nothing was said) v1 is installed at ``.bin/bin/`` already and the top
    holds v0, a build kept nowhere else: after v2 it stays (``.previous/`` holds v1)."""
    v0 = script("v0")
    moved.top.write_bytes(v0)
    moved.new.parent.mkdir()
    moved.new.write_bytes(moved.v1)
    moved.new.chmod(0o755)
    (moved.new.parent / ".version").write_bytes((moved.top.parent / ".version").read_bytes())
    moved.publish("v2", script("v2"))
    with moved.manager(runs=moved.new) as pc, caplog.at_level(logging.WARNING, "sync_tools.agent.relocated"):
        res = moved.agent(pc).reconcile().result("grafana")
        assert res is not None and res.action == "updated", res
        assert moved.top.read_bytes() == v0
        assert (moved.new.parent / ".previous" / BINARY).read_bytes() == moved.v1
        assert any("only copy" in r.getMessage() for r in caplog.records), caplog.text


def test_a_removal_that_fails_is_a_warning_not_a_failed_install(moved: Moved, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """(failed before the fix: nothing was said) The top-level file cannot be removed (EACCES; the tests
    run as root, which no file mode stops, so the unlink of that one path is made to fail as a
    read-only directory would): the install is still ``updated``, and a warning names the file."""
    real = os.unlink

    def unlink(path: object, *a: object, **kw: object) -> None:
        if os.fspath(path) == str(moved.top):  # type: ignore[arg-type]
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(moved.top))
        real(path, *a, **kw)  # type: ignore[arg-type]

    moved.publish("v2", script("v2"))
    with moved.manager(runs=moved.new) as pc, caplog.at_level(logging.WARNING, "sync_tools.agent.relocated"):
        monkeypatch.setattr(os, "unlink", unlink)
        report = moved.agent(pc).reconcile()
        monkeypatch.setattr(os, "unlink", real)
        assert report.ok and report.result("grafana").action == "updated", report
        assert moved.top.read_bytes() == moved.v1
        assert any("cannot remove" in r.getMessage() and str(moved.top) in r.getMessage()
                   for r in caplog.records), caplog.text
