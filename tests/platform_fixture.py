"""A faithful, small copy of the real plat-telemetry repository, with served upstreams, for tests.

sync-tools must work on joeblew999/plat-telemetry as it stands, without rewriting it. This fixture
reproduces that repository's traits (studied from its Taskfiles, ``manifest.yaml``,
``process-compose.yaml`` and ``.gitignore``; written here from scratch) so tests meet the same
awkward facts sync-tools meets there. Each trait, and why it matters:

``manifest.yaml`` (``subsystems: {name: {version, upstream, description}}``)
    - nats ``v2.10.24`` (upstream nats-io/nats-server): a plain tag pin with newer tags upstream.
    - liftbridge ``v1.10.0`` (upstream liftbridge-io/liftbridge): NO such tag exists; the newest is
      ``v1.9.0``. A pin ahead of upstream must not read as "update available".
    - arc ``main``: a branch ("no releases yet"); arc has no tags at all.
    - telegraf ``master``: a branch of a fork (Basekick-Labs/telegraf).
    - grafana ``"11.4.0"``: the upstream tags carry a ``v`` (``v11.4.0``); the pin does not.

Per-subsystem ``Taskfile.yml`` with its own var prefix, not always the subsystem's name
    ``NATS_*``, ``LB_*`` (liftbridge), ``ARC_*``, ``TG_*`` (telegraf), ``GF_*`` (grafana); so
    ``<NAME>_VERSION`` guessed from the name is wrong for three of five.
    - ``<P>_VERSION: '{{.<P>_VERSION | default "..."}}'``: the environment overrides the pin (the
      template default). liftbridge's default is ``master``, not manifest.yaml's ``v1.10.0``.
    - ``LB_UPSTREAM_REPO`` is a fork (Basekick-Labs/liftbridge), not manifest.yaml's canonical
      upstream: the two disagree. The fork is a second served repository (``liftbridge-fork``):
      a copy of the canonical one (tags included, as GitHub forks are) plus its own master commits.
    - ``LB_BIN_PATH`` ends in ``{{exeExt}}``.
    - grafana: ``GF_VERSION: '11.4.0'`` has no ``default``, so the environment cannot override it
      (a ``task ... GF_VERSION=x`` command-line var can); its binary is ``.bin/bin/grafana-server``
      (``GF_BIN_PATH``); it is "downloaded" by ``src:clone``/``src:update`` (the real one fetches a
      tarball from dl.grafana.com: here the ``v<GF_VERSION>`` tag is cloned to a temp dir and built
      straight into ``.bin``; there is no ``grafana/.src``), ``bin:build`` is a status-guarded no-op,
      and ``.version`` is the one line ``11.4.0``. The root Taskfile does NOT include grafana, so
      ``task grafana:...`` fails from the root: run ``task -d grafana ...``.
    - arc builds ``./cmd/arc``; telegraf builds with ``make build`` in ``.src`` then copies the binary.

``bin:build`` guarded by ``status: [test -f <binary>]``
    go-task skips the build whenever a binary exists, whatever version the source now is: a rebuild
    after a version change silently keeps the old binary. That is the behaviour sync-tools must work
    around: moving the binary away first works; ``task --force nats:bin:build`` does not (it forces
    the ``src:clone`` dependency too, and ``git clone`` refuses the existing ``.src``). The build writes
    ``.bin/.version`` as three lines ``commit: <short sha>`` / ``timestamp: <iso>`` /
    ``checksum: <sha256>`` (``shasum -a 256``, as upstream). ``bin:download`` (curl from
    ``RELEASE_BASE_URL/RELEASE_VERSION``, here ``file://<root>/.releases/latest``) writes a
    one-line ``.version`` holding the release name (``latest``). ``ensure`` is a status-guarded
    call of ``bin:build``.

``src:update``: the ``git`` CLI against the upstream URL
    ``src:clone`` is ``git clone --branch <version> --depth 1 URL <sub>/.src`` (status: the dir
    exists); ``src:update`` is ``git fetch --tags`` + ``git checkout <version>`` (nats, liftbridge)
    or ``git fetch origin <branch>`` + ``git checkout <branch>`` (arc, telegraf). The latter is the
    real repository's flaw, kept on purpose: fetching a branch moves ``origin/<branch>`` but the
    checkout stays on the old local branch head, so a branch pin never advances by itself.

Root ``Taskfile.yml``
    ``includes`` arc, docs, gh, liftbridge, nats, pc, service, sync, telegraf, test-reload, utm (NOT
    grafana); each include has a directory with a minimal Taskfile (vars with its prefix: ``DOCS_*``,
    ``GH_*``, ``PC_*``, ``SERVICE_*``, ``SYNC_*``, ``TR_*``, ``UTM_*``, and a trivial task). Root vars
    ``SUBSYSTEMS_BUILD: arc docs gh liftbridge nats pc sync telegraf`` and
    ``SUBSYSTEMS_RELEASE: arc gh liftbridge nats pc sync telegraf`` name non-subsystems too; grafana
    is in neither.

``process-compose.yaml`` and runtime files
    every service runs as ``command: task X:run`` with readiness probe ``exec: command: task X:health``
    (grafana included, though the root cannot run ``task grafana:run``, as in the real repo).
    ``pc/Taskfile.yml`` restarts a process by stop, wait, start (the owner replaced
    ``process restart`` because a restart raced the old process for its port); its API socket is
    ``pc/.pc.sock``. Runtime config files that are NOT build inputs: ``nats/nats.conf``,
    ``liftbridge/configs/standalone.yaml``, ``arc/arc.toml``, ``telegraf/telegraf.conf``,
    ``grafana/grafana.ini``; each holds the service's loopback HTTP port. Ports are free ones chosen
    at build time, or given (``ports={"arc": 8080}`` makes the process-compose/relay default port a
    clash candidate). ``.gitignore`` ignores ``.src/``, ``.bin/``, ``.data/`` but NOT
    ``.version-manifest.json``. The workspace is a committed git repository.

A stand-in ``go`` (``tool_bin/go``, Python)
    ``go build [-o OUT] [PKG]`` inside a module (a dir with ``go.mod``) writes an executable
    ``#!/bin/sh`` "binary" that records the source commit (``git rev-parse HEAD`` at build time), the
    ``VERSION`` file of the source, and ``$GOOS/$GOARCH``. Run with ``--version`` it prints
    ``commit:``/``version:``/``platform:`` lines (:meth:`PlatTelemetry.run_binary` parses them), so a
    test can tell which source a binary came from. Run otherwise it is a service: it reads the port
    from its ``--config`` file and answers every HTTP GET on 127.0.0.1 with the same lines (so the
    running binary is identifiable too), or, without a port (telegraf), waits for a signal.
    ``go env GOOS``/``GOARCH``, ``go version``, ``go mod download``, ``go list -m`` answer like go.
    ``tool_bin`` also links ``task`` (PyPI go-task-bin, from this interpreter's venv).

Upstreams with realistic tag sets (every tag its own commit whose ``VERSION`` file is the tag name;
commits past the last release hold the branch name)
    - nats: hundreds of tags, v1.x, v2.0.0 .. v2.10.24 and beyond (v2.10.29, v2.11.x, v2.12.x), with
      ``-RC.n``, ``-beta.n``, ``-preview.n``, a ``v2.10.24-binary`` suffix tag and non-version tags;
      stable releases annotated, the rest lightweight; ``main`` one commit past the newest tag.
    - liftbridge (canonical): tags up to v1.9.0 only, default branch ``master``; its fork adds
      commits on ``master``.
    - arc: ``main`` only, no tags. telegraf (fork): ``master`` only.
    - grafana: v10.x and v11.x tags (v11.4.0, v11.4.1, v11.5.0, ..., a ``+security-01`` tag), ``main``.

Serving (``serve=``): ``"path"`` (plain paths, fastest), ``"file"`` (``file://`` URLs), ``"http"``
(:class:`CloneableGitHTTPServer`, tests.servers.git_http's smart HTTP on 127.0.0.1) or ``"daemon"``
(``git daemon``).
Close the fixture (or use it as a context manager / the ``plat_telemetry`` pytest fixture) to stop
the servers. Needs the ``git`` binary (the Taskfiles run it) and ``make``/``curl``/``shasum``.

Example::

    from tests.platform_fixture import plat_telemetry  # noqa: F401 -- the pytest fixture

    def test_x(plat_telemetry):
        pt = plat_telemetry
        pt.task("nats:src:update", "nats:bin:build")
        assert pt.run_binary("nats")["version"] == "v2.10.24"
        pt.tag("nats", "v2.10.30")                           # upstream releases
        pt.task("liftbridge:src:update", "liftbridge:bin:build", LB_VERSION="v1.9.0")
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dulwich.objects import Tag
from dulwich.repo import Repo

from tests.gitrepos import GitRepo
from tests.servers.git_http import GitDaemon, GitHTTPServer
from tests.support import free_port

VENV_BIN = Path(sys.executable).parent  # holds `task` (go-task-bin) in the project's venv
SERVE_MODES = ("path", "file", "http", "daemon")
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "plat-telemetry fixture", "GIT_AUTHOR_EMAIL": "fixture@localhost",
                "GIT_COMMITTER_NAME": "plat-telemetry fixture", "GIT_COMMITTER_EMAIL": "fixture@localhost"}

#: subsystem -> (Taskfile var prefix, binary path below <sub>/.bin/)
SUBSYSTEMS: dict[str, tuple[str, str]] = {
    "nats": ("NATS", "nats-server"),
    "liftbridge": ("LB", "liftbridge"),
    "arc": ("ARC", "arc"),
    "telegraf": ("TG", "telegraf"),
    "grafana": ("GF", "bin/grafana-server"),
}
#: manifest.yaml's pins (as the real file spells them)
MANIFEST_VERSIONS = {"nats": "v2.10.24", "liftbridge": "v1.10.0", "arc": "main", "telegraf": "master",
                     "grafana": "11.4.0"}
#: the root Taskfile's includes (no grafana), and the non-subsystem includes' var prefixes
INCLUDES = ("arc", "docs", "gh", "liftbridge", "nats", "pc", "service", "sync", "telegraf", "test-reload",
            "utm")
OTHER_PREFIXES = {"docs": "DOCS", "gh": "GH", "pc": "PC", "service": "SERVICE", "sync": "SYNC",
                  "test-reload": "TR", "utm": "UTM"}
#: upstream key -> (path below the served root, default branch)
UPSTREAM_LAYOUT = {
    "nats": ("nats-io/nats-server.git", "main"),
    "liftbridge": ("liftbridge-io/liftbridge.git", "master"),
    "liftbridge-fork": ("Basekick-Labs/liftbridge.git", "master"),
    "arc": ("basekick-labs/arc.git", "main"),
    "telegraf": ("Basekick-Labs/telegraf.git", "master"),
    "grafana": ("grafana/grafana.git", "main"),
}
#: services with an HTTP port: subsystem -> health path
HTTP_SERVICES = {"nats": "/healthz", "liftbridge": "/", "arc": "/health", "grafana": "/api/health"}


# ----------------------------------------------------------------------------------------- tag sets


def nats_tags() -> list[str]:
    """nats-server's tags in release order: a few hundred, with RC/beta/preview pre-releases."""
    tags = ["v1.0.0", "v1.0.2", "v1.0.4", "v1.1.0", "v1.2.0", "v1.3.0", "v1.4.0", "v1.4.1"]
    patches = {0: 4, 1: 6, 2: 7, 3: 6, 4: 1, 5: 0, 6: 10, 7: 4, 8: 4, 9: 25, 10: 29, 11: 9, 12: 2}
    for minor, last in patches.items():
        if minor in (2, 9):
            tags += [f"v2.{minor}.0-beta.{n}" for n in range(1, 4)]
        if minor == 11:
            tags += [f"v2.11.0-preview.{n}" for n in range(1, 3)]
        for patch in range(last + 1):
            # release candidates before every .0 and every third patch, as nats cuts them
            if patch == 0 or patch % 3 == 0:
                tags += [f"v2.{minor}.{patch}-RC.{n}" for n in range(1, 4 if patch else 7)]
            tags.append(f"v2.{minor}.{patch}")
    return tags


