"""The workspace index: the team's source in overlapping line windows,
searchable by the identifiers they share with the code before the cursor.

Every indexed file is cut into windows of `CHUNK_LINES` lines every
`CHUNK_STRIDE` lines (the naive retrieval measured in issue 19: 16-line
windows, query = the last 12 lines). A window is the set of identifiers it
contains; retrieval is BM25 over those sets (binary term frequency, length
normalised), rarest query identifiers first with a cap on the postings read,
so a query costs milliseconds even on a large repository.

Updates are per file (open, edit, save, delete, a new commit on disk): the
file's old windows die, new ones are appended to the postings, and the
postings are compacted when dead windows outnumber live ones. Files that are
excluded (`shoptalk.models.exclusion.Exclusion`) or skipped (vendored,
generated, binary, huge, not UTF-8) never enter the index, so nothing taken
from it can put them in a prompt.

Pure of the server: built from a folder (`from_tree`) or from `{path: text}`
(`from_contents`, e.g. the blobs of a parent commit for mining). Thread-safe:
one lock guards updates and queries.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from array import array
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from shoptalk.models.exclusion import (
    Exclusion,
    content_skip_reason,
    decode_source,
    path_skip_reason,
    posix_path,
)
from shoptalk.models.module_map import MODULE_LANGUAGES

log = logging.getLogger(__name__)

CHUNK_LINES = 16
CHUNK_STRIDE = 8
# Postings read per query at most (rarest identifiers first: the common ones,
# whose postings are long, weigh little anyway).
MAX_POSTINGS_VISITED = 2_000_000
RECENT_FILES = 32
# Postings are rebuilt once dead windows pass this and the live ones.
COMPACT_MIN_DEAD = 4096
LINE_CACHE_FILES = 64
BM25_K1 = 1.2
BM25_B = 0.75

# Source files worth showing a model: the module map's languages plus the
# ones mining reads as text.
INDEXED_SUFFIXES = frozenset(
    {
        *MODULE_LANGUAGES,
        ".rs",
        ".c",
        ".h",
        ".cc",
        ".cpp",
        ".hpp",
        ".cs",
        ".kt",
        ".rb",
        ".php",
        ".scala",
        ".swift",
        ".sh",
        ".lua",
        ".sql",
        ".vue",
        ".svelte",
        ".dart",
        ".ex",
        ".exs",
        ".m",
        ".mm",
    }
)

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]+")


def identifiers(text: str) -> list[str]:
    """The identifiers of `text` (two characters or more), in order."""
    return _IDENTIFIER.findall(text)


def window_starts(line_count: int) -> list[int]:
    """First lines of the windows of a file of `line_count` lines: every
    CHUNK_STRIDE lines, the last window ending at the file's end."""
    starts = [0]
    while starts[-1] + CHUNK_LINES < line_count:
        starts.append(starts[-1] + CHUNK_STRIDE)
    return starts


@dataclass(frozen=True)
class IndexLimits:
    """How much of a workspace is indexed (files beyond the caps are counted
    as `cap` and left out)."""

    max_files: int = 20_000
    max_bytes: int = 32_000_000
    max_file_bytes: int = 1_000_000
    max_line_chars: int = 1000


@dataclass(frozen=True)
class Window:
    """Lines `start`..`end` (0-based, end exclusive) of `path`."""

    path: str
    start: int
    end: int
    text: str
    score: float = 0.0


@dataclass(slots=True)
class _Chunk:
    path: str
    start: int
    end: int
    tokens: array  # distinct identifier ids, sorted


@dataclass(slots=True)
class _File:
    text: str
    size: int
    chunks: list[int] = field(default_factory=list)


