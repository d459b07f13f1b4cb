"""The agent against a hostile world (issue #20): an install root's state that is not what the agent made
(a stray subdirectory, a ``downloads`` that is a link out of the root), an installed binary that is a link,
a source serving oversized manifests or signatures, and signed assets whose tar metadata headers would
take all the memory. Real parts: signed stores on disk or over loopback HTTP, real ``agent --once``
processes."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sync_tools.agent.events import AgentEvent
from sync_tools.agent.runner import Agent, UpdateReport
from sync_tools.config import load_config
from tests.agent_support import ReleaseStore, StoreServer

V1 = b"#!/bin/sh\n# good v1\n"
V2 = b"#!/bin/sh\n# good v2\n"


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


class Root:
    """An install root with one subsystem ``nats`` and a signed store on disk (reload: none)."""

    def __init__(self, base: Path, *, source: str = "store"):
        self.base = base
        self.store = ReleaseStore(base / "store", Ed25519PrivateKey.generate())
        (base / "release.pub").write_bytes(self.store.public_pem())
        self.config_path = base / "sync-tools.yaml"
        self.config_path.write_text(
            "release:\n  store: store\n  tag: latest\n  public_key: release.pub\n"
            "subsystems:\n  nats:\n    upstream: /dev/null\n    binary: nats-server\n"
            "    health: \"grep -q good nats/.bin/nats-server\"\n"
            f"agent:\n  root: .\n  source: {source}\n  reload: none\n  platform: linux/amd64\n"
            "  health_timeout: 1\n  settle_seconds: 0\n")
        self.bin_dir = base / "nats" / ".bin"
        self.binary = self.bin_dir / "nats-server"
        self.downloads = base / ".sync-tools" / "downloads"

    def agent(self, **kw: object) -> Agent:
        return Agent(load_config(self.config_path), **kw)  # type: ignore[arg-type]

    def once(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sync_tools", "agent", "--once", "--config",
                               str(self.config_path)], capture_output=True, text=True, timeout=120)


@pytest.fixture
def root(tmp_path: Path) -> Root:
    return Root(tmp_path)


# ------------------------------------------------------------- 8. start-up cleanup of .sync-tools/downloads


def test_a_stray_subdirectory_in_downloads_is_left_alone_and_the_update_goes_on(root: Root) -> None:
    """Before: the cleanup unlinked every entry, a directory raised IsADirectoryError and ``agent --once``
    exited with a traceback, never updating."""
    root.store.publish("nats", "nats-server", V1, "v1")
    (root.downloads / "someone-elses").mkdir(parents=True)
    (root.downloads / "someone-elses" / "keep.txt").write_text("mine")
    (root.downloads / "nats-server-linux-amd64.tar.gz").write_bytes(b"partial download a crash left")
    done = root.once()
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "did not create" in done.stderr and "someone-elses" in done.stderr
    assert root.binary.read_bytes() == V1
    assert (root.downloads / "someone-elses" / "keep.txt").read_text() == "mine"
    assert not (root.downloads / "nats-server-linux-amd64.tar.gz").exists()  # the agent's own leftover


def test_a_downloads_that_is_a_symlink_is_never_cleaned_or_written_through(root: Root, tmp_path: Path) -> None:
    """Before: every file in the link's target was deleted at start, and each download was written into
    the target and then deleted there (a file named as the asset was lost)."""
    root.store.publish("nats", "nats-server", V1, "v1")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.db").write_bytes(b"data")
    (outside / "nats-server-linux-amd64.tar.gz").write_bytes(b"someone's own file of that name")
    root.downloads.parent.mkdir(parents=True)
    root.downloads.symlink_to(outside)
    done = root.once()
    assert done.returncode == 1, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert f"{root.downloads} is a symlink" in done.stderr
    assert sorted(p.name for p in outside.iterdir()) == ["nats-server-linux-amd64.tar.gz", "precious.db"]
    assert (outside / "precious.db").read_bytes() == b"data"
    assert (outside / "nats-server-linux-amd64.tar.gz").read_bytes() == b"someone's own file of that name"
    assert not root.binary.exists()
    # the operator removes the link: the agent makes its own directory and updates
    root.downloads.unlink()
    again = root.once()
    assert again.returncode == 0, again.stderr[-2000:]
    assert root.binary.read_bytes() == V1 and not root.downloads.is_symlink()


# ------------------------------------------------------------- 9. an installed binary that is a symlink


def test_an_installed_binary_that_is_a_symlink_is_updated(root: Root, tmp_path: Path) -> None:
    """Before: tarfile's data filter was checked against ``<bin>/<binary>`` through the link (outside the
    bin directory) while extraction went to the staged name; every update was refused, blaming the
    archive. Now the swap replaces the link by the verified binary; the link's target is untouched."""
    elsewhere = tmp_path / "opt" / "nats-server"
    elsewhere.parent.mkdir()
    elsewhere.write_bytes(V1)
    root.bin_dir.mkdir(parents=True)
    root.binary.symlink_to(elsewhere)
    root.store.publish("nats", "nats-server", V2, "v2")
    report = root.agent().reconcile()
    res = report.result("nats")
    assert res is not None and res.action == "updated", (res, report.error)
    assert res.old_sha == _sha(V1) and res.new_sha == _sha(V2)
    assert not root.binary.is_symlink() and root.binary.read_bytes() == V2
    assert os.access(root.binary, os.X_OK)
    assert elsewhere.read_bytes() == V1
    assert (root.bin_dir / ".previous" / "nats-server").read_bytes() == V1