NATS_EXTRA_TAGS = {"v2.10.24-binary": "v2.10.24"}  # suffix tag on a release's commit
NATS_OTHER_TAGS = {"nightly-20241215": "v2.10.24", "before-go-1.22": "v2.10.9", "gnatsd": "v1.4.1"}


def liftbridge_tags() -> list[str]:
    """liftbridge's tags: up to v1.9.0 and no further (plat-telemetry pins v1.10.0)."""
    tags = [f"v0.{m}.0" for m in range(1, 10)] + ["v1.0.0-rc1", "v1.0.0", "v1.0.1", "v1.1.0", "v1.2.0"]
    tags += ["v1.3.0", "v1.4.0", "v1.4.1", "v1.5.0", "v1.5.1", "v1.6.0", "v1.7.0", "v1.7.1", "v1.8.0"]
    return tags + ["v1.9.0-rc1", "v1.9.0"]


def grafana_tags() -> list[str]:
    """grafana's tags (with the v that manifest.yaml's ``11.4.0`` lacks)."""
    tags = [f"v10.{m}.{p}" for m in range(5) for p in range(3)]
    for minor, last in {0: 2, 1: 3, 2: 3, 3: 2, 4: 3, 5: 2, 6: 0}.items():
        tags.append(f"v11.{minor}.0-preview")
        tags += [f"v11.{minor}.{p}" for p in range(last + 1)]
        if minor == 3:
            tags.append("v11.3.0+security-01")
    return tags


