"""Fleet benchmark (issue 15): 1,000 real agents, the real relay, real HTTP, on loopback.

The agents are :class:`sync_tools.agent.runner.Agent` instances run by :func:`sync_tools.agent.runner.serve`
(SSE subscription, the wave gate, reports: the same code as ``sync-tools agent``), many per process (``--hosts``
processes), each with its own install root and no real service: ``reload: none``, and the health check is a
command that runs the installed binary, a shell script that exits 0 for a good build and 1 for a bad one.
The relay is ``sync-tools relay`` in its own process (werkzeug, a thread per connection) with the 1,000
agents in its tokens file; the release store is served by a threaded HTTP server in this process, which
counts the downloads of each asset. Releases are signed into the store and announced with ``/notify``.

Measured, per release:

- ``waves``: a good build with a rollout policy (waves 1/10/50/100 %, min_healthy 1, ``--settle`` s): seconds
  from ``/notify`` until every agent reported it ``updated`` (and at 1/10/50/90 %);
- ``nowaves``: a good build without a policy, the same;
- ``bad``: a bad build with the policy (max_failures 1): how many agents ever ran it (installed it, failed
  the health check, rolled back) and how many downloaded it; the target is at most the first wave, 1 %.

Runs are interleaved (``--repeats`` rounds, each in a rotated order) on the same fleet. Rows go to
``bench/fleet/results.jsonl``, a plot of the rollouts over time to ``docs/img/fleet-rollout.png``.

Usage: .venv/bin/python bench/fleet/run.py [--agents 1000] [--hosts 20] [--repeats 3] [--settle 5]
(needs the ``bench`` extra for the plot: ``python3 run.py bench`` installs it).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from sync_tools.manifest import asset_name, parse_manifest  # noqa: E402
from sync_tools.versionfile import VersionInfo, write_version  # noqa: E402
from tests.agent_support import PLATFORM, ReleaseStore, StoreServer  # noqa: E402
from tests.relay_process import RelayProcess, agent_token, clean_env, write_relay_workspace  # noqa: E402

BINARY = "nats-server"
ASSET = asset_name(BINARY, PLATFORM)
OUT = Path(__file__).resolve().parent / "results.jsonl"
SECTION = Path(__file__).resolve().parent / "section.md"  # bench/run puts it in docs/benchmarks.md
IMG = ROOT / "docs" / "img" / "fleet-rollout.png"
#: A bad build fails its health check for this long, then is rolled back. Not shorter: with 1,000 agents
#: on 2 cores, a good build's health command (a fork and exec of sh) can take seconds to answer.
HEALTH_TIMEOUT = 10.0
TERMINAL = ("updated", "rolled_back", "failed")


class Store(StoreServer):
    """The tests' store server with a listen backlog for a thousand agents asking at once (the default 5
    would make most of them wait out TCP's SYN retries, 1 s, 3 s, 7 s ..., which a CDN never does)."""

    class _Server(StoreServer._Server):
        request_queue_size = 4096


def agent_ids(n: int) -> list[str]:
    return [f"agent-{i:04d}" for i in range(n)]


def binary(version: str, good: bool = True) -> bytes:
    """The "binary": a script the health check runs; the version makes each build's sha256 its own."""
    return f"#!/bin/sh\n# nats-server {version}\nexit {0 if good else 1}\n".encode()


def policy(settle: float) -> dict[str, Any]:
    return {"waves": [1, 10, 50, 100], "min_healthy": 1, "settle_seconds": settle, "max_failures": 1,
            "min_age_seconds": 0}


# --------------------------------------------------------------------------------- agent host process


