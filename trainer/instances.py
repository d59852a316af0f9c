"""Training and test instances made from one commit (pure functions on text).

- completion: an added line with its last n whitespace tokens masked,
  n ∈ [3, min(50, T−1)] drawn from a generator seeded by (seed, commit, path,
  line); prefix/suffix are the file at that commit around the masked span,
  clipped at the cursor by `shoptalk.models.prompt.clip_context`; with
  repository context on, `context` holds the candidates of the server's
  context block at that cursor over the parent commit's files
  (`shoptalk.models.context.mined_context`; training and evaluation render
  the block for their budgets with `stored_context_block`);
- commit_message: the commit's diff → its cleaned message;
- module_lookup: cleaned message → modules touched, and a docstring's first
  line → its module;
- test_pair: code under test → the test code added beside it;
- doc_modules: documentation text → the modules it mentions.

Records carry `author_time` until the dataset is built; the author is
identified by the commit (its merged author id is set then). Author names and
emails are never part of a record.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from shoptalk.models.module_map import FileSummary, Symbol, summarize_file
from shoptalk.models.prompt import clip_context, clip_suffix
from shoptalk.trainer.git_log import Commit, FileChange, Hunk, quote_path
from shoptalk.trainer.source_files import language_of, stem_under_test

MIN_MASK = 3
MAX_MASK = 50
MAX_MODULES_PER_MESSAGE = 10
MIN_QUERY_WORDS = 3

_WHITESPACE_TOKEN = re.compile(r"\S+")


def record_id(*parts: object) -> str:
    # surrogateescape: a path holding non-UTF-8 bytes still hashes (the same
    # way as before for every other path).
    joined = ":".join(str(p) for p in parts).encode("utf-8", "surrogateescape")
    return hashlib.sha1(joined).hexdigest()[:16]


def mask_span(line: str, rng: random.Random) -> tuple[int, int, int] | None:
    """(start, end, n): the last n whitespace tokens of `line` span
    line[start:end]; None when the line has fewer than MIN_MASK + 1 tokens."""
    tokens = list(_WHITESPACE_TOKEN.finditer(line))
    total = len(tokens)
    if total < MIN_MASK + 1:
        return None
    n = rng.randint(MIN_MASK, min(MAX_MASK, total - 1))
    return tokens[total - n].start(), tokens[-1].end(), n


def line_rng(seed: int, commit: str, path: str, line: int) -> random.Random:
    # Seeded with the UTF-8 bytes, as `Random(str)` does itself, plus
    # surrogateescape so that a path holding non-UTF-8 bytes cannot fail.
    return random.Random(f"{seed}:{commit}:{path}:{line}".encode("utf-8", "surrogateescape"))


@dataclass(frozen=True)
class AddedLine:
    line: int  # 1-based, in the new file
    modification: bool  # right after deleted lines (the hunk replaced lines)


def added_lines(hunks: Iterable[Hunk]) -> list[AddedLine]:
    result: list[AddedLine] = []
    for hunk in hunks:
        for offset in range(hunk.new_count):
            result.append(AddedLine(hunk.new_start + offset, hunk.old_count > 0))
    return result


@dataclass
class SourceFile:
    """A kept file of a commit: its (scrubbed) content at the commit.

    `known_paths` are the repository's `__init__.py` files (Python module ids
    depend on where they are; other files do not matter)."""

    change: FileChange
    path: str
    language: str | None
    text: str
    known_paths: frozenset[str] = frozenset()
    _lines: list[str] | None = None
    _offsets: list[int] | None = None
    _summary: FileSummary | None = None
    _parsed: bool = False

    @property
    def lines(self) -> list[str]:
        if self._lines is None:
            self._lines = self.text.split("\n")
        return self._lines

    @property
    def offsets(self) -> list[int]:
        if self._offsets is None:
            offsets = [0]
            for line in self.lines[:-1]:
                offsets.append(offsets[-1] + len(line) + 1)
            self._offsets = offsets
        return self._offsets

    @property
    def summary(self) -> FileSummary | None:
        """Module id, symbols and docstrings (tree-sitter), parsed on first use;
        None for languages the module map does not parse."""
        if not self._parsed:
            self._parsed = True
            self._summary = summarize_file(
                self.path, self.text, set(self.known_paths) | {self.path}
            )
        return self._summary

    def symbols(self) -> tuple[Symbol, ...]:
        summary = self.summary
        return summary.symbols if summary else ()

    def added(self) -> list[AddedLine]:
        return [a for a in added_lines(self.change.hunks) if a.line <= len(self.lines)]

    def added_text(self) -> str:
        return "\n".join(self.lines[a.line - 1] for a in self.added())


def enclosing_symbol(symbols: Iterable[Symbol], line: int) -> str | None:
    """The innermost function/class containing `line` (1-based), qualified."""
    best: Symbol | None = None
    for symbol in symbols:
        if symbol.start_line <= line <= symbol.end_line and (
            best is None or symbol.start_line >= best.start_line
        ):
            best = symbol
    return best.name if best else None


def base_record(kind: str, commit: Commit, path: str, language: str | None) -> dict[str, Any]:
    return {
        "kind": kind,
        "commit": commit.sha,
        "author_time": commit.author_time,
        "author_date": commit.author_date,
        "path": path,
        "language": language or "text",
    }


# The repository context of a cursor: (path, the file before the cursor, the
# file after it) -> the record's "context" field (`models.context.mined_context`).
ContextOf = Callable[[str, str, str], dict[str, Any]]


def completion_instances(
    commit: Commit,
    files: list[SourceFile],
    seed: int,
    prefix_chars: int,
    suffix_chars: int,
    max_per_commit: int,
    context: ContextOf | None = None,
) -> list[dict[str, Any]]:
    """The completion instances of a commit's files; with `context`, each
    carries the repository context at the cursor (`context(path, prefix,
    suffix)` of the whole file's text around the masked span)."""
    candidates: list[tuple[SourceFile, AddedLine]] = []
    for source in files:
        if source.language is None:
            continue
        for added in source.added():
            if len(_WHITESPACE_TOKEN.findall(source.lines[added.line - 1])) > MIN_MASK:
                candidates.append((source, added))
    if len(candidates) > max_per_commit:
        rng = random.Random(f"{seed}:{commit.sha}")
        chosen = sorted(rng.sample(range(len(candidates)), max_per_commit))
        candidates = [candidates[i] for i in chosen]
    records: list[dict[str, Any]] = []
    for source, added in candidates:
        text = source.lines[added.line - 1]
        span = mask_span(text, line_rng(seed, commit.sha, source.path, added.line))
        if span is None:
            continue
        start, end, n = span
        line_start = source.offsets[added.line - 1]
        prefix = source.text[: line_start + start]
        suffix = source.text[line_start + end :]
        parts = clip_context(prefix, suffix, prefix_chars, suffix_chars)
        record = base_record("completion", commit, source.path, source.language)
        record.update(
            id=record_id("completion", commit.sha, source.path, added.line),
            prefix=parts.prefix,
            target=text[start:end],
            suffix=parts.suffix,
            symbol=enclosing_symbol(source.symbols(), added.line),
            modification=added.modification,
            masked_tokens=n,
            line=added.line,
        )
        if context is not None:
            record["context"] = context(source.path, prefix, suffix)
        records.append(record)
    return records


# ---- commit messages -----------------------------------------------------------

_TRAILER = re.compile(r"^[A-Za-z][A-Za-z0-9-]*(?:-[Bb]y|-[Ii]d|-[Tt]o)?: \S.*$")
_KNOWN_TRAILER = re.compile(
    r"(?i)^(signed-off-by|co-authored-by|reviewed-by|acked-by|tested-by|reported-by|"
    r"suggested-by|helped-by|change-id|cc|fixes|closes|resolves|refs|see-also|bug|"
    r"pr-url|differential revision|reviewed-on|issue):"
)
_ISSUE_PHRASE = re.compile(
    r"(?i)\b(?:close[sd]?|fix(?:e[sd])?|resolve[sd]?|refs?|see|related to|part of|addresses)"
    r"\s*:?\s*(?:[\w.-]+/[\w.-]+)?(?:#|GH-)\d+"
)
_ISSUE_REF = re.compile(r"\s*\(?(?:[\w.-]+/[\w.-]+)?(?:#|\bGH-)\d+\)?")
_JIRA_PREFIX = re.compile(r"^\s*\[?[A-Z][A-Z0-9]+-\d+\]?:?\s*")
_ISSUE_URL = re.compile(r"https?://\S+/(?:issues|pull|pulls|merge_requests)/\d+\S*")
_CI_TAGS = re.compile(r"(?i)\[(?:skip ci|ci skip|no ci|skip actions)\]")


def clean_message(message: str) -> str:
    """Subject and body without trailers, issue references or CI tags."""
    lines = message.strip().split("\n")
    while lines and (not lines[-1].strip() or _TRAILER.match(lines[-1].strip())):
        lines.pop()
    kept: list[str] = []
    for raw in lines:
        line = raw.rstrip()
        if _KNOWN_TRAILER.match(line.strip()):
            continue
        line = _ISSUE_URL.sub("", line)
        line = _ISSUE_PHRASE.sub("", line)
        line = _ISSUE_REF.sub("", line)
        line = _CI_TAGS.sub("", line)
        if not kept:
            line = _JIRA_PREFIX.sub("", line)
        # Removed references leave stray punctuation behind ("twice. , .").
        line = re.sub(r"[ \t]+([,.;:!?])", r"\1", line)
        line = re.sub(r"(?<=[.!?])[,;:.]+", "", line)
        line = re.sub(r"[ \t]+", " ", line).rstrip(" ,;:")
        if kept or line.strip():
            kept.append(line)
    text = "\n".join(kept).strip()
    return re.sub(r"\n{3,}", "\n\n", text)


def diff_text(files: Iterable[FileChange]) -> str:
    parts: list[str] = []
    for change in files:
        old = quote_path(f"a/{change.old_path}") if change.old_path else "/dev/null"
        new = quote_path(f"b/{change.new_path}") if change.new_path else "/dev/null"
        parts.append(f"--- {old}\n+++ {new}")
        for hunk in change.hunks:
            parts.append(
                f"@@ -{hunk.old_start},{hunk.old_count} +{hunk.new_start},{hunk.new_count} @@"
            )
            parts.extend(f"-{line}" for line in hunk.removed)
            parts.extend(f"+{line}" for line in hunk.added)
    return "\n".join(parts) + "\n" if parts else ""


def commit_message_instance(
    commit: Commit, changes: list[FileChange], message: str, diff: str, max_chars: int
) -> dict[str, Any] | None:
    if len(message.split()) < 2 or not diff.strip() or not changes:
        return None
    path = changes[0].path
    record = base_record("commit_message", commit, path, language_of(path))
    record.update(
        id=record_id("commit_message", commit.sha),
        prompt=clip_suffix(diff, max_chars),
        target=message,
    )
    return record


def message_lookup_instance(
    commit: Commit, message: str, modules: list[str], path: str
) -> dict[str, Any] | None:
    if len(message.split()) < MIN_QUERY_WORDS or not modules:
        return None
    if len(modules) > MAX_MODULES_PER_MESSAGE:
        return None
    record = base_record("module_lookup", commit, path, language_of(path))
    record.update(
        id=record_id("module_lookup", commit.sha, "message"),
        query=message,
        modules=sorted(modules),
        source="commit_message",
    )
    return record


def docstring_lookup_instances(commit: Commit, source: SourceFile) -> list[dict[str, Any]]:
    """A docstring's first line → its module, for the docstrings this commit wrote."""
    summary = source.summary
    if summary is None:
        return []
    added = {a.line for a in source.added()}
    records: list[dict[str, Any]] = []
    for symbol in summary.symbols:
        first = symbol.doc
        if not first or len(first.split()) < MIN_QUERY_WORDS:
            continue
        # The docstring sits in the symbol's first lines (a doc comment just
        # above it in Java/JS/Go); count it when one
        # of the lines holding it was added by this commit.
        doc_lines = range(
            max(1, symbol.start_line - 8), min(symbol.end_line, symbol.start_line + 8) + 1
        )
        if not any(line in added and first in source.lines[line - 1] for line in doc_lines):
            continue
        record = base_record("module_lookup", commit, source.path, source.language)
        record.update(
            id=record_id("module_lookup", commit.sha, source.path, symbol.name),
            query=first,
            modules=[summary.module_id],
            source="docstring",
        )
        records.append(record)
    return records


def test_pair_instances(
    commit: Commit, files: list[SourceFile], is_test: Callable[[str], bool], max_chars: int
) -> list[dict[str, Any]]:
    code_by_stem: dict[str, SourceFile] = {}
    for source in files:
        if source.language is not None and not is_test(source.path):
            code_by_stem.setdefault(PurePosixPath(source.path).stem, source)
    records: list[dict[str, Any]] = []
    for test in files:
        if test.language is None or not is_test(test.path):
            continue
        stem = stem_under_test(test.path)
        code = code_by_stem.get(stem) if stem else None
        added = test.added_text()
        if code is None or len(added.split()) < MIN_QUERY_WORDS:
            continue
        record = base_record("test_pair", commit, test.path, test.language)
        record.update(
            id=record_id("test_pair", commit.sha, test.path),
            prompt=f"# {code.path}\n{clip_suffix(code.text, max_chars)}",
            target=clip_suffix(added + "\n", max_chars),
        )
        records.append(record)
    return records


_MENTION = re.compile(r"[A-Za-z_][\w./-]*[\w]")


def mentioned_modules(text: str, module_of_path: dict[str, str]) -> list[str]:
    """Module ids that `text` names, by id (`pkg.mod`) or by file path."""
    ids = set(module_of_path.values())
    found: set[str] = set()
    for token in _MENTION.findall(text):
        token = token.strip("./")
        if token in ids:
            found.add(token)
        elif token in module_of_path:
            found.add(module_of_path[token])
    return sorted(found)


def doc_modules_instance(
    commit: Commit, doc: SourceFile, module_of_path: dict[str, str], max_chars: int
) -> dict[str, Any] | None:
    text = doc.added_text().strip()
    if len(text.split()) < 5:
        return None
    modules = mentioned_modules(text, module_of_path)
    if not modules:
        return None
    record = base_record("doc_modules", commit, doc.path, "markdown")
    record.update(
        id=record_id("doc_modules", commit.sha, doc.path),
        query=clip_suffix(text, max_chars),
        modules=modules,
    )
    return record
