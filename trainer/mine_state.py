"""What mining remembers per repository + branch, so that the next run reads
only new commits: `MineState` (the commits seen, with what mining each gave,
and the batch files of their scrubbed instances, in
`<repo store>/mine-state/<branch key>/`), and the mass-change threshold
fixed when the state is created.

Used by `shoptalk.trainer.mine` (which fills it) and
`shoptalk.trainer.dataset_build` (which reads it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import statistics
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from shoptalk.models.files import atomic_open, write_json_atomic

STATE_VERSION = 1
MIN_MASS_CHANGE_FILES = 20
# A batch file is closed (and the state saved naming it) once it holds this
# many records or bytes: what a killed run loses, and what mining holds.
BATCH_RECORDS = 5000
BATCH_BYTES = 64 << 20


def mass_change_threshold(counts: list[int], factor: float) -> float:
    """Q3 + factor·IQR of files touched per commit (inf for tiny histories),
    never below MIN_MASS_CHANGE_FILES: where most commits touch one or two
    files the IQR is ~0, and the bare rule would skip every ordinary feature."""
    if len(counts) < 4:
        return float("inf")
    q1, _, q3 = statistics.quantiles(counts, n=4, method="inclusive")
    return max(float(MIN_MASS_CHANGE_FILES), q3 + factor * (q3 - q1))


def branch_key(branch: str, label: str) -> str:
    """The state folder's name: readable from `label` (the branch name with
    any secret replaced), unique by a hash of the name itself."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in label)[:60]
    return f"{safe}-{hashlib.sha1(branch.encode()).hexdigest()[:8]}"


@dataclass
class MineState:
    """Per repository + branch: commits seen (with what mining them gave) and
    the batch files holding their scrubbed instances."""

    directory: Path
    config_hash: str
    mass_threshold: float
    commits: dict[str, dict[str, Any]] = field(default_factory=dict)
    batches: list[str] = field(default_factory=list)

    @property
    def file(self) -> Path:
        return self.directory / "state.json"

    @classmethod
    def load(cls, directory: Path) -> MineState | None:
        try:
            data = json.loads((directory / "state.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if data.get("version") != STATE_VERSION:
            return None
        threshold = data.get("mass_threshold")
        return cls(
            directory=directory,
            config_hash=data["config_hash"],
            mass_threshold=float("inf") if threshold is None else float(threshold),
            commits=data["commits"],
            batches=data["batches"],
        )

    def save(self, repo: Path, branch: str) -> None:
        threshold = None if self.mass_threshold == float("inf") else self.mass_threshold
        write_json_atomic(
            self.file,
            {
                "version": STATE_VERSION,
                "repo": str(repo),
                "branch": branch,
                "config_hash": self.config_hash,
                "mass_threshold": threshold,
                "commits": self.commits,
                "batches": self.batches,
            },
        )

    def records(self) -> Iterator[dict[str, Any]]:
        for name in self.batches:
            with (self.directory / name).open(encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        yield json.loads(line)

    def records_of(self, commits: Collection[str]) -> Iterator[dict[str, Any]]:
        """The kept records of `commits`, in the order they were mined."""
        for record in self.records():
            if record["commit"] in commits:
                yield record

    def drop_commits(self, removed: Collection[str]) -> None:
        """Forget `removed` commits: each batch holding records of theirs is
        written again without them (one batch at a time), in its place."""
        gone = set(removed)
        batches: list[str] = []
        for name in self.batches:
            with (self.directory / name).open(encoding="utf-8") as handle:
                held = any(json.loads(line)["commit"] in gone for line in handle if line.strip())
            if not held:
                batches.append(name)
                continue
            with (self.directory / name).open(encoding="utf-8") as handle:
                kept = (line for line in handle if line.strip())
                lines = (line for line in kept if json.loads(line)["commit"] not in gone)
                batches.append(_write_lines(self.directory, lines))
        for sha in removed:
            del self.commits[sha]
        self.batches = batches

    def remove_stray_batches(self) -> None:
        """Delete batch files the state does not name: replaced ones, and any
        a killed run wrote before its state (their commits get mined again)."""
        for path in self.directory.glob("batch-*.jsonl"):
            if path.name not in self.batches:
                path.unlink(missing_ok=True)


def _batch_name() -> str:
    return f"batch-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:12]}.jsonl"


def _write_lines(directory: Path, lines: Iterable[str]) -> str:
    name = _batch_name()
    with atomic_open(directory / name) as handle:
        handle.writelines(lines)
    return name


class BatchWriter:
    """Mined records streamed into the state's batch files: each is closed
    once it holds `max_records` records or `max_bytes` bytes, at the end of a
    commit (`end_commit`), then named by the state and `saved(final)` is called,
    so a saved state only ever names complete batches holding every record
    of the commits it names. Records of the commit being written are all
    that is held in memory."""

    def __init__(
        self,
        state: MineState,
        saved: Callable[[bool], None],
        max_records: int = BATCH_RECORDS,
        max_bytes: int = BATCH_BYTES,
    ) -> None:
        self.state = state
        self.saved = saved
        self.max_records = max(1, max_records)
        self.max_bytes = max_bytes
        self.written = 0  # records, all batches
        self._open: contextlib.ExitStack | None = None
        self._handle: IO[Any] | None = None
        self._name = ""
        self._records = self._bytes = 0

    def __enter__(self) -> BatchWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if kind is None:
            self.flush(final=True)
        elif self._open is not None:
            # The unfinished batch is not renamed into place: its commits are
            # not in the saved state, so the next run mines them again.
            self._open.__exit__(kind, error, trace)

    def add(self, records: Iterable[dict[str, Any]]) -> None:
        for record in records:
            if self._handle is None:
                self._name = _batch_name()
                self._open = contextlib.ExitStack()
                self._handle = self._open.enter_context(
                    atomic_open(self.state.directory / self._name)
                )
            line = json.dumps(record, ensure_ascii=False) + "\n"
            self._handle.write(line)
            self._records += 1
            self._bytes += len(line)
            self.written += 1

    def end_commit(self) -> None:
        """A commit's records are all added: close the batch if it is full."""
        if self._records >= self.max_records or self._bytes >= self.max_bytes:
            self.flush()

    def flush(self, final: bool = False) -> None:
        """Close the open batch (if any), name it in the state and save
        (`final`: the writer's last save)."""
        if self._open is not None:
            self._open.close()  # fsync + rename
            self.state.batches.append(self._name)
            self._open = self._handle = None
            self._records = self._bytes = 0
        self.saved(final)
