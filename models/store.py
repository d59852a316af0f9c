"""Where ShopTalk keeps its artifacts: a per-user data directory with one
folder per base model and one per repository (datasets, runs, the promoted
model). Nothing is ever written into the user's repository.

    <data_dir>/bases/<key>/            base weights (GGUF, cached HF checkpoint)
    <data_dir>/repos/<name>-<hash>/    one repository
        dataset/                        mined shards + manifest.json
        runs/<run_id>/                  one training run (adapter, exports, record)
        current.json                    the promoted model; moved atomically
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoptalk.models.files import write_json_atomic


def bases_dir(data_dir: Path) -> Path:
    return data_dir / "bases"


def base_dir(data_dir: Path, key: str) -> Path:
    return bases_dir(data_dir) / re.sub(r"[^A-Za-z0-9._-]+", "_", key)


def repo_key(repo: Path) -> str:
    """Stable folder name for a repository: its name plus a hash of its path."""
    resolved = repo.expanduser().resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", resolved.name) or "repo"
    return f"{name}-{digest}"


@dataclass(frozen=True)
class RepoStore:
    """The artifact folder of one repository."""

    root: Path

    @classmethod
    def for_repo(cls, data_dir: Path, repo: Path) -> RepoStore:
        return cls(data_dir / "repos" / repo_key(repo))

    @property
    def dataset_dir(self) -> Path:
        return self.root / "dataset"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def current_file(self) -> Path:
        return self.root / "current.json"

    def new_run_id(self, prefix: str = "run") -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        run_id = f"{prefix}-{stamp}"
        n = 1
        while (self.runs_dir / run_id).exists():
            n += 1
            run_id = f"{prefix}-{stamp}-{n}"
        return run_id

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    def current(self) -> dict[str, Any] | None:
        """The promoted model record, or None when nothing was promoted yet."""
        try:
            data: dict[str, Any] = json.loads(self.current_file.read_text())
            return data
        except FileNotFoundError:
            return None

    def promote(self, record: dict[str, Any]) -> None:
        """Atomically make `record` (run id, model path, figures) the current
        model; the previous one is kept in the record for rollback."""
        previous = self.current()
        history = list(previous.get("history", [])) if previous else []
        if previous:
            entry = {k: v for k, v in previous.items() if k != "history"}
            history.append(entry)
        record = {**record, "promoted_at": time.time(), "history": history[-20:]}
        write_json_atomic(self.current_file, record)

    def rollback(self) -> dict[str, Any]:
        """Restore the previously promoted model; raise LookupError if none."""
        current = self.current()
        if not current or not current.get("history"):
            raise LookupError("no earlier promoted model to roll back to")
        history = list(current["history"])
        previous = history.pop()
        record = {**previous, "history": history, "rolled_back_from": current.get("run_id")}
        write_json_atomic(self.current_file, record)
        return record
