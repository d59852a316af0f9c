"""The evaluation report: report.json (every figure, machine-readable),
report.html (self-contained: tables and inline PNG plots, no external
files), predictions.jsonl (what each model said on each instance, so any
figure can be recomputed), and the summary tables printed in the terminal.

`build_report_data` turns predictions into figures; it is the only place
where figures are computed, so the JSON, the HTML and the terminal agree.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.table import Table

from shoptalk.models.errors import ShopTalkError
from shoptalk.models.files import atomic_dir
from shoptalk.models.settings import Settings
from shoptalk.models.tables import whole_cells
from shoptalk.trainer.eval_types import EvalSet, LookupRankings, ModelRun, ResolvedModel
from shoptalk.trainer.metrics import (
    CompletionScore,
    Interval,
    bootstrap_mean,
    mcnemar,
    percentile,
    summarize_completions,
    top_k_hit,
)

SCHEMA_VERSION = 1
REPORT_FILES = ("report.json", "report.html", "predictions.jsonl", "lookup.jsonl")
SIGNIFICANCE = 0.05

# The per-author chart: authors with fewer instances than this are pooled
# into one bar ("5 other authors"), and so is everyone past the MAX_AUTHOR_BARS
# largest: twenty bars of n = 1 say nothing.
AUTHOR_MIN_INSTANCES = 5
MAX_AUTHOR_BARS = 12

# Masked-length buckets (whitespace tokens) for the "EM vs masked length" plot.
LENGTH_BUCKETS = ((3, 5), (6, 10), (11, 20), (21, 50))


class ReportError(ShopTalkError):
    pass


def _latency(latencies: Sequence[float]) -> dict[str, float]:
    ms = [s * 1000.0 for s in latencies]
    return {
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "mean_ms": sum(ms) / len(ms) if ms else math.nan,
    }


def _by_length(scores: Sequence[CompletionScore], lengths: Sequence[int]) -> list[dict[str, Any]]:
    rows = []
    for low, high in LENGTH_BUCKETS:
        picked = [s.exact for s, n in zip(scores, lengths, strict=True) if low <= n <= high]
        rows.append(
            {
                "masked_tokens": f"{low}-{high}",
                "count": len(picked),
                "exact_match": 100.0 * sum(picked) / len(picked) if picked else None,
            }
        )
    return rows


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or reference is None or not reference or math.isnan(reference):
        return None
    return value / reference


def build_report_data(
    *,
    repo: Path,
    test_set: EvalSet,
    models: Sequence[ResolvedModel],
    runs: Sequence[ModelRun],
    scores: dict[str, list[CompletionScore]],
    settings: Settings,
    command: str,
    seconds: float,
    lookup: LookupRankings | None = None,
) -> dict[str, Any]:
    """Every figure of the report, as JSON-ready data."""
    if lookup is None:
        lookup = LookupRankings(reason="no module ranking was given")
    resamples = settings.eval.bootstrap
    instances = test_set.completion
    authors = sorted({i.author_id for i in instances})
    lengths = [i.masked_tokens for i in instances]
    model_rows: list[dict[str, Any]] = []
    for model, run in zip(models, runs, strict=True):
        model_scores = scores[model.spec]
        per_author: dict[str, Any] = {}
        for author in authors:
            picked = [
                s for s, i in zip(model_scores, instances, strict=True) if i.author_id == author
            ]
            per_author[author] = summarize_completions(picked, resamples=resamples).as_dict()
        general = (
            {
                "instances": run.general_instances,
                "exact": run.general_exact,
                "exact_match": 100.0 * run.general_exact / run.general_instances,
            }
            if run.general_instances
            else None
        )
        humaneval = (
            {
                "problems": run.humaneval_total,
                "passed": run.humaneval_passed,
                "pass_at_1": 100.0 * run.humaneval_passed / run.humaneval_total,
            }
            if run.humaneval_total
            else None
        )
        author_groups = _author_groups(model_scores, instances, resamples)
        model_rows.append(
            {
                "spec": model.spec,
                "model": str(model.model),
                "adapter": str(model.adapter) if model.adapter else None,
                "prompt": "fim" if model.use_fim else "prefix-only",
                "run_id": model.run_id,
                "note": model.note,
                "manifests": model.manifests,
                "latency": _latency(run.latencies),
                "completion": {
                    "pooled": summarize_completions(model_scores, resamples=resamples).as_dict(),
                    "per_author": per_author,
                    "author_groups": author_groups,
                    "by_masked_length": _by_length(model_scores, lengths),
                },
                "retention": {"general": general, "humaneval": humaneval},
            }
        )
    _add_retention_ratios(model_rows)
    comparisons = _comparisons(models, scores)
    return {
        "schema": SCHEMA_VERSION,
        "complete": True,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": command,
        "repo": str(repo),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "seconds": seconds,
        "dataset": {
            "manifest": test_set.manifest,
            "scope": test_set.scope,
            "commit_range": test_set.commit_range(),
            "instances": {
                "completion": len(instances),
                "completion_in_split": test_set.available,
                "module_lookup": len(test_set.module_lookup),
                "per_author": {a: sum(1 for i in instances if i.author_id == a) for a in authors},
            },
        },
        "settings": {
            "eval": settings.eval.model_dump(mode="json"),
            "serve": settings.serve.model_dump(mode="json"),
            "base": settings.train.base,
        },
        "models": model_rows,
        "comparisons": comparisons,
        "verdict": verdict(model_rows, comparisons),
        "module_lookup": module_lookup_section(test_set, lookup, resamples),
    }


def _author_groups(
    scores: Sequence[CompletionScore], instances: Sequence[Any], resamples: int
) -> list[dict[str, Any]]:
    """The bars of the per-author chart: each author with enough instances
    (the largest first), then one pooled bar for all the others."""
    by_author: dict[str, list[CompletionScore]] = {}
    for score, instance in zip(scores, instances, strict=True):
        by_author.setdefault(instance.author_id, []).append(score)
    ranked = sorted(by_author.items(), key=lambda item: (-len(item[1]), item[0]))
    own = [(a, s) for a, s in ranked if len(s) >= AUTHOR_MIN_INSTANCES][:MAX_AUTHOR_BARS]
    kept = {author for author, _ in own}
    groups = [
        {
            "label": author,
            "authors": [author],
            "count": len(picked),
            "exact_match": summarize_completions(picked, resamples=resamples).exact.as_dict(),
        }
        for author, picked in own
    ]
    rest = [(a, s) for a, s in ranked if a not in kept]
    if rest:
        pooled = [score for _, picked in rest for score in picked]
        label = rest[0][0] if len(rest) == 1 else f"{len(rest)} other authors"
        groups.append(
            {
                "label": label,
                "authors": [author for author, _ in rest],
                "count": len(pooled),
                "exact_match": summarize_completions(pooled, resamples=resamples).exact.as_dict(),
            }
        )
    return groups


def _headline(comparisons: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The comparison the verdict is about: the tuned model against the base
    (the promoted model first, then a named run, then any other)."""
    against_base = [c for c in comparisons if c["b"] == "base"]
    for wanted in ("org", "run:", ""):
        for comparison in against_base:
            if comparison["a"].startswith(wanted):
                return comparison
    return comparisons[0] if comparisons else None


