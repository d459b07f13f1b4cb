"""The docs match the code (issue #18): every shell snippet marked ``<!-- runnable -->`` runs, each in an
empty directory with the venv's commands on PATH; the architecture doc is the project's own; measured
figures live in docs/benchmarks.md only; the Actions example sets up what its default build needs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "relay" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = re.compile(r"<!-- runnable -->\s*\n```sh\n(.*?)```", re.DOTALL)


def snippets() -> list[tuple[str, int, str]]:
    out = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for m in RUNNABLE.finditer(text):
            out.append((str(doc.relative_to(ROOT)), text.count("\n", 0, m.start()) + 1, m.group(1)))
    return out


def test_there_are_runnable_snippets() -> None:
    assert {doc for doc, _, _ in snippets()} >= {"README.md", "relay/README.md"}


@pytest.mark.parametrize("doc, line, code", snippets(), ids=lambda v: str(v) if not isinstance(v, str) or
                         "\n" not in v else "snippet")
def test_runnable_snippet(tmp_path: Path, doc: str, line: int, code: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SYNC_TOOLS_", "GITHUB_"))}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{doc}:{line}: exit {proc.returncode}\n{proc.stdout}{proc.stderr}"


def test_the_architecture_doc_is_the_projects_own() -> None:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    for outside in ("../shared", "/work/", "closing note", "yours to design", "as given", "these machines"):
        assert outside not in text, outside
    for link in re.findall(r"\]\(([^)#]+)", text):  # relative links point into the repository
        if not link.startswith(("http://", "https://")):
            assert (ROOT / "docs" / link).resolve().is_relative_to(ROOT), link


def test_measured_figures_are_only_in_benchmarks_md() -> None:
    """Throughput, latency and memory figures appear in docs/benchmarks.md; elsewhere they are referenced."""
    measured = re.compile(r"\bp99\b[^|\n]{0,20}\d|\d[\d,.]*\s*(?:deliveries/s|KiB per|/s under)|\d+(?:\.\d+)?x\b")
    for doc in DOCS:
        if doc.name == "benchmarks.md":
            continue
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            assert not measured.search(line), f"{doc.relative_to(ROOT)}:{n}: {line}"


def test_the_actions_example_sets_up_go_and_task() -> None:
    text = (ROOT / "docs" / "actions.md").read_text(encoding="utf-8")
    example = text[text.index("### Usage"):]
    assert "actions/setup-go@" in example and "arduino/setup-task@" in example
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "needs [Task](https://taskfile.dev)" in readme