# ------------------------------------------------------------------------------------- the go tool

_GO_TOOL = r'''#!@PYTHON@
"""Stand-in `go` of the plat-telemetry test fixture (tests/platform_fixture.py).

`go build [-o OUT] [PKG]` writes a #!/bin/sh "binary" naming the source commit, its VERSION file
and GOOS/GOARCH; `go env`, `go version`, `go mod download`, `go list -m` answer like go."""
import os, platform, subprocess, sys
from pathlib import Path

ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def goenv():
    goos = {"linux": "linux", "darwin": "darwin", "win32": "windows"}.get(sys.platform, sys.platform)
    return {"GOOS": os.environ.get("GOOS") or goos,
            "GOARCH": os.environ.get("GOARCH") or ARCH.get(platform.machine().lower(), platform.machine())}


def module_root(start):
    for d in (start, *start.parents):
        if (d / "go.mod").is_file():
            return d
    sys.exit("go: go.mod file not found in current directory or any parent directory")


BINARY = """#!/bin/sh
# built by the plat-telemetry fixture's stand-in go from {module} ({pkg})
NAME='{name}'
COMMIT='{commit}'
VERSION='{version}'
PLATFORM='{platform}'
if [ "$1" = "--version" ] || [ "$1" = "version" ]; then
  printf 'name: %s\\ncommit: %s\\nversion: %s\\nplatform: %s\\n' "$NAME" "$COMMIT" "$VERSION" "$PLATFORM"
  exit 0
fi
exec '{python}' -c "$(cat <<'PY'
import re, signal, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
name, commit, version, plat = sys.argv[1:5]
args = sys.argv[7:]  # after NAME COMMIT VERSION PLATFORM -- $0
body = f"name: {{name}}\\ncommit: {{commit}}\\nversion: {{version}}\\nplatform: {{plat}}\\n".encode()
config = None
for i, a in enumerate(args):
    if a in ("--config", "-c") and i + 1 < len(args):
        config = args[i + 1]
    elif a.startswith("--config="):
        config = a.split("=", 1)[1]
port = None
if config:
    text = open(config).read()
    m = (re.search(r"^\\s*http_port\\s*[:=]\\s*(\\d+)", text, re.M) or
         re.search(r"^\\s*port\\s*[:=]\\s*(\\d+)", text, re.M))
    port = int(m.group(1)) if m else None
where = f" on 127.0.0.1:{{port}}" if port else ""
print(f"{{name}} {{version}} ({{commit[:12]}}) starting{{where}}", flush=True)
if port is None:
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    while True:
        signal.pause()
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
HTTPServer(("127.0.0.1", port), H).serve_forever()
PY
)" "$NAME" "$COMMIT" "$VERSION" "$PLATFORM" -- "$0" "$@"
"""

VALUE_FLAGS = {"-o", "-ldflags", "-tags", "-gcflags", "-mod", "-p", "-modfile", "-buildmode"}


def build(args):
    out, pkgs, i = None, [], 0
    while i < len(args):
        a = args[i]
        if a == "-o":
            out, i = args[i + 1], i + 2
            continue
        if a.startswith("-o="):
            out = a[3:]
        elif a in VALUE_FLAGS:
            i += 1
        elif not a.startswith("-"):
            pkgs.append(a)
        i += 1
    pkg = pkgs[0] if pkgs else "."
    cwd = Path.cwd()
    pkg_dir = (cwd / pkg).resolve()
    if not pkg_dir.is_dir() or not any(pkg_dir.glob("*.go")):
        sys.exit(f"no Go files in {pkg_dir}")
    root = module_root(pkg_dir)
    module = (root / "go.mod").read_text().split("\n", 1)[0].replace("module ", "").strip()
    git = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                         timeout=30)
    commit = git.stdout.strip() if git.returncode == 0 else "unknown"
    version_file = root / "VERSION"
    version = version_file.read_text().strip() if version_file.is_file() else "devel"
    name = pkg_dir.name if pkg_dir != root else module.rstrip("/").split("/")[-1]
    if name.startswith("v") and name[1:].isdigit():  # github.com/x/y/v2 names the binary y
        name = module.rstrip("/").split("/")[-2]
    target = Path(out) if out else cwd / name
    if target.is_dir():
        target = target / name
    env = goenv()
    text = BINARY.format(module=module, pkg=pkg, name=name, commit=commit, version=version,
                         platform=f"{env['GOOS']}/{env['GOARCH']}", python=sys.executable)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, target)


def main(argv):
    if not argv:
        sys.exit("Go is a tool for managing Go source code.\n\nUsage:\n\n\tgo <command> [arguments]")
    cmd, args = argv[0], argv[1:]
    if cmd == "build":
        build(args)
    elif cmd == "env":
        env = goenv()
        names = [a for a in args if not a.startswith("-")]
        if names:
            print("\n".join(env.get(n, "") for n in names))
        else:
            print("\n".join(f"{k}='{v}'" for k, v in env.items()))
    elif cmd == "version":
        env = goenv()
        print(f"go version go1.23.4 {env['GOOS']}/{env['GOARCH']}")
    elif cmd == "mod" and args[:1] == ["download"]:
        module_root(Path.cwd())
    elif cmd == "list" and "-m" in args:
        root = module_root(Path.cwd())
        print((root / "go.mod").read_text().split("\n", 1)[0].replace("module ", "").strip())
    else:
        sys.exit(f"go {cmd}: not supported by the plat-telemetry fixture's stand-in go")


main(sys.argv[1:])
'''