def host(base: Path, roots: Path, first: int, count: int) -> int:
    """Run agents first..first+count-1 (install roots under *roots*) until stdin closes; one JSON line on
    stdout per reconcile."""
    from sync_tools.agent.gate import Gate
    from sync_tools.agent.report import Reporter
    from sync_tools.agent.runner import Agent, serve
    from sync_tools.config import load_config

    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s host{first} %(name)s %(message)s")
    config = load_config(base / "agent.yaml")
    entry = parse_manifest((base / "store" / "latest" / "manifest.json").read_bytes()).subsystems["nats"]
    v1 = binary(entry.version)
    out_lock = threading.Lock()
    agents: list[Agent] = []
    threads = []
    for aid in agent_ids(first + count)[first:]:
        root = roots / aid
        bin_dir = root / "nats" / ".bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        (bin_dir / BINARY).write_bytes(v1)
        (bin_dir / BINARY).chmod(0o755)
        write_version(bin_dir, VersionInfo(entry.commit, entry.built, hashlib.sha256(v1).hexdigest(), entry.version))
        token = agent_token(aid)
        agent = Agent(config, root=root, gate=Gate(config.agent.relay, token),
                      reporter=Reporter(config.agent.relay, token, agent=aid, platform=PLATFORM))

        def on_report(report: Any, aid: str = aid) -> None:
            line = json.dumps({"agent": aid, "t": time.time(), "serial": report.serial,
                               "results": [[r.action, r.new_sha] for r in report.results]})
            with out_lock:
                sys.stdout.write(line + "\n")
                sys.stdout.flush()

        t = threading.Thread(target=serve, kwargs=dict(agent=agent, relay=config.agent.relay, token=token,
                                                       on_report=on_report), daemon=True, name=aid)
        agents.append(agent)
        threads.append(t)
    for t in threads:
        t.start()
    sys.stdin.read()  # the driver closes it to stop us
    for a in agents:
        a.stop()
    os._exit(0)


# ------------------------------------------------------------------------------------------- driver


