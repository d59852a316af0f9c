"""Sorting more lines than memory should hold: `SpillSort` keeps up to a
bound of (key, meta, text) entries, writes each full buffer sorted to a run
file in a folder of its own, and merges the runs (heapq) when asked for the
sorted whole. Keys and metas are JSON values (lists compare element-wise);
texts are single lines.

Used by `shoptalk.trainer.dataset_build` to write the shards in order
without holding every record.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

Entry = tuple[list[Any], Any, str]  # (key, meta, text)


class SpillSort:
    """Entries added in any order, given back sorted by key (ties in the
    order they were added: callers put a position last in the key)."""

    def __init__(self, folder: Path, max_entries: int, max_bytes: int) -> None:
        self.folder = folder
        self.max_entries = max(1, max_entries)
        self.max_bytes = max_bytes
        self.runs: list[Path] = []
        self.peak_entries = 0  # the most entries held at once
        self._buffer: list[Entry] = []
        self._bytes = 0

    def add(self, key: list[Any], meta: Any, text: str) -> None:
        self._buffer.append((key, meta, text))
        self._bytes += len(text)
        self.peak_entries = max(self.peak_entries, len(self._buffer))
        if len(self._buffer) >= self.max_entries or self._bytes >= self.max_bytes:
            self._spill()

    def _spill(self) -> None:
        self._buffer.sort(key=lambda entry: entry[0])
        run = self.folder / f"run-{len(self.runs):05d}.txt"
        with run.open("w", encoding="utf-8") as handle:
            for key, meta, text in self._buffer:
                # json.dumps escapes tabs and newlines: the first tab ends the head.
                handle.write(f"{json.dumps([key, meta], ensure_ascii=False)}\t{text}\n")
        self.runs.append(run)
        self._buffer = []
        self._bytes = 0

    def sorted(self) -> Iterator[Entry]:
        """Every entry added, sorted by key."""
        if not self.runs:
            self._buffer.sort(key=lambda entry: entry[0])
            yield from self._buffer
            return
        if self._buffer:
            self._spill()
        with ExitStack() as stack:
            handles = [stack.enter_context(run.open(encoding="utf-8")) for run in self.runs]
            yield from heapq.merge(*(_entries(h) for h in handles), key=lambda e: e[0])


def _entries(handle: Any) -> Iterator[Entry]:
    for line in handle:
        head, _, text = line.rstrip("\n").partition("\t")
        key, meta = json.loads(head)
        yield key, meta, text