def _notes(models: Sequence[dict[str, Any]], specs: Sequence[str]) -> str:
    """What was evaluated of `specs`, when a model is not simply its export
    (a run's measured checkpoint, or figures that are not held out)."""
    notes = {m["spec"]: m.get("note") for m in models}
    return "".join(f" {notes[spec]}." for spec in specs if notes.get(spec))


def verdict(
    models: Sequence[dict[str, Any]], comparisons: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Which model is better, by how much, and whether that is significant:
    one sentence (`text`) and its figures."""
    em = {m["spec"]: m["completion"]["pooled"]["exact_match"]["value"] for m in models}
    counts = {m["spec"]: m["completion"]["pooled"]["count"] for m in models}
    headline = _headline(comparisons)
    if headline is None:
        spec = models[0]["spec"] if models else "?"
        value = em.get(spec)
        shown = "–" if value is None or math.isnan(value) else f"{value:.1f}%"
        text = f"{spec}: {shown} exact match (n={counts.get(spec, 0)}); nothing to compare it with."
        return {"text": text + _notes(models, [spec])}
    a, b = headline["a"], headline["b"]
    diff = headline["difference_points"] or 0.0
    p_value = headline["p_value"]
    figures = f"{em[a]:.1f}% vs {em[b]:.1f}% exact match, n={counts[a]}"
    test = f"McNemar p = {p_value:.2g}"
    if abs(diff) < 0.05:
        text = f"{a} and {b} are tied ({figures}): no difference."
    elif headline["significant"]:
        better = "better" if diff > 0 else "worse"
        text = f"{a} is {better} than {b} by {abs(diff):.1f} EM points ({figures}); significant ({test})."
    else:
        side = "above" if diff > 0 else "below"
        text = (
            f"{a} is {abs(diff):.1f} EM points {side} {b} ({figures}), but that is not "
            f"significant ({test}): no difference shown."
        )
    return {
        "text": text + _notes(models, [a, b]),
        "a": a,
        "b": b,
        "difference_points": diff,
        "p_value": p_value,
        "significant": bool(headline["significant"]),
    }


def verdict_line(data: dict[str, Any]) -> str:
    """The report's one-line verdict (computed again for reports written
    before it was recorded)."""
    recorded = data.get("verdict")
    if isinstance(recorded, dict) and recorded.get("text"):
        return str(recorded["text"])
    return str(verdict(data.get("models", []), data.get("comparisons", []))["text"])


def module_lookup_section(
    test_set: EvalSet, lookup: LookupRankings, resamples: int = 1000
) -> dict[str, Any]:
    """Top-1 / top-3 accuracy of each ranking on the module-lookup queries."""
    queries = test_set.module_lookup
    if lookup.reason is not None:
        return {"evaluated": False, "reason": lookup.reason}
    if not queries:
        return {"evaluated": False, "reason": "the test split has no module-lookup queries"}
    rows = []
    for name, ranked in lookup.rankings.items():
        top1 = [top_k_hit(r, q.modules, 1) for r, q in zip(ranked, queries, strict=True)]
        top3 = [top_k_hit(r, q.modules, 3) for r, q in zip(ranked, queries, strict=True)]
        rows.append(
            {
                "ranking": name,
                "count": len(queries),
                "top1": 100.0 * sum(top1) / len(top1),
                "top3": 100.0 * sum(top3) / len(top3),
                "top1_ci": _percent_interval(bootstrap_mean([float(h) for h in top1], resamples)),
                "top3_ci": _percent_interval(bootstrap_mean([float(h) for h in top3], resamples)),
            }
        )
    return {"evaluated": True, "rows": rows}


def _percent_interval(interval: Interval) -> dict[str, float]:
    return {k: 100.0 * v for k, v in interval.as_dict().items()}


def _add_retention_ratios(model_rows: list[dict[str, Any]]) -> None:
    """Each model's retention relative to the untuned base (when both ran)."""
    base = next((m for m in model_rows if m["spec"] == "base"), None)
    for row in model_rows:
        if row is base:
            continue
        for key, figure in (("general", "exact_match"), ("humaneval", "pass_at_1")):
            entry = row["retention"][key]
            if entry is None:
                continue
            reference = base["retention"][key] if base else None
            entry["ratio_to_base"] = _ratio(entry[figure], reference[figure] if reference else None)