# ------------------------------------------------------------- 10. an oversized manifest or signature


@pytest.mark.parametrize("name", ["manifest.json", "manifest.json.sig"])
def test_an_oversized_manifest_or_signature_is_refused_once_not_refetched_until_a_newer_release(
        root: Root, name: str) -> None:
    """Before: SizeCapError was a DownloadError, so the reconcile asked for a retry and the retry loop
    fetched up to 4 MiB again and again, forever. Now the refusal is final until an event announces a
    newer serial than the one refused."""
    root.store.publish("nats", "nats-server", V1, "v1")
    good = (root.store.dir / name).read_bytes()
    (root.store.dir / name).write_bytes(b"x" * (5 << 20))
    with StoreServer(root.store.dir) as server:
        agent = Agent(load_config(root.config_path), source=server.url)
        agent.retry_base = agent.retry_max = 0.05
        reports: list[UpdateReport] = []

        def on_report(report: UpdateReport) -> None:
            reports.append(report)
            if len(reports) >= 3:  # a loop that retries forever is stopped here and fails below
                agent.stop()

        agent._reconcile_with_retries(AgentEvent(serial=1), on_report)  # the loop a daemon runs
        assert len(reports) == 1 and not reports[0].retry, reports
        assert "cap" in (reports[0].error or "") and "refused" in (reports[0].error or "")
        asked = [n for n, _ in server.requests].count(name)
        assert asked == 1
        # the same release announced again (another event, an SSE replay): no fetch at all
        again = agent.reconcile(AgentEvent(serial=1))
        assert again.error == reports[0].error and not again.retry
        assert [n for n, _ in server.requests].count(name) == asked
        # a newer release is fetched and installed
        (root.store.dir / name).write_bytes(good)
        root.store.publish("nats", "nats-server", V2, "v2")
        newer = agent.reconcile(AgentEvent(serial=2))
        assert newer.ok and newer.result("nats").action == "updated", newer
        assert root.binary.read_bytes() == V2


# ------------------------------------------------------------- 11. tar metadata headers read whole

# VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the forking parent across exec
# (a large pytest process would be measured), while VmHWM belongs to this process's own memory
_RSS_CHILD = r'''
import json, sys
from sync_tools.agent.runner import Agent
from sync_tools.config import load_config
res = Agent(load_config(sys.argv[1])).reconcile().result("nats")
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"action": res.action, "error": res.error, "rss_mib": hwm / 1024}))
'''


def _huge_header_asset(kind: str, size: int, binary: bytes) -> bytes:
    """A tar.gz whose first header is a *kind* metadata header of *size* bytes (compressing to little),
    followed by the binary itself: tarfile would read the whole header into memory."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0) as gz:
        meta = tarfile.TarInfo("././@PaxHeader" if kind == "pax" else "././@LongLink")
        meta.type = tarfile.XHDTYPE if kind == "pax" else tarfile.GNUTYPE_LONGNAME
        meta.size = size
        gz.write(meta.tobuf(format=tarfile.USTAR_FORMAT))
        if kind == "pax":  # one record "<len> comment=aaa...\n", <len> counting itself
            head = f"{size} comment=".encode()
            body = [head, None, b"\n"]
            filler = size - len(head) - 1
        else:  # the long name: the binary's name after a run of "./" (it still resolves to the binary)
            body = [None, b"nats-server\0"]
            filler = size - len(body[1])
        for part in body:
            if part is not None:
                gz.write(part)
                continue
            unit = b"a" if kind == "pax" else b"./"
            chunk = unit * ((1 << 20) // len(unit))
            left = filler
            while left > 0:
                gz.write(chunk[:left])
                left -= min(left, len(chunk))
        gz.write(b"\0" * (-size % 512))
        member = tarfile.TarInfo("nats-server")
        member.size, member.mode = len(binary), 0o755
        gz.write(member.tobuf(format=tarfile.USTAR_FORMAT))
        gz.write(binary + b"\0" * (-len(binary) % 512) + b"\0" * 1024)
    return out.getvalue()


@pytest.mark.parametrize("kind", ["pax", "gnu-longname"])
def test_a_huge_tar_metadata_header_is_refused_before_it_is_read(root: Root, kind: str) -> None:
    """Before: tarfile read the header whole (a 1 MiB signed asset took the agent to 1,074 MiB). The
    asset here is signed (the attack needs the key: this is defence in depth) and its header is 128 MiB;
    the agent's peak RSS, measured in its own process, stays far below that and the asset is refused."""
    size = 128 << 20
    asset = _huge_header_asset(kind, size, V1)
    assert len(asset) < 2 << 20
    root.store.publish_archive("nats", "nats-server", asset, _sha(V1), "v1")
    done = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(root.config_path)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["action"] == "failed" and "metadata headers over the cap" in out["error"], out
    assert out["rss_mib"] < 100, out  # the header alone is 128 MiB
    assert not root.binary.exists()


def test_small_metadata_headers_still_pass(root: Root) -> None:
    """A pax header as tar writes it for a long mtime or a user name (well under the cap) is fine."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("nats-server")
        info.size, info.mode, info.uname = len(V1), 0o755, "ü" * 200  # non-ASCII: forces a pax header
        tf.addfile(info, io.BytesIO(V1))
    root.store.publish_archive("nats", "nats-server", buf.getvalue(), _sha(V1), "v1")
    res = root.agent().reconcile().result("nats")
    assert res is not None and res.action == "updated", res
    assert root.binary.read_bytes() == V1
