"""Coverage-guided fuzzing with atheris (libFuzzer) of the webhook parser and the archive extractor.

Hypothesis (``fuzz_webhook``, ``fuzz_archive``) explores shapes we describe; atheris mutates bytes
guided by the branches they reach in our instrumented modules, finding shapes we did not think of.
libFuzzer ends the process when it is done, so each target runs in a subprocess::

    python -m tests.reliability.fuzz_atheris webhook CORPUS_DIR -runs=20000

:func:`run_atheris` does that, seeding the corpus (GitHub's example payloads; a valid and a few
hostile archives), and returns a :class:`FuzzReport`: a Python exception other than the project's own
errors is a crash, reported as a violation.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.reliability.fuzz_common import FuzzReport

TARGETS = ("webhook", "archive")


def available() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def _seed(target: str, corpus: Path) -> None:
    corpus.mkdir(parents=True, exist_ok=True)
    if target == "webhook":
        from tests.relay_support import FIXTURES

        for p in sorted(FIXTURES.glob("*.json")):
            event = p.name.split(".")[0]
            (corpus / p.name).write_bytes(event.encode() + b"\n" + p.read_bytes())
    else:
        import tarfile

        from tests.agent_support import file_member, special_member, tar_gz

        (corpus / "good").write_bytes(tar_gz([file_member("nats-server", b"#!/bin/sh\necho hi\n")]))
        (corpus / "two").write_bytes(tar_gz([file_member("nats-server", b"x"), file_member("b", b"y")]))
        (corpus / "link").write_bytes(tar_gz([special_member("nats-server", tarfile.SYMTYPE, linkname="/etc")]))
        (corpus / "dotdot").write_bytes(tar_gz([file_member("../nats-server", b"x")]))


def run_atheris(target: str, runs: int, *, seed: int = 1, timeout: float = 900.0,
                artifacts: Path | None = None) -> FuzzReport:
    """Fuzz *target* ("webhook" or "archive") for *runs* inputs in a subprocess; a crashing input is
    saved under *artifacts* (default: a kept temporary directory) and named in the violation. Raises
    RuntimeError when atheris is not installed."""
    if not available():
        raise RuntimeError("atheris is not installed (pip install atheris; Linux x86_64 wheels)")
    started = time.monotonic()
    keep = artifacts or Path(tempfile.mkdtemp(prefix="atheris-artifacts-"))
    keep.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="atheris-") as tmp:
        corpus = Path(tmp) / "corpus"
        _seed(target, corpus)
        proc = subprocess.run(
            [sys.executable, "-m", "tests.reliability.fuzz_atheris", target, str(corpus), f"-runs={runs}",
             f"-seed={seed}", "-max_len=65536", "-rss_limit_mb=2048", f"-artifact_prefix={keep}/"],
            capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).resolve().parents[2])
        corpus_size = len(list(corpus.iterdir()))
    out = proc.stderr
    done = re.findall(r"Done (\d+) runs", out)
    cov = re.findall(r"cov: (\d+)", out)
    violations: tuple[str, ...] = ()
    if proc.returncode != 0 or not done:
        crashes = sorted(str(p) for p in keep.glob("crash-*"))
        tb = out.rfind("Traceback (most recent call last)")
        tail = out[tb:][:1500] if tb >= 0 else out[-1500:]
        violations = (f"exit {proc.returncode}, input saved as {crashes or 'nothing'}: {tail}",)
    elif artifacts is None:
        keep.rmdir()
    outcomes = {"runs": int(done[-1]) if done else 0, "coverage edges": int(cov[-1]) if cov else 0,
                "corpus entries": corpus_size}
    return FuzzReport(f"atheris: {target}", outcomes["runs"], outcomes, round(time.monotonic() - started, 1),
                      violations)


# ------------------------------------------------------------------------------ in the subprocess


def _webhook_target():  # type: ignore[no-untyped-def]
    import atheris

    with atheris.instrument_imports(include=["sync_tools"]):
        from sync_tools.config import load_config
        from sync_tools.relay import webhook as wh
    from tests.relay_support import write_config

    root = Path(tempfile.mkdtemp(prefix="atheris-cfg-"))
    config = write_config(root)
    assert load_config(root / "sync-tools.yaml") is not None
    secret = b"atheris-secret"
    ctypes = [None, "application/json", "application/x-www-form-urlencoded", "text/plain"]

    def one(data: bytes) -> None:
        event, _, body = data.partition(b"\n")
        event_s = event.decode("latin-1")[:64]
        ctype = ctypes[len(body) % len(ctypes)] if event_s != "form" else "application/x-www-form-urlencoded"
        try:
            # signed validly, so the bytes reach the parser behind the signature check
            wh.verify_signature(secret, body, wh.sign(secret, body))
            payload = wh.decode_body(body, ctype)
            sub = None if len(body) % 3 else "nats"
            wh.classify(config, event_s, payload, "atheris-delivery", sub)
        except wh.WebhookError:
            pass

    return one


def _archive_target():  # type: ignore[no-untyped-def]
    import atheris

    with atheris.instrument_imports(include=["sync_tools"]):
        from sync_tools.agent.extract import extract_binary
    from sync_tools.errors import DataError

    work = Path(tempfile.mkdtemp(prefix="atheris-ar-"))
    src = work / "asset.tar.gz"
    dest = work / "out" / ".nats-server.staged"
    dest.parent.mkdir()

    def one(data: bytes) -> None:
        src.write_bytes(data)
        try:
            extract_binary(src, "nats-server", dest, max_bytes=1 << 20)
        except DataError:
            if list(dest.parent.iterdir()):
                raise AssertionError("a refused archive left a file behind") from None
            return
        dest.unlink()

    return one


def main(argv: list[str]) -> None:
    import atheris

    target = argv[1]
    fn = {"webhook": _webhook_target, "archive": _archive_target}[target]()
    atheris.Setup([argv[0], *argv[2:]], fn)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
