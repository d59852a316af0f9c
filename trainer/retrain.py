"""Incremental retraining: the job the watcher queues after new commits.

One job = mine the new commits → continue training the promoted adapter on
the new instances plus a replay sample of older team instances (and general
code, through the trainer's replay share) → export → evaluate candidate vs
current on the newest commits → promote only if the candidate is not worse
than the current model beyond `watch.tolerance` → the server hot-swaps it.

Each step is recorded in the job queue; a killed job is claimed again and
continues (mining is incremental, training resumes from its checkpoint).
Personal adapters (opt-in) are trained here too, after the team's.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoptalk.models.errors import ShopTalkError
from shoptalk.models.files import atomic_dir, write_json_atomic
from shoptalk.models.jobs import Decision, Job, JobQueue
from shoptalk.models.progress import Report
from shoptalk.models.settings import Settings
from shoptalk.models.store import RepoStore
from shoptalk.trainer.dataset_folder import (
    MANIFEST_FILE,
    load_manifest,
    read_shard,
    read_split,
    shard_files,
)
from shoptalk.trainer.promotion import (
    JOB_VAL_LIMIT,
    completion_em,
    gate,
    promote_run,
    publish_promoted,
    report_difference,
)

# Older team instances replayed per new instance, so the adapter keeps what
# it knew while it learns the new code.
OLD_PER_NEW = 1.0


class RetrainError(ShopTalkError):
    pass


@dataclass(frozen=True)
class JobOutcome:
    state: str  # done | failed
    message: str
    decision: Decision | None = None


def incremental_dataset(
    dataset_dir: Path, target: Path, since: str | None, seed: int
) -> tuple[int, int]:
    """Write a dataset of the training instances newer than `since` (ISO
    date) plus a seeded replay sample of older ones, with the validation
    split unchanged; returns (new, replayed) counts. `since` None: all."""
    manifest = load_manifest(dataset_dir)
    rng = random.Random(seed)
    new_total = replay_total = 0
    with atomic_dir(target) as tmp:
        for _kind, split, shard in shard_files(dataset_dir):
            records = read_shard(shard)
            if split == "train" and since is not None:
                new = [r for r in records if str(r.get("author_date", "")) > since]
                old = [r for r in records if str(r.get("author_date", "")) <= since]
                keep = min(len(old), round(len(new) * OLD_PER_NEW))
                replay = rng.sample(old, keep) if keep else []
                new_total += len(new)
                replay_total += len(replay)
                records = new + replay
            elif split == "train":
                new_total += len(records)
            if records:
                with (tmp / shard.name).open("w", encoding="utf-8") as out:
                    for record in records:
                        out.write(json.dumps(record) + "\n")
        write_json_atomic(tmp / MANIFEST_FILE, {**manifest.data, "incremental_since": since})
    return new_total, replay_total


def count_new(dataset_dir: Path, since: str | None) -> int:
    return sum(
        1
        for r in read_split(dataset_dir, "train")
        if since is None or str(r.get("author_date", "")) > since
    )


class _Steps:
    """Records the job's step in the queue and stops if the job was cancelled."""

    def __init__(self, queue: JobQueue, job: Job, report: Report):
        self.queue, self.job, self.report = queue, job, report
        self.timings: dict[str, float] = {}

    def start(self, step: str, progress: float) -> None:
        if self.queue.get(self.job.id).state == "cancelled":
            raise RetrainError(f"job {self.job.id} was cancelled")
        self.queue.update(self.job.id, step=step, progress=progress)
        self.report(f"job {self.job.id}: {step}")
        self.timings[step] = time.perf_counter()

    def done(self, step: str) -> None:
        self.timings[step] = time.perf_counter() - self.timings[step]


def job_settings(settings: Settings) -> Settings:
    """A job's training settings: the watcher's minutes unless a budget is
    set, and no final pass or measurement (the job's evaluation measures on
    the test window, which training must not see)."""
    budget = settings.model_copy(deep=True)
    if budget.train.max_minutes is None and budget.train.max_steps is None:
        budget.train.max_minutes = settings.watch.train_minutes
    budget.train.final_pass = False
    budget.train.measure_instances = 0
    return budget


