"""``plan``: the Actions matrix from a dispatch event, from changed files (with dependents), from a git
base (dulwich), and from ``check``; an empty plan is {"include": []} with has_work=false."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from sync_tools.cli import cli
from sync_tools.errors import DataError
from sync_tools.plan import (
    changed_files,
    glob_to_regex,
    make_plan,
    names_from_event,
    names_from_files,
    versions_from_event,
)
from tests.workspace import make_workspace

RUNNERS = {"linux/amd64": "ubuntu-latest", "linux/arm64": "ubuntu-24.04-arm", "darwin/amd64": "macos-15-intel",
           "darwin/arm64": "macos-latest"}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    # nats <- arc <- web: a change to nats pulls in arc and, through it, web.
    subs = {"nats": {"binary": "nats-server"}, "arc": {"depends_on": ["nats"]}, "web": {"depends_on": ["arc"]},
            "solo": {}}
    return make_workspace(tmp_path_factory.mktemp("plan") / "ws", subs)


def _plan(ws, *args: str, input: str | None = None, env: dict | None = None):
    result = CliRunner().invoke(cli, ["plan", *args, "--config", str(ws.config_path)], input=input,
                                env={"GITHUB_OUTPUT": None, **(env or {})})
    return result


def _matrix(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_dispatch_event_gives_that_subsystem_on_every_platform(ws, tmp_path) -> None:
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"action": "upstream-release", "client_payload": {
        "subsystem": "nats", "version": "v1.10.25", "commit": "abc", "upstream": "x", "delivery": "d1"}}))
    out = tmp_path / "github_output"
    out.write_text("earlier=1\n")
    matrix = _matrix(_plan(ws, "--event", str(event), "--github-output", str(out)))
    assert matrix == {"include": [
        {"subsystem": "nats", "platform": p, "os": p.split("/")[0], "arch": p.split("/")[1], "runner": r,
         "version": "v1.10.25"} for p, r in RUNNERS.items()]}
    lines = out.read_text().splitlines()
    assert lines[0] == "earlier=1"  # appended, not overwritten
    assert json.loads(lines[1].removeprefix("matrix=")) == matrix
    assert lines[2:] == ["has_work=true", "changed=nats"]


@pytest.mark.parametrize("payload,expected", [
    ({"client_payload": {"subsystem": "nats,solo"}}, ["nats", "solo"]),
    ({"client_payload": {"subsystem": ["solo", "arc"]}}, ["arc", "solo"]),
    ({"client_payload": {"subsystem": " arc "}}, ["arc"]),
    ({"inputs": {"subsystems": "web, nats"}}, ["nats", "web"]),
    ({"inputs": {"subsystems": ""}}, ["nats", "arc", "web", "solo"]),
    ({"inputs": {"subsystems": "all"}}, ["nats", "arc", "web", "solo"]),
])
def test_event_shapes(ws, payload, expected) -> None:
    cfg = ws.config()
    plan = make_plan(cfg, names_from_event(cfg, payload), ["linux/amd64"])
    assert list(plan.subsystems) == expected  # config order; dispatch does not pull in dependents
    assert versions_from_event(payload) == {}


def test_unknown_subsystem_in_an_event_exits_1_with_one_line(ws, tmp_path) -> None:
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"client_payload": {"subsystem": "nats,telegraf"}}))
    result = _plan(ws, "--event", str(event))
    assert result.exit_code == 1
    assert result.output.strip() == ("Error: the event names unknown subsystem(s): telegraf "
                                     "(configured: nats, arc, web, solo)")


@pytest.mark.parametrize("event", [{}, {"client_payload": {}}, {"client_payload": {"subsystem": 3}},
                                   {"inputs": {"subsystems": {"a": 1}}}])
def test_bad_events(ws, event) -> None:
    with pytest.raises(DataError):
        names_from_event(ws.config(), event)


def test_a_version_that_could_inject_shell_is_refused(ws, tmp_path) -> None:
    event = {"client_payload": {"subsystem": "nats", "version": "v1; rm -rf /"}}
    with pytest.raises(DataError, match="characters"):
        versions_from_event(event)
    (tmp_path / "e.json").write_text(json.dumps(event))
    assert _plan(ws, "--event", str(tmp_path / "e.json")).exit_code == 1


@pytest.mark.parametrize("subsystem, expected", [
    ("nats", {"nats": "v1.2.0"}), (["nats"], {"nats": "v1.2.0"}), (" nats ", {"nats": "v1.2.0"}),
    ("nats arc", {}), (["nats", "arc"], {}),  # a version belongs to one subsystem only
])
def test_the_dispatched_version_is_kept_for_one_subsystem_however_it_is_named(subsystem, expected) -> None:
    assert versions_from_event({"client_payload": {"subsystem": subsystem, "version": "v1.2.0"}}) == expected


def test_every_planned_version_is_checked_for_shell_characters(ws) -> None:
    with pytest.raises(DataError, match="characters"):
        make_plan(ws.config(), ["nats"], ["linux/amd64"], versions={"nats": "x$(id)1.2.3"})


def test_event_file_that_is_not_json(ws, tmp_path) -> None:
    (tmp_path / "e.json").write_text("{nope")
    result = _plan(ws, "--event", str(tmp_path / "e.json"))
    assert result.exit_code == 1 and "not JSON" in result.output


def test_changed_files_pull_in_dependents(ws) -> None:
    cfg = ws.config()
    assert names_from_files(cfg, ["nats/Taskfile.yml"]) == ["nats", "arc", "web"]
    assert names_from_files(cfg, ["arc/deep/dir/file.go"]) == ["arc", "web"]
    assert names_from_files(cfg, ["./solo/x", "README.md"]) == ["solo"]
    matrix = _matrix(_plan(ws, "--changed-files", "-", "--platform", "linux/arm64", input="arc/x\n"))
    assert matrix == {"include": [
        {"subsystem": s, "platform": "linux/arm64", "os": "linux", "arch": "arm64", "runner": "ubuntu-24.04-arm"}
        for s in ("arc", "web")]}


def test_nothing_to_do(ws, tmp_path) -> None:
    files = tmp_path / "changed.json"
    files.write_text(json.dumps(["README.md", "docs/x.md", "natsy/x"]))
    out = tmp_path / "out"
    result = _plan(ws, "--changed-files", str(files), env={"GITHUB_OUTPUT": str(out)})  # the default output
    assert _matrix(result) == {"include": []}
    assert out.read_text() == 'matrix={"include":[]}\nhas_work=false\nchanged=\n'


def test_base_ref_uses_the_repository_history(ws) -> None:
    first = ws.git_commit("nothing new")  # the workspace commit itself is HEAD~0 here
    (ws.root / "solo" / "notes.txt").write_text("hello\n")
    second = ws.git_commit("solo notes")
    (ws.root / "nats" / "Taskfile.yml").write_text((ws.root / "nats" / "Taskfile.yml").read_text() + "# x\n")
    head = ws.git_commit("touch nats")
    assert changed_files(ws.root, first) == ["nats/Taskfile.yml", "solo/notes.txt"]
    assert changed_files(ws.root, second) == ["nats/Taskfile.yml"]
    assert changed_files(ws.root, second[:10]) == ["nats/Taskfile.yml"]  # abbreviated sha
    assert changed_files(ws.root, "HEAD~1") == ["nats/Taskfile.yml"]
    assert changed_files(ws.root, "HEAD") == []
    assert changed_files(ws.root, first, head=second) == ["solo/notes.txt"]
    matrix = _matrix(_plan(ws, "--base", second, "--platform", "linux/amd64"))
    assert [i["subsystem"] for i in matrix["include"]] == ["nats", "arc", "web"]
    assert _matrix(_plan(ws, "--base", head)) == {"include": []}
    assert _matrix(_plan(ws, "--base", first, "--head", second, "--platform", "linux/amd64"))["include"][0][
        "subsystem"] == "solo"


def test_a_push_that_bumps_a_pin_plans_that_subsystem_only(ws) -> None:
    ws.git_commit("start")
    text = ws.config_path.read_text()
    ws.config_path.write_text(text + "# a comment changes no pin\n")
    ws.git_commit("comment")
    assert _matrix(_plan(ws, "--base", "HEAD~1")) == {"include": []}
    from sync_tools.pins import update_pin

    update_pin(ws.config().subsystems["solo"].pin, "v1.0.1")  # what `build --version` commits back
    ws.git_commit("solo v1.0.1")
    matrix = _matrix(_plan(ws, "--base", "HEAD~1", "--platform", "linux/amd64"))
    assert [i["subsystem"] for i in matrix["include"]] == ["solo"]  # not the others pinned in that file
    update_pin(ws.config().subsystems["nats"].pin, "v1.0.1")
    ws.git_commit("nats v1.0.1")
    matrix = _matrix(_plan(ws, "--base", "HEAD~1", "--platform", "linux/amd64"))
    assert [i["subsystem"] for i in matrix["include"]] == ["nats", "arc", "web"]  # and its dependents


def test_a_push_that_changes_a_subsystems_config_plans_it(ws) -> None:
    """Only the pin used to count: a new build command, binary or upstream for nats in sync-tools.yaml
    planned nothing. Another section (release, relay) still builds nothing."""
    import yaml

    ws.git_commit("start")
    data = yaml.safe_load(ws.config_path.read_text())
    data["subsystems"]["solo"]["binary"] = "solo-server"
    ws.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    ws.git_commit("solo's binary renamed")
    matrix = _matrix(_plan(ws, "--base", "HEAD~1", "--platform", "linux/amd64"))
    assert [i["subsystem"] for i in matrix["include"]] == ["solo"]
    data["subsystems"]["nats"]["build"] = ["echo rebuilt"]
    ws.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    ws.git_commit("nats's build changed")
    matrix = _matrix(_plan(ws, "--base", "HEAD~1", "--platform", "linux/amd64"))
    assert [i["subsystem"] for i in matrix["include"]] == ["nats", "arc", "web"]
    data.setdefault("release", {})["expires_days"] = 20
    ws.config_path.write_text(yaml.safe_dump(data, sort_keys=False))
    ws.git_commit("release settings only")
    assert _matrix(_plan(ws, "--base", "HEAD~1")) == {"include": []}


def test_a_dispatch_naming_one_subsystem_twice_keeps_its_version() -> None:
    event = {"client_payload": {"subsystem": "nats,nats", "version": "v2.10.26"}}
    assert versions_from_event(event) == {"nats": "v2.10.26"}


@pytest.mark.parametrize("base", ["0" * 40, "1234567890abcdef1234567890abcdef12345678", "no-such-branch"])
def test_zero_or_unknown_base_plans_everything(ws, base) -> None:
    assert changed_files(ws.root, base) is None
    matrix = _matrix(_plan(ws, "--base", base, "--platform", "linux/amd64"))
    assert [i["subsystem"] for i in matrix["include"]] == ["nats", "arc", "web", "solo"]


def test_base_outside_a_repository_is_an_error(tmp_path) -> None:
    ws = make_workspace(tmp_path / "plain", ["solo"], git=False)
    result = _plan(ws, "--base", "HEAD~1")
    assert result.exit_code == 1 and "not a git repository" in result.output


def test_from_check_plans_subsystems_with_upstream_updates(tmp_path) -> None:
    ws = make_workspace(tmp_path / "ws", git=False)
    assert _matrix(_plan(ws, "--from-check")) == {"include": []}
    ws.release_upstream("arc", "v1.0.1")
    matrix = _matrix(_plan(ws, "--from-check", "--platform", "darwin/arm64"))
    assert matrix == {"include": [{"subsystem": "arc", "platform": "darwin/arm64", "os": "darwin", "arch": "arm64",
                                   "runner": "macos-latest", "version": "v1.0.1"}]}
    # a newest tag that reads as a version but carries shell syntax is not planned (the rest still is)
    ws.release_upstream("nats", "x$(id)9.9.9")
    matrix = _matrix(_plan(ws, "--from-check", "--platform", "darwin/arm64"))
    assert [i["subsystem"] for i in matrix["include"]] == ["arc"]


def test_sources_are_exclusive(ws) -> None:
    assert _plan(ws).exit_code == 2
    assert _plan(ws, "--all", "--from-check").exit_code == 2
    assert len(_matrix(_plan(ws, "--all"))["include"]) == 16


def test_unknown_platform_cross_builds_on_linux(ws) -> None:
    plan = make_plan(ws.config(), ["solo"], ["freebsd/amd64", "windows/amd64"])
    assert [i.runner for i in plan.items] == ["ubuntu-latest", "windows-latest"]
    assert _plan(ws, "--all", "--platform", "linux").exit_code == 1


@pytest.mark.parametrize("glob,path,hit", [
    ("nats/**", "nats/Taskfile.yml", True),
    ("nats/**", "nats/a/b/c", True),
    ("nats/**", "natsx/a", False),
    ("nats/**", "nats", False),
    ("nats/*.yml", "nats/a.yml", True),
    ("nats/*.yml", "nats/sub/a.yml", False),
    ("**/*.go", "main.go", True),
    ("**/*.go", "a/b/main.go", True),
    ("cmd/?.go", "cmd/a.go", True),
    ("cmd/[ab].go", "cmd/c.go", False),
    ("./nats/", "nats/x", True),
    (".github/**", ".github/workflows/x.yml", True),
    (".github/**", "github/x", False),
])
def test_globs(glob, path, hit) -> None:
    assert bool(glob_to_regex(glob).match(path)) is hit


def test_a_dispatch_build_would_refuse_is_left_out_with_a_notice(ws, tmp_path) -> None:
    """A new major under `major: manual`, or a version not newer than the pin, is not planned: the
    leg would only fail in `build`. The summary says why."""
    for version, words in (("v2.0.0", "new major"), ("v0.9.0", "not newer")):
        event = tmp_path / f"event-{version}.json"
        event.write_text(json.dumps({"action": "upstream-release", "client_payload": {
            "subsystem": "nats", "version": version, "commit": "abc", "upstream": "x", "delivery": "d"}}))
        summary = tmp_path / f"summary-{version}.md"
        proc = subprocess.run([sys.executable, "-m", "sync_tools", "plan", "--event", str(event)],
                              env={**ws.env(), "GITHUB_STEP_SUMMARY": str(summary)}, cwd=ws.root,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == {"include": []}
        assert f"notice: nats: not planned: {version}" in proc.stderr and words in proc.stderr
        assert words in summary.read_text()


def test_a_leg_whose_build_task_does_not_exist_is_never_planned(tmp_path) -> None:
    """The default build is `task X:src:update` + `task X:bin:build`; when the root Taskfile does not
    include X's Taskfile (plat-telemetry's grafana), the leg could only fail."""
    ws = make_workspace(tmp_path / "ws", {"nats": {}, "arc": {}}, git=False)
    root_tf = ws.root / "Taskfile.yml"
    text = root_tf.read_text()
    root_tf.write_text(text.replace("  arc:\n    taskfile: ./arc/Taskfile.yml\n    dir: ./arc\n", ""))
    proc = subprocess.run([sys.executable, "-m", "sync_tools", "plan", "--all"], env=ws.env(), cwd=ws.root,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert {i["subsystem"] for i in json.loads(proc.stdout)["include"]} == {"nats"}
    assert "notice: arc: not planned: its build command 'task arc:src:update'" in proc.stderr
    root_tf.write_text(text)
    proc = subprocess.run([sys.executable, "-m", "sync_tools", "plan", "--all"], env=ws.env(), cwd=ws.root,
                          capture_output=True, text=True, timeout=60)
    assert {i["subsystem"] for i in json.loads(proc.stdout)["include"]} == {"nats", "arc"}
