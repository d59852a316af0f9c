"""Names a query spells out: "`HelpFormatter.write_usage` adds spaces" names
the module that defines `write_usage`; "types in `formatting`" names the
module called `formatting`.

Word rankings (BM25, the embedding) read such a name as a few sub-words among
the others, and a repository-wide word like `format` drowns it. Here a name
counts only when it is written like code (in backticks, with `()`, dotted,
snake_case or camelCase, or as a file path) and only when few modules define
it (a name defined everywhere, like `__init__` or `main`, says nothing).
Plain words that happen to be module names do not count: in a repository of
widgets "tweak the button style" names `style.py` no more than `button.py`
(measured in docs/benchmarks.md: on Textualize/textual such matches were right
1 time in 4, and code-written names alone scored higher on every repository).
The ranking is fused with the others in `shoptalk.models.module_lookup`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from shoptalk.models.module_map import Module

# A name defined in more modules than this does not point at one.
MAX_DEFINERS = 3
FULL_NAME_WEIGHT = 2.0  # a module's full dotted id or a file path leaves no doubt

_SPAN = re.compile(r"`([^`]+)`|([A-Za-z_][\w.]*\w)(\(\))?")
# A file path as written in a query: `src/pkg/core.py`, `core.py`, `pkg/core`.
_PATH = re.compile(
    r"(?<![\w/.-])((?:[\w.-]+/)*[\w-]+\.(?:py|pyi|js|jsx|ts|tsx|go|java|rs|rb|c|h|cc|cpp|hpp))\b"
)
_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


def _module_key(name: str) -> str:
    """Module names compare without case and leading underscores: `_termui_impl` ~ `termui_impl`."""
    return name.lower().lstrip("_")


def _ends(path: str, written: str) -> bool:
    return path == written or path.endswith("/" + written.lstrip("./"))


def _looks_like_code(token: str, quoted: bool, called: bool) -> bool:
    return (
        quoted
        or called
        or "_" in token
        or "." in token
        or re.search(r"[a-z][A-Z]", token) is not None
    )


@dataclass(frozen=True)
class NamedModule:
    id: str
    name: str  # the name in the query that points at it


@dataclass
class NameTable:
    """Which modules define each symbol name and which are called each name."""

    symbols: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    modules: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    ids: dict[str, str] = field(default_factory=dict)  # lower-case id -> id
    # file name -> (path, module id) of every file with that name
    files: dict[str, list[tuple[str, str]]] = field(default_factory=lambda: defaultdict(list))

    @classmethod
    def of(cls, modules: Iterable[Module]) -> NameTable:
        table = cls()
        for module in modules:
            for symbol in module.symbols:
                for part in symbol.name.split("."):
                    table.symbols[part].add(module.id)
            last = re.split(r"[./]", module.id)[-1]
            table.modules[_module_key(last)].add(module.id)
            table.ids[module.id.lower()] = module.id
            for path in module.files:
                table.modules[_module_key(PurePosixPath(path).stem)].add(module.id)
                table.files[PurePosixPath(path).name].append((path, module.id))
        return table

    def named(self, query: str, allowed: set[str]) -> list[NamedModule]:
        """The modules the query names, strongest first; [] when it names none."""
        score: dict[str, float] = defaultdict(float)
        why: dict[str, str] = {}
        for path in _PATH.findall(query):
            definers = {m for p, m in self.files.get(path.rsplit("/", 1)[-1], []) if _ends(p, path)}
            self._add(definers, path, allowed, score, why, FULL_NAME_WEIGHT)
        for match in _SPAN.finditer(_PATH.sub(" ", query)):
            quoted, plain, called = match.group(1), match.group(2), match.group(3)
            for token in _DOTTED.findall(quoted or plain or ""):
                if not _looks_like_code(token, quoted is not None, called is not None):
                    continue
                consumed = self._vote_dotted(token, allowed, score, why)
                for name in token.split(".")[consumed:]:
                    self._add(self.modules.get(_module_key(name), set()), name, allowed, score, why)
                    self._add(self.symbols.get(name, set()), name, allowed, score, why)
        ranked = sorted(score, key=lambda mid: (-score[mid], mid))
        return [NamedModule(mid, why[mid]) for mid in ranked]

    def _vote_dotted(
        self,
        token: str,
        allowed: set[str],
        score: dict[str, float],
        why: dict[str, str],
    ) -> int:
        """`pkg.sub.mod.func`: the longest dotted prefix that is a module id
        names it; returns how many parts that prefix took (0: none)."""
        parts = token.split(".")
        for end in range(len(parts), 1, -1):
            found = self.ids.get(".".join(parts[:end]).lower())
            if found is not None:
                self._add({found}, ".".join(parts[:end]), allowed, score, why, FULL_NAME_WEIGHT)
                return end
        return 0

    @staticmethod
    def _add(
        definers: set[str],
        name: str,
        allowed: set[str],
        score: dict[str, float],
        why: dict[str, str],
        weight: float = 1.0,
    ) -> None:
        definers = definers & allowed
        if not definers or len(definers) > MAX_DEFINERS:
            return
        for mid in definers:
            score[mid] += weight / len(definers)
            why.setdefault(mid, name)
