"""Real parts for the agent's tests and benchmarks: releases made by hand, a Range-capable HTTP server
over the release store, a real supervisord, and tiny services that answer a health URL.

- :class:`ReleaseStore` writes ``<store>/<tag>/`` itself with the pure core (tarfile, ``Entry``/``Asset``,
  ``with_entry``, ``sign_manifest``): asset files + ``manifest.json`` + ``manifest.json.sig``.
- :class:`StoreServer`: a threaded HTTP server on 127.0.0.1:0 serving that directory with ``Range``,
  counting the bytes it sends per file, and able to cut a transfer after N bytes (once).
- :class:`Supervisord`: supervisord in a temp dir with a generated config and a unix socket.
- :func:`service_binary`: the bytes of a "binary" (a /bin/sh script exec-ing a Python health server)
  that differ per version; padding makes it any size without slowing it down (sh never reads past the
  ``exec`` line).
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import xmlrpc.client
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sync_tools.agent.reload import SupervisorReloader
from sync_tools.fsutil import atomic_write_bytes
from sync_tools.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    Asset,
    Entry,
    Manifest,
    asset_name,
    format_time,
    parse_manifest,
    sign_manifest,
    with_entry,
)
from sync_tools.rollout import RolloutPolicy
from sync_tools.signing import public_key_pem
from sync_tools.versionfile import VersionInfo, write_version
from tests.support import free_port

PLATFORM = "linux/amd64"
SUPERVISORD = str(Path(sys.executable).parent / "supervisord")

SERVICE_PY = r'''
import http.server, os, sys
version, mode = sys.argv[1], sys.argv[2]
if mode == "crash":
    sys.exit(3)
if mode.startswith("dies:"):  # healthy at first, then the process exits (status 1) after that many seconds
    import threading
    threading.Timer(float(mode[5:]), lambda: os._exit(1)).start()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        code = 500 if mode == "unhealthy" else 200
        body = f"{version} {os.getpid()}".encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
'''


def service_binary(service_py: Path, version: str, *, mode: str = "ok", size: int = 0) -> bytes:
    """A runnable "binary": sh exec-s the health server with *version*; *mode* ok | unhealthy | crash |
    ``dies:<seconds>`` (answers 200, then exits after that many seconds: passes a first health check)."""
    head = f'#!/bin/sh\nexec "{sys.executable}" "{service_py}" "{version}" "{mode}"\n'.encode()
    if size > len(head):
        # incompressible padding, so a 20 MB binary is a 20 MB download
        head += b"#" + hashlib.shake_256(version.encode()).digest(size - len(head) - 1)
    return head


def tar_gz(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    """A gzip'd tar of the given members (data None for non-files), deterministic."""
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=1) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for info, data in members:
                tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def file_member(name: str, data: bytes, mode: int = 0o755) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    info.mtime = 0
    return info, data


def special_member(name: str, kind: bytes, **attrs: object) -> tuple[tarfile.TarInfo, None]:
    """A data-less tar member (symlink, device, fifo, directory) with *attrs* set on its TarInfo."""
    info = tarfile.TarInfo(name)
    info.type = kind
    for k, v in attrs.items():
        setattr(info, k, v)
    return info, None


