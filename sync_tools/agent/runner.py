"""The USER agent: reconcile the install root with the signed release, then follow events.

This module is the pipeline (every download, file write, reload); the trust decisions are the pure
:func:`sync_tools.manifest.verify_manifest` over the bytes fetched here. One update runs at a time;
events arriving meanwhile collapse into one more reconcile. A subsystem whose installed binary already
has the manifest's ``binary_sha256`` is never downloaded, rewritten or restarted.
"""

from __future__ import annotations

import logging
import os
import platform as _platform
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from sync_tools.config import Config, Subsystem
from sync_tools.errors import (
    ConfigError,
    DataError,
    ManifestError,
    RemoteError,
    SignatureError,
    SyncToolsError,
)
from sync_tools.fsutil import sha256_file
from sync_tools.manifest import (
    MANIFEST_NAME,
    MAX_MANIFEST_BYTES,
    SIGNATURE_NAME,
    Asset,
    Entry,
    Manifest,
    verify_manifest,
)
from sync_tools.signing import load_public_key
from sync_tools.versionfile import PREVIOUS_DIR, VersionInfo, read_version

from . import delta, install, pending, relocated, statusinfo, subsystems
from .events import AgentEvent
from .extract import extract_binary
from .fetch import Fetcher, ProgressFn, Refusal, TooLargeError, download, make_fetcher, open_part
from .gate import Gate, has_rollout, held_info
from .health import HealthResult
from .pending import NotRestarted
from .reload import Reloader, ReloadError, StartError, make_reloader
from .report import Reporter, StepTimes
from .settle import wait_settled
from .state import ROLLED_BACK, AgentState, load_state, save_state

log = logging.getLogger(__name__)

MAX_SIG_BYTES = 4096
DEFAULT_MAX_ASSET_BYTES = 1 << 30
DEFAULT_MAX_BINARY_BYTES = 2 << 30
#: Seconds a reconcile, recovery or rollback waits for another agent process to finish installing.
LOCK_WAIT = 600.0
#: Seconds the daemon waits for its SSE stream before the start-up reconcile.
SSE_CONNECT_WAIT = 5.0
#: A reconcile whose manifest fetch failed for a transient reason (or found a manifest older than the
#: event, or one that did not verify while the event announced a newer serial than the one applied) is
#: retried after RETRY_BASE, 2x, 4x ... seconds (at most RETRY_MAX) RETRY_ATTEMPTS times, then every
#: RETRY_MAX seconds, until one succeeds, a newer event arrives or the agent stops. The start-up
#: reconcile is retried the same way.
RETRY_BASE = 1.0
RETRY_MAX = 60.0
RETRY_ATTEMPTS = 6
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm"}


def detect_platform() -> str:
    """This machine as ``os/arch`` in Go's names (linux/amd64, darwin/arm64, ...)."""
    machine = _platform.machine().lower()
    return f"{_platform.system().lower()}/{_ARCH.get(machine, machine)}"


@dataclass(frozen=True)
class SubsystemResult:
    """What one reconcile did to one subsystem.

    ``action``: unchanged | updated | rolled_back (new binary failed health, previous restored) |
    failed (nothing was changed, or no previous to restore) | skipped (a build known to fail) |
    missing (the manifest has no asset for this platform) | recovered (a crashed install finished) |
    held (the rollout's wave gate did not allow it yet; ``error`` says why). ``times``: seconds of
    the steps taken (download, install, health); ``retry``: held because the relay could not be asked.
    """

    name: str
    action: str
    old_sha: str | None = None
    new_sha: str | None = None
    version: str | None = None
    error: str | None = None
    bytes: int = 0
    seconds: float = 0.0
    times: Mapping[str, float] = field(default_factory=dict)
    retry: bool = False
    patch: delta.PatchUse | None = None  # the new binary came by patch (bytes, saved)

    @property
    def ok(self) -> bool:
        return self.action in ("unchanged", "updated", "skipped", "recovered", "missing", "held")

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "old_sha256": self.old_sha, "new_sha256": self.new_sha,
                "version": self.version, "error": self.error, "bytes": self.bytes,
                "seconds": round(self.seconds, 3), "times": dict(self.times),
                "patch": self.patch.to_json() if self.patch else None}


@dataclass(frozen=True)
class UpdateReport:
    serial: int | None
    results: tuple[SubsystemResult, ...] = ()
    error: str | None = None
    manifest_bytes: int = 0
    seconds: float = 0.0
    retry: bool = False  # the manifest fetch failed transiently, or was older than the event said
    refused: bool = False  # the error is the release's (signature, manifest), not the network's or the config's

    @property
    def ok(self) -> bool:
        return self.error is None and all(r.ok for r in self.results)

    def result(self, name: str) -> SubsystemResult | None:
        """The final outcome for *name* (a recovered install may be followed by a fresh apply)."""
        return next((r for r in reversed(self.results) if r.name == name), None)

    def results_for(self, name: str) -> list[SubsystemResult]:
        """Every outcome for *name* in this reconcile, in order."""
        return [r for r in self.results if r.name == name]

    def to_json(self) -> dict[str, Any]:
        """``subsystems[name]`` is the final outcome; earlier ones of the same reconcile (a crashed install
        recovered before the apply) are kept, in order, under its ``"earlier"`` list."""
        subs: dict[str, dict[str, Any]] = {}
        for r in self.results:
            j = r.to_json()
            prev = subs.get(r.name)
            if prev is not None:
                j["earlier"] = [*prev.pop("earlier", []), prev]
            subs[r.name] = j
        return {"ok": self.ok, "serial": self.serial, "error": self.error,
                "manifest_bytes": self.manifest_bytes, "seconds": round(self.seconds, 3),
                "subsystems": subs}


