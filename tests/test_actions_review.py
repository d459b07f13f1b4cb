"""The GitHub Actions side against GitHub's documented behaviour and limits (a review of hostile input):

- a matrix generates at most 256 jobs per workflow run; a bigger plan must fail in the plan job with one
  clear line and no outputs, not reach the build job's matrix;
- `download-artifact` with `merge-multiple: true` puts every leg's files into one directory, a later file
  replacing an earlier one of the same name: a build leg (which runs upstream code) must upload its own
  package only, never what the build left in `.dist`;
- `cancel-in-progress: true` cancels the running workflow of the same group: a push's CI run plans only
  the range that push moved, so cancelling it for the next push loses that range's build check.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from sync_tools import plan as planning
from sync_tools.cli import cli
from sync_tools.errors import DataError
from sync_tools.plan import make_plan
from tests.workspace import make_workspace

ROOT = Path(__file__).resolve().parent.parent
UPSTREAM = yaml.safe_load((ROOT / ".github/workflows/upstream.yml").read_text())
CI = yaml.safe_load((ROOT / ".github/workflows/ci.yml").read_text())


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("review") / "ws", ["nats", "arc", "web", "solo"], git=False)


# ------------------------------------------------------------------------ GitHub's 256-job matrix limit


def _platforms(n: int) -> list[str]:
    return [f"linux/x{i}" for i in range(n)]  # no native runner: cross-built on ubuntu-latest


def test_the_matrix_limit_is_githubs() -> None:
    assert planning.MAX_MATRIX_JOBS == 256


def test_a_plan_of_exactly_256_legs_is_made(ws) -> None:
    plan = make_plan(ws.config(), ["nats", "arc", "web", "solo"], _platforms(64))
    assert len(plan.items) == planning.MAX_MATRIX_JOBS


def test_a_plan_over_256_legs_fails_in_the_plan_job_with_no_outputs(ws, tmp_path) -> None:
    """4 subsystems x 65 platforms: GitHub would refuse the build job's matrix after the plan job had
    reported work; the plan itself must refuse, before has_work=true reaches $GITHUB_OUTPUT."""
    with pytest.raises(DataError, match="256"):
        make_plan(ws.config(), ["nats", "arc", "web", "solo"], _platforms(65))
    out = tmp_path / "github_output"
    out.write_text("")
    result = CliRunner().invoke(cli, ["plan", "--all", "--platform", ",".join(_platforms(65)),
                                      "--config", str(ws.config_path), "--github-output", str(out)])
    assert result.exit_code == 1, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("Error: ") and "260" in line and "256" in line
    assert out.read_text() == ""


# ------------------------------------------------------------- a build leg uploads only its own package


def _step(job: dict, name: str) -> dict:
    return next(s for s in job["steps"] if s.get("name") == name)


def _run_package_step(tmp_path: Path, work: Path, package: dict, fake_cli: str) -> None:
    """Run the build job's Package step in *work* as the runner does (bash -eo pipefail), with *fake_cli*
    as `sync-tools` on PATH (nats for linux/amd64); it must succeed."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake = bindir / "sync-tools"
    fake.write_text(fake_cli)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "SUBSYSTEM": "nats",
           "PLATFORM": "linux/amd64"}
    proc = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", package["run"]], cwd=work,
                          env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_a_build_leg_uploads_only_the_package_it_made(tmp_path: Path) -> None:
    """Run the build job's Package step as the runner does, after a Build step whose upstream code left
    another subsystem's asset and sidecar in .dist: the directory the leg then uploads holds this leg's
    package only. (merge-multiple in the release job would otherwise let those files replace the real
    ones of arc's own leg, whichever the download wrote last, before the release signs them.)"""
    build = UPSTREAM["jobs"]["build"]
    package = _step(build, "Package")
    upload = next(s for s in build["steps"] if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert package["run"] and upload["with"]["path"] == ".dist/"
    work = tmp_path / "work"
    dist = work / ".dist"
    dist.mkdir(parents=True)
    (dist / "arc-linux-amd64.tar.gz").write_bytes(b"planted")
    (dist / "arc-linux-amd64.tar.gz.json").write_text(json.dumps({"subsystem": "arc", "platform": "linux/amd64"}))
    (dist / "nats-server-darwin-arm64.tar.gz").write_bytes(b"planted")  # another platform of its own
    # A stand-in for `sync-tools package`: writes exactly what the real one writes for this leg.
    _run_package_step(tmp_path, work, package, '#!/usr/bin/env bash\nset -e\n[ "$1" = package ]\nmkdir -p .dist\n'
                      'echo asset > .dist/nats-server-linux-amd64.tar.gz\n'
                      'echo "{}" > .dist/nats-server-linux-amd64.tar.gz.json\n')
    assert sorted(p.name for p in dist.iterdir()) == ["nats-server-linux-amd64.tar.gz",
                                                       "nats-server-linux-amd64.tar.gz.json"]


def test_a_build_leg_whose_dist_is_a_planted_symlink_uploads_only_its_package(tmp_path: Path) -> None:
    """The build could also make .dist a link to a directory of its choosing."""
    package = _step(UPSTREAM["jobs"]["build"], "Package")
    work = tmp_path / "work"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "arc-linux-amd64.tar.gz").write_bytes(b"planted")
    work.mkdir()
    (work / ".dist").symlink_to(elsewhere)
    _run_package_step(tmp_path, work, package,
                      "#!/usr/bin/env bash\nmkdir -p .dist\necho asset > .dist/nats-server-linux-amd64.tar.gz\n")
    assert not (work / ".dist").is_symlink()
    assert [p.name for p in (work / ".dist").iterdir()] == ["nats-server-linux-amd64.tar.gz"]
    assert (elsewhere / "arc-linux-amd64.tar.gz").exists()  # rm -rf removes the link, not its target


