"""The repository context of a completion prompt, and copy candidates.

`build_context(workspace, path, prefix, suffix, options)` is a pure function
of the workspace's state (its `WorkspaceIndex` and module map), the cursor
and the budget: serving calls it at the cursor, mining can call it with the
index of an instance's parent commit, and both get the same block.

The block is ordered pieces of other code, each under its file's header line
(`# billing/taxes.py`), as code models saw files concatenated in
pre-training:

- `snippets`: the index's best windows for the 12 lines before the cursor's
  line (BM25 over identifiers), never a window the prompt already shows;
- `imports`: the definitions (signature and docstring) of names the file
  imports from the workspace, found through the module map;
- `recent`: the window most like those lines in each recently opened or
  edited file.

Only the text before the cursor's line and after it counts, never the line
being typed, so typing never changes the block: the KV cache keeps it.

`copy_candidates` lists continuations of the cursor's line taken from the
open document and the index (lines that start with what is typed, the text
after an n-gram match of its last tokens, the line after a matching previous
line) for the engine's copy channel to score.
"""

from __future__ import annotations

import posixpath
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from shoptalk.models.module_map import Module, ModuleMap, Symbol, summarize_file
from shoptalk.models.prompt import clip_prefix, clip_suffix, file_header
from shoptalk.models.workspace_index import Window, WorkspaceIndex, identifiers

ContextSource = Literal["snippets", "imports", "recent"]
CONTEXT_SOURCES: tuple[ContextSource, ...] = ("snippets", "imports", "recent")
QUERY_LINES = 12
SNIPPET_CANDIDATES = 24
RECENT_FILES = 8
# Shares of the budget the first pass gives a source; what one leaves is
# filled in a second pass, snippets first.
IMPORTS_SHARE = 0.35
RECENT_SHARE = 0.3
SIGNATURE_LINES = 6
DOC_LINES = 6
CLASS_METHODS = 8
MAX_DEFINITIONS = 12
MAX_COPY_CANDIDATES = 4
COPY_WINDOWS = 48
NGRAM_TOKENS = 3
LINE_MATCH_WEIGHT = 4
MIN_NGRAM_CHARS = 6


@dataclass
class Workspace:
    """What the context is built from: the index of the workspace's files and
    its module map (None: no `imports` source)."""

    index: WorkspaceIndex
    module_map: ModuleMap | None = None


@dataclass(frozen=True)
class ContextOptions:
    """The budget (characters, 0 = no context), the sources, and how much of
    the current file the prompt shows itself (never repeated in the block)."""

    chars: int = 0
    sources: tuple[str, ...] = CONTEXT_SOURCES
    prefix_chars: int = 1600
    suffix_chars: int = 0  # lines after the cursor the prompt shows (0: none)


@dataclass(frozen=True)
class Piece:
    """Lines `start`..`end` (0-based, end exclusive) of `path` for the block."""

    source: str
    path: str
    start: int
    end: int
    text: str

    def rendered(self) -> str:
        body = self.text if self.text.endswith("\n") else self.text + "\n"
        return f"{file_header(self.path)}{body}\n"


def _split_cursor(prefix: str, suffix: str) -> tuple[str, str]:
    """The text before the cursor's line and after it (the line itself left out)."""
    head = prefix[: prefix.rfind("\n") + 1]
    newline = suffix.find("\n")
    tail = suffix[newline + 1 :] if newline != -1 else ""
    return head, tail


def query_identifiers(head: str, lines: int = QUERY_LINES) -> list[str]:
    """The retrieval query: identifiers of the last `lines` lines of `head`."""
    return identifiers("\n".join(head.split("\n")[-lines - 1 :]))