def _order(subs: list[Subsystem]) -> list[Subsystem]:
    """Dependencies first (the config has no cycles), otherwise config order."""
    by_name = {s.name: s for s in subs}
    out: list[Subsystem] = []
    seen: set[str] = set()

    def visit(s: Subsystem) -> None:
        if s.name in seen:
            return
        seen.add(s.name)
        for d in s.depends_on:
            if d in by_name:
                visit(by_name[d])
        out.append(s)

    for s in subs:
        visit(s)
    return out


class Agent:
    """Keeps ``<root>/<sub>/.bin/`` on the release's verified binaries.

    Clients are injected (fetcher, reloader, public key, clock); real ones are built from the config
    only when none is given. Raises ConfigError at construction when a needed setting is missing.
    """

    def __init__(self, config: Config, *, root: Path | None = None, source: str | None = None,
                 fetcher: Fetcher | None = None, reloader: Reloader | None = None,
                 public_key: Ed25519PublicKey | None = None, platform: str | None = None,
                 progress: ProgressFn | None = None, now: Callable[[], datetime] | None = None,
                 max_asset_bytes: int = DEFAULT_MAX_ASSET_BYTES,
                 max_binary_bytes: int = DEFAULT_MAX_BINARY_BYTES, health_timeout: float | None = None,
                 lock_timeout: float = LOCK_WAIT, settle_seconds: float | None = None,
                 gate: Gate | None = None, reporter: Reporter | None = None):
        self.config = config
        ac = config.agent
        self.root = Path(root) if root is not None else (config.resolve(ac.root) or config.root)
        self._source = source
        self._fetcher = fetcher
        self._public_key = public_key
        self.reloader = reloader or make_reloader(ac.reload, root=self.root, socket_path=ac.socket,
                                                  url=ac.url, command=ac.command,
                                                  supervisor_url=ac.supervisor_url, restart=ac.restart)
        self.platform = platform or ac.platform or detect_platform()
        self.gate = gate or Gate.from_config(config)  # the rollout wave gate and reports: agent.relay
        self.reporter = reporter or Reporter.from_config(config, platform=self.platform)
        self.progress = progress
        self.now = now
        self.max_asset_bytes = max_asset_bytes
        self.max_binary_bytes = max_binary_bytes
        self.health_timeout = ac.health_timeout if health_timeout is None else health_timeout
        self.settle_seconds = ac.settle_seconds if settle_seconds is None else settle_seconds
        self.journal = install.Journal(self.root)
        self.downloads = self.root / install.STATE_DIR / "downloads"
        self._lock = threading.Lock()  # one update at a time
        self._state_lock = threading.Lock()  # read-modify-write of agent-state.json
        # ... and one agent process at a time in this install root (shared by this process's threads)
        self.agent_lock = install.AgentLock(self.root)
        self.lock_timeout = lock_timeout
        self.retry_base, self.retry_max, self.retry_attempts = RETRY_BASE, RETRY_MAX, RETRY_ATTEMPTS
        self._cond = threading.Condition()
        self._pending: list[AgentEvent] = []
        self._stop = threading.Event()
        self.last_report: UpdateReport | None = None
        self.updating = False
        self.reports: list[UpdateReport] = []
        self.refusal: Refusal | None = None  # the last release refused for its size

    @property
    def fetcher(self) -> Fetcher:
        """The injected fetcher, or one for ``--source`` / ``agent.source`` / ``release.store``, built on
        first use. Raises ConfigError when no source is configured."""
        if self._fetcher is None:
            config = self.config
            src = self._source or config.agent.source or config.release.store
            if not src:
                raise ConfigError("no release source: set agent.source (a URL or a local store) or pass "
                                  "--source", path=config.path, key="agent.source")
            self._fetcher = make_fetcher(src, tag=config.release.tag, base=config.root)
        return self._fetcher

    @property
    def public_key(self) -> Ed25519PublicKey:
        """The pinned key (agent.public_key, else release.public_key), loaded on first use.
        Raises ConfigError when none is configured or it cannot be read."""
        if self._public_key is None:
            config = self.config
            key_ref = config.agent.public_key or config.release.public_key
            if not key_ref:
                raise ConfigError("no pinned public key: set agent.public_key or release.public_key",
                                  path=config.path, key="agent.public_key")
            if not key_ref.lstrip().startswith("-----BEGIN"):
                key_ref = str(config.resolve(key_ref))
            self._public_key = load_public_key(key_ref)
        return self._public_key

    def update_state(self, change: Callable[[AgentState], AgentState]) -> AgentState:
        """Apply *change* to the saved state and write it back (only if it changed), under the install
        root's agent lock. Raises AgentBusy when another agent process holds it too long."""
        with self._state_lock, self.agent_lock.hold(self.lock_timeout):
            before = load_state(self.root)
            after = change(before)
            if after != before:
                save_state(self.root, after)
            return after

    # ------------------------------------------------------------------------------ the pipeline

    def fetch_manifest(self, state: AgentState) -> tuple[Manifest, int]:
        """Fetch manifest.json and its .sig (size-capped) and verify them against the pinned key.

        Raises DownloadError, TooLargeError (over a cap: a refusal), SignatureError or ManifestError
        (expired, serial below the last applied).
        """
        data = self.fetcher.fetch_bytes(MANIFEST_NAME, max_bytes=MAX_MANIFEST_BYTES)
        sig = self.fetcher.fetch_bytes(SIGNATURE_NAME, max_bytes=MAX_SIG_BYTES)
        now = self.now() if self.now else None
        return verify_manifest(data, sig, self.public_key, min_serial=state.serial, now=now), len(data) + len(sig)

    def recover(self) -> list[SubsystemResult]:
        """Finish installs a crash interrupted (see :mod:`.install`), then reload and health-check them."""
        with self._lock, self.agent_lock.hold(self.lock_timeout):
            return self._recover_locked()

    def _recover_locked(self) -> list[SubsystemResult]:
        results = []
        for intent in install.recover(self.journal):
            sub = subsystems.named(self.config, intent.subsystem, intent.binary, bin_dir=Path(intent.bin_dir),
                                   root=self.root)
            if sub is None:
                self.journal.remove(intent.subsystem)
                continue
            res = self._reload_and_check(sub, intent, started=time.monotonic(), moved=0)
            if res.action == "updated":
                res = SubsystemResult(sub.name, "recovered", intent.old_sha, intent.new_sha, seconds=res.seconds)
            results.append(res)
        for sub in subsystems.installed(self.config, self.root):
            install.clean_stale(sub.bin_dir(self.root), sub.binary, self.journal, sub.name)
        install.clean_downloads(self.downloads)  # a crash left them; none is running (we hold the lock)
        return results

    def reconcile(self, event: AgentEvent | None = None) -> UpdateReport:
        """Fetch and verify the manifest, then bring every configured subsystem whose binary differs
        to the manifest's. Never raises for a bad release: the report carries the error and the
        install root is untouched."""
        started = time.monotonic()
        with self._lock:
            self.updating = True
            try:
                with self.agent_lock.hold(self.lock_timeout):
                    report = self._reconcile(started, event)
            finally:
                self.updating = False
        self.last_report = report
        self.reports.append(report)
        del self.reports[:-20]
        self.reporter.send_update(report)  # outside the locks; short timeouts, never raises
        # INFO: the caller shows the report (the CLI prints it), so a failure is on stderr once
        log.info("reconcile (%s): serial %s, %s%s", event.source if event else "start", report.serial,
                 ", ".join(f"{r.name}={r.action}" for r in report.results) or ("nothing done" if report.error
                                                                              else "nothing configured"),
                 f", error: {report.error}" if report.error else "")
        return report

    def _reconcile(self, started: float, event: AgentEvent | None = None) -> UpdateReport:
        report = self._reconcile_release(started, event)
        if report.serial is None:
            # the release could not be had (or was refused): a restart owed since it failed needs none of
            # it, and the service it left stopped must not wait for the network (a kill inside that
            # restart left no intent in the journal: this is what finishes it at the next start)
            try:
                owed = [r for sub in subsystems.installed(self.config, self.root) if (r := pending.finish_owed(self, sub))]
            except (SyncToolsError, OSError) as e:  # an unreadable state: the report has its error already
                log.error("cannot finish the restarts owed since they failed: %s", e)
                owed = []
            if owed:
                report = replace(report, results=tuple(owed), seconds=time.monotonic() - started)
        return report

    def _reconcile_release(self, started: float, event: AgentEvent | None = None) -> UpdateReport:
        state: AgentState | None = None
        if self.refusal is not None and self.refusal.covers(event.serial if event else None):
            return UpdateReport(None, error=self.refusal.error, seconds=time.monotonic() - started)
        try:
            state = load_state(self.root)
            manifest, mbytes = self.fetch_manifest(state)
        except TooLargeError as e:  # final: the same bytes would come again, however often it is asked
            self.refusal = Refusal(str(e), event.serial if event else None)
            return UpdateReport(None, error=str(e), seconds=time.monotonic() - started)
        except RemoteError as e:  # a network fault or an HTTP 5xx: the same fetch may work later
            return UpdateReport(None, error=str(e), seconds=time.monotonic() - started, retry=True)
        except (SignatureError, ManifestError) as e:
            # a cache between manifest.json and its .sig, or one still serving an older manifest, is
            # behind while the event says a newer release exists: look again (never applied meanwhile)
            ahead = (event is not None and event.serial is not None and state is not None
                     and event.serial > state.serial)
            if ahead:
                log.warning("the manifest fetched does not verify (%s) but the event announced serial %s; "
                            "looking again", e, event.serial)
            return UpdateReport(None, error=str(e), seconds=time.monotonic() - started, retry=ahead, refused=True)
        except SyncToolsError as e:
            return UpdateReport(None, error=str(e), seconds=time.monotonic() - started)
        stale = event is not None and event.serial is not None and manifest.serial < event.serial
        if stale:
            log.warning("the event announced serial %s but the manifest fetched is serial %s (a cache "
                        "behind?); applying it and looking again", event.serial, manifest.serial)
        try:
            self.update_state(lambda st: st.with_serial(manifest.serial))
            results = self._recover_locked()  # an intent a failed swap left behind
        except (SyncToolsError, OSError) as e:
            return UpdateReport(manifest.serial, error=f"install root: {e}", seconds=time.monotonic() - started)
        recovered = {r.name: r for r in results}
        for sub in _order(subsystems.for_manifest(self.config, manifest)):
            # a restart owed since it failed comes before anything is decided about the release's build
            # (skipped, held, missing, no entry): those leave the binary in place, and its service stopped;
            # one the recovery just made is in the report already, and owed to the next run if it failed
            owed = pending.finish_owed(self, sub) if sub.name not in recovered else None
            if owed is not None:
                results.append(owed)
            entry = manifest.subsystems.get(sub.name)
            if entry is None:
                continue
            res = self._apply(sub, entry)
            said = owed or (r if (r := recovered.get(sub.name)) and not r.ok else None)
            if said is None or res.action != "unchanged":  # after the owed or failed restart: adds nothing
                results.append(res)
        return UpdateReport(manifest.serial, tuple(results), manifest_bytes=mbytes,
                            seconds=time.monotonic() - started, retry=stale or any(r.retry for r in results))

    def _apply(self, sub: Subsystem, entry: Entry) -> SubsystemResult:
        started = time.monotonic()
        asset = entry.assets.get(self.platform)
        if asset is None:
            return SubsystemResult(sub.name, "missing", error=f"no asset for {self.platform}")
        bin_dir = sub.bin_dir(self.root)
        target = bin_dir / sub.binary
        old_sha = sha256_file(target) if target.is_file() else None
        if old_sha == asset.binary_sha256:  # (a restart owed since it failed was finished before)
            self.update_state(lambda st: st.with_held(sub.name, None))
            return SubsystemResult(sub.name, "unchanged", old_sha, old_sha, entry.version)
        state = load_state(self.root)
        if state.failed.get(sub.name) == asset.binary_sha256:
            return SubsystemResult(sub.name, "skipped", old_sha, asset.binary_sha256, entry.version,
                                   error=f"held back: this build {state.failed_because(sub.name)}; waiting for a new one")
        gate = self.gate.decide(sub.name, asset.binary_sha256, has_policy=has_rollout(entry))
        held = None if gate.allowed else asset.binary_sha256
        self.update_state(lambda st: st.with_held(sub.name, held, gate.reason))
        if not gate.allowed:
            return SubsystemResult(sub.name, "held", old_sha, asset.binary_sha256, entry.version, gate.reason,
                                   retry=gate.retry)
        moved, times, fetched = 0, StepTimes(), delta.Fetched(0)
        try:
            with times("download"):
                fetched = self._stage(sub, asset)
                moved = fetched.moved
            with times("install"):
                info = VersionInfo(commit=entry.commit, timestamp=entry.built, checksum=asset.binary_sha256,
                                   version=entry.version)
                intent = install.begin(self.journal, subsystem=sub.name, bin_dir=bin_dir, binary=sub.binary,
                                       new_sha=asset.binary_sha256, new_version=info,
                                       replaces=relocated.keep_previous(sub, self.root, asset.binary_sha256))
                install.swap(intent)
        except SyncToolsError as e:
            swapped = target.is_file() and sha256_file(target) == asset.binary_sha256
            if not swapped:  # the old binary is in place: drop the intent
                install.staged_path(bin_dir, sub.binary).unlink(missing_ok=True)
                self.journal.remove(sub.name)
            # else the new verified binary is in place but .version is not: the intent stays, and the
            # next reconcile's (or start's) recovery rewrites .version, reloads and health-checks
            return SubsystemResult(sub.name, "failed", old_sha, asset.binary_sha256, entry.version,
                                   error=str(e), bytes=moved, seconds=time.monotonic() - started,
                                   times=times.done())
        with times("health"):  # restart, health check, settle window (and the restore when unhealthy)
            res = self._reload_and_check(sub, intent, started=started, moved=moved)
        return SubsystemResult(res.name, res.action, intent.old_sha, res.new_sha, entry.version, res.error,
                               moved, res.seconds, times.done(), patch=fetched.patch)

    def _stage(self, sub: Subsystem, asset: Asset) -> delta.Fetched:
        """Patch the installed binary (:mod:`.delta`) or download, check and extract *asset* into the
        staged path. Returns the bytes moved and the patch used.

        Raises DownloadError, DataError/ArchiveError or install.InstallError (a local write failed).
        """
        bin_dir = sub.bin_dir(self.root)
        staged = install.staged_path(bin_dir, sub.binary)
        part = install.own_dir(self.downloads) / asset.name  # named as the asset so archive errors name it
        try:
            bin_dir.mkdir(parents=True, exist_ok=True)
            staged.unlink(missing_ok=True)
            by_patch = delta.stage_by_patch(self.fetcher, asset, installed=bin_dir / sub.binary, staged=staged,
                                            downloads=self.downloads, max_binary_bytes=self.max_binary_bytes,
                                            progress=self.progress)
            if by_patch.patch is not None:
                install.crash_point("staged")
                return by_patch
            with open_part(part) as out:
                moved = by_patch.moved + download(self.fetcher, asset.name, out, size=asset.size,
                                                  sha256=asset.sha256, max_bytes=self.max_asset_bytes,
                                                  progress=self.progress)
            install.crash_point("downloaded")
            sha = extract_binary(part, sub.binary, staged, max_bytes=self.max_binary_bytes)
            if sha != asset.binary_sha256:
                staged.unlink(missing_ok=True)
                raise DataError(f"{asset.name}: binary sha256 {sha} does not match the manifest's "
                                f"binary_sha256 {asset.binary_sha256}")
            install.crash_point("staged")
            return delta.Fetched(moved)
        except OSError as e:
            staged.unlink(missing_ok=True)
            raise install.InstallError(f"{sub.name}: cannot write {e.filename or bin_dir}: "
                                       f"{e.strerror or e}") from e
        finally:
            try:
                part.unlink(missing_ok=True)
            except OSError as e:  # a directory put there: left alone, and it must not end the reconcile
                log.warning("cannot remove %s: %s", part, e.strerror or e)

    def _health(self, sub: Subsystem) -> HealthResult:
        return wait_settled(sub.health, reloader=self.reloader, process=sub.process, cwd=self.root,
                            health_timeout=self.health_timeout, settle_seconds=self.settle_seconds)

    def _reload_and_check(self, sub: Subsystem, intent: install.Intent, *, started: float,
                          moved: int) -> SubsystemResult:
        """Restart the process on the swapped binary and wait for health; on failure put the previous
        binary back (without losing .previous), restart again, and report ``rolled_back``."""
        health = self._restart_and_check(sub, reloaded_step=True)
        if health.ok:
            install.crash_point("healthy")
            self.journal.remove(sub.name)
            if intent.kind == "update":  # a new build proved healthy
                self.update_state(lambda st: st.with_failed(sub.name, None))
                relocated.remove_stale(sub, self.root)
            elif intent.kind == "rollback":  # a recovered rollback: keep away from what it left
                self._hold_back(sub, intent)
            # a (recovered) restore keeps the mark: the build it replaced failed, until the release changes
            return SubsystemResult(sub.name, "updated", intent.old_sha, intent.new_sha,
                                   bytes=moved, seconds=time.monotonic() - started)
        if intent.kind == "restore":  # a recovered restore: the previous binary unhealthy, or not restarted
            self.journal.remove(sub.name)
            return SubsystemResult(sub.name, "failed", intent.old_sha, intent.new_sha,
                                   error=pending.put_back_error(health), seconds=time.monotonic() - started)
        # A manager whose call failed never ran the new binary: the build is not marked (one HTTP 500
        # would hold a good build back until the release changes); it is tried again at the next run.
        untried = isinstance(health, NotRestarted)
        if untried:
            log.error("%s: the restart onto %s failed (%s); putting the previous binary back", sub.name,
                      intent.new_sha[:12], health.detail)
            marked = True
        else:
            log.error("%s: new binary %s unhealthy (%s); rolling back", sub.name, intent.new_sha[:12],
                      health.detail)
            # The mark goes first, so a crash during the restore still keeps the build away; but a mark
            # that cannot be written must not keep the restore from happening: it is tried again afterwards.
            marked = self._mark_failed(sub, intent.new_sha)
        what = health.detail if untried else f"new binary unhealthy ({health.detail})"
        if intent.old_sha is None:
            self.journal.remove(sub.name)
            error = (f"{health.detail}; nothing to roll back to, the restart is tried again at the next run"
                     if untried else f"unhealthy and nothing to roll back to: {health.detail}")
            result = SubsystemResult(sub.name, "failed", intent.old_sha, intent.new_sha, error=error,
                                     bytes=moved, seconds=time.monotonic() - started)
        else:
            try:
                self._restore_previous(sub, intent)
            except (SyncToolsError, OSError) as e:
                error = f"{what}; restoring the previous one failed: {e}"
                result = SubsystemResult(sub.name, "failed", intent.old_sha, intent.new_sha, error=error,
                                         bytes=moved, seconds=time.monotonic() - started)
            else:  # when the build never ran, nothing changed: "failed", not a rollback of the build
                again = ", the build is tried again at the next run" if untried else ""
                result = SubsystemResult(sub.name, "failed" if untried else "rolled_back", intent.old_sha,
                                         intent.new_sha, error=f"{what}; previous restored{again}",
                                         bytes=moved, seconds=time.monotonic() - started)
        if not marked and not self._mark_failed(sub, intent.new_sha):
            result = replace(result, error=f"{result.error}; the failed build could not be recorded, so it "
                                           "may be tried again")
        return result

    def _mark_failed(self, sub: Subsystem, sha: str) -> bool:
        """Record *sha* as a build of *sub* that failed its health check. False (logged) when the agent
        state cannot be written."""
        try:
            self.update_state(lambda st: st.with_failed(sub.name, sha))
        except Exception:  # noqa: BLE001 - whatever the state file does, the restore must go on
            log.exception("%s: cannot record the failed build %s in the agent state", sub.name, sha[:12])
            return False
        return True

    def _restart_and_check(self, sub: Subsystem, *, reloaded_step: bool = False) -> HealthResult:
        """Restart *sub*'s process and wait for health. Never raises: a backend that fails in any way
        (a ReloadError, or a bug or an answer nobody foresaw) is an unhealthy result, so the caller
        still rolls back and ends its intent; a :class:`NotRestarted` one when the manager's call
        failed before the process was started (a StartError is the binary's failure)."""
        try:
            self.reloader.restart(sub.process)
            pending.note_reload(self, sub.name, None)
            if reloaded_step:
                install.crash_point("reloaded")
            return self._health(sub)
        except StartError as e:
            pending.note_reload(self, sub.name, str(e))
            return HealthResult(False, f"reload failed: {e}")
        except ReloadError as e:
            pending.note_reload(self, sub.name, str(e))
            return NotRestarted(False, f"reload failed: {e}")
        except Exception as e:  # noqa: BLE001 - see the docstring
            log.exception("%s: restart or health check failed unexpectedly", sub.name)
            return HealthResult(False, f"reload or health check failed: {type(e).__name__}: {e}")

    def _swap_previous_in(self, sub: Subsystem, kind: str, replaced: install.Intent | None = None,
                          ) -> tuple[install.Intent, VersionInfo, HealthResult]:
        """Put the verified ``.previous`` binary in place, restart, check health, end the intent.

        ``kind="rollback"`` swaps (the current binary becomes ``.previous``); ``kind="restore"`` (after the
        failed update *replaced*) leaves ``.previous`` as it is, so the good binary is never replaced by
        the bad one, and verifies it against the sha256 *replaced* recorded (its own ``.version`` may be
        missing or stale: the binary was installed before the agent). Raises InstallError/DataError when
        there is no verified previous binary.
        """
        bin_dir = sub.bin_dir(self.root)
        if replaced is not None:
            sha, info = install.stage_previous(bin_dir, sub.binary, expect_sha=replaced.old_sha,
                                               expect_version=replaced.old_version)
        else:
            sha, info = install.stage_previous(bin_dir, sub.binary)
        intent = install.begin(self.journal, subsystem=sub.name, bin_dir=bin_dir, binary=sub.binary,
                               new_sha=sha, new_version=info, kind=kind)
        install.swap(intent, keep_previous=kind == "rollback")
        health = self._restart_and_check(sub)
        self.journal.remove(sub.name)
        return intent, info, health

    def _restore_previous(self, sub: Subsystem, replaced: install.Intent) -> None:
        """After the failed update *replaced*: the binary it replaced back in, healthy. Raises
        SyncToolsError otherwise."""
        _, _, health = self._swap_previous_in(sub, "restore", replaced)
        if not health.ok:
            raise RemoteError(pending.put_back_error(health))

    def _hold_back(self, sub: Subsystem, intent: install.Intent) -> None:
        """After a rollback: mark the build rolled away from, so reconciles skip it until the release
        publishes a different one (the same mark as a build that failed its health check)."""
        if intent.old_sha is not None and intent.old_sha != intent.new_sha:
            old = intent.old_sha
            self.update_state(lambda st: st.with_failed(sub.name, old, ROLLED_BACK))

    def rollback(self, name: str) -> SubsystemResult:
        """``sync-tools rollback NAME``: swap ``.previous`` and the current binary, restart, check
        health. When healthy, the build rolled away from is held back: reconciles skip it until the
        release has a new build of NAME. When not, the two are swapped back (and restarted): a failed
        rollback leaves NAME as it was. Raises ConfigError (unknown name), InstallError/DataError (no
        verified previous), AgentBusy (another agent process kept the install root's lock too long)."""
        sub = subsystems.installed_named(self.config, self.root, name)
        started = time.monotonic()
        with self._lock, self.agent_lock.hold(self.lock_timeout):
            # finish an install a crash interrupted first: otherwise the half-written state (a new
            # binary under the old .version) would be saved as .previous, and refused next time
            self._recover_locked()
            if statusinfo.previous_is_current(sub.bin_dir(self.root), sub.binary):
                raise install.InstallError(f"{name}: .previous is the build already installed (an automatic "
                                           "rollback put it back): there is nothing to roll back to")
            intent, info, health = self._swap_previous_in(sub, "rollback")
            if health.ok:
                self._hold_back(sub, intent)
                return SubsystemResult(sub.name, "updated", intent.old_sha, intent.new_sha, info.version,
                                       seconds=time.monotonic() - started)
            # a rollback that fails changes nothing: the binary it replaced (running a moment ago) goes
            # back, rather than leaving a binary known to be unhealthy in place
            log.error("%s: the rollback to %s failed (%s); putting back %s", sub.name,
                      intent.new_sha[:12], health.detail, (intent.old_sha or "?")[:12])
            back: HealthResult | Exception
            try:
                _, _, back = self._swap_previous_in(sub, "rollback")
            except (SyncToolsError, OSError) as e:
                back = e
            error = pending.rollback_error(health, back)
        return SubsystemResult(sub.name, "failed", intent.old_sha, intent.new_sha, info.version, error,
                               seconds=time.monotonic() - started)

    # ------------------------------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        """Per subsystem: installed version and sha256, .version drift, the backend's process state."""
        out: dict[str, Any] = {}
        for sub in subsystems.installed(self.config, self.root):
            bin_dir = sub.bin_dir(self.root)
            target = bin_dir / sub.binary
            sha = sha256_file(target) if target.is_file() else None
            try:
                info = read_version(bin_dir)
                version_error = None
            except DataError as e:
                info, version_error = None, str(e)
            prev = bin_dir / PREVIOUS_DIR / sub.binary
            try:
                running = self.reloader.status(sub.process).to_json()
            except ReloadError as e:
                running = {"running": None, "status": "unreachable", "error": str(e)}
            out[sub.name] = {
                "installed": sha is not None,
                "sha256": sha,
                "version": info.version if info else None,
                "commit": info.commit if info else None,
                "version_file_checksum": info.checksum if info else None,
                # a .version whose binary is gone is drift too (`verify`: missing-binary)
                "drift": (info is not None if sha is None else (info is None or info.checksum != sha))
                or version_error is not None,
                "version_file_error": version_error,
                "previous": prev.is_file(),
                "process": sub.process,
                "running": running,
                "held": held_info(self.root, sub.name, sha),
                "exe": statusinfo.process_exe(running.get("pid"), sha, installed=target),
                **statusinfo.bookkeeping(self.root, sub.name, sha),
            }
        return out

    # ------------------------------------------------------------------------------- event loop

    def submit(self, event: AgentEvent) -> None:
        """Queue an event; events that arrive while an update runs collapse into one more reconcile."""
        with self._cond:
            self._pending.append(event)
            self._cond.notify()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    def run_forever(self, *, on_report: Callable[[UpdateReport], None] | None = None,
                    retry: UpdateReport | None = None) -> None:
        """Process queued events until :meth:`stop`: one reconcile per batch of events.

        *retry*: the start-up reconcile's report; when it asks for a retry, that comes first (with the
        same backoff as an event's), until it works or an event supersedes it.
        """
        if retry is not None:
            self._reconcile_with_retries(None, on_report, first=retry)
        while not self._stop.is_set():
            with self._cond:
                while not self._pending and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set():
                    return
                batch, self._pending = self._pending, []
            log.info("%d event(s) -> one reconcile", len(batch))
            self._reconcile_with_retries(coalesce(batch), on_report)

    def _reconcile_with_retries(self, event: AgentEvent | None,
                                on_report: Callable[[UpdateReport], None] | None, *,
                                first: UpdateReport | None = None) -> None:
        """One reconcile for *event* (None: the start-up one, already made when *first* is its
        report); when it asks for a retry (a transient fetch failure, a manifest behind the event),
        again after exponential backoff, then every ``retry_max`` seconds, until one does not ask, a
        newer event arrives or the agent stops. Never raises: an unexpected error is logged and the
        loop goes on to the next event."""
        attempt = 0
        report = first
        while True:
            if report is None:
                try:
                    report = self.reconcile(event)
                except (SyncToolsError, OSError) as e:  # e.g. an unreadable state file: keep serving
                    log.error("reconcile failed: %s", e)
                    return
                except Exception:  # noqa: BLE001 - a bug must not end the event loop
                    log.exception("reconcile failed unexpectedly; waiting for the next event")
                    return
                if on_report is not None:
                    on_report(report)
            if not report.retry:
                return
            delay = min(self.retry_max, self.retry_base * 2 ** attempt)
            attempt += 1
            if attempt <= self.retry_attempts:
                log.warning("retrying the reconcile in %gs (attempt %d of %d)", delay, attempt,
                            self.retry_attempts)
            else:
                log.warning("retrying the reconcile in %gs (attempt %d; it keeps trying at this pace)",
                            delay, attempt)
            report = None
            with self._cond:
                self._cond.wait_for(lambda: bool(self._pending) or self._stop.is_set(), timeout=delay)
                if self._pending or self._stop.is_set():
                    return  # a newer event gets its own reconcile

    def health_info(self) -> dict[str, Any]:
        """The agent's own readiness, for ``GET /health``."""
        last = self.last_report
        return {"ready": last is not None, "updating": self.updating,
                "serial": last.serial if last else None, "ok": last.ok if last else None,
                "pid": os.getpid()}


