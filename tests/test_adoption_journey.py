"""A new user adopting sync-tools on plat-telemetry, step by step as README.md, docs/agent.md and the
shipped workflows (.github/workflows/upstream.yml) say, then the day-2 things an operator does. Each
test is one defect found on that path (each failed before its fix): a branch pin's sha in a fresh CI
checkout, pushes to a pinned branch, verify on a USER machine, grafana's binary path, a rebuild of
everything after a dispatch, release settings in manifest.yaml, a nightly tag without a pin. Real git upstreams, the real
`task`, the plat-telemetry fixture's stand-in `go` (whose binary says which commit it came from) and
the real CLI; nothing of the code under test is mocked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sync_tools.config import load_config
from sync_tools.relay.webhook import Ignored, UpstreamChange, classify
from tests.platform_fixture import PlatTelemetry, make_plat_telemetry

PLAT = "linux/amd64"


# ------------------------------------------------------------------------------------------ helpers


def st(pt: PlatTelemetry, *args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """The real CLI, run in the workspace as a user runs it."""
    return subprocess.run([sys.executable, "-m", "sync_tools", *args], cwd=cwd or pt.root, env=pt.env(**env),
                          capture_output=True, text=True, timeout=300)


def ok(p: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-1500:]}\n{p.stderr[-1500:]}"
    return p


def adopt(pt: PlatTelemetry) -> None:
    """Make the edits `sync-tools doctor` asks for on plat-telemetry as it stands (after which it
    reports 0 errors, 0 warnings): .gitignore, liftbridge's pin and upstream (the fork its Taskfile
    builds) and LB_VERSION's default, and the root Taskfile's include of grafana."""
    r = pt.root
    (r / ".gitignore").write_text((r / ".gitignore").read_text() + ".version-manifest.json\n")
    manifest = r / "manifest.yaml"
    manifest.write_text(manifest.read_text().replace("version: v1.10.0", "version: v1.9.0")
                        .replace(pt.upstreams["liftbridge"].url, pt.upstreams["liftbridge-fork"].url))
    lb = r / "liftbridge" / "Taskfile.yml"
    lb.write_text(lb.read_text().replace('default "master"}}', 'default "v1.9.0"}}'))
    root_tf = r / "Taskfile.yml"
    root_tf.write_text(root_tf.read_text().replace("  gh: ./gh\n", "  gh: ./gh\n  grafana: ./grafana\n"))
    subprocess.run(["git", "commit", "-qam", "adopt sync-tools: the doctor's fixes"], cwd=r, env=pt.env(),
                   check=True, timeout=30)
    doctor = st(pt, "doctor")
    assert doctor.returncode == 0 and "0 error(s), 0 warning(s)" in doctor.stderr, doctor.stdout + doctor.stderr


@pytest.fixture
def pt(tmp_path) -> PlatTelemetry:
    with make_plat_telemetry(tmp_path / "dev") as pt:
        adopt(pt)
        yield pt


def keys(pt: PlatTelemetry) -> dict[str, str]:
    ok(st(pt, "keys", "generate", "--out", "keys"))
    return {"SYNC_TOOLS_SIGNING_KEY": str(pt.root / "keys" / "release.key")}


# ---------------------------------------------------------------------------------------------------
# 1. A branch pin's planned version cannot be built where CI builds it. `plan --from-check` (README)
#    and a dispatch of a push both give arc/telegraf the head's sha as matrix.version, and
#    upstream.yml runs `build --only X --version <sha> --no-pin` in a fresh checkout (no .src). The
#    Taskfile's src:clone is `git clone --branch {{.ARC_VERSION}}`: git cannot clone a sha as a branch,
#    so every CI build of a branch pin fails (only a DEV machine with an old .src gets past it).


def test_a_branch_pins_planned_version_builds_in_a_fresh_checkout(pt: PlatTelemetry) -> None:
    head = pt.advance("arc")
    plan = json.loads(ok(st(pt, "plan", "--from-check", "--platform", PLAT)).stdout)
    [leg] = [i for i in plan["include"] if i["subsystem"] == "arc"]
    assert leg["version"] == head
    assert not (pt.root / "arc" / ".src").exists()  # what actions/checkout gives the build job
    # upstream.yml's "Build the dispatched version" step, word for word
    p = st(pt, "build", "--only", leg["subsystem"], "--platform", leg["platform"], "--version", leg["version"],
           "--no-pin")
    assert p.returncode == 0, p.stderr[-800:]
    assert pt.run_binary("arc")["commit"] == head


# ---------------------------------------------------------------------------------------------------
# 2. The relay ignores pushes to a pinned branch. manifest.yaml pins arc to `main` and telegraf to
#    `master`; check and doctor say each "follows branch main: latest is its head", yet a push to
#    arc's main is Ignored("branch push (arc follows tags, no branch configured)"): the event-driven
#    loop, the product's point ("no component polls"), never builds arc or telegraf.


def test_the_relay_acts_on_a_push_to_a_pinned_branch(pt: PlatTelemetry) -> None:
    cfg = load_config(pt.root / "manifest.yaml")
    doctor = ok(st(pt, "doctor", "--json"))
    assert any(f["subsystem"] == "arc" and f["code"] == "pin-branch" for f in json.loads(doctor.stdout)["findings"])
    head = pt.advance("arc")
    up = pt.upstreams["arc"].url
    push = {"ref": "refs/heads/main", "before": "0" * 39 + "1", "after": head, "deleted": False,
            "repository": {"full_name": "basekick-labs/arc", "clone_url": up, "html_url": up,
                           "default_branch": "main"}}
    [result] = classify(cfg, "push", push, "delivery-1", path_subsystem="arc")
    assert not isinstance(result, Ignored), result
    assert isinstance(result, UpstreamChange) and result.subsystem == "arc" and result.commit == head


# ---------------------------------------------------------------------------------------------------
# 3. `verify` on a USER machine with docs/agent.md's agent-only config checks nothing: it prints
#    nothing and exits 0 even when an installed binary no longer matches its .version (`status` on the
#    same root does see the drift). verify_installed iterates config.subsystems, empty there.


def _release_all(pt: PlatTelemetry, names: tuple[str, ...] = ("nats", "liftbridge", "arc", "telegraf",
                                                              "grafana")) -> dict[str, str]:
    env = keys(pt)
    for name in names:
        ok(st(pt, "build", "--only", name, "--platform", PLAT))
        ok(st(pt, "package", "--only", name, "--platform", PLAT))
    ok(st(pt, "release", "--only", ",".join(names), **env))
    return env


def _agent_config(tmp_path: Path, pt: PlatTelemetry, root: Path) -> Path:
    """docs/agent.md's "whole config of a USER machine running plat-telemetry", with the local store
    as its source and no process manager to reload."""
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(f"release:\n  public_key: {pt.root / 'keys' / 'release.pub'}\n"
                   f"agent:\n  root: {root}\n  source: {pt.root / '.releases'}\n  reload: none\n")
    return cfg


def test_verify_with_an_agent_only_config_checks_the_installed_binaries(pt: PlatTelemetry, tmp_path) -> None:
    _release_all(pt, ("nats", "arc"))
    root = tmp_path / "user-root"
    root.mkdir()
    cfg = _agent_config(tmp_path, pt, root)
    ok(st(pt, "agent", "--once", "--config", str(cfg), cwd=tmp_path))
    assert (root / "nats" / ".bin" / "nats-server").is_file()
    good = ok(st(pt, "verify", "--config", str(cfg), cwd=tmp_path))
    assert "nats" in good.stdout and "arc" in good.stdout, f"verify checked nothing: {good.stdout!r}"

    with (root / "nats" / ".bin" / "nats-server").open("a") as f:
        f.write("# tampered\n")
    # status sees it (its table and notes are its output: stdout)
    assert "DRIFT" in st(pt, "status", "--config", str(cfg), cwd=tmp_path).stdout
    bad = st(pt, "verify", "--config", str(cfg), cwd=tmp_path)
    assert bad.returncode == 1 and "nats" in bad.stderr, (bad.returncode, bad.stdout, bad.stderr)


# ---------------------------------------------------------------------------------------------------
# 4. The documented agent-only config on a plat-telemetry checkout puts grafana's new binary at
#    grafana/.bin/grafana-server, while plat-telemetry runs grafana/.bin/bin/grafana-server
#    (GF_BIN_PATH; `task grafana:run`). The agent reports "updated", status says 11.6.0, and the
#    service keeps running 11.4.0 for good. The manifest's `binary` is the name, not the path in .bin.


def test_the_documented_agent_config_updates_the_grafana_binary_plat_telemetry_runs(pt: PlatTelemetry,
                                                                                   tmp_path) -> None:
    env = keys(pt)
    ok(st(pt, "build", "--only", "grafana", "--platform", PLAT, "--version", "v11.6.0"))
    ok(st(pt, "package", "--only", "grafana", "--platform", PLAT))
    ok(st(pt, "release", "--only", "grafana", **env))

    with make_plat_telemetry(tmp_path / "user") as user:  # a USER machine: a plat-telemetry checkout
        user.task("-d", "grafana", "src:update")  # grafana as it is installed there today
        assert user.run_binary("grafana")["version"] == "v11.4.0"
        cfg = _agent_config(tmp_path, pt, user.root)
        p = ok(st(user, "agent", "--once", "--config", str(cfg), cwd=tmp_path))
        assert "grafana" in p.stdout and "updated" in p.stdout
        # what `task grafana:run` (process-compose's command) starts
        assert user.run_binary("grafana")["version"] == "v11.6.0", (
            "agent reported grafana updated, but plat-telemetry still runs .bin/bin/grafana-server 11.4.0; "
            f"the new one went to {sorted(str(q.relative_to(user.root)) for q in (user.root / 'grafana' / '.bin').rglob('grafana-server'))}")


# ---------------------------------------------------------------------------------------------------
# 5. After one dispatch released nats past its pin (upstream.yml builds dispatches with --no-pin, so
#    the repo's pin never moves), the workflow_dispatch "every subsystem" run releases nothing: the
#    release job's one `release --only nats,liftbridge,...` is refused whole because nats's pin build
#    is older, and the error's advice, --allow-downgrade, would roll every agent's nats back.


def test_a_rebuild_of_every_subsystem_still_releases_the_others(pt: PlatTelemetry, tmp_path) -> None:
    env = keys(pt)
    # a dispatch leg: nats v2.12.2, built --no-pin, released
    ok(st(pt, "build", "--only", "nats", "--platform", PLAT, "--version", "v2.12.2", "--no-pin"))
    ok(st(pt, "package", "--only", "nats", "--platform", PLAT))
    ok(st(pt, "release", "--only", "nats", **env))
    shutil.rmtree(pt.root / ".dist")  # the next run's artifacts are its own

    # workflow_dispatch with no subsystems: plan, build + package each leg, one release job
    event = tmp_path / "event.json"
    event.write_text(json.dumps({"inputs": {"subsystems": ""}}))
    plan = json.loads(ok(st(pt, "plan", "--event", str(event), "--platform", PLAT)).stdout)["include"]
    names = list(dict.fromkeys(i["subsystem"] for i in plan))
    assert "nats" in names and "liftbridge" in names
    for leg in plan:
        ok(st(pt, "build", "--only", leg["subsystem"], "--platform", leg["platform"]))
        ok(st(pt, "package", "--only", leg["subsystem"], "--platform", leg["platform"]))
    p = ok(st(pt, "release", "--only", ",".join(names), **env))
    assert "skipped nats v2.10.24" in p.stdout and "--allow-downgrade" in p.stdout, p.stdout

    manifest = json.loads((pt.root / ".releases" / "latest" / "manifest.json").read_text())
    held = {n: e["version"] for n, e in manifest["subsystems"].items()}
    assert held.get("nats") == "v2.12.2"  # not rolled back: right
    assert held.get("liftbridge") == "v1.9.0", f"nothing but nats in the release: {held}"


# ---------------------------------------------------------------------------------------------------
# 6. manifest.yaml's `release:` section is accepted (no unknown-key error) and silently ignored: the
#    store, public key and repo a user writes there are not used. On plat-telemetry as it stands (no
#    sync-tools.yaml) there is then no way to name release.repo, and upstream.yml's release job writes
#    the rolling release into the runner's own .releases/ and succeeds, publishing nothing.


def test_a_release_section_in_manifest_yaml_is_used(pt: PlatTelemetry) -> None:
    manifest = pt.root / "manifest.yaml"
    manifest.write_text(manifest.read_text() + "\nrelease:\n  store: .store-elsewhere\n"
                        "  public_key: keys/release.pub\n")
    env = keys(pt)
    ok(st(pt, "build", "--only", "nats", "--platform", PLAT))
    ok(st(pt, "package", "--only", "nats", "--platform", PLAT))
    p = st(pt, "release", "--only", "nats", **env)
    if p.returncode != 0:  # refusing the key with one clear error would do as well
        assert "release" in p.stderr and "Traceback" not in p.stderr, p.stderr
        return
    assert (pt.root / ".store-elsewhere" / "latest" / "manifest.json").is_file(), (
        f"released to {sorted(q.name for q in pt.root.glob('.*releases*'))} instead of .store-elsewhere")
    assert "release.public_key is not set" not in p.stderr, p.stderr


# ---------------------------------------------------------------------------------------------------
# 7. check without a pin takes nats's `nightly-20241215` tag for the newest release (20241215 read
#    as a major version) instead of v2.12.2; plan --from-check would then build the nightly. A pinless
#    subsystem is a documented state (doctor: pin-missing, a warning), and one a plat-telemetry user
#    reaches by adding a sync-tools.yaml (e.g. for release.public_key): the Taskfile-declared
#    subsystems then come without pins.


def test_check_without_a_pin_does_not_take_a_nightly_tag_for_the_newest(pt: PlatTelemetry, tmp_path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "sync-tools.yaml").write_text(f"subsystems:\n  nats:\n    upstream: {pt.upstreams['nats'].url}\n")
    p = subprocess.run([sys.executable, "-m", "sync_tools", "check", "--json"], cwd=ws, env=pt.env(),
                       capture_output=True, text=True, timeout=300)
    out = json.loads(p.stdout)
    assert out["nats"]["latest"] == "v2.12.2", out["nats"]
