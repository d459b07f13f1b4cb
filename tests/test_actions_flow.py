"""upstream.yml, run locally job by job: plan -> build (each matrix leg) -> release -> notify.

The jobs and steps are read from the workflow itself and executed the way a runner would: `run:` steps in
bash with their `env:` evaluated, `uses: ./` through the composite action's own scripts (tests/test_action),
each job in a fresh checkout (a copy of the workspace without build output or private keys), artifacts
handed from build legs to the release job through a directory. The third-party actions are stood in for by
what they do here: checkout copies, setup-go/setup-task are no-ops (the subsystems build with `task`, which
is on PATH), upload/download-artifact copy files. The release store is the GitHub API test server on
loopback (`GITHUB_API_URL`), and the event is the vendored repository_dispatch example with the relay's
client_payload.

What it proves: a dispatch for nats changes only nats' assets and manifest entry; the manifest is written
once per run (serial + 1) and verifies with the pinned key; the rolling release is created before any
upload; the notify job's signature passes the relay's own verifier.
"""

from __future__ import annotations

import fnmatch
import http.server
import json
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from sync_tools import patches
from sync_tools.manifest import parse_manifest, verify_manifest
from sync_tools.relay.webhook import verify_signature
from sync_tools.signing import load_public_key
from tests.servers.github_api import github_api_fixture  # noqa: F401 -- fixture `github_api`
from tests.test_action import BIN, FIXTURES, parse_github_output, run_action
from tests.workspace import Workspace, make_workspace

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = yaml.safe_load((ROOT / ".github/workflows/upstream.yml").read_text())
CI = yaml.safe_load((ROOT / ".github/workflows/ci.yml").read_text())
REPO = "octo-org/octo-repo"  # the repository of the vendored dispatch example: the release holder
PLATFORMS = ("linux/amd64", "darwin/arm64")
NOT_CHECKED_OUT = {".git", ".dist", ".bin", ".src", ".releases", "upstreams", "__pycache__"}

_EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")
_CMP = re.compile(r"^([\w.-]+)\s*(==|!=)\s*'([^']*)'$")


# ------------------------------------------------------------------------------ a tiny local runner


@dataclass
class Run:
    """One workflow run: its event, secrets, variables, job results and artifacts."""

    ws: Workspace
    event: Path
    tmp: Path
    env: dict[str, str]
    secrets: dict[str, str]
    vars: dict[str, str] = field(default_factory=dict)
    needs: dict[str, dict[str, Any]] = field(default_factory=dict)
    artifacts: Path = field(init=False)
    summaries: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.artifacts = self.tmp / "artifacts"
        self.artifacts.mkdir()


def _lookup(ref: str, ctx: dict[str, Any]) -> Any:
    value: Any = ctx
    for part in ref.split("."):
        if value is None:  # a skipped step or job, a missing key: '' in GitHub's expressions
            return None
        if not isinstance(value, dict):
            raise AssertionError(f"expression the local runner does not know: {ref}")
        value = value.get(part)
    return value


def _condition(expr: str, ctx: dict[str, Any]) -> bool:
    """`a == 'x'`, `a != 'x'`, joined by &&: all upstream.yml's conditions use. Like GitHub, a missing
    value equals ''."""
    ok = True
    for part in expr.split("&&"):
        m = _CMP.match(part.strip())
        assert m, f"condition the local runner does not know: {expr}"
        value = _lookup(m.group(1), ctx)
        value = "" if value is None else str(value)
        ok &= (value == m.group(3)) if m.group(2) == "==" else (value != m.group(3))
    return ok


def _interpolate(text: str, ctx: dict[str, Any]) -> str:
    def one(m: re.Match) -> str:
        expr = m.group(1)
        if expr.startswith("fromJSON("):
            raise AssertionError("fromJSON is only expected in strategy.matrix")
        value = _lookup(expr, ctx)
        return "" if value is None else str(value)

    return _EXPR.sub(one, str(text))


