"""tbps.files: the one atomic write (exclusive temps, umask, cleanup, sweeping) and the one content hash."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys

import pytest

from tbps.curate.layout import list_parts, part_name
from tbps.files import (
    HASH_ALGO,
    HOST_TAG,
    TEMP_SUFFIX,
    atomic_dir,
    atomic_write,
    content_hash,
    file_hash,
    is_temp,
    sweep_temps,
    write_json,
    write_text,
)


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(proc.stdout)


def test_the_content_hash_is_blake2b_128_for_bytes_and_files(tmp_path):
    data = b"tbps" * 1000
    (tmp_path / "f").write_bytes(data)
    assert HASH_ALGO == "blake2b-128"
    assert content_hash(data) == file_hash(tmp_path / "f") == hashlib.blake2b(data, digest_size=16).hexdigest()


def test_an_atomic_write_replaces_the_target_and_respects_the_umask(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "out.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as fh:
            fh.write(b"half of the new")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_planted_symlink_at_a_predictable_temp_name_is_never_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    for guess in (f".x.json.{os.getpid()}.tmp", f".x.json.tmp", f".x.json.{os.getpid()}.00000000{TEMP_SUFFIX}"):
        (out / guess).symlink_to(victim)
    write_json(out / "x.json", {"ok": True})
    assert victim.read_text() == "precious" and json.loads((out / "x.json").read_text()) == {"ok": True}


def test_a_directory_is_replaced_whole(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_sweeping_removes_dead_processes_temps_keeps_live_ones_and_restores_an_aside_directory(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a concurrent run
    try:
        _sweep_case(tmp_path, _dead_pid(), other.pid)
    finally:
        other.kill()
        other.wait()


def _sweep_case(tmp_path, dead: int, live: int) -> None:
    (tmp_path / f".part-000001.parquet.{dead}.abcd1234{TEMP_SUFFIX}").write_bytes(b"half a part")
    (tmp_path / f".part-000002.parquet.{dead}.12345678{TEMP_SUFFIX}").write_bytes(b"digits only in the random part")
    (tmp_path / f".part-000003.parquet.{live}.abcd1234{TEMP_SUFFIX}").write_bytes(b"a concurrent run's")
    # A kill between the two renames of atomic_dir: the old checkpoint aside, the new one not yet in place.
    aside = tmp_path / f".last.old.{dead}.zz99zz99{TEMP_SUFFIX}"
    (aside / "last").mkdir(parents=True)
    (aside / "last" / "trainer.pt").write_text("state")
    (tmp_path / "keep.txt").write_text("not a temp")
    elsewhere = f".part-000004.parquet.0badf00d.{dead}.abcd1234{TEMP_SUFFIX}"  # another machine's: its pids mean nothing here
    (tmp_path / elsewhere).write_bytes(b"x")
    mine = f".part-000005.parquet.{HOST_TAG}.{os.getpid()}.abcd1234{TEMP_SUFFIX}"  # this pid, so a dead process's
    (tmp_path / mine).write_bytes(b"x")
    removed = sweep_temps(tmp_path)
    assert len(removed) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["keep.txt", "last", elsewhere, f".part-000003.parquet.{live}.abcd1234{TEMP_SUFFIX}"])
    assert (tmp_path / "last" / "trainer.pt").read_text() == "state"


def test_directory_readers_skip_temps(tmp_path):
    (tmp_path / part_name(0)).write_bytes(b"x")
    (tmp_path / f".{part_name(1)}.{os.getpid()}.abcd{TEMP_SUFFIX}").write_bytes(b"x")
    assert [p.name for p in list_parts(tmp_path)] == [part_name(0)]
    assert is_temp(f".{part_name(1)}.1.a{TEMP_SUFFIX}") and not is_temp(part_name(1))
