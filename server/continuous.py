"""Continuous learning on the serving side: watch a repository, queue a
retraining job after new commits, and run it in a separate, low-priority
process (`shoptalk retrain`), one at a time.

Training runs out of process on purpose: the server never imports torch, a
crash of the job never takes the server down, and the OS scheduler keeps the
editor responsive (nice). The job records its steps in the shared job queue;
the server reads them for `$/progress` and hot-swaps the model when the job
promotes one (the repo's `current.json` changes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shoptalk.models.jobs import Job, JobQueue
from shoptalk.models.store import DamagedPointer, Promotion, RepoStore

if TYPE_CHECKING:  # watchdog is imported only when watching starts
    from shoptalk.server.watcher import HeadChange

log = logging.getLogger(__name__)

RETRAIN_NICENESS = 10


def retrain_command(repo: Path, data_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "shoptalk.models.cli",
        "--data-dir",
        str(data_dir),
        "retrain",
        "--repo",
        str(repo),
    ]


def _lower_priority() -> None:
    with contextlib.suppress(OSError):
        os.nice(RETRAIN_NICENESS)


class ContinuousLearner:
    """Watches `repo`; each head change queues a job and starts the worker
    process if none is running. `on_job(job)` is told about job updates."""

    def __init__(
        self,
        repo: Path,
        data_dir: Path,
        branch: str | None = None,
        quiet_seconds: float = 60.0,
        on_job: Callable[[Job], None] | None = None,
        command: Callable[[Path, Path], list[str]] = retrain_command,
    ):
        self.repo = repo.resolve()
        self.data_dir = data_dir
        self.queue = JobQueue(data_dir)
        self.on_job = on_job or (lambda job: None)
        self.command = command
        self.worker: subprocess.Popen[bytes] | None = None
        from shoptalk.server.watcher import GitWatcher

        self.watcher = GitWatcher(
            self.repo, self._changed, branch=branch, quiet_seconds=quiet_seconds
        )
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._follow_jobs, daemon=True)

    def start(self) -> None:
        self.watcher.start()
        self._monitor.start()

    def stop(self) -> None:
        self._stop.set()
        self.watcher.stop()

    def _changed(self, change: HeadChange) -> None:
        if change.new is None:
            log.error("stopped retraining %s: the repository or branch is gone", change.repo)
            return
        job = self.queue.enqueue(self.repo, "retrain", change.new)
        log.info("new commits on %s (%s): job %d queued", change.branch, change.new[:10], job.id)
        self.on_job(job)
        self.kick()

    def kick(self) -> None:
        """Start the worker unless it is already running (in this or another
        server: the queue's claim decides, so a second worker just exits)."""
        if self.worker is not None and self.worker.poll() is None:
            return
        log_path = RepoStore.for_repo(self.data_dir, self.repo).root / "retrain.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log_file:
            self.worker = subprocess.Popen(
                self.command(self.repo, self.data_dir),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=_lower_priority if os.name == "posix" else None,
            )

    def _follow_jobs(self) -> None:
        seen: dict[int, tuple[str, str | None, float | None]] = {}
        while not self._stop.wait(1.0):
            for job in self.queue.jobs(self.repo, limit=5):
                key = (job.state, job.step, job.progress)
                if seen.get(job.id) != key:
                    seen[job.id] = key
                    self.on_job(job)
            if self.worker is not None and self.worker.poll() is not None:
                self.worker = None
                if any(j.state == "queued" for j in self.queue.jobs(self.repo, limit=5)):
                    self.kick()


def status_table(data_dir: Path, repo: Path | None) -> Table:
    queue = JobQueue(data_dir)
    table = Table(title="jobs")
    for column in ("id", "repo", "state", "step", "progress", "head", "message"):
        table.add_column(column)
    for job in queue.jobs(repo):
        progress = f"{job.progress:.0%}" if job.progress is not None else ""
        table.add_row(
            str(job.id),
            escape(Path(job.repo).name),
            job.state,
            escape(job.step or ""),
            progress,
            (job.head or "")[:10],
            escape(job.message or ""),
        )
    return table


def print_promotion(console: Console, store: RepoStore) -> None:
    """The promoted model and its lineage; a damaged pointer is named, with
    what is served instead and how to repair it."""
    try:
        current = store.promotion()
    except DamagedPointer as exc:
        console.print(
            f"promoted model: [red]unusable[/red] — {escape(str(exc))}; "
            "the default base is served until then",
            highlight=False,
        )
        return
    if current is None:
        console.print("promoted model: none yet (the default base is served)")
        return
    console.print(
        f"promoted model: {escape(_served(current))}",
        highlight=False,
    )
    for entry in reversed(current.history):
        console.print(f"  earlier: {escape(_served(entry))}", highlight=False)


def _served(promotion: Promotion) -> str:
    what = promotion.model if not promotion.adapter else f"{promotion.adapter} on {promotion.host}"
    return f"{promotion.run_id} → {what}"