def run_retrain_job(
    repo: Path, settings: Settings, data_dir: Path, queue: JobQueue, job: Job, report: Report
) -> JobOutcome:
    from shoptalk.trainer.evaluate import evaluate_models
    from shoptalk.trainer.export import export_run
    from shoptalk.trainer.mine import mine_repository
    from shoptalk.trainer.personal import opt_in, train_personal
    from shoptalk.trainer.run_record import RunFolder
    from shoptalk.trainer.train import train_adapter

    store = RepoStore.for_repo(data_dir, repo)
    steps = _Steps(queue, job, report)
    current = store.current()
    since = current.get("data_through") if current else None

    steps.start("mine", 0.05)
    mined = mine_repository(repo, settings.mine, data_dir)
    steps.done("mine")
    new = count_new(store.dataset_dir, since)
    if current is not None and new < settings.watch.min_new_instances:
        return JobOutcome(
            "done",
            f"{new} new training instances since the promoted model; waiting for "
            f"{settings.watch.min_new_instances} (watch.min_new_instances)",
        )

    steps.start("train", 0.2)
    run_id = job.params.get("run_id")
    run = RunFolder(store.run_dir(str(run_id))) if run_id else None
    init_adapter = Path(current["adapter_dir"]) if current and current.get("adapter_dir") else None
    incremental = store.root / "incremental" / f"job-{job.id}"
    train_seconds: float | None = None
    best_val_loss: float | None = None
    if run is not None and run.is_complete():
        report(f"run {run.run_id} finished training before the job stopped; going on from it")
    else:
        resumable = run is not None and run.latest_file.is_file()
        if not resumable:
            new_count, replayed = incremental_dataset(
                store.dataset_dir, incremental, since if init_adapter else None, settings.train.seed
            )
            report(f"training on {new_count} new and {replayed} replayed team instances")
            run_id = store.new_run_id("org")
            queue.set_params(job.id, {**job.params, "run_id": run_id})
        trained = train_adapter(
            repo,
            job_settings(settings),
            data_dir,
            init_adapter=init_adapter,
            resume=resumable,
            run_id=str(run_id),
            dataset_dir=incremental,
            val_limit=JOB_VAL_LIMIT,
            show_progress=False,
            report=report,
        )
        if trained.adapter_dir is None:
            return JobOutcome("failed", f"training did not complete: {trained.stop_reason}")
        train_seconds, best_val_loss = trained.wall_seconds, trained.best_val_loss
        run = RunFolder(trained.run_dir)
    steps.done("train")
    assert run is not None

    steps.start("export", 0.6)
    exported = export_run(run.root, settings.export.quant, report=report)
    model_file = next(p for p in exported.files if p.suffix == ".gguf")
    steps.done("export")

    steps.start("evaluate", 0.75)
    reference = "org" if current is not None else "base"
    evaluation = evaluate_models(
        repo,
        [reference, f"run:{run.run_id}"],
        settings,
        data_dir,
        settings.watch.holdout,
        general_instances=0,
    )
    steps.done("evaluate")
    candidate_em = completion_em(evaluation.data, f"run:{run.run_id}")
    current_em = completion_em(evaluation.data, reference)
    # The first promotion over the base needs a measured gain; later ones,
    # over the promoted model, only "not worse" (watch.tolerance).
    difference = report_difference(evaluation.directory, f"run:{run.run_id}", reference)
    promoted, reason = gate(
        difference, settings.watch.tolerance * 100, require_gain=reference == "base"
    )
    figures: dict[str, Any] = {
        "candidate_em": candidate_em,
        f"{reference}_em": current_em,
        "difference": difference.as_dict(),
        "new_commits": mined.new_commits,
        "new_instances": new,
        "train_seconds": train_seconds,
        "best_val_loss": best_val_loss,
        "report": str(evaluation.json_path),
    }
    published = ""
    if promoted:
        steps.start("swap", 0.95)
        promote_run(store, run.run_id, model_file, run.adapter_dir, candidate_em, current_em)
        published = publish_promoted(store, settings.team, report)
        steps.done("swap")
    # Recorded once the promotion is done, so that its figures hold every step.
    figures["timings"] = {k: round(v, 2) for k, v in steps.timings.items()}
    decision = Decision(job.id, str(repo), run.run_id, promoted, reason, figures, time.time())
    queue.record_decision(decision)
    message = ("promoted: " if promoted else "not promoted: ") + reason
    message += published
    if promoted and opt_in(store) is not None:
        steps.start("personal", 0.97)
        try:
            message += "; personal adapter: " + train_personal(repo, settings, data_dir, report)
        except ShopTalkError as exc:
            message += f"; personal adapter not updated: {exc}"
        steps.done("personal")
    from shoptalk.trainer.retriever import retrain_lookup

    message += retrain_lookup(repo, settings, run.root, report)  # module history, retriever
    return JobOutcome("done", message, decision)


def work_queue(data_dir: Path, settings_for: Callable[[Path], Settings], report: Report) -> int:
    """Claim and run queued jobs until none is left; returns how many ran.
    Exits at once when another process is already running a job.
    `settings_for(repo)` gives each job its repository's settings."""
    queue = JobQueue(data_dir)
    ran = 0
    while (job := queue.claim(pid=os.getpid())) is not None:
        ran += 1
        try:
            repo = Path(job.repo)
            outcome = run_retrain_job(repo, settings_for(repo), data_dir, queue, job, report)
        except ShopTalkError as exc:
            outcome = JobOutcome("failed", str(exc))
        except Exception as exc:  # a crash is recorded on the job; the served model is untouched
            outcome = JobOutcome("failed", f"{type(exc).__name__}: {exc}")
        if queue.get(job.id).state != "cancelled":
            queue.finish(job.id, outcome.state, outcome.message)
        report(f"job {job.id}: {outcome.state}: {outcome.message}")
    return ran
