"""Run tbps commands in forked children and SIGKILL a child's process group at an exact point.

Used by ``tests/test_faults.py``; not collected by pytest (no ``test_`` prefix)::

    python tests/_kill_launcher.py SPEC.json RESULT.json

The launcher imports tbps (and what the spec preloads: torch, open_clip) once, then forks one
child per run, so a run costs its own work and not an interpreter start. Each child makes itself a process group,
sends its stdout and stderr to files, wraps a few functions of the standard library *in its own
memory* (nothing in tbps knows about it), and runs ``tbps.cli.main`` with the run's arguments.
The wrappers count events per file and kill the child's whole process group (``SIGKILL``:
DataLoader workers die with it) at the chosen one, so a kill point is exact and repeatable:

* ``temp``: a temporary file or directory was just created (``tempfile.mkstemp`` / ``mkdtemp``);
* ``write``: the N-th ``write`` call to a file opened by ``os.fdopen`` (``tbps.files.atomic_write``)
  or by ``open(path, "w"/"wb"/"a")`` (a log line appended, an image rendered into a temporary
  world): at the kill point half of the bytes are written and flushed, then the kill;
* ``replace-before`` / ``replace-after``: around the N-th ``os.replace`` / ``os.rename`` onto a
  path (the commit of an atomic write, the renames of a checkpoint or of a world).

Events are keyed by the path relative to the run's ``root``, with every tbps temporary in it
named by its target (``.last.<host>.<pid>.<rand>.tbps-tmp`` -> ``last``), so the same point has
the same key in every run. Threads are fine: counts are per file, and one file is written by
one thread.

SPEC (JSON)::

    {"timeout": 300,                                        # seconds a run may take
     "preload": ["torch", "tbps.models.openclip"],        # imported once, before the forks
     "setup": [{"argv": [...], "cwd": "..."}],            # run first, uninterrupted
     "reference": {"argv": [...], "root": "REF"},          # uninterrupted, its events recorded
     "points": {"kinds": ["temp", "write", ...], "max": 40,  # "start" / "stop": an event, to choose from / before it;
                "must": [[key, kind, n], ...]},                # "must": events always chosen
     "kill": {"argv": [... "{root}" ...], "resume": [...], "roots": "DIR/k{i}",
              "prepare": "SRC",                             # optional: copy SRC to {root} first
              "snapshot": true}}                            # optional: copy {root} after the kill

For each chosen event of the reference run (every ``temp``/``replace-*`` event of the
chosen kinds and, per file, the middle ``write``; at most ``max``, evenly spaced), the launcher
runs ``kill.argv`` into a fresh root with that kill point, then ``kill.resume`` (no kill) in the
same root. RESULT (JSON) lists the reference run and every point: the event, how each run ended
(``exit`` with a code, ``killed``, or ``timeout``) and where its stdout and stderr went.
"""

from __future__ import annotations

import builtins
import ctypes
import importlib
import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import defaultdict
from pathlib import Path

# One thread per library in every child: the machine is small and the counts must not depend on it.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "POLARS_MAX_THREADS"):
    os.environ.setdefault(_var, "1")

import tbps.cli  # noqa: E402 - after the thread settings; imported once, before any fork (torch only when a spec preloads it)
from tbps.files import _parse_temp  # noqa: E402


# --------------------------------------------------------------------------- in the child


class _Points:
    """Counts events per (file, kind) and kills the process group at the chosen one."""

    def __init__(self, root: str, kill: list | None, record: bool) -> None:
        self.root = os.path.realpath(root)
        self.kill = tuple(kill) if kill else None
        self.record = record
        self.counts: dict[tuple[str, str], int] = defaultdict(int)
        self.events: list[list] = []

    def key(self, path: str | os.PathLike) -> str:
        parts = []
        for part in Path(os.path.abspath(os.fspath(path))).parts:
            parsed = _parse_temp(part)
            parts.append(parsed[0] + ("[old]" if parsed[3] else "") if parsed else part)
        full = os.path.join(*parts)
        root = self.root
        return os.path.relpath(full, root) if full == root or full.startswith(root + os.sep) else full

    def event(self, path: str | os.PathLike, kind: str) -> bool:
        """Count one event; True when it is the kill point (the caller then calls :meth:`die`)."""
        key = self.key(path)
        self.counts[key, kind] += 1
        n = self.counts[key, kind]
        if self.record:
            self.events.append([key, kind, n])
        return self.kill == (key, kind, n)

    @staticmethod
    def die() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.killpg(os.getpgid(0), signal.SIGKILL)
        time.sleep(60)  # never reached