# ------------------------------------------------------------------------------------------ Taskfiles

_ROOT_TASKFILE = """version: '3'

vars:
  RELEASE_REPO: joeblew999/plat-telemetry
  RELEASE_VERSION: latest
  # the real file downloads from https://github.com/{{.RELEASE_REPO}}/releases/download; here a local store
  RELEASE_BASE_URL: 'file://{{.ROOT_DIR}}/.releases'
  DIST_DIR: '{{.ROOT_DIR}}/.dist'
  # Core subsystems that build binaries and run as services
  SUBSYSTEMS_BUILD: arc docs gh liftbridge nats pc sync telegraf
  # Subsystems that get released
  SUBSYSTEMS_RELEASE: arc gh liftbridge nats pc sync telegraf

includes:
@@INCLUDES@@
tasks:
  default:
    desc: Show available tasks
    cmds:
      - task --list

  reload:
    desc: "Reload a service after binary update (usage: task reload PROC=nats)"
    vars:
      PROC: '{{.PROC | default "nats"}}'
    cmds:
      - task: pc:restart
        vars:
          PROC: '{{.PROC}}'

  bin:versions:
    desc: Show all binary versions (non-failing)
    cmds:
      - for: { var: SUBSYSTEMS_BUILD }
        cmd: 'echo "--- {{.ITEM}} ---"; cat {{.ITEM}}/.bin/.version 2>/dev/null || echo "No version file"'

  manifest:
    desc: Show pinned versions vs installed versions
    cmds:
      - |
        echo "nats          {{.NATS_VERSION | default "v2.10.24"}}"
        echo "liftbridge    {{.LB_VERSION | default "v1.10.0"}}"
        echo "arc           {{.ARC_VERSION | default "main"}}"
        echo "telegraf      {{.TG_VERSION | default "master"}}"
"""

_SOURCE_TASKFILE = """version: '3'

vars:
  @P@_BIN_NAME: @BIN_NAME@
  @P@_UPSTREAM_REPO: @UPSTREAM@
  @P@_VERSION: '{{.@P@_VERSION | default "@DEFAULT@"}}'
  @P@_SRC: '{{.TASKFILE_DIR}}/.src'
  @P@_BIN: '{{.TASKFILE_DIR}}/.bin'
  @P@_BIN_PATH: '{{.@P@_BIN}}/{{.@P@_BIN_NAME}}@EXE_EXT@'
  @P@_DATA: '{{.TASKFILE_DIR}}/.data'
  @P@_RELEASE_URL: '{{.RELEASE_BASE_URL}}/{{.RELEASE_VERSION}}'
@EXTRA_VARS@
env:
  GOWORK: off

tasks:
  # src: tasks
  src:clone:
    desc: Clone the upstream repository at pinned version
    cmds:
      - git clone --branch {{.@P@_VERSION}} --depth 1 {{.@P@_UPSTREAM_REPO}} {{.@P@_SRC}}
    status:
      - test -d {{.@P@_SRC}}

  src:update:
    desc: Fetch and checkout pinned version
    deps: [src:clone]
    dir: '{{.@P@_SRC}}'
    cmds:
@FETCH@
      - git checkout {{.@P@_VERSION}}

  # bin: tasks
  bin:build:
    desc: Build the @BIN_NAME@ binary
    deps: [src:clone]
    dir: '{{.@P@_SRC}}'
    status:
      - test -f {{.@P@_BIN_PATH}}
    cmds:
      - mkdir -p {{.@P@_BIN}}
@BUILD@
      - |
        {
          echo "commit: $(git -C {{.@P@_SRC}} rev-parse --short HEAD 2>/dev/null || echo 'unknown')"
          echo "timestamp: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
          echo "checksum: $(shasum -a 256 {{.@P@_BIN_PATH}} | awk '{print $1}')"
        } > {{.@P@_BIN}}/.version

  bin:download:
    desc: Download pre-built binary from release
    vars:
      GOOS:
        sh: go env GOOS
      GOARCH:
        sh: go env GOARCH
    cmds:
      - mkdir -p {{.@P@_BIN}}
      - curl -sfL {{.@P@_RELEASE_URL}}/{{.@P@_BIN_NAME}}-{{.GOOS}}-{{.GOARCH}}.tar.gz | tar xz -C {{.@P@_BIN}}
      - echo "{{.RELEASE_VERSION}}" > {{.@P@_BIN}}/.version
    status:
      - test -f {{.@P@_BIN_PATH}}

  config:version:
    desc: Output the pinned version (for sync poller)
    cmds:
      - echo "{{.@P@_VERSION}}"
    silent: true

  ensure:
    desc: Ensure binary exists (build from source)
    status:
      - test -f {{.@P@_BIN_PATH}}
    cmds:
      - task: bin:build

  health:
    desc: Check if @BIN_NAME@ is healthy
    cmds:
      - @HEALTH@

  run:
    desc: Run the @BIN_NAME@ binary
@RUN_DIR@    deps: [ensure]
    cmds:
      - mkdir -p {{.@P@_DATA}}
      - '@RUN@'

  # clean: tasks
  clean:
    desc: Clean build artifacts
    cmds:
      - rm -rf {{.@P@_BIN}}
    status:
      - '! test -d {{.@P@_BIN}}'

  clean:src:
    desc: Clean source directory
    cmds:
      - rm -rf {{.@P@_SRC}}
    status:
      - '! test -d {{.@P@_SRC}}'
"""

