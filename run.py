#!/usr/bin/env python3
"""Bootstrap for a fresh machine with only python3: make .venv, install sync-tools, run a job.

    python3 run.py demo      # the end-to-end demo on loopback (sync-tools demo)
    python3 run.py test      # the test suite (pytest), with the test extra installed
    python3 run.py bench     # every benchmark (bench/run)
    python3 run.py sync-tools ARGS...   # any sync-tools command inside the venv

The install is redone only when pyproject.toml changes (a stamp file in .venv records its hash).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("SYNC_TOOLS_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
# A plain path entry in a .pth file, not setuptools' default import-hook finder: the finder's module
# (pathlib, importlib.util, ...) ran at every interpreter start, ~25 ms of each sync-tools command.
# "strict" would also be a plain path, but to a link tree that misses modules added later. (setuptools
# calls compat transitional and warns; the finder stays its default for a flat layout.)
EDITABLE_MODE = "compat"


def ensure_venv(extras: str) -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - run.py may be started by an older python3
        sys.exit(f"sync-tools needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    if not (BIN / "python").exists():
        print(f"creating {VENV} ...", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / ".sync-tools-install"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()
                          + EDITABLE_MODE.encode()).hexdigest()
    if stamp.exists() and stamp.read_text() == want:
        return
    spec = f"{ROOT}[{extras}]" if extras else str(ROOT)
    print(f"installing sync-tools{f'[{extras}]' if extras else ''} into {VENV} ...", file=sys.stderr)
    subprocess.run([str(BIN / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    "--config-settings", f"editable_mode={EDITABLE_MODE}", "-e", spec], check=True)
    stamp.write_text(want)


def main(argv: list[str]) -> int:
    job = argv[0] if argv else "help"
    rest = argv[1:]
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    # One extras set for demo and tests, so switching between them does not reinstall.
    if job == "demo":
        ensure_venv("test,prod")
        cmd = [str(BIN / "sync-tools"), "demo", *rest]
    elif job == "test":
        ensure_venv("test,prod")
        # test files run side by side in three workers (pytest-xdist), each file whole in one worker so
        # its module fixtures are made once; `python3 run.py test -n 0` runs them one after another
        workers = [] if any(a == "-n" or a.startswith(("-n", "--numprocesses")) for a in rest) else \
            ["-n", "3", "--dist", "loadfile"]
        cmd = [str(BIN / "python"), "-m", "pytest", *workers, *rest]
    elif job == "bench":
        ensure_venv("test,prod,bench")
        cmd = [str(BIN / "python"), str(ROOT / "bench" / "run"), *rest]
    elif job == "sync-tools":
        ensure_venv("test,prod")
        cmd = [str(BIN / "sync-tools"), *rest]
    else:
        print(__doc__.strip())
        return 0 if job in ("help", "-h", "--help") else 2
    return subprocess.call(cmd, cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
