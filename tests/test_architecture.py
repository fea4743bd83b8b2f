"""The layout ARCHITECTURE.md promises: an acyclic import graph, few function-local imports (each
with its reason beside it), and a ``tbps --help`` that starts without torch.

The graph is read from the source with ``ast``, not from ``sys.modules``: every ``import`` and
``from ... import`` of a ``tbps`` module counts, function-local ones included, so a cycle hidden
behind a lazy import is still a cycle.
"""

from __future__ import annotations

import ast
import io
import json
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]  # the repository root is the package `tbps`
SKIP_DIRS = {"tests", "bench", "runs", "manifests", "build", "dist", "__pycache__"}  # and every .hidden one
CLI = "tbps.cli"  # the CLI boundary: its local imports keep `tbps --help` free of torch
MAX_LOCAL_IMPORTS = 30  # function-local imports allowed outside cli.py
PRAGMAS = ("noqa", "type:", "pragma", "isort:", "fmt:", "pylint:")  # a linter pragma is not a reason


@dataclass(frozen=True)
class Import:
    """One import statement of a tbps module: where it is and what it reaches."""

    module: str  # the importing module
    path: Path
    line: int
    end_line: int
    local: bool  # inside a function body
    targets: tuple[str, ...]  # the tbps modules it imports (resolved; the root package left out)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if any(p in SKIP_DIRS or p.startswith(".") for p in parts[:-1]):
            continue
        dotted = [*parts[:-1], path.stem]
        if dotted[-1] == "__init__":
            dotted = dotted[:-1]
        found[".".join(["tbps", *dotted])] = path
    return found


MODULES = _modules()