class WorkspaceIndex:
    """Windows of the workspace's source files, searchable by identifiers."""

    def __init__(self, exclusion: Exclusion | None = None, limits: IndexLimits | None = None):
        self.exclusion = exclusion or Exclusion()
        self.limits = limits or IndexLimits()
        self.version = 0  # bumped by every change
        self.skipped: Counter[str] = Counter()
        self._lock = threading.RLock()
        self._files: dict[str, _File] = {}
        self._bytes = 0
        self._ids: dict[str, int] = {}
        self._df: list[int] = []
        self._postings: list[array] = []
        self._chunks: list[_Chunk | None] = []
        self._live = 0
        self._total_size = 0
        self._sizes = array("I")  # identifiers per window (0: dead), for BM25
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._lines: OrderedDict[str, list[str]] = OrderedDict()

    # -- building --------------------------------------------------------------

    @classmethod
    def from_contents(
        cls,
        contents: Mapping[str, str],
        exclusion: Exclusion | None = None,
        limits: IndexLimits | None = None,
    ) -> WorkspaceIndex:
        """The index of `{posix path: text}` (a checkout, or a commit's blobs)."""
        index = cls(exclusion, limits)
        for path in sorted(contents):
            index.update(path, contents[path])
        return index

    @classmethod
    def from_tree(
        cls,
        root: Path,
        exclusion: Exclusion | None = None,
        limits: IndexLimits | None = None,
        cancelled: threading.Event | None = None,
    ) -> WorkspaceIndex:
        """The index of a folder on disk (hidden and vendored folders skipped)."""
        index = cls(exclusion if exclusion is not None else Exclusion.for_root(root), limits)
        for rel in index.candidate_paths(root):
            if cancelled is not None and cancelled.is_set():
                break
            index.update_from_disk(root, rel)
        return index

    def candidate_paths(self, root: Path) -> Iterable[str]:
        """Files under `root` the index would read, in a stable order."""
        for folder, dirs, names in os.walk(root):
            relative_folder = Path(folder).relative_to(root)
            dirs[:] = sorted(
                d
                for d in dirs
                if not d.startswith(".")
                and path_skip_reason((relative_folder / d / "x").as_posix()) is None
            )
            for name in sorted(names):
                rel = (relative_folder / name).as_posix()
                if self.accepts(rel):
                    yield rel

    def accepts(self, path: str) -> bool:
        """Whether a file of this name may be indexed (before reading it)."""
        key = posix_path(path)
        if PurePosixPath(key).suffix.lower() not in INDEXED_SUFFIXES:
            return False
        return path_skip_reason(key) is None and not self.exclusion.excludes(key)

    def excludes(self, path: str) -> bool:
        """Whether `path` must never enter a prompt."""
        return self.exclusion.excludes(posix_path(path))

    def update_from_disk(self, root: Path, path: str) -> bool:
        """Read `path` (relative to `root`) again: indexed, replaced or removed."""
        key = posix_path(path)
        full = root / key
        if not self.accepts(key):
            self.remove(key)
            return False
        try:
            if not full.is_file():
                self.remove(key)
                return False
            if full.stat().st_size > self.limits.max_file_bytes:
                self.skipped["huge"] += 1
                self.remove(key)
                return False
            data = full.read_bytes()
        except OSError:
            self.remove(key)
            return False
        reason = content_skip_reason(data, self.limits.max_file_bytes, self.limits.max_line_chars)
        text = decode_source(data) if reason is None else None
        if text is None:
            self.skipped[reason or "not_utf8"] += 1
            self.remove(key)
            return False
        return self._put(key, text)

    def update(self, path: str, text: str | None) -> bool:
        """`path` now holds `text` (None: deleted). Returns whether it is indexed."""
        key = posix_path(path)
        if text is None or not self.accepts(key):
            self.remove(key)
            return False
        data = text.encode("utf-8", errors="replace")
        reason = content_skip_reason(data, self.limits.max_file_bytes, self.limits.max_line_chars)
        if reason is not None:
            self.skipped[reason] += 1
            self.remove(key)
            return False
        return self._put(key, text)

    def _put(self, key: str, text: str) -> bool:
        with self._lock:
            old = self._files.get(key)
            if old is not None and old.text == text:
                return True
            size = len(text)
            grown = size - (old.size if old else 0)
            if old is None and len(self._files) >= self.limits.max_files:
                self.skipped["cap"] += 1
                return False
            if self._bytes + grown > self.limits.max_bytes:
                self.skipped["cap"] += 1
                self.remove(key)
                return False
            self._drop_chunks(key)
            entry = _File(text, size)
            lines = text.split("\n")
            for start in window_starts(len(lines)):
                end = min(start + CHUNK_LINES, len(lines))
                chunk_id = self._add_chunk(key, start, end, "\n".join(lines[start:end]))
                if chunk_id is not None:
                    entry.chunks.append(chunk_id)
            self._files[key] = entry
            self._bytes += grown
            self._lines.pop(key, None)
            self.version += 1
            self._maybe_compact()
            return True

    def remove(self, path: str) -> None:
        key = posix_path(path)
        with self._lock:
            entry = self._files.get(key)
            if entry is None:
                return
            self._drop_chunks(key)
            del self._files[key]
            self._bytes -= entry.size
            self._lines.pop(key, None)
            self._recent.pop(key, None)
            self.version += 1

    def _token_id(self, token: str) -> int:
        token_id = self._ids.get(token)
        if token_id is None:
            token_id = len(self._df)
            self._ids[token] = token_id
            self._df.append(0)
            self._postings.append(array("I"))
        return token_id

    def _add_chunk(self, path: str, start: int, end: int, text: str) -> int | None:
        tokens = sorted({self._token_id(t) for t in identifiers(text)})
        if not tokens:
            return None
        chunk_id = len(self._chunks)
        self._chunks.append(_Chunk(path, start, end, array("I", tokens)))
        self._sizes.append(len(tokens))
        for token in tokens:
            self._df[token] += 1
            self._postings[token].append(chunk_id)
        self._live += 1
        self._total_size += len(tokens)
        return chunk_id

    def _drop_chunks(self, path: str) -> None:
        entry = self._files.get(path)
        if entry is None:
            return
        for chunk_id in entry.chunks:
            chunk = self._chunks[chunk_id]
            if chunk is None:
                continue
            for token in chunk.tokens:
                self._df[token] -= 1
            self._live -= 1
            self._total_size -= len(chunk.tokens)
            self._chunks[chunk_id] = None
            self._sizes[chunk_id] = 0
        entry.chunks = []

    def _maybe_compact(self) -> None:
        """Rebuild the postings without dead windows once they outnumber the live ones."""
        dead = len(self._chunks) - self._live
        if dead <= max(COMPACT_MIN_DEAD, self._live):
            return
        old_to_new: dict[int, int] = {}
        chunks: list[_Chunk | None] = []
        for old_id, chunk in enumerate(self._chunks):
            if chunk is not None:
                old_to_new[old_id] = len(chunks)
                chunks.append(chunk)
        self._chunks = chunks
        self._sizes = array("I", (len(c.tokens) for c in chunks if c is not None))
        self._postings = [array("I") for _ in self._df]
        for chunk_id, chunk in enumerate(chunks):
            assert chunk is not None
            for token in chunk.tokens:
                self._postings[token].append(chunk_id)
        for entry in self._files.values():
            entry.chunks = [old_to_new[c] for c in entry.chunks]

    # -- reading ---------------------------------------------------------------

    def __contains__(self, path: str) -> bool:
        with self._lock:
            return posix_path(path) in self._files

    def __len__(self) -> int:
        with self._lock:
            return len(self._files)

    def paths(self) -> list[str]:
        with self._lock:
            return sorted(self._files)

    def text(self, path: str) -> str | None:
        with self._lock:
            entry = self._files.get(posix_path(path))
            return entry.text if entry else None

    def lines(self, path: str) -> list[str] | None:
        """The lines of an indexed file (cached for the last few files read)."""
        key = posix_path(path)
        with self._lock:
            cached = self._lines.get(key)
            if cached is not None:
                self._lines.move_to_end(key)
                return cached
            entry = self._files.get(key)
            if entry is None:
                return None
            lines = entry.text.split("\n")
            self._lines[key] = lines
            if len(self._lines) > LINE_CACHE_FILES:
                self._lines.popitem(last=False)
            return lines

    def touch(self, path: str) -> None:
        """`path` was opened or edited just now (the `recent` context source)."""
        key = posix_path(path)
        with self._lock:
            self._recent[key] = None
            self._recent.move_to_end(key)
            while len(self._recent) > RECENT_FILES:
                self._recent.popitem(last=False)

    def recent(self, limit: int = RECENT_FILES) -> list[str]:
        """Indexed files opened or edited most recently, newest first."""
        with self._lock:
            ordered = [p for p in reversed(self._recent) if p in self._files]
        return ordered[:limit]

    def stats(self) -> dict[str, object]:
        with self._lock:
            return {
                "files": len(self._files),
                "windows": self._live,
                "bytes": self._bytes,
                "identifiers": len(self._ids),
                "skipped": dict(self.skipped),
                "version": self.version,
            }

    # -- retrieval -------------------------------------------------------------

    def _window(self, chunk: _Chunk, score: float) -> Window:
        lines = self.lines(chunk.path) or []
        return Window(
            chunk.path, chunk.start, chunk.end, "\n".join(lines[chunk.start : chunk.end]), score
        )

    def search(
        self,
        query: Iterable[str],
        limit: int,
        skip: Callable[[str, int, int], bool] | None = None,
    ) -> list[Window]:
        """The `limit` windows that best match the identifiers in `query`
        (BM25), best first; `skip(path, start, end)` leaves windows out.

        The ranking depends only on the indexed files, never on the order they
        were indexed in (ties go to the first path and line), so an index kept
        current by updates ranks exactly as one built afresh: mining builds a
        parent commit's index incrementally and gets the server's context."""
        with self._lock:
            scores = self._scores(query)
            return self._top(scores, limit, skip) if scores is not None else []

    def rank_windows(
        self, query: Iterable[str], limit: int, path: str
    ) -> tuple[list[Window], list[Window]]:
        """From one scoring of `query`: the `limit` best windows of the other
        files (as `search` with `path` skipped) and every matching window of
        `path`, both best first. Merged by (-score, path, start) they give
        `search`'s answer for any `skip` that leaves out only windows of
        `path` (what a prompt shows of its own file depends on its budgets)."""
        key = posix_path(path)
        with self._lock:
            scores = self._scores(query)
            if scores is None:
                return [], []
            others = self._top(scores, limit, lambda other, _s, _e: other == key)
            entry = self._files.get(key)
            own = [
                self._window(chunk, float(scores[chunk_id]))
                for chunk_id in (entry.chunks if entry else [])
                if (chunk := self._chunks[chunk_id]) is not None and scores[chunk_id] > 0
            ]
        own.sort(key=lambda w: (-w.score, w.path, w.start))
        return others, own

    def _scores(self, query: Iterable[str]) -> Any:
        """BM25 of every window (0: no match, or dead), or None when nothing
        can match. Terms are summed rarest first, ties by name, so the floats
        do not depend on the identifiers' ids (the order they were met in)."""
        import numpy as np

        if not self._live:
            return None
        names = sorted(
            {t for t in query if t in self._ids}, key=lambda t: (self._df[self._ids[t]], t)
        )
        postings: list[Any] = []
        weights: list[Any] = []
        visited = 0
        for name in names:
            term = self._ids[name]
            df = self._df[term]
            posting = self._postings[term]
            if df == 0:
                continue
            if postings and visited + len(posting) > MAX_POSTINGS_VISITED:
                break
            visited += len(posting)
            weight = math.log(1.0 + (self._live - df + 0.5) / (df + 0.5))
            postings.append(np.frombuffer(posting, dtype=np.uint32).astype(np.int64))
            weights.append(np.full(len(posting), weight))
        if not postings:
            return None
        sizes = np.frombuffer(self._sizes, dtype=np.uint32).astype(np.float64)
        scores = np.bincount(
            np.concatenate(postings), np.concatenate(weights), minlength=len(sizes)
        )
        average = self._total_size / self._live
        norm = (BM25_K1 + 1.0) / (1.0 + BM25_K1 * (1.0 - BM25_B + BM25_B * sizes / average))
        return np.where(sizes > 0, scores * norm, 0.0)

    def _top(
        self, scores: Any, limit: int, skip: Callable[[str, int, int], bool] | None
    ) -> list[Window]:
        import numpy as np

        if limit <= 0:
            return []
        candidates = int(np.count_nonzero(scores))
        head = min(candidates, 4 * limit + 32)
        while True:
            if head:
                order: Any = np.argpartition(-scores, head - 1)[:head]
                # Every window tied with the last one taken, whichever
                # argpartition happened to pick.
                order = np.flatnonzero(scores >= scores[order].min())
            else:
                order = []
            ranked = sorted(self._rank_key(float(scores[i]), int(i)) for i in order)
            found = self._take([(-key[0], key[3]) for key in ranked], limit, skip)
            if len(found) >= limit or head >= candidates:
                return found
            head = min(candidates, head * 4)  # skipped windows: look further

    def _take(
        self,
        ranked: list[tuple[float, int]],
        limit: int,
        skip: Callable[[str, int, int], bool] | None,
    ) -> list[Window]:
        found: list[Window] = []
        for score, chunk_id in ranked:
            chunk = self._chunks[chunk_id]
            assert chunk is not None
            if skip is not None and skip(chunk.path, chunk.start, chunk.end):
                continue
            found.append(self._window(chunk, score))
            if len(found) >= limit:
                break
        return found

    def _rank_key(self, score: float, chunk_id: int) -> tuple[float, str, int, int]:
        chunk = self._chunks[chunk_id]
        assert chunk is not None
        return (-score, chunk.path, chunk.start, chunk_id)

    def best_window(self, path: str, query: Iterable[str]) -> Window | None:
        """The window of `path` most like `query` (Jaccard over identifier
        sets), or None when none shares an identifier with it."""
        key = posix_path(path)
        with self._lock:
            entry = self._files.get(key)
            wanted = {self._ids[t] for t in query if t in self._ids}
            if entry is None or not wanted:
                return None
            best: tuple[float, int] | None = None
            for chunk_id in entry.chunks:
                chunk = self._chunks[chunk_id]
                if chunk is None:
                    continue
                tokens = set(chunk.tokens)
                shared = len(tokens & wanted)
                if shared:
                    similarity = shared / len(tokens | wanted)
                    if best is None or similarity > best[0]:
                        best = (similarity, chunk_id)
            if best is None:
                return None
            chunk = self._chunks[best[1]]
            assert chunk is not None
            return self._window(chunk, best[0])

    def windows_with(self, identifier: str, limit: int) -> list[Window]:
        """Up to `limit` windows that contain `identifier` (copy candidates)."""
        with self._lock:
            token = self._ids.get(identifier)
            if token is None:
                return []
            found: list[Window] = []
            for chunk_id in self._postings[token]:
                chunk = self._chunks[chunk_id]
                if chunk is not None:
                    found.append(self._window(chunk, 0.0))
                    if len(found) >= limit:
                        break
            return found

    def document_frequency(self, identifier: str) -> int:
        with self._lock:
            token = self._ids.get(identifier)
            return self._df[token] if token is not None else 0
