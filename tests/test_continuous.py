"""Continuous learning end to end: a commit is noticed by the watcher, a job
is queued, the real `shoptalk retrain` worker process mines, trains, exports,
evaluates and promotes, and the decision is recorded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from git_repos import BOB, HistoryRepo, RepoBuilder, python_module
from tiny_models import place_base_gguf

from shoptalk.models.jobs import Job, JobQueue
from shoptalk.models.store import RepoStore
from shoptalk.server.continuous import ContinuousLearner, retrain_command
from shoptalk.server.lsp import _plain
from shoptalk.trainer.promotion import promote_run
from shoptalk.trainer.run_record import RunFolder

RESUME_STEPS = 40


def team_repo(
    tmp_path: Path, history_repo: HistoryRepo, tiny_hf, tiny_gguf, train: str, extra: str = ""
) -> tuple[Path, Path, Path]:
    """A copy of the fixture repository whose untracked `shoptalk.toml` (the
    worker process reads the repository's settings) trains the tiny llama
    (`train`: more [train] lines) and gates on 4 instances; and a data dir
    holding the base's GGUF where evaluation looks for it. Returns (repo,
    data dir, base GGUF)."""
    repo = tmp_path / "team"
    shutil.copytree(history_repo.path, repo)
    data_dir = tmp_path / "data"
    checkpoint = tiny_hf("llama")
    gguf = place_base_gguf(data_dir, checkpoint, tiny_gguf("llama"))
    (repo / "shoptalk.toml").write_text(
        f'[mine]\nalias_file = "{history_repo.alias_file}"\n'
        f'[train]\nbase = "{checkpoint}"\n{train}'
        '[export]\nquant = "f32"\n'
        "[watch]\nholdout = 4\nmin_new_instances = 1\ntolerance = 1.0\n"
        f"{extra}"
    )
    return repo, data_dir, gguf


@pytest.mark.e2e
@pytest.mark.slow
def test_commit_is_noticed_trained_and_promoted(
    tmp_path: Path, history_repo: HistoryRepo, tiny_hf, tiny_gguf, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo, data_dir, _ = team_repo(
        tmp_path, history_repo, tiny_hf, tiny_gguf, "max_steps = 2\nval_every = 1\n"
    )
    monkeypatch.setenv("SHOPTALK_DATA_DIR", str(data_dir))
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
    _check_first_decision(decision, current)
    assert Path(
        RunFolder(RepoStore.for_repo(data_dir, repo).run_dir(decision.run_id)).exported_models()[0]
    ).is_file()


def _check_first_decision(decision: Any, current: dict[str, Any] | None) -> None:
    """The first job's gate is over the base: only a measured gain promotes,
    and the decision says what was measured (tiny random models score alike,
    so here it is "no measurable difference" unless a gain really shows)."""
    if decision.promoted:
        assert current is not None and current["run_id"] == decision.run_id
        assert "interval" in decision.reason
    else:
        assert current is None, current  # the base stays served
        assert "needs a measured gain" in decision.reason and "interval" in decision.reason


def _promote_by_hand(data_dir: Path, repo: Path, run_id: str) -> None:
    """What `export --promote --force` does for a run the gate kept back."""
    store = RepoStore.for_repo(data_dir, repo)
    run = RunFolder(store.run_dir(run_id))
    promote_run(store, run_id, run.exported_models()[0], run.adapter_dir)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.asyncio
async def test_serving_server_retrains_reports_progress_and_swaps(
    tmp_path: Path, history_repo: HistoryRepo, tiny_hf, tiny_gguf
) -> None:
    """`serve --stdio` with `serve.watch`: a commit starts a job in the
    background, the editor sees it as `$/progress` (begin, one report per
    step, end), the server answers throughout, and once the job promotes a
    model the same server process answers with it."""
    from test_server_e2e import start_session, stop_session

    repo, data_dir, gguf = team_repo(
        tmp_path,
        history_repo,
        tiny_hf,
        tiny_gguf,
        "max_steps = 2\nval_every = 1\n",
        "quiet_seconds = 0.3\n[serve]\nwatch = true\n",
    )
    session = await start_session(repo, data_dir, gguf, extra_args=("--repo", str(repo)))
    try:
        before = await session.wait_loaded()
        assert before.get("source") == "--model" and before["training"] is None, (
            before,
            session.stderr.decode()[-3000:],
        )
        source = repo / "src/billing/invoicing.py"
        uri = await session.open("src/billing/invoicing.py", source.read_text())

        builder = RepoBuilder.__new__(RepoBuilder)
        builder.path, builder.day = repo, 40
        builder.write("src/billing/refunds.py", python_module("refunds", 3))
        head = builder.commit("Add refunds", BOB)

        # The server keeps answering while the job runs in its own process.
        deadline = time.monotonic() + 600
        answered_during_job = 0
        while True:
            status = await session.status()
            training = status["training"]
            if training and training["state"] == "running":
                await session.inline(uri, 5, 4)
                answered_during_job += 1
            if training and training["state"] in ("done", "failed"):
                break
            assert time.monotonic() < deadline, session.stderr.decode()[-3000:]
            await asyncio.sleep(0.5)
        assert training["state"] == "done", training["message"]
        assert answered_during_job > 0

        [decision] = JobQueue(data_dir).decisions(repo.resolve())
        _check_first_decision(decision, RepoStore.for_repo(data_dir, repo).current())
        if not decision.promoted:
            _promote_by_hand(data_dir, repo, decision.run_id)
        current = RepoStore.for_repo(data_dir, repo).current()
        assert current is not None and current["run_id"] == decision.run_id
        # The same server process picks the promoted model up.
        while (await session.status())["run_id"] != decision.run_id:
            assert time.monotonic() < deadline, session.stderr.decode()[-3000:]
            await asyncio.sleep(0.2)
        after = await session.status()
        assert after["source"] == "promoted" and after["model"] == current["model"]
        assert after["swaps"] >= 1
        result = await session.inline(uri, 5, 4)
        assert result is not None

        # `$/progress`: the job's own token, begun, reported step by step, ended.
        token = f"shoptalk-job-{JobQueue(data_dir).jobs(repo.resolve())[0].id}"
        assert ("create", token) in session.progress

        def values_of_job() -> list[dict[str, Any]]:
            return [_plain(v) for kind, (t, v) in _progress(session) if t == token]

        # The end follows the job's last state within a second.
        await session.wait_for(lambda: values_of_job()[-1]["kind"] == "end", timeout=10)
        values = values_of_job()
        assert values[0]["kind"] == "begin" and "retraining" in values[0]["title"]
        # The server looks at the queue once a second: sub-second steps may
        # be skipped, but what is shown follows the job's order, with percentages.
        shown = [
            v["message"] for v in values if v["kind"] in ("begin", "report") and v.get("message")
        ]
        order = ["mine", "train", "export", "evaluate", "swap"]
        assert "train" in shown and shown == sorted(shown, key=order.index), shown
        percents = [v["percentage"] for v in values if v["kind"] in ("begin", "report")]
        assert percents == sorted(percents) and 0 < percents[-1] < 100, percents
        outcome = "done: promoted" if decision.promoted else "done: not promoted"
        assert values[-1]["kind"] == "end" and values[-1]["message"].startswith(outcome)
        assert JobQueue(data_dir).jobs(repo.resolve())[0].head == head
    finally:
        await stop_session(session)


def _progress(session: Any) -> list[tuple[str, Any]]:
    return [(kind, value) for kind, value in session.progress if kind == "progress"]


@pytest.mark.e2e
@pytest.mark.slow
def test_killed_retrain_worker_resumes_its_run(
    tmp_path: Path, history_repo: HistoryRepo, tiny_hf, tiny_gguf, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGKILL the real worker process in the middle of training: nothing is
    promoted, the job stays claimed by a dead process, and the next worker
    takes it again and continues the same run from its last checkpoint."""
    repo, data_dir, _ = team_repo(
        tmp_path,
        history_repo,
        tiny_hf,
        tiny_gguf,
        f"max_steps = {RESUME_STEPS}\nval_every = 4\npatience = 0\nthreads = 1\n",
    )
    command = retrain_command(repo, data_dir)
    queue = JobQueue(data_dir)
    store = RepoStore.for_repo(data_dir, repo)
    worker = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run_id, killed_at = None, 0
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and worker.poll() is None:
            jobs = queue.jobs(repo.resolve())
            run_id = jobs[0].params.get("run_id") if jobs else None
            latest = store.run_dir(str(run_id)) / "checkpoints" / "latest.json"
            if run_id and latest.is_file():
                with contextlib.suppress(ValueError, KeyError):
                    killed_at = int(json.loads(latest.read_text())["step"])
                    if killed_at >= 4:
                        break
            time.sleep(0.01)
        assert worker.poll() is None, "the job ended before it could be killed"
        worker.kill()
        worker.wait()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    [job] = queue.jobs(repo.resolve())
    assert job.state == "running" and job.step == "train"  # its process is gone
    assert store.current() is None  # nothing half-promoted
    run = store.run_dir(str(run_id))
    assert json.loads((run / "record.json").read_text())["status"] == "running"

    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    finished = queue.get(job.id)
    assert finished.state == "done", finished.message
    assert finished.params["run_id"] == run_id and finished.attempts == 2
    record = json.loads((run / "record.json").read_text())
    assert record["status"] == "complete" and record["steps"] == RESUME_STEPS
    [resumed] = record["resumed"]
    assert resumed["step"] >= killed_at
    # This job's decision (the worker may go on to a job queued meanwhile).
    [decision] = [d for d in queue.decisions(repo.resolve()) if d.job_id == job.id]
    assert decision.run_id == run_id
    _check_first_decision(decision, store.current())
