"""The composite action's `run:` steps, run for real on this machine the way the runner runs them.

Each step's script goes to `bash --noprofile --norc -eo pipefail` (GitHub's `shell: bash`), with the step's
`env:` evaluated from the action inputs, `GITHUB_ACTION_PATH` at the repository root, a temporary
`GITHUB_OUTPUT`, and a real repository_dispatch payload (npm `@octokit/webhooks-examples`, see
tests/fixtures/actions/SOURCE.md) as `GITHUB_EVENT_PATH`. The action's outputs are then read back through
its `outputs:` expressions. Skipped: `uses:` steps (setup-python: this venv's Python is on PATH) and the
`pip install` step (sync-tools is installed editable in this venv; installing needs the network).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.workspace import make_workspace

ROOT = Path(__file__).resolve().parent.parent
ACTION = yaml.safe_load((ROOT / "action.yml").read_text())
UPSTREAM = yaml.safe_load((ROOT / ".github/workflows/upstream.yml").read_text())
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "actions"
BIN = str(Path(sys.executable).parent)
PLATFORMS = ["linux/amd64", "linux/arm64", "darwin/amd64", "darwin/arm64"]

_EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


def parse_github_output(text: str) -> dict[str, str]:
    """Parse a $GITHUB_OUTPUT file the way the runner does: `name=value` lines and `name<<DELIM` blocks."""
    out: dict[str, str] = {}
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not line:
            continue
        if "<<" in line and ("=" not in line or line.index("<<") < line.index("=")):
            name, delim = line.split("<<", 1)
            value: list[str] = []
            while lines[i] != delim:  # IndexError: an unterminated block, which the runner rejects too
                value.append(lines[i])
                i += 1
            i += 1
            out[name] = "\n".join(value)
        else:
            name, value_ = line.split("=", 1)
            out[name] = value_
    return out


def _evaluate(text: str, inputs: dict[str, str], steps: dict[str, dict[str, str]]) -> str:
    """The few expressions action.yml uses; anything else is a test failure, not a silent blank."""

    def one(m: re.Match) -> str:
        expr = m.group(1)
        if expr.startswith("inputs."):
            return inputs[expr.removeprefix("inputs.")]
        if expr == "github.token":
            return "ghs_test-token"
        sm = re.fullmatch(r"steps\.([\w-]+)\.outputs\.([\w-]+)", expr)
        if sm:
            return steps.get(sm.group(1), {}).get(sm.group(2), "")
        raise AssertionError(f"expression the test does not know: {expr}")

    return _EXPR.sub(one, text)


@dataclass
class ActionRun:
    returncode: int
    stdout: str
    stderr: str
    outputs: dict[str, str]       # the action's outputs (its outputs: section, evaluated)
    step_outputs: dict[str, dict[str, str]]


def run_action(with_: dict[str, str], *, workspace: Path, event: Path, env: dict[str, str] | None = None,
               tmp: Path) -> ActionRun:
    """Run action.yml's run: steps in order with the given `with:` inputs; stop at the first failure."""
    tmp.mkdir(parents=True, exist_ok=True)
    inputs = {name: spec.get("default", "") for name, spec in ACTION["inputs"].items()}
    inputs.update(with_)
    inputs = {k: _evaluate(str(v), inputs, {}) for k, v in inputs.items()}
    step_outputs: dict[str, dict[str, str]] = {}
    stdout, stderr = [], []
    rc = 0
    for n, step in enumerate(ACTION["runs"]["steps"]):
        if "uses" in step or step.get("id") == "install":
            continue
        assert step["shell"] == "bash"
        out_file = tmp / f"output-{n}"
        out_file.write_text("")
        script = tmp / f"step-{n}.sh"
        script.write_text(step["run"])
        step_env = {k: _evaluate(str(v), inputs, step_outputs) for k, v in step.get("env", {}).items()}
        full_env = {**os.environ, **(env or {}), **step_env,
                    "PATH": BIN + os.pathsep + os.environ.get("PATH", ""),
                    "GITHUB_ACTION_PATH": str(ROOT), "GITHUB_WORKSPACE": str(workspace),
                    "GITHUB_OUTPUT": str(out_file), "GITHUB_EVENT_PATH": str(event),
                    "GITHUB_EVENT_NAME": "repository_dispatch", "GITHUB_ACTIONS": "true", "CI": "true"}
        cwd = workspace / _evaluate(step.get("working-directory", "."), inputs, step_outputs)
        proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", str(script)], cwd=cwd,
                              env=full_env, capture_output=True, text=True, timeout=120)
        stdout.append(proc.stdout)
        stderr.append(proc.stderr)
        if "id" in step:
            step_outputs[step["id"]] = parse_github_output(out_file.read_text())
        if proc.returncode != 0:
            rc = proc.returncode
            break
    outputs = {name: _evaluate(spec["value"], inputs, step_outputs) for name, spec in ACTION["outputs"].items()}
    return ActionRun(rc, "".join(stdout), "".join(stderr), outputs, step_outputs)


