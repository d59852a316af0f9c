"""The import rules of docs/architecture.md ("Who may import whom"), read from
the code itself: every module of models/, server/ and trainer/ is parsed with
`ast`, and every import statement counts — at module level, inside functions
(the lazy imports of heavy libraries) and under `if TYPE_CHECKING:`.

Type-only imports count for every rule, cycles included: a module that names
another's types depends on that module's contract even though Python never
runs the import (the evaluate ↔ report cycle of issue 15 was half type-only).
`importlib.import_module("...")` calls are not import statements and are not
seen; the CLI root uses them to load the stages' commands by name.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"models": "shoptalk.models", "server": "shoptalk.server", "trainer": "shoptalk.trainer"}
CLI_ROOT = "shoptalk.models.cli"
TRAINING_STACK = ("torch", "transformers", "peft", "accelerate")
LSP_STACK = ("pygls", "lsprotocol")
RULES = "see docs/architecture.md, 'Who may import whom'"


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported module (a ShopTalk module when it is one)
    file: Path
    line: int
    type_only: bool  # under `if TYPE_CHECKING:`

    @property
    def where(self) -> str:
        try:
            shown = self.file.relative_to(ROOT)
        except ValueError:
            shown = self.file
        return f"{shown}:{self.line}"

    def top(self) -> str:
        return self.target.split(".", 1)[0]

    def within(self, package: str) -> bool:
        return self.target == package or self.target.startswith(package + ".")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Every ShopTalk module by its installed name."""
    modules: dict[str, Path] = {}
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, file: Path, known: Iterable[str], is_package: bool):
        self.module, self.file, self.known = module, file, set(known)
        self.package = module if is_package else module.rpartition(".")[0]
        self.type_only = 0
        self.found: list[Import] = []

    def _add(self, target: str, node: ast.stmt) -> None:
        self.found.append(Import(self.module, target, self.file, node.lineno, self.type_only > 0))

    def visit_If(self, node: ast.If) -> None:
        if not _is_type_checking(node.test):
            self.generic_visit(node)
            return
        self.type_only += 1
        for child in node.body:
            self.visit(child)
        self.type_only -= 1
        for child in node.orelse:
            self.visit(child)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            anchor = self.package.split(".")
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            # `from shoptalk.trainer import report` imports the module report.
            submodule = f"{base}.{alias.name}"
            self._add(submodule if submodule in self.known else base, node)


def imports_in(source: str, module: str, file: Path, known: Iterable[str] = ()) -> list[Import]:
    collector = _Collector(module, file, known, file.stem == "__init__")
    collector.visit(ast.parse(source, filename=str(file)))
    return collector.found


@functools.cache
def all_imports() -> tuple[Import, ...]:
    modules = module_files()
    found: list[Import] = []
    for module, path in modules.items():
        found += imports_in(path.read_text(encoding="utf-8"), module, path, modules)
    return tuple(found)


@dataclass(frozen=True)
class Cycle:
    modules: tuple[str, ...]  # every module of a group that import each other
    imports: tuple[Import, ...]  # one shortest cycle through the group

    def describe(self) -> str:
        steps = [f"{imp.source} imports {imp.target} ({imp.where})" for imp in self.imports]
        return (
            f"import cycle among {', '.join(self.modules)}: "
            + "; ".join(steps)
            + ". Move what both need into a module of its own that imports neither."
        )


def find_cycles(imports: Iterable[Import], modules: Iterable[str]) -> list[Cycle]:
    """Each strongly connected group of modules that import each other,
    directly or through others, with one cycle through it."""
    known = set(modules)
    edges: dict[str, dict[str, Import]] = {m: {} for m in known}
    for imp in imports:
        if imp.target in known and imp.target != imp.source:
            edges[imp.source].setdefault(imp.target, imp)
    return [
        Cycle(tuple(sorted(group)), tuple(_cycle_in(group, edges)))
        for group in _strongly_connected(edges)
        if len(group) > 1
    ]


def _strongly_connected(edges: dict[str, dict[str, Import]]) -> Iterator[set[str]]:
    """Tarjan's algorithm, iterative (in sorted order, so reports are stable)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.add(member)
                    if member == node:
                        break
                yield group


def _cycle_in(group: set[str], edges: dict[str, dict[str, Import]]) -> list[Import]:
    """A shortest cycle through the group's first module (breadth first)."""
    start = min(group)
    paths: dict[str, list[Import]] = {start: []}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child, imp in sorted(edges[node].items()):
            if child == start:
                return [*paths[node], imp]
            if child in group and child not in paths:
                paths[child] = [*paths[node], imp]
                queue.append(child)
    raise AssertionError(f"no cycle through {start} in {sorted(group)}")


def _report(broken: list[Import], rule: str) -> str:
    lines = [
        f"{imp.where}: {imp.source} imports {imp.target}"
        + (" (under TYPE_CHECKING)" if imp.type_only else "")
        for imp in broken
    ]
    return f"{rule} ({RULES}):\n" + "\n".join(dict.fromkeys(lines))


def _in(package: str) -> list[Import]:
    return [imp for imp in all_imports() if imp.source.split(".")[:2] == package.split(".")]


# ------------------------------------------------------------------ the rules