def _checkout(ws: Workspace, dest: Path, history: bool = False) -> Path:
    """What actions/checkout gives a job: the committed files, no build output, no private key; the
    git history too with `fetch-depth: 0`."""
    skip = NOT_CHECKED_OUT - ({".git"} if history else set())
    shutil.copytree(ws.root, dest, ignore=lambda d, names: [n for n in names if n in skip or n.endswith(".key")])
    return dest


def run_job(run: Run, job_id: str, matrix: dict[str, str] | None = None, workflow: dict = WORKFLOW
            ) -> dict[str, str]:
    """Run one job (one matrix leg); returns its outputs. Fails the test when a step fails."""
    job = workflow["jobs"][job_id]
    leg = "-".join([job_id, *(matrix or {}).values()]).replace("/", "_")
    work = run.tmp / "jobs" / leg
    workspace: Path | None = None
    steps: dict[str, dict[str, str]] = {}
    summary = run.tmp / f"summary-{leg}.md"
    summary.write_text("")
    for n, step in enumerate(job["steps"]):
        ctx = {"matrix": matrix or {}, "needs": run.needs, "secrets": run.secrets, "vars": run.vars,
               "steps": {k: {"outputs": v} for k, v in steps.items()},
               "github": {"token": "ghs_test-token", "repository": REPO,
                          "ref": json.loads(run.event.read_text()).get("ref", ""),
                          "event": json.loads(run.event.read_text())}}
        if "if" in step and not _condition(step["if"], ctx):
            continue
        env = {k: _interpolate(v, ctx) for k, v in step.get("env", {}).items()}
        with_ = {k: _interpolate(v, ctx) for k, v in step.get("with", {}).items()}
        uses = step.get("uses", "")
        base_env = {**run.env, "GITHUB_STEP_SUMMARY": str(summary), "GITHUB_REPOSITORY": REPO,
                    "GITHUB_RUN_ID": "4242", "GITHUB_RUN_ATTEMPT": "1"}
        if uses.startswith("actions/checkout@"):
            assert with_.get("persist-credentials") == "False"
            workspace = _checkout(run.ws, work, history=str(with_.get("fetch-depth")) == "0")
        elif uses.startswith(("actions/setup-go@", "arduino/setup-task@")):
            pass  # the test subsystems build with `task` (on PATH) and shell; no Go needed
        elif uses.startswith("actions/upload-artifact@"):
            assert workspace is not None
            files = sorted((workspace / with_["path"]).iterdir())
            assert files or with_.get("if-no-files-found") != "error", f"{leg}: nothing to upload"
            dest = run.artifacts / with_["name"]
            assert not dest.exists(), f"artifact {with_['name']} uploaded twice"
            shutil.copytree(workspace / with_["path"], dest)
        elif uses.startswith("actions/download-artifact@"):
            # as download-artifact v4 lays them out: one folder per artifact, or (merge-multiple) every
            # artifact's files in one folder, a later file replacing one of the same name
            assert workspace is not None
            merge = with_.get("merge-multiple") == "True"
            dest = workspace / with_["path"]
            dest.mkdir(parents=True, exist_ok=True)
            for art in sorted(run.artifacts.iterdir()):
                if fnmatch.fnmatch(art.name, with_["pattern"]):
                    into = dest if merge else dest / art.name
                    into.mkdir(exist_ok=True)
                    for f in art.iterdir():
                        shutil.copy2(f, into / f.name)
        elif uses == "./":
            assert workspace is not None
            result = run_action(with_, workspace=workspace, event=run.event, env={**base_env, **env},
                                tmp=run.tmp / f"action-{leg}-{n}")
            assert result.returncode == 0, f"{leg} step {n} ({step.get('name')}):\n{result.stderr}"
            if "id" in step:
                steps[step["id"]] = result.outputs
        elif "run" in step:
            cwd = workspace or run.tmp
            out = run.tmp / f"out-{leg}-{n}"
            out.write_text("")
            proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
                                  cwd=cwd, env={**base_env, **env, "GITHUB_OUTPUT": str(out)},
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, f"{leg} step {n} ({step.get('name')}):\n{proc.stderr}"
            if "id" in step:
                steps[step["id"]] = parse_github_output(out.read_text())
        else:
            raise AssertionError(f"{leg}: a step the local runner cannot stand in for: {step}")
    run.summaries.append(summary.read_text())
    ctx = {"steps": {k: {"outputs": v} for k, v in steps.items()}}
    return {k: _interpolate(v, ctx) for k, v in job.get("outputs", {}).items()}


