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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from shoptalk.models.module_map import Module, ModuleMap, Symbol, summarize_file
from shoptalk.models.prompt import clip_prefix, clip_suffix, file_header, resolve_suffix_layout
from shoptalk.models.workspace_index import Window, WorkspaceIndex, identifiers

ContextSource = Literal["snippets", "imports", "recent"]
CONTEXT_SOURCES: tuple[ContextSource, ...] = ("snippets", "imports", "recent")
QUERY_LINES = 12
CONTEXT_LINE_STEP = 16  # the server keeps a block while the cursor stays in such a stretch
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


def context_anchor(head: str) -> int:
    """The first line of the cursor's stretch of CONTEXT_LINE_STEP lines
    (`head`: the text before the cursor's line)."""
    line = head.count("\n")
    return line - line % CONTEXT_LINE_STEP


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
    candidates = gather_candidates(workspace, path, prefix, suffix, options.sources)
    return render_candidates(candidates, options, visible_lines(prefix, suffix, options))


def visible_lines(prefix: str, suffix: str, options: ContextOptions) -> tuple[int, int]:
    """The lines (0-based, end exclusive) of the document the prompt itself
    shows around the cursor under the budgets of `options`: no window of them
    is repeated in the block."""
    head, tail = _split_cursor(prefix, suffix)
    cursor_line = head.count("\n")
    shown_before = clip_prefix(head, options.prefix_chars).count("\n")
    shown_after = clip_suffix(tail, options.suffix_chars).count("\n") if options.suffix_chars else 0
    return cursor_line - shown_before, cursor_line + 1 + shown_after


@dataclass(frozen=True)
class ContextCandidates:
    """Every piece a block can be chosen from at one cursor, whatever the
    budget, the sources and what the prompt shows of its own file: imported
    definitions, snippets best first (the other files' SNIPPET_CANDIDATES
    best and the current file's windows that rank above the last of them),
    recent files' windows. Mining stores them with an instance
    (`mined_context`), so training and evaluation render the block for
    their own budgets as the server would have."""

    path: str
    cursor_line: int
    imports: tuple[Piece, ...] = ()
    snippets: tuple[Piece, ...] = ()
    recent: tuple[Piece, ...] = ()

    def to_record(self) -> dict[str, Any]:
        """JSON-ready form: imported definitions and recent windows as
        [path, start, end, text]; snippets as [path, start, end] over the
        lines of `spans` ([path, first line, text]: each stretch of a file
        the snippets cover, once; neighbouring windows overlap by half)."""

        def rows(pieces: tuple[Piece, ...]) -> list[list[Any]]:
            return [[p.path, p.start, p.end, p.text] for p in pieces]

        covered: dict[str, dict[int, str]] = {}
        for piece in self.snippets:
            lines = covered.setdefault(piece.path, {})
            for offset, line in enumerate(piece.text.split("\n")):
                lines[piece.start + offset] = line
        spans: list[list[Any]] = []
        for path, lines in sorted(covered.items()):
            for number in sorted(lines):
                if spans and spans[-1][0] == path and spans[-1][1] + len(spans[-1][2]) == number:
                    spans[-1][2].append(lines[number])
                else:
                    spans.append([path, number, [lines[number]]])
        return {
            "cursor_line": self.cursor_line,
            "imports": rows(self.imports),
            "snippets": [[p.path, p.start, p.end] for p in self.snippets],
            "spans": [[path, first, "\n".join(lines)] for path, first, lines in spans],
            "recent": rows(self.recent),
        }

    @classmethod
    def from_record(cls, path: str, data: Mapping[str, Any]) -> ContextCandidates:
        def pieces(source: str) -> tuple[Piece, ...]:
            return tuple(
                Piece(source, str(p), int(start), int(end), str(text))
                for p, start, end, text in data.get(source, [])
            )

        lines: dict[tuple[str, int], str] = {}
        for span_path, first, text in data.get("spans", []):
            for offset, line in enumerate(str(text).split("\n")):
                lines[(str(span_path), int(first) + offset)] = line
        snippets = tuple(
            Piece(
                "snippets",
                str(p),
                int(start),
                int(end),
                "\n".join(lines.get((str(p), n), "") for n in range(int(start), int(end))),
            )
            for p, start, end in data.get("snippets", [])
        )
        return cls(
            path,
            int(data.get("cursor_line", 0)),
            pieces("imports"),
            snippets,
            pieces("recent"),
        )


