"""``sync-tools doctor`` on small, realistic plat-telemetry-style workspaces, through the real CLI.

Each workspace has real upstream git repositories (tests.gitrepos), a ``manifest.yaml``, prefixed
per-subsystem Taskfiles with ``status:`` guards, a root Taskfile that leaves grafana out of its
includes, a ``process-compose.yaml`` and a ``.gitignore``. Every check is shown finding its problem
and, after the fix it prints is applied, no longer finding it.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from sync_tools.cli import cli
from tests.gitrepos import GitRepo

NATS_TASKFILE = """version: '3'

vars:
  NATS_BIN_NAME: nats-server
  NATS_UPSTREAM_REPO: @UPSTREAM@
  NATS_VERSION: '{{.NATS_VERSION | default "v2.10.24"}}'
  NATS_SRC: '{{.TASKFILE_DIR}}/.src'
  NATS_BIN: '{{.TASKFILE_DIR}}/.bin'
  NATS_BIN_PATH: '{{.NATS_BIN}}/{{.NATS_BIN_NAME}}'
  NATS_HTTP: '4@PORT@'

tasks:
  src:update:
    cmds:
      - git -C {{.NATS_SRC}} checkout {{.NATS_VERSION}}
  bin:build:
    status:
      - test -f {{.NATS_BIN_PATH}}
    cmds:
      - go build -o {{.NATS_BIN_PATH}} .
  ensure:
    status:
      - test -f {{.NATS_BIN_PATH}}
    cmds:
      - task: bin:build
  health:
    cmds:
      - curl -sf http://127.0.0.1:{{.NATS_HTTP}}/healthz
  run:
    cmds:
      - '{{.NATS_BIN_PATH}} -m {{.NATS_HTTP}}'
"""

LB_TASKFILE = """version: '3'

vars:
  LB_BIN_NAME: liftbridge
  LB_UPSTREAM_REPO: @UPSTREAM@
  LB_VERSION: '{{.LB_VERSION | default "master"}}'
  LB_BIN: '{{.TASKFILE_DIR}}/.bin'
  LB_BIN_PATH: '{{.LB_BIN}}/{{.LB_BIN_NAME}}{{exeExt}}'

tasks:
  src:update:
    cmds:
      - git checkout {{.LB_VERSION}}
  bin:build:
    status:
      - test -f {{.LB_BIN_PATH}}
    cmds:
      - go build -o {{.LB_BIN_PATH}} .
  health:
    cmds:
      - curl -sf http://127.0.0.1:9292/
  run:
    cmds:
      - '{{.LB_BIN_PATH}} --port 9292'
"""

ARC_TASKFILE = """version: '3'

vars:
  ARC_BIN_NAME: arc
  ARC_UPSTREAM_REPO: @UPSTREAM@
@VERSION_VARS@
  ARC_BIN: '{{.TASKFILE_DIR}}/.bin'
  ARC_BIN_PATH: '{{.ARC_BIN}}/{{.ARC_BIN_NAME}}'

tasks:
  src:update:
    cmds:
      - git fetch origin main
  bin:build:
@ARC_GUARD@
    cmds:
      - go build -o {{.ARC_BIN_PATH}} ./cmd/arc
  health:
    cmds:
      - curl -sf http://127.0.0.1:@ARC_PORT@/health
  run:
    cmds:
      - '{{.ARC_BIN_PATH}} --config arc.toml'
"""

GF_TASKFILE = """version: '3'

vars:
  GF_BIN_NAME: grafana-server
  GF_VERSION: '11.4.0'
  GF_UPSTREAM_REPO: @UPSTREAM@
  GF_BIN: '{{.TASKFILE_DIR}}/.bin'
  GF_BIN_PATH: '{{.GF_BIN}}/bin/{{.GF_BIN_NAME}}'

tasks:
  src:update:
    cmds:
      - echo download v{{.GF_VERSION}}
  bin:build:
    status:
      - test -f {{.GF_BIN_PATH}}
    cmds:
      - echo pre-built
  health:
    cmds:
      - curl -sf http://127.0.0.1:3000/api/health
