"""The continuous-learning job queue (SQLite)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from shoptalk.models.jobs import MAX_ATTEMPTS, Decision, JobQueue


def test_enqueue_coalesces_queued_jobs(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path)
    first = queue.enqueue(Path("/repo"), "retrain", "aaa")
    second = queue.enqueue(Path("/repo"), "retrain", "bbb")
    assert first.id == second.id
    assert second.head == "bbb"
    other = queue.enqueue(Path("/other"), "retrain", "ccc")
    assert other.id != first.id


def test_only_one_job_runs_at_a_time(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path)
    queue.enqueue(Path("/a"), "retrain", "1")
    queue.enqueue(Path("/b"), "retrain", "2")
    # A second queue object on the same file stands for a second server.
    other = JobQueue(tmp_path)
    claimed = queue.claim()
    assert claimed is not None and claimed.state == "running"
    assert other.claim() is None  # our own process is alive: no second training
    queue.finish(claimed.id, "done", "ok")
    nxt = other.claim()
    assert nxt is not None and nxt.repo == "/b"


def test_job_of_a_dead_process_is_retried_then_failed(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path)
    job = queue.enqueue(Path("/a"), "retrain", "1")
    for attempt in range(1, MAX_ATTEMPTS + 1):
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        claimed = queue.claim(pid=dead.pid)
        assert claimed is not None and claimed.id == job.id and claimed.attempts == attempt
        queue.update(job.id, step="train")
    assert queue.claim() is None
    final = queue.get(job.id)
    assert final.state == "failed" and "died during train" in (final.message or "")


def test_cancel_and_decisions(tmp_path: Path) -> None:
    queue = JobQueue(tmp_path)
    job = queue.enqueue(Path("/a"), "retrain", "1")
    assert queue.cancel(job.id)
    assert queue.claim() is None
    queue.record_decision(
        Decision(
            job.id,
            "/a",
            "run-1",
            False,
            "worse than current",
            {"em": 0.1, "current_em": 0.2},
            time.time(),
        )
    )
    [decision] = queue.decisions(Path("/a"))
    assert not decision.promoted and decision.figures["current_em"] == 0.2
