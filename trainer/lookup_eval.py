"""`shoptalk eval`'s module-lookup figures for the retriever: top-1 / top-3 /
MRR of BM25, the zero-shot base, the trained retriever and their fusion with
BM25, on the held-out newest commit messages of the mined dataset (the test
split: commits at or after the cutoff), ranked through the served path
(`shoptalk.models.module_lookup.lookup_modules`, numpy encoder).

Module documents carry only the subjects of commits before the held-out
ones, so no query's own subject is in the index it is asked against.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from shoptalk.models.dense_index import load_base, load_export, promoted_export
from shoptalk.models.embedder import EmbedderError
from shoptalk.models.module_lookup import ModuleIndex
from shoptalk.models.module_map import module_map_from_tree
from shoptalk.trainer.retriever import (
    RETRIEVER_FILE,
    Rankings,
    bm25_rankings,
    lookup_data,
    rank_queries,
    read_pairs,
)

log = logging.getLogger(__name__)


def newest_export(runs_dir: Path) -> Path | None:
    """The newest run's retriever export (served or not)."""
    exports = sorted(
        (p.parent for p in runs_dir.glob(f"*/retriever/{RETRIEVER_FILE}")),
        key=lambda p: p.stat().st_mtime,
    )
    return exports[-1] if exports else None


def lookup_figures(
    repo: Path,
    store_root: Path,
    dataset_dir: Path,
    data_dir: Path,
    limit: int | None = None,
    zero_shot: bool = True,
) -> dict[str, Any]:
    """{"queries", "retriever" (the export measured), "methods": {name: {top1, top3, mrr}}},
    or {"reason"} when there is nothing to measure."""
    data = lookup_data(module_map_from_tree(repo), read_pairs(dataset_dir))
    queries = data.heldout[:limit] if limit else data.heldout
    if not queries:
        return {"reason": "no held-out lookup queries (mine with a cutoff first)"}
    rankings = Rankings([p.modules for p in queries])
    bare = ModuleIndex(data.module_map, data.history_before)
    rankings.ranked["bm25"] = bm25_rankings(bare, queries)
    rankings.ranked["bm25+names"] = bm25_rankings(bare, queries, names=True)
    if zero_shot:
        try:
            base = load_base(data_dir, store_root)
            rank_queries(bare.with_dense(base), queries, "zero-shot", rankings)
        except EmbedderError as exc:
            log.info("no zero-shot figures: %s", exc)
    export = promoted_export(store_root) or newest_export(store_root / "runs")
    if export is not None:
        try:
            dense = load_export(export)
            dense.memory = dense.memory.only({"train", "validation"})  # not the queries asked
            rank_queries(bare.with_dense(dense), queries, "trained", rankings)
        except EmbedderError as exc:
            log.warning("no trained-retriever figures: %s", exc)
    return {
        "queries": len(queries),
        "retriever": str(export) if export else None,
        "methods": rankings.metrics(),
    }


def lookup_table(figures: dict[str, Any]) -> str:
    """The figures as a few plain lines for the terminal."""
    if "methods" not in figures:
        return f"module lookup (retriever): {figures.get('reason')}"
    lines = [f"module lookup on {figures['queries']} held-out queries (top-1 / top-3 / MRR):"]
    for name, m in figures["methods"].items():
        lines.append(f"  {name:<16} {m['top1']:5.1f}%  {m['top3']:5.1f}%  {m['mrr']:.3f}")
    return "\n".join(lines)


def report_lookup_figures(
    repo: Path, settings: Any, report_dir: Path, say: Any, limit: int = 500
) -> dict[str, Any]:
    """`shoptalk eval`'s retriever figures: measured, printed and added to
    report.json (key `lookup_retriever`) and `lookup_retriever.json`."""
    import json

    from shoptalk.models.files import write_json_atomic, write_text_atomic
    from shoptalk.models.store import RepoStore

    data_dir = settings.resolved_data_dir()
    store = RepoStore.for_repo(data_dir, repo)
    figures = lookup_figures(repo, store.root, store.dataset_dir, data_dir, limit)
    say(lookup_table(figures))
    write_text_atomic(report_dir / "lookup_retriever.json", json.dumps(figures, indent=2) + "\n")
    report_json = report_dir / "report.json"
    if report_json.is_file():
        data = json.loads(report_json.read_text())
        data["lookup_retriever"] = figures
        write_json_atomic(report_json, data)
    return figures
