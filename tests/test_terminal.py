"""``tbps.terminal``: the one module that renders for the terminal; the core packages return data."""

from __future__ import annotations

import ast
import io
from pathlib import Path

from rich.console import Console

from tbps.terminal import metrics_table

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the package `tbps`
RENDERERS = {"cli.py", "terminal.py"}


def _imports_rich(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if any(n == "rich" or n.startswith("rich.") for n in names):
            return True
    return False


def test_only_the_cli_and_the_terminal_module_import_rich():
    packages = ("data", "curate", "eval", "demo", "models", "train", "report")
    found = [str(p.relative_to(ROOT)) for pkg in packages for p in sorted((ROOT / pkg).rglob("*.py")) if _imports_rich(p)]
    top = [p.name for p in sorted(ROOT.glob("*.py")) if p.name not in RENDERERS and _imports_rich(p)]
    assert found + top == []


def _record(spec: str, r1: float, data_hash: str = "abc") -> dict:
    metrics = {"R1": r1, "R5": 50.0, "mAP": 10.0, "queries": 1200, "gallery": 300}
    return {"model": {"spec": spec}, "data": {"path": "/d/test.json", "split": "test"}, "data_hash": data_hash, "metrics": metrics}


def _text(table, colour: bool = False) -> str:
    console = Console(file=io.StringIO(), width=120, force_terminal=colour, color_system="standard" if colour else None)
    console.print(table)
    return console.file.getvalue()


def test_metrics_table_shows_the_given_metrics_and_bolds_the_best_run():
    table = metrics_table([_record("a", 12.5), _record("b", 30.0)], ("R1", "mAP"))
    text = _text(table)
    assert "R5" not in text and "12.50" in text and "30.00" in text and "1,200" in text
    assert "test.json:test" in text and "DIFFERENT" not in text
    assert "\x1b[1m30.00" in _text(table, colour=True) and "\x1b[1m12.50" not in _text(table, colour=True)
    assert "DIFFERENT data" in _text(metrics_table([_record("a", 1.0), _record("b", 2.0, data_hash="xyz")], ("R1",)))
