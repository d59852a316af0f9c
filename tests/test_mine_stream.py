"""Mining with bounded memory (issue 18 item 4): instances are streamed into
the state's batches while the history is read, and the dataset is built in
passes over the batches. The output does not depend on the batch size, a
run killed between batches leaves a state that names only complete ones,
and the memory held does not grow with the length of the history."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from git_repos import HistoryRepo, RepoBuilder

from shoptalk.models.progress import Progress
from shoptalk.models.settings import MineSettings
from shoptalk.models.store import RepoStore
from shoptalk.trainer.mine import MineResult, mine_repository
from shoptalk.trainer.mine_state import MineState
from shoptalk.trainer.spill_sort import SpillSort

pytestmark = pytest.mark.e2e


def _settings(history_repo: HistoryRepo) -> MineSettings:
    # A cap that applies (four substantial modules): the balance samples by
    # position, so it is where a changed order would show.
    return MineSettings(alias_file=history_repo.alias_file, module_share_cap=0.3)


@pytest.fixture(scope="module")
def default_run(history_repo: HistoryRepo, tmp_path_factory: pytest.TempPathFactory) -> MineResult:
    out = tmp_path_factory.mktemp("default") / "dataset"
    data = tmp_path_factory.mktemp("default-data")
    return mine_repository(history_repo.path, _settings(history_repo), data, out_dir=out)


def _dataset(folder: Path) -> tuple[dict[str, bytes], dict[str, Any]]:
    """The shards' bytes, and the manifest less what says when and how it was run."""
    shards = {p.name: p.read_bytes() for p in sorted(folder.glob("*.jsonl"))}
    manifest = json.loads((folder / "manifest.json").read_text())
    for key in ("created_at", "incremental"):
        manifest.pop(key)
    return shards, manifest


def _state(data: Path, repo: Path) -> MineState:
    (state_dir,) = (RepoStore.for_repo(data, repo).root / "mine-state").iterdir()
    state = MineState.load(state_dir)
    assert state is not None
    return state


def test_tiny_batches_write_the_same_dataset_byte_for_byte(
    history_repo: HistoryRepo, default_run: MineResult, tmp_path: Path
) -> None:
    settings = _settings(history_repo)
    out, data = tmp_path / "dataset", tmp_path / "data"
    tiny = mine_repository(history_repo.path, settings, data, out_dir=out, batch_records=2)
    assert tiny.manifest["balance"]["train_by_module"]["completion"]["applied"]
    assert tiny.manifest["dedup"]["exact"] + tiny.manifest["dedup"]["near"] > 0
    assert _dataset(out) == _dataset(default_run.dataset_dir)
    state = _state(data, history_repo.path)
    assert len(state.batches) > 10
    on_disk = sorted(p.name for p in state.directory.iterdir() if p.name != "gambit-cache.json")
    assert on_disk == sorted([*state.batches, "state.json"])  # no sort runs, no strays


def test_a_run_killed_between_batches_keeps_a_consistent_state_and_resumes(
    history_repo: HistoryRepo, default_run: MineResult, tmp_path: Path
) -> None:
    settings = _settings(history_repo)
    out, data = tmp_path / "dataset", tmp_path / "data"

    def killed(event: str | Progress) -> None:
        if isinstance(event, Progress) and event.done == 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mine_repository(
            history_repo.path, settings, data, out_dir=out, batch_records=3, report=killed
        )
    assert not out.exists()
    state = _state(data, history_repo.path)
    held = Counter(record["commit"] for record in state.records())
    mined = {sha: info for sha, info in state.commits.items() if info["status"] == "mined"}
    # Every commit the saved state names has all its instances in the batches
    # it names, and no batch holds an instance of a commit it does not name.
    assert 0 < len(mined) <= 12
    assert {sha: info["instances"] for sha, info in mined.items() if info["instances"]} == held
    batch_files = sorted(p.name for p in state.directory.glob("batch-*.jsonl"))
    assert batch_files == sorted(state.batches)

    resumed = mine_repository(history_repo.path, settings, data, out_dir=out, batch_records=3)
    assert not resumed.full
    assert resumed.new_commits == 32 - len(state.commits)
    assert _dataset(out) == _dataset(default_run.dataset_dir)


