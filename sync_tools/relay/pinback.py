"""Putting a subsystem's pin back when a local build's release did not succeed.

``sync-tools build --version V`` moves the pin to V as soon as the build works; the relay's local
dispatch then packages and releases. When either of those fails (or the relay stops them), the pin
would name a version that was never released, and the next plan would not rebuild it. The relay
notes the pin's spots before the build and puts back their values: only those values, never the
whole file (builds of other subsystems may have moved their own pins meanwhile).
"""

from __future__ import annotations

import logging
from pathlib import Path

from sync_tools.config import PinSource, load_config
from sync_tools.errors import SyncToolsError

log = logging.getLogger(__name__)


def saved_pins(config_path: Path, name: str) -> list[tuple[PinSource, str]]:
    """The spots that hold *name*'s pin (the pin, and the Taskfile var that repeats it) and their
    values now. Empty when the config cannot be read (the build then fails on its own)."""
    from sync_tools.build import _same_spot, _version_spot

    try:
        config = load_config(config_path)
    except SyncToolsError as e:
        log.warning("cannot note the pin of %s before its build: %s", name, e)
        return []
    sub = config.subsystems.get(name)
    if sub is None:
        return []
    out: list[tuple[PinSource, str]] = []
    if sub.pin is not None and sub.current is not None:
        out.append((sub.pin, sub.current))
    spot = _version_spot(config, sub)
    if spot is not None and spot[1] is not None and not spot[2] and not _same_spot(spot[0], sub.pin):
        out.append((spot[0], spot[1]))
    return out


def put_back(saved: list[tuple[PinSource, str]]) -> list[str]:
    """Write each saved value back to its spot; returns what was moved back (``path key -> value``).
    A spot that cannot be written is logged and skipped (the others are still put back)."""
    from sync_tools import pins

    moved = []
    for pin, value in saved:
        try:
            if pins.update_pin(pin, value):
                moved.append(f"{Path(pin.path).name} {pin.key} -> {value}")
        except SyncToolsError as e:
            log.error("cannot put back the pin %s in %s: %s", pin.key, pin.path, e)
    return moved
