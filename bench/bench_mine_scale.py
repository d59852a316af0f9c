"""Benchmark: `shoptalk mine` on a monorepo-sized history — wall time, peak
memory, dataset size, and the incremental update after new commits.

    .venv/bin/python bench/bench_mine_scale.py --repo /path/to/clone --new-commits 100

1. The real CLI (`python -m shoptalk.models.cli mine`) mines the branch up to
   the commit `--new-commits` first-parent commits before its tip (`--until`
   that commit's date), into a fresh dataset folder and data dir.
2. The same command without `--until`: only the new commits are read.

Each run is a child process: its wall time and peak RSS (`ru_maxrss` of the
child) are printed next to the issue's targets (30k commits within 15
minutes and 2 GB) as ratios, with the dataset's size and the manifest's
counts. Run it on a quiet machine: the figure is the machine's, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

TARGET_COMMITS = 30_000
TARGET_SECONDS = 15 * 60
TARGET_RSS_MB = 2048


@dataclass
class Run:
    seconds: float
    peak_rss_mb: float
    returncode: int
    tail: str


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def run_mine(repo: Path, out: Path, data_dir: Path, until: str | None) -> Run:
    """One `shoptalk mine` child; peak RSS from its rusage."""
    command = [sys.executable, "-m", "shoptalk.models.cli", "mine", "--repo", str(repo)]
    command += ["--out", str(out)]
    if until is not None:
        command += ["--until", until]
    env = dict(os.environ, SHOPTALK_DATA_DIR=str(data_dir))
    log = out.parent / f"mine-{'full' if until else 'incremental'}.log"
    started = time.perf_counter()
    with log.open("wb") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
        # wait4 reaps the child itself: its own rusage, not all children's.
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    tail = log.read_bytes()[-1500:].decode(errors="replace")
    return Run(seconds, usage.ru_maxrss / 1024, process.returncode, tail)


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
    args = parser.parse_args()
    repo = args.repo.resolve()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-mine-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    out, data_dir = work / "dataset", work / "data"
    first_parent = git(repo, "rev-list", "--first-parent", "HEAD").splitlines()
    cut = first_parent[min(args.new_commits, len(first_parent) - 1)]
    until = git(repo, "log", "-1", "--format=%cI", cut)
    total = int(git(repo, "rev-list", "--count", "--no-merges", f"{cut}"))
    print(f"{repo}: {total} non-merge commits up to {cut[:10]} ({until})", file=sys.stderr)

    full = run_mine(repo, out, data_dir, until)
    if full.returncode != 0:
        sys.exit(f"mine failed:\n{full.tail}")
    size = folder_mb(out)
    counts = manifest_counts(out)
    incremental = run_mine(repo, out, data_dir, None)
    if incremental.returncode != 0:
        sys.exit(f"incremental mine failed:\n{incremental.tail}")
    per_hour = total / full.seconds * 3600
    print(f"\nmine, whole history: {total} commits in {full.seconds / 60:.1f} min")
    print(
        f"  time for {TARGET_COMMITS} commits at this rate: "
        f"{TARGET_COMMITS / total * full.seconds / 60:.1f} min "
        f"({TARGET_COMMITS / total * full.seconds / TARGET_SECONDS:.2f}x the 15-minute target); "
        f"{per_hour:,.0f} commits/hour"
    )
    print(
        f"  peak RSS {full.peak_rss_mb:.0f} MB ({full.peak_rss_mb / TARGET_RSS_MB:.2f}x the 2 GB "
        f"target); dataset {size:.0f} MB"
    )
    print(f"  manifest: {json.dumps(counts)}")
    print(
        f"incremental, {args.new_commits} newer first-parent commits: "
        f"{incremental.seconds:.1f} s, peak RSS {incremental.peak_rss_mb:.0f} MB "
        f"({full.seconds / max(incremental.seconds, 1e-9):.0f}x faster than the whole history)"
    )


if __name__ == "__main__":
    main()