def dispatch_payload(tmp: Path, **client_payload: str) -> Path:
    """The vendored repository_dispatch example with the relay's client_payload filled in."""
    payload = json.loads((FIXTURES / "repository_dispatch.json").read_text())
    payload = copy.deepcopy(payload)
    payload["action"] = "upstream-release"
    payload["client_payload"] = client_payload
    path = tmp / "event dir" / "repository_dispatch.json"  # a space: the path must stay one word
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    return path


def _plan_with() -> dict[str, str]:
    """The `with:` of upstream.yml's plan step: the test runs what the workflow runs."""
    step = next(s for s in UPSTREAM["jobs"]["plan"]["steps"] if s.get("id") == "plan")
    return dict(step["with"])


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("ws") / "repo").root


def test_plan_from_a_dispatch_gives_only_that_subsystem(workspace: Path, tmp_path: Path):
    event = dispatch_payload(tmp_path, subsystem="nats", version="v1.1.0", commit="a" * 40,
                             upstream="https://github.com/nats-io/nats-server", delivery="d-1")
    run = run_action(_plan_with(), workspace=workspace, event=event, tmp=tmp_path)
    assert run.returncode == 0, run.stderr
    matrix = json.loads(run.outputs["matrix"])
    assert sorted((e["subsystem"], e["platform"]) for e in matrix["include"]) == \
        sorted(("nats", p) for p in PLATFORMS)
    for entry in matrix["include"]:
        assert f"{entry['os']}/{entry['arch']}" == entry["platform"]
        assert entry["runner"]
        assert entry["version"] == "v1.1.0"  # the build job builds exactly the released version
    assert run.outputs["has_work"] == "true"
    assert run.outputs["changed"] == "nats"
    # The multi-line stdout survives $GITHUB_OUTPUT intact.
    assert json.loads(run.outputs["result"]) == matrix
    assert run.outputs["result"] == run.stdout.rstrip("\n")


def test_the_example_payload_as_published_is_refused(workspace: Path, tmp_path: Path):
    """GitHub's own example carries an empty client_payload: no subsystem, so a clear error, no work."""
    event = FIXTURES / "repository_dispatch.json"
    run = run_action(_plan_with(), workspace=workspace, event=event, tmp=tmp_path)
    assert run.returncode == 1
    assert "client_payload.subsystem" in run.stderr
    assert run.outputs["has_work"] == "" and run.outputs["matrix"] == ""


