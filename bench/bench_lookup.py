"""Module lookup on public repositories: BM25 vs the zero-shot embedding model
vs the retriever trained on the repository's history vs their fusion.

    .venv/bin/python bench/bench_lookup.py --repo /work/.mirror/pallets+click/repo \\
        --cutoff 2025-04-01 --max-minutes 4

For each repository (a git folder; cloned into --work, never written): the
module map of the last commit before the cutoff; queries = subjects of later
commits (no merges, no bots) whose changed non-test source files belong to 1-3
modules that exist at the cutoff (the answer: any of them); training pairs =
subjects of earlier commits → the modules they touched (the newest tenth kept
apart for calibration) plus each docstring's first line → its module, all
from before the cutoff. Module documents carry only pre-cutoff commit
subjects. Prints top-1 / top-3 / MRR per method, the served path's latency
(numpy encoder, lookup_modules) and abstention on made-up no-match queries,
and writes them as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from shoptalk.models.dense_index import RETRIEVER_FILE, load_base, load_export
from shoptalk.models.embedder import Embedder, base_embedder_dir
from shoptalk.models.module_docs import is_test_path
from shoptalk.models.module_lookup import ModuleIndex, lookup_modules
from shoptalk.models.module_map import ModuleMap, language_for, module_map_from_tree
from shoptalk.trainer.retriever import (
    LookupData,
    LookupPair,
    Rankings,
    RetrieverArgs,
    bm25_rankings,
    calibrate,
    commit_history,
    measure_export,
    rank_queries,
    train_lookup_retriever,
)

# Made up to match nothing in a developer tool (not the calibration's list).
NO_MATCH = (
    "send invoices to the accounting department",
    "book flights to lisbon",
    "feed the cat at noon",
    "estimate the price of a used tractor",
    "generate a knitting pattern for a scarf",
    "find the nearest gas station",
    "compose a symphony for string quartet",
    "diagnose a broken washing machine",
    "rank football teams by goals scored",
    "convert dog years to human years",
    "choose a wine to go with salmon",
    "sort seashells by colour",
    "warn farmers about frost tonight",
    "measure the height of a mountain from a photo",
    "approve vacation requests from employees",
    "renew a passport online",
    "match socks from the laundry",
    "forecast avocado harvest yields",
    "identify bird species from their song",
    "split a restaurant bill between friends",
    "train a parrot to talk",
    "price airline tickets dynamically",
    "manage a beehive through the winter",
    "remind grandma to take her pills",
    "count votes in a school election",
    "paint a fence in two colours",
    "reserve a tennis court for saturday",
    "check a lottery ticket",
    "plan a road trip across canada",
    "calculate the tip at a bar",
)
BOT = re.compile(r"\[bot\]|dependabot|pre-commit-ci|renovate", re.I)
PR_REF = re.compile(r"\s*\((?:#|gh-)\d+\)|\s*#\d+\b")


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout


def clone(source: Path, work: Path) -> Path:
    target = work / source.parent.name
    if not (target / ".git").exists():
        subprocess.run(["git", "clone", "-q", str(source), str(target)], check=True)
    return target


def checkout_at(repo: Path, commit: str, work: Path) -> Path:
    tree = work / f"{repo.name}-{commit[:10]}"
    if not tree.exists():
        tree.mkdir(parents=True)
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", commit], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def commits(repo: Path) -> list[tuple[str, str, str, list[str]]]:
    """(sha, ISO date, subject, changed paths) of non-merge, non-bot commits, newest first."""
    out = git(
        repo,
        "log",
        "--no-merges",
        "--no-renames",
        "--name-only",
        "--format=%x00%H%x1f%aI%x1f%an%x1f%s",
        "HEAD",
    )
    found = []
    for block in out.split("\x00")[1:]:
        head, _, names = block.partition("\n")
        sha, date, author, subject = head.split("\x1f", 3)
        if BOT.search(author) or BOT.search(subject):
            continue
        subject = PR_REF.sub("", subject).strip()
        paths = [n for n in names.splitlines() if n.strip()]
        found.append((sha, date, subject, paths))
    return found


def touched_modules(paths: list[str], module_map: ModuleMap) -> tuple[list[str], bool]:
    """Non-test modules of the changed source files; False when one is unknown at the cutoff."""
    modules: set[str] = set()
    complete = True
    for path in paths:
        if language_for(path) is None or is_test_path(path):
            continue
        module = module_map.module_of(path)
        if module is None:
            complete = False
            continue
        modules.add(module.id)
    return sorted(modules), complete


def build_data(repo: Path, cutoff: str, work: Path) -> tuple[LookupData, Path]:
    history = commits(repo)
    before = [c for c in history if c[1] < cutoff]
    after = [c for c in history if c[1] >= cutoff]
    tree = checkout_at(repo, before[0][0], work)
    module_map = module_map_from_tree(tree)
    pairs: list[LookupPair] = []
    for _sha, date, subject, paths in before:
        modules, _ = touched_modules(paths, module_map)
        if modules and len(subject.split()) >= 3 and len(modules) <= 10:
            pairs.append(LookupPair(subject, tuple(modules), "commit_message", date))
    queries: list[LookupPair] = []
    for _sha, date, subject, paths in after:
        modules, complete = touched_modules(paths, module_map)
        if complete and 1 <= len(modules) <= 3 and len(subject.split()) >= 2:
            queries.append(LookupPair(subject, tuple(modules), "commit_message", date))
    docstrings = [
        LookupPair(symbol.doc, (module.id,), "docstring")
        for module in module_map.modules.values()
        if not is_test_path(module.path)
        for symbol in module.symbols
        if symbol.doc and len(symbol.doc.split()) >= 3
    ]
    cut = max(1, len(pairs) // 10)
    validation, train = pairs[:cut], pairs[cut:] + docstrings
    data = LookupData(
        module_map,
        train,
        validation,
        queries,
        commit_history(pairs),
        commit_history(pairs),
    )
    return data, tree


def zero_shot_index(data: LookupData, embedder: Embedder, store: Path) -> ModuleIndex:
    from shoptalk.trainer.retriever import _Encoder

    index = ModuleIndex(data.module_map, data.history_before)
    encoder = _Encoder(base_embedder_dir(store), None)
    docs = list(index.docs.values())
    vectors = encoder.encode_frozen([d.text for d in docs], 256).numpy()
    base = load_base(store, None)
    base.remember({d.id: (d.digest, v) for d, v in zip(docs, vectors, strict=True)})
    return index.with_dense(base)


def latency(index: ModuleIndex, queries: list[LookupPair]) -> dict[str, float]:
    index.prepare()
    if index.dense is not None:
        index.dense.clear_cache()  # every timed query is encoded
    times = []
    for pair in queries:
        started = time.perf_counter()
        lookup_modules(pair.query, index, None, 5)
        times.append((time.perf_counter() - started) * 1000)
    return {
        "p50_ms": round(float(np.percentile(times, 50)), 1),
        "p95_ms": round(float(np.percentile(times, 95)), 1),
        "n": len(times),
    }


def abstention(index: ModuleIndex, queries: list[LookupPair]) -> dict[str, float]:
    made_up = [lookup_modules(q, index, None, 3).abstained for q in NO_MATCH]
    kept_right = answered_right = 0
    for pair in queries:
        answer = lookup_modules(pair.query, index, None, 3)
        right = bool(answer.hits) and answer.hits[0].id in pair.modules
        answered_right += right
        kept_right += right and not answer.abstained
    n = max(1, len(queries))
    return {
        "no_match_abstained": round(100 * sum(made_up) / len(made_up), 1),
        "top1_without_abstention": round(100 * answered_right / n, 1),
        "top1_with_abstention": round(100 * kept_right / n, 1),
    }


def bench_repo(
    source: Path, cutoff: str, work: Path, args: RetrieverArgs, reuse: bool = False
) -> dict[str, object]:
    started = time.monotonic()
    repo = clone(source, work)
    data, _tree = build_data(repo, cutoff, work)
    queries = data.heldout
    print(
        f"{source.parent.name}: {len(data.module_map)} modules at the cutoff, "
        f"{len(data.train)} training pairs, {len(data.validation)} validation, "
        f"{len(queries)} queries",
        file=sys.stderr,
    )
    store = Path(tempfile.mkdtemp(dir=work, prefix="store-"))
    base = base_embedder_dir(store)
    rankings = Rankings([p.modules for p in queries])
    bare = ModuleIndex(data.module_map, data.history_before)
    rankings.ranked["bm25"] = bm25_rankings(bare, queries)
    rankings.ranked["bm25+names"] = bm25_rankings(bare, queries, names=True)
    zero = zero_shot_index(data, Embedder.load(base), store)
    rank_queries(zero, queries, "zero-shot", rankings)
    unseen = ModuleIndex(data.module_map, commit_history(data.train)).with_dense(zero.dense)
    zero_fit, _ = calibrate(unseen, data.validation, "zero-shot, validation queries")
    out = work / f"{repo.name}-retriever"
    if reuse and (out / RETRIEVER_FILE).is_file():  # the same training, measured again
        meta = json.loads((out / RETRIEVER_FILE).read_text())
        meta = measure_export(data, out, meta)
        print(f"{repo.name}: reused the retriever trained in {out}", file=sys.stderr)
    else:
        out, meta = train_lookup_retriever(data, base, out, args, "bench", print)
    dense = load_export(out)
    dense.memory = dense.memory.only({"train", "validation"})  # the queries' own subjects left out
    trained = ModuleIndex(data.module_map, data.history_before, dense)
    rank_queries(trained, queries, "trained", rankings)
    return {
        "repo": source.parent.name,
        "cutoff": cutoff,
        "modules": len(data.module_map),
        "train_pairs": meta["train_pairs"],
        "queries": len(queries),
        "metrics": rankings.metrics(),
        "latency": latency(trained, queries),
        "abstention": abstention(trained, queries),
        "abstention_zero_shot": abstention(zero, queries),
        "training": {k: meta[k] for k in ("steps", "epochs", "stop_reason", "train_seconds")},
        "calibration": meta["calibration"],
        "zero_shot_calibration_fit": asdict(zero_fit),
        "seconds": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--repo", type=Path, action="append", required=True)
    parser.add_argument("--cutoff", default="2025-04-01")
    parser.add_argument("--max-minutes", type=float, default=4.0)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tune-layers", type=int, default=RetrieverArgs.tune_layers)
    parser.add_argument("--batch-size", type=int, default=RetrieverArgs.batch_size)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench_lookup")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="measure the retriever a previous run trained in --work again (calibration, rankings)",
    )
    options = parser.parse_args()
    options.work.mkdir(parents=True, exist_ok=True)
    args = RetrieverArgs(
        max_minutes=options.max_minutes,
        epochs=options.epochs,
        threads=options.threads,
        tune_layers=options.tune_layers,
        batch_size=options.batch_size,
    )
    results = []
    for source in options.repo:
        result = bench_repo(source, options.cutoff, options.work, args, options.reuse)
        results.append(result)
        print(json.dumps(result, indent=1))
        if options.out:
            options.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