"""

ROOT_TASKFILE = """version: '3'

vars:
  SUBSYSTEMS_RELEASE: nats liftbridge arc

includes:
  nats: ./nats
  liftbridge: ./liftbridge
  arc: ./arc
@MORE_INCLUDES@
tasks:
  default:
    cmds:
      - task --list
"""

MANIFEST = """subsystems:
  nats:
    version: v2.10.24
    upstream: @NATS@
  liftbridge:
    version: v1.10.0
    upstream: @LB@
  arc:
    version: main  # no releases yet
    upstream: @ARC@
@ARC_EXTRA@
  grafana:
    version: "11.4.0"
    upstream: @GF@
"""

PROCESS_COMPOSE = """version: "0.5"
processes:
  nats:
    command: task nats:run
  liftbridge:
    command: task liftbridge:run
    depends_on:
      nats:
        condition: process_healthy
  @ARC_PROCESS@:
    command: task arc:run
    readiness_probe:
      exec:
        command: task arc:health
  grafana:
    command: task grafana:run
"""

GITIGNORE = "**/.src/\n**/.bin/\n**/.data/\n.env\n"


class Ws:
    """A plat-telemetry-like workspace under ``root`` with its upstreams; edit it with :meth:`write`."""

    def __init__(self, tmp: Path, *, arc_port: int = 7070, arc_process: str = "arc",
                 arc_version_vars: str = "  ARC_VERSION: '{{.ARC_VERSION | default \"main\"}}'",
                 arc_guarded: bool = True):
        self.root = tmp / "plat-telemetry"
        up = tmp / "upstreams"
        nats = GitRepo.create(up / "nats-server.git")
        for t in ("v2.10.23", "v2.10.24", "v2.10.25"):
            nats.commit(f"release {t}")
            nats.tag(t, annotated=t.endswith("5"))
        nats.commit("work after the release")
        lb = GitRepo.create(up / "liftbridge.git", branch="master")
        for t in ("v1.8.0", "v1.9.0-rc1", "v1.9.0"):
            lb.commit(f"release {t}")
            lb.tag(t)
        fork = GitRepo.create(up / "liftbridge-fork.git", branch="master")
        fork.commit("fork")
        fork.tag("v1.9.0")
        arc = GitRepo.create(up / "arc.git")
        arc.commit("initial")
        arc.commit("duckdb")
        gf = GitRepo.create(up / "grafana.git")
        for t in ("v11.3.0", "v11.4.0", "v11.5.0"):
            gf.commit(f"release {t}")
            gf.tag(t)
        self.arc_head = arc.head()
        self.urls = {"nats": str(nats.path), "liftbridge": str(lb.path), "fork": str(fork.path),
                     "arc": str(arc.path), "grafana": str(gf.path)}
        for r in (nats, lb, fork, arc, gf):
            r.close()
        guard = "    status:\n      - test -f {{.ARC_BIN_PATH}}" if arc_guarded else ""
        self.write("manifest.yaml", _fill(MANIFEST, NATS=self.urls["nats"], LB=self.urls["liftbridge"],
                                          ARC=self.urls["arc"], GF=self.urls["grafana"], ARC_EXTRA=""))
        self.write("Taskfile.yml", _fill(ROOT_TASKFILE, MORE_INCLUDES=""))
        self.write("nats/Taskfile.yml", _fill(NATS_TASKFILE, UPSTREAM=self.urls["nats"], PORT="222"))
        self.write("liftbridge/Taskfile.yml", _fill(LB_TASKFILE, UPSTREAM=self.urls["fork"]))
        self.write("arc/Taskfile.yml", _fill(ARC_TASKFILE, UPSTREAM=self.urls["arc"], ARC_PORT=str(arc_port),
                                             VERSION_VARS=arc_version_vars, ARC_GUARD=guard))
        self.write("grafana/Taskfile.yml", _fill(GF_TASKFILE, UPSTREAM=self.urls["grafana"]))
        self.write("process-compose.yaml", _fill(PROCESS_COMPOSE, ARC_PROCESS=arc_process))
        self.write(".gitignore", GITIGNORE)

    def write(self, rel: str, text: str) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def edit(self, rel: str, old: str, new: str) -> None:
        text = (self.root / rel).read_text()
        assert old in text, f"{old!r} not in {rel}"
        self.write(rel, text.replace(old, new))

    def install(self, sub: str, rel_binary: str, content: bytes, version_text: str | None) -> Path:
        """A binary at ``<sub>/.bin/<rel_binary>`` and, unless None, *version_text* as its .version."""
        binary = self.root / sub / ".bin" / rel_binary
        binary.parent.mkdir(parents=True, exist_ok=True)
        binary.write_bytes(content)
        binary.chmod(0o755)
        if version_text is not None:
            (self.root / sub / ".bin" / ".version").write_text(version_text)
        return binary


def _fill(template: str, **values: str) -> str:
    for k, v in values.items():
        template = template.replace(f"@{k}@", v)
    return template


class Run:
    def __init__(self, exit_code: int, data: dict, text: str):
        self.exit_code = exit_code
        self.findings = data["findings"]
        self.data = data
        self.text = text

    def of(self, sub: str | None, code: str | None = None) -> list[dict]:
        return [f for f in self.findings if f["subsystem"] == sub and (code is None or f["code"] == code)]

    def one(self, sub: str | None, code: str) -> dict:
        found = self.of(sub, code)
        assert len(found) == 1, f"{sub} {code}: {found}\n{self.text}"
        return found[0]

    def codes(self, sub: str | None) -> set[str]:
        return {f["code"] for f in self.of(sub)}


def doctor(root: Path, *args: str, config: str = "manifest.yaml") -> Run:
    """Run `sync-tools doctor` twice, --json and as text, and check both agree."""
    runner = CliRunner()
    base = ["doctor", "--config", str(root / config), *args]
    res = runner.invoke(cli, [*base, "--json"])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    data = json.loads(res.stdout)
    text = runner.invoke(cli, base)
    assert text.exit_code == res.exit_code
    lines = text.stdout.splitlines()
    assert len(lines) == len(data["findings"])
    assert data["errors"] == sum(f["level"] == "error" for f in data["findings"])
    assert data["warnings"] == sum(f["level"] == "warning" for f in data["findings"])
    return Run(res.exit_code, data, text.stdout)


@pytest.fixture
def ws(tmp_path: Path) -> Ws:
    return Ws(tmp_path)


# ------------------------------------------------------------------------------------------- 1 pins


def test_pin_missing_upstream_is_an_error_naming_the_newest_with_its_fix_line(ws: Ws) -> None:
    run = doctor(ws.root)
    assert run.exit_code == 1
    f = run.one("liftbridge", "pin-not-upstream")
    assert f["level"] == "error"
    assert f["message"] == "pin v1.10.0 is not a tag upstream (newest v1.9.0)"
    assert f["fix"] == "set manifest.yaml subsystems.liftbridge.version to v1.9.0"
    line = next(ln for ln in run.text.splitlines() if "pin v1.10.0" in ln)
    assert line.split()[:2] == ["error", "liftbridge"]
    assert line.endswith("pin v1.10.0 is not a tag upstream (newest v1.9.0) -> fix: set manifest.yaml "
                         "subsystems.liftbridge.version to v1.9.0")
    # the fix as printed clears it
    ws.edit("manifest.yaml", "version: v1.10.0", "version: v1.9.0")
    after = doctor(ws.root)
    assert after.one("liftbridge", "pin-tag")["level"] == "ok"
    assert "pin-not-upstream" not in after.codes("liftbridge")


def test_pins_tag_v_prefix_and_branch(ws: Ws) -> None:
    run = doctor(ws.root)
    nats = run.one("nats", "pin-tag")
    assert nats["level"] == "ok" and nats["message"] == "pin v2.10.24 is a tag upstream (newest v2.10.25)"
    gf = run.one("grafana", "pin-tag-prefix")
    assert gf["level"] == "info" and gf["message"] == "pin 11.4.0 matches upstream tag v11.4.0 (the v prefix aside)"
    arc = run.one("arc", "pin-branch")
    assert arc["level"] == "info"
    assert arc["message"] == f"follows branch main: latest is its head ({ws.arc_head[:12]})"


def test_pin_naming_nothing_upstream_when_there_are_no_tags(ws: Ws) -> None:
    ws.edit("manifest.yaml", "version: main", "version: develop")
    f = doctor(ws.root).one("arc", "pin-not-upstream")
    assert f["message"] == "pin develop is neither a tag nor a branch upstream (no version tags; branches: main)"
    assert f["fix"] == "set manifest.yaml subsystems.arc.version to main"


def test_offline_skips_the_upstreams_and_an_unreachable_upstream_is_an_error(ws: Ws) -> None:
    offline = doctor(ws.root, "--offline")
    assert offline.one(None, "pins-offline")["level"] == "info"
    assert not [f for f in offline.findings if f["code"].startswith("pin-")]
    assert offline.exit_code == 1  # grafana's build task still does not resolve (no network needed for that)
    ws.edit("manifest.yaml", f"upstream: {ws.urls['nats']}", f"upstream: {ws.root.parent / 'gone.git'}")
    f = doctor(ws.root).one("nats", "upstream-unreachable")
    assert f["level"] == "error" and "not a git repository" in f["message"]


def test_pin_in_a_sync_tools_yaml_names_its_key(tmp_path: Path) -> None:
    up = GitRepo.create(tmp_path / "web.git")
    up.commit("one")
    up.tag("v1.1.0")
    up.close()
    (tmp_path / "ws").mkdir()
    (tmp_path / "ws" / "sync-tools.yaml").write_text(
        "subsystems:\n  web:\n    upstream: ../web.git\n    current: v1.2.0\n    build: ['make web']\n"
        "    health: 'true'\n")
    run = doctor(tmp_path / "ws", config="sync-tools.yaml")
    f = run.one("web", "pin-not-upstream")
    assert f["fix"] == "set sync-tools.yaml subsystems.web.current to v1.1.0"


# ------------------------------------------------------------------------------- 2 upstream disagreement


def test_manifest_and_taskfile_upstreams_disagree(ws: Ws) -> None:
    f = doctor(ws.root, "--offline").one("liftbridge", "upstream-disagrees")
    assert f["level"] == "warning"
    assert (f"manifest.yaml upstream {ws.urls['liftbridge']} and liftbridge/Taskfile.yml LB_UPSTREAM_REPO "
            f"{ws.urls['fork']} disagree: sync-tools checks {ws.urls['liftbridge']} (the config's)") in f["message"]
    assert f["fix"].startswith(f"make them the same: set LB_UPSTREAM_REPO in liftbridge/Taskfile.yml to "
                               f"{ws.urls['liftbridge']}")
    for other in ("nats", "arc", "grafana"):
        assert "upstream-disagrees" not in doctor(ws.root, "--offline").codes(other)
    ws.edit("liftbridge/Taskfile.yml", ws.urls["fork"], ws.urls["liftbridge"] + "/")  # same repo, spelled otherwise
    assert "upstream-disagrees" not in doctor(ws.root, "--offline").codes("liftbridge")


# ------------------------------------------------------------------------------------ 3 status guards


def test_status_guarded_build_tasks_are_reported(tmp_path: Path) -> None:
    guarded = Ws(tmp_path / "a")
    run = doctor(guarded.root, "--offline")
    lines = run.of("nats", "status-guard")
    assert [f["message"].split(" (")[0] for f in lines] == ["task nats:bin:build", "task nats:ensure"]
    assert all(f["level"] == "info" for f in lines)
    assert ("has a status: guard (`test -f {{.NATS_BIN_PATH}}`): task skips the build when the binary exists; "
            "sync-tools build moves the old binary aside so the build runs") in lines[0]["message"]
    assert "nats/Taskfile.yml:" in lines[0]["message"]
    # grafana is not included by the root Taskfile: its own file's guard is still reported
    assert run.one("grafana", "status-guard")["message"].startswith("task grafana:bin:build (grafana/Taskfile.yml:")
    assert run.of("arc", "status-guard")
    unguarded = Ws(tmp_path / "b", arc_guarded=False)
    assert not doctor(unguarded.root, "--offline").of("arc", "status-guard")


# --------------------------------------------------------------------------------------- 4 version vars


def test_version_vars_template_plain_and_a_default_that_is_not_the_pin(ws: Ws) -> None:
    run = doctor(ws.root, "--offline")
    nats = run.one("nats", "version-var")
    assert nats["level"] == "info"
    assert nats["message"].startswith("version var NATS_VERSION = v2.10.24 (nats/Taskfile.yml:")
    assert "a {{.NATS_VERSION | default}} template: the environment overrides it" in nats["message"]
    gf = run.one("grafana", "version-var")
    assert "version var GF_VERSION = 11.4.0" in gf["message"] and "a plain var" in gf["message"]
    lb = run.one("liftbridge", "version-default-differs")
    assert lb["level"] == "warning"
    assert lb["message"].startswith("LB_VERSION defaults to master in liftbridge/Taskfile.yml:")
    assert "but the pin is v1.10.0" in lb["message"]
    assert lb["fix"] == "set LB_VERSION's default in liftbridge/Taskfile.yml to v1.10.0"
    assert "version-default-differs" not in run.codes("nats")


def test_version_var_not_found_names_the_config_fix(tmp_path: Path) -> None:
    ws = Ws(tmp_path, arc_version_vars="  ARC_GO_VERSION: '1.22'\n  ARC_DUCKDB_VERSION: '1.1.3'")
    f = doctor(ws.root, "--offline").one("arc", "version-var-missing")
    assert f["level"] == "warning"
    assert "several candidates (ARC_GO_VERSION, ARC_DUCKDB_VERSION)" in f["message"]
    assert f["fix"].startswith("set subsystems.arc.version_var: ARC_GO_VERSION in manifest.yaml")
    ws.edit("manifest.yaml", "version: main  # no releases yet", "version: main\n    version_var: ARC_DUCKDB_VERSION")
    run = doctor(ws.root, "--offline")
    assert "version-var-missing" not in run.codes("arc")
    assert run.one("arc", "version-var")["message"].startswith("version var ARC_DUCKDB_VERSION = 1.1.3")

    bare = Ws(tmp_path / "bare", arc_version_vars="")
    f = doctor(bare.root, "--offline").one("arc", "version-var-missing")
    assert "no *_VERSION var in arc/Taskfile.yml" in f["message"]
    assert "set subsystems.arc.version_var: ARC_VERSION" in f["fix"]


# -------------------------------------------------------------------------------------- 5 build tasks


def test_build_tasks_resolve_through_the_root_includes(ws: Ws) -> None:
    run = doctor(ws.root, "--offline")
    f = run.one("grafana", "build-task-missing")
    assert f["level"] == "error" and run.exit_code == 1
    assert f["message"] == ("build command task grafana:src:update; task grafana:bin:build does not resolve (the "
                            "root Taskfile does not include grafana): plan will not plan it")
    assert f["fix"].startswith("add `grafana: ./grafana` to the root Taskfile's includes, or set "
                               "subsystems.grafana.build in manifest.yaml")
    assert run.one("nats", "build-tasks")["level"] == "ok"
    ws.edit("Taskfile.yml", "  arc: ./arc\n", "  arc: ./arc\n  grafana: ./grafana\n")
    after = doctor(ws.root, "--offline")
    assert "build-task-missing" not in after.codes("grafana")
    assert after.exit_code == 0, after.text


# --------------------------------------------------------------------------------------- 6 binaries


def test_binaries_and_their_version_files(ws: Ws) -> None:
    nats_bin = ws.install("nats", "nats-server", b"#!/bin/sh\necho nats\n", None)
    digest = hashlib.sha256(nats_bin.read_bytes()).hexdigest()
    ws.write("nats/.bin/.version", f"commit: abc1234\ntimestamp: 2025-01-01T00:00:00Z\nchecksum: {digest}\n")
    ws.install("liftbridge", "liftbridge", b"lb", f"commit: abc\ntimestamp: t\nchecksum: {'0' * 64}\n")
    ws.install("grafana", "bin/grafana-server", b"gf", "11.4.0\n")
    run = doctor(ws.root, "--offline")
    ok = run.one("nats", "binary")
    assert ok["level"] == "ok" and ok["message"].startswith("binary nats/.bin/nats-server matches its .version")
    bad = run.one("liftbridge", "checksum-mismatch")
    assert bad["level"] == "error" and bad["fix"] == "sync-tools build --only liftbridge"
    assert f".version says {'0' * 12}" in bad["message"]
    legacy = run.one("grafana", "version-file-legacy")
    assert legacy["level"] == "warning"
    # (where the Taskfile writes it: <name>/.bin, though the binary is in .bin/bin)
    assert legacy["message"].startswith("grafana/.bin/.version is the one line '11.4.0': binary "
                                        "grafana/.bin/bin/grafana-server is unverified until the first verified install")
    absent = run.one("arc", "binary-absent")
    assert absent["level"] == "info" and absent["message"] == "no binary at arc/.bin/arc yet"
    (ws.root / "nats/.bin/.version").unlink()
    assert doctor(ws.root, "--offline").one("nats", "version-file-missing")["level"] == "warning"
    ws.install("arc", "arc-server", b"arc", None)  # a binary under another name: named in the hint
    assert "(.bin holds arc-server" in doctor(ws.root, "--offline").one("arc", "binary-absent")["message"]


# ----------------------------------------------------------------------------------------- 7 health


def test_health_from_the_taskfile_or_missing(ws: Ws) -> None:
    run = doctor(ws.root, "--offline")
    for sub in ("nats", "liftbridge", "arc"):
        f = run.one(sub, "health")
        assert f["level"] == "ok" and f["message"] == f"health: task {sub}:health"
    f = run.one("grafana", "health-missing")
    assert f["level"] == "warning"
    assert f["fix"].startswith("add `grafana: ./grafana` to the root Taskfile's includes (its health task becomes "
                               "`task grafana:health`)")
    ws.edit("Taskfile.yml", "  arc: ./arc\n", "  arc: ./arc\n  grafana: ./grafana\n")
    assert doctor(ws.root, "--offline").one("grafana", "health")["message"] == "health: task grafana:health"


# ------------------------------------------------------------------------------- 8 process-compose


def test_process_missing_from_process_compose_is_a_warning_with_the_name_to_set(tmp_path: Path) -> None:
    ws = Ws(tmp_path, arc_process="arc-db")
    run = doctor(ws.root, "--offline")
    f = run.one("arc", "process-missing")
    assert f["level"] == "warning"
    assert f["message"].startswith("process arc is not in process-compose.yaml (processes: nats, liftbridge, "
                                   "arc-db, grafana)")
    assert f["fix"] == "set subsystems.arc.process: arc-db in manifest.yaml"
    ws.edit("manifest.yaml", "version: main  # no releases yet", "version: main\n    process: arc-db")
    assert "process-missing" not in doctor(ws.root, "--offline").codes("arc")


def test_port_clash_with_process_compose_api(tmp_path: Path) -> None:
    clash = Ws(tmp_path / "a", arc_port=8080)
    f = doctor(clash.root, "--offline").one("arc", "port-clash")
    assert f["level"] == "warning"
    assert f["message"] == ("process arc uses port 8080 (arc/Taskfile.yml task health), which process-compose's "
                            "API uses by default")
    assert "--port N" in f["fix"] and "agent.url" in f["fix"]
    # process-compose started on a unix socket (plat-telemetry's pc:run): 8080 is free, 9191 is still the relay's
    pc_taskfile = ("version: '3'\nvars:\n  PC_BIN_PATH: '{{.TASKFILE_DIR}}/.bin/process-compose'\n"
                   "tasks:\n  run:fg:\n    cmds:\n      - '{{.PC_BIN_PATH}} up -U -u {{.TASKFILE_DIR}}/.pc.sock -t=false'\n")
    relay_port = Ws(tmp_path / "r", arc_port=9191)
    for ws in (clash, relay_port):
        ws.write("pc/Taskfile.yml", pc_taskfile)
        ws.edit("Taskfile.yml", "  arc: ./arc\n", "  arc: ./arc\n  pc: ./pc\n")
    assert not [x for x in doctor(clash.root, "--offline").findings if x["code"] == "port-clash"]
    f = doctor(relay_port.root, "--offline").one("arc", "port-clash")
    assert f["message"] == ("process arc uses port 9191 (arc/Taskfile.yml task health), which sync-tools relay "
                            "uses by default (process-compose's API is on a unix socket: pc/Taskfile.yml task "
                            "run:fg runs it with -U)")
    assert f["fix"] == "move process arc to another port, or run sync-tools relay with --port N"
    ok = Ws(tmp_path / "b", arc_port=18080)  # 8080 inside another number is no clash
    assert not [x for x in doctor(ok.root, "--offline").findings if x["code"] == "port-clash"]


def test_port_clash_of_the_agent_and_the_relay_with_a_sync_tools_yaml(tmp_path: Path) -> None:
    root = tmp_path / "ws"
    root.mkdir()
    cfg = root / "sync-tools.yaml"
    cfg.write_text("subsystems:\n  web:\n    upstream: https://example.invalid/web.git\n    build: ['make']\n"
                   "    health: 'true'\n"
                   "agent:\n  reload: process-compose\n  listen: 127.0.0.1:8080\n")
    (root / "process-compose.yaml").write_text(
        "processes:\n  web:\n    command: ./web/.bin/web\n    environment:\n      - 'PORT=9999'\n"
        "  relay:\n    command: sync-tools relay --config sync-tools.yaml\n")
    run = doctor(root, "--offline", config="sync-tools.yaml")
    clashes = [f for f in run.findings if f["code"] == "port-clash"]
    # the relay without --port listens on 9191, not on process-compose's 8080
    assert {(f["subsystem"], f["message"].split(" uses")[0]) for f in clashes} == {
        (None, "the agent (agent.listen 127.0.0.1:8080)"),
    }
    # process-compose's API moved to 9999 (agent.url): now web's PORT=9999 clashes, and 8080 is free
    cfg.write_text(cfg.read_text().replace("listen: 127.0.0.1:8080", "listen: 127.0.0.1:8080\n"
                                           "  url: http://127.0.0.1:9999"))
    clashes = [f for f in doctor(root, "--offline", config="sync-tools.yaml").findings if f["code"] == "port-clash"]
    assert [(f["subsystem"], f["message"]) for f in clashes] == [
        ("web", "process web uses port 9999 (process-compose.yaml), which process-compose's API uses (agent.url)")]


# ------------------------------------------------------------------------------------- 9 .gitignore


def test_gitignore_lacks_the_version_manifest(ws: Ws) -> None:
    f = doctor(ws.root, "--offline").one(None, "gitignore")
    assert f["level"] == "warning"
    assert f["fix"] == "add the line `.version-manifest.json` to .gitignore"
    ws.write(".gitignore", GITIGNORE + "/.version-manifest.json\n")
    assert doctor(ws.root, "--offline").one(None, "gitignore")["level"] == "ok"
    ws.write(".gitignore", GITIGNORE + "*.json\n!.version-manifest.json\n")  # ignored, then un-ignored
    assert doctor(ws.root, "--offline").one(None, "gitignore")["level"] == "warning"


# ------------------------------------------------------------------------------------- the command


def test_every_fix_applied_leaves_exit_0(ws: Ws) -> None:
    assert doctor(ws.root).exit_code == 1
    ws.edit("manifest.yaml", "version: v1.10.0", "version: v1.9.0")
    ws.edit("Taskfile.yml", "  arc: ./arc\n", "  arc: ./arc\n  grafana: ./grafana\n")
    run = doctor(ws.root)
    assert run.exit_code == 0 and run.data["errors"] == 0, run.text


def test_a_broken_file_is_one_finding_and_the_other_checks_still_run(ws: Ws) -> None:
    ws.write("process-compose.yaml", "processes: [unclosed\n")
    run = doctor(ws.root, "--offline")
    f = run.one(None, "processes-failed")
    assert f["level"] == "error" and "process-compose.yaml" in f["message"] and "invalid YAML" in f["message"]
    assert run.one("nats", "health")["level"] == "ok"


def test_a_config_error_is_a_finding_too(tmp_path: Path) -> None:
    (tmp_path / "sync-tools.yaml").write_text("subsystems:\n  nats:\n    strategy: tagz\n")
    run = doctor(tmp_path, config="sync-tools.yaml")
    assert run.exit_code == 1
    f = run.one(None, "config")
    assert "subsystems.nats.strategy: unknown value 'tagz'" in f["message"]


def test_the_console_script_prints_one_line_per_finding_and_exits_1(ws: Ws) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "sync_tools", "doctor", "--offline"], cwd=ws.root, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:2] == ["warning", "-"] and ".version-manifest.json" in lines[0]
    assert any(ln.split()[:2] == ["error", "grafana"] and "plan will not plan it" in ln for ln in lines)
    counted = doctor(ws.root, "--offline")
    assert len(lines) == len(counted.findings)
    assert proc.stderr.strip() == f"{counted.data['errors']} error(s), {counted.data['warnings']} warning(s)"


# ------------------------------------------------------------------------------ the plat-telemetry fixture


def test_doctor_on_plat_telemetry_as_it_stands(tmp_path: Path) -> None:
    from tests.platform_fixture import make_plat_telemetry

    with make_plat_telemetry(tmp_path, ports={"arc": 8080}) as pt:
        run = doctor(pt.root)
        assert run.exit_code == 1
        lb = run.one("liftbridge", "pin-not-upstream")
        assert lb["message"] == "pin v1.10.0 is not a tag upstream (newest v1.9.0)"
        assert lb["fix"] == "set manifest.yaml subsystems.liftbridge.version to v1.9.0"
        assert run.one("grafana", "pin-tag-prefix")["message"] == ("pin 11.4.0 matches upstream tag v11.4.0 "
                                                                   "(the v prefix aside)")
        assert run.one("arc", "pin-branch")["message"].startswith("follows branch main: latest is its head (")
        assert run.one("telegraf", "pin-branch")["message"].startswith("follows branch master: latest is its head (")
        assert run.one("nats", "pin-tag")["level"] == "ok"
        assert "Basekick-Labs/liftbridge.git" in run.one("liftbridge", "upstream-disagrees")["message"]
        assert run.one("liftbridge", "version-default-differs")["fix"] == ("set LB_VERSION's default in "
                                                                          "liftbridge/Taskfile.yml to v1.10.0")
        assert "a plain var" in run.one("grafana", "version-var")["message"]
        assert run.one("grafana", "build-task-missing")["level"] == "error"
        assert run.one("grafana", "health-missing")["level"] == "warning"
        for sub in ("nats", "liftbridge", "arc", "telegraf", "grafana"):
            assert run.of(sub, "status-guard"), sub
            assert run.one(sub, "binary-absent")["level"] == "info"
        # arc's 8080 is free: process-compose is on a unix socket, and the relay's default is 9191
        assert not run.of("arc", "port-clash")
        assert run.one(None, "gitignore")["level"] == "warning"
        # errors: liftbridge's pin, grafana's build; warnings: .gitignore, liftbridge's upstream and version
        # default, grafana's health
        assert (run.data["errors"], run.data["warnings"]) == (2, 4)
        # the legacy one-line .version that bin:download writes
        binary = pt.binary("grafana")
        binary.parent.mkdir(parents=True)
        binary.write_bytes(b"#!/bin/sh\n")
        (pt.root / "grafana/.bin/.version").write_text("latest\n")
        f = doctor(pt.root, "--offline").one("grafana", "version-file-legacy")
        assert f["message"].startswith("grafana/.bin/.version is the one line 'latest'")