def _comparisons(
    models: Sequence[ResolvedModel], scores: dict[str, list[CompletionScore]]
) -> list[dict[str, Any]]:
    """McNemar on exact match: every model against the base, and the tuned
    org model against the baseline+ size control."""
    specs = [m.spec for m in models]
    pairs: list[tuple[str, str]] = []
    if "base" in specs:
        pairs += [(s, "base") for s in specs if s != "base"]
    if "org" in specs and "baseline+" in specs:
        pairs.append(("org", "baseline+"))
    for spec in specs:
        if spec.startswith("org+dev:") and "org" in specs:
            pairs.append((spec, "org"))
    rows = []
    for a, b in pairs:
        exact_a = [s.exact for s in scores[a]]
        exact_b = [s.exact for s in scores[b]]
        test = mcnemar(exact_a, exact_b)
        n = len(exact_a)
        rows.append(
            {
                "a": a,
                "b": b,
                "metric": "exact_match",
                "difference_points": 100.0 * (sum(exact_a) - sum(exact_b)) / n if n else None,
                **test.as_dict(),
                "significant": test.p_value < SIGNIFICANCE,
            }
        )
    return rows


# ------------------------------------------------------------------ files


def write_report(
    directory: Path,
    data: dict[str, Any],
    test_set: EvalSet,
    runs: Sequence[ModelRun],
    lookup: LookupRankings | None = None,
) -> None:
    """Write the report folder atomically: all its files or none."""
    if directory.exists() and any(p.name not in REPORT_FILES for p in directory.iterdir()):
        raise ReportError(
            f"{directory} exists and holds other files; choose an empty or new folder for --out"
        )
    with atomic_dir(directory) as tmp:
        (tmp / "report.json").write_text(
            json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8"
        )
        with (tmp / "predictions.jsonl").open("w", encoding="utf-8") as handle:
            for index, inst in enumerate(test_set.completion):
                record = {
                    "id": inst.id,
                    "author_id": inst.author_id,
                    "commit": inst.commit,
                    "path": inst.path,
                    "masked_tokens": inst.masked_tokens,
                    "target": inst.target,
                    "predictions": {run.spec: run.predictions[index] for run in runs},
                    "latency_ms": {run.spec: run.latencies[index] * 1000.0 for run in runs},
                }
                handle.write(json.dumps(record) + "\n")
        with (tmp / "lookup.jsonl").open("w", encoding="utf-8") as handle:
            rankings = lookup.rankings if lookup is not None else {}
            for index, query in enumerate(test_set.module_lookup):
                answer = {
                    "id": query.id,
                    "query": query.query,
                    "modules": list(query.modules),
                    "rankings": {name: ranked[index] for name, ranked in rankings.items()},
                }
                handle.write(json.dumps(answer) + "\n")
        (tmp / "report.html").write_text(render_html(data, runs), encoding="utf-8")


