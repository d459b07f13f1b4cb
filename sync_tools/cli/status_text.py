"""``sync-tools status`` as text: a header row, one row per subsystem, then what needs attention."""

from __future__ import annotations

from typing import Any


def _runs(s: dict[str, Any]) -> str:
    exe = s.get("exe")
    if not exe:
        return "?"
    if exe["is_installed"]:
        return "installed"
    if exe["is_installed"] is None:
        return "? (a script)"
    return f"other {exe['sha256'][:12]}" + (" (replaced)" if exe["path"].endswith(" (deleted)") else "")


def _notes(s: dict[str, Any]) -> list[str]:
    notes = []
    if s["drift"]:
        if s["installed"] or s.get("version_file_error"):
            notes.append("DRIFT: .version does not match the binary")
        else:  # as `verify` says missing-binary
            notes.append(f"DRIFT: missing binary: .version says {s['version'] or '?'}, the binary is gone")
    if s.get("interrupted"):
        i = s["interrupted"]
        notes.append(f"interrupted {i.get('kind', 'install')} of {str(i.get('new_sha256'))[:12]}: the next agent run "
                     "finishes it" if "error" not in i else f"install journal unreadable: {i['error']}")
    if s.get("reload_failed"):
        notes.append(f"restart failed ({s['reload_failed']}): the next agent run restarts it again")
    if s.get("held_back"):
        notes.append(f"held back: build {s['held_back']['build'][:12]} {s['held_back']['reason']}")
    if s.get("held"):
        notes.append(f"held back: build {s['held']['build'][:12]} by the rollout: {s['held']['reason']}")
    exe = s.get("exe")
    if exe and exe["is_installed"] is False:
        notes.append(f"the process runs {exe['path']} (sha256 {exe['sha256'][:12]}), not the installed binary")
    return notes


def status_lines(info: dict[str, dict[str, Any]]) -> list[str]:
    rows = [("SUBSYSTEM", "VERSION", "SHA256", "STATE", "RUNS")]
    notes: list[str] = []
    for name, s in info.items():
        rows.append((name, s["version"] or "-", (s["sha256"] or "-")[:12], s["running"].get("status", "?"), _runs(s)))
        notes += [f"{name}: {n}" for n in _notes(s)]
    # one state file for the root: each subsystem carries its error, shown once
    state_error = next((s["state_error"] for s in info.values() if s.get("state_error")), None)
    if state_error:
        notes.append(f"every agent run fails, held-back builds unknown: {state_error}")
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    out = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4] for r in rows]
    return out + notes
