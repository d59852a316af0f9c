"""Mining in two processes (issue 18 item 4): the commits are read by
worker processes in chunks and collected in commit order, so the state and
the dataset are byte for byte those of one process."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from git_repos import HistoryRepo

from shoptalk.models.settings import MineSettings
from shoptalk.models.store import RepoStore
from shoptalk.trainer import mine
from shoptalk.trainer.mine import mine_repository, worker_count
from shoptalk.trainer.mine_state import MineState

pytestmark = pytest.mark.e2e


def _mined(history_repo: HistoryRepo, folder: Path, workers: int) -> tuple[Any, ...]:
    settings = MineSettings(alias_file=history_repo.alias_file, workers=workers, context_commits=6)
    data, out = folder / "data", folder / "dataset"
    result = mine_repository(history_repo.path, settings, data, out_dir=out, parallel_from=1)
    shards = {p.name: p.read_bytes() for p in sorted(out.glob("*.jsonl"))}
    manifest = json.loads((out / "manifest.json").read_text())
    for key in ("created_at", "config"):
        manifest.pop(key)
    (state_dir,) = (RepoStore.for_repo(data, history_repo.path).root / "mine-state").iterdir()
    state = MineState.load(state_dir)
    assert state is not None
    records = [json.dumps(r, sort_keys=True) for r in state.records()]
    return result.new_commits, shards, manifest, state.commits, records


def test_two_processes_write_the_state_and_dataset_of_one(
    history_repo: HistoryRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mine, "CHUNK_COMMITS", 3)  # 32 commits: 11 chunks for 2 workers
    one = _mined(history_repo, tmp_path / "one", workers=1)
    two = _mined(history_repo, tmp_path / "two", workers=2)
    assert one[0] == 32 and one[1]
    assert two == one


def test_worker_count(monkeypatch: pytest.MonkeyPatch) -> None:
    # Two by default, as the CPUs allow.
    assert worker_count(MineSettings(), 5000) == min(2, os.cpu_count() or 1)
    assert worker_count(MineSettings(workers=2), 10, parallel_from=256) == 1
    assert 1 <= worker_count(MineSettings(workers=2), 5000) <= 2  # as the CPUs allow
    two_chunks = worker_count(MineSettings(workers=8), 40, parallel_from=1)
    assert two_chunks == min(2, os.cpu_count() or 1)
    # Off Linux the workers would be forked unsafely: one process.
    monkeypatch.setattr(sys, "platform", "darwin")
    assert worker_count(MineSettings(workers=2), 5000) == 1
