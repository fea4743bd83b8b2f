"""Config files of a command (``tbps train --config FILE``): YAML or JSON whose keys are the option names, or a run's ``run.json``.

Keys are the command's option names, with ``-`` or ``_`` (``batch-size`` or ``batch_size``; a
leading ``--`` is allowed); values are what the option takes, a list for a repeatable option
(``targets: [c_fc, c_proj]``). The file's values become the command's defaults (click's
``default_map``), so an option given on the command line wins, and every value is checked and
converted as the option's own value would be. A key that names no option is one usage error
naming the key. Paths in a file are read as on the command line (relative to the working
directory). An empty file gives nothing.

A run record (``RUN/run.json``, or the run directory itself) re-runs the recorded run: its
resolved ``config`` is the file, without ``resume`` (a re-run starts afresh; ``--resume`` on
the command line continues the recorded run instead). The recorded ``out`` is the output
directory only while it is free (missing or empty); otherwise ``--out`` must be given.

Exclusive options (``--epochs``/``--steps``, ``--manifest``/``--data``): when the command line
gives one and the file the other, the file's is dropped; a recorded run always has ``epochs``
resolved, so ``--steps 100`` alone overrides it.

Used by :mod:`tbps.cli` only: :func:`apply_config` is the eager callback of ``--config``, and
:func:`settle` runs in the command body once every value is known.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Optional

import typer
import yaml

from tbps.errors import TbpsError, UsageError

RUN_RECORD = "run.json"  # tbps.models.runs.RUN_MARKER, named here without importing the models (tbps --help)
SUFFIXES = (".yaml", ".yml", ".json")
EXCLUSIVE = (("epochs", "steps"), ("manifest", "data"))  # option pairs where one given drops the other
DROPPED_FROM_RECORDS = ("resume",)  # recorded, but a re-run starts afresh
_META = "tbps.config"  # ctx.meta key: what --config read
_GIVEN = ("COMMANDLINE", "ENVIRONMENT", "PROMPT")  # parameter sources that outrank the file


def read_config(path: str | Path) -> tuple[dict[str, Any], bool]:
    """The options a config file gives, and whether it is a run record.

    Args:
        path: a ``.yaml``/``.yml``/``.json`` file, a run's ``run.json``, or a run directory.

    Returns:
        ``(values, is_record)``: key -> value as written (a run record's ``config`` without
        ``resume``), and True for a run record.

    Raises:
        TbpsError: an unreadable file, a syntax error, or content that is not a mapping.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / RUN_RECORD).is_file():
            raise TbpsError("a directory given as --config must be a run directory", path=path, hint=f"it holds no {RUN_RECORD}")
        path = path / RUN_RECORD
    if path.suffix.lower() not in SUFFIXES:
        raise TbpsError("a config file is YAML or JSON", path=path, hint=f"name it {', '.join('*' + s for s in SUFFIXES)}")
    try:
        text = path.read_text(encoding="utf-8")
        content = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise TbpsError(f"cannot read config file: {' '.join(str(exc).split())}", path=path) from None
    if content is None:
        return {}, False
    if not isinstance(content, dict):
        raise TbpsError("a config file holds a mapping of option names to values", path=path, value=type(content).__name__)
    record = isinstance(content.get("config"), dict) and "base_model" in content
    if record:
        content = {k: v for k, v in content["config"].items() if k not in DROPPED_FROM_RECORDS}
    return content, record


def _option_names(command: Any) -> dict[str, Any]:
    """Option name with ``_`` (``batch_size``) -> the click parameter, for every long option of the command."""
    names = {}
    for param in command.params:
        for opt in getattr(param, "opts", ()):
            if opt.startswith("--"):
                names[opt[2:].replace("-", "_")] = param
    return names


def to_defaults(values: dict[str, Any], command: Any, path: object) -> dict[str, Any]:
    """A config file's values keyed by the command's parameter names (click's ``default_map``).

    Raises:
        UsageError: a key that names no option of the command, or ``config`` itself.
    """
    options = _option_names(command)
    options.pop("config", None)  # a config file does not name another one
    defaults = {}
    for key, value in values.items():
        name = str(key).lstrip("-").replace("-", "_")
        param = options.get(name)
        if param is None:
            close = difflib.get_close_matches(name, list(options), n=1)
            hint = f"Did you mean {close[0]!r}?" if close else f"The options of tbps {command.name}: {', '.join(sorted(options))}"
            raise UsageError(f"{path}: unknown key {key!r} (not an option of tbps {command.name}). {hint}", field="--config", value=key)
        if getattr(param, "multiple", False) and isinstance(value, str):
            value = [value]  # "targets: c_fc,c_proj" as well as a list
        defaults[param.name] = value
    return defaults


def apply_config(ctx: typer.Context, param: typer.CallbackParam, value: Optional[Path]) -> Optional[Path]:
    """The eager callback of ``--config``: the file's values become the command's defaults.

    Raises:
        typer.BadParameter: a key that names no option (exit 2, naming the key).
        TbpsError: an unreadable or malformed file.
    """
    if value is None:
        return value
    values, record = read_config(value)
    try:
        defaults = to_defaults(values, ctx.command, value)
    except UsageError as exc:
        raise typer.BadParameter(exc.message, ctx=ctx, param=param) from None
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta[_META] = {"path": str(value), "record": record, "names": set(defaults)}
    return value


def settle(ctx: typer.Context, options: dict[str, Any], out: Any, out_name: str = "run_dir") -> dict[str, Any]:
    """The command's values once a config file is applied: exclusive options settled, a recorded output checked.

    Args:
        ctx: the command's context.
        options: parameter name -> value (changed in place and returned).
        out: the output directory's value.
        out_name: the parameter name of the output directory.

    Returns:
        ``options``, with the file's side of an exclusive pair dropped where the command line
        gave the other side.

    Raises:
        UsageError: a run record's output directory is not free and no ``--out`` (or
            ``--resume``) was given.
    """
    used = ctx.meta.get(_META)
    if not used:
        return options

    def source(name: str) -> str:
        found = ctx.get_parameter_source(name)
        return found.name if found is not None else "DEFAULT"

    for a, b in EXCLUSIVE:
        for given, dropped in ((a, b), (b, a)):
            if source(given) in _GIVEN and source(dropped) == "DEFAULT_MAP" and dropped in options:
                options[dropped] = None
    if used["record"] and source(out_name) == "DEFAULT_MAP" and not options.get("resume"):
        directory = Path(out)
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise UsageError(
                f"the recorded run directory {out} is not free: give --out for the re-run (or --resume to continue that run)",
                field="--out",
            )
    return options
