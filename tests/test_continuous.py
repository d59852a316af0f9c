"""Continuous learning end to end: a commit is noticed by the watcher, a job
is queued, the real `shoptalk retrain` worker process mines, trains, exports,
evaluates and promotes, and the decision is recorded."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from git_repos import BOB, HistoryRepo, RepoBuilder, python_module

from shoptalk.models.catalog import resolve_base
from shoptalk.models.jobs import Job, JobQueue
from shoptalk.models.provision import base_paths
from shoptalk.models.store import RepoStore
from shoptalk.server.continuous import ContinuousLearner


@pytest.mark.e2e
@pytest.mark.slow
def test_commit_is_noticed_trained_and_promoted(
    tmp_path: Path, history_repo: HistoryRepo, tiny_hf, tiny_gguf, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "team"
    shutil.copytree(history_repo.path, repo)
    data_dir = tmp_path / "data"
    monkeypatch.setenv("SHOPTALK_DATA_DIR", str(data_dir))
    checkpoint = tiny_hf("llama")
    gguf = base_paths(data_dir, resolve_base(str(checkpoint))).gguf
    gguf.parent.mkdir(parents=True)
    shutil.copy(tiny_gguf("llama"), gguf)
    # Untracked settings file: the worker process reads the repository's settings.
    (repo / "shoptalk.toml").write_text(
        f'[mine]\nalias_file = "{history_repo.alias_file}"\n'
        f'[train]\nbase = "{checkpoint}"\nmax_steps = 2\nval_every = 1\n'
        '[export]\nquant = "f32"\n[eval]\nlimit = 4\n'
        "[watch]\nmin_new_instances = 1\ntolerance = 1.0\n"
    )
    seen: list[Job] = []
    learner = ContinuousLearner(repo, data_dir, quiet_seconds=0.3, on_job=seen.append)
    learner.start()
    try:
        builder = RepoBuilder.__new__(RepoBuilder)
        builder.path, builder.day = repo, 40
        builder.write("src/billing/refunds.py", python_module("refunds", 3))
        head = builder.commit("Add refunds", BOB)
        queue = JobQueue(data_dir)
        deadline = time.monotonic() + 600
        job = None
        while time.monotonic() < deadline:
            jobs = queue.jobs(repo.resolve())
            if jobs and jobs[0].state in ("done", "failed"):
                job = jobs[0]
                break
            time.sleep(1)
        # The learner reports job updates once a second.
        settle = time.monotonic() + 5
        while time.monotonic() < settle and not any(j.state == "done" for j in seen):
            time.sleep(0.2)
    finally:
        learner.stop()
    assert job is not None, "the job did not finish in time"
    assert job.head == head and job.state == "done", job.message
    assert {j.state for j in seen} >= {"queued", "running", "done"}
    [decision] = queue.decisions(repo.resolve())
    current = RepoStore.for_repo(data_dir, repo).current()
    assert decision.promoted and current is not None and current["run_id"] == decision.run_id
    assert Path(current["model"]).is_file()
