"""``verify``: every installed binary against its .version; a changed or missing binary exits 1 by name."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
from click.testing import CliRunner

from sync_tools.build import build, verify_installed
from sync_tools.cli import cli
from tests.workspace import make_workspace


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    ws = make_workspace(tmp_path_factory.mktemp("verify") / "ws", git=False)
    build(ws.config(), ["nats", "arc"], env=ws.env())
    return ws


@pytest.fixture
def ws(built, tmp_path):
    """A fresh copy of the built workspace per test (the config's paths are relative to its root)."""
    shutil.copytree(built.root, tmp_path / "ws", symlinks=True)
    return dataclasses.replace(built, root=tmp_path / "ws", config_path=tmp_path / "ws" / "sync-tools.yaml")


def _verify(ws, *args: str):
    return CliRunner().invoke(cli, ["verify", *args, "--config", str(ws.config_path)])


def test_all_ok(ws) -> None:
    result = _verify(ws)
    assert result.exit_code == 0, result.output
    assert [line.split()[:2] for line in result.output.splitlines()] == [["ok", "nats"], ["ok", "arc"]]
    assert all(r.ok for r in verify_installed(ws.config()))


def test_changed_binary_is_caught_by_name(ws) -> None:
    with open(ws.binary_path("arc"), "r+b") as fh:
        fh.seek(20)
        byte = fh.read(1)
        fh.seek(20)
        fh.write(bytes([byte[0] ^ 1]))  # one flipped bit, same size
    result = _verify(ws)
    assert result.exit_code == 1
    assert "Error: verify failed: arc: mismatch" in result.output
    assert "nats: " not in result.output.splitlines()[-1]
    report = json.loads(_verify(ws, "--json").stdout.split("Error:")[0])
    assert report["arc"]["status"] == "mismatch" and report["nats"]["status"] == "ok"
    assert report["arc"]["actual"] != report["arc"]["expected"]


def test_missing_binary_and_missing_version(ws) -> None:
    ws.binary_path("nats").unlink()
    (ws.root / "arc" / ".bin" / ".version").unlink()
    result = _verify(ws)
    assert result.exit_code == 1
    assert "nats: missing-binary" in result.output and "arc: missing-version" in result.output


def test_malformed_version_file(ws) -> None:
    (ws.root / "nats" / ".bin" / ".version").write_text("garbage without a colon\n")
    [r] = verify_installed(ws.config(), ["nats"])
    assert r.status == "bad-version" and "expected 'key: value'" in r.detail


def test_named_subsystem_and_root(ws, tmp_path) -> None:
    ws.binary_path("arc").write_bytes(b"changed")
    assert _verify(ws, "nats").exit_code == 0  # arc not asked about
    install = tmp_path / "install"
    shutil.copytree(ws.root / "nats" / ".bin", install / "nats" / ".bin")
    shutil.copytree(ws.root / "arc" / ".bin", install / "arc" / ".bin")
    assert _verify(ws, "--root", str(install), "nats").exit_code == 0
    assert _verify(ws, "--root", str(install)).exit_code == 1
    assert _verify(ws, "nope").exit_code == 1