def coalesce(batch: list[AgentEvent]) -> AgentEvent:
    """The one event a batch is reconciled as: the last one, carrying the highest serial any of them
    announced (a later event without a serial, such as an SSE reconnect, must not hide it)."""
    last = batch[-1]
    serials = [e.serial for e in batch if e.serial is not None]
    if serials and last.serial != max(serials):
        return replace(last, serial=max(serials))
    return last


def parse_listen(listen: str) -> tuple[str, int]:
    """``host:port`` (or ``:port`` / ``port``: loopback) -> (host, port). Raises ConfigError."""
    host, _, port = listen.rpartition(":")
    try:
        return (host.strip("[]") or "127.0.0.1"), int(port)
    except ValueError as e:
        raise ConfigError(f"agent.listen must be host:port, not {listen!r}") from e


def serve(agent: Agent, *, relay: str | None = None, token: str | None = None, listen: str | None = None,
          secret: str | None = None, on_report: Callable[[UpdateReport], None] | None = None,
          on_ready: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Run the agent until ``agent.stop()``: finish crashed installs, reconcile once, then apply events
    from the relay's SSE stream (*relay*, *token*) and/or pushes to its own receiver (*listen*, *secret*).

    Raises ConfigError, before anything is done, when *listen* is set without a *secret* (an unverified
    receiver is refused) or with one that is not ``whsec_<base64>``.
    """
    from .events import SSEClient, WebhookVerifier, create_receiver, make_receiver_server

    if listen and not secret:
        raise ConfigError(f"agent.listen is set but the secret (${agent.config.agent.secret_env}) is not: "
                          "refusing to accept unverified pushes")
    verifier: WebhookVerifier | None = None
    if listen:  # a secret no push of the relay's could verify against: stop now, not after a reconcile
        try:
            verifier = WebhookVerifier(secret or "")
        except ConfigError as e:
            raise ConfigError(f"${agent.config.agent.secret_env}: {e}") from e
    threads: list[threading.Thread] = []
    sse: SSEClient | None = None
    server = None
    try:
        recovered = agent.recover()
        for res in recovered:
            log.warning("recovered %s: %s", res.name, res.action)
        agent.reporter.send_start(agent, recovered)
        info: dict[str, Any] = {}
        startup_began = threading.Event()
        if relay:
            def connected(count: int, resumed_from: str | None) -> None:
                # A connect without a resume point streams from the relay's tail: events published since
                # the start-up reconcile began (or since the last connect) were missed. Look once more.
                if resumed_from is None and (count > 1 or startup_began.is_set()):
                    agent.submit(AgentEvent(type="reconnected", source="sse"))

            state = load_state(agent.root)
            sse = SSEClient(relay, token, agent.submit, last_event_id=state.last_event_id, on_connect=connected,
                            on_event_id=lambda eid: agent.update_state(lambda st: st.with_event_id(eid)))
            info["relay"] = sse.url
            info["sse_connected"] = sse.connected  # a threading.Event, set while the stream is open
            sse_thread = threading.Thread(target=sse.run, name="agent-sse", daemon=True)
            sse_thread.start()
            threads.append(sse_thread)
            # Subscribe before the start-up reconcile, so a release between the two is not missed.
            if not sse.connected.wait(SSE_CONNECT_WAIT):
                log.warning("SSE %s not connected yet; reconciling anyway, it keeps retrying", sse.url)
        startup_began.set()
        try:
            report: UpdateReport | None = agent.reconcile()
        except install.AgentBusy as e:  # another agent process is installing: look again afterwards
            log.error("start-up reconcile: %s", e)
            agent.submit(AgentEvent(type="start", source="start"))
            report = None
        if on_report is not None and report is not None:
            on_report(report)
        if listen and verifier is not None:
            host, port = parse_listen(listen)
            app = create_receiver(verifier, agent.submit, agent.health_info)
            server = make_receiver_server(app, host, port)
            info["listen"] = f"http://{host}:{server.server_port}"
            threads.append(threading.Thread(target=server.serve_forever, name="agent-receiver", daemon=True))
        for t in threads:
            if not t.is_alive():
                t.start()
        if on_ready is not None:
            on_ready(info)
        # a start-up reconcile that failed transiently (the network not up yet at boot) is retried
        agent.run_forever(on_report=on_report, retry=report if report is not None and report.retry else None)
    finally:
        if sse is not None:
            sse.stop()
        if server is not None:
            server.shutdown()
        for t in threads:
            t.join(timeout=5)
