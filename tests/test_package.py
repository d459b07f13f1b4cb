"""``package``: reproducible tarballs (same binary -> same bytes), their exact header fields, the sidecar,
and refusals (nothing built, binary changed since the build, asset changed after packaging)."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import struct
import tarfile

import pytest
from click.testing import CliRunner

from sync_tools.build import build, source_commit
from sync_tools.cli import cli
from sync_tools.errors import BuildError, ConfigError, DataError
from sync_tools.fsutil import sha256_file
from sync_tools.package import package, read_packaged, write_tarball
from tests.workspace import make_workspace


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A workspace whose nats is built for linux/amd64 (one real build for the whole module)."""
    ws = make_workspace(tmp_path_factory.mktemp("pkg") / "ws", git=False)
    build(ws.config(), ["nats"], platform="linux/amd64", env=ws.env())
    return ws


def test_same_binary_twice_gives_identical_bytes(built, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    cfg = built.config()
    first = package(cfg, "nats", platform="linux/amd64", dist=tmp_path / "a")
    os.utime(built.binary_path("nats"), (1, 1))  # the file's own mtime must not matter
    os.chmod(built.binary_path("nats"), 0o700)  # nor its mode
    second = package(cfg, "nats", platform="linux/amd64", dist=tmp_path / "b")
    os.chmod(built.binary_path("nats"), 0o755)
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.sha256 == second.sha256 == sha256_file(first.path)
    assert first.path.name == "nats-server-linux-amd64.tar.gz"


def test_tarball_fields(built, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    result = package(built.config(), "nats", platform="linux/amd64", dist=tmp_path)
    raw = result.path.read_bytes()
    # gzip header: magic, CM=8, FLG without FNAME (0x08), MTIME 0
    assert raw[:3] == b"\x1f\x8b\x08"
    assert raw[3] & 0x08 == 0
    assert struct.unpack("<I", raw[4:8])[0] == 0
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
        [member] = tar.getmembers()
        assert member.name == "nats-server" and member.isreg()
        assert member.mode == 0o755 and member.uid == 0 and member.gid == 0
        assert member.uname == "" and member.gname == "" and member.mtime == 1700000000
        inside = tar.extractfile(member).read()
    assert inside == built.binary_path("nats").read_bytes()
    assert result.binary_sha256 == sha256_file(built.binary_path("nats"))
    assert result.size == len(raw)


def test_mtime_defaults_to_the_source_commit_time(built, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    result = package(built.config(), "nats", platform="linux/amd64", dist=tmp_path)
    with tarfile.open(result.path) as tar:
        assert tar.getmembers()[0].mtime == source_commit(built.root / "nats" / ".src").time


def test_sorted_entries_regardless_of_input_order(tmp_path) -> None:
    for name in ("b", "a", "c"):
        (tmp_path / name).write_bytes(name.encode())
    files = [(n, tmp_path / n) for n in ("c", "a", "b")]
    write_tarball(tmp_path / "x.tar.gz", files, 0)
    write_tarball(tmp_path / "y.tar.gz", list(reversed(files)), 0)
    assert (tmp_path / "x.tar.gz").read_bytes() == (tmp_path / "y.tar.gz").read_bytes()
    with tarfile.open(tmp_path / "x.tar.gz") as tar:
        assert tar.getnames() == ["a", "b", "c"]
    assert gzip.decompress((tmp_path / "x.tar.gz").read_bytes())[:1] == b"a"


def test_sidecar_says_what_the_asset_is(built, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    result = package(built.config(), "nats", platform="linux/amd64", dist=tmp_path)
    side = json.loads((tmp_path / "nats-server-linux-amd64.tar.gz.json").read_text())
    assert side["subsystem"] == "nats" and side["platform"] == "linux/amd64" and side["version"] == "v1.0.0"
    assert side["sha256"] == result.sha256 and side["size"] == result.size
    assert side["binary_sha256"] == result.binary_sha256
    [again] = read_packaged(tmp_path, "nats")
    assert again == result
    assert read_packaged(tmp_path, "arc") == []
    assert read_packaged(tmp_path, "nats", ["darwin/arm64"]) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nats-server-linux-amd64.tar.gz",
                                                         "nats-server-linux-amd64.tar.gz.json"]  # no temp files


def test_asset_changed_after_packaging_is_refused(built, tmp_path) -> None:
    result = package(built.config(), "nats", platform="linux/amd64", dist=tmp_path)
    with open(result.path, "ab") as fh:
        fh.write(b"x")
    with pytest.raises(DataError, match="differ from its sidecar"):
        read_packaged(tmp_path, "nats")
    result.path.unlink()
    with pytest.raises(DataError, match="missing"):
        read_packaged(tmp_path, "nats")


def test_binary_changed_since_the_build_is_refused(built, tmp_path) -> None:
    ws = make_workspace(tmp_path / "ws2", ["nats"], git=False)
    bin_dir = ws.root / "nats" / ".bin"
    shutil.copytree(built.root / "nats" / ".bin", bin_dir)
    with open(bin_dir / "nats-server", "ab") as fh:
        fh.write(b"# tampered\n")
    with pytest.raises(DataError, match="rebuild"):
        package(ws.config(), "nats", dist=tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_the_platform_the_build_recorded_is_the_one_packaged(tmp_path) -> None:
    """`build --platform linux/arm64` then `package` without one used to label the arm64 binary with
    this machine's platform; the build's .version now says what it built for."""
    ws = make_workspace(tmp_path / "ws4", ["nats"], git=False)
    build(ws.config(), ["nats"], platform="linux/arm64", env=ws.env())
    assert "platform: linux/arm64" in (ws.root / "nats" / ".bin" / ".version").read_text()
    item = package(ws.config(), "nats", dist=tmp_path / "d")
    assert item.platform == "linux/arm64" and item.name == "nats-server-linux-arm64.tar.gz"
    with pytest.raises(DataError, match="built for linux/arm64, not linux/amd64"):
        package(ws.config(), "nats", platform="linux/amd64", dist=tmp_path / "d")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["nats-server-linux-arm64.tar.gz",
                                                                   "nats-server-linux-arm64.tar.gz.json"]


def test_nothing_built_and_bad_input(tmp_path, built) -> None:
    ws = make_workspace(tmp_path / "ws3", ["nats"], git=False)
    with pytest.raises(BuildError, match="sync-tools build --only nats"):
        package(ws.config(), "nats")
    with pytest.raises(ConfigError):
        package(built.config(), "nats", platform="linux")
    with pytest.raises(ConfigError, match="unknown subsystem"):
        package(built.config(), "nope")


def test_bad_source_date_epoch(built, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(ConfigError, match="SOURCE_DATE_EPOCH"):
        package(built.config(), "nats", dist=tmp_path)


def test_cli_prints_path_size_and_digests(built, tmp_path) -> None:
    runner = CliRunner()
    args = ["package", "--only", "nats", "--platform", "linux/amd64", "--dist", str(tmp_path),
            "--config", str(built.config_path)]
    result = runner.invoke(cli, args, env={"SOURCE_DATE_EPOCH": "1"})
    assert result.exit_code == 0, result.output
    asset = tmp_path / "nats-server-linux-amd64.tar.gz"
    assert result.output.split() == [str(asset), str(asset.stat().st_size), "bytes", "sha256", sha256_file(asset),
                                     "binary_sha256", sha256_file(built.binary_path("nats"))]
    as_json = runner.invoke(cli, [*args, "--json"], env={"SOURCE_DATE_EPOCH": "1"})
    assert json.loads(as_json.output)[0]["sha256"] == sha256_file(asset)
