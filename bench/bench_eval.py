"""Benchmark: does the team-tuned model beat its base (and the baseline+ size
control) on a repository's newest code, and does it keep its general ability?

Runs `shoptalk eval` on a repository that was already mined, trained and
exported, and prints each model's figures next to the untuned base measured
in the same run (points of exact match, ratio, McNemar p), plus retention and
latency ratios. The issue's targets: org EM >= base EM + 10 points, org beats
baseline+ significantly (p < 0.05), general-code EM >= 99% of base.

    nice -n 10 .venv/bin/python bench/bench_eval.py --repo /tmp/click \
        --models base,org,baseline+ --limit 200 --general 100 [--train-minutes 12]

With --train-minutes, the missing parts are made first with the product's
own stages: mine, train org for that budget, export, promote; train
baseline+ on general code for as many steps; export.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from rich.console import Console

from shoptalk.models.errors import ShopTalkError
from shoptalk.models.settings import Settings, load_settings
from shoptalk.models.store import RepoStore
from shoptalk.trainer.evaluate import evaluate_models, parse_specs
from shoptalk.trainer.report import summary_tables


def prepare_chain(repo: Path, settings: Settings, data_dir: Path, minutes: float) -> None:
    """What the comparison needs, made with the product's own stages where
    missing: the mined dataset, the org model (trained for `minutes`,
    exported, promoted) and baseline+ (the base trained on general code for
    as many optimizer steps as org took: the same amount of data)."""
    from shoptalk.trainer.export import export_run
    from shoptalk.trainer.mine import mine_repository
    from shoptalk.trainer.promotion import promote_run
    from shoptalk.trainer.retention import write_general_dataset
    from shoptalk.trainer.train import train_adapter

    store = RepoStore.for_repo(data_dir, repo)
    quant = settings.export.quant
    if not (store.dataset_dir / "manifest.json").is_file():
        mine_repository(repo, settings.mine, data_dir)
    budget = settings.model_copy(deep=True)
    budget.train.max_minutes = minutes
    org = train_adapter(repo, budget, data_dir)
    if org.adapter_dir is None:
        raise SystemExit(f"org training did not finish: {org.stop_reason}")
    model = next(p for p in export_run(org.run_dir, quant).files if p.name.startswith("model-"))
    promote_run(store, org.run_id, model, org.adapter_dir)
    general = store.root / "general-dataset"
    train_count = max(64, org.steps * budget.train.batch_size * budget.train.grad_accum)
    write_general_dataset(
        general, train_count, 100, settings.mine.prefix_chars, settings.mine.suffix_chars
    )
    same = settings.model_copy(deep=True)
    same.train.max_minutes = None
    same.train.max_steps = max(1, org.steps)
    plus = train_adapter(repo, same, data_dir, purpose="baseline+", dataset_dir=general)
    if plus.adapter_dir is None:
        raise SystemExit(f"baseline+ training did not finish: {plus.stop_reason}")
    export_run(plus.run_dir, quant)
    print(
        f"org: {org.steps} steps, {org.tokens} tokens, {org.wall_seconds / 60:.1f} min, "
        f"val loss {org.base_val_loss} -> {org.best_val_loss}; baseline+: {plus.steps} steps, "
        f"{plus.tokens} tokens, {plus.wall_seconds / 60:.1f} min",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("."))
    parser.add_argument("--models", default="base,org")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--general", type=int, default=100)
    parser.add_argument("--humaneval", type=int, default=0)
    parser.add_argument("--lookup", type=int, default=20)
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument(
        "--train-minutes",
        type=float,
        default=None,
        help="First mine (if needed), train and export org and baseline+ with this budget.",
    )
    args = parser.parse_args(argv)
    console = Console()
    overrides = {"data_dir": str(args.data_dir)} if args.data_dir else {}
    try:
        settings = load_settings(repo=args.repo, overrides=overrides)
        if args.train_minutes:
            prepare_chain(
                args.repo.resolve(), settings, settings.resolved_data_dir(), args.train_minutes
            )
        report = evaluate_models(
            args.repo,
            parse_specs(args.models),
            settings,
            settings.resolved_data_dir(),
            args.limit,
            general_instances=args.general,
            humaneval_problems=args.humaneval,
            lookup_queries=args.lookup,
            command=shlex.join([sys.executable, *sys.argv]),
        )
    except ShopTalkError as exc:
        console.print(f"[red]bench_eval:[/red] {exc}")
        return 2
    for table in summary_tables(report.data):
        console.print(table)
    models = {m["spec"]: m for m in report.data["models"]}
    base = models.get("base")
    if base is None:
        console.print("no base in --models: nothing to compare against")
        return 0
    base_em = base["completion"]["pooled"]["exact_match"]["value"]
    base_p50 = base["latency"]["p50_ms"]
    tests = {(c["a"], c["b"]): c for c in report.data["comparisons"]}
    for spec, model in models.items():
        if spec == "base":
            continue
        em = model["completion"]["pooled"]["exact_match"]["value"]
        test = tests.get((spec, "base"))
        ratio = f"{em / base_em:.2f}x" if base_em else "n/a (base EM 0)"
        line = (
            f"{spec}: EM {em:.1f}% vs base {base_em:.1f}% in the same run: "
            f"{em - base_em:+.1f} points, {ratio}"
        )
        if test:
            line += f", McNemar p = {test['p_value']:.3g}"
        general = model["retention"]["general"]
        if general and general.get("ratio_to_base") is not None:
            line += f"; general-code EM {general['ratio_to_base']:.0%} of base"
        line += f"; latency p50 {model['latency']['p50_ms'] / base_p50:.2f}x base"
        console.print(line)
    plus = tests.get(("org", "baseline+"))
    if plus:
        console.print(
            f"org vs baseline+: {plus['difference_points']:+.1f} points, "
            f"McNemar p = {plus['p_value']:.3g} ({'significant' if plus['significant'] else 'not significant'})"
        )
    console.print(f"report: {report.html_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