@dataclass
class ReleaseStore:
    """``<store>/<tag>/`` written by hand, signed with *key*."""

    store: Path
    key: Ed25519PrivateKey
    tag: str = "latest"
    expires_days: float = 30.0

    @property
    def dir(self) -> Path:
        return self.store / self.tag

    def public_pem(self) -> bytes:
        return public_key_pem(self.key)

    def manifest(self) -> Manifest | None:
        p = self.dir / MANIFEST_NAME
        return parse_manifest(p.read_bytes()) if p.exists() else None

    def write_manifest(self, m: Manifest, key: Ed25519PrivateKey | None = None,
                       signature: bytes | None = None) -> None:
        data, sig = sign_manifest(m, key or self.key)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.dir / MANIFEST_NAME, data)
        atomic_write_bytes(self.dir / SIGNATURE_NAME, signature if signature is not None else sig)

    def publish_archive(self, name: str, binary: str, archive: bytes, binary_sha256: str, version: str,
                        *, platform: str = PLATFORM, asset_sha256: str | None = None,
                        now: datetime | None = None, rollout: dict | None = None,
                        path: str | None = None) -> Manifest:
        """Upload *archive* as name's asset and re-sign the manifest (serial + 1); *rollout*: the entry's
        rollout policy (issue 15), as the manifest's JSON has it; *path*: the entry's place for the binary
        under ``.bin`` (``bin/grafana-server``)."""
        aname = asset_name(binary, platform)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.dir / aname, archive)
        asset = Asset(aname, len(archive), asset_sha256 or hashlib.sha256(archive).hexdigest(), binary_sha256)
        entry = Entry(version=version, commit=hashlib.sha1(version.encode()).hexdigest(),
                      built=format_time(now or datetime.now(UTC)),
                      assets=MappingProxyType({platform: asset}), binary=binary,
                      rollout=None if rollout is None else RolloutPolicy.from_json(rollout), path=path)
        base = self.manifest() or Manifest(serial=0, created=format_time(datetime.now(UTC)),
                                           expires=format_time(datetime.now(UTC)))
        m = with_entry(base, name, entry, now=now, expires_days=self.expires_days)
        self.write_manifest(m)
        return m

    def publish(self, name: str, binary: str, data: bytes, version: str, **kw: object) -> Manifest:
        archive = tar_gz([file_member(binary, data)])
        return self.publish_archive(name, binary, archive, hashlib.sha256(data).hexdigest(), version, **kw)

    def expire(self) -> None:
        m = self.manifest()
        assert m is not None
        past = datetime.now(UTC) - timedelta(days=1)
        self.write_manifest(replace(m, serial=m.serial + 1, expires=format_time(past)))


class _StoreHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: StoreServer._Server

    def log_message(self, *a: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        srv = self.server.owner
        name = self.path.lstrip("/").split("?")[0]
        path = srv.root / name
        if "/" in name or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        start = 0
        rng = self.headers.get("Range")
        srv.requests.append((name, rng))
        if srv.fail_next.get(name, 0) > 0:
            srv.fail_next[name] -= 1
            self.send_error(503)
            return
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and srv.ranges:
            start = int(m.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        cut = srv.cut_once.pop(name, None)
        if cut is not None:
            self.wfile.write(body[:cut])
            srv.sent[name] = srv.sent.get(name, 0) + cut
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)
        srv.sent[name] = srv.sent.get(name, 0) + len(body)


@dataclass
class StoreServer:
    """Serves *root* on 127.0.0.1:0 with Range support; ``cut_once[name] = n`` cuts the next transfer
    of *name* after n bytes; ``fail_next[name] = n`` answers the next n requests for it with HTTP 503;
    ``sent`` counts body bytes per file."""

    root: Path
    ranges: bool = True
    cut_once: dict[str, int] = field(default_factory=dict)
    fail_next: dict[str, int] = field(default_factory=dict)
    sent: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str | None]] = field(default_factory=list)

    class _Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        owner: StoreServer

    def __post_init__(self) -> None:
        self._httpd = self._Server(("127.0.0.1", 0), _StoreHandler)
        self._httpd.owner = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def __enter__(self) -> StoreServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def reset(self) -> None:
        self.sent.clear()
        self.requests.clear()