# ------------------------------------------------------------------------- CI concurrency on pushes


def _expression(value: object, github: dict[str, str]) -> str:
    """`${{ }}` as GitHub evaluates the few forms a concurrency key uses: `github.x`, '...' literals,
    `==`, `!=`, `&&` and `||` (which give an operand, not a boolean), text around the braces."""

    def one(m: re.Match) -> str:
        expr = m.group(1)
        assert re.fullmatch(r"[\w.' =!&|-]+", expr), f"an expression this test does not know: {expr}"
        expr = re.sub(r"github\.(\w+)", lambda g: repr(github[g.group(1)]), expr)
        result = eval(expr.replace("&&", " and ").replace("||", " or "), {})  # noqa: S307 - checked above
        return str(result).lower() if isinstance(result, bool) else str(result)

    return re.sub(r"\$\{\{\s*(.*?)\s*\}\}", one, str(value))


def _run(event_name: str, run_id: str, ref: str = "refs/heads/main") -> tuple[str, bool]:
    """(group, cancel-in-progress) of ci.yml's run for this event."""
    github = {"workflow": "ci", "event_name": event_name, "ref": ref, "run_id": run_id, "sha": "a" * 40}
    concurrency = CI["concurrency"]
    cancel = concurrency["cancel-in-progress"]
    cancel = cancel if isinstance(cancel, bool) else _expression(cancel, github) == "true"
    return _expression(concurrency["group"], github), cancel


def test_a_push_does_not_cancel_or_replace_the_previous_pushs_build_check() -> None:
    """The plan job of a push builds only the subsystems the pushed range changed (`before`..`sha`): a
    second push to the branch plans only its own range, so cancelling the first push's run (or, with
    cancel-in-progress off, replacing it while it waits: GitHub keeps one pending run per group) drops
    the build check of what the first push changed for good. A pull request's run is superseded by its
    next run as a whole, so it may still be cancelled."""
    first, second = _run("push", "101"), _run("push", "102")
    assert first[0] != second[0] or not first[1]  # two pushes to one branch never cancel each other
    assert first[0] != second[0]                   # nor replace one another while waiting
    pr1, pr2 = _run("pull_request", "201", "refs/pull/7/merge"), _run("pull_request", "202", "refs/pull/7/merge")
    assert pr1[0] == pr2[0] and pr2[1] is True
    assert _run("pull_request", "203", "refs/pull/8/merge")[0] != pr1[0]


# ------------------------------------------------------------------ client_payload values of the wrong type


@pytest.mark.parametrize("version", [1.1, 2, True, ["v1.2.0"], {"tag": "v1.2.0"}])
def test_a_dispatched_version_that_is_not_text_is_refused(ws, tmp_path, version) -> None:
    """`gh api .../dispatches -F client_payload[version]=1.10` sends the number 1.1. It was ignored as if
    no version had been sent: the run built and released the pin, and said nothing."""
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"action": "upstream-release",
                                 "client_payload": {"subsystem": "nats", "version": version}}))
    out = tmp_path / "github_output"
    out.write_text("")
    result = CliRunner().invoke(cli, ["plan", "--event", str(event), "--config", str(ws.config_path),
                                      "--github-output", str(out)])
    assert result.exit_code == 1, result.output
    assert "client_payload.version" in result.output and "string" in result.output
    assert out.read_text() == ""


@pytest.mark.parametrize("version", [None, ""])
def test_a_dispatch_without_a_version_still_builds_the_pin(ws, tmp_path, version) -> None:
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"client_payload": {"subsystem": "nats", "version": version}}))
    result = CliRunner().invoke(cli, ["plan", "--event", str(event), "--config", str(ws.config_path),
                                      "--platform", "linux/amd64"], env={"GITHUB_OUTPUT": None})
    assert result.exit_code == 0, result.output
    assert [i.get("version") for i in json.loads(result.stdout)["include"]] == [None]


# ----------------------------------------------- the release job takes each leg's own package only


