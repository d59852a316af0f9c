"""The training half's commands: `shoptalk doctor`, `models pull`, `mine`,
`train`, `export`, `eval`, `retrain`, `personal`, `demo` and `runs`.

Plain typed functions that the root (`shoptalk.models.cli`) maps command
names to. Each reads its settings from its own options and the root's
(`typer.Context`), calls one stage's library function, and prints what it
returns; the stages never print and never import this module. Heavy
libraries (torch, transformers, llama.cpp) are imported inside the
functions, so `shoptalk --help` stays instant.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

from shoptalk.models.catalog import DEFAULT_BASE, resolve_base
from shoptalk.models.cli_support import (
    ConsoleReport,
    err,
    print_warning,
    section_flags,
    settings_for,
)
from shoptalk.models.cli_support import out as stdout_console
from shoptalk.models.progress import Progress
from shoptalk.models.settings import TrainSettings
from shoptalk.trainer.eval_types import SCOPE_NEWEST
from shoptalk.trainer.evaluate import DEFAULT_LOOKUP_QUERIES, DEFAULT_SPECS
from shoptalk.trainer.train import DEFAULT_VAL_LIMIT

if TYPE_CHECKING:
    from shoptalk.trainer.export import ExportResult

# Progress lines of the stages that report them (as the stages printed them).
notes = Console(stderr=True, soft_wrap=True)


def doctor(ctx: typer.Context) -> None:
    """Report Python, torch device, bf16, llama.cpp build, the default model and
    disk; exits 1 when a check fails."""
    from shoptalk.models.doctor import Check, print_checks, run_checks
    from shoptalk.models.settings import data_dir_problem
    from shoptalk.trainer.doctor import torch_checks

    data_dir = settings_for(ctx, check_data_dir=False).resolved_data_dir()
    checks = run_checks(data_dir, torch_checks())
    problem = data_dir_problem(data_dir)
    if problem is not None:
        checks.append(Check("data dir writable", problem, False))
    if not print_checks(stdout_console, checks):
        failed = ", ".join(check.name for check in checks if not check.ok)
        err.print(Text.assemble(("error:", "red"), f" failed: {failed} (✗ above)"))
        raise typer.Exit(1)


def models_pull(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Catalog key.")] = DEFAULT_BASE,
    gguf_only: Annotated[
        bool, typer.Option(help="Skip the HF checkpoint used for training.")
    ] = False,
) -> None:
    """Provision a base model: its GGUF (sha256-verified) and, for training,
    a cached HF checkpoint converted once from it."""
    from shoptalk.models.provision import ensure_gguf
    from shoptalk.trainer.hf_checkpoint import ensure_hf_checkpoint

    base = resolve_base(name)
    data_dir = settings_for(ctx).resolved_data_dir()
    ensure_gguf(data_dir, base, err.print)
    if not gguf_only:
        ensure_hf_checkpoint(data_dir, base, err.print)


def models_publish(
    ctx: typer.Context,
    repo: Annotated[Path, typer.Option(help="Repository whose promoted model to publish.")] = Path(
        "."
    ),
    name: Annotated[
        str | None,
        typer.Option(
            help="Serve it under this name (default: [team] team_model, or the developer's)."
        ),
    ] = None,
) -> None:
    """Publish the repository's promoted model (or personal adapter) to the
    team server: files into [team] model_dir, its config, [team] reload_command."""
    from shoptalk.models.store import RepoStore
    from shoptalk.trainer.publish import publish_promotion

    settings = settings_for(ctx, repo)
    store = RepoStore.for_repo(settings.resolved_data_dir(), repo)
    published = publish_promotion(store, settings.team, name, report=err.print)
    stdout_console.print(
        f"published run {published.run_id} as {published.name!r}"
        + ("" if published.reloaded else "; no [team] reload_command: reload the server yourself")
    )


def mine(
    ctx: typer.Context,
    repo: Annotated[Path, typer.Option(help="The git repository to mine.")] = Path("."),
    out: Annotated[
        Path | None,
        typer.Option(help="Write the dataset here instead of the repository's data folder."),
    ] = None,
    branch: Annotated[
        str | None, typer.Option(help="Branch to mine (default: the checked-out one).")
    ] = None,
    since: Annotated[
        str | None, typer.Option(help="Only commits after this date (git date syntax).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Only commits before this date.")] = None,
    cutoff: Annotated[
        str | None,
        typer.Option(help="Test cutoff (ISO date); default: the newest test_share of commits."),
    ] = None,
    secrets: Annotated[
        str | None, typer.Option(help="What to do with instances holding secrets: scrub | drop.")
    ] = None,
    kinds: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated kinds to mine (completion, module_lookup, commit_message, "
            "test_pair, doc_modules); default: all."
        ),
    ] = None,
    full: Annotated[
        bool, typer.Option("--full", help="Forget earlier runs and mine everything again.")
    ] = False,
) -> None:
    """Mine a repository's history into a time-split dataset (incremental)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as RichProgress

    from shoptalk.trainer.mine import mine_repository, summary_table

    mine_overrides: dict[str, Any] = {}
    for key, value in (
        ("branch", branch),
        ("since", since),
        ("until", until),
        ("cutoff", cutoff),
        ("secrets", secrets),
    ):
        if value is not None:
            mine_overrides[key] = value
    if kinds is not None:
        mine_overrides["kinds"] = [k.strip() for k in kinds.split(",") if k.strip()]
    settings = settings_for(ctx, repo, {"mine": mine_overrides} if mine_overrides else None)
    data_dir = settings.resolved_data_dir()
    started = time.monotonic()
    with RichProgress(
        TextColumn("mining commits"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("mine", total=None)

        def report(event: str | Progress) -> None:
            if isinstance(event, Progress):
                bar.update(task, completed=event.done, total=event.total)
            else:
                err.print(event)

        result = mine_repository(
            repo, settings.mine, data_dir, out_dir=out, full=full, report=report
        )
    for warning in result.warnings:
        print_warning(warning)
    stdout_console.print(summary_table(result.manifest))
    err.print(
        f"{result.new_commits} new commit(s) read, {result.new_instances} instance(s) mined"
        f"{' (full run)' if result.full else ' (incremental)'} in {time.monotonic() - started:.1f}s; "
        f"dataset: {result.dataset_dir}"
    )


# The [train] settings `shoptalk train` takes as options: field -> help, or
# (help, option names). Each option's type is its field's (models/settings.py).
TRAIN_FLAGS: dict[str, str | tuple[str, ...]] = {
    "base": "Base model: catalog key, HF id or local checkpoint path.",
    "max_minutes": (
        "Time budget of the whole command (loading, data, validation, training, saving).",
        "--max-minutes",
        "--budget-minutes",
    ),
    "max_steps": "Step budget of fine-tuning.",
    "pretrain_minutes": "Phase 1: minutes of causal LM on the repo's code (0 = off).",
    "learning_rate": ("Peak learning rate.", "--lr"),
    "lora_rank": "LoRA rank.",
    "layers_from": "Adapt only layers from this fraction of depth up (0-1).",
    "completion_format": "Completion prompts: auto (FIM if the base knows it), fim or prefix.",
    "batch_size": "Sequences per micro-batch.",
    "grad_accum": "Micro-batches per optimizer step.",
    "max_seq_tokens": "Longest training sequence.",
    "replay_share": "Share of general code (0-1).",
    "val_every": "Validate and checkpoint every N steps.",
    "device": "auto, cpu, cuda or mps.",
    "threads": "CPU threads.",
    "seed": "Random seed.",
    "final_pass": (
        "After the checkpoint is chosen and measured, train once over the held-out newest "
        "commits, so the served adapter knows them (--no-final-pass: serve the measured one).",
        "--final-pass/--no-final-pass",
    ),
    "select_instances": "Validation completions scored for exact match to choose checkpoints.",
    "measure_instances": "Newest test completions the chosen checkpoint is measured on.",
}


@section_flags(TrainSettings, TRAIN_FLAGS)
def train(
    ctx: typer.Context,
    repo: Annotated[Path, typer.Option(help="Repository whose mined dataset to learn.")] = Path(
        "."
    ),
    overrides: dict[str, Any] | None = None,  # the TRAIN_FLAGS options given
    precision: Annotated[str, typer.Option(help="auto, bf16 or fp32 (CPU).")] = "auto",
    init_adapter: Annotated[
        Path | None, typer.Option(help="Continue training this PEFT adapter folder.")
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue the newest unfinished run from its checkpoint."),
    ] = False,
    run_id: Annotated[
        str | None, typer.Option(help="Name of the run (or the run to resume).")
    ] = None,
    purpose: Annotated[str, typer.Option(help="org, baseline+, dev or org+dev.")] = "org",
    developer: Annotated[
        str | None, typer.Option(help="Train only on this author id's instances (dev runs).")
    ] = None,
    dataset: Annotated[
        Path | None, typer.Option(help="A dataset folder other than the repo's mined one.")
    ] = None,
    val_limit: Annotated[
        int, typer.Option(help="Validation instances per evaluation.")
    ] = DEFAULT_VAL_LIMIT,
) -> None:
    """Fine-tune a LoRA adapter on the repository's mined dataset."""
    from contextlib import AbstractContextManager, nullcontext

    started = time.perf_counter()  # --max-minutes bounds the command from here
    from shoptalk.models.progress import Report, quiet
    from shoptalk.trainer.train import STOP_MESSAGE, TrainError, summary_table, train_adapter
    from shoptalk.trainer.train_loop import is_main_process

    if precision not in ("auto", "bf16", "fp32"):
        raise TrainError(f"--precision {precision!r}: use auto, bf16 or fp32")
    if purpose not in ("org", "baseline+", "dev", "org+dev"):
        raise TrainError(f"--purpose {purpose!r}: use org, baseline+, dev or org+dev")
    settings = settings_for(ctx, repo, {"train": dict(overrides or {})})
    main = is_main_process()  # under `accelerate launch`, rank 0 alone reports and prints
    console: AbstractContextManager[Report] = (
        ConsoleReport(styles={STOP_MESSAGE: "yellow"}) if main else nullcontext(quiet)
    )
    with console as report:
        result = train_adapter(
            repo,
            settings,
            settings.resolved_data_dir(),
            init_adapter,
            resume=resume,
            run_id=run_id,
            purpose=purpose,
            developer=developer,
            dataset_dir=dataset,
            val_limit=val_limit,
            precision=precision,
            show_progress=main,
            report=report,
            started=started,
        )
    if not main:
        return
    stdout_console.print(summary_table(result))
    if result.adapter_dir is not None and purpose == "org":  # the module lookup learns here too
        from shoptalk.trainer.retriever import train_retriever_after

        minutes = settings.train.max_minutes
        if minutes and time.perf_counter() - started > 0.75 * minutes * 60:
            err.print(
                "module-lookup retriever not trained: --max-minutes is spent (it needs a few "
                "minutes; run `shoptalk train` with a larger budget to train it)"
            )
            return

        train_retriever_after(repo, settings, result.run_dir, dataset, report=stdout_console.print)


def export(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run id (in the repository's store) or run folder.")],
    quant: Annotated[
        str | None,
        typer.Option(
            help="q8_0, q4_k_m, q5_k_m, f16 or f32 (default: [export] quant; adapter: f16 unless f32)."
        ),
    ] = None,
    adapter_only: Annotated[
        bool,
        typer.Option("--adapter-only", help="Write the LoRA alone as a GGUF adapter for the base."),
    ] = False,
    repo: Annotated[
        Path | None, typer.Option(help="Repository whose run id to look up (default: here).")
    ] = None,
    promote: Annotated[
        bool,
        typer.Option(
            "--promote",
            help="Then serve the exported model for its repository from now on (`shoptalk "
            "models rollback` undoes it) if the run measured a gain over the base on its "
            "held-out window; otherwise say why and keep the served one (see --force). "
            "Compare it yourself with `shoptalk eval --models base,run:RUN_ID`.",
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="With --promote: serve the run even without a measured gain (a run that "
            "kept its start, or one within noise of the base).",
        ),
    ] = False,
) -> None:
    """Merge a finished run's LoRA into its base and write a quantized GGUF
    (or the adapter alone), with a manifest beside each file; with --promote,
    then serve it if the run measured a gain (exit 0 either way)."""
    from rich.progress import Progress as RichProgress
    from rich.progress import SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from shoptalk.trainer.export import QUANTS, ExportError, export_run, find_run

    settings = settings_for(ctx, repo)
    if promote and adapter_only:
        raise ExportError(
            "--promote serves a merged model: drop --adapter-only (run-time adapters "
            "are served for personal adapters, `shoptalk personal`)"
        )
    quant = (quant or settings.export.quant).lower()
    if quant not in QUANTS:
        raise ExportError(f"--quant {quant!r}: use one of {', '.join(QUANTS)}")
    run_dir = find_run(run, repo, settings.resolved_data_dir())
    with RichProgress(
        SpinnerColumn(),
        TextColumn("{task.description}", markup=False),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task("export", total=None)

        def report(event: str | Progress) -> None:
            progress.update(task, description=str(event))
            logging.getLogger("shoptalk.trainer.export").debug("%s", event)

        result = export_run(run_dir, quant, adapter_only=adapter_only, report=report)
    table = Table(title=f"export of run {result.run_id}")
    for column in ("file", "kind", "quant", "size", "sha256"):
        table.add_column(column)
    for path, manifest in zip(result.files, result.manifests, strict=True):
        table.add_row(
            path.name,
            manifest.kind,
            manifest.quant or "",
            f"{manifest.size / 1e6:.1f} MB",
            manifest.sha256[:12],
        )
    stdout_console.print(table)
    stdout_console.print(f"in {result.files[0].parent}")
    stdout_console.print(f"done in {result.seconds:.1f}s; manifests written beside each file")
    for warning in result.warnings:
        print_warning(warning)
    if promote:
        promote_if_measured(ctx, settings.resolved_data_dir(), run_dir, result, force)


def promote_if_measured(
    ctx: typer.Context, data_dir: Path, run_dir: Path, exported: ExportResult, force: bool
) -> None:
    """`export --promote` after the export: serve the run if its own record
    shows a measured gain over the base (or with --force), else say why not
    and what stays served. Not serving is a decision, not an error."""
    from shoptalk.models.store import RepoStore
    from shoptalk.trainer.export import promote_export, run_repository
    from shoptalk.trainer.promotion import check_export_promotion
    from shoptalk.trainer.publish import publish_if_configured
    from shoptalk.trainer.run_record import RunFolder

    serve, why = check_export_promotion(RunFolder(run_dir).read_record(), force)
    if not serve:
        current = RepoStore.for_repo(data_dir, run_repository(run_dir)).current()
        kept = f"run {current['run_id']} stays served" if current else "the base stays served"
        stdout_console.print(
            f"not promoted: {why}; {kept}; --force serves it anyway", soft_wrap=True
        )
        return
    promoted = promote_export(run_dir, exported.files[0], data_dir)
    stdout_console.print(
        f"promoted: {promoted} now serves run {exported.run_id} ({why})", soft_wrap=True
    )
    team = settings_for(ctx, promoted).team  # the promoted repository's [team]
    store = RepoStore.for_repo(data_dir, promoted)
    if publish_if_configured(store, team, report=err.print):
        stdout_console.print(f"published to the team server as {team.team_model!r}")


def evaluate(
    ctx: typer.Context,
    repo: Annotated[Path, typer.Option(help="Repository whose newest code to test on.")] = Path(
        "."
    ),
    models: Annotated[
        str,
        typer.Option(
            help="Models to compare, comma-separated: base, org, baseline+, dev:ID, "
            "org+dev:ID, run:RUN_ID (run:latest: the newest complete run)."
        ),
    ] = ",".join(DEFAULT_SPECS),
    limit: Annotated[
        int | None, typer.Option(min=1, help="At most this many completion instances.")
    ] = None,
    general: Annotated[
        int,
        typer.Option(min=0, help="Held-out general-code instances for retention (0: skip)."),
    ] = 50,
    humaneval: Annotated[
        int,
        typer.Option(min=0, help="HumanEval problems for pass@1 (0: skip; 164: all; slow on CPU)."),
    ] = 0,
    base: Annotated[str | None, typer.Option(help="Base model (default: train.base).")] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Write the report here (default: the repository's data folder)."),
    ] = None,
    lookup: Annotated[
        int,
        typer.Option(
            min=0, help="Module-lookup queries (0: skip; each costs several generations)."
        ),
    ] = DEFAULT_LOOKUP_QUERIES,
    scope: Annotated[
        str,
        typer.Option(
            help="newest: commits after the cutoff; split: the whole test split "
            "(adds each author's older test commits)."
        ),
    ] = SCOPE_NEWEST,
    author: Annotated[
        str | None,
        typer.Option(
            help="Only this author's completion instances (an author id of the "
            "dataset manifest): the set a developer's adapter is judged on."
        ),
    ] = None,
    context_config: Annotated[
        str | None,
        typer.Option(
            help="Prompt configuration (a row of the context ablation): today, file6k, "
            "suffix, snippets or all (default: the serve settings). The keys below override it."
        ),
    ] = None,
    prefix_chars: Annotated[int | None, typer.Option(help="serve.prefix_chars.")] = None,
    suffix_layout: Annotated[str | None, typer.Option(help="serve.suffix_layout.")] = None,
    context_chars: Annotated[int | None, typer.Option(help="serve.context_chars.")] = None,
    context_sources: Annotated[
        str | None, typer.Option(help="serve.context_sources, comma-separated.")
    ] = None,
) -> None:
    """Compare models on the repository's newest commits: exact match, edit
    similarity, CrystalBLEU per author with confidence intervals, module
    lookup, general-ability retention, latency; writes report.html/json."""
    from shoptalk.trainer.evaluate import context_overrides, evaluate_models, parse_specs
    from shoptalk.trainer.report import summary_tables, verdict_line

    sources = [s.strip() for s in context_sources.split(",")] if context_sources else None
    overrides: dict[str, Any] = {
        "serve": context_overrides(
            context_config,
            prefix_chars=prefix_chars,
            suffix_layout=suffix_layout,
            context_chars=context_chars,
            context_sources=sources,
        )
    }
    if base is not None:
        overrides["train"] = {"base": base}
    settings = settings_for(ctx, repo, overrides)
    with ConsoleReport() as report:
        result = evaluate_models(
            repo,
            parse_specs(models),
            settings,
            settings.resolved_data_dir(),
            limit,
            general_instances=general,
            humaneval_problems=humaneval,
            out_dir=out,
            scope=scope,
            lookup_queries=lookup,
            author=author,
            report=report,
            context_config=context_config,
        )
    for table in summary_tables(result.data):
        stdout_console.print(table)
    if lookup:  # BM25 / zero-shot / trained retriever / fused on the held-out queries
        from shoptalk.trainer.lookup_eval import report_lookup_figures

        report_lookup_figures(repo, settings, result.directory, stdout_console.print)
    stdout_console.print(verdict_line(result.data), soft_wrap=True)  # the one-line answer
    Console(stderr=True, soft_wrap=True).print(
        f"report: {result.html_path}\n        {result.json_path}"
    )


def retrain(
    ctx: typer.Context,
    repo: Annotated[Path, typer.Option(help="Repository to retrain on.")] = Path("."),
) -> None:
    """Queue a retraining job for the repository's new commits and run the
    queue (mine → train → export → evaluate → promote if not worse). The
    watcher runs this after new commits; exits at once if a job is already
    running elsewhere (that worker picks the new job up)."""
    from shoptalk.models.jobs import JobQueue
    from shoptalk.trainer.retrain import RetrainError, work_queue

    repo = repo.expanduser().resolve()
    data_dir = settings_for(ctx, repo).resolved_data_dir()
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    if not head:
        raise RetrainError(f"{repo} is not a git repository with commits")
    job = JobQueue(data_dir).enqueue(repo, "retrain", head)
    notes.print(f"job {job.id} queued for {repo.name} at {head[:10]}")
    ran = work_queue(data_dir, lambda r: settings_for(ctx, r), notes.print)
    if ran == 0:
        notes.print("another process is running a job; it will take this one next")


personal_app = typer.Typer(
    help="Per-developer adapters (opt-in, trained and kept on this machine only).",
    no_args_is_help=True,
)


@personal_app.command("enable")
def personal_enable(
    ctx: typer.Context,
    identity: Annotated[
        list[str], typer.Option(help="Your commit email or name (repeat for aliases).")
    ],
    repo: Annotated[Path, typer.Option(help="Repository.")] = Path("."),
    train: Annotated[bool, typer.Option(help="Train your adapter right away.")] = False,
) -> None:
    """Opt in: train an adapter on your own commits on top of the team's."""
    from shoptalk.trainer.personal import enable, train_personal

    repo = repo.expanduser().resolve()
    settings = settings_for(ctx, repo)
    author_id = enable(repo, identity, settings, settings.resolved_data_dir())
    notes.print(f"personalization enabled for author {author_id}")
    if train:
        notes.print(train_personal(repo, settings, settings.resolved_data_dir(), notes.print))


@personal_app.command("train")
def personal_train(
    ctx: typer.Context, repo: Annotated[Path, typer.Option(help="Repository.")] = Path(".")
) -> None:
    """Train (again) your personal adapter and serve it if not worse."""
    from shoptalk.trainer.personal import train_personal

    repo = repo.expanduser().resolve()
    settings = settings_for(ctx, repo)
    notes.print(train_personal(repo, settings, settings.resolved_data_dir(), notes.print))


@personal_app.command("disable")
def personal_disable(
    ctx: typer.Context,
    repo: Annotated[Path, typer.Option(help="Repository.")] = Path("."),
) -> None:
    """Opt out: delete your adapters; the team model is served again."""
    from shoptalk.trainer.personal import disable

    repo = repo.expanduser().resolve()
    deleted = disable(repo, settings_for(ctx, repo).resolved_data_dir())
    notes.print(f"personalization disabled; {deleted} personal adapter(s) deleted")


def demo(
    ctx: typer.Context,
    repo: Annotated[Path, typer.Option(help="Repository whose history to learn.")] = Path("."),
    train_minutes: Annotated[float, typer.Option(help="Training budget.")] = 6.0,
    eval_limit: Annotated[int, typer.Option(help="Test instances to evaluate on.")] = 40,
) -> None:
    """Run the main job on the default model and print what it produced."""
    import sys

    from shoptalk.trainer.demo import run_demo, summary
    from shoptalk.trainer.report import summary_tables
    from shoptalk.trainer.train import STOP_MESSAGE

    repo = repo.expanduser().resolve()
    settings = settings_for(ctx, repo)
    with ConsoleReport(err, styles={STOP_MESSAGE: "yellow"}) as report:
        result = run_demo(
            repo, settings, settings.resolved_data_dir(), train_minutes, eval_limit, report
        )
    typed, suggestion = result.completion
    print(f"{typed}\033[2m{suggestion}\033[0m" if sys.stdout.isatty() else f"{typed}⟨{suggestion}⟩")
    out = Console()
    out.print(summary(result))
    for key, value in result.facts.items():
        out.print(f"{key}: {value}")
    if result.report is not None:
        for table in summary_tables(json.loads(result.report.with_name("report.json").read_text())):
            out.print(table)
        out.print(f"report: {result.report}")


def runs(
    ctx: typer.Context,
    repo: Annotated[Path, typer.Option(help="Repository whose runs to list.")] = Path("."),
) -> None:
    """List the repository's training runs: status, steps, validation loss,
    held-out exact match, exports and the promoted one. `latest` names the
    newest complete run wherever a run id is taken (export, eval run:latest)."""
    from shoptalk.models.store import RepoStore
    from shoptalk.trainer.runs import list_runs, runs_table

    store = RepoStore.for_repo(settings_for(ctx, repo).resolved_data_dir(), repo)
    found = list_runs(store)
    if not found:
        err.print(
            f"no training runs for {repo.resolve()} yet: `shoptalk mine --repo {repo}` "
            f"then `shoptalk train --repo {repo}`"
        )
        return
    title = f"runs of {repo.resolve().name}"
    stdout_console.print(runs_table(found, title, stdout_console.width))
    err.print(f"in {store.runs_dir}")