_GRAFANA_TASKFILE = """version: '3'

vars:
  GF_BIN_NAME: grafana-server
  GF_VERSION: '11.4.0'
  # the real Taskfile downloads GF_DOWNLOAD_URL (a dl.grafana.com tarball); the fixture builds the tag
  GF_UPSTREAM_REPO: @UPSTREAM@
  GF_BIN: '{{.TASKFILE_DIR}}/.bin'
  GF_BIN_PATH: '{{.GF_BIN}}/bin/{{.GF_BIN_NAME}}'
  GF_DATA: '{{.TASKFILE_DIR}}/.data'

tasks:
  # src: tasks
  src:clone:
    desc: Download Grafana release
    cmds:
      - mkdir -p {{.GF_BIN}}/bin
      - |
        tmp=$(mktemp -d)
        git clone -q --branch v{{.GF_VERSION}} --depth 1 {{.GF_UPSTREAM_REPO}} "$tmp/grafana"
        (cd "$tmp/grafana" && go build -o {{.GF_BIN_PATH}} ./pkg/cmd/grafana-server)
        status=$?
        rm -rf "$tmp"
        exit $status
      - echo "{{.GF_VERSION}}" > {{.GF_BIN}}/.version
    status:
      - test -f {{.GF_BIN_PATH}}

  src:update:
    desc: Re-download Grafana (update GF_VERSION var first)
    cmds:
      - rm -rf {{.GF_BIN}}
      - task: src:clone

  # bin: tasks
  bin:build:
    desc: Grafana is pre-built (no-op)
    status:
      - test -f {{.GF_BIN_PATH}}
    cmds:
      - echo "Grafana is pre-built, nothing to compile"

  ensure:
    desc: Ensure binary exists (download if needed)
    status:
      - test -f {{.GF_BIN_PATH}}
    cmds:
      - task: src:clone

  health:
    desc: Check if Grafana is healthy
    cmds:
      - curl -sf http://127.0.0.1:@PORT@/api/health > /dev/null

  run:
    desc: Run Grafana server binary
    dir: '{{.TASKFILE_DIR}}'
    deps: [ensure]
    cmds:
      - mkdir -p {{.GF_DATA}}/plugins
      - '{{.GF_BIN_PATH}} --homepath={{.GF_BIN}} --config={{.TASKFILE_DIR}}/grafana.ini cfg:default.paths.data={{.GF_DATA}}'

  clean:
    desc: Clean build artifacts
    cmds:
      - rm -rf {{.GF_BIN}}
    status:
      - '! test -d {{.GF_BIN}}'
"""

_PC_TASKFILE = """version: '3'

vars:
  PC_BIN_NAME: process-compose
  PC_VERSION: '{{.PC_VERSION | default "v1.85.0"}}'
  PC_BIN: '{{.TASKFILE_DIR}}/.bin'
  PC_BIN_PATH: '{{.PC_BIN}}/{{.PC_BIN_NAME}}'
  _PC_SOCKET_DEFAULT: '{{.TASKFILE_DIR}}/.pc.sock'
  PC_SOCKET: '{{.PC_SOCKET | default ._PC_SOCKET_DEFAULT}}'
  _PC_CONFIG_DEFAULT: '{{.ROOT_DIR}}/process-compose.yaml'
  PC_CONFIG: '{{.PC_CONFIG | default ._PC_CONFIG_DEFAULT}}'
  PC_RESTART_WAIT: '{{.PC_RESTART_WAIT | default "2"}}'

tasks:
  config:version:
    desc: Output pinned version
    cmds:
      - echo "{{.PC_VERSION}}"
    silent: true

  run:fg:
    desc: Run all services in foreground (no TUI)
    dir: '{{.ROOT_DIR}}'
    cmds:
      - '{{.PC_BIN_PATH}} up -U -u {{.PC_SOCKET}} -f {{.PC_CONFIG}} -t=false'

  status:
    desc: Show status of all processes
    cmds:
      - '{{.PC_BIN_PATH}} process list -U -u {{.PC_SOCKET}}'

  # `process restart` started the new process while the old one still held its port, so the
  # owner replaced it by stop, wait, start.
  restart:
    desc: "Restart one process (usage: task pc:restart PROC=nats)"
    vars:
      PROC: '{{.PROC | default "nats"}}'
    cmds:
      - '{{.PC_BIN_PATH}} process stop {{.PROC}} -U -u {{.PC_SOCKET}}'
      - sleep {{.PC_RESTART_WAIT}}
      - '{{.PC_BIN_PATH}} process start {{.PROC}} -U -u {{.PC_SOCKET}}'
"""

_OTHER_TASKFILE = """version: '3'

vars:
  @P@_DIR: '{{.TASKFILE_DIR}}'
  @P@_VERSION: '{{.@P@_VERSION | default "latest"}}'

tasks:
  config:version:
    desc: Output the pinned version
    cmds:
      - echo "{{.@P@_VERSION}}"
    silent: true
"""

_BRANCH_FETCH = "      - git fetch origin {{.@P@_VERSION}}"
_TAG_FETCH = "      - git fetch --tags"


def _fill(template: str, values: Mapping[str, str]) -> str:
    for key, value in values.items():
        template = template.replace(f"@{key}@", value)
    return template


def _source_taskfile(sub: str, url: str, port: int | None) -> str:
    """The Taskfile of a built-from-source subsystem (all but grafana)."""
    prefix, bin_name = SUBSYSTEMS[sub]
    p = "{{." + prefix + "_BIN_PATH}}"
    values = {
        "BIN_NAME": bin_name, "UPSTREAM": url, "EXE_EXT": "", "EXTRA_VARS": "", "RUN_DIR": "",
        "DEFAULT": {"nats": "v2.10.24", "liftbridge": "master", "arc": "main", "telegraf": "master"}[sub],
        "FETCH": _BRANCH_FETCH if sub in ("arc", "telegraf") else _TAG_FETCH,
        "BUILD": f"      - go build -o {p} .",
        "HEALTH": f"curl -sf http://127.0.0.1:{port}{HTTP_SERVICES.get(sub, '/')} > /dev/null",
        "RUN": f"{p} --config {sub}.conf",
    }
    if sub == "nats":
        values["RUN_DIR"] = "    dir: '{{.TASKFILE_DIR}}'\n"
    elif sub == "liftbridge":
        values["EXE_EXT"] = "{{exeExt}}"
        values["EXTRA_VARS"] = ("  LB_CONFIG: '{{.TASKFILE_DIR}}/configs'\n"
                                "  LB_MODE: '{{.LB_MODE | default \"standalone\"}}'\n")
        values["RUN"] = f"{p} --config={{{{.LB_CONFIG}}}}/{{{{.LB_MODE}}}}.yaml --data-dir={{{{.LB_DATA}}}}"
    elif sub == "arc":
        values["RUN_DIR"] = "    dir: '{{.TASKFILE_DIR}}'\n"
        values["BUILD"] = f"      - go build -o {p} ./cmd/arc"
        values["RUN"] = f"{p} --config arc.toml"
    elif sub == "telegraf":
        values["RUN_DIR"] = "    dir: '{{.TASKFILE_DIR}}'\n"
        values["BUILD"] = "      - make build\n      - cp {{.TG_BIN_NAME}} {{.TG_BIN}}/"
        values["HEALTH"] = f'pgrep -f "{p} --config" > /dev/null'
        values["RUN"] = f"{p} --config telegraf.conf"
    return _fill(_fill(_SOURCE_TASKFILE, values), {"P": prefix})