class Supervisord:
    """A real supervisord with a unix socket in a short temp dir (socket paths are limited to ~100
    bytes), running one program per ``(name, command, env)``; stopped in :meth:`stop`. Programs named in
    *autorestart* are restarted by supervisord when they exit (as a real deployment would have it)."""

    def __init__(self, programs: list[tuple[str, str, dict[str, str]]], *, autorestart: tuple[str, ...] = ()):
        self.dir = Path(tempfile.mkdtemp(prefix="sv"))
        self.sock = self.dir / "s.sock"
        lines = [
            "[unix_http_server]", f"file={self.sock}", "",
            "[supervisord]", f"logfile={self.dir / 'supervisord.log'}", f"pidfile={self.dir / 'sd.pid'}",
            "nodaemon=true", f"childlogdir={self.dir}", "logfile_maxbytes=0", "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
            "[supervisorctl]", f"serverurl=unix://{self.sock}", "",
        ]
        for name, command, env in programs:
            envs = ",".join(f'{k}="{v}"' for k, v in env.items())
            lines += [f"[program:{name}]", f"command={command}", "startsecs=0", "startretries=0",
                      f"autorestart={'true' if name in autorestart else 'false'}", "stopwaitsecs=5",
                      "stopasgroup=true", "killasgroup=true"]
            if envs:
                lines.append(f"environment={envs}")
            lines.append("")
        self.conf = self.dir / "supervisord.conf"
        self.conf.write_text("\n".join(lines))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"

    def start(self, timeout: float = 10.0) -> Supervisord:
        self.proc = subprocess.Popen([SUPERVISORD, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        reloader = SupervisorReloader(self.url, timeout=2)
        while time.monotonic() < deadline:
            try:
                reloader._call("getState")
                return self
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.05)
        raise RuntimeError(f"supervisord did not start: {(self.dir / 'supervisord.log').read_text()[-2000:]}")

    def rpc(self) -> xmlrpc.client.ServerProxy:
        return SupervisorReloader(self.url, timeout=5)._proxy()

    def info(self, name: str) -> dict:
        return self.rpc().supervisor.getProcessInfo(name)

    def pid(self, name: str) -> int:
        return int(self.info(name)["pid"])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # supervisord's own shutdown ticks slowly (about a second): kill its programs and it directly
            try:
                pids = [p["pid"] for p in self.rpc().supervisor.getAllProcessInfo() if p["pid"]]
            except Exception:  # noqa: BLE001 - it may be dead already
                pids = []
            self.proc.send_signal(signal.SIGKILL)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def wait_http(url: str, timeout: float = 5.0) -> str:
    """The body of the first 2xx answer from *url* within *timeout*; raises AssertionError otherwise."""
    import requests

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            r = requests.get(url, timeout=1)
            if r.ok:
                return r.text
            last = f"HTTP {r.status_code}"
        except requests.RequestException as e:
            last = str(e)
        time.sleep(0.05)
    raise AssertionError(f"{url} not healthy: {last}")


def snapshot(paths: list[Path]) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime_ns of every file under *paths* (to prove a subsystem was not touched)."""
    out = {}
    for base in paths:
        for p in sorted(base.rglob("*")):
            if p.is_file():
                out[str(p)] = (p.read_bytes(), os.stat(p).st_mtime_ns)
    return out


DEFAULT_NAMES = {"nats": "nats-server", "arc": "arc", "web": "web-srv"}


@dataclass
class World:
    """An install root whose services run under a real supervisord, fed by a release served over HTTP."""

    base: Path
    store: ReleaseStore
    server: StoreServer
    supervisor: Supervisord
    binaries: dict[str, str]
    ports: dict[str, int]
    service_py: Path
    config_path: Path

    @property
    def root(self) -> Path:
        return self.base / "root"

    def config(self):  # noqa: ANN201
        from sync_tools.config import load_config

        return load_config(self.config_path)

    def binary(self, name: str, version: str, **kw: object) -> bytes:
        return service_binary(self.service_py, f"{name}-{version}", **kw)  # type: ignore[arg-type]

    def publish(self, name: str, version: str, **kw: object) -> bytes:
        data = self.binary(name, version, **kw)
        self.store.publish(name, self.binaries[name], data, version)
        return data

    def bin_path(self, name: str) -> Path:
        return self.root / name / ".bin" / self.binaries[name]

    def sha(self, name: str) -> str:
        return hashlib.sha256(self.bin_path(name).read_bytes()).hexdigest()

    def agent(self, **kw: object):  # noqa: ANN201
        from sync_tools.agent.fetch import HTTPFetcher
        from sync_tools.agent.runner import Agent

        kw.setdefault("fetcher", HTTPFetcher(self.server.url))
        return Agent(self.config(), **kw)  # type: ignore[arg-type]

    def health(self, name: str, timeout: float = 5.0) -> str:
        return wait_http(f"http://127.0.0.1:{self.ports[name]}/health", timeout)

    def wait_version(self, name: str, version: str, timeout: float = 15.0) -> str:
        """Poll the health URL until the service answers as *version* (a swap is visible on disk before
        the restart, so the old process may answer first). Raises AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        body = ""
        while time.monotonic() < deadline:
            body = wait_http(f"http://127.0.0.1:{self.ports[name]}/health", max(0.1, deadline - time.monotonic()))
            if body.startswith(f"{name}-{version} "):
                return body
            time.sleep(0.02)
        raise AssertionError(f"{name} still answers {body!r}, not {version}")

    def untouched_state(self, changed: str) -> tuple[dict, dict[str, int]]:
        """Files (bytes + mtimes) and supervisor pids of every subsystem except *changed*."""
        others = [n for n in self.binaries if n != changed]
        return snapshot([self.root / n for n in others]), {n: self.supervisor.pid(n) for n in others}


def make_world(base: Path, names: dict[str, str] | None = None, *, health_timeout: float = 5.0,
               settle_seconds: float = 0.0, autorestart: tuple[str, ...] = (), agent_extra: str = "") -> World:
    """Publish v1 of every subsystem, install the same bytes by hand (as a previous agent run would have;
    the agent's own first install is tested on its own), and start supervisord running them.
    *settle_seconds* is agent.settle_seconds (0 here: only the settle tests wait out a window);
    *autorestart*: programs supervisord restarts when they exit; *agent_extra*: more ``agent:`` lines."""
    names = dict(names or DEFAULT_NAMES)
    key = Ed25519PrivateKey.generate()
    store = ReleaseStore(base / "store", key)
    (base / "root").mkdir(parents=True)
    (base / "keys").mkdir()
    (base / "keys" / "release.pub").write_bytes(store.public_pem())
    service_py = base / "service.py"
    service_py.write_text(SERVICE_PY)
    ports = {n: free_port() for n in names}
    programs = [(n, str(base / "root" / n / ".bin" / b), {"PORT": str(ports[n])}) for n, b in names.items()]
    supervisor = Supervisord(programs, autorestart=autorestart)
    subs = "\n".join(
        f"  {n}:\n    upstream: /dev/null\n    binary: {b}\n    health: http://127.0.0.1:{ports[n]}/health"
        for n, b in names.items())
    cfg = base / "sync-tools.yaml"
    cfg.write_text(
        "release:\n  store: store\n  tag: latest\n  public_key: keys/release.pub\n"
        f"subsystems:\n{subs}\n"
        f"agent:\n  root: root\n  reload: supervisor\n  supervisor_url: {supervisor.url}\n"
        f"  platform: {PLATFORM}\n  health_timeout: {health_timeout}\n  settle_seconds: {settle_seconds}\n"
        f"{agent_extra}")
    server = StoreServer(store.dir).__enter__()
    world = World(base, store, server, supervisor, names, ports, service_py, cfg)
    try:
        for n in names:
            data = world.publish(n, "v1")
            path = world.bin_path(n)
            path.parent.mkdir(parents=True)
            path.write_bytes(data)
            path.chmod(0o755)
            entry = store.manifest().subsystems[n]
            write_version(path.parent, VersionInfo(entry.commit, entry.built, hashlib.sha256(data).hexdigest(),
                                                   entry.version))
        supervisor.start()
        for n in names:
            world.health(n)
        server.reset()
    except BaseException:
        close_world(world)
        raise
    return world


def close_world(world: World) -> None:
    world.supervisor.stop()
    world.server.__exit__(None, None, None)