def gather_candidates(
    workspace: Workspace,
    path: str | None,
    prefix: str,
    suffix: str,
    sources: Iterable[str] = CONTEXT_SOURCES,
) -> ContextCandidates:
    """The candidates of `build_context`'s block for this cursor (only the
    text before the cursor's line and after it counts)."""
    head, tail = _split_cursor(prefix, suffix)
    query = query_identifiers(head)
    current = path or ""
    wanted = set(sources)
    imports: list[Piece] = []
    snippets: list[Piece] = []
    recent: list[Piece] = []
    if "imports" in wanted and path:
        imports = imported_definitions(workspace, path, head, tail)
    if "snippets" in wanted:
        others, own = workspace.index.rank_windows(query, SNIPPET_CANDIDATES, current)
        if len(others) >= SNIPPET_CANDIDATES:
            last = _rank(others[-1])
            own = [w for w in own if _rank(w) < last]
        snippets = [_piece("snippets", w) for w in sorted([*others, *own], key=_rank)]
    if "recent" in wanted:
        windows = (
            workspace.index.best_window(other, query)
            for other in workspace.index.recent(RECENT_FILES + 1)
            if other != current
        )
        recent = [_piece("recent", w) for w in windows if w is not None]
    return ContextCandidates(
        current, head.count("\n"), tuple(imports), tuple(snippets), tuple(recent)
    )


def _rank(window: Window) -> tuple[float, str, int]:
    """The index's ranking order (best first; ties by path, then line)."""
    return (-window.score, window.path, window.start)


def render_candidates(
    candidates: ContextCandidates, options: ContextOptions, visible: tuple[int, int]
) -> str:
    """The block chosen from `candidates` within `options` (budget, sources),
    leaving out snippets of the current file's `visible` lines."""
    if options.chars <= 0:
        return ""
    current = candidates.path

    def shown(piece: Piece) -> bool:
        return piece.path == current and piece.start < visible[1] and piece.end > visible[0]

    chosen: dict[str, list[Piece]] = {}
    if "imports" in options.sources:
        chosen["imports"] = list(candidates.imports)
    if "snippets" in options.sources:
        chosen["snippets"] = [p for p in candidates.snippets if not shown(p)][:SNIPPET_CANDIDATES]
    if "recent" in options.sources:
        chosen["recent"] = list(candidates.recent)
    return render_block(select_pieces(chosen, options.chars))


# ---- mined instances: the candidates stored, the block rendered later -------------

# What the record of a mined completion instance holds under "context".
CONTEXT_RECORD_VERSION = 1


def mined_context(
    workspace: Workspace,
    path: str,
    prefix: str,
    suffix: str,
    prefix_chars: int,
    suffix_chars: int,
) -> dict[str, Any]:
    """The "context" field of a mined instance whose cursor sits between the
    whole file's `prefix` and `suffix`, with `workspace` the index (and
    module map) of the commit's parent: the candidates, and which lines the
    instance's own clipped prefix and suffix show (`prefix_chars`,
    `suffix_chars`: the budgets it was clipped with).

    Snippets of the file's own lines that a prompt of these budgets always
    shows (those before the cursor) are left out: no block of theirs can
    hold them, and they were a third of the candidates."""
    candidates = gather_candidates(workspace, path, prefix, suffix)
    before, _ = visible_lines(prefix, suffix, ContextOptions(1, (), prefix_chars, 0))
    _, after = visible_lines(prefix, suffix, ContextOptions(1, (), prefix_chars, suffix_chars))
    cursor = candidates.cursor_line
    candidates = replace(
        candidates,
        snippets=tuple(
            p
            for p in candidates.snippets
            if not (p.path == candidates.path and p.start < cursor + 1 and p.end > before)
        ),
    )
    return {
        "version": CONTEXT_RECORD_VERSION,
        **candidates.to_record(),
        "shown": {
            "prefix_chars": prefix_chars,
            "before": cursor - before,
            "suffix_chars": suffix_chars,
            "after": after - cursor - 1,
        },
    }