def run_workflow(run: Run) -> None:
    """plan, then every build leg of its matrix, then release, then notify, honouring each job's `if`."""
    run.needs["plan"] = {"outputs": run_job(run, "plan"), "result": "success"}
    for job_id in ("build", "release", "notify"):
        job = WORKFLOW["jobs"][job_id]
        if not _condition(job["if"], {"needs": run.needs, "vars": run.vars}):
            run.needs[job_id] = {"outputs": {}, "result": "skipped"}
            continue
        if job_id == "build":
            assert job["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.matrix) }}"
            for entry in json.loads(run.needs["plan"]["outputs"]["matrix"])["include"]:
                assert entry["runner"], entry
                run_job(run, job_id, entry)
            run.needs[job_id] = {"outputs": {}, "result": "success"}
        else:
            run.needs[job_id] = {"outputs": run_job(run, job_id), "result": "success"}


# ------------------------------------------------------------------------------------------ fixtures


class _Relay(http.server.BaseHTTPRequestHandler):
    """Stands in for the relay's POST /notify: checks the signature with the relay's own verifier."""

    secret = b""
    received: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        try:
            verify_signature(self.secret, body, self.headers.get("X-Hub-Signature-256"))
        except Exception:  # noqa: BLE001 - any refusal is a 401, like the relay
            self.send_response(401)
            self.end_headers()
            return
        self.received.append({"path": self.path, "body": json.loads(body),
                              "delivery": self.headers.get("X-Sync-Tools-Delivery")})
        self.send_response(202)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def relay() -> Iterator[tuple[str, type[_Relay]]]:
    handler = type("Relay", (_Relay,), {"secret": b"notify-secret", "received": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _dispatch_event(tmp: Path, **client_payload: str) -> Path:
    payload = json.loads((FIXTURES / "repository_dispatch.json").read_text())
    payload["action"] = "upstream-release"
    payload["client_payload"] = client_payload
    path = tmp / "event.json"
    path.write_text(json.dumps(payload))
    return path


def _by_hand_event(tmp: Path, subsystems: str) -> Path:
    payload = json.loads((FIXTURES / "workflow_dispatch.json").read_text())
    payload["inputs"] = {"subsystems": subsystems}
    path = tmp / "event.json"
    path.write_text(json.dumps(payload))
    return path


def _manifest(github_api: Any) -> tuple[dict[str, Any], Any]:
    assets = github_api.state.assets(REPO, "latest")
    data, sig = assets["manifest.json"], assets["manifest.json.sig"]
    return json.loads(data), (data, sig)


# --------------------------------------------------------------------------------------------- test


def test_dispatch_changes_only_the_dispatched_subsystem(tmp_path: Path, github_api: Any, relay: Any):
    ws = make_workspace(tmp_path / "repo", platforms=PLATFORMS)
    text = ws.config_path.read_text()
    ws.config_path.write_text(text.replace("  store: .releases\n", f"  repo: {REPO}\n"))
    ws.git_commit("release to GitHub")
    github_api.state.add_repo(REPO)
    relay_url, relay_handler = relay
    env = {"PATH": BIN + ":/usr/bin:/bin", "GITHUB_API_URL": github_api.url}
    secrets = {"SYNC_TOOLS_SIGNING_KEY": ws.private_key.read_text(), "SYNC_TOOLS_NOTIFY_SECRET": "notify-secret"}
    public = load_public_key(ws.public_key.read_bytes())

    # 1. By hand, everything (workflow_dispatch with empty inputs.subsystems): the first release.
    first = tmp_path / "run1"
    first.mkdir()
    run_workflow(Run(ws, _by_hand_event(first, ""), first, env, secrets))
    releases = github_api.state.releases(REPO)
    assert [r["tag_name"] for r in releases] == ["latest"]
    created = github_api.requests_to("POST", rf"^/repos/{REPO}/releases$")
    uploads = [r for r in github_api.requests if r["method"] == "POST" and "/assets" in r["path"]]
    assert len(created) == 1 and uploads
    assert github_api.requests.index(created[0]) < github_api.requests.index(uploads[0]), \
        "the rolling release must exist before anything uploads to it"
    before_assets = github_api.state.assets(REPO, "latest")
    arc_ids = {a["name"]: a["id"] for a in github_api.state.asset_records(REPO, "latest") if a["name"].startswith("arc-")}
    before, (data, sig) = _manifest(github_api)
    verify_manifest(data, sig, public)
    assert set(before["subsystems"]) == {"nats", "arc"}
    names = {f"nats-server-{p.replace('/', '-')}.tar.gz" for p in PLATFORMS}
    arc_names = {f"arc-{p.replace('/', '-')}.tar.gz" for p in PLATFORMS}
    assert names | arc_names | {"manifest.json", "manifest.json.sig"} == set(before_assets)

    # 2. nats-io releases v1.1.0; the relay dispatches it.
    commit = ws.release_upstream("nats", "v1.1.0")
    second = tmp_path / "run2"
    second.mkdir()
    requests_before = len(github_api.requests)
    run = Run(ws, _dispatch_event(second, subsystem="nats", version="v1.1.0", commit=commit,
                                  upstream="https://github.com/nats-io/nats-server", delivery="d-1"),
              second, env, secrets, vars={"SYNC_TOOLS_RELAY_URL": relay_url})
    run_workflow(run)

    assert run.needs["plan"]["outputs"]["changed"] == "nats"
    matrix = json.loads(run.needs["plan"]["outputs"]["matrix"])["include"]
    assert sorted(e["platform"] for e in matrix) == sorted(PLATFORMS)
    assert {e["subsystem"] for e in matrix} == {"nats"}

    after_assets = github_api.state.assets(REPO, "latest")
    # issue #17: nats' replaced assets got a patch each from the previous build, and a base copy of it
    extra = set(after_assets) - set(before_assets)
    assert set(before_assets) <= set(after_assets) and len(extra) == 2 * len(names)
    assert all(any(patches.is_patch_of(x, n) or patches.is_base_of(x, n) for n in names) for x in extra), extra
    for name in arc_names:
        assert after_assets[name] == before_assets[name], f"{name} changed"
    for name in names:
        assert after_assets[name] != before_assets[name], f"{name} not replaced"
    # Not even re-uploaded: arc's assets are the very same asset records (same ids), and no upload in
    # this run carried an arc name (temporary names included).
    assert {a["name"]: a["id"] for a in github_api.state.asset_records(REPO, "latest") if a["name"] in arc_names} \
        == arc_ids
    uploaded = [r["query"].get("name", "") for r in github_api.requests[requests_before:]
                if r["method"] == "POST" and "/assets" in r["path"]]
    assert uploaded and not any("arc-" in n for n in uploaded), uploaded

    after, (data, sig) = _manifest(github_api)
    verify_manifest(data, sig, public)
    assert after["subsystems"]["arc"] == before["subsystems"]["arc"]
    nats = after["subsystems"]["nats"]
    assert nats["version"] == "v1.1.0" and nats["commit"] == commit
    assert after["serial"] == before["serial"] + 1, "the manifest is written once per run"
    assert parse_manifest(data).subsystems["nats"].version == "v1.1.0"
    for platform in PLATFORMS:
        asset = nats["assets"][platform]
        assert len(after_assets[asset["name"]]) == asset["size"]
        [patch] = asset["patches"]
        assert len(after_assets[patch["name"]]) == patch["size"] < asset["size"] / 2

    summaries = "\n".join(run.summaries)
    assert "| nats | linux/amd64 | v1.1.0 | ubuntu-latest |" in summaries and "nats-server-linux-amd64.tar.gz" in summaries
    assert "arc" not in summaries.split("### Released")[1].split("Subsystems:")[1].splitlines()[0]

    # The notify job ran (the variable is set) and the relay's verifier accepted its signature.
    assert run.needs["notify"]["result"] == "success"
    assert [r["body"]["subsystems"] for r in relay_handler.received] == [["nats"]]
    assert relay_handler.received[0]["path"] == "/notify"
    assert relay_handler.received[0]["delivery"] == "run-4242-1"
    # The relay announces its configured tag; a notify naming another release would be refused.
    assert "release" not in relay_handler.received[0]["body"]


# ------------------------------------------------------------------- ci.yml: plan from a push's range


def _push_event(tmp: Path, before: str, default_branch: str = "master", ref: str = "refs/heads/topic") -> Path:
    payload = json.loads((ROOT / "tests/fixtures/webhooks/push.0.json").read_text())
    payload["before"] = before
    payload["ref"] = ref
    payload["repository"]["default_branch"] = default_branch
    path = tmp / "push.json"
    path.write_text(json.dumps(payload))
    return path


def _ci_plan(ws: Workspace, tmp: Path, event: Path) -> dict[str, str]:
    tmp.mkdir()
    run = Run(ws, event, tmp, {"PATH": BIN + ":/usr/bin:/bin"}, {})
    return run_job(run, "plan", workflow=CI)


def test_ci_push_plans_only_changed_paths_and_falls_back_safely(tmp_path: Path):
    ws = make_workspace(tmp_path / "repo", platforms=("linux/amd64",))
    first = ws.git_commit("base")
    (ws.root / "arc" / "notes.txt").write_text("arc changed\n")
    ws.git_commit("change arc only")

    # An ordinary push: only the subsystem whose paths changed.
    out = _ci_plan(ws, tmp_path / "a", _push_event(tmp_path, first))
    assert out["has_work"] == "true"
    assert [e["subsystem"] for e in json.loads(out["matrix"])["include"]] == ["arc"]

    # A new branch (before all zeros): diffed against its merge base with the default branch.
    subprocess.run(["git", "update-ref", "refs/remotes/origin/master", first], cwd=ws.root, check=True,
                   timeout=30)
    out = _ci_plan(ws, tmp_path / "b", _push_event(tmp_path, "0" * 40))
    assert [e["subsystem"] for e in json.loads(out["matrix"])["include"]] == ["arc"]

    # A new branch, or a tag, that adds no commits: its merge base is HEAD, so nothing to build.
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ws.root, capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()
    subprocess.run(["git", "update-ref", "refs/remotes/origin/master", head], cwd=ws.root, check=True, timeout=30)
    for n, ref in enumerate(("refs/heads/topic", "refs/tags/v1")):
        out = _ci_plan(ws, tmp_path / f"b{n}", _push_event(tmp_path, "0" * 40, ref=ref))
        assert out["has_work"] == "false" and json.loads(out["matrix"]) == {"include": []}
    # The default branch's own first push: every subsystem.
    out = _ci_plan(ws, tmp_path / "b2", _push_event(tmp_path, "0" * 40, ref="refs/heads/master"))
    assert sorted(e["subsystem"] for e in json.loads(out["matrix"])["include"]) == ["arc", "nats"]
    subprocess.run(["git", "update-ref", "refs/remotes/origin/master", first], cwd=ws.root, check=True,
                   timeout=30)

    # A force push whose `before` this clone never saw: every subsystem.
    out = _ci_plan(ws, tmp_path / "c", _push_event(tmp_path, "f" * 40))
    assert sorted(e["subsystem"] for e in json.loads(out["matrix"])["include"]) == ["arc", "nats"]

    # A new branch and no default branch to compare with: every subsystem.
    out = _ci_plan(ws, tmp_path / "d", _push_event(tmp_path, "0" * 40, default_branch=""))
    assert sorted(e["subsystem"] for e in json.loads(out["matrix"])["include"]) == ["arc", "nats"]

    # A repository without sync-tools.yaml (sync-tools itself): nothing planned, no failure.
    ws.config_path.unlink()
    out = _ci_plan(ws, tmp_path / "e", _push_event(tmp_path, first))
    assert out["has_work"] == "" and out["matrix"] == ""
