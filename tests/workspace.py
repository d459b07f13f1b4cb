"""A small, real sync-tools workspace for tests and the demo.

``make_workspace(tmp_path)`` writes, under *root*:

- ``upstreams/<name>/``: a real git repository per subsystem (made with dulwich), holding ``app.sh``,
  a tiny shell program, tagged ``v1.0.0``. :meth:`Workspace.release_upstream` commits and tags a new
  version there (what "nats-io releases" looks like in a test).
- ``sync-tools.yaml``: the local release store ``.releases`` (tag ``latest``), the public key
  ``keys/release.pub``, and each subsystem with ``upstream`` (the repo path), ``current`` (its pin),
  ``binary``, ``paths`` and ``depends_on``. ``build`` is left out, so the default applies:
  ``task <name>:src:update`` then ``task <name>:bin:build``.
- ``Taskfile.yml`` including ``<name>/Taskfile.yml`` per subsystem. Each subsystem Taskfile pins its
  version the plat-telemetry way, ``<NAME>_VERSION: '{{.<NAME>_VERSION | default "v1.0.0"}}'`` (the
  environment variable, which ``sync-tools build`` sets, wins). ``src:update`` clones the upstream into
  ``<name>/.src`` at that tag; ``bin:build`` turns ``.src/app.sh`` into ``<name>/.bin/<binary>`` (mode
  0755), stamping ``$GOOS/$GOARCH`` into it, so different platforms give different bytes.
- ``tools/ws.py``: the helper those two tasks run (with this interpreter, which has dulwich).
- ``keys/release.key`` + ``keys/release.pub``: a fresh ed25519 release key pair.
- a git repository of the workspace itself (``git=True``), for ``plan --base``.

The built program prints ``<name> <version> <os>/<arch>`` for ``--version`` and otherwise sleeps
(``exec sleep``), so it can run as a supervised service. Pass ``program=`` to build something else.

Commands need ``task`` and ``sync-tools`` on PATH: use :meth:`Workspace.env` (it prepends this
interpreter's bin directory, which in the project's venv holds both, and sets
``SYNC_TOOLS_SIGNING_KEY``).

Example::

    ws = make_workspace(tmp_path)                      # nats (nats-server) and arc (depends on nats)
    cfg = ws.config()
    ws.release_upstream("nats", "v1.1.0")             # new upstream tag
    subprocess.run(["sync-tools", "build", "--only", "nats"], cwd=ws.root, env=ws.env(), check=True)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dulwich import porcelain
from dulwich.repo import Repo

from sync_tools.build import env_prefix
from sync_tools.config import Config, load_config
from sync_tools.signing import write_keypair

PYTHON = sys.executable
BIN_DIR = str(Path(sys.executable).parent)  # the venv's bin: python, task, sync-tools
IDENTITY = b"sync-tools tests <tests@localhost>"
DEFAULT_VERSION = "v1.0.0"

#: The default subsystems: name -> settings (binary, depends_on; anything else goes to sync-tools.yaml).
DEFAULT_SUBSYSTEMS: dict[str, dict[str, Any]] = {
    "nats": {"binary": "nats-server"},
    "arc": {"binary": "arc", "depends_on": ["nats"]},
}


def default_program(name: str, version: str) -> str:
    """The upstream ``app.sh`` for *name* at *version*. ``@PLATFORM@`` is replaced at build time."""
    return (
        "#!/bin/sh\n"
        f"# {name} {version}, a tiny service built by the sync-tools test workspace\n"
        'if [ "$1" = "--version" ]; then\n'
        f'  echo "{name} {version} @PLATFORM@"\n'
        "  exit 0\n"
        "fi\n"
        "exec sleep 2147483\n"
    )


_WS_TOOL = '''"""Build steps of the sync-tools test workspace (see tests/workspace.py)."""
import os, shutil, sys, tempfile
from pathlib import Path

from dulwich import porcelain


def src_update(upstream, dest, version):
    """Clone *upstream* fresh into *dest* at tag/commit *version* (old checkout replaced atomically)."""
    dest = Path(dest)
    tmp = Path(tempfile.mkdtemp(prefix=".src-", dir=dest.parent))
    try:
        with open(os.devnull, "wb") as quiet:
            repo = porcelain.clone(upstream, str(tmp / "src"), errstream=quiet)
        porcelain.reset(repo, "hard", version)
        repo.close()
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp / "src", dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"src:update {dest} at {version}")


def bin_build(src, out):
    """Stamp $GOOS/$GOARCH into the program and install it at *out*, mode 0755, atomically."""
    platform = f"{os.environ.get('GOOS', 'unknown')}/{os.environ.get('GOARCH', 'unknown')}"
    text = Path(src).read_text().replace("@PLATFORM@", platform)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, out)
    print(f"bin:build {out} for {platform}")


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    {"src-update": src_update, "bin-build": bin_build}[cmd](*args)
'''


def make_upstream(path: Path, name: str, version: str = DEFAULT_VERSION,
                  program: Callable[[str, str], str] = default_program) -> str:
    """A git repository at *path* with ``app.sh`` for *version*, tagged *version*. Returns the commit."""
    path.mkdir(parents=True, exist_ok=True)
    porcelain.init(str(path))
    return commit_and_tag(path, name, version, program)


def commit_and_tag(path: Path, name: str, version: str,
                   program: Callable[[str, str], str] = default_program) -> str:
    """Write ``app.sh`` for *version* into the upstream at *path*, commit it, tag it. Returns the commit."""
    (path / "app.sh").write_text(program(name, version))
    with Repo(str(path)) as repo:
        porcelain.add(repo, [str(path / "app.sh")])
        sha = porcelain.commit(repo, f"{name} {version}".encode(), author=IDENTITY, committer=IDENTITY)
        porcelain.tag_create(repo, version.encode(), author=IDENTITY, message=version.encode(), annotated=True)
    return sha.decode()


@dataclass(frozen=True)
class Workspace:
    """A workspace written by :func:`make_workspace`. Paths are absolute."""

    root: Path
    config_path: Path
    store: Path  # the local release store directory (<root>/.releases)
    tag: str
    upstreams: Mapping[str, Path]
    binaries: Mapping[str, str]
    private_key: Path
    public_key: Path
    program: Callable[[str, str], str] = field(default=default_program, repr=False)

    def config(self) -> Config:
        return load_config(self.config_path)

    @property
    def release_dir(self) -> Path:
        """``<store>/<tag>/``: where the local store keeps assets and manifest.json."""
        return self.store / self.tag

    @property
    def dist(self) -> Path:
        return self.root / ".dist"

    def binary_path(self, name: str) -> Path:
        return self.root / name / ".bin" / self.binaries[name]

    def env(self, **extra: str) -> dict[str, str]:
        """os.environ plus the venv bin on PATH and the release signing key, plus *extra*."""
        env = dict(os.environ)
        env["PATH"] = BIN_DIR + os.pathsep + env.get("PATH", "")
        env["SYNC_TOOLS_SIGNING_KEY"] = str(self.private_key)
        env["SYNC_TOOLS_CONFIG"] = str(self.config_path)
        env.update(extra)
        return env

    def release_upstream(self, name: str, version: str) -> str:
        """Commit and tag *version* in *name*'s upstream repository. Returns the new commit."""
        return commit_and_tag(self.upstreams[name], name, version, self.program)

    def git_commit(self, message: str = "change") -> str:
        """Commit every file of the workspace (respecting .gitignore). Returns the commit."""
        with Repo(str(self.root)) as repo:
            porcelain.add(repo, [str(p) for p in _tracked_candidates(self.root)])
            return porcelain.commit(repo, message.encode(), author=IDENTITY, committer=IDENTITY).decode()


