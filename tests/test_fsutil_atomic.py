"""fsutil's atomic writes on a real disk: the temporary file beside the target is private, a failed
write leaves the old content and no temporary file, concurrent writers each land whole."""

from __future__ import annotations

import stat
import threading

import pytest

from sync_tools.fsutil import atomic_write_bytes, atomic_writer


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_write_replaces_whole_with_a_private_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "sub" / "state.json"
    atomic_write_bytes(target, b"one")
    assert target.read_bytes() == b"one"
    from sync_tools.fsutil import default_mode

    assert stat.S_IMODE(target.stat().st_mode) == default_mode()  # as open() would make it (the umask's)
    with atomic_writer(target) as fh:
        seen = [p for p in target.parent.iterdir() if p.name.startswith(".state.json.") and p.name.endswith(".tmp")]
        assert len(seen) == 1 and stat.S_IMODE(seen[0].stat().st_mode) == 0o600
        fh.write(b"two")
        assert target.read_bytes() == b"one"  # not visible before the block ends
    assert target.read_bytes() == b"two" and leftovers(target.parent) == []
    atomic_write_bytes(target, b"three", mode=0o644)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_the_temporary_name_is_never_an_existing_file_or_symlink(tmp_path, monkeypatch):
    """Someone who can write the directory plants the next name, as a file and as a symlink to a file
    they want overwritten: the writer takes another name and touches neither."""
    import os

    target = tmp_path / "state.json"
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    draws = iter([b"\x01" * 6, b"\x02" * 6, b"\x03" * 6])
    monkeypatch.setattr(os, "urandom", lambda n: next(draws))
    planted_file = tmp_path / f".state.json.{'01' * 6}.tmp"
    planted_file.write_bytes(b"planted")
    (tmp_path / f".state.json.{'02' * 6}.tmp").symlink_to(victim)
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert planted_file.read_bytes() == b"planted" and victim.read_bytes() == b"keep"
    assert not (tmp_path / f".state.json.{'03' * 6}.tmp").exists()  # the third name was used, then renamed


def test_a_failed_write_keeps_the_old_content_and_no_temporary_file(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError), atomic_writer(target) as fh:
        fh.write(b"half")
        raise RuntimeError("disk went away")
    assert target.read_bytes() == b"old" and leftovers(tmp_path) == []


def test_concurrent_writers_each_land_whole(tmp_path):
    target = tmp_path / "state.json"
    payloads = [bytes([65 + i]) * 50_000 for i in range(8)]

    def write(data: bytes) -> None:
        for _ in range(10):
            atomic_write_bytes(target, data)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert target.read_bytes() in payloads and leftovers(tmp_path) == []


def test_an_exclusive_write_never_replaces_and_leaves_nothing(tmp_path):
    target = tmp_path / "release.key"
    atomic_write_bytes(target, b"first", exclusive=True)
    with pytest.raises(FileExistsError):
        atomic_write_bytes(target, b"second", exclusive=True)
    assert target.read_bytes() == b"first" and leftovers(tmp_path) == []

    # of writers racing for one new file, exactly one lands
    raced = tmp_path / "raced.key"
    won: list[bytes] = []

    def write(data: bytes) -> None:
        try:
            atomic_write_bytes(raced, data, exclusive=True)
            won.append(data)
        except FileExistsError:
            pass

    threads = [threading.Thread(target=write, args=(bytes([65 + i]) * 1000,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(won) == 1 and raced.read_bytes() == won[0] and leftovers(tmp_path) == []
