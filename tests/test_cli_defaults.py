"""Every command's option defaults are its config dataclass's defaults.

A command turns its options into one config object; when an option and a field share a name
they mean the same setting, so ``tbps inspect`` with no ``--bins`` must bin like
``InspectConfig()`` does. The table below says which config each command builds and which names
differ; a second test reads cli.py and checks the table against the calls it makes.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest
import typer

from tbps.cli import app
from tbps.curate.embeddings import ExportEmbeddingsConfig
from tbps.curate.inspect import InspectConfig
from tbps.curate.score import ScoreConfig
from tbps.curate.select import SelectConfig
from tbps.data.readers import ReadConfig
from tbps.data.synth import SynthConfig
from tbps.demo import DemoConfig
from tbps.eval.evaluate import EvalConfig
from tbps.eval.search import SearchConfig
from tbps.train.loop import TrainConfig


@dataclasses.dataclass(frozen=True)
class Command:
    """What one command builds: its config class and how its options map onto the fields."""

    config: type
    renamed: dict[str, str] = dataclasses.field(default_factory=dict)  # option parameter -> config field
    cli_only: frozenset[str] = frozenset({"quiet"})  # options that are no config field
    not_options: frozenset[str] = frozenset()  # config fields the command does not offer


COMMANDS = {
    "score": Command(ScoreConfig, {"out_dir": "out"}, not_options=frozenset({"max_pixels"})),
    "info": Command(ReadConfig, cli_only=frozenset({"head"})),
    # --data repeats the DATA argument; --compare prints records instead of building a config.
    "eval": Command(EvalConfig, {"out_file": "out"}, frozenset({"quiet", "compare", "data_opt"}), frozenset({"chunk_size", "seed"})),
    "inspect": Command(InspectConfig, cli_only=frozenset()),
    # QUERY... are the queries and --queries is the file of more: the names cross.
    "search": Command(SearchConfig, {"query": "queries", "queries": "queries_file"},
                      not_options=frozenset({"batch_size", "caption_col", "id_col", "image_col", "precision", "seed"})),
    # --log-to picks the log mirrors (tbps.train.sinks) and --config reads the options from a file: neither is the run's config.
    "train": Command(TrainConfig, {"run_dir": "out"}, frozenset({"quiet", "log_to", "config"})),
    "synth": Command(SynthConfig, {"out_dir": "out"}),
    "select": Command(SelectConfig, {"out_path": "out"}, frozenset({"quiet", "explain"})),
    "demo": Command(DemoConfig, {"out_dir": "out"}),
    "export-embeddings": Command(ExportEmbeddingsConfig, {"out_dir": "out"}),
}

# How cli.py turns an option's value into the config's argument, where it does not pass it as is.
PASSED_AS: dict[tuple[str, str], Callable[[Any], Any]] = {
    ("select", "quota"): lambda v: tuple(v or ()),
    ("search", "query"): lambda v: v or [],
}
# Options cli.py leaves out of the config call while they are None, so the field's default applies.
OMITTED_WHEN_NONE = {("synth", "defect_mix")}


def _click_command(name: str):
    return typer.main.get_command(app).commands[name]


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _plain(value: Any) -> Any:
    """A Path and its str are one default; so are a list and a tuple of the same items."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


def _options(name: str) -> dict[str, Any]:
    """Option (and argument) parameter name -> click parameter of one command."""
    return {p.name: p for p in _click_command(name).params}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_option_defaults_are_the_config_defaults(name):
    command = COMMANDS[name]
    fields = {f.name: f for f in dataclasses.fields(command.config)}
    mismatches = []
    for param, option in _options(name).items():
        field = fields.get(command.renamed.get(param, param))
        if field is None or option.required:
            continue
        expected = _field_default(field)
        if expected is dataclasses.MISSING:  # the field has no default: the command must supply one
            continue
        if option.default is None and (name, param) in OMITTED_WHEN_NONE:
            continue
        given = PASSED_AS.get((name, param), lambda v: v)(option.default)
        if _plain(given) != _plain(expected):
            mismatches.append(f"{option.opts[0] if option.opts else param}: CLI {option.default!r}, "
                              f"{command.config.__name__}.{field.name} {expected!r}")
    assert not mismatches, f"tbps {name}: option defaults differ from the config's:\n  " + "\n  ".join(mismatches)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_is_a_field_and_every_field_an_option(name):
    """The table is complete: a renamed option or a new field cannot slip past the defaults test."""
    command = COMMANDS[name]
    fields = {f.name for f in dataclasses.fields(command.config)}
    params = set(_options(name))
    cls = command.config.__name__
    mapped = {command.renamed.get(p, p) for p in params - command.cli_only}
    assert not mapped - fields, f"tbps {name}: options {sorted(mapped - fields)} are no {cls} field: add them to renamed or cli_only"
    assert fields - mapped == command.not_options, (
        f"tbps {name}: {cls} fields without an option are {sorted(fields - mapped)}; the table says {sorted(command.not_options)}"
    )
    stale = (command.cli_only | set(command.renamed)) - params
    assert not stale, f"tbps {name} has no options {sorted(stale)} any more: drop them from the table"


def _config_calls() -> dict[str, tuple[str, dict[str, str]]]:
    """Read from cli.py: command -> (the config class it builds, {option parameter: field} where they differ)."""
    found = {}
    for info in app.registered_commands:
        callback = info.callback
        name = info.name or typer.main.get_command_name(callback.__name__)
        tree = ast.parse(textwrap.dedent(inspect.getsource(callback)))
        params = set(inspect.signature(callback).parameters)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id.endswith("Config"):
                renamed = {}
                for kw in node.keywords:
                    used = {n.id for n in ast.walk(kw.value) if isinstance(n, ast.Name) and n.id in params}
                    if kw.arg is not None and len(used) == 1 and (param := used.pop()) != kw.arg:
                        renamed[param] = kw.arg
                found[name] = (node.func.id, renamed)
    return found


def test_the_table_is_what_cli_py_builds():
    in_cli = _config_calls()
    in_table = {name: (c.config.__name__, c.renamed) for name, c in COMMANDS.items()}
    assert in_table == in_cli
    # Every command that builds no config is known by name.
    assert set(typer.main.get_command(app).commands) - set(COMMANDS) == {"version", "export"}
