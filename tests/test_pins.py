"""Pin updates edit one value on one line; every other byte of the file stays as it was."""

from __future__ import annotations

import difflib
import os
import stat
from pathlib import Path

import pytest

from sync_tools.config import PinSource, load_config
from sync_tools.errors import ConfigError
from sync_tools.pins import update_pin

SYNC_TOOLS_YAML = """\
# plat-telemetry release pipeline
release:
  store: .releases   # local store
  tag: latest
subsystems:
  nats:
    upstream: https://github.com/nats-io/nats-server
    # the pin; bumped by sync-tools build --version
    current:   "v2.10.24"    # keep quoted
    binary: nats-server
  arc:
    upstream: https://github.com/basekick-labs/arc
    current: 'v1.0.0'
    depends_on: [nats]
  grafana:
    upstream: https://github.com/grafana/grafana
    current: v11.0.0 # trailing comment
"""


def _changed_lines(before: bytes, after: bytes) -> list[tuple[str, str]]:
    a, b = before.decode().splitlines(keepends=True), after.decode().splitlines(keepends=True)
    out = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b).get_opcodes():
        if tag != "equal":
            out.append(("".join(a[i1:i2]), "".join(b[j1:j2])))
    return out


def _write(path: Path, text: str) -> bytes:
    data = text.encode()
    path.write_bytes(data)
    return data


@pytest.mark.parametrize("name,old_line,new_line", [
    ("nats", '    current:   "v2.10.24"    # keep quoted\n', '    current:   "v2.10.25"    # keep quoted\n'),
    ("arc", "    current: 'v1.0.0'\n", "    current: 'v2.10.25'\n"),
    ("grafana", "    current: v11.0.0 # trailing comment\n", "    current: v2.10.25 # trailing comment\n"),
])
def test_sync_tools_yaml_pin_changes_one_line(tmp_path, name, old_line, new_line) -> None:
    path = tmp_path / "sync-tools.yaml"
    before = _write(path, SYNC_TOOLS_YAML)
    cfg = load_config(path)
    assert update_pin(cfg.subsystems[name].pin, "v2.10.25") is True
    after = path.read_bytes()
    assert _changed_lines(before, after) == [(old_line, new_line)]
    assert load_config(path).subsystems[name].current == "v2.10.25"
    others = {n: s.current for n, s in load_config(path).subsystems.items() if n != name}
    assert others == {n: s.current for n, s in cfg.subsystems.items() if n != name}


def test_concurrent_updates_of_pins_in_one_file_lose_nothing(tmp_path) -> None:
    """Builds of different subsystems run at once (the relay has a lane per subsystem) and their pins
    share one file: each read-edit-replace holds the file's lock, so no update undoes another."""
    import threading

    path = tmp_path / "sync-tools.yaml"
    _write(path, SYNC_TOOLS_YAML)
    pins = {n: s.pin for n, s in load_config(path).subsystems.items()}
    errors: list[BaseException] = []

    def bump(name: str) -> None:
        try:
            for i in range(12):
                update_pin(pins[name], f"v3.{i}.0")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=bump, args=(n,)) for n in pins]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert {n: s.current for n, s in load_config(path).subsystems.items()} == {n: "v3.11.0" for n in pins}


def test_same_value_leaves_the_file_untouched(tmp_path) -> None:
    path = tmp_path / "sync-tools.yaml"
    _write(path, SYNC_TOOLS_YAML)
    mtime = path.stat().st_mtime_ns
    assert update_pin(load_config(path).subsystems["grafana"].pin, "v11.0.0") is False
    assert path.stat().st_mtime_ns == mtime


def test_crlf_and_file_mode_are_kept(tmp_path) -> None:
    path = tmp_path / "sync-tools.yaml"
    before = _write(path, SYNC_TOOLS_YAML.replace("\n", "\r\n"))
    os.chmod(path, 0o640)
    update_pin(load_config(path).subsystems["nats"].pin, "v2.10.25")
    after = path.read_bytes()
    assert after == before.replace(b'"v2.10.24"', b'"v2.10.25"')
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_missing_current_gets_one_new_line_under_the_subsystem(tmp_path) -> None:
    path = tmp_path / "sync-tools.yaml"
    text = "subsystems:\n  nats:\n      upstream: https://example.org/nats\n      binary: nats-server\n"
    _write(path, text)
    update_pin(load_config(path).subsystems["nats"].pin, "v2.10.25")
    assert path.read_text() == ("subsystems:\n  nats:\n      current: v2.10.25\n"
                                "      upstream: https://example.org/nats\n      binary: nats-server\n")


