"""Benchmark: mining speed against PyDriller, and `shoptalk mine` on a real history.

    python bench/bench_mine.py --repo /tmp/requests --commits 1000

1. Added lines: ShopTalk's extraction (`shoptalk.trainer.git_log`: one
   `git log -p` stream) and PyDriller (`Repository(...).traverse_commits()`,
   `ModifiedFile.diff_parsed["added"]`) read the added lines of the same
   newest N non-merge commits of the branch, in the same run. Both results
   are compared line by line (commit, path, line number, text without
   trailing spaces) and the speed-up is printed as a ratio.
2. `mine_repository` on the whole branch into a scratch data dir, cut
   `--incremental-commits` commits short first (`until`), then again on the
   whole branch: the second run must read only those commits, a third run
   none, and the manifest's counts must add up to the shards' records.

Use a clone of a public repository with thousands of commits (the figures in
docs/benchmarks.md name the one used); nothing is written into it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from shoptalk.models.settings import MineSettings
from shoptalk.trainer.git_log import iter_commits, list_commits
from shoptalk.trainer.mine import mine_repository

AddedLine = tuple[str, str, int, str]


def shoptalk_added_lines(repo: Path, shas: list[str]) -> set[AddedLine]:
    found: set[AddedLine] = set()
    for commit in iter_commits(repo, shas):
        for change in commit.files:
            if change.binary or change.new_path is None:
                continue
            for hunk in change.hunks:
                for offset, text in enumerate(hunk.added):
                    found.add((commit.sha, change.new_path, hunk.new_start + offset, text.rstrip()))
    return found


def pydriller_added_lines(repo: Path, shas: list[str]) -> set[AddedLine]:
    from pydriller import Repository

    found: set[AddedLine] = set()
    for commit in Repository(str(repo), only_commits=shas, only_no_merge=True).traverse_commits():
        for modified in commit.modified_files:
            path = modified.new_path
            if path is None:
                continue
            for number, text in modified.diff_parsed["added"]:
                found.add((commit.hash, path.replace("\\", "/"), number, text.rstrip()))
    return found


def bench_extraction(repo: Path, branch: str, count: int) -> None:
    shas = subprocess.run(
        ["git", "-C", str(repo), "rev-list", "--no-merges", "-n", str(count), branch],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    print(
        f"range: the newest {len(shas)} non-merge commits of {branch} ({shas[-1][:10]}..{shas[0][:10]})"
    )
    started = time.perf_counter()
    ours = shoptalk_added_lines(repo, shas)
    ours_s = time.perf_counter() - started
    started = time.perf_counter()
    theirs = pydriller_added_lines(repo, shas)
    theirs_s = time.perf_counter() - started
    same = len(ours & theirs)
    print(f"ShopTalk  git log -p stream : {ours_s:8.2f} s  {len(ours):8d} added lines")
    print(f"PyDriller traverse_commits  : {theirs_s:8.2f} s  {len(theirs):8d} added lines")
    print(
        f"agreement: {same} lines in both, {len(ours - theirs)} only ShopTalk, "
        f"{len(theirs - ours)} only PyDriller"
    )
    for label, extra in (("only ShopTalk", ours - theirs), ("only PyDriller", theirs - ours)):
        for sha, path, number, text in sorted(extra)[:3]:
            print(f"  {label}: {sha[:10]} {path}:{number} {text[:60]!r}")
    print(f"speed-up: {theirs_s / ours_s:.1f}x (target >= 5x)")


def _shard_records(dataset: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    for shard in dataset.glob("*.jsonl"):
        with shard.open() as handle:
            counts[shard.name] = sum(1 for _ in handle)
    return counts


def bench_mine(repo: Path, branch: str, incremental_commits: int) -> None:
    summaries = list_commits(repo, branch)
    cut = summaries[incremental_commits - 1].author_time if incremental_commits else None
    with tempfile.TemporaryDirectory(prefix="bench-mine-") as scratch:
        data = Path(scratch)
        first_settings = MineSettings(branch=branch, until=f"@{cut - 1}" if cut else None)
        started = time.perf_counter()
        first = mine_repository(repo, first_settings, data)
        first_s = time.perf_counter() - started
        settings = MineSettings(branch=branch)
        started = time.perf_counter()
        second = mine_repository(repo, settings, data)
        second_s = time.perf_counter() - started
        started = time.perf_counter()
        third = mine_repository(repo, settings, data)
        third_s = time.perf_counter() - started
        manifest = json.loads((third.dataset_dir / "manifest.json").read_text())
        shards = _shard_records(third.dataset_dir)
    print(
        f"full run      : {first_s:8.1f} s  {first.new_commits} commits read, "
        f"{first.new_instances} instances mined"
    )
    print(
        f"incremental   : {second_s:8.1f} s  {second.new_commits} commits read "
        f"(expected {incremental_commits}), {second.new_instances} instances mined"
    )
    print(f"no new commits: {third_s:8.1f} s  {third.new_commits} commits read")
    print(f"incremental vs full time: {first_s / max(second_s, 1e-9):.1f}x faster")
    counts = manifest["counts"]
    print("counts (train/validation/test):")
    for kind, splits in counts.items():
        print(f"  {kind:15s} {splits['train']:7d} {splits['validation']:7d} {splits['test']:7d}")
    print(
        f"commits {manifest['commit_range']['commits']}, mined {manifest['commit_range']['mined_commits']}, "
        f"skipped {manifest['skipped_commits']}, authors {len(manifest['authors'])}, "
        f"cutoff {manifest['cutoff']}"
    )
    print(
        f"secrets {manifest['secrets']['found']}, dedup exact {manifest['dedup']['exact']} near {manifest['dedup']['near']}"
    )
    total = sum(sum(s.values()) for s in counts.values())
    adds_up = (
        total == manifest["total"] == sum(shards.values())
        and all(shards[name] == info["records"] for name, info in manifest["shards"].items())
        and sum(sum(v.values()) for v in manifest["counts_by_author"].values()) == total
        and sum(sum(v.values()) for v in manifest["counts_by_language"].values()) == total
    )
    print(f"manifest counts add up to the shards: {adds_up} ({total} records)")
    ok = adds_up and second.new_commits == incremental_commits and third.new_commits == 0
    if not ok:
        sys.exit("mine check failed")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repo", type=Path, default=Path("/tmp/requests"))
    parser.add_argument("--branch", default="main")
    parser.add_argument(
        "--commits", type=int, default=1000, help="range for the PyDriller comparison"
    )
    parser.add_argument("--incremental-commits", type=int, default=20)
    parser.add_argument("--skip-mine", action="store_true", help="only the extraction comparison")
    args = parser.parse_args()
    if not (args.repo / ".git").exists() and not (args.repo / "HEAD").exists():
        sys.exit(
            f"{args.repo} is not a git clone; clone a public repository with thousands of "
            "commits there first (see the module docstring)"
        )
    bench_extraction(args.repo, args.branch, args.commits)
    if not args.skip_mine:
        bench_mine(args.repo, args.branch, args.incremental_commits)


if __name__ == "__main__":
    main()
