"""Fixtures shared by the test files: one torch thread, the tiny CLIP, small synthetic worlds and
the command line run in-process.

torch and open_clip are imported inside the fixtures that need them: this file is loaded for
every test file, and the ones that never touch a model should not pay seconds for them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from tbps.cli import app
from tbps.data.synth import SynthConfig, synthesize
from tbps.runtime import offline_by_default

# The tests run the commands in-process: the same no-download policy as the `tbps` program.
offline_by_default()


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op torch thread for a test module, restored afterwards.

    Tiny tensors gain nothing from more threads, and on a loaded 2-core machine two spinning
    OpenMP threads run ~10x slower. A module asks with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch  # only the modules that ask load torch here (see the module docstring)

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_clip():
    """tbps-tiny with its seeded random weights (seed 0), loaded once per session.

    Shared by every test that asks: read it, never train or adapt it in place.
    """
    from tbps.models import load  # torch and open_clip only for the tests that ask for a model

    return load("tbps-tiny", seed=0)


@pytest.fixture(scope="session")
def synth_world(tmp_path_factory) -> Callable[..., Path]:
    """A factory: ``synth_world(seed, pool_size=4)`` -> the root of a small synthetic world.

    6 identities split 2:1:3 with 2 images each (benchmark/reid_raw.json: 12 test pairs), a pool
    of ``pool_size`` pairs of 3 other identities (pool/pool.json, pool/truth.parquet), rendered by
    one worker. Each (seed, pool_size) is rendered once per session; tests only read it.
    """
    made: dict[tuple[int, int], Path] = {}

    def make(seed: int, pool_size: int = 4) -> Path:
        if (seed, pool_size) not in made:
            out = tmp_path_factory.mktemp(f"world-seed{seed}-pool{pool_size}")
            synthesize(SynthConfig(out=out, seed=seed, identities=6, split="2:1:3", images_per_id=2, pool_identities=3,
                                   pool_size=pool_size, workers=1))
            made[seed, pool_size] = out
        return made[seed, pool_size]

    return make


@pytest.fixture(scope="session")
def cli() -> Callable[..., Result]:
    """``cli("score", path, "--out", out)`` runs ``tbps score PATH --out OUT`` in-process.

    Arguments are passed through ``str`` (so paths need no conversion); ``env=`` adds
    environment variables for the run (e.g. ``{"COLUMNS": "200"}`` for wide tables).
    Returns click's ``Result``: ``exit_code``, ``output``, ``stdout``, ``stderr``.
    """
    runner = CliRunner()

    def invoke(*args: object, env: dict[str, str] | None = None) -> Result:
        return runner.invoke(app, [str(a) for a in args], env=env)

    return invoke