# ------------------------------------------------------------------ plots


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plots(data: dict[str, Any], runs: Sequence[ModelRun]) -> dict[str, str]:
    """Base64 PNGs: per-author EM bars, EM vs masked length, latency histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = data["models"]
    images: dict[str, str] = {}

    # Bars: the authors with enough instances, then the others pooled (the
    # groups are the same for every model: they depend on the instances only).
    groups = models[0]["completion"]["author_groups"] if models else []
    labels = [f"{g['label'][:22]}\n(n={g['count']})" for g in groups]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(groups) * max(1, len(models)) + 2), 3.8))
    width = 0.8 / max(1, len(models))
    for k, model in enumerate(models):
        cells = [g["exact_match"] for g in model["completion"]["author_groups"]]
        values = [c["value"] for c in cells]
        errors = [
            [max(0.0, c["value"] - c["low"]) for c in cells],
            [max(0.0, c["high"] - c["value"]) for c in cells],
        ]
        xs = [i + k * width for i in range(len(cells))]
        ax.bar(xs, values, width, yerr=errors, capsize=3, label=model["spec"])
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels(labels, rotation=0 if len(groups) <= 6 else 30, ha="center")
    ax.set_ylabel("exact match (%)")
    ax.set_title(
        f"Exact match per author (95% bootstrap CI; fewer than {AUTHOR_MIN_INSTANCES} "
        "instances: pooled)"
    )
    ax.legend()
    fig.tight_layout()
    images["per_author"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    labels = [f"{low}–{high}" for low, high in LENGTH_BUCKETS]
    for model in models:
        rows = model["completion"]["by_masked_length"]
        xs = [k for k, r in enumerate(rows) if r["exact_match"] is not None]
        ys = [rows[k]["exact_match"] for k in xs]
        ax.plot(xs, ys, marker="o", label=model["spec"])
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels)
    ax.set_xlabel("masked whitespace tokens")
    ax.set_ylabel("exact match (%)")
    ax.set_title("Exact match vs masked length")
    ax.legend()
    images["by_length"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6.0, 3.4))
    for run in runs:
        ax.hist([s * 1000.0 for s in run.latencies], bins=30, alpha=0.5, label=run.spec)
    ax.set_xlabel("latency per completion (ms)")
    ax.set_ylabel("instances")
    ax.set_title("Completion latency")
    ax.legend()
    images["latency"] = _png(fig)
    return images


# ------------------------------------------------------------------ views


def _fmt(cell: dict[str, float] | None) -> str:
    if cell is None or cell["value"] is None or math.isnan(cell["value"]):
        return "–"
    return f"{cell['value']:.1f} [{cell['low']:.1f}, {cell['high']:.1f}]"


def _num(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _retention_cell(entry: dict[str, Any] | None, figure: str) -> str:
    if entry is None:
        return "–"
    text = f"{entry[figure]:.1f}"
    ratio = entry.get("ratio_to_base")
    if ratio is not None:
        text += f" ({ratio:.0%} of base)"
    return text


def summary_rows(data: dict[str, Any]) -> list[list[str]]:
    """One row per model: the terminal table and the HTML table share it."""
    rows = []
    for model in data["models"]:
        pooled = model["completion"]["pooled"]
        rows.append(
            [
                model["spec"],
                model["prompt"],
                str(pooled["count"]),
                _fmt(pooled["exact_match"]),
                _fmt(pooled["strict_exact_match"]),
                _fmt(pooled["prefix_match"]),
                _fmt(pooled["edit_similarity"]),
                _fmt(pooled["crystal_bleu"]),
                _retention_cell(model["retention"]["general"], "exact_match"),
                _retention_cell(model["retention"]["humaneval"], "pass_at_1"),
                f"{_num(model['latency']['p50_ms'], 0)} / {_num(model['latency']['p95_ms'], 0)}",
            ]
        )
    return rows


SUMMARY_COLUMNS = (
    "model",
    "prompt",
    "n",
    "EM % [95% CI]",
    "strict EM %",
    "prefix %",
    "edit sim %",
    "CrystalBLEU",
    "general EM %",
    "HumanEval p@1",
    "latency p50/p95 ms",
)


# The terminal shows the headline columns; report.html has them all.
TERMINAL_COLUMNS = (
    "model",
    "n",
    "EM % [95% CI]",
    "edit sim %",
    "CrystalBLEU",
    "general EM %",
    "HumanEval p@1",
    "latency p50/p95 ms",
)


def comparison_rows(data: dict[str, Any]) -> list[list[str]]:
    return [
        [
            f"{c['a']} vs {c['b']}",
            _num(c["difference_points"]),
            f"{c['only_a']} / {c['only_b']}",
            f"{c['p_value']:.3g}",
            "yes" if c["significant"] else "no",
        ]
        for c in data["comparisons"]
    ]


COMPARISON_COLUMNS = ("EM comparison", "Δ points", "only A / only B", "McNemar p", "p < 0.05")


def summary_tables(data: dict[str, Any]) -> list[Table]:
    instances = data["dataset"]["instances"]
    span = data["dataset"]["commit_range"]
    title = (
        f"{Path(data['repo']).name}: {instances['completion']} completion instances from "
        f"{span['commits']} commits ({span['first_author_date'] or '?'} … "
        f"{span['last_author_date'] or '?'})"
    )
    table = Table(title=title)
    keep = [SUMMARY_COLUMNS.index(c) for c in TERMINAL_COLUMNS]
    for index in keep:
        table.add_column(SUMMARY_COLUMNS[index])
    for row in summary_rows(data):
        table.add_row(*(row[index] for index in keep))
    tables = [whole_cells(table, keys=("model",))]
    if data["comparisons"]:
        comparisons = Table(title="Paired test on exact match")
        for column in COMPARISON_COLUMNS:
            comparisons.add_column(column)
        for row in comparison_rows(data):
            comparisons.add_row(*row)
        tables.append(whole_cells(comparisons, keys=("EM comparison",)))
    return tables


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}
th{background:#f3f3f3} code,pre{background:#f6f6f6;padding:2px 4px}
pre{padding:8px;overflow-x:auto} img{max-width:100%} .note{color:#555}
.verdict{font-size:18px;font-weight:600;padding:10px 14px;background:#f3f7ff;border-left:4px solid #3a6ee8}
"""