def build_context(
    workspace: Workspace | None,
    path: str | None,
    prefix: str,
    suffix: str,
    options: ContextOptions,
) -> str:
    """The context block for a cursor between `prefix` and `suffix` of `path`
    (POSIX, relative to the workspace root): pieces of other code under their
    file headers, at most `options.chars` characters, "" when off."""
    if workspace is None or options.chars <= 0:
        return ""
    head, tail = _split_cursor(prefix, suffix)
    cursor_line = head.count("\n")
    shown_before = clip_prefix(head, options.prefix_chars).count("\n")
    shown_after = clip_suffix(tail, options.suffix_chars).count("\n") if options.suffix_chars else 0
    visible = (cursor_line - shown_before, cursor_line + 1 + shown_after)
    query = query_identifiers(head)
    current = path or ""

    def shown(other: str, start: int, end: int) -> bool:
        return other == current and start < visible[1] and end > visible[0]

    candidates: dict[str, list[Piece]] = {}
    if "imports" in options.sources and path:
        candidates["imports"] = imported_definitions(workspace, path, head, tail)
    if "snippets" in options.sources:
        candidates["snippets"] = [
            _piece("snippets", w)
            for w in workspace.index.search(query, SNIPPET_CANDIDATES, skip=shown)
        ]
    if "recent" in options.sources:
        windows = (
            workspace.index.best_window(other, query)
            for other in workspace.index.recent(RECENT_FILES + 1)
            if other != current
        )
        candidates["recent"] = [_piece("recent", w) for w in windows if w is not None]
    return render_block(select_pieces(candidates, options.chars))


def _piece(source: str, window: Window) -> Piece:
    return Piece(source, window.path, window.start, window.end, window.text)


def select_pieces(candidates: dict[str, list[Piece]], budget: int) -> list[Piece]:
    """Pieces within `budget` characters (rendered), no two overlapping: each
    source first up to its share (imports, recent, then snippets with the
    rest), then what is left in the order snippets, imports, recent."""
    chosen: list[Piece] = []
    used = 0

    def overlaps(piece: Piece) -> bool:
        return any(
            c.path == piece.path and c.start < piece.end and c.end > piece.start for c in chosen
        )

    def fill(pieces: Iterable[Piece], cap: float) -> None:
        nonlocal used
        spent = 0
        for piece in pieces:
            cost = len(piece.rendered())
            if spent + cost > cap or used + cost > budget or piece in chosen or overlaps(piece):
                continue
            chosen.append(piece)
            spent += cost
            used += cost

    fill(candidates.get("imports", []), budget * IMPORTS_SHARE)
    fill(candidates.get("recent", []), budget * RECENT_SHARE)
    for source in ("snippets", "imports", "recent"):
        fill(candidates.get(source, []), budget)
    return chosen


def render_block(pieces: list[Piece]) -> str:
    """The block: recent files first, then snippets from the weakest to the
    best, then imported definitions, so the most useful code sits nearest the
    cursor."""
    order = {"recent": 0, "snippets": 1, "imports": 2}
    ranked = sorted(enumerate(pieces), key=lambda item: (order.get(item[1].source, 1), -item[0]))
    return "".join(piece.rendered() for _, piece in ranked)


# ---- imported definitions ---------------------------------------------------------


def imported_definitions(workspace: Workspace, path: str, head: str, tail: str) -> list[Piece]:
    """Signature and docstring of each workspace symbol the file imports and
    uses, the one used nearest the cursor first."""
    module_map = workspace.module_map
    if module_map is None:
        return []
    summary = summarize_file(path, head + tail, set(module_map.files) | {path})
    if summary is None:
        return []
    used = identifiers(head + tail)
    used_set = set(used)
    last_use = {name: index for index, name in enumerate(identifiers(head))}
    symbols: list[Symbol] = []
    for module, wanted_path in _imported_modules(
        summary.imports, summary.language, path, module_map, used_set
    ):
        for symbol in module.symbols:
            if symbol.path == path or "." in symbol.name or symbol.name not in used_set:
                continue
            if wanted_path is not None and not _same_module_file(symbol.path, wanted_path):
                continue
            symbols.append(symbol)
    symbols = list(dict.fromkeys(symbols))
    symbols.sort(key=lambda s: -last_use.get(s.name, -1))
    pieces: list[Piece] = []
    for symbol in symbols[:MAX_DEFINITIONS]:
        piece = _definition_piece(workspace.index, symbol, module_map)
        if piece is not None:
            pieces.append(piece)
    return pieces


