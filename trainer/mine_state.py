"""What mining remembers per repository + branch, so that the next run reads
only new commits: `MineState` (the commits seen, with what mining each gave,
and the batch files of their scrubbed instances, in
`<repo store>/mine-state/<branch key>/`), and the mass-change threshold
fixed when the state is created.

Used by `shoptalk.trainer.mine` (which fills it) and
`shoptalk.trainer.dataset_build` (which reads it).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoptalk.models.files import atomic_open, write_json_atomic

STATE_VERSION = 1
MIN_MASS_CHANGE_FILES = 20


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

    def write_batch(self, records: Iterable[dict[str, Any]]) -> str:
        name = f"batch-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:12]}.jsonl"
        with atomic_open(self.directory / name) as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        return name

    def remove_stray_batches(self) -> None:
        """Delete batch files the state does not name: replaced ones, and any
        a killed run wrote before its state (their commits get mined again)."""
        for path in self.directory.glob("batch-*.jsonl"):
            if path.name not in self.batches:
                path.unlink(missing_ok=True)