def stored_context_block(
    path: str, data: Mapping[str, Any] | None, prefix: str, suffix: str, options: ContextOptions
) -> str:
    """The block `build_context` gave at the instance's cursor, from the
    candidates mining stored (`mined_context`), for `options`; `prefix` and
    `suffix` are the instance's clipped ones. Exact for the budgets the
    instance was clipped with (and any smaller suffix budget that shows no
    suffix); other prefix/suffix budgets count the lines shown from the
    clipped text. "" for instances mined without context (older datasets)."""
    if not data or options.chars <= 0:
        return ""
    candidates = ContextCandidates.from_record(path, data)
    shown = data.get("shown", {})
    cursor = candidates.cursor_line
    if options.prefix_chars == shown.get("prefix_chars"):
        before = int(shown["before"])
    else:
        head = prefix[: prefix.rfind("\n") + 1]
        before = clip_prefix(head, options.prefix_chars).count("\n")
    if not options.suffix_chars:
        after = 0
    elif options.suffix_chars == shown.get("suffix_chars"):
        after = int(shown["after"])
    else:
        newline = suffix.find("\n")
        tail = suffix[newline + 1 :] if newline != -1 else ""
        after = clip_suffix(tail, options.suffix_chars).count("\n")
    return render_candidates(candidates, options, (cursor - before, cursor + 1 + after))


@dataclass(frozen=True)
class PromptConfig:
    """What a completion prompt shows, in the serve settings' terms: the
    in-file budgets, where the code after the cursor goes, the repository
    context's budget and sources. Serving, training and evaluation read one
    of these (defaults = `ServeSettings`' defaults)."""

    prefix_chars: int = 6000
    suffix_chars: int = 400
    suffix_layout: str = "auto"
    context_chars: int = 2000
    context_sources: tuple[str, ...] = CONTEXT_SOURCES

    @classmethod
    def of(cls, serve: Any) -> PromptConfig:
        """The configuration of a `ServeSettings` (or anything with its keys)."""
        return cls(
            prefix_chars=int(serve.prefix_chars),
            suffix_chars=int(serve.suffix_chars),
            suffix_layout=str(serve.suffix_layout),
            context_chars=int(serve.context_chars),
            context_sources=tuple(serve.context_sources),
        )

    def layout(self, use_fim: bool) -> str:
        return resolve_suffix_layout(self.suffix_layout, use_fim)

    def context_options(self, use_fim: bool) -> ContextOptions:
        """The context options the engine uses for this configuration (the
        suffix counts as shown only in a layout that shows it)."""
        shows_suffix = self.layout(use_fim) in ("fim", "before")
        return ContextOptions(
            chars=self.context_chars,
            sources=self.context_sources,
            prefix_chars=self.prefix_chars,
            suffix_chars=self.suffix_chars if shows_suffix else 0,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "prefix_chars": self.prefix_chars,
            "suffix_chars": self.suffix_chars,
            "suffix_layout": self.suffix_layout,
            "context_chars": self.context_chars,
            "context_sources": list(self.context_sources),
        }


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
            # Sorted: a set's order follows the hash seed, and the block must not.
            ids = [
                name,
                *(f"{name}.{u}" for u in sorted(used) if f"{name}.{u}" in module_map.modules),
            ]
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