def _root_taskfile() -> str:
    includes = "".join(f"  {name}: ./{name}\n" for name in INCLUDES)
    return _ROOT_TASKFILE.replace("@@INCLUDES@@", includes)


def _process_compose() -> str:
    deps = {"liftbridge": ["nats"], "telegraf": ["arc", "liftbridge"], "grafana": ["arc"]}
    out = ['version: "0.5"', "", "processes:"]
    for name in ("arc", "grafana", "liftbridge", "nats", "telegraf"):
        out += [f"  {name}:", f"    command: task {name}:run", "    working_dir: ."]
        if name in deps:
            out.append("    depends_on:")
            for d in deps[name]:
                out += [f"      {d}:", "        condition: process_healthy"]
        out += ["    availability:", "      restart: on_failure", "      backoff_seconds: 5",
                "    readiness_probe:", "      exec:", f"        command: task {name}:health",
                "      initial_delay_seconds: 1", "      period_seconds: 2", ""]
    return "\n".join(out)


_GITIGNORE = """# Binary (root level only, so cmd/binary/ is not ignored)
/telemetry
*.exe

# Task cache
.task/

# Standard plat-* subsystem directories
**/.src/
**/.bin/
**/.data/

# Environment files with secrets
.env
.env.local

# Project-specific patterns
/.data/
.dist/
.releases/
.test-results/
.pc.sock
"""


def _runtime_configs(ports: Mapping[str, int]) -> dict[str, str]:
    """Runtime config files (read by the running service, never by a build)."""
    return {
        "nats/nats.conf": ("# nats-server runtime configuration\nserver_name: plat-telemetry\n"
                           f"listen: 127.0.0.1:-1\nhttp_port: {ports['nats']}\n"
                           'jetstream {\n  store_dir: ".data/jetstream"\n}\n'),
        "liftbridge/configs/standalone.yaml": ("# liftbridge standalone mode\nhost: 127.0.0.1\n"
                                               f"port: {ports['liftbridge']}\nlogging:\n  level: info\n"
                                               "nats:\n  servers:\n    - nats://127.0.0.1:4222\n"),
        "liftbridge/configs/cluster.yaml": (f"# liftbridge cluster mode\nport: {ports['liftbridge']}\n"
                                            "clustering:\n  min.insync.replicas: 2\n"),
        "arc/arc.toml": f'[server]\nhost = "127.0.0.1"\nport = {ports["arc"]}\n\n[storage]\npath = ".data"\n',
        "telegraf/telegraf.conf": '[agent]\n  interval = "10s"\n\n[[outputs.file]]\n  files = ["stdout"]\n',
        "grafana/grafana.ini": f"[server]\nhttp_addr = 127.0.0.1\nhttp_port = {ports['grafana']}\n",
    }


def _manifest(urls: Mapping[str, str]) -> str:
    return f"""# Subsystem Manifest
# Tracks upstream sources and versions for all subsystems

subsystems:
  nats:
    version: v2.10.24
    upstream: {urls['nats']}
    description: High-performance messaging system

  liftbridge:
    version: v1.10.0
    upstream: {urls['liftbridge']}
    description: Lightweight, fault-tolerant message streams

  arc:
    version: main  # no releases yet
    upstream: {urls['arc']}
    description: Telemetry storage with DuckDB

  telegraf:
    version: master  # Basekick-Labs fork
    upstream: {urls['telegraf']}
    description: Plugin-driven metrics collection agent

  grafana:
    version: "11.4.0"
    upstream: {urls['grafana']}
    description: Observability and visualization platform
"""


# ------------------------------------------------------------------------------------------ upstreams


@dataclass
class Upstream:
    """One served upstream repository: *url* is what the workspace's files name."""

    name: str
    path: Path
    url: str
    repo: GitRepo

    @property
    def branch(self) -> str:
        return self.repo.default_branch

    def commit_of(self, ref: str) -> str:
        """The commit a tag or branch names (annotated tags peeled); KeyError when it does not exist."""
        repo = self.repo.repo
        for full in (f"refs/tags/{ref}", f"refs/heads/{ref}"):
            if full.encode() in repo.refs:
                obj = repo[repo.refs[full.encode()]]
                while isinstance(obj, Tag):  # an annotated tag names a tag object
                    obj = repo[obj.object[1]]
                return obj.id.decode()
        raise KeyError(f"{self.name} has no tag or branch {ref!r}")

    def tags(self) -> list[str]:
        """Every tag name, unsorted."""
        return [r.decode().removeprefix("refs/tags/") for r in self.repo.repo.refs.keys()
                if r.startswith(b"refs/tags/")]


def _go_files(module: str, pkg: str = "") -> dict[str, bytes]:
    main = f"{pkg}/main.go" if pkg else "main.go"
    return {"go.mod": f"module {module}\n\ngo 1.22\n".encode(),
            main: b"package main\n\nfunc main() {}\n",
            "README.md": f"# {module}\n".encode()}