def test_workflow_dispatch_payloads(workspace: Path, tmp_path: Path):
    """By hand: inputs.subsystems names what to build; the example's empty inputs mean everything."""
    published = FIXTURES / "workflow_dispatch.json"
    run = run_action(_plan_with(), workspace=workspace, event=published, tmp=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.outputs["changed"] == "nats,arc"
    assert len(json.loads(run.outputs["matrix"])["include"]) == 2 * len(PLATFORMS)
    payload = json.loads(published.read_text())
    payload["inputs"] = {"subsystems": "arc"}
    event = tmp_path / "workflow_dispatch.json"
    event.write_text(json.dumps(payload))
    run = run_action(_plan_with(), workspace=workspace, event=event, tmp=tmp_path)
    assert run.returncode == 0, run.stderr
    assert run.outputs["changed"] == "arc" and run.outputs["has_work"] == "true"
    assert all("version" not in e for e in json.loads(run.outputs["matrix"])["include"])


def test_the_skipped_install_step_is_valid_bash():
    install = next(s for s in ACTION["runs"]["steps"] if s.get("id") == "install")
    proc = subprocess.run(["bash", "-n"], input=install["run"], capture_output=True, text=True, timeout=10)
    assert proc.returncode == 0, proc.stderr


def test_unknown_subsystem_fails_and_sets_no_work(workspace: Path, tmp_path: Path):
    event = dispatch_payload(tmp_path, subsystem="no-such-thing", version="v1", commit="b" * 40,
                             upstream="https://example.invalid/x", delivery="d-2")
    run = run_action(_plan_with(), workspace=workspace, event=event, tmp=tmp_path)
    assert run.returncode == 1
    assert "no-such-thing" in run.stderr
    assert run.outputs["has_work"] != "true"


def test_payload_values_cannot_inject_commands(workspace: Path, tmp_path: Path):
    marker = tmp_path / "pwned"
    hostile = f'nats"; touch {marker}; echo "$(touch {marker})`touch {marker}`'
    event = dispatch_payload(tmp_path, subsystem=hostile, version="v1", commit="c" * 40,
                             upstream="x", delivery="d-3")
    run = run_action(_plan_with(), workspace=workspace, event=event, tmp=tmp_path)
    assert run.returncode == 1
    assert not marker.exists()


def test_args_are_split_without_a_shell(workspace: Path, tmp_path: Path):
    """Quotes group words, $VAR expands from the env, and nothing else is interpreted."""
    marker = tmp_path / "pwned"
    event = dispatch_payload(tmp_path, subsystem="arc", version="v1", commit="d" * 40, upstream="x",
                             delivery="d-4")
    run = run_action({"command": "plan", "args": f'--event "$EVENT_FILE" $(touch {marker}) `touch {marker}`'},
                     workspace=workspace, event=event, env={"EVENT_FILE": str(event)}, tmp=tmp_path)
    assert not marker.exists()
    assert run.returncode == 2  # the literal `$(touch` reached click as an extra argument: usage error
    run = run_action({"command": "plan", "args": "--event '$EVENT_FILE' ; --json"},
                     workspace=workspace, event=event, env={"EVENT_FILE": str(event)}, tmp=tmp_path)
    assert run.returncode == 2


def test_unbalanced_quotes_in_args_stop_before_the_command(workspace: Path, tmp_path: Path):
    event = dispatch_payload(tmp_path, subsystem="nats")
    run = run_action({"command": "plan", "args": '--event "$GITHUB_EVENT_PATH'}, workspace=workspace,
                     event=event, tmp=tmp_path)
    assert run.returncode == 1
    assert "cannot split the args input: No closing quotation" in run.stderr
    assert "plan (" not in run.stderr  # the CLI never ran (it logs its plan reason on stderr)
    assert run.outputs["has_work"] == ""


def test_a_bad_command_input_is_refused(workspace: Path, tmp_path: Path):
    marker = tmp_path / "pwned"
    event = dispatch_payload(tmp_path, subsystem="nats")
    for command in (f"plan; touch {marker}", "--help", "", "PLAN"):
        run = run_action({"command": command}, workspace=workspace, event=event, tmp=tmp_path)
        assert run.returncode == 2, command
        assert "bad command input" in run.stderr
    assert not marker.exists()


def test_working_directory_input(workspace: Path, tmp_path: Path):
    """The action runs in `working-directory` below the job's workspace, where sync-tools.yaml is."""
    event = dispatch_payload(tmp_path, subsystem="arc", version="v1.2.0", commit="e" * 40,
                             upstream="https://example.invalid/arc", delivery="d-5")
    run = run_action({**_plan_with(), "working-directory": workspace.name}, workspace=workspace.parent,
                     event=event, tmp=tmp_path)
    assert run.returncode == 0, run.stderr
    assert {e["subsystem"] for e in json.loads(run.outputs["matrix"])["include"]} == {"arc"}
    assert run.outputs["changed"] == "arc"


def test_parse_github_output_handles_both_forms():
    text = "a=1\nmatrix<<EOF_x\n{\n  \"k\": \"v=w\"\n}\nEOF_x\nb=two=2\nempty<<D\nD\n"
    assert parse_github_output(text) == {"a": "1", "matrix": '{\n  "k": "v=w"\n}', "b": "two=2", "empty": ""}
