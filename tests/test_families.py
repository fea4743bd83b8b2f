"""The model-family registry: every family is offered in --help and the README, and dispatch is right."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tbps.cli import app
from tbps.errors import TbpsError
from tbps.models.protocol import Encoder
from tbps.models.registry import FAMILIES, family_of, load

README = Path(__file__).resolve().parents[1] / "README.md"


def _flat(text: str) -> str:
    """Help text without rich's box drawing and line wrapping."""
    return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", text))


@pytest.mark.parametrize("command", ["score", "eval", "search", "train"])
def test_every_family_is_listed_in_the_model_option_help(command):
    help_text = _flat(CliRunner().invoke(app, [command, "--help"], terminal_width=200).output)
    for family in FAMILIES:
        assert f"{family.name}:" in help_text, f"{family.name} missing from `tbps {command} --help`"


def test_every_family_is_in_the_readme_models_table():
    section = README.read_text().split("### Models (`--model`)", 1)[1].split("\n## ", 1)[0]
    for family in FAMILIES:
        assert f"| `{family.name}` |" in section


@pytest.mark.parametrize(
    "spec, family",
    [
        ("tbps-tiny", "open_clip"),
        ("ViT-B-16:openai", "open_clip"),
        ("/path/to/my-vit.json", "open_clip"),
        ("/path/to/model.pt", "open_clip"),
        ("{dir}", "run"),
    ],
)
def test_a_spec_goes_to_the_family_that_claims_it(spec, family, tmp_path):
    assert family_of(spec.format(dir=tmp_path)).name == family


def test_a_loaded_model_implements_the_protocol_and_names_its_family():
    loaded = load("tbps-tiny", seed=1)
    assert isinstance(loaded, Encoder)
    assert loaded.family == family_of("tbps-tiny").name
    assert not loaded.has_pair_score


def test_a_directory_without_a_run_record_is_refused_by_name(tmp_path):
    with pytest.raises(TbpsError, match="not a tbps run directory"):
        load(str(tmp_path))
