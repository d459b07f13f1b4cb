#!/usr/bin/env python3
"""Extract the part of GitHub's OpenAPI description that the test GitHub API server implements.

GitHub publishes its REST API description in the npm package ``@octokit/openapi``
(``generated/api.github.com.json``, ~13 MB). The test server (tests/servers/github_api.py) validates
every JSON body it sends against the response schemas of the operations it implements; this script
keeps just those operations and every component they reference, recursively, so the repository
carries a small, reviewable, regenerable file instead of the whole description.

Usage (regenerates tests/fixtures/github-openapi/api.github.com.subset.json):

    mkdir -p /tmp/oa && cd /tmp/oa && npm install @octokit/openapi
    python tools/extract_openapi_subset.py /tmp/oa/node_modules/@octokit/openapi

Examples (``examples`` / ``example`` values) are dropped: they are documentation, not contract, and
make up most of the size.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# (HTTP method, path template) of every operation tests/servers/github_api.py answers.
OPERATIONS: tuple[tuple[str, str], ...] = (
    ("get", "/repos/{owner}/{repo}"),
    ("get", "/repos/{owner}/{repo}/releases"),
    ("post", "/repos/{owner}/{repo}/releases"),
    ("get", "/repos/{owner}/{repo}/releases/latest"),
    ("get", "/repos/{owner}/{repo}/releases/tags/{tag}"),
    ("get", "/repos/{owner}/{repo}/releases/{release_id}"),
    ("patch", "/repos/{owner}/{repo}/releases/{release_id}"),
    ("delete", "/repos/{owner}/{repo}/releases/{release_id}"),
    ("get", "/repos/{owner}/{repo}/releases/{release_id}/assets"),
    ("post", "/repos/{owner}/{repo}/releases/{release_id}/assets"),
    ("get", "/repos/{owner}/{repo}/releases/assets/{asset_id}"),
    ("patch", "/repos/{owner}/{repo}/releases/assets/{asset_id}"),
    ("delete", "/repos/{owner}/{repo}/releases/assets/{asset_id}"),
    ("get", "/repos/{owner}/{repo}/tags"),
    ("post", "/repos/{owner}/{repo}/dispatches"),
    ("get", "/rate_limit"),
)

# Components every error answer uses even where an operation does not list that status.
ALWAYS_COMPONENTS = ("#/components/schemas/basic-error", "#/components/schemas/validation-error")

PACKAGE = "@octokit/openapi"
DESCRIPTION_FILE = "generated/api.github.com.json"


def _strip_examples(node: object) -> object:
    """A copy of *node* without ``example``/``examples`` keys (documentation only)."""
    if isinstance(node, dict):
        return {k: _strip_examples(v) for k, v in node.items() if k not in ("example", "examples")}
    if isinstance(node, list):
        return [_strip_examples(v) for v in node]
    return node


def _refs(node: object) -> set[str]:
    """Every ``$ref`` string inside *node*."""
    found: set[str] = set()
    stack = [node]
    while stack:
        cur = stack.pop()
        if isinstance(cur, dict):
            ref = cur.get("$ref")
            if isinstance(ref, str):
                found.add(ref)
            stack.extend(cur.values())
        elif isinstance(cur, list):
            stack.extend(cur)
    return found


def _pointer_get(doc: dict, ref: str) -> object:
    if not ref.startswith("#/"):
        raise ValueError(f"only local references are supported, got {ref!r}")
    cur: object = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(f"dangling reference {ref!r}")
        cur = cur[part]
    return cur


def extract(description: dict, operations: tuple[tuple[str, str], ...] = OPERATIONS) -> dict:
    """The subset of *description* holding *operations* and the components they reference.

    Raises KeyError when an operation or a referenced component does not exist.
    """
    paths: dict[str, dict] = {}
    for method, path in operations:
        item = description["paths"][path]
        if method not in item:
            raise KeyError(f"{method.upper()} {path} is not in the description")
        out = paths.setdefault(path, {})
        if "parameters" in item:
            out["parameters"] = _strip_examples(item["parameters"])
        out[method] = _strip_examples(item[method])

    components: dict[str, dict] = {}
    pending = _refs(paths) | set(ALWAYS_COMPONENTS)
    seen: set[str] = set()
    while pending:
        ref = pending.pop()
        if ref in seen:
            continue
        seen.add(ref)
        _, _, kind, name = ref.split("/", 3)
        value = _strip_examples(_pointer_get(description, ref))
        components.setdefault(kind, {})[name] = value
        pending |= _refs(value) - seen

    return {
        "openapi": description["openapi"],
        "info": {
            "title": description["info"].get("title"),
            "version": description["info"].get("version"),
            "description": f"Subset of {PACKAGE} {DESCRIPTION_FILE} for the test GitHub API server",
        },
        "servers": description.get("servers", []),
        "paths": {p: paths[p] for p in sorted(paths)},
        "components": {k: dict(sorted(v.items())) for k, v in sorted(components.items())},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package_dir", type=Path, help="node_modules/@octokit/openapi directory")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "tests/fixtures/github-openapi/api.github.com.subset.json",
    )
    args = parser.parse_args(argv)
    pkg = json.loads((args.package_dir / "package.json").read_text())
    description = json.loads((args.package_dir / DESCRIPTION_FILE).read_text())
    subset = extract(description)
    subset["info"]["x-source"] = {"package": pkg["name"], "version": pkg["version"], "file": DESCRIPTION_FILE}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(subset, indent=1, sort_keys=False) + "\n")
    tmp.replace(args.out)
    n_schemas = len(subset["components"].get("schemas", {}))
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes, {len(OPERATIONS)} operations, {n_schemas} schemas)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
