"""Benchmark: `shoptalk mine` on a monorepo-sized history — wall time, peak
memory, dataset size, and the incremental update after new commits.

    .venv/bin/python bench/bench_mine_scale.py --repo /path/to/clone --new-commits 100
    .venv/bin/python bench/bench_mine_scale.py --repo /path/to/clone --since 2023-10-01  # a slice

1. The real CLI (`python -m shoptalk.models.cli mine`) mines the branch up to
   the commit `--new-commits` first-parent commits before its tip (`--until`
   that commit's date), into a fresh dataset folder and data dir.
2. The same command without `--until`: only the new commits are read.

`--since` mines a slice (the commits since that date) instead of the whole
history. Settings come from the environment as for any run (e.g.
`SHOPTALK_MINE__WORKERS=1`, `SHOPTALK_MINE__CONTEXT_COMMITS=500`).

Each run is a child process: its wall time, CPU time (with its workers and
git's), peak RSS of any one process (`ru_maxrss`) and the peak memory of
the process tree (proportional set sizes summed, sampled every 0.2 s: the
worker processes run beside the parent)
are printed next to the issue's targets (30k commits within 15 minutes and
2 GB) as ratios, with the dataset's size, the manifest's counts and the
load average. Run it on a quiet machine: the figure is the machine's, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

TARGET_COMMITS = 30_000
TARGET_SECONDS = 15 * 60
TARGET_RSS_MB = 2048


@dataclass
class Run:
    seconds: float
    cpu_seconds: float
    peak_rss_mb: float  # the largest single process
    tree_rss_mb: float  # the process tree's proportional set sizes, summed (sampled)
    returncode: int
    tail: str
    load: str  # the load average when it ended


def _tree_rss(pid: int, peak: list[float], done: threading.Event) -> None:
    """Sample the summed memory of `pid` and its descendants into peak[0]
    (MB): proportional set sizes (forked workers share the parent's pages,
    which a sum of RSS would count once per process)."""
    try:
        root = psutil.Process(pid)
    except psutil.Error:
        return
    while not done.wait(0.2):
        total = 0
        try:
            for process in [root, *root.children(recursive=True)]:
                try:
                    total += process.memory_full_info().pss
                except psutil.Error:
                    continue
        except psutil.Error:
            return
        peak[0] = max(peak[0], total / 2**20)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def run_mine(
    repo: Path, out: Path, data_dir: Path, until: str | None, since: str | None = None
) -> Run:
    """One `shoptalk mine` child; peak RSS from its rusage."""
    command = [sys.executable, "-m", "shoptalk.models.cli", "mine", "--repo", str(repo)]
    command += ["--out", str(out)]
    if until is not None:
        command += ["--until", until]
    if since is not None:
        command += ["--since", since]
    env = dict(os.environ, SHOPTALK_DATA_DIR=str(data_dir))
    log = out.parent / f"mine-{'full' if until else 'incremental'}.log"
    started = time.perf_counter()
    with log.open("wb") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
        peak, done = [0.0], threading.Event()
        sampler = threading.Thread(target=_tree_rss, args=(process.pid, peak, done))
        sampler.start()
        # wait4 reaps the child itself: its own rusage (with its reaped
        # children's: the workers, git), not this process's other children's.
        _, status, usage = os.wait4(process.pid, 0)
        done.set()
        sampler.join()
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    tail = log.read_bytes()[-1500:].decode(errors="replace")
    cpu = usage.ru_utime + usage.ru_stime
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return Run(seconds, cpu, usage.ru_maxrss / 1024, peak[0], process.returncode, tail, load)


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def manifest_counts(out: Path) -> dict[str, object]:
    manifest = json.loads((out / "manifest.json").read_text())
    keep = ("commits", "counts", "skipped_commits", "split")
    return {key: manifest[key] for key in keep if key in manifest}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument("--repo", type=Path, required=True, help="a clone (not bare)")
    parser.add_argument("--new-commits", type=int, default=100)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder")
    parser.add_argument("--since", default=None, help="mine only the commits since this date")
    args = parser.parse_args()
    repo = args.repo.resolve()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-mine-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    out, data_dir = work / "dataset", work / "data"
    first_parent = git(repo, "rev-list", "--first-parent", "HEAD").splitlines()
    cut = first_parent[min(args.new_commits, len(first_parent) - 1)]
    until = git(repo, "log", "-1", "--format=%cI", cut)
    since = [f"--since={args.since}"] if args.since else []
    total = int(git(repo, "rev-list", "--count", "--no-merges", *since, f"{cut}"))
    print(f"{repo}: {total} non-merge commits up to {cut[:10]} ({until})", file=sys.stderr)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    full = run_mine(repo, out, data_dir, until, args.since)
    if full.returncode != 0:
        sys.exit(f"mine failed:\n{full.tail}")
    size = folder_mb(out)
    counts = manifest_counts(out)
    incremental = run_mine(repo, out, data_dir, None, args.since)
    if incremental.returncode != 0:
        sys.exit(f"incremental mine failed:\n{incremental.tail}")
    per_hour = total / full.seconds * 3600
    what = f"since {args.since}" if args.since else "whole history"
    print(f"\nmine, {what}: {total} commits in {full.seconds / 60:.1f} min")
    print(
        f"  {total / full.seconds:.1f} commits/s (wall); CPU {full.cpu_seconds:.0f} s "
        f"({full.cpu_seconds / full.seconds:.2f} cores); load average at the end {full.load}"
    )
    print(
        f"  time for {TARGET_COMMITS} commits at this rate: "
        f"{TARGET_COMMITS / total * full.seconds / 60:.1f} min "
        f"({TARGET_COMMITS / total * full.seconds / TARGET_SECONDS:.2f}x the 15-minute target); "
        f"{per_hour:,.0f} commits/hour"
    )
    print(
        f"  peak memory {full.tree_rss_mb:.0f} MB, all processes (PSS; "
        f"{full.tree_rss_mb / TARGET_RSS_MB:.2f}x the 2 GB target; largest RSS of one "
        f"{full.peak_rss_mb:.0f} MB); dataset {size:.0f} MB"
    )
    print(f"  manifest: {json.dumps(counts)}")
    print(
        f"incremental, {args.new_commits} newer first-parent commits: "
        f"{incremental.seconds:.1f} s (CPU {incremental.cpu_seconds:.0f} s), peak memory "
        f"{incremental.tree_rss_mb:.0f} MB ({full.seconds / max(incremental.seconds, 1e-9):.0f}x "
        f"faster than the first run); load average at the end {incremental.load}"
    )


if __name__ == "__main__":
    main()