def _release_history(repo: GitRepo, tags: list[str], *, annotate: bool = False,
                     extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """One commit per tag on the default branch (VERSION = the tag), tagged in one packed-refs
    write. With *annotate*, stable releases get annotated tags, pre-releases lightweight ones.
    *extra* adds tags (name -> an earlier tag) on existing release commits. Returns tag -> sha."""
    chain = repo.commit_chain((f"Release {tag}", {"VERSION": f"{tag}\n".encode()}) for tag in tags)
    shas = dict(zip(tags, chain, strict=True))
    stable = [t for t in tags if annotate and "-" not in t and "+" not in t]
    repo.pack_tags({**shas, **{name: shas[of] for name, of in (extra or {}).items()}}, annotated=stable)
    return shas


def _make_upstreams(base: Path) -> dict[str, GitRepo]:
    repos: dict[str, GitRepo] = {}
    for key, (rel, branch) in UPSTREAM_LAYOUT.items():
        if key != "liftbridge-fork":
            repos[key] = GitRepo.create(base / rel, branch=branch)

    nats = repos["nats"]
    nats.commit("Initial commit",
                files={**_go_files("github.com/nats-io/nats-server/v2"), "VERSION": b"main\n"})
    _release_history(nats, nats_tags(), annotate=True, extra={**NATS_EXTRA_TAGS, **NATS_OTHER_TAGS})
    nats.commit("Work after the last release", files={"VERSION": b"main\n"})

    lb = repos["liftbridge"]
    lb.commit("Initial commit",
              files={**_go_files("github.com/liftbridge-io/liftbridge"), "VERSION": b"master\n"})
    _release_history(lb, liftbridge_tags(), annotate=True)
    lb.commit("Work after v1.9.0", files={"VERSION": b"master\n"})
    lb.close()
    fork_path = base / UPSTREAM_LAYOUT["liftbridge-fork"][0]
    shutil.copytree(lb.path, fork_path)  # a fork starts as the original, tags included
    repos["liftbridge"] = GitRepo(path=lb.path, repo=Repo(str(lb.path)), default_branch="master",
                                  _clock=lb._clock)
    fork = GitRepo(path=fork_path, repo=Repo(str(fork_path)), default_branch="master",
                   _clock=lb._clock + 3600)
    fork.commit("Basekick: build with Go 1.22", files={"VERSION": b"master\n", "BASEKICK.md": b"fork\n"})
    fork.commit("Basekick: arc output")
    repos["liftbridge-fork"] = fork

    arc = repos["arc"]
    arc.commit("Initial commit",
               files={**_go_files("github.com/basekick-labs/arc", "cmd/arc"), "VERSION": b"main\n"})
    arc.commit("Add DuckDB storage")
    arc.commit("Add line protocol ingest")

    tg = repos["telegraf"]
    tg.commit("Initial commit", files={**_go_files("github.com/influxdata/telegraf", "cmd/telegraf"),
                                       "VERSION": b"master\n",
                                       "Makefile": b"build:\n\tgo build -o telegraf ./cmd/telegraf\n"})
    tg.commit("Basekick: arc output plugin")

    gf = repos["grafana"]
    gf.commit("Initial commit", files={**_go_files("github.com/grafana/grafana", "pkg/cmd/grafana-server"),
                                       "VERSION": b"main\n"})
    _release_history(gf, grafana_tags(), annotate=True)
    gf.commit("Work after the last release", files={"VERSION": b"main\n"})
    return repos


# ------------------------------------------------------------------------------------------ serving


class CloneableGitHTTPServer(GitHTTPServer):
    """:class:`GitHTTPServer`, which serves clones and fetches too (it once served only ls-remote)."""


# ------------------------------------------------------------------------------------------ workspace


@dataclass
class PlatTelemetry:
    """The workspace (a plat-telemetry checkout), its served upstreams and tools. See the module doc."""

    root: Path
    upstreams: dict[str, Upstream]
    tool_bin: Path
    ports: dict[str, int] = field(default_factory=dict)
    serve: str = "path"
    _servers: list[GitHTTPServer | GitDaemon] = field(default_factory=list, repr=False)

    # -------------------------------------------------------------------- running things

    def env(self, **extra: str) -> dict[str, str]:
        """os.environ with ``tool_bin`` (stand-in go, real task) first on PATH, git isolated from
        this machine's config, plus *extra* (e.g. ``LB_VERSION="v1.9.0"``)."""
        env = {**os.environ, **GIT_IDENTITY, "GIT_CONFIG_NOSYSTEM": "1", "GIT_TERMINAL_PROMPT": "0",
               "GIT_CONFIG_GLOBAL": str(self.tool_bin.parent / "gitconfig")}
        env["PATH"] = os.pathsep.join([str(self.tool_bin), str(VENV_BIN), env.get("PATH", "")])
        for k in ("GOOS", "GOARCH", "FORCE_COLOR", "CLICOLOR_FORCE"):
            env.pop(k, None)
        env["NO_COLOR"] = "1"  # task colours its listings when CI sets FORCE_COLOR; tests read them
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def task(self, *args: str, check: bool = True, timeout: float = 120,
             **env: str) -> subprocess.CompletedProcess[str]:
        """Run the real ``task`` in :attr:`root` with :meth:`env` (*env* added). With *check*, a
        non-zero exit raises AssertionError carrying the output."""
        proc = subprocess.run([str(self.tool_bin / "task"), *args], cwd=self.root, env=self.env(**env),
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"task {' '.join(args)} exited {proc.returncode}\n"
                                 f"--- stdout\n{proc.stdout}--- stderr\n{proc.stderr}")
        return proc

    # -------------------------------------------------------------------- upstream changes

    def tag(self, name: str, version: str) -> str:
        """A new commit on upstream *name*'s default branch with ``VERSION`` = *version*, tagged
        *version* (lightweight). Returns the commit sha."""
        repo = self.upstreams[name].repo
        sha = repo.commit(f"Release {version}", files={"VERSION": f"{version}\n".encode()})
        repo.tag(version, sha)
        return sha

    def advance(self, name: str, branch: str | None = None) -> str:
        """A new commit on *branch* (default: the default branch) of upstream *name*, ``VERSION`` =
        the branch name. Returns its sha."""
        repo = self.upstreams[name].repo
        branch = branch or repo.default_branch
        head = repo.head(branch)
        changes = repo._files(head.encode()).get("CHANGES", b"") if head else b""
        return repo.commit(f"Advance {branch}", branch=branch,
                           files={"VERSION": f"{branch}\n".encode(), "CHANGES": changes + b"change\n"})

    # -------------------------------------------------------------------- binaries

    def binary(self, sub: str) -> Path:
        """Where subsystem *sub*'s binary lives (grafana: ``grafana/.bin/bin/grafana-server``)."""
        return self.root / sub / ".bin" / SUBSYSTEMS[sub][1]

    def version_file(self, sub: str) -> dict[str, str]:
        """``<sub>/.bin/.version`` as {key: value} (a one-line file gives {"version": line})."""
        text = (self.root / sub / ".bin" / ".version").read_text()
        if ":" not in text:
            return {"version": text.strip()}
        return dict(line.split(": ", 1) for line in text.splitlines() if line)

    def run_binary(self, sub: str) -> dict[str, str]:
        """Run *sub*'s binary with ``--version``: {"name", "commit", "version", "platform"}."""
        out = subprocess.run([str(self.binary(sub)), "--version"], capture_output=True, text=True,
                             timeout=30, check=True).stdout
        return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)

    # -------------------------------------------------------------------- lifetime

    def close(self) -> None:
        for server in self._servers:
            server.stop()
        self._servers.clear()
        for up in self.upstreams.values():
            up.repo.close()

    def __enter__(self) -> PlatTelemetry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_tools(tool_bin: Path) -> None:
    tool_bin.mkdir(parents=True, exist_ok=True)
    go = tool_bin / "go"
    go.write_text(_GO_TOOL.replace("@PYTHON@", sys.executable))
    go.chmod(0o755)
    task = VENV_BIN / "task"
    if not task.exists():
        found = shutil.which("task")
        if found is None:
            raise RuntimeError("the plat-telemetry fixture needs go-task (PyPI go-task-bin) installed")
        task = Path(found)
    (tool_bin / "task").symlink_to(task)
    (tool_bin.parent / "gitconfig").write_text(
        "[user]\n\tname = plat-telemetry fixture\n\temail = fixture@localhost\n"
        "[advice]\n\tdetachedHead = false\n[init]\n\tdefaultBranch = main\n")


