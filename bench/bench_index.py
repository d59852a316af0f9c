"""Benchmark: the workspace index on a large checkout — build time and
memory, the context block's latency, and one incremental update.

    .venv/bin/python bench/bench_index.py --tree /path/to/checkout --queries 200

1. `WorkspaceIndex.from_tree` over the checkout (what `shoptalk serve`
   builds in the background when the context engine is on): wall time, RSS
   before and after (this process), files and windows indexed, what the caps
   left out.
2. Context blocks (`build_context`, 2,000 characters, every source) at
   `--queries` seeded cursors in indexed files: p50/p95, next to a baseline
   in the same run: a linear scan that scores every window by shared
   identifiers (what an index saves).
3. Incremental updates: one indexed file edited (a line appended) and
   re-indexed, as the server does on didChange/didSave: p50/p95.

Run on a quiet machine; the figures are the machine's.
"""

from __future__ import annotations

import argparse
import random
import resource
import time
from pathlib import Path

from shoptalk.models.context import ContextOptions, Workspace, build_context, query_identifiers
from shoptalk.models.workspace_index import WorkspaceIndex, identifiers


def rss_mb() -> float:
    """This process's resident set now (Linux /proc), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def linear_scan(index: WorkspaceIndex, query: list[str], limit: int = 8) -> list[str]:
    """The baseline: every 16-line window of every file scored by the query's
    identifiers it contains."""
    wanted = set(query)
    scored: list[tuple[int, str]] = []
    for path in index.paths():
        lines = index.lines(path) or []
        for start in range(0, max(1, len(lines)), 8):
            window = set(identifiers("\n".join(lines[start : start + 16])))
            scored.append((len(wanted & window), f"{path}:{start}"))
    scored.sort(reverse=True)
    return [name for _, name in scored[:limit]]


def cursors(index: WorkspaceIndex, count: int, seed: int) -> list[tuple[str, str, str]]:
    """(path, prefix, suffix) at seeded line ends of indexed files."""
    rng = random.Random(seed)
    paths = index.paths()
    found: list[tuple[str, str, str]] = []
    while len(found) < count and paths:
        path = rng.choice(paths)
        text = index.text(path) or ""
        ends = [i for i, c in enumerate(text) if c == "\n"]
        if len(ends) < 20:
            continue
        cut = ends[rng.randrange(10, len(ends))]
        found.append((path, text[:cut], text[cut:]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tree", type=Path, required=True, help="a checkout (work tree)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--baseline-queries", type=int, default=5)
    parser.add_argument("--updates", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    before = rss_mb()
    started = time.perf_counter()
    index = WorkspaceIndex.from_tree(args.tree.resolve())
    build_s = time.perf_counter() - started
    after = rss_mb()
    stats = index.stats()
    print(f"index of {args.tree}: {stats}")
    print(f"build {build_s:.1f} s, RSS {before:.0f} -> {after:.0f} MB (+{after - before:.0f} MB)")

    workspace = Workspace(index)
    options = ContextOptions(chars=2000, prefix_chars=6000, suffix_chars=400)
    points = cursors(index, args.queries, args.seed)
    block_ms: list[float] = []
    for path, prefix, suffix in points:
        tick = time.perf_counter()
        build_context(workspace, path, prefix, suffix, options)
        block_ms.append(1000 * (time.perf_counter() - tick))
    scan_ms: list[float] = []
    for _, prefix, _ in points[: args.baseline_queries]:
        tick = time.perf_counter()
        linear_scan(index, query_identifiers(prefix[: prefix.rfind("\n") + 1]))
        scan_ms.append(1000 * (time.perf_counter() - tick))
    p50, scan50 = percentile(block_ms, 50), percentile(scan_ms, 50)
    print(
        f"context block: p50 {p50:.1f} ms, p95 {percentile(block_ms, 95):.1f} ms "
        f"({len(block_ms)} cursors); linear-scan baseline p50 {scan50:.0f} ms "
        f"({len(scan_ms)} queries): x{scan50 / max(p50, 1e-9):.0f}"
    )

    rng = random.Random(args.seed + 1)
    update_ms: list[float] = []
    paths = index.paths()
    for number in range(args.updates):
        path = rng.choice(paths)
        text = (index.text(path) or "") + f"\nconst edited_{number} = {number};\n"
        tick = time.perf_counter()
        index.update(path, text)
        update_ms.append(1000 * (time.perf_counter() - tick))
    print(
        f"incremental update (one file): p50 {percentile(update_ms, 50):.1f} ms, "
        f"p95 {percentile(update_ms, 95):.1f} ms ({len(update_ms)} edits); "
        f"RSS now {rss_mb():.0f} MB"
    )


if __name__ == "__main__":
    main()