def _tracked_candidates(root: Path) -> Iterable[Path]:
    skip = {".git", ".releases", ".dist", ".src", ".bin", "upstreams", "__pycache__"}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        for f in filenames:
            if not f.endswith(".key"):
                yield Path(dirpath) / f


def make_workspace(
    root: Path,
    subsystems: Mapping[str, Mapping[str, Any]] | Iterable[str] | None = None,
    *,
    version: str = DEFAULT_VERSION,
    platforms: Iterable[str] = ("linux/amd64", "linux/arm64", "darwin/amd64", "darwin/arm64"),
    program: Callable[[str, str], str] = default_program,
    git: bool = True,
    extra_config: str = "",
    repo: str | None = None,
) -> Workspace:
    """Write a workspace under *root* (created if missing) and return it.

    *subsystems* maps name -> settings: ``binary`` (default: the name; ``nats-server`` for nats),
    ``depends_on``, ``version``
    (its pin, default *version*) and any other ``sync-tools.yaml`` subsystem key as a YAML-ready value;
    a plain list of names takes the defaults. By default: ``nats`` (binary ``nats-server``) and ``arc``
    (depends on nats). *extra_config* is appended to sync-tools.yaml verbatim (e.g. an ``agent:``
    section). *repo* ("owner/name") releases to that GitHub repository instead of the local store
    (point ``GITHUB_API_URL`` at the GitHub API test server).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    if subsystems is None:
        subsystems = DEFAULT_SUBSYSTEMS
    if not isinstance(subsystems, Mapping):
        subsystems = {n: DEFAULT_SUBSYSTEMS.get(n, {}) for n in subsystems}

    tools = root / "tools"
    tools.mkdir(exist_ok=True)
    (tools / "ws.py").write_text(_WS_TOOL)

    upstreams: dict[str, Path] = {}
    binaries: dict[str, str] = {}
    sub_yaml: list[str] = []
    includes: list[str] = []
    for name, settings in subsystems.items():
        settings = dict(settings)
        binary = str(settings.pop("binary", DEFAULT_SUBSYSTEMS.get(name, {}).get("binary", name)))
        pin = str(settings.pop("version", version))
        binaries[name] = binary
        upstream = root / "upstreams" / name
        make_upstream(upstream, name, pin, program)
        upstreams[name] = upstream
        prefix = env_prefix(name)
        sub_dir = root / name
        sub_dir.mkdir(exist_ok=True)
        (sub_dir / "Taskfile.yml").write_text(
            "version: '3'\n"
            "\n"
            "vars:\n"
            f"  {prefix}_VERSION: '{{{{.{prefix}_VERSION | default \"{pin}\"}}}}'\n"
            f"  {prefix}_BIN_NAME: {binary}\n"
            "\n"
            "tasks:\n"
            "  src:update:\n"
            f"    desc: Fetch {name}'s upstream source at the pinned version\n"
            "    cmds:\n"
            f"      - '\"{PYTHON}\" ../tools/ws.py src-update \"{upstream}\" .src \"{{{{.{prefix}_VERSION}}}}\"'\n"
            "  bin:build:\n"
            f"    desc: Build .bin/{binary}\n"
            "    cmds:\n"
            f"      - '\"{PYTHON}\" ../tools/ws.py bin-build .src/app.sh .bin/{binary}'\n"
        )
        includes.append(f"  {name}:\n    taskfile: ./{name}/Taskfile.yml\n    dir: ./{name}\n")
        lines = [f"  {name}:", f"    upstream: {upstream}", "    strategy: tags", f"    current: {pin}",
                 f"    binary: {binary}", f"    paths: [\"{name}/**\"]"]
        deps = settings.pop("depends_on", [])
        lines.append(f"    depends_on: [{', '.join(deps)}]")
        for key, value in settings.items():
            lines.append(f"    {key}: {value}")
        sub_yaml.append("\n".join(lines) + "\n")

    (root / "Taskfile.yml").write_text("version: '3'\n\nincludes:\n" + "".join(includes))
    private_key, public_key = write_keypair(root / "keys")
    config_path = root / "sync-tools.yaml"
    config_path.write_text(
        "release:\n"
        + (f"  repo: {repo}\n" if repo else "  store: .releases\n") +
        "  tag: latest\n"
        "  public_key: keys/release.pub\n"
        f"platforms: [{', '.join(platforms)}]\n"
        "subsystems:\n" + "".join(sub_yaml) + extra_config
    )
    (root / ".gitignore").write_text(".bin/\n.src/\n.dist/\n.releases/\nupstreams/\n*.key\n")
    ws = Workspace(root=root, config_path=config_path, store=root / ".releases", tag="latest",
                   upstreams=upstreams, binaries=binaries, private_key=private_key, public_key=public_key,
                   program=program)
    if git:
        porcelain.init(str(root))
        ws.git_commit("workspace")
    return ws
