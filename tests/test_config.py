"""Config loading through the real CLI: every bad config is one clear line (file, key, line), exit 1,
no traceback; and the plat-telemetry fallback (manifest.yaml + Taskfile vars) works end to end."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from sync_tools.cli import cli
from sync_tools.config import load_config
from sync_tools.errors import ConfigError
from tests.gitrepos import GitRepo
from tests.servers.git_http import git_http_server_fixture  # noqa: F401 - fixture `git_http_server`


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def one_line_error(config: Path | None, *args: str, cwd: Path | None = None) -> str:
    """Run `check`, expect exit 1 with exactly one stderr line and no traceback; return that line."""
    argv = ["check", *args] + (["--config", str(config)] if config else [])
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


GOOD = """
subsystems:
  nats:
    upstream: https://github.com/nats-io/nats-server
    strategy: tags
    current: v2.10.24
"""

BAD_CASES = {
    # name: (yaml text, key named, line named, words in the message)
    "two subsystems with one binary": ("""
        subsystems:
          nats:
            upstream: https://example.org/nats.git
            binary: server
          arc:
            upstream: https://example.org/arc.git
            binary: server
        """, "subsystems.arc.binary", 7, "also nats's"),
    "unknown top-level key": ("""
        subsystems: {}
        releases: {}
        """, "releases", 2, "unknown key"),
    "unknown subsystem key (typo)": ("""
        subsystems:
          nats:
            upstream: https://example.org/nats.git
            stratgy: tags
        """, "subsystems.nats.stratgy", 4, "unknown key"),
    "bad include regex": ("""
        subsystems:
          nats:
            upstream: https://example.org/nats.git
            include: '^v(\\d+'
        """, "subsystems.nats.include", 4, "bad regex"),
    "bad exclude regex": ("""
        subsystems:
          nats:
            upstream: https://example.org/nats.git
            exclude: '[z-a]'
        """, "subsystems.nats.exclude", 4, "bad regex"),
    "unknown strategy": ("""
        subsystems:
          nats:
            upstream: https://example.org/nats.git
            strategy: newest
        """, "subsystems.nats.strategy", 4, "unknown value 'newest'"),
    "missing upstream": ("""
        subsystems:
          nats:
            current: v1.0.0
        """, "subsystems.nats.upstream", 3, "is required"),
    "empty upstream": ("""
        subsystems:
          nats:
            upstream: '  '
        """, "subsystems.nats.upstream", 3, "must not be empty"),
    "unknown major policy": ("""
        subsystems:
          nats:
            upstream: https://example.org/nats.git
            major: sometimes
        """, "subsystems.nats.major", 4, "unknown value"),
    "prereleases not a boolean": ("""
        subsystems:
          nats:
            upstream: https://example.org/nats.git
            prereleases: maybe
        """, "subsystems.nats.prereleases", 4, "true or false"),
    "subsystem not a mapping": ("""
        subsystems:
          nats: https://example.org/nats.git
        """, "subsystems.nats", 2, "must be a mapping"),
    "duplicate key": ("""
        subsystems:
          nats:
            upstream: https://example.org/nats.git
            upstream: https://example.org/other.git
        """, None, 4, "duplicate key 'upstream'"),
    "invalid YAML": ("""
        subsystems:
          nats:
            upstream: [unclosed
        """, None, 4, "invalid YAML"),
    "depends on an unknown subsystem": ("""
        subsystems:
          nats:
            upstream: https://example.org/nats.git
            depends_on: [nosuch]
        """, "subsystems.nats.depends_on", 4, "unknown subsystem 'nosuch'"),
    "binary that cannot name a release asset": ("""
        subsystems:
          nats:
            upstream: https://example.org/nats.git
            binary: _nats
        """, "subsystems.nats.binary", 4, "letters, digits and ._+-"),
    "binary that is a path": ("""
        subsystems:
          nats:
            upstream: https://example.org/nats.git
            binary: ../../nats
        """, "subsystems.nats.binary", None, "must stay inside the subsystem's .bin"),
    "a manifest that expires at once": ("""
        release:
          expires_days: 0
        subsystems:
          nats:
            upstream: https://example.org/nats.git
        """, "release.expires_days", None, "more than 0"),
    "an infinite relay body cap": ("""
        relay:
          max_body: .inf
        """, "relay.max_body", 2, "from 0 to"),
    "a relay attempt count that is not a number": ("""
        relay:
          max_attempts: .nan
        """, "relay.max_attempts", 2, "from 0 to"),
    "a manifest that never expires": ("""
        release:
          expires_days: 1.0e+9
        """, "release.expires_days", 2, "from 0 to"),
    "a manifest expiry that is not a number": ("""
        release:
          expires_days: .nan
        """, "release.expires_days", 2, "from 0 to"),
    "an infinite health timeout": ("""
        agent:
          health_timeout: .inf
        """, "agent.health_timeout", 2, "from 0 to"),
    "a binary name with a trailing newline": ("""
        subsystems:
          nats:
            upstream: https://example.org/nats.git
            binary: "nats-server\\n"
        """, "subsystems.nats.binary", 4, "letters, digits and ._+-"),
    "a platform with a trailing newline": ("""
        platforms: ["linux/amd64\\n"]
        """, "platforms", 1, "bad platform"),
    "a release repo with a trailing newline": ("""
        release:
          repo: "o/r\\n"
        """, "release.repo", 2, "owner/name"),
    "a subsystem name with a trailing newline": ("""
        subsystems:
          "nats\\n":
            upstream: https://example.org/x.git
        """, None, 2, "lower-case"),
    "collections nested thousands deep": ("a: " + "[" * 5000 + "\n", None, None, "nested too deeply"),
    "bad subsystem name": ("""
        subsystems:
          Bad Name:
            upstream: https://example.org/x.git
        """, "subsystems.Bad Name", 2, "lower-case"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_config_is_one_clear_line(tmp_path, case):
    text, key, line, words = BAD_CASES[case]
    path = write(tmp_path / "sync-tools.yaml", text)
    msg = one_line_error(path)
    assert msg.startswith("Error: ")
    assert str(path) in msg
    if line is not None:
        assert f"{path}:{line}:" in msg, msg
    if key is not None:
        assert f" {key}: " in msg, msg
    assert words in msg, msg


def test_missing_config_file_is_one_line(tmp_path):
    msg = one_line_error(tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "not found" in msg


def test_an_oversized_config_is_refused_without_being_read_whole(tmp_path):
    from sync_tools import config as config_module

    path = tmp_path / "sync-tools.yaml"
    with open(path, "wb") as fh:  # valid YAML all the way: a comment line, then padding
        fh.write(b"subsystems: {}\n#" + b"x" * config_module.MAX_CONFIG_BYTES)
    with pytest.raises(ConfigError, match="over 4 MiB: not a config file"):
        load_config(path)


def test_no_config_anywhere_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    msg = one_line_error(None)
    assert "sync-tools.yaml" in msg and "--config" in msg


def test_good_config_loads_into_frozen_dataclasses(tmp_path):
    cfg = load_config(write(tmp_path / "sync-tools.yaml", GOOD))
    nats = cfg.subsystem("nats")
    assert (nats.upstream, nats.strategy, nats.current, nats.major, nats.prereleases) == (
        "https://github.com/nats-io/nats-server", "tags", "v2.10.24", "manual", False)
    assert nats.binary == "nats" and nats.build == ("task nats:src:update", "task nats:bin:build")
    with pytest.raises(AttributeError):
        nats.current = "v0"  # type: ignore[misc]
    with pytest.raises(ConfigError, match="unknown subsystem 'arc'"):
        cfg.subsystem("arc")


def test_env_var_names_the_config(tmp_path, monkeypatch):
    path = write(tmp_path / "elsewhere" / "my.yaml", GOOD)
    monkeypatch.setenv("SYNC_TOOLS_CONFIG", str(path))
    assert load_config().path == path


# ----------------------------------------------------------------------------- plat-telemetry's own files


def upstream_repo(server, name: str, tags: list[str]) -> str:
    repo = GitRepo.create(server.root / f"{name}.git")
    repo.commit("one")
    for t in tags:
        repo.tag(t)
    return server.url_for(repo.path)


def test_plat_telemetry_manifest_and_taskfile_vars(tmp_path, git_http_server, monkeypatch):
    nats_url = upstream_repo(git_http_server, "nats", ["v2.10.24", "v2.10.25"])
    arc_url = upstream_repo(git_http_server, "arc", ["v1.0.0", "v1.2.0"])
    pc_url = upstream_repo(git_http_server, "pc", ["v1.40.0"])
    ws = tmp_path / "plat-telemetry"
    write(ws / "manifest.yaml", f"""
        # plat-telemetry's own subsystem list
        subsystems:
          nats:
            description: NATS server
          arc:
            version: v1.0.0
            upstream: {arc_url}
          pc: {{}}
        """)
    write(ws / "Taskfile.yml", f"""
        version: '3'
        vars:
          PC_VERSION: v1.40.0
          PC_UPSTREAM_REPO: {pc_url}
          NATS_UPSTREAM_REPO: https://wrong.example.org/overridden-by-the-subsystem-taskfile
        """)
    write(ws / "nats" / "Taskfile.yml", f"""
        version: '3'
        vars:
          NATS_VERSION: '{{{{.NATS_VERSION | default "v2.10.24"}}}}'
          NATS_BIN_NAME: nats-server
          NATS_UPSTREAM_REPO: {nats_url}
        tasks:
          bin:build:
            cmds: ["go build -o .bin/{{{{.NATS_BIN_NAME}}}}"]
        """)
    cfg = load_config(ws / "manifest.yaml")
    nats = cfg.subsystem("nats")
    assert (nats.current, nats.binary, nats.upstream, nats.strategy) == ("v2.10.24", "nats-server", nats_url, "tags")
    assert nats.pin.kind == "taskfile" and nats.pin.path == ws / "nats" / "Taskfile.yml"
    assert nats.pin.key == "NATS_VERSION" and nats.pin.line == 3
    arc = cfg.subsystem("arc")
    assert (arc.current, arc.upstream) == ("v1.0.0", arc_url)
    assert arc.pin.kind == "manifest.yaml" and arc.pin.key == "subsystems.arc.version"
    assert cfg.subsystem("pc").current == "v1.40.0"

    # found without --config: the workspace has no sync-tools.yaml, only plat-telemetry's files
    monkeypatch.chdir(ws)
    result = CliRunner().invoke(cli, ["check", "--json"])
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["nats"]["latest"] == "v2.10.25" and out["nats"]["update_available"]
    assert out["arc"]["latest"] == "v1.2.0"
    assert out["pc"] == {"current": "v1.40.0", "latest": "v1.40.0", "update_available": False,
                         "commit": out["pc"]["commit"]}
    assert (ws / ".version-manifest.json").is_file()


def test_plat_telemetry_single_quoted_default_and_no_version(tmp_path):
    ws = tmp_path / "pt"
    write(ws / "manifest.yaml", """
        subsystems:
          nats: {}
          loose:
            upstream: https://example.org/loose.git
        """)
    write(ws / "Taskfile.yml", """
        version: '3'
        vars:
          NATS_VERSION: "{{.NATS_VERSION | default 'v2.10.24'}}"
          NATS_UPSTREAM_REPO: https://github.com/nats-io/nats-server
        """)
    cfg = load_config(ws / "manifest.yaml")
    assert cfg.subsystem("nats").current == "v2.10.24"
    assert cfg.subsystem("loose").current is None and cfg.subsystem("loose").strategy == "tags"


def test_plat_telemetry_without_any_upstream_is_one_line(tmp_path):
    ws = tmp_path / "pt"
    write(ws / "manifest.yaml", """
        subsystems:
          nats:
            version: v2.10.24
        """)
    msg = one_line_error(ws / "manifest.yaml")
    assert f"{ws / 'manifest.yaml'}:2:" in msg and "subsystems.nats" in msg and "NATS_UPSTREAM_REPO" in msg


def test_plat_telemetry_unknown_key_names_manifest_yaml(tmp_path):
    ws = tmp_path / "pt"
    write(ws / "manifest.yaml", """
        subsystems:
          nats:
            version: v2.10.24
            upstream: https://github.com/nats-io/nats-server
            colour: blue
        """)
    msg = one_line_error(ws / "manifest.yaml")
    assert f"{ws / 'manifest.yaml'}:5:" in msg and "subsystems.nats.colour" in msg and "unknown key" in msg


def test_plat_telemetry_bad_taskfile_yaml_names_the_taskfile(tmp_path):
    ws = tmp_path / "pt"
    write(ws / "manifest.yaml", """
        subsystems:
          nats: {}
        """)
    write(ws / "nats" / "Taskfile.yml", """
        version: '3'
        vars:
          NATS_VERSION: [unclosed
        """)
    msg = one_line_error(ws / "manifest.yaml")
    assert str(ws / "nats" / "Taskfile.yml") in msg and "invalid YAML" in msg


def test_a_depends_on_chain_of_thousands_loads(tmp_path):
    # the cycle check walked the chain recursively: RecursionError past ~1,000 subsystems
    n = 1100
    subs = {f"s{i}": {"upstream": "https://example.org/x.git", "depends_on": [f"s{i + 1}"] if i + 1 < n else []}
            for i in range(n)}
    path = tmp_path / "sync-tools.yaml"
    path.write_text(json.dumps({"subsystems": subs}))  # JSON is YAML
    assert len(load_config(path).subsystems) == n
    subs[f"s{n - 1}"]["depends_on"] = ["s0"]
    path.write_text(json.dumps({"subsystems": subs}))
    with pytest.raises(ConfigError, match=r"dependency cycle: s0 -> s1 -> .* -> s1099 -> s0"):
        load_config(path)


def test_version_like_numbers_keep_the_text_they_were_written_as(tmp_path):
    # YAML reads 1.20 as the float 1.2 and 010 as the octal 8; as versions they are "1.20" and "010"
    path = write(tmp_path / "sync-tools.yaml", """
        subsystems:
          a: {upstream: https://example.org/a.git, current: 1.20}
          b: {upstream: https://example.org/b.git, current: 010}
          c: {upstream: https://example.org/c.git, current: 1_000, branch: 2.0}
        relay:
          max_body: 0x100
        """)
    cfg = load_config(path)
    assert [cfg.subsystem(n).current for n in "abc"] == ["1.20", "010", "1_000"]
    assert cfg.subsystem("c").branch == "2.0"
    assert cfg.relay.max_body == 256  # numbers are still numbers


def test_plat_telemetry_taskfile_numeric_version_keeps_its_text(tmp_path):
    ws = tmp_path / "pt"
    write(ws / "manifest.yaml", """
        subsystems:
          nats: {}
        """)
    write(ws / "Taskfile.yml", """
        version: '3'
        vars:
          NATS_VERSION: 1.20
          NATS_UPSTREAM_REPO: https://github.com/nats-io/nats-server
        """)
    assert load_config(ws / "manifest.yaml").subsystem("nats").current == "1.20"