def _same_module_file(symbol_path: str, wanted: str) -> bool:
    stem = symbol_path.rsplit(".", 1)[0]
    return stem == wanted or stem == f"{wanted}/index"


def _imported_modules(
    imports: Iterable[str], language: str, path: str, module_map: ModuleMap, used: set[str]
) -> list[tuple[Module, str | None]]:
    """The workspace modules named by a file's imports, each with the file
    stem it means (relative JS/TS imports name a file of a folder module)."""
    found: list[tuple[Module, str | None]] = []
    for name in imports:
        if language == "python":
            ids = [name, *(f"{name}.{u}" for u in used if f"{name}.{u}" in module_map.modules)]
            found.extend((m, None) for i in ids if (m := module_map.get(i)) is not None)
        elif language == "java":
            package = name.removesuffix(".*")
            for candidate in (package, package.rsplit(".", 1)[0]):
                module = module_map.get(candidate)
                if module is not None:
                    found.append((module, None))
                    break
        elif language in ("javascript", "typescript") and name.startswith("."):
            target = posixpath.normpath(posixpath.join(posixpath.dirname(path), name))
            for folder in (posixpath.dirname(target) or ".", target):
                module = module_map.get(folder)
                if module is not None:
                    found.append((module, target))
        elif language == "go":
            found.extend(
                (module, None)
                for module_id, module in module_map.modules.items()
                if module_id != "." and (name == module_id or name.endswith("/" + module_id))
            )
    return found


def _definition_piece(index: WorkspaceIndex, symbol: Symbol, module_map: ModuleMap) -> Piece | None:
    lines = index.lines(symbol.path)  # excluded files are not in the index
    if lines is None or symbol.start_line > len(lines):
        return None
    start, end, text = _definition_text(lines, symbol)
    if symbol.kind in ("class", "interface"):
        summary = module_map.files.get(symbol.path)
        methods = [
            s
            for s in (summary.symbols if summary else ())
            if s.name.startswith(symbol.name + ".")
            and s.name.count(".") == symbol.name.count(".") + 1
        ]
        for method in methods[:CLASS_METHODS]:
            _, method_end, signature = _definition_text(lines, method, with_doc=False)
            text += signature
            end = max(end, method_end)
    return Piece("imports", symbol.path, start, end, text)


def _definition_text(
    lines: list[str], symbol: Symbol, with_doc: bool = True
) -> tuple[int, int, str]:
    """(start, end, text) of a symbol's signature (and docstring), a body
    placeholder after it for Python."""
    start = symbol.start_line - 1
    python = symbol.path.endswith((".py", ".pyi"))
    end = start
    limit = min(len(lines), start + SIGNATURE_LINES)
    while end < limit:
        code = lines[end].split("#", 1)[0].rstrip() if python else lines[end].rstrip()
        end += 1
        if (python and code.endswith(":")) or (not python and ("{" in code or code.endswith(";"))):
            break
    if python and with_doc:
        end = _python_docstring_end(lines, end)
    body = lines[start:end]
    if python:
        indent = len(lines[start]) - len(lines[start].lstrip())
        body = [*body, " " * (indent + 4) + "..."]
    elif with_doc:
        first = start
        while (
            first > 0
            and start - first < DOC_LINES
            and lines[first - 1].strip().startswith(("//", "/*", "*"))
        ):
            first -= 1
        body = [*lines[first:start], *body]
        start = first
    return start, end, "\n".join(body) + "\n"


def _python_docstring_end(lines: list[str], end: int) -> int:
    if end >= len(lines):
        return end
    opening = lines[end].strip()
    quote = next((q for q in ('"""', "'''") if opening.lstrip("rRuUbB").startswith(q)), None)
    if quote is None:
        return end
    body = opening.lstrip("rRuUbB")[3:]
    if quote in body:
        return end + 1
    last = min(len(lines), end + DOC_LINES)
    for index in range(end + 1, last):
        if quote in lines[index]:
            return index + 1
    return last