def test_plat_telemetry_manifest_yaml_version(tmp_path) -> None:
    text = ("# plat-telemetry subsystems\nsubsystems:\n  nats:\n    version: v2.10.24  # pinned\n"
            "    upstream: https://github.com/nats-io/nats-server\n"
            "  arc:\n    version: v1.0.0\n    upstream: https://github.com/basekick-labs/arc\n")
    before = _write(tmp_path / "manifest.yaml", text)
    cfg = load_config(tmp_path / "manifest.yaml")
    pin = cfg.subsystems["nats"].pin
    assert pin.kind == "manifest.yaml"
    update_pin(pin, "v2.10.25")
    after = (tmp_path / "manifest.yaml").read_bytes()
    assert after == before.replace(b"version: v2.10.24  # pinned", b"version: v2.10.25  # pinned")
    assert load_config(tmp_path / "manifest.yaml").subsystems["arc"].current == "v1.0.0"


TASKFILE = """\
version: '3'

vars:
  NATS_VERSION: '{{.NATS_VERSION | default "v2.10.24"}}'
  NATS_UPSTREAM_REPO: https://github.com/nats-io/nats-server
  ARC_VERSION: v1.0.0   # plain
  ARC_UPSTREAM_REPO: https://github.com/basekick-labs/arc

tasks:
  build:
    cmds:
      - echo "{{.NATS_VERSION}}"
"""


def _plat_telemetry(tmp_path: Path) -> bytes:
    (tmp_path / "manifest.yaml").write_text("subsystems:\n  nats: {}\n  arc: {}\n")
    return _write(tmp_path / "Taskfile.yml", TASKFILE)


def test_taskfile_template_default_is_edited_in_place(tmp_path) -> None:
    before = _plat_telemetry(tmp_path)
    cfg = load_config(tmp_path / "manifest.yaml")
    pin = cfg.subsystems["nats"].pin
    assert (pin.kind, pin.key, cfg.subsystems["nats"].current) == ("taskfile", "NATS_VERSION", "v2.10.24")
    update_pin(pin, "v2.10.25")
    after = (tmp_path / "Taskfile.yml").read_bytes()
    assert after == before.replace(b'default "v2.10.24"', b'default "v2.10.25"')
    assert load_config(tmp_path / "manifest.yaml").subsystems["nats"].current == "v2.10.25"


def test_taskfile_plain_var(tmp_path) -> None:
    before = _plat_telemetry(tmp_path)
    update_pin(load_config(tmp_path / "manifest.yaml").subsystems["arc"].pin, "v1.1.0")
    after = (tmp_path / "Taskfile.yml").read_bytes()
    assert after == before.replace(b"ARC_VERSION: v1.0.0   # plain", b"ARC_VERSION: v1.1.0   # plain")


def test_taskfile_edit_is_what_the_real_task_binary_reads(tmp_path) -> None:
    import subprocess
    import sys

    _plat_telemetry(tmp_path)
    update_pin(load_config(tmp_path / "manifest.yaml").subsystems["nats"].pin, "v2.10.26")
    task = str(Path(sys.executable).parent / "task")
    out = subprocess.run([task, "build"], cwd=tmp_path, capture_output=True, text=True, timeout=30, check=True,
                         env={k: v for k, v in os.environ.items() if k != "NATS_VERSION"})
    assert out.stdout.strip() == "v2.10.26"


@pytest.mark.parametrize("value", ["", "v1 ; rm -rf /", "v1\nevil: true", "'quoted'", '"x"', "-v1", "v1#x"])
def test_unsafe_values_are_refused_and_nothing_changes(tmp_path, value) -> None:
    path = tmp_path / "sync-tools.yaml"
    before = _write(path, SYNC_TOOLS_YAML)
    with pytest.raises(ConfigError):
        update_pin(load_config(path).subsystems["nats"].pin, value)
    assert path.read_bytes() == before


def test_value_that_yaml_would_read_as_a_number_gets_quoted(tmp_path) -> None:
    path = tmp_path / "sync-tools.yaml"
    text = "subsystems:\n  x:\n    upstream: u\n    strategy: commits\n    current: abc123  # head\n"
    before = _write(path, text)
    update_pin(load_config(path).subsystems["x"].pin, "1234567")
    assert path.read_bytes() == before.replace(b"current: abc123", b'current: "1234567"')
    assert load_config(path).subsystems["x"].current == "1234567"


def test_flow_mapping_and_block_scalar_are_refused(tmp_path) -> None:
    path = tmp_path / "sync-tools.yaml"
    _write(path, "subsystems:\n  nats: {upstream: u, current: v1}\n")
    with pytest.raises(ConfigError):
        update_pin(load_config(path).subsystems["nats"].pin, "v2")
    _write(path, "subsystems:\n  nats:\n    upstream: u\n    current: |\n      v1\n")
    with pytest.raises(ConfigError, match="by hand"):
        update_pin(load_config(path).subsystems["nats"].pin, "v2")


def test_pin_source_missing_key_in_taskfile_is_an_error(tmp_path) -> None:
    _plat_telemetry(tmp_path)
    with pytest.raises(ConfigError, match="no NOPE_VERSION"):
        update_pin(PinSource(tmp_path / "Taskfile.yml", "taskfile", "NOPE_VERSION"), "v1")