def _resolve(name: str, modules: set[str] | dict[str, Path]) -> str | None:
    """The module a dotted name lives in: the name itself, or its longest module prefix."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _targets(node: ast.Import | ast.ImportFrom, package: str, modules: set[str] | dict[str, Path]) -> set[str]:
    """The tbps modules an import statement reaches; ``from P import x`` reaches ``P.x`` when x is a module."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: one level is the importing module's own package
            up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join(up + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    return {r for n in names if (n == "tbps" or n.startswith("tbps.")) and (r := _resolve(n, modules))}


def _import_module_targets(node: ast.Call, modules: dict[str, Path]) -> set[str]:
    """``importlib.import_module("tbps.x")`` with a literal name is an import too."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name != "import_module" or not node.args or not isinstance(node.args[0], ast.Constant):
        return set()
    target = node.args[0].value
    return {r} if isinstance(target, str) and target.startswith("tbps.") and (r := _resolve(target, modules)) else set()


def _imports(module: str, path: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    in_function = {
        id(inner)
        for fn in ast.walk(tree)
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
        for inner in ast.walk(fn)
        if inner is not fn
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            targets = _targets(node, package, MODULES)
        elif isinstance(node, ast.Call):
            targets = _import_module_targets(node, MODULES)
            if not targets:
                continue
        else:
            continue
        # Edges into the root package are not edges: tbps/__init__.py re-exports lazily.
        targets -= {"tbps", module}
        local = id(node) in in_function and isinstance(node, (ast.Import, ast.ImportFrom))
        found.append(Import(module, path, node.lineno, node.end_lineno or node.lineno, local, tuple(sorted(targets))))
    return found


IMPORTS = [imp for m, p in MODULES.items() for imp in _imports(m, p)]


def _graph() -> dict[str, dict[str, Import]]:
    """module -> {imported module: the first statement that imports it}."""
    graph: dict[str, dict[str, Import]] = {m: {} for m in MODULES}
    for imp in sorted(IMPORTS, key=lambda i: (i.module, i.line)):
        for target in imp.targets:
            graph[imp.module].setdefault(target, imp)
    return graph


def _strongly_connected(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Tarjan's components with more than one module (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    return components


def _cycle_through(start: str, members: set[str], graph: dict[str, dict[str, Import]]) -> list[str]:
    """A shortest import cycle from ``start`` back to itself inside one component."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return [start]


def test_the_module_walker_sees_the_package():
    assert {"tbps", "tbps.cli", "tbps.errors", "tbps.columns"} <= set(MODULES)
    assert not any(m.startswith(("tbps.tests", "tbps.bench")) for m in MODULES)
    assert "tbps.errors" in {t for imp in IMPORTS if imp.module == CLI for t in imp.targets}


def test_the_walker_finds_function_local_imports_and_their_reasons(tmp_path):
    path = tmp_path / "fake.py"
    path.write_text(
        "import tbps.errors\n"
        "def f():\n"
        "    from tbps import columns  # needed late: a reason\n"
        "    class K:\n"
        "        def g(self):\n"
        "            import faiss  # noqa: F401\n"
        "    return importlib.import_module('tbps.columns')\n"
        "s = '# not a comment'; import numpy\n"
    )
    found = sorted(_imports("tbps.fake", path), key=lambda i: i.line)
    assert [(i.line, i.local, i.targets) for i in found] == [
        (1, False, ("tbps.errors",)), (3, True, ("tbps.columns",)), (6, True, ()), (7, False, ("tbps.columns",)), (8, False, ()),
    ]
    comments = _comment_lines(path)
    assert [_has_reason(i, comments) for i in found] == [False, True, False, False, False]  # a pragma is no reason


def test_the_import_graph_has_no_cycle():
    graph = _graph()
    report = []
    for component in _strongly_connected(graph):
        cycle = _cycle_through(component[0], set(component), graph)
        steps = [f"{a} -> {b} ({graph[a][b].where}{', local' if graph[a][b].local else ''})" for a, b in zip(cycle, cycle[1:])]
        report.append(f"cycle among {', '.join(component)}:\n    " + "\n    ".join(steps))
    if report:
        pytest.fail(f"{len(report)} import cycle(s); each arrow names the import line:\n" + "\n".join(report), pytrace=False)


def _comment_lines(path: Path) -> dict[int, str]:
    """Line number -> the text of the ``#`` comment on it (tokenized: a ``#`` inside a string is no comment)."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text(encoding="utf-8")).readline)
    return {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}


def _has_reason(imp: Import, comments: dict[int, str]) -> bool:
    texts = [comments[n] for n in range(imp.line, imp.end_line + 1) if n in comments]
    return any(t and not t.lower().startswith(PRAGMAS) for t in texts)


def _local_imports() -> list[tuple[Import, bool]]:
    """Every function-local import outside cli.py, with whether a reason comment stands beside it."""
    found = []
    for module, path in MODULES.items():
        if module == CLI:
            continue
        local = [imp for imp in IMPORTS if imp.module == module and imp.local]
        if local:
            comments = _comment_lines(path)
            found += [(imp, _has_reason(imp, comments)) for imp in local]
    return sorted(found, key=lambda x: (str(x[0].path), x[0].line))


def _source_line(imp: Import) -> str:
    return imp.path.read_text(encoding="utf-8").splitlines()[imp.line - 1].strip()


def test_few_function_local_imports_outside_the_cli():
    # Module-level `import` statements are not counted; only the ones inside functions.
    local = [imp for imp, _ in _local_imports()]
    per_module: dict[str, int] = {}
    for imp in local:
        per_module[imp.module] = per_module.get(imp.module, 0) + 1
    listing = "\n".join(f"    {n:3d}  {m}" for m, n in sorted(per_module.items(), key=lambda x: (-x[1], x[0])))
    if len(local) > MAX_LOCAL_IMPORTS:
        pytest.fail(
            f"{len(local)} function-local imports outside cli.py (at most {MAX_LOCAL_IMPORTS}); move them to the top of "
            f"the file unless they import an optional heavy dependency:\n{listing}",
            pytrace=False,
        )


def test_every_function_local_import_says_why():
    bare = [imp for imp, reason in _local_imports() if not reason]
    listing = "\n".join(f"    {imp.where}: {_source_line(imp)}" for imp in bare)
    if bare:
        pytest.fail(
            f"{len(bare)} function-local import(s) outside cli.py without a `# reason` comment on the line "
            f"(move each to the top of the file, or say why it must stay inside the function):\n{listing}",
            pytrace=False,
        )


# A subprocess: this test process has torch loaded already. The finder records who asks for torch
# first, so a failure names the import chain instead of only saying "torch was imported".
_HELP_WITHOUT_TORCH = r"""
import json, sys, traceback

class Tattler:
    first = None
    def find_spec(self, name, path=None, target=None):
        if Tattler.first is None and (name == "torch" or name.startswith("torch.")):
            Tattler.first = [f"{f.filename}:{f.lineno} {f.line}" for f in traceback.extract_stack()[:-1]
                             if "importlib" not in f.filename and "<frozen" not in f.filename]
        return None

sys.meta_path.insert(0, Tattler())
import tbps.cli
from typer.testing import CliRunner
result = CliRunner().invoke(tbps.cli.app, ["--help"])
print(json.dumps({"exit_code": result.exit_code, "output": result.output, "torch": "torch" in sys.modules,
                  "first": Tattler.first}))
"""


def test_tbps_help_does_not_import_torch(tmp_path):
    res = subprocess.run([sys.executable, "-c", _HELP_WITHOUT_TORCH], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    seen = json.loads(res.stdout.strip().splitlines()[-1])
    assert seen["exit_code"] == 0 and "score" in seen["output"], seen["output"]
    chain = "\n    ".join(seen["first"] or [])
    if seen["torch"]:
        pytest.fail(f"`tbps --help` imported torch; the first import of torch came from:\n    {chain}", pytrace=False)


# A made-up package for the walker's own table: the real modules move as the code does.
FAKE = {"tbps", "tbps.columns", "tbps.curate", "tbps.curate.layout", "tbps.curate.score", "tbps.data", "tbps.data.readers",
        "tbps.data.synth", "tbps.models", "tbps.models.encode"}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from tbps.curate import layout", {"tbps.curate.layout"}),  # a module of the package: its own edge
        ("from tbps.curate import ScoreDir", {"tbps.curate"}),  # a name: the package's face
        ("from tbps import columns as C", {"tbps.columns"}),
        ("import tbps.data.synth", {"tbps.data.synth"}),
        ("from tbps.models.encode import encode_texts", {"tbps.models.encode"}),
        ("from . import layout", {"tbps.curate.layout"}),  # relative, inside tbps/curate/score.py
        ("from ..data import readers", {"tbps.data.readers"}),
        ("import tbps", set()),  # the root package re-exports lazily: not an edge
        ("import numpy", set()),
        ("from tbps.curate.layout import ScoreDir, part_name", {"tbps.curate.layout"}),
        ("from tbps.models.encode.inner import x", {"tbps.models.encode"}),  # not a module: its longest module prefix
    ],
)
def test_the_walker_resolves_imports(source, expected):
    node = ast.parse(source).body[0]
    assert _targets(node, "tbps.curate", FAKE) - {"tbps"} == expected