# ---- copy candidates --------------------------------------------------------------


def copy_candidates(
    workspace: Workspace | None,
    path: str | None,
    prefix: str,
    suffix: str,
    limit: int = MAX_COPY_CANDIDATES,
) -> list[str]:
    """Continuations of the cursor's line found verbatim in the open document
    (`prefix` + `suffix`) and the index's files, the best attested first:
    the rest of lines that start with what is typed on the line, the text
    after an n-gram match of its last tokens, or (on an empty line) the line
    that follows a copy of the previous line."""
    line_start = prefix.rfind("\n") + 1
    typed_line = prefix[line_start:]
    typed = typed_line.lstrip()
    head, tail = _split_cursor(prefix, suffix)
    head_lines = head.split("\n")[:-1]
    # The open document without the cursor's line; the line above the cursor
    # is not a match for itself.
    sources: list[tuple[list[str], int]] = [(head_lines + tail.split("\n"), len(head_lines) - 1)]
    if workspace is not None:
        sources.extend((lines, -1) for lines in _indexed_lines(workspace.index, path, head, typed))
    previous = next((line for line in reversed(head_lines) if line.strip()), "")
    counts: Counter[str] = Counter()
    ngram = _ngram_tail(typed)
    for lines, own_line in sources:
        for found, weight in _continuations(lines, own_line, typed_line, typed, ngram, previous):
            counts[found] += weight
    line_rest = suffix.split("\n", 1)[0].strip()
    ranked = [c for c, _ in counts.most_common() if c.strip() and c.strip() != line_rest]
    return ranked[:limit]


def _indexed_lines(
    index: WorkspaceIndex, path: str | None, head: str, typed: str
) -> list[list[str]]:
    """Lines of index windows worth scanning: windows holding the typed
    line's rarest identifier, and the best windows for the lines above."""
    windows: list[Window] = []
    names = [n for n in identifiers(typed) if index.document_frequency(n)]
    if names:
        rarest = min(names, key=index.document_frequency)
        windows.extend(index.windows_with(rarest, COPY_WINDOWS))
    windows.extend(index.search(query_identifiers(head), 8))
    seen: set[tuple[str, int]] = set()
    found: list[list[str]] = []
    for window in windows:
        if window.path == path:
            continue  # the open document is read as it is now
        lines = []
        for offset, line in enumerate(window.text.split("\n")):
            key = (window.path, window.start + offset)
            if key not in seen:
                seen.add(key)
                lines.append(line)
        found.append(lines)
    return found


_TOKEN = re.compile(r"\w+|[^\w\s]")


def _ngram_tail(typed: str) -> str:
    """The typed line from its NGRAM_TOKENS-th last token on, or "" when short."""
    starts = [match.start() for match in _TOKEN.finditer(typed)]
    if len(starts) <= NGRAM_TOKENS:
        return ""
    tail = typed[starts[-NGRAM_TOKENS] :]
    return tail if len(tail) >= MIN_NGRAM_CHARS else ""


def _continuations(
    lines: list[str], own_line: int, typed_line: str, typed: str, ngram: str, previous: str
) -> Iterable[tuple[str, int]]:
    """(continuation, weight): a line that starts like the typed one counts
    LINE_MATCH_WEIGHT times an n-gram match in the middle of a line."""
    if len(typed.strip()) >= 2:
        for line in lines:
            stripped = line.lstrip()
            if stripped.startswith(typed):
                rest = stripped[len(typed) :].rstrip()
                if rest:
                    yield rest, LINE_MATCH_WEIGHT
            elif ngram and ngram in line:
                rest = line[line.index(ngram) + len(ngram) :].rstrip()
                if rest:
                    yield rest, 1
    elif not typed and previous.strip():
        for index, line in enumerate(lines[:-1]):
            following = lines[index + 1]
            if index == own_line:
                continue
            if line.strip() == previous.strip() and following.startswith(typed_line):
                rest = following[len(typed_line) :].rstrip()
                if rest.strip():
                    yield rest, LINE_MATCH_WEIGHT
