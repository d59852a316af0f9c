"""What a module is, as text a lookup can match: the module documents.

One document per module of a `ModuleMap`: its id and path, its symbols (with
the first line of their docs), its own docstring, what it imports and which
modules import it, and the subjects of the recent commits that touched it
(the repository's knowledge graph, flattened). Lexical ranking (BM25) reads
the fields with weights (`ModuleDoc.fields`); the embedding model reads
`ModuleDoc.text`, which puts the most telling parts first because the encoder
stops after 256 word pieces.

Commit history is mined elsewhere (git is not touched here): callers pass
`history`, `{module id: [subjects, newest first]}`. `history_from_pairs`
builds it from mined (query, modules) pairs. Test files are marked
(`is_test`): a test is not where a feature is implemented, so the lookup
leaves them out of its answers.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from shoptalk.models.module_map import Module, ModuleMap

RECENT_SUBJECTS = 12  # per module: newest first, enough to carry the team's words
SUBJECT_CHARS = 120
MAX_SYMBOLS = 40
MAX_LINKS = 12


def is_test_path(path: str) -> bool:
    """A test file by its name or folder (the rule mining uses for test pairs)."""
    pure = PurePosixPath(path)
    name = pure.name
    lowered = name.lower()
    parts = [p.lower() for p in pure.parts[:-1]]
    return (
        lowered.startswith("test_")
        or lowered == "conftest.py"
        or re.search(r"[._-](test|spec)\.[a-z]+\Z", lowered) is not None
        or re.search(r"_test\.[a-z]+\Z", lowered) is not None
        or re.search(r"Tests?\.java\Z", name) is not None
        or any(p in ("tests", "test", "__tests__", "spec", "testing") for p in parts)
    )


def is_test_module(module: Module) -> bool:
    return all(is_test_path(f) for f in module.files)


@dataclass(frozen=True)
class ModuleDoc:
    """One module as text: lexical fields with weights, and the encoder's text."""

    id: str
    path: str
    is_test: bool
    names: str  # id, path and symbol names: deliberate labels
    prose: str  # module and symbol docs
    links: str  # imports and importers
    history: str  # subjects of recent commits that touched it
    text: str  # what the embedding model reads

    def fields(self) -> list[tuple[str, int]]:
        """(text, weight) for lexical ranking: a name counts more than prose."""
        return [(self.names, 3), (self.prose, 1), (self.links, 1), (self.history, 1)]

    @property
    def digest(self) -> str:
        return hashlib.sha1(self.text.encode("utf-8")).hexdigest()[:16]


def split_subject(message: str) -> str:
    """A commit message's subject line, clipped."""
    first = message.strip().split("\n", 1)[0].strip()
    return first[:SUBJECT_CHARS]


def history_from_pairs(
    pairs: Iterable[tuple[str, Sequence[str]]], recent: int = RECENT_SUBJECTS
) -> dict[str, list[str]]:
    """`{module: [subject, ...]}` from (message, modules) pairs given newest first."""
    history: dict[str, list[str]] = {}
    for message, modules in pairs:
        subject = split_subject(message)
        if not subject:
            continue
        for module in modules:
            kept = history.setdefault(module, [])
            if len(kept) < recent and subject not in kept:
                kept.append(subject)
    return history


def importers_of(module_map: ModuleMap) -> dict[str, list[str]]:
    """`{module: [modules importing it]}` (Python dotted names, JS/TS relative paths, Go paths)."""
    ids = set(module_map.modules)
    found: dict[str, list[str]] = {}
    for module in module_map.modules.values():
        for target in {_resolve(name, module, ids) for name in module.imports} - {None, module.id}:
            assert target is not None
            found.setdefault(target, []).append(module.id)
    return {k: sorted(v) for k, v in found.items()}


def _resolve(name: str, module: Module, ids: set[str]) -> str | None:
    if name.startswith("."):  # JS/TS relative import: the folder it names
        folder = posixpath.dirname(module.path)
        target = posixpath.normpath(posixpath.join(folder, name))
        for candidate in (target, posixpath.dirname(target) or "."):
            if candidate in ids:
                return candidate
        return None
    parts = name.split(".")
    for end in range(len(parts), 0, -1):  # the longest known prefix: `a.b.c` in `a.b`
        candidate = ".".join(parts[:end])
        if candidate in ids:
            return candidate
    for candidate in ids:  # Go: an import path ending in a known folder
        if "/" in name and candidate != "." and name.endswith("/" + candidate):
            return candidate
    return None


def module_documents(
    module_map: ModuleMap, history: Mapping[str, Sequence[str]] | None = None
) -> dict[str, ModuleDoc]:
    """A document for every module of the map."""
    importers = importers_of(module_map)
    history = history or {}
    return {
        mid: module_document(module, importers.get(mid, []), history.get(mid, ()))
        for mid, module in module_map.modules.items()
    }


def module_document(module: Module, importers: Sequence[str], subjects: Sequence[str]) -> ModuleDoc:
    symbols = module.symbols[:MAX_SYMBOLS]
    names = " ".join([module.id, module.path, *(s.name for s in symbols)])
    symbol_docs = [f"{s.name}: {s.doc}" for s in symbols if s.doc]
    prose = " ".join([" ".join(module.doc.split()), *symbol_docs])
    imports = list(module.imports[:MAX_LINKS])
    links = " ".join([*imports, *importers[:MAX_LINKS]])
    recent = [s[:SUBJECT_CHARS] for s in subjects[:RECENT_SUBJECTS]]
    summary = module.summary()
    text_parts = [
        f"{module.id} ({module.path})",
        summary,
        "changes: " + "; ".join(recent) if recent else "",
        "defines " + ", ".join(s.name for s in symbols[:20]) if symbols else "",
        "; ".join(symbol_docs[:10]),
        "imports " + ", ".join(imports[:8]) if imports else "",
        "used by " + ", ".join(importers[:8]) if importers else "",
    ]
    return ModuleDoc(
        id=module.id,
        path=module.path,
        is_test=is_test_module(module),
        names=names,
        prose=prose,
        links=links,
        history=" ".join(recent),
        text=". ".join(p for p in text_parts if p),
    )