def _leg(artifacts: Path, sub: str, platform: str, *, extra: dict[str, bytes] | None = None,
         claims: tuple[str, str] | None = None) -> None:
    """A build leg's artifact as download-artifact lays it out without merge-multiple:
    ``dist-<sub>-<os>-<arch>/`` with the asset and its sidecar (whose subsystem and platform are *claims*
    when given), plus *extra* files."""
    os_, arch = platform.split("/")
    art = artifacts / f"dist-{sub}-{os_}-{arch}"
    art.mkdir(parents=True)
    name = f"{sub}-{os_}-{arch}.tar.gz"
    data = f"the real {sub} for {platform}".encode()
    (art / name).write_bytes(data)
    of, on = claims or (sub, platform)
    (art / f"{name}.json").write_text(json.dumps(_sidecar(name, of, on, data)))
    for fname, blob in (extra or {}).items():
        (art / fname).write_bytes(blob)


def _sidecar(name: str, sub: str, platform: str, data: bytes) -> dict:
    import hashlib

    return {"subsystem": sub, "platform": platform, "version": "v1.0.0", "commit": "0" * 40,
            "built": "2026-12-07T00:00:00Z", "binary": sub, "name": name, "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), "binary_sha256": "1" * 64}


def test_the_release_job_releases_from_each_legs_own_folder() -> None:
    release = UPSTREAM["jobs"]["release"]
    download = next(s for s in release["steps"] if s.get("uses", "").startswith("actions/download-artifact@"))
    assert download["with"]["path"] == ".artifacts/" and download["with"]["merge-multiple"] is False
    assert "--artifacts .artifacts" in _step(release, "Release")["with"]["args"]


def test_the_legs_packages_are_taken_one_folder_each(tmp_path: Path) -> None:
    from sync_tools.package import take_leg_packages

    arts = tmp_path / ".artifacts"
    _leg(arts, "nats", "linux/amd64")
    _leg(arts, "nats", "linux/arm64")
    _leg(arts, "plat-telemetry", "linux/amd64")  # a name with a dash in it
    taken = take_leg_packages(arts, tmp_path / "taken")
    assert [p.name for p in taken] == ["nats-linux-amd64.tar.gz", "nats-linux-arm64.tar.gz",
                                       "plat-telemetry-linux-amd64.tar.gz"]
    assert len(list((tmp_path / "taken").iterdir())) == 6
    assert (tmp_path / "taken/nats-linux-arm64.tar.gz").read_bytes() == b"the real nats for linux/arm64"


@pytest.mark.parametrize("planted", ["another leg's asset", "a relabelled sidecar", "a symlink", "a stray artifact"])
def test_a_leg_cannot_put_another_legs_asset_in_the_release(tmp_path: Path, planted: str) -> None:
    """nats' leg ran upstream code that also uploaded arc's asset (and a sidecar for it) in its artifact.
    With every artifact merged into one folder (merge-multiple), whichever copy came last was released
    and signed as arc's. Now `release --artifacts` stops with one line, before anything is uploaded."""
    arts = tmp_path / ".artifacts"
    _leg(arts, "arc", "linux/amd64")
    if planted == "another leg's asset":
        _leg(arts, "nats", "linux/amd64", extra={
            "arc-linux-amd64.tar.gz": b"planted", "arc-linux-amd64.tar.gz.json": json.dumps(
                _sidecar("arc-linux-amd64.tar.gz", "arc", "linux/amd64", b"planted")).encode()})
    elif planted == "a relabelled sidecar":
        _leg(arts, "nats", "linux/amd64", claims=("arc", "linux/amd64"))
    elif planted == "a symlink":
        _leg(arts, "nats", "linux/amd64")
        asset = arts / "dist-nats-linux-amd64" / "nats-linux-amd64.tar.gz"
        asset.unlink()
        asset.symlink_to(arts / "dist-arc-linux-amd64" / "arc-linux-amd64.tar.gz")
    else:
        _leg(arts, "nats", "linux/amd64")
        (arts / "zz-other").mkdir()
    ws = make_workspace(tmp_path / "ws")
    result = CliRunner().invoke(cli, ["release", "--only", "nats,arc", "--artifacts", str(arts),
                                      "--config", str(ws.config_path)])
    assert result.exit_code != 0
    last = result.output.strip().splitlines()[-1]
    assert ("dist-nats-linux-amd64" in last or "zz-other" in last) and "Traceback" not in result.output, result.output


def test_release_takes_dist_or_artifacts_not_both(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    result = CliRunner().invoke(cli, ["release", "--only", "nats", "--dist", str(tmp_path / "d"),
                                      "--artifacts", str(tmp_path / "a")])
    assert result.exit_code == 2 and "--dist or --artifacts, not both" in result.output


@pytest.mark.parametrize("version", ["v1.2.3\n", "v1.2.3\r\n"])
def test_a_version_with_a_line_end_is_no_version(ws, version) -> None:
    """`$` matches before a trailing newline: "v1.2.3\\n" passed the plan's check of what reaches the
    build's shell commands and the Actions outputs."""
    with pytest.raises(DataError, match="characters a version never has"):
        make_plan(ws.config(), ["nats"], ["linux/amd64"], versions={"nats": version})