def _install(points: _Points) -> None:
    """Wrap the functions that create, write and rename files, in this (child) process only."""
    real_mkstemp, real_mkdtemp = tempfile.mkstemp, tempfile.mkdtemp
    real_replace, real_rename = os.replace, os.rename
    real_open = builtins.open

    class KillingWriter(io.BufferedWriter):
        """A buffered file whose N-th write (the kill point) writes half of its bytes, flushes and dies."""

        def __init__(self, raw: io.RawIOBase, path: str) -> None:
            super().__init__(raw)
            self._path = path

        def write(self, data) -> int:  # type: ignore[override]
            if points.event(self._path, "write"):
                view = memoryview(data).cast("B")
                super().write(view[: len(view) // 2])
                super().flush()
                points.die()
            return super().write(data)

    def mkstemp(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        if points.event(name, "temp"):
            points.die()
        return fd, name

    def mkdtemp(*args, **kwargs):
        name = real_mkdtemp(*args, **kwargs)
        if points.event(name, "temp"):
            points.die()
        return name

    def fdopen(fd, mode="r", buffering=-1, *args, **kwargs):
        if "w" in mode and "b" in mode and not args and not kwargs:
            return KillingWriter(io.FileIO(fd, "wb", closefd=True), os.readlink(f"/proc/self/fd/{fd}"))
        return real_fdopen(fd, mode, buffering, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and mode in ("a", "at", "ab", "w", "wt", "wb") and not args:
            buffered = KillingWriter(io.FileIO(file, mode.replace("t", "").replace("b", "")), os.fspath(file))
            return buffered if "b" in mode else io.TextIOWrapper(buffered, encoding=kwargs.get("encoding") or "utf-8")
        return real_open(file, mode, *args, **kwargs)

    def around(real):
        def rename(src, dst, *args, **kwargs):
            if points.event(dst, "replace-before"):
                points.die()
            real(src, dst, *args, **kwargs)
            if points.event(dst, "replace-after"):
                points.die()

        return rename

    real_fdopen = os.fdopen
    tempfile.mkstemp, tempfile.mkdtemp = mkstemp, mkdtemp
    os.fdopen, builtins.open = fdopen, open_
    os.replace, os.rename = around(real_replace), around(real_rename)


def _child(run: dict, kill: list | None, record: bool, events_path: str | None) -> None:
    """The forked child: a process group of its own, output to files, the wrappers, the CLI."""
    os.setpgid(0, 0)
    for fd, path in ((1, run["stdout"]), (2, run["stderr"])):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    code = 0
    try:
        os.chdir(run.get("cwd") or os.getcwd())
        points = _Points(run.get("root") or os.getcwd(), kill, record)
        _install(points)
        sys.argv = ["tbps", *run["argv"]]
        try:
            tbps.cli.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if events_path:  # the launcher's own record, written past the wrappers
            fd = os.open(events_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, json.dumps(points.events).encode())
            os.close(fd)
    except BaseException:  # noqa: BLE001 - a traceback is what the test looks for
        traceback.print_exc()
        code = 99
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(code)


# --------------------------------------------------------------------------- in the launcher


def _run(run: dict, timeout: float, kill: list | None = None, record: bool = False) -> dict:
    """Fork a child for one run and wait for it (killing its group after ``timeout`` seconds)."""
    events_path = run["stdout"] + ".events.json" if record else None
    started = time.monotonic()
    pid = os.fork()
    if pid == 0:
        _child(run, kill, record, events_path)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return {**run, "end": "timeout", "code": None}
        time.sleep(0.005)
    gone = with_group_gone(pid)
    if os.WIFSIGNALED(status):
        end = {"end": "killed" if os.WTERMSIG(status) == signal.SIGKILL else f"signal {os.WTERMSIG(status)}", "code": None}
    else:
        end = {"end": "exit", "code": os.WEXITSTATUS(status)}
    result = {**run, **end, "group_gone": gone, "seconds": round(time.monotonic() - started, 3)}
    if events_path:
        result["events"] = json.loads(Path(events_path).read_text()) if Path(events_path).is_file() else []
    return result


def _become_subreaper() -> bool:
    """Adopt the children's orphans (a DataLoader worker whose parent was killed), so they can be reaped here.

    Without it they go to PID 1, which in a container may never reap them: their zombies would
    keep the process group alive.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def with_group_gone(pgid: int) -> bool:
    """Wait until no process of the child's group is left (a worker dies a moment after its parent), reaping them.

    Returns:
        Whether the group was gone within 30 seconds.
    """
    for _ in range(6000):
        try:
            while os.waitpid(-pgid, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.005)
    return False


def choose(
    events: list[list], kinds: list[str], most: int | None, start: list | None = None, stop: list | None = None, must: list | None = None
) -> list[list]:
    """The kill points of a reference run: each event of ``kinds`` (the middle write of each file), evenly thinned to ``most``.

    ``start`` / ``stop``: only the events from this one on / before this one (in the reference run's order);
    ``must``: events always chosen (and counted in ``most``); one the reference run lacks is an error.
    """
    must = [list(m) for m in must or []]
    for m in must:
        if m not in events:
            raise SystemExit(f"the reference run has no event {m}")
    writes: dict[str, int] = defaultdict(int)
    for key, kind, n in events:
        if kind == "write":
            writes[key] = max(writes[key], n)
    lo = events.index(start) if start else 0
    hi = events.index(stop) if stop else len(events)
    chosen = []
    for key, kind, n in events[lo:hi]:
        if [key, kind, n] in must:
            chosen.append([key, kind, n])
            continue
        if kind not in kinds:
            continue
        if kind == "write" and n != (writes[key] + 1) // 2:
            continue
        chosen.append([key, kind, n])
    if most is not None and len(chosen) > most:
        rest = [c for c in chosen if c not in must]
        keep = max(0, most - len(must))
        step = len(rest) / keep if keep else 0
        thinned = [rest[int(i * step)] for i in range(keep)] if keep else []
        chosen = [c for c in chosen if c in must or c in thinned]
    return chosen


def _fill(argv: list[str], root: str) -> list[str]:
    return [a.replace("{root}", root) for a in argv]


def _preload(modules: list[str]) -> None:
    """Import what the runs need before any fork (torch, open_clip: seconds each), once."""
    for name in modules:
        importlib.import_module(name)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def main(spec_path: str, result_path: str) -> None:
    _become_subreaper()
    spec = json.loads(Path(spec_path).read_text())
    _preload(spec.get("preload", []))
    timeout = float(spec.get("timeout", 300))
    logs = Path(result_path).with_suffix(".logs")
    logs.mkdir(parents=True, exist_ok=True)
    result: dict = {"setup": [], "points": []}

    def files(name: str) -> dict:
        return {"stdout": str(logs / f"{name}.out"), "stderr": str(logs / f"{name}.err")}

    for i, run in enumerate(spec.get("setup", [])):
        result["setup"].append(_run({**run, **files(f"setup{i}")}, timeout))
    ref = spec["reference"]
    result["reference"] = _run({**ref, "argv": _fill(ref["argv"], ref["root"]), **files("reference")}, timeout, record=True)
    kill = spec.get("kill")
    reference_ok = result["reference"]["end"] == "exit" and result["reference"]["code"] == 0
    if kill and reference_ok:  # a failed reference run is reported as it is, with its stderr, and nothing is killed
        policy = spec.get("points", {})
        chosen = choose(result["reference"]["events"], policy.get("kinds", ["temp", "write", "replace-before", "replace-after"]),
                        policy.get("max"), policy.get("start"), policy.get("stop"), policy.get("must"))
        for i, point in enumerate(chosen):
            root = kill["roots"].replace("{i}", str(i))
            if kill.get("prepare"):
                shutil.copytree(kill["prepare"], root, symlinks=True)
            else:
                os.makedirs(root, exist_ok=True)
            killed = _run({"argv": _fill(kill["argv"], root), "cwd": kill.get("cwd"), "root": root, **files(f"k{i}")}, timeout, kill=point)
            entry = {"point": point, "root": root, "killed": killed}
            if kill.get("snapshot"):  # what the kill left, before the re-run changes it
                entry["snapshot"] = root + ".after-kill"
                shutil.copytree(root, entry["snapshot"], symlinks=True)
            entry["resumed"] = _run({"argv": _fill(kill["resume"], root), "cwd": kill.get("cwd"), "root": root, **files(f"k{i}.resume")}, timeout)
            result["points"].append(entry)
    Path(result_path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
