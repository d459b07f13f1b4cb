"""The GitHub Actions files, checked statically: linters clean, every `sync-tools` invocation parses with
the real CLI, least privilege, pinned third-party actions, no expressions inside scripts."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import yaml

from sync_tools.cli import cli

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
ACTION = ROOT / "action.yml"
DOCS = ROOT / "docs" / "actions.md"
LINT = ROOT / ".ci" / "lint-actions"
VENV_BIN = Path(sys.executable).parent

SHA_PIN = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_./-]+@[0-9a-f]{40}$")
# Variables GitHub sets in every job; anything else a `$VAR` in an action's args must come from `env:`.
GITHUB_DEFAULT_VARS = {"GITHUB_EVENT_PATH", "GITHUB_WORKSPACE", "GITHUB_SHA", "GITHUB_REF", "GITHUB_OUTPUT",
                       "GITHUB_REPOSITORY", "GITHUB_RUN_ID", "RUNNER_TEMP", "GITHUB_ACTION_PATH"}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _on(workflow: dict) -> dict:
    # YAML 1.1 reads the key `on` as the boolean True.
    return workflow.get("on", workflow.get(True))


def _jobs(path: Path) -> dict[str, dict]:
    return _load(path)["jobs"]


def _all_steps() -> list[tuple[str, dict]]:
    """(where, step) for every step of every workflow and of the composite action."""
    out = []
    for wf in WORKFLOWS:
        for job_id, job in _jobs(wf).items():
            for i, step in enumerate(job.get("steps", [])):
                out.append((f"{wf.name}:{job_id}:{i}", step))
    for i, step in enumerate(_load(ACTION)["runs"]["steps"]):
        out.append((f"action.yml:{i}", step))
    return out


def _docs_steps() -> list[tuple[str, dict]]:
    """Steps of the YAML examples in docs/actions.md, so the README example stays runnable."""
    out = []
    for n, block in enumerate(re.findall(r"```yaml\n(.*?)```", DOCS.read_text(), re.S)):
        doc = yaml.safe_load(block)
        if isinstance(doc, list):  # a bare list of steps
            out += [(f"docs/actions.md:block{n}:{i}", step) for i, step in enumerate(doc)]
            continue
        for job_id, job in (doc.get("jobs") or {}).items():
            for i, step in enumerate(job.get("steps", [])):
                out.append((f"docs/actions.md:block{n}:{job_id}:{i}", step))
    return out


# ---------------------------------------------------------------------------------------------- linters


def _tool(name: str) -> str | None:
    found = VENV_BIN / name
    return str(found) if found.exists() else shutil.which(name)


needs_linters = pytest.mark.skipif(not (_tool("actionlint") and _tool("zizmor")),
                                   reason="actionlint or zizmor is not installed")


def _run_lint(root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(["bash", str(LINT), str(root)], capture_output=True, text=True, env=env, timeout=120)


@needs_linters
def test_actionlint_and_zizmor_are_clean():
    result = _run_lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "lint-actions: clean" in result.stdout


@needs_linters
def test_lint_actions_fails_on_findings(tmp_path: Path):
    """The lint script is a gate: an unpinned action and an injectable expression in a script fail it."""
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    shutil.copy(ACTION, tmp_path / "action.yml")
    (tmp_path / ".github" / "workflows" / "bad.yml").write_text(
        "name: bad\non: [repository_dispatch]\npermissions: {}\njobs:\n  x:\n    runs-on: ubuntu-latest\n"
        "    permissions:\n      contents: read\n    steps:\n"
        "      - uses: actions/checkout@v4\n        with:\n          persist-credentials: false\n"
        "      - run: echo ${{ github.event.client_payload.subsystem }}\n")
    result = _run_lint(tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "unpinned-uses" in out and "template-injection" in out, out


@pytest.mark.skipif(not _tool("shellcheck"), reason="shellcheck is not installed")
def test_lint_actions_shellchecks_the_composite_action(tmp_path: Path):
    """actionlint does not read action.yml scripts; the lint script shellchecks them itself."""
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    shutil.copy(WORKFLOWS[0], tmp_path / ".github" / "workflows" / WORKFLOWS[0].name)
    action = _load(ACTION)
    action["runs"]["steps"].append({"name": "bad", "shell": "bash", "run": "for f in $(ls *.txt); do cat $f; done\n"})
    (tmp_path / "action.yml").write_text(yaml.safe_dump(action, sort_keys=False))
    result = _run_lint(tmp_path)
    assert result.returncode != 0
    assert "SC2045" in result.stdout + result.stderr


# ---------------------------------------------------------------------------- sync-tools invocations


@dataclass(frozen=True)
class Invocation:
    where: str
    args: tuple[str, ...]   # after `sync-tools`, variables replaced by placeholders
    variables: tuple[str, ...]  # the $VARs the invocation used


_SHELL_STOP = {";", "&&", "||", "|", "&", ">", ">>", "<", "2>", ")", "(", "\n"}
_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)")


def _placeholders(tmp: Path) -> dict[str, str]:
    """A value of the right shape for each variable the files use (options check paths and formats)."""
    event = tmp / "event.json"
    event.write_text("{}")
    files = tmp / "changed.txt"
    files.write_text("")
    return {"PLATFORM": "linux/amd64", "SUBSYSTEM": "nats", "SUBSYSTEMS": "nats,arc", "BASE": "HEAD", "VERSION": "v2.10.25",
            "GITHUB_EVENT_PATH": str(event), "FILES": str(files), "GITHUB_OUTPUT": str(tmp / "out")}


def _substitute(word: str, values: dict[str, str]) -> tuple[str, list[str]]:
    names = _VAR.findall(word)
    for name in names:
        assert name in values, f"no placeholder for ${name}: add one to _placeholders"
        word = re.sub(r"\$\{?" + name + r"\}?", values[name], word)
    return word, names


def _words(text: str) -> list[str]:
    lex = shlex.shlex(text.replace("\\\n", " "), posix=True, punctuation_chars=";&|<>()")
    lex.whitespace_split = True
    lex.whitespace = " \t\r"
    return list(lex)


def _invocations(values: dict[str, str]) -> list[Invocation]:
    found: list[Invocation] = []
    for where, step in _all_steps() + _docs_steps():
        uses = step.get("uses", "")
        if uses == "./" or uses.split("@")[0].endswith("/sync-tools"):
            with_ = step.get("with", {})
            words = [with_.get("command", "plan"), *shlex.split(with_.get("args", ""))]
        elif "run" in step:
            for line in step["run"].splitlines():
                if "sync-tools" not in line or line.lstrip().startswith("#"):
                    continue
                toks = _words(line)
                for i, tok in enumerate(toks):
                    if tok != "sync-tools":
                        continue
                    rest = []
                    for t in toks[i + 1:]:
                        if t in _SHELL_STOP:
                            break
                        rest.append(t)
                    # `sync-tools "$SYNC_TOOLS_COMMAND" ...` is the action's generic runner: its
                    # commands are the `with:` of the steps that use it, checked above.
                    if rest and rest[0].startswith("$"):
                        continue
                    found.append(_invocation(where, rest, values))
            continue
        else:
            continue
        found.append(_invocation(where, words, values))
    return found


def _invocation(where: str, words: list[str], values: dict[str, str]) -> Invocation:
    args, names = [], []
    for w in words:
        w2, used = _substitute(w, values)
        args.append(w2)
        names += used
    return Invocation(where, tuple(args), tuple(names))


def _parse(args: tuple[str, ...]) -> None:
    """Parse like the real CLI would, without running anything: raises click.UsageError on a bad flag."""
    if not args or args[0].startswith("-"):
        try:
            cli.make_context("sync-tools", list(args))
        except click.exceptions.Exit as e:  # --version / --help exit 0 after printing
            assert e.exit_code == 0
        return
    group_ctx = cli.make_context("sync-tools", [args[0]], resilient_parsing=True)
    command = cli.get_command(group_ctx, args[0])
    assert command is not None, f"no command {args[0]!r}"
    with command.make_context(args[0], list(args[1:]), parent=group_ctx) as ctx:
        assert ctx.command is command


def test_every_sync_tools_invocation_parses_with_the_cli(tmp_path: Path):
    values = _placeholders(tmp_path)
    invocations = _invocations(values)
    commands = {inv.args[0] for inv in invocations if inv.args}
    # Guard against a parser that silently finds nothing.
    assert {"plan", "build", "package", "release"} <= commands, commands
    failures = []
    for inv in invocations:
        try:
            _parse(inv.args)
        except (click.UsageError, click.BadParameter, AssertionError) as e:
            failures.append(f"{inv.where}: sync-tools {' '.join(inv.args)}: {e}")
    assert not failures, "\n".join(failures)


def test_a_bad_flag_is_caught_by_the_parser(tmp_path: Path):
    """The check above would catch a renamed flag."""
    with pytest.raises(click.UsageError):
        _parse(("plan", "--no-such-flag"))
    with pytest.raises(AssertionError):
        _parse(("no-such-command",))


def test_action_args_only_use_variables_the_step_defines():
    """The action expands $VAR in `args` from its environment; a variable missing from the step's `env:`
    would reach the CLI as the literal text `$VAR`."""
    for where, step in _all_steps() + _docs_steps():
        if step.get("uses") != "./" and not step.get("uses", "").split("@")[0].endswith("/sync-tools"):
            continue
        names = set(_VAR.findall(step.get("with", {}).get("args", "")))
        missing = names - set(step.get("env", {})) - GITHUB_DEFAULT_VARS
        assert not missing, f"{where}: args use {sorted(missing)} without env"


# ------------------------------------------------------------------------------------ least privilege


def test_permissions_are_least_privilege():
    for wf in WORKFLOWS:
        doc = _load(wf)
        assert doc.get("permissions") == {}, f"{wf.name}: top-level permissions must be {{}}"
        for job_id, job in doc["jobs"].items():
            perms = job.get("permissions")
            assert isinstance(perms, dict), f"{wf.name}:{job_id}: no job-level permissions"
            for scope, level in perms.items():
                assert level in ("read", "write", "none"), f"{wf.name}:{job_id}: {scope}: {level}"
                if level == "write":
                    assert (wf.name, job_id, scope) in {("upstream.yml", "release", "contents"),
                                                        ("refresh.yml", "refresh", "contents")}, \
                        f"{wf.name}:{job_id}: {scope}: write outside the jobs that write the release"
    release = _jobs(ROOT / ".github/workflows/upstream.yml")["release"]
    assert release["permissions"] == {"contents": "write"}


def test_the_manifest_is_refreshed_on_a_schedule_well_inside_its_expiry():
    doc = _load(ROOT / ".github/workflows/refresh.yml")
    (cron,) = [c["cron"] for c in _on(doc)["schedule"]]
    assert cron.split()[2:] == ["*", "*", "1"]  # weekly: far inside the default 30-day expiry
    steps = doc["jobs"]["refresh"]["steps"]
    run = [s for s in steps if s.get("uses") == "./"]
    assert run and run[0]["with"]["command"] == "release" and run[0]["with"]["args"] == "--refresh"


def test_third_party_actions_are_pinned_by_full_sha_with_a_version_comment():
    texts = [(p, p.read_text()) for p in [*WORKFLOWS, ACTION]]
    seen = 0
    for path, text in texts:
        for line in text.splitlines():
            m = re.match(r"^\s*(?:-\s+)?uses:\s*(\S+)(.*)$", line)
            if not m:
                continue
            ref, rest = m.groups()
            if ref.startswith("./"):
                continue
            seen += 1
            assert SHA_PIN.match(ref), f"{path.name}: {ref} is not pinned to a full commit SHA"
            assert re.search(r"#\s*v\d+\.\d+\.\d+", rest), f"{path.name}: {ref} has no '# vX.Y.Z' comment"
    assert seen >= 6


def test_every_checkout_drops_its_credentials():
    checkouts = [(w, s) for w, s in _all_steps() if s.get("uses", "").startswith("actions/checkout@")]
    assert checkouts
    for where, step in checkouts:
        assert step.get("with", {}).get("persist-credentials") is False, where


def test_artifact_uploads_of_hidden_directories_include_them():
    """upload-artifact skips hidden files and directories by default since v4.4: an upload of
    `.dist/` without include-hidden-files finds nothing and fails every build leg."""
    uploads = [(w, s) for w, s in [*_all_steps(), *_docs_steps()]
               if s.get("uses", "").startswith("actions/upload-artifact@")]
    assert uploads
    for where, step in uploads:
        paths = str(step.get("with", {}).get("path", ""))
        if any(part.startswith(".") for line in paths.splitlines() for part in line.strip().split("/") if part):
            assert step["with"].get("include-hidden-files") is True, where


# ---------------------------------------------------------------------------------- script injection

# Expressions whose values the workflow author controls and that cannot carry shell syntax.
SAFE_IN_RUN = re.compile(r"\$\{\{\s*(runner\.temp|github\.action_path|github\.workspace)\s*\}\}")


def test_no_expression_inside_a_script():
    """Untrusted values (inputs, client_payload, matrix from the plan) reach scripts only through env:."""
    for where, step in _all_steps():
        if "run" in step:
            leftover = SAFE_IN_RUN.sub("", step["run"])
            assert "${{" not in leftover, f"{where}: ${{{{ }}}} inside run:"


def test_composite_action_contract():
    action = _load(ACTION)
    assert set(action["inputs"]) == {"command", "args", "python-version", "working-directory",
                                     "token", "signing-key"}
    assert {"matrix", "has_work", "changed"} <= set(action["outputs"])
    # Builds run upstream code: no token unless a step hands one over (release does).
    assert action["inputs"]["token"]["default"] == ""
    for name in ("matrix", "has_work", "changed"):
        assert action["outputs"][name]["value"] == f"${{{{ steps.run.outputs.{name} }}}}"
    assert action["runs"]["using"] == "composite"
    assert action["branding"]["icon"] and action["branding"]["color"]
    steps = action["runs"]["steps"]
    assert all(s.get("shell") == "bash" for s in steps if "run" in s)
    install = next(s for s in steps if s.get("id") == "install")
    assert '"$GITHUB_ACTION_PATH"' in install["run"]
    run = next(s for s in steps if s.get("id") == "run")
    # Every input the script reads arrives through env.
    assert {"SYNC_TOOLS_COMMAND", "SYNC_TOOLS_ARGS", "GITHUB_TOKEN", "SYNC_TOOLS_SIGNING_KEY"} <= set(run["env"])


def test_upstream_workflow_shape():
    doc = _load(ROOT / ".github/workflows/upstream.yml")
    on = _on(doc)
    assert on["repository_dispatch"]["types"] == ["upstream-release"]
    assert "subsystems" in on["workflow_dispatch"]["inputs"]
    jobs = doc["jobs"]
    plan, build, release = jobs["plan"], jobs["build"], jobs["release"]
    assert {"matrix", "has_work"} <= set(plan["outputs"])
    assert build["needs"] == "plan"
    assert build["if"] == "needs.plan.outputs.has_work == 'true'"
    assert build["strategy"]["fail-fast"] is False
    assert build["strategy"]["matrix"] == "${{ fromJSON(needs.plan.outputs.matrix) }}"
    assert build["runs-on"] == "${{ matrix.runner }}"
    uses = [s.get("uses", "").split("@")[0] for s in build["steps"]]
    assert {"actions/setup-go", "arduino/setup-task", "actions/upload-artifact"} <= set(uses)
    assert set(release["needs"]) == {"plan", "build"}
    assert "concurrency" in release
    release_step = next(s for s in release["steps"] if s.get("with", {}).get("command") == "release")
    assert release_step["with"]["signing-key"] == "${{ secrets.SYNC_TOOLS_SIGNING_KEY }}"
    assert release_step["with"]["token"] == "${{ github.token }}"
    for job_id, job in jobs.items():  # the signing key and a token reach only the release step
        for step in job["steps"]:
            if step is not release_step:
                assert "signing-key" not in step.get("with", {}) and "token" not in step.get("with", {})
                assert "SYNC_TOOLS_SIGNING_KEY" not in yaml.safe_dump(step), f"{job_id}: {step.get('name')}"
    assert any("GITHUB_STEP_SUMMARY" in s.get("run", "") for s in release["steps"])