def test_no_import_cycles_among_shoptalk_modules() -> None:
    cycles = find_cycles(all_imports(), module_files())
    assert not cycles, "\n".join(c.describe() for c in cycles)


def test_no_stage_module_imports_the_cli_root() -> None:
    broken = [
        imp
        for imp in all_imports()
        if imp.within(CLI_ROOT) and imp.source.rpartition(".")[2] != "cli"
    ]
    assert not broken, _report(broken, "a stage module imports the CLI root")


def test_server_never_imports_the_training_stack() -> None:
    broken = [imp for imp in _in("shoptalk.server") if imp.top() in TRAINING_STACK]
    assert not broken, _report(broken, "server/ imports " + "/".join(TRAINING_STACK))


def test_trainer_never_imports_the_lsp_stack() -> None:
    broken = [imp for imp in _in("shoptalk.trainer") if imp.top() in LSP_STACK]
    assert not broken, _report(broken, "trainer/ imports " + "/".join(LSP_STACK))


def test_models_imports_neither_half() -> None:
    """The CLI root is the one exception: it is the composition root that puts
    the halves' commands together (`models pull` converts the HF checkpoint,
    `doctor` asks the training half for its torch checks), always lazily."""
    broken = [
        imp
        for imp in _in("shoptalk.models")
        if (imp.within("shoptalk.server") or imp.within("shoptalk.trainer"))
        and imp.source != CLI_ROOT
    ]
    assert not broken, _report(broken, "models/ imports shoptalk.server or shoptalk.trainer")


def test_the_cli_root_reaches_the_halves_only_lazily() -> None:
    """`shoptalk --help` and a serve-only install import the root: importing
    it may not import a half (only its command functions do)."""
    tree = ast.parse(module_files()[CLI_ROOT].read_text(encoding="utf-8"))
    deferred = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    at_import = {
        node.lineno
        for statement in tree.body
        if not isinstance(statement, deferred)
        for node in ast.walk(statement)
        if isinstance(node, ast.Import | ast.ImportFrom)
    }
    broken = [
        imp
        for imp in all_imports()
        if imp.source == CLI_ROOT
        and imp.line in at_import
        and (imp.within("shoptalk.server") or imp.within("shoptalk.trainer"))
    ]
    assert not broken, _report(broken, "the CLI root imports a half when it is imported")


def test_models_never_imports_the_training_stack() -> None:
    broken = [imp for imp in _in("shoptalk.models") if imp.top() in TRAINING_STACK]
    assert not broken, _report(broken, "models/ imports " + "/".join(TRAINING_STACK))


# ------------------------------------------------------------------ the checker


def test_the_checker_sees_lazy_and_type_only_imports_and_names_their_lines() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from shoptalk.trainer.evaluate import EvalSet\n"
        "else:\n"
        "    import json\n"
        "def f():\n"
        "    import torch.nn\n"
        "    from . import report\n"
    )
    file = ROOT / "trainer" / "example.py"
    known = {"shoptalk.trainer.evaluate", "shoptalk.trainer.report"}
    found = imports_in(source, "shoptalk.trainer.example", file, known)
    seen = {(imp.target, imp.line, imp.type_only) for imp in found}
    assert seen == {
        ("typing", 1, False),
        ("shoptalk.trainer.evaluate", 3, True),
        ("json", 5, False),
        ("torch.nn", 7, False),
        ("shoptalk.trainer.report", 8, False),
    }
    torch = next(imp for imp in found if imp.top() == "torch")
    assert _report([torch], "rule").endswith(
        "trainer/example.py:7: shoptalk.trainer.example imports torch.nn"
    )


def test_the_checker_reports_a_cycle_with_each_import_and_its_line() -> None:
    files = {m: ROOT / "trainer" / f"{m[-1]}.py" for m in ("pkg.a", "pkg.b", "pkg.c", "pkg.d")}
    sources = {
        "pkg.a": "import pkg.b\n",
        "pkg.b": "import os\n\ndef late():\n    from pkg import c\n",
        "pkg.c": "if TYPE_CHECKING:\n    import pkg.a\n",
        "pkg.d": "import pkg.a\n",
    }
    found = [imp for m, text in sources.items() for imp in imports_in(text, m, files[m], files)]
    (cycle,) = find_cycles(found, files)
    assert cycle.describe().startswith(
        "import cycle among pkg.a, pkg.b, pkg.c: pkg.a imports pkg.b (trainer/a.py:1); "
        "pkg.b imports pkg.c (trainer/b.py:4); pkg.c imports pkg.a (trainer/c.py:2)."
    )
    assert find_cycles([imp for imp in found if imp.source != "pkg.c"], files) == []


# ------------------------------------------------------------------ size

MAX_FUNCTION_LINES = 120


def long_functions(limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Every function or method of models/, server/ and trainer/ longer than
    `limit` lines (decorators excluded, nested functions counted in their
    parent too), as `file:line name (N lines)`."""
    found = []
    for path in module_files().values():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > limit:
                    where = f"{path.relative_to(ROOT)}:{node.lineno}"
                    found.append(f"{where} {node.name} ({length} lines)")
    return sorted(found)


def test_no_function_is_over_the_size_limit() -> None:
    broken = long_functions()
    assert not broken, (
        f"functions over {MAX_FUNCTION_LINES} lines (split them into steps with one job each):\n"
        + "\n".join(broken)
    )
