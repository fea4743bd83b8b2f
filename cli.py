"""The ``tbps`` command line: options -> one config object -> one core call -> a summary.

Commands stay thin (about 15 lines): the work happens in ``tbps.curate``, ``tbps.train``,
``tbps.data`` and ``tbps.eval``. Bad input raises :class:`tbps.errors.TbpsError` in core code;
it is caught once in :func:`main`, printed without a traceback, and the exit code is 1.
A bad combination of options is a usage error: exit 2, naming the options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

from tbps.errors import TbpsError, UsageError

out = Console()  # results
err = Console(stderr=True)  # progress, logs and errors


class _Group(TyperGroup):
    """Turns tbps errors into one printed line and an exit code, for every command."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            raise click.UsageError(str(exc), ctx) from None
        except TbpsError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise click.exceptions.Exit(1) from None


app = typer.Typer(
    cls=_Group,
    name="tbps",
    help="Text-based person search: score, select, train (WoRA) and evaluate.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


# Reader options shared by every command that reads a dataset.
FormatOpt = typer.Option(None, "--format", help="Dataset format; auto-detected when omitted.")
ImageRootOpt = typer.Option(None, "--image-root", help="Directory the image paths resolve in (default: next to the file).")
ImageColOpt = typer.Option(None, "--image-col", help="Image path column of a CSV/JSONL/Parquet table.")
CaptionColOpt = typer.Option(None, "--caption-col", help="Caption column of a CSV/JSONL/Parquet table.")
IdColOpt = typer.Option(None, "--id-col", help="Person id column of a CSV/JSONL/Parquet table.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress bars or logs on stderr.")


@app.command()
def version() -> None:
    """Print the tbps, torch and open_clip versions.

    Example: tbps version
    """
    from tbps.provenance import versions

    for name, value in versions().items():
        out.print(f"{name} {value}")


def main() -> None:
    """Entry point of the ``tbps`` console script and ``python -m tbps``."""
    app()


if __name__ == "__main__":
    main()