def _table_html(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _mined_range_text(mined: Any) -> str:
    """The manifest's mined range as a sentence (it is a dict in the JSON)."""
    if not isinstance(mined, dict):
        return "range not recorded" if mined is None else str(mined)
    text = f"{mined.get('mined_commits', '?')} of {mined.get('commits', '?')} commits"
    if mined.get("first") or mined.get("last"):
        text += f", {mined.get('first') or '?'} … {mined.get('last') or '?'}"
    bounds = [f"{k} {mined[k]}" for k in ("since", "until") if mined.get(k)]
    return text + (f" ({', '.join(bounds)})" if bounds else "")


MODEL_COLUMNS = ("model", "file", "adapter", "prompt", "run", "base", "quant", "sha256")


def model_rows(data: dict[str, Any]) -> list[list[str]]:
    """What each model was, from its manifests: one row per model (not the raw JSON)."""
    rows = []
    for model in data["models"]:
        manifests = model.get("manifests") or {}
        main = manifests.get("model") or manifests.get("adapter") or {}
        sha = str(main.get("sha256") or "")
        rows.append(
            [
                model["spec"],
                Path(model["model"]).name,
                Path(model["adapter"]).name if model.get("adapter") else "–",
                model["prompt"],
                model.get("run_id") or "–",
                str(main.get("base") or data["settings"].get("base") or "–"),
                str(main.get("quant") or "–"),
                sha[:12] or "–",
            ]
        )
    return rows


def _per_author_html(data: dict[str, Any]) -> str:
    """Every author's figures, the most instances first; folded away when long."""
    counts = data["dataset"]["instances"]["per_author"]
    authors = sorted(counts, key=lambda a: (-counts[a], a))
    rows = [
        [a, str(counts[a])]
        + [_fmt(m["completion"]["per_author"][a]["exact_match"]) for m in data["models"]]
        for a in authors
    ]
    table = _table_html(["author", "n", *[m["spec"] for m in data["models"]]], rows)
    if len(rows) <= MAX_AUTHOR_BARS:
        return table
    return f"<details><summary>All {len(rows)} authors</summary>{table}</details>"


def render_html(data: dict[str, Any], runs: Sequence[ModelRun]) -> str:
    """The page: the verdict first, then the test set, the figures, the models."""
    images = plots(data, runs)
    esc = html.escape
    dataset = data["dataset"]
    span = dataset["commit_range"]
    # The counts describe the references, so they are the same for every model.
    first = data["models"][0]["completion"]["pooled"] if data["models"] else None
    trivial_note = (
        f"{first['all_trivial_references']} references are all trivial, "
        f"{first['too_short_references']} are shorter than four tokens"
        if first
        else ""
    )
    module_lookup = data["module_lookup"]
    lookup_html = (
        _table_html(
            ("ranking", "top-1 % [95% CI]", "top-3 % [95% CI]", "n"),
            [
                [r["ranking"], _fmt(r["top1_ci"]), _fmt(r["top3_ci"]), str(r["count"])]
                for r in module_lookup["rows"]
            ],
        )
        if module_lookup.get("evaluated")
        else f"<p class=note>Not evaluated: {esc(str(module_lookup.get('reason')))}</p>"
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>ShopTalk evaluation: {esc(Path(data["repo"]).name)}</title>
<style>{_CSS}</style></head><body>
<h1>ShopTalk evaluation: {esc(Path(data["repo"]).name)}</h1>
<p class=verdict id=verdict>{esc(verdict_line(data))}</p>
<p class=note>Command: <code>{esc(data["command"])}</code><br>
Created {esc(data["created"])} on {esc(data["machine"]["platform"])}, {data["seconds"]:.0f} s.</p>
<h2>Test set</h2>
<p>Repository <code>{esc(data["repo"])}</code>; cutoff <code>{esc(str(span["cutoff"]))}</code>;
mined {esc(_mined_range_text(span["mined_range"]))}.<br>
{dataset["instances"]["completion"]} completion instances (of {dataset["instances"]["completion_in_split"]}
in scope “{esc(dataset["scope"])}”) from {span["commits"]} commits, authored {esc(str(span["first_author_date"]))} …
{esc(str(span["last_author_date"]))}; {dataset["instances"]["module_lookup"]} module-lookup queries.</p>
<h2>Completion</h2>
{_table_html(SUMMARY_COLUMNS, summary_rows(data))}
<p class=note>Percentages with 95% percentile-bootstrap intervals ({data["settings"]["eval"]["bootstrap"]} resamples).
CrystalBLEU ignores the most frequent n-grams of the general corpus; references that are all trivial or
shorter than four tokens score 0 on their own: here {esc(trivial_note)}.</p>
{_table_html(COMPARISON_COLUMNS, comparison_rows(data)) if data["comparisons"] else ""}
<h3>Per author (exact match %)</h3>
<img alt="per-author exact match" src="data:image/png;base64,{images["per_author"]}">
{_per_author_html(data)}
<img alt="exact match vs masked length" src="data:image/png;base64,{images["by_length"]}">
<h2>Module lookup</h2>
{lookup_html}
<h2>Latency</h2>
<img alt="latency histogram" src="data:image/png;base64,{images["latency"]}">
<h2>Models</h2>
{_table_html(MODEL_COLUMNS, model_rows(data))}
<p class=note>Every model's manifest is in report.json (<code>models[].manifests</code>).</p>
</body></html>
"""
