"""tbps.files: the one atomic write (exclusive temps, umask, cleanup, sweeping) and the one content hash."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys

import polars as pl
import pytest

from tbps import columns as C
from tbps.curate.layout import list_parts, part_name
from tbps.errors import TbpsError
from tbps.files import (
    HASH_ALGO,
    HOST_TAG,
    TEMP_SUFFIX,
    append_text,
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


def test_a_planted_symlink_at_the_target_or_at_this_process_s_temp_prefix_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    (out / "x.json").symlink_to(victim)  # planted at the target itself
    for rand in ("00000000", "abcdefgh", "zzzzzzzz"):  # at this process's exact temp prefix
        (out / f".y.json.{HOST_TAG}.{os.getpid()}.{rand}{TEMP_SUFFIX}").symlink_to(victim)
    write_json(out / "x.json", {"ok": 1})
    write_json(out / "y.json", {"ok": 2})
    assert victim.read_text() == "precious"
    assert not (out / "x.json").is_symlink() and json.loads((out / "x.json").read_text()) == {"ok": 1}
    (out / "ckpt").symlink_to(tmp_path, target_is_directory=True)  # a planted link where a directory is written
    with atomic_dir(out / "ckpt") as tmp:
        (tmp / "w").write_text("new")
    assert not (out / "ckpt").is_symlink() and (out / "ckpt" / "w").read_text() == "new" and victim.read_text() == "precious"


def test_sweeping_never_restores_from_a_planted_aside_link(tmp_path):
    attacker = tmp_path / "attacker"
    (attacker / "last").mkdir(parents=True)
    (attacker / "last" / "trainer.pt").write_text("not yours")
    run = tmp_path / "run"
    run.mkdir()
    planted = run / f".last.old.{HOST_TAG}.{_dead_pid()}.abcdefgh{TEMP_SUFFIX}"
    planted.symlink_to(attacker, target_is_directory=True)
    sweep_temps(run)
    assert not (run / "last").exists() and not planted.is_symlink()  # the link is removed, nothing moved in
    assert (attacker / "last" / "trainer.pt").read_text() == "not yours"


# A child that may write at most 4,096 bytes per file, with SIGXFSZ ignored so a bigger write fails with EFBIG:
# the same path through tbps.files as a full disk, deterministic and without a mount.
_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
sys.argv = ["tbps", *sys.argv[1:]]
"""


def _limited(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _LIMITED + code, *args], capture_output=True, text=True, timeout=120)


def test_a_write_past_a_size_limit_is_one_line_and_leaves_the_old_file(tmp_path):
    target = tmp_path / "big.bin"
    target.write_bytes(b"old")
    code = (
        "from tbps.files import write_bytes, atomic_write, DiskFullError\n"
        "import numpy as np\n"
        "def numpy_save():\n"
        "    with atomic_write(sys.argv[1]) as fh:\n"
        "        np.save(fh, np.zeros(100_000))\n"
        "for name, write in (('bytes', lambda: write_bytes(sys.argv[1], b'x' * 100_000)), ('numpy', numpy_save)):\n"
        "    try:\n"
        "        write()\n"
        "    except DiskFullError as exc:\n"
        "        print(name, exc)\n"
    )
    res = _limited(code, str(target))
    lines = res.stdout.splitlines()
    assert res.returncode == 0 and not res.stderr, res.stderr
    assert len(lines) == 2 and all("the file is larger than the file system or the process's file-size limit allows" in ln for ln in lines)
    assert f"{target}: cannot write" in lines[0] and "run the same command again" in lines[0]
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]


def test_the_cli_says_one_line_when_a_write_hits_the_limit(tmp_path):
    rows = [{C.PAIR_ID: f"{k}:0", C.IMAGE_PATH: f"/x/{k:05d}.jpg", C.CAPTION: f"a caption number {k} " * 4, C.PERSON_ID: str(k),
             C.SOURCE: "s", C.IMAGE_HASH: f"{k:032x}", C.SCORE: k / 1000, C.BANK_RANK: k, C.BANK_PERCENTILE: 0.0, C.TRUNCATED: False,
             C.STATUS: C.STATUS_OK, C.ERROR: None} for k in range(2000)]
    (tmp_path / "scores").mkdir()
    pl.DataFrame(rows, schema=C.polars_schema(C.SCORE_SCHEMA)).write_parquet(tmp_path / "scores" / "part-000000.parquet")
    out = tmp_path / "m" / "sel.parquet"
    res = _limited("from tbps.cli import main\nmain()", "select", str(tmp_path / "scores"), "--out", str(out), "--quiet")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "file-size limit" in lines[0], res.stderr
    assert not out.exists() and not [p for p in out.parent.iterdir() if is_temp(p)]


def test_a_full_disk_inside_a_directory_write_names_the_directory(tmp_path):
    code = (
        "from tbps.files import atomic_dir, write_bytes, DiskFullError\n"
        "try:\n"
        "    with atomic_dir(sys.argv[1]) as tmp:\n"
        "        write_bytes(tmp / 'weights.bin', b'x' * 100_000)\n"
        "except DiskFullError as exc:\n"
        "    print(exc)\n"
    )
    res = _limited(code, str(tmp_path / "ckpt"))
    assert res.returncode == 0 and not res.stderr, res.stderr
    assert res.stdout.startswith(f"{tmp_path / 'ckpt'}: cannot write") and TEMP_SUFFIX not in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_append_text_adds_whole_lines_refuses_a_link_and_cuts_back_a_write_that_did_not_fit(tmp_path):
    log = tmp_path / "log.jsonl"
    append_text(log, '{"step": 1}\n')
    append_text(log, '{"step": 2}\n')
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "planted.jsonl").symlink_to(victim)
    with pytest.raises(TbpsError, match="does not write through links"):
        append_text(tmp_path / "planted.jsonl", "x\n")
    assert victim.read_text() == "precious"
    code = (
        "from tbps.files import append_text, DiskFullError\n"
        "try:\n"
        "    append_text(sys.argv[1], 'y' * 10_000 + '\\n')\n"
        "except DiskFullError as exc:\n"
        "    print(exc)\n"
    )
    res = _limited(code, str(log))
    assert res.returncode == 0 and f"{log}: cannot write" in res.stdout, res.stderr
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'  # no part of the line that did not fit