def _module(name: str, version: int) -> str:
    """The same two dozen functions, every body line changed by `version`:
    the tree keeps its size while the history grows."""
    parts = [f'"""The {name} module."""\n\nimport logging\n']
    for f in range(24):
        parts.append(
            f"\n\ndef {name}_step_{f}(value: int, scale: int = {f + 2}) -> int:\n"
            f'    """Compute step {f} of the {name} pipeline for a value."""\n'
            f"    result = value * scale + {version * 7 + f} - len({name!r})\n"
            f'    logging.getLogger("{name}").debug("step {f} v{version} gives %s", result)\n'
            f"    return result if result > {version + f} else value + scale * {version}\n"
        )
    return "".join(parts)


def _history(path: Path, commits: int) -> Path:
    repo = RepoBuilder(path)
    for version in range(commits):
        for name in ("orders", "stock"):
            repo.write(f"svc/{name}.py", _module(name, version))
        repo.commit(f"Retune the pipelines, round {version}")
    return repo.path


_PEAK = """
import sys, tracemalloc
from pathlib import Path
from shoptalk.models.settings import MineSettings
from shoptalk.trainer.mine import mine_repository

warm, *runs = [Path(p) for p in sys.argv[1:]]
mine_repository(warm, MineSettings(), warm.parent / "warm-data")  # imports, first-use caches
for repo in runs:
    tracemalloc.start()
    mine_repository(repo, MineSettings(), repo.parent / "data", batch_records=20)
    print(tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
"""


def _peaks(warm: Path, *repos: Path) -> list[float]:
    """Peak traced memory (MB) of mining each of `repos` from scratch, in one
    fresh interpreter (this one's earlier tests leave caches and interned
    names whose growth would blur a few MB)."""
    out = subprocess.run(
        [sys.executable, "-c", _PEAK, str(warm), *map(str, repos)],
        capture_output=True,
        text=True,
        check=True,
    )
    return [int(line) / 2**20 for line in out.stdout.split()]


def _kept(repo: Path) -> float:
    """Size (MB) of the instances mining kept for `repo`."""
    return sum(p.stat().st_size for p in (repo.parent / "data").rglob("batch-*.jsonl")) / 2**20


def test_memory_does_not_grow_with_the_history(tmp_path: Path) -> None:
    warm, short, long = (
        _history(tmp_path / name / "repo", commits)
        for name, commits in (("warm", 3), ("short", 6), ("long", 24))
    )
    short_peak, long_peak = _peaks(warm, short, long)
    short_kept, long_kept = _kept(short), _kept(long)
    assert long_kept > 3 * short_kept  # the long history holds ~4x the instances
    # Holding every instance (as mining did) grew the peak by ~2.7x the
    # instances' own size; what is left is bounded caches and the one-off
    # resize of the interpreter's table of interned names (a few MB).
    assert long_peak < short_peak + 0.5 * (long_kept - short_kept), (short_peak, long_peak)


def test_spill_sort_gives_back_every_entry_sorted_holding_a_few(tmp_path: Path) -> None:
    rng = random.Random(7)
    keys = [[rng.choice("abc"), rng.randrange(50), position] for position in range(200)]
    sorter = SpillSort(tmp_path, max_entries=7, max_bytes=1 << 20)
    for key in keys:
        sorter.add(key, {"n": key[2]}, f"text\t{key[2]} ü")
    assert len(sorter.runs) == 200 // 7 and sorter.peak_entries <= 7
    out = list(sorter.sorted())
    assert [entry[0] for entry in out] == sorted(keys)
    assert all(meta == {"n": key[2]} and text == f"text\t{key[2]} ü" for key, meta, text in out)
