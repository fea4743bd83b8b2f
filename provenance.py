"""What every run records: versions, the git commit, input hashes, the resolved config."""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any


def versions() -> dict[str, str]:
    """Versions of tbps and the libraries whose behaviour shapes results."""
    found = {}
    for pkg in ("tbps", "torch", "open_clip_torch", "polars", "pyarrow", "faiss-cpu", "pillow"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = "not installed"
    found["python"] = platform.python_version()
    return found


def git_commit() -> str | None:
    """The commit of the tbps source tree, when it is a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        res = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None if res.returncode == 0 else None


def record(config: Any, **extra: Any) -> dict[str, Any]:
    """A provenance record: the resolved config, versions, commit, host and time.

    Args:
        config: a config dataclass (or dict) as resolved for this run.
        **extra: more fields (inputs with hashes, timings, counts).

    Returns:
        A JSON-serialisable dict.
    """
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return {
        "config": json.loads(json.dumps(cfg, default=str)),
        "versions": versions(),
        "git_commit": git_commit(),
        "host": platform.node(),
        "pid": os.getpid(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **json.loads(json.dumps(extra, default=str)),
    }
