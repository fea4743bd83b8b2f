"""tbps.runtime: the allocator settings the tbps program applies before running models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# The tests compare glibc's defaults with the setting: an environment that chose its own allocator
# settings has neither.
_OWN_SETTINGS = any(k.startswith("MALLOC_") for k in os.environ) or "malloc" in os.environ.get("LD_PRELOAD", "") or (
    "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
)

# A forward pass in miniature: 4 live 24 MB activations, then all freed; 10 rounds. Page faults
# are counted after the first round.
_PROBE = """
import json, resource, sys
from tbps.runtime import hold_freed_memory
applied = hold_freed_memory() if sys.argv[1] == "hold" else False
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def round_():
    blocks = [bytearray(24 << 20) for _ in range(4)]  # zero-filled: every page is touched
    del blocks
round_()
start = faults()
for _ in range(10):
    round_()
print(json.dumps({"applied": applied, "faults": faults() - start}))
"""


def _probe(mode: str, **env: str) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True, env={**os.environ, **env}
    )
    return json.loads(res.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux") or _OWN_SETTINGS, reason="glibc's allocator with its defaults")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    held, default = _probe("hold"), _probe("default")
    assert held["applied"] and not default["applied"]
    # By default glibc returns the freed blocks and each round faults most of its 4 x 6,144
    # pages in again; held, the blocks are reused (almost) without faults.
    assert default["faults"] > 10 * 6_000
    assert held["faults"] < 1_000


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_users_own_malloc_settings_are_left_alone():
    assert not _probe("hold", MALLOC_TRIM_THRESHOLD_="131072")["applied"]
    assert not _probe("hold", GLIBC_TUNABLES="glibc.malloc.trim_threshold=131072")["applied"]
    assert not _probe("hold", LD_PRELOAD="libjemalloc.so.2-not-loaded-here")["applied"]
