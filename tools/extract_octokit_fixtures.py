#!/usr/bin/env python3
"""Copy the recordings of real api.github.com traffic that sync-tools' GitHub tests check against.

The npm package ``@octokit/fixtures`` holds recordings of real GitHub REST traffic, one folder per
scenario under ``scenarios/api.github.com/``. ``raw-fixture.json`` is what GitHub sent (status,
headers in order, bodies; only the token is zeroed), including each scenario's setup requests;
``normalized-fixture.json`` rewrites ids, dates and counters (``x-ratelimit-reset`` becomes a
millisecond value GitHub never sends), so only the raw recordings are kept.

This script copies the raw recordings of :data:`SCENARIOS` byte for byte into
``tests/fixtures/octokit/<scenario>.json`` and writes ``SOURCE.json`` (package, version, the sha256
of each copied file), which tests/test_github_recordings.py checks, so a hand edit of a recording
fails the suite.

Usage (regenerates tests/fixtures/octokit/):

    mkdir -p /tmp/ofx && cd /tmp/ofx && npm pack @octokit/fixtures@23.1.2 && tar xzf octokit-fixtures-23.1.2.tgz
    python tools/extract_octokit_fixtures.py /tmp/ofx/package
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

PACKAGE = "@octokit/fixtures"

# scenario -> what sync-tools' tests take from it
SCENARIOS: dict[str, str] = {
    "release-assets": "create a release (Location), get it by tag, upload to the uploads host (201), list, get, "
    "rename with PATCH, delete (204); rate-limit headers on every api.github.com answer",
    "release-assets-conflict": "an upload whose name exists: 422 already_exists from the uploads host; "
    "list, delete, upload again",
    "errors": "a 422 Validation Failed answer of api.github.com",
    "paginate-issues": "Link headers of a 13-item list read 3 per page (first, middle and last pages)",
    "rename-repository": "a renamed repository: 301 (GET) and 307 (PATCH) to /repositories/{id}",
    "get-repository": "GET /repos/{owner}/{repo}",
}

OUT = Path(__file__).resolve().parent.parent / "tests/fixtures/octokit"


def extract(package_dir: Path, out: Path = OUT) -> dict:
    """Copy the raw recordings of SCENARIOS from the unpacked package at *package_dir* into *out*;
    returns the SOURCE.json written. Raises SystemExit naming what is missing."""
    meta_path = package_dir / "package.json"
    if not meta_path.is_file():
        raise SystemExit(f"{package_dir}: no package.json (give the unpacked {PACKAGE} package folder)")
    meta = json.loads(meta_path.read_text())
    if meta.get("name") != PACKAGE:
        raise SystemExit(f"{package_dir}: package is {meta.get('name')!r}, not {PACKAGE}")
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for scenario in SCENARIOS:
        src = package_dir / "scenarios/api.github.com" / scenario / "raw-fixture.json"
        if not src.is_file():
            raise SystemExit(f"{src}: missing from {PACKAGE}@{meta['version']}")
        data = src.read_bytes()
        json.loads(data)  # a recording that does not parse is not copied
        tmp = out / f".{scenario}.json.tmp"
        tmp.write_bytes(data)
        tmp.replace(out / f"{scenario}.json")
        files[f"{scenario}.json"] = {
            "from": f"scenarios/api.github.com/{scenario}/raw-fixture.json",
            "sha256": hashlib.sha256(data).hexdigest(),
            "used_for": SCENARIOS[scenario],
        }
    source = {"package": PACKAGE, "version": meta["version"], "repository": meta.get("repository"),
              "license": meta.get("license"), "files": files}
    tmp = out / ".SOURCE.json.tmp"
    tmp.write_text(json.dumps(source, indent=2, sort_keys=True) + "\n")
    tmp.replace(out / "SOURCE.json")
    return source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package_dir", type=Path, help=f"the unpacked {PACKAGE} package (its package.json folder)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    source = extract(args.package_dir, args.out)
    print(f"copied {len(source['files'])} recordings of {PACKAGE}@{source['version']} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
