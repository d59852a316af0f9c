"""Repository context only where it is read (issue 18 item 4): with
`[mine] context_commits = N`, the completions of the newest N commits and of
the validation and test windows carry their repository context, all others
are the instances a mine with the context off gives; windows longer than N
are mined again with it, and an incremental run gives the dataset a whole
mine of the same history gives."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from git_repos import HistoryRepo, git

from shoptalk.models.settings import MineSettings
from shoptalk.models.store import RepoStore
from shoptalk.trainer.mine import MineResult, mine_repository
from shoptalk.trainer.mine_state import MineState

pytestmark = pytest.mark.e2e


def _mine(history_repo: HistoryRepo, folder: Path, **options: Any) -> MineResult:
    settings = MineSettings(alias_file=history_repo.alias_file, **options)
    return mine_repository(history_repo.path, settings, folder / "data", out_dir=folder / "dataset")


def _records(folder: Path) -> dict[str, dict[str, Any]]:
    records: dict[str, dict[str, Any]] = {}
    for shard in sorted(folder.glob("completion.*.jsonl")):
        for line in shard.read_text().splitlines():
            record = json.loads(line)
            records[record["id"]] = record
    return records


def _state(folder: Path, repo: Path) -> MineState:
    (state_dir,) = (RepoStore.for_repo(folder / "data", repo).root / "mine-state").iterdir()
    state = MineState.load(state_dir)
    assert state is not None
    return state


@pytest.fixture(scope="module")
def everywhere(history_repo: HistoryRepo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("context-everywhere")
    _mine(history_repo, folder, context_commits=None)
    return folder / "dataset"


@pytest.fixture(scope="module")
def nowhere(history_repo: HistoryRepo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("context-off")
    _mine(history_repo, folder, context=False)
    return folder / "dataset"


def _newest(repo: Path, count: int) -> set[str]:
    return set(git(repo, "log", "--no-merges", f"-{count}", "--format=%H").split())


def _windows(folder: Path) -> set[str]:
    manifest = json.loads((folder / "manifest.json").read_text())
    start = manifest["validation_from"]
    return {
        r["commit"]
        for r in _records(folder).values()
        if r["split"] != "train" and r["author_date"] >= start
    }


@pytest.mark.parametrize("newest", [0, 6])
def test_only_the_newest_commits_and_the_windows_carry_context(
    history_repo: HistoryRepo, everywhere: Path, nowhere: Path, tmp_path: Path, newest: int
) -> None:
    result = _mine(history_repo, tmp_path, context_commits=newest)
    gated = _records(tmp_path / "dataset")
    with_context = _newest(history_repo.path, newest) | _windows(tmp_path / "dataset")
    full, bare = _records(everywhere), _records(nowhere)
    assert gated.keys() == full.keys() == bare.keys()
    kept = [i for i, r in gated.items() if r["commit"] in with_context]
    left = [i for i, r in gated.items() if r["commit"] not in with_context]
    assert kept and left
    for record_id in kept:
        assert "context" in gated[record_id]
        assert gated[record_id] == full[record_id]
    for record_id in left:
        assert gated[record_id] == bare[record_id]
    # The windows' commits beyond the newest were mined again, with it.
    state = _state(tmp_path, history_repo.path)
    windows = _windows(tmp_path / "dataset")
    assert all(state.commits[sha]["context"] for sha in windows)
    mined = sum(1 for info in state.commits.values() if info["status"] == "mined")
    again = len(windows - _newest(history_repo.path, newest))
    assert (again > 0) == (newest == 0)
    assert result.new_commits == len(state.commits) and mined > len(windows)


def test_an_incremental_run_gives_the_dataset_of_a_whole_mine(
    history_repo: HistoryRepo, tmp_path: Path
) -> None:
    """The newer commits are mined with context, the ones they push out of
    the newest N lose it, and the windows that moved get it."""
    dates = git(history_repo.path, "log", "--first-parent", "--format=%cI").split()
    options: dict[str, Any] = {"context_commits": 4, "module_share_cap": 0.3}
    _mine(history_repo, tmp_path / "step", until=dates[8], **options)
    updated = _mine(history_repo, tmp_path / "step", **options)
    assert not updated.full and updated.new_commits >= 8
    _mine(history_repo, tmp_path / "whole", **options)
    step, whole = tmp_path / "step" / "dataset", tmp_path / "whole" / "dataset"
    shards = sorted(p.name for p in whole.glob("*.jsonl"))
    assert sorted(p.name for p in step.glob("*.jsonl")) == shards
    for name in shards:
        assert (step / name).read_bytes() == (whole / name).read_bytes(), name
    manifests = [json.loads((f / "manifest.json").read_text()) for f in (step, whole)]
    for manifest in manifests:
        for key in ("created_at", "incremental", "config", "commit_range"):
            manifest.pop(key)
    assert manifests[0] == manifests[1]
    assert any("context" in r for r in _records(step).values())
