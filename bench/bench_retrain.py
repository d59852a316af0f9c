"""Benchmark: from new commits to the server answering with the promoted
model (issue #8: at most 10 minutes on this CPU with the default model), with
the breakdown, next to the full chain (mine everything, train, export) of the
same repository measured in the same run.

Setup (timed as the baseline, reused from --work when present): clone the
repository at its HEAD minus --behind first-parent commits, mine, train the
org model for --setup-minutes, export, promote.

Timed: a real `shoptalk serve --stdio --repo CLONE` with `serve.watch` on,
over a pygls client, serving the promoted model. The new commits arrive as a
`git pull --ff-only` of the source; the clock runs from the pull until
`shoptalk/status` reports the new run as served. The breakdown comes from the
job's recorded step timings (mine / train / export / evaluate / swap), plus
notice (pull → job started: the watcher's quiet period and the worker's
start) and load (promotion → the server answers with the new model).

    .venv/bin/python bench/bench_retrain.py --source /tmp/click --behind 20 \
        [--setup-minutes 5] [--train-minutes M] [--holdout N] [--work /tmp/bench-retrain]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lsprotocol import types
from pygls.lsp.client import LanguageClient

from shoptalk.models.jobs import JobQueue
from shoptalk.models.settings import load_settings
from shoptalk.models.store import RepoStore

TARGET_S = 600.0
SNAPSHOT = ("dataset", "mine-state", "current.json")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def setup(source: Path, work: Path, behind: int, minutes: float) -> dict[str, Any]:
    """The clone behind the source and its promoted org model; returns the
    setup's timings (the full chain, the baseline). The mined state and the
    promotion are kept in a snapshot so that the timed part can be rerun."""
    from shoptalk.trainer.export import export_run
    from shoptalk.trainer.mine import mine_repository
    from shoptalk.trainer.promotion import promote_run
    from shoptalk.trainer.train import train_adapter

    figures_file = work / "setup.json"
    if figures_file.is_file():
        print(f"setup: reusing {work}", flush=True)
        return dict(json.loads(figures_file.read_text()))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    repo = work / "repo"
    subprocess.run(["git", "clone", "--quiet", str(source), str(repo)], check=True)
    git(repo, "reset", "--quiet", "--hard", f"HEAD~{behind}")
    settings = load_settings(repo=repo, overrides={"data_dir": str(work / "data")})
    data_dir = settings.resolved_data_dir()
    store = RepoStore.for_repo(data_dir, repo)
    started = time.perf_counter()
    mine_repository(repo, settings.mine, data_dir)
    mined = time.perf_counter()
    settings.train.max_minutes = minutes
    org = train_adapter(repo, settings, data_dir, show_progress=False, report=print)
    if org.adapter_dir is None:
        raise SystemExit(f"setup: training did not finish: {org.stop_reason}")
    trained = time.perf_counter()
    exported = export_run(org.run_dir, settings.export.quant)
    model = next(p for p in exported.files if p.name.startswith("model-"))
    done = time.perf_counter()
    promote_run(store, org.run_id, model, org.adapter_dir)
    snapshot = work / "snapshot"
    snapshot.mkdir()
    for name in SNAPSHOT:
        copy = shutil.copytree if (store.root / name).is_dir() else shutil.copy2
        copy(store.root / name, snapshot / name)
    figures = {
        "head": git(repo, "rev-parse", "HEAD"),
        "mine_s": mined - started,
        "train_s": trained - mined,
        "export_s": done - trained,
        "total_s": done - started,
        "run_id": org.run_id,
        "steps": org.steps,
    }
    figures_file.write_text(json.dumps(figures, indent=2))
    return figures


def restore(work: Path, head: str) -> None:
    """Back to the state right after setup (for a rerun of the timed part)."""
    repo = work / "repo"
    store = RepoStore.for_repo(work / "data", repo)
    git(repo, "reset", "--quiet", "--hard", head)
    for name in (*SNAPSHOT, "incremental"):
        target = store.root / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        saved = work / "snapshot" / name
        if saved.is_dir():
            shutil.copytree(saved, target)
        elif saved.is_file():
            shutil.copy2(saved, target)


async def timed_retrain(
    source: Path, work: Path, train_minutes: float | None, holdout: int | None
) -> dict[str, Any]:
    repo = work / "repo"
    data_dir = work / "data"
    store = RepoStore.for_repo(data_dir, repo)
    current = store.current()
    assert current is not None, "setup left no promoted model"
    old_run = current["run_id"]
    queue = JobQueue(data_dir)
    last_job = max((job.id for job in queue.jobs(repo.resolve())), default=0)
    client = LanguageClient("bench", "1")
    progress: list[tuple[float, Any]] = []

    @client.feature(types.WINDOW_WORK_DONE_PROGRESS_CREATE)
    def create(params: Any) -> None:
        return None

    @client.feature(types.PROGRESS)
    def on_progress(params: types.ProgressParams) -> None:
        progress.append((time.perf_counter(), params.value))

    @client.feature(types.WINDOW_SHOW_MESSAGE)
    def show(params: types.ShowMessageParams) -> None:
        print(f"server says: {params.message}", file=sys.stderr)

    env = dict(os.environ)
    env.update(
        SHOPTALK_DATA_DIR=str(data_dir),
        SHOPTALK_SERVE__WATCH="true",
        SHOPTALK_WATCH__QUIET_SECONDS="2",
    )
    if train_minutes is not None:
        env["SHOPTALK_WATCH__TRAIN_MINUTES"] = str(train_minutes)
    if holdout is not None:
        env["SHOPTALK_WATCH__HOLDOUT"] = str(holdout)
    log = (work / "server.log").open("ab")
    await client.start_io(
        sys.executable,
        *("-m", "shoptalk.models.cli", "serve", "--stdio", "--repo", str(repo)),
        *("--poll-seconds", "1"),
        env=env,
    )
    server = client._server
    assert server is not None

    async def drain() -> None:
        while server.stderr is not None and (chunk := await server.stderr.read(65536)):
            log.write(chunk)

    drainer = asyncio.create_task(drain())
    await client.initialize_async(
        types.InitializeParams(
            capabilities=types.ClientCapabilities(
                window=types.WindowClientCapabilities(work_done_progress=True)
            ),
            root_uri=repo.as_uri(),
        )
    )
    client.initialized(types.InitializedParams())

    async def status() -> Any:
        return await client.protocol.send_request_async("shoptalk/status", {})

    while getattr(await status(), "loading", True):
        await asyncio.sleep(0.2)
    before = git(repo, "rev-parse", "HEAD")
    pulled_at = time.perf_counter()
    branch = git(source, "rev-parse", "--abbrev-ref", "HEAD")
    git(repo, "pull", "--quiet", "--ff-only", str(source), branch)
    after = git(repo, "rev-parse", "HEAD")
    new_commits = int(git(repo, "rev-list", "--count", f"{before}..{after}"))
    print(f"pulled {new_commits} new commits ({before[:10]}..{after[:10]})", flush=True)
    started_at = promoted_at = served_at = None
    job = None
    deadline = pulled_at + 3 * TARGET_S
    while time.perf_counter() < deadline:
        now = time.perf_counter()
        info = await status()
        jobs = [j for j in queue.jobs(repo.resolve(), limit=3) if j.id > last_job]
        job = jobs[0] if jobs else None
        if job is not None and started_at is None and job.state != "queued":
            started_at = now
        if job is not None and job.state in ("done", "failed", "cancelled"):
            promoted_at = promoted_at or now
            run_id = getattr(info, "run_id", None)
            if run_id not in (None, old_run):
                served_at = now
                break
            if not (job.message or "").startswith("promoted"):
                break
        await asyncio.sleep(0.5)
    await client.shutdown_async(None)
    client.exit(None)
    await client.stop()
    drainer.cancel()
    log.close()
    decision = next((d for d in queue.decisions(repo.resolve()) if d.job_id > last_job), None)
    return {
        "new_commits": new_commits,
        "job": None if job is None else {"state": job.state, "message": job.message},
        "decision": None if decision is None else decision.figures,
        "promoted": bool(decision and decision.promoted),
        "notice_s": None if started_at is None else started_at - pulled_at,
        "finished_s": None if promoted_at is None else promoted_at - pulled_at,
        "served_s": None if served_at is None else served_at - pulled_at,
        "progress_events": len(progress),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="A git repository (or clone).")
    parser.add_argument("--behind", type=int, default=20)
    parser.add_argument("--setup-minutes", type=float, default=5.0)
    parser.add_argument("--train-minutes", type=float, default=None, help="watch.train_minutes")
    parser.add_argument("--holdout", type=int, default=None, help="watch.holdout")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-retrain"))
    args = parser.parse_args(argv)
    source, work = args.source.resolve(), args.work.resolve()
    baseline = setup(source, work, args.behind, args.setup_minutes)
    print(
        f"full chain (setup): mine {baseline['mine_s']:.0f} s, train {baseline['train_s']:.0f} s, "
        f"export {baseline['export_s']:.0f} s = {baseline['total_s']:.0f} s",
        flush=True,
    )
    restore(work, baseline["head"])
    result = asyncio.run(timed_retrain(source, work, args.train_minutes, args.holdout))
    figures = result["decision"] or {}
    timings = figures.get("timings", {})
    print(json.dumps(result, indent=2, default=str))
    parts = ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
    notice, served = result["notice_s"], result["served_s"]
    if served is None:
        print(f"no new model was served: {result['job']}; steps: {parts}")
        return 1
    load = served - result["finished_s"]
    print(
        f"commit -> promoted model served: {served:.0f} s ({served / TARGET_S:.2f}x the "
        f"{TARGET_S:.0f} s target; {served / baseline['total_s']:.2f}x the full chain's "
        f"{baseline['total_s']:.0f} s in this run). {result['new_commits']} commits, "
        f"{figures.get('new_instances')} new instances. Breakdown: notice {notice:.0f} s, "
        f"{parts}, load {load:.0f} s. EM candidate {figures.get('candidate_em'):.1f} vs "
        f"current {figures.get('org_em'):.1f}."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