def _write_workspace(root: Path, urls: Mapping[str, str], ports: Mapping[str, int]) -> None:
    files: dict[str, str] = {
        "Taskfile.yml": _root_taskfile(),
        "manifest.yaml": _manifest(urls),
        "process-compose.yaml": _process_compose(),
        ".gitignore": _GITIGNORE,
        "README.md": "# plat-telemetry (test fixture)\n",
        "grafana/Taskfile.yml": _fill(_GRAFANA_TASKFILE,
                                      {"UPSTREAM": urls["grafana"], "PORT": str(ports["grafana"])}),
        "pc/Taskfile.yml": _PC_TASKFILE,
        **_runtime_configs(ports),
    }
    for sub in ("nats", "liftbridge", "arc", "telegraf"):
        url = urls["liftbridge-fork"] if sub == "liftbridge" else urls[sub]
        files[f"{sub}/Taskfile.yml"] = _source_taskfile(sub, url, ports.get(sub))
    for other, prefix in OTHER_PREFIXES.items():
        if other != "pc":
            files[f"{other}/Taskfile.yml"] = _fill(_OTHER_TASKFILE, {"P": prefix})
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def _git(root: Path, *args: str, env: Mapping[str, str]) -> None:
    subprocess.run(["git", *args], cwd=root, env=dict(env), check=True, capture_output=True, timeout=30)


def make_plat_telemetry(tmp_path: Path, *, serve: str = "path",
                        ports: Mapping[str, int] | None = None) -> PlatTelemetry:
    """Build the fixture under *tmp_path*: ``plat-telemetry/`` (the committed workspace),
    ``upstreams/`` (served as *serve*: path | file | http | daemon) and ``tools/bin``.
    *ports* overrides the services' loopback HTTP ports (default: free ones). Close the result (or
    use it as a context manager) to stop the servers. Raises ValueError for an unknown *serve*."""
    if serve not in SERVE_MODES:
        raise ValueError(f"serve must be one of {', '.join(SERVE_MODES)}, not {serve!r}")
    base = tmp_path / "upstreams"
    repos = _make_upstreams(base)
    pt = PlatTelemetry(root=tmp_path / "plat-telemetry", upstreams={}, tool_bin=tmp_path / "tools" / "bin",
                       serve=serve)
    pt.ports = {sub: free_port() for sub in HTTP_SERVICES} | dict(ports or {})
    try:
        if serve == "http":
            server: GitHTTPServer | GitDaemon = CloneableGitHTTPServer(base).start()
            pt._servers.append(server)
            url_for = server.url_for
        elif serve == "daemon":
            server = GitDaemon(base).start()
            pt._servers.append(server)
            url_for = server.url_for
        elif serve == "file":
            def url_for(p: Path | str) -> str:
                return Path(p).resolve().as_uri()
        else:
            def url_for(p: Path | str) -> str:
                return str(Path(p).resolve())
        pt.upstreams = {key: Upstream(name=key, path=r.path, url=url_for(r.path), repo=r)
                        for key, r in repos.items()}
        _write_tools(pt.tool_bin)
        _write_workspace(pt.root, {k: u.url for k, u in pt.upstreams.items()}, pt.ports)
        env = pt.env()
        _git(pt.root, "init", "-q", "-b", "main", env=env)
        _git(pt.root, "add", "-A", env=env)
        _git(pt.root, "commit", "-q", "-m", "plat-telemetry as it stands", env=env)
    except BaseException:
        pt.close()
        raise
    return pt


@pytest.fixture(name="plat_telemetry")
def plat_telemetry_fixture(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[PlatTelemetry]:
    """A :class:`PlatTelemetry` under ``tmp_path``, upstreams as plain paths; parametrize indirectly
    with a serve mode (``@pytest.mark.parametrize("plat_telemetry", ["http"], indirect=True)``)."""
    pt = make_plat_telemetry(tmp_path, serve=getattr(request, "param", "path"))
    try:
        yield pt
    finally:
        pt.close()


plat_telemetry = plat_telemetry_fixture  # importable under the fixture's own name too

__all__ = ["PlatTelemetry", "Upstream", "CloneableGitHTTPServer", "make_plat_telemetry", "plat_telemetry",
           "plat_telemetry_fixture", "nats_tags", "liftbridge_tags", "grafana_tags", "SUBSYSTEMS",
           "MANIFEST_VERSIONS", "INCLUDES"]