class Events:
    """Every host's reconcile lines, with the time each agent reported each action for each build."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_build: dict[str, dict[str, dict[str, float]]] = {}  # build -> action -> agent -> first time

    def read(self, stream: Any) -> None:
        for raw in stream:
            try:
                row = json.loads(raw)
            except ValueError:
                continue
            with self.lock:
                for action, sha in row["results"]:
                    if sha:
                        self.by_build.setdefault(sha, {}).setdefault(action, {}).setdefault(row["agent"], row["t"])

    def agents(self, build: str, action: str) -> dict[str, float]:
        with self.lock:
            return dict(self.by_build.get(build, {}).get(action, {}))


def wait(what: str, check: Any, timeout: float, procs: list[subprocess.Popen[Any]]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"a process exited ({p.args[:4]}) while waiting for {what}")
        with contextlib.suppress(Exception):
            v = check()
            if v:
                return v
        time.sleep(0.1)
    raise RuntimeError(f"timed out waiting for {what}")


def quantile_times(times: list[float], n: int) -> dict[str, float | None]:
    times = sorted(times)
    out: dict[str, float | None] = {}
    for q in (1, 10, 50, 90, 100):
        k = max(1, -(-q * n // 100))
        out[f"t{q}_s"] = round(times[k - 1], 2) if len(times) >= k else None
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--hosts", type=int, default=20, help="processes the agents are spread over (few agents per "
                    "process: hundreds of threads under one GIL queue behind each other at every I/O call)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--settle", type=float, default=5.0, help="the policy's settle_seconds between waves")
    ap.add_argument("--timeout", type=float, default=600.0, help="upper bound for one release")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile (goes into the doc)")
    ap.add_argument("--roots", type=Path, default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
                    help="where the agents' install roots go (default: /dev/shm: 1,000 agents sharing one disk "
                         "would measure its fsyncs, not the rollout; each real agent has its own disk)")
    ap.add_argument("--from-results", action="store_true",
                    help="only redo the plot and bench/fleet/section.md from bench/fleet/results.jsonl")
    ap.add_argument("--host", nargs=4, metavar=("BASE", "ROOTS", "FIRST", "COUNT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.host:
        return host(Path(args.host[0]), Path(args.host[1]), int(args.host[2]), int(args.host[3]))
    if args.from_results:
        meta, *rows = [json.loads(line) for line in OUT.read_text().splitlines() if line.strip()]
        meta.setdefault("note", args.note)
        meta["note"] = args.note or meta["note"]
        summary(rows, meta)
        if not args.no_plot:
            plot(rows, meta["agents"])
        SECTION.write_text(section(rows, meta))
        print(f"wrote {SECTION.relative_to(ROOT)}")
        return 0

    base = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    roots = Path(tempfile.mkdtemp(prefix="bench-fleet-roots-", dir=args.roots))
    ids = agent_ids(args.agents)
    store = ReleaseStore(base / "store", Ed25519PrivateKey.generate())
    ws = base / "relay"
    write_relay_workspace(ws, store.store, store.public_pem(), ids, {"nats": BINARY}, signing_key=store.key)
    store.publish("nats", BINARY, binary("v1"), "v1")
    relay = RelayProcess(ws)
    server = Store(store.dir).__enter__()
    (base / "agent.yaml").write_text(
        f"release:\n  tag: latest\n  public_key: {ws / 'keys' / 'release.pub'}\n"
        f"subsystems:\n  nats:\n    binary: {BINARY}\n    health: nats/.bin/{BINARY}\n"
        f"agent:\n  source: {server.url}\n  relay: {relay.url}\n  reload: none\n  platform: {PLATFORM}\n"
        f"  health_timeout: {HEALTH_TIMEOUT}\n  settle_seconds: 0\n")
    events = Events()
    hosts: list[subprocess.Popen[str]] = []
    rows: list[dict[str, Any]] = []
    started = time.time()
    load_before = os.getloadavg()
    try:
        relay.start()
        relay.notify()
        per = -(-args.agents // args.hosts)
        for h in range(args.hosts):
            first, count = h * per, min(per, args.agents - h * per)
            p = subprocess.Popen([sys.executable, __file__, "--host", str(base), str(roots), str(first), str(count)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 stderr=open(base / f"host{h}.log", "w"), env=clean_env())  # noqa: SIM115
            hosts.append(p)
            threading.Thread(target=events.read, args=(p.stdout,), daemon=True).start()
        procs: list[subprocess.Popen[Any]] = [*hosts, relay.proc]  # type: ignore[list-item]
        t = time.monotonic()
        wait("every agent subscribed", lambda: relay.connected_agents() == args.agents, 300, procs)
        v1 = hashlib.sha256(binary("v1")).hexdigest()
        wait("every agent reporting v1", lambda: relay.fleet_rows(
            "SELECT COUNT(*) FROM running WHERE sha256 = ?", v1)[0][0] == args.agents, 300, procs)
        print(json.dumps({"fleet_up_s": round(time.monotonic() - t, 1), "agents": args.agents}), flush=True)

        kinds = ["nowaves", "waves", "bad"]
        serial = 1
        for rep in range(args.repeats):
            order = kinds[rep % 3:] + kinds[: rep % 3]
            for kind in order:
                serial += 1
                version = f"v{serial}"
                good = kind != "bad"
                data = binary(version, good)
                build = hashlib.sha256(data).hexdigest()
                store.publish("nats", BINARY, data, version, rollout=None if kind == "nowaves" else policy(args.settle))
                server.reset()
                load = os.getloadavg()[0]
                t0 = time.time()
                relay.notify()
                row: dict[str, Any] = {"bench": f"fleet.{kind}", "round": rep + 1, "agents": args.agents,
                                       "version": version, "load1_before": round(load, 2)}
                if good:
                    # every agent tried it (a good build may still fail a health check that timed out
                    # under this load: counted, and then the run has no 100 % time)
                    wait(f"{version} tried everywhere", lambda b=build: len(set().union(
                        *(events.agents(b, a) for a in TERMINAL))) == args.agents, args.timeout, procs)
                    times = [x - t0 for x in events.agents(build, "updated").values()]
                    row.update(quantile_times(times, args.agents))
                    row["updated"] = len(times)
                    row["rolled_back"] = len(events.agents(build, "rolled_back"))
                    row["downloads"] = sum(1 for name, _ in server.requests if name == ASSET)
                    time.sleep(2)
                    row["relay_healthy_reports"] = relay.fleet_rows(
                        "SELECT COUNT(*) FROM outcomes WHERE build = ? AND healthy_at IS NOT NULL", build)[0][0]
                    if kind == "waves":
                        row["settle_s"] = args.settle
                        row["opened_s"] = [round(x - t0, 2) for x in json.loads(relay.fleet_rows(
                            "SELECT opened FROM rollouts WHERE build = ?", build)[0][0])]
                else:
                    wait(f"{version} halted", lambda b=build: (relay.rollout("nats", b) or {}).get("state")
                         == "halted", args.timeout, procs)
                    # quiet: nothing more reported about the build for a while (every rollback done)
                    def quiet(b: str = build) -> bool:
                        last = max([*events.agents(b, "rolled_back").values(), *events.agents(b, "held").values(),
                                    *events.agents(b, "failed").values(), 0.0])
                        return time.time() - last > 3 * HEALTH_TIMEOUT
                    wait(f"{version} quiet", quiet, args.timeout, procs)
                    ran = events.agents(build, "rolled_back") | events.agents(build, "failed") \
                        | events.agents(build, "updated")
                    row.update(ran_bad_build=len(ran), first_wave=-(-args.agents // 100),
                               downloads=sum(1 for name, _ in server.requests if name == ASSET),
                               held=len(events.agents(build, "held")),
                               halted_s=round(max(ran.values()) - t0, 2) if ran else None,
                               ran_times_s=sorted(round(x - t0, 2) for x in ran.values()))
                if good:
                    row["times_s"] = sorted(round(x, 2) for x in times)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if not k.endswith("times_s")}), flush=True)
                time.sleep(2)
    finally:
        for p in hosts:
            with contextlib.suppress(Exception):
                p.stdin.close()  # type: ignore[union-attr]
        for p in hosts:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
        relay.stop()
        server.__exit__(None, None, None)
        shutil.rmtree(roots, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"kept: {base}", file=sys.stderr)
    meta = {"bench": "fleet.meta", "agents": args.agents, "hosts": args.hosts, "repeats": args.repeats,
            "roots": str(args.roots),
            "settle_s": args.settle, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "wall_s": round(time.time() - started, 1), "load1_start": round(load_before[0], 2),
            "load1_end": round(os.getloadavg()[0], 2), "cpus": os.cpu_count(), "python": platform.python_version(),
            "commit": _commit(), "note": args.note}
    with OUT.open("w") as f:
        for r in [meta, *rows]:
            f.write(json.dumps(r) + "\n")
    summary(rows, meta)
    if not args.no_plot:
        plot(rows, args.agents)
    SECTION.write_text(section(rows, meta))
    print(f"wrote {SECTION.relative_to(ROOT)}")
    return 0


def _commit() -> str | None:
    with contextlib.suppress(Exception):
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    return None


def summary(rows: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    print(f"\n{meta['agents']} agents over {meta['hosts']} processes, {meta['repeats']} rounds, settle "
          f"{meta['settle_s']} s; load average {meta['load1_start']} -> {meta['load1_end']}")
    for kind in ("nowaves", "waves"):
        got = [r["t100_s"] for r in rows if r["bench"] == f"fleet.{kind}" and r["t100_s"] is not None]
        if got:
            print(f"  {kind:<8} release -> 100% updated: {min(got):.1f}-{max(got):.1f} s (runs: {got})")
    bad = [r for r in rows if r["bench"] == "fleet.bad"]
    if bad:
        ran = [r["ran_bad_build"] for r in bad]
        print(f"  bad      agents that ran it: {min(ran)}-{max(ran)} (first wave: {bad[0]['first_wave']})")


def _range(xs: list[float], unit: str = " s") -> str:
    if not xs:
        return "-"
    fmt = "{:.0f}" if all(float(x).is_integer() for x in xs) else "{:.1f}"
    lo, hi = fmt.format(min(xs)), fmt.format(max(xs))
    return f"{lo}{unit}" if lo == hi else f"{lo}-{hi}{unit}"


def section(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The docs/benchmarks.md section for this run."""
    n = meta["agents"]
    waves = [r for r in rows if r["bench"] == "fleet.waves"]
    plain = [r for r in rows if r["bench"] == "fleet.nowaves"]
    bad = [r for r in rows if r["bench"] == "fleet.bad"]
    t_w = [r["t100_s"] for r in waves if r.get("t100_s") is not None]
    t_p = [r["t100_s"] for r in plain if r.get("t100_s") is not None]
    lines = [
        f"## 4. Fleet: staged rollouts with {n:,} agents", "",
        f"`bench/fleet/run.py`: {n:,} real agents (`Agent` + `serve`: SSE, the wave gate, reports) in "
        f"{meta['hosts']} processes, each with its own install root (on tmpfs: one shared disk would measure "
        "its fsyncs), no service (`reload: none`; the health check runs the installed binary, a script that "
        f"exits 0, or 1 for the bad build; health timeout {HEALTH_TIMEOUT:g} s); the relay as `sync-tools relay` "
        f"with the {n:,} agents in its tokens file; the store on a threaded HTTP server; loopback. "
        f"{meta['repeats']} rounds, the three kinds of release interleaved in a rotated order on the same fleet. "
        f"Policy: waves 1/10/50/100 %, min_healthy 1, settle_seconds {meta['settle_s']:g}, max_failures 1. "
        f"Run {meta['started']} at commit {meta['commit']}, {meta['wall_s']:.0f} s; 1-minute load average "
        f"{meta['load1_start']} at the start, {meta['load1_end']} at the end "
        "(it counts runnable threads: the agents' own threads are most of it).", "",
    ]
    if meta.get("note"):
        lines += [f"Also running on the machine meanwhile: {meta['note']}", ""]
    lines += [
        f"| release | time to 100 % of {n:,} (range over rounds) |", "|---|---|",
        f"| good build, no rollout policy | {_range(t_p)} |",
        f"| good build, waves 1/10/50/100 % | {_range(t_w)} |",
        "| cost of the waves (difference of the means) | "
        + (f"{sum(t_w) / len(t_w) - sum(t_p) / len(t_p):.1f} s |" if t_w and t_p else "- |"),
        f"| bad build: agents that ever ran it | {_range([r['ran_bad_build'] for r in bad], '')} of {n:,} "
        f"(target: at most the first wave, {-(-n // 100)}) |",
        f"| bad build: agents that downloaded it | {_range([r['downloads'] for r in bad], '')} |", "",
        "Every run:", "",
        "| release | round | t1 % | t10 % | t50 % | t90 % | t100 % | downloads | healthy reports the relay got "
        "| waves opened at (s) |", "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kind = r["bench"].split(".", 1)[1]
        if kind == "bad":
            lines.append(f"| bad | {r['round']} | ran it: {r['ran_bad_build']} | held: {r['held']} | | | "
                         f"last rollback at {r['halted_s']} | {r['downloads']} | | |")
            continue
        lines.append(f"| {kind} | {r['round']} | {r['t1_s']} | {r['t10_s']} | {r['t50_s']} | {r['t90_s']} | "
                     f"{r['t100_s']} | {r['downloads']} | {r['relay_healthy_reports']} | "
                     f"{', '.join(str(x) for x in r.get('opened_s', [])) or '-'} |")
    if t_w and t_p:
        policy_wait = 3 * meta["settle_s"]
        gaps = [r["t100_s"] - r["opened_s"][-1] for r in waves if r.get("opened_s")]
        lost = [n - r["relay_healthy_reports"] for r in [*waves, *plain]]
        lines += ["", "Reading it:", "",
                  f"- Of the waves' cost, {policy_wait:g} s is the policy's own waiting (three settle times). "
                  "The rest is the herd each wave opening sets off: the relay fans out a release event, "
                  f"all {n:,} agents reconcile at once, ask `GET /rollout` and the held ones report `held`. "
                  "On this 2-core host the relay (werkzeug, one process) answers part of them after the agents' "
                  "5 s gate timeout; those agents hold with a retry and back off (1, 2, 4 ... s), which is the "
                  f"tail after the last wave opened: {_range(gaps)}.",
                  f"- Reports are best effort (3 s timeout, never retried): {_range(lost, '')} of the {n:,} "
                  "`updated` reports per release did not reach the relay in these runs. A rollout only needs "
                  "`min_healthy` of them per wave, and a bad build's few failures arrive outside the herd.",
                  "- A bad build reached the first wave only, every round: the other agents asked, were told to "
                  "wait, and never downloaded it (the store's count of asset downloads)."]
    lines += ["", f"![agents on the new build against time since the release, with and without waves; "
              f"agents that ran the bad build]({IMG.relative_to(ROOT / 'docs').as_posix()})", ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [2, 1]})
    styles = {"waves": ("tab:blue", "with waves 1/10/50/100 %"), "nowaves": ("tab:orange", "no rollout policy")}
    seen: set[str] = set()
    for r in rows:
        kind = r["bench"].split(".", 1)[1]
        if kind == "bad":
            continue
        color, label = styles[kind]
        ts = r["times_s"]
        ax.step([0, *ts], [0, *range(1, len(ts) + 1)], where="post", color=color, alpha=0.8,
                label=None if kind in seen else label)
        seen.add(kind)
        for x in r.get("opened_s", []):
            ax.axvline(x, color=color, alpha=0.15, linewidth=0.8)
    ax.set_xlabel("seconds since the release (/notify)")
    ax.set_ylabel(f"agents running the new build (of {n})")
    ax.set_title("Good build: rollout over time")
    ax.legend(fontsize=8, loc="lower right")
    for i, r in enumerate(x for x in rows if x["bench"] == "fleet.bad"):
        ts = r["ran_times_s"]
        bx.step([0, *ts], [0, *range(1, len(ts) + 1)], where="post", color="tab:red", alpha=0.8,
                label="agents that ran it (at their rollback)" if i == 0 else None)
    bx.axhline(n / 100, color="grey", linestyle=":", linewidth=1, label="first wave (1 %)")
    bx.set_ylim(0, max(n / 100 * 1.6, 1))
    bx.set_xlabel("seconds since the release")
    bx.set_ylabel("agents")
    bx.set_title("Bad build: halted in wave 1")
    bx.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    IMG.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG, dpi=110)
    plt.close(fig)
    print(f"plot: {IMG.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.exit(main())
