"""`shoptalk eval`: compare models on a repository's newest code.

Models are compared on the same instances through the serving path users
get: the exported GGUF in llama.cpp, the shared prompt builder, the server's
stopping rules. The comparison list names models by role:

    base          the untuned base (prefix-only unless it was trained on FIM)
    org           the repository's promoted model (`RepoStore.current()`)
    baseline+     the base tuned on as much general code (size control)
    dev:ID        a developer's adapter tuned from the base
    org+dev:ID    a developer's adapter continued from the org adapter (served on the base)
    run:RUN_ID    any exported run of this repository (`run:latest`: the newest complete one)

A run whose served adapter came from a final pass over the held-out windows
(`train.final_pass`) has trained on the test window: it is evaluated by its
measured checkpoint instead (`export/measured-adapter-*.gguf` on the base),
and the report says so (`ResolvedModel.note`); without that file, eval
evaluates the served model and warns that its figures are not held out.

Every model is resolved and checked (manifest sha256, repository, base)
before the first instance is run, and the report is written only when every
part finished: a missing model or an interrupted run never leaves a report
that looks whole.

`evaluate_models` is the entry point for other stages (`shoptalk demo`,
continuous learning); the CLI is a thin wrapper around it.
"""

from __future__ import annotations

import logging
import math
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from shoptalk.models.catalog import BaseModel, resolve_base
from shoptalk.models.completion import CompletionEngine
from shoptalk.models.context import PromptConfig, Workspace, stored_context_block
from shoptalk.models.errors import ShopTalkError
from shoptalk.models.manifest import ModelManifest, read_manifest, verify_model_file
from shoptalk.models.progress import Progress, Report, quiet, to_log
from shoptalk.models.prompt import served_with_fim
from shoptalk.models.settings import Settings
from shoptalk.models.store import RepoStore, repo_key
from shoptalk.trainer.dataset_folder import DatasetError, load_manifest, read_shard, shard_path
from shoptalk.trainer.eval_types import (
    CONTEXT_CONFIGS,
    SCOPE_NEWEST,
    SCOPES,
    CompletionInstance,
    EvalSet,
    LookupRankings,
    ModelRun,
    ModuleLookupInstance,
    ResolvedModel,
)
from shoptalk.trainer.run_record import RunFolder, RunRecordError, run_folders
from shoptalk.trainer.runs import resolve_run_id

if TYPE_CHECKING:
    from shoptalk.trainer.retention import GeneralInstance, HumanEvalProblem


log = logging.getLogger(__name__)

DEFAULT_SPECS = ("base", "org")
ROLE_SPECS = ("base", "org", "baseline+")
PARAMETRIC_SPECS = ("dev:", "org+dev:", "run:")

# A team instance is the masked tail of one line, so a prediction is cut at
# its first line end, as the server's single-line stopping rule does.
LINE_STOP = "\n"

# Module-lookup queries per run (each costs a few grammar-constrained generations).
DEFAULT_LOOKUP_QUERIES = 20


class EvalError(ShopTalkError):
    pass


# ------------------------------------------------------------------ test set


def _interleave_by_author(
    instances: list[CompletionInstance], limit: int | None
) -> list[CompletionInstance]:
    """Newest first within each author, authors taken in turn, so that a
    limit keeps several authors' figures instead of the last one's."""
    by_author: dict[str, list[CompletionInstance]] = defaultdict(list)
    for inst in sorted(instances, key=lambda i: (i.author_date, i.id), reverse=True):
        by_author[inst.author_id].append(inst)
    queues = [by_author[a] for a in sorted(by_author, key=lambda a: (-len(by_author[a]), a))]
    chosen: list[CompletionInstance] = []
    depth = 0
    while any(depth < len(q) for q in queues):
        for queue in queues:
            if depth < len(queue):
                chosen.append(queue[depth])
        depth += 1
    return chosen[:limit] if limit else chosen


def _moment(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _at_or_after(cutoff: str | None) -> Callable[[str], bool]:
    """Whether an author date is at or after the cutoff (everything, without one)."""
    limit = _moment(cutoff) if cutoff else None
    if limit is None:
        return lambda _date: True

    def check(date: str) -> bool:
        moment = _moment(date)
        return moment is not None and moment >= limit

    return check


def load_test_set(
    store: RepoStore,
    settings: Settings,
    limit: int | None,
    scope: str = SCOPE_NEWEST,
    author: str | None = None,
) -> EvalSet:
    """The mined test split of a repository; clear errors when there is none.

    Scope "newest" keeps the commits at or after the cutoff (the paper's
    test set); "split" adds the older commits the miner moved to the test
    split so that every author has a few instances (per-developer figures)."""
    try:
        manifest = load_manifest(store.dataset_dir)
        completion_records = read_shard(shard_path(store.dataset_dir, "completion", "test"))
        lookup_records = read_shard(shard_path(store.dataset_dir, "module_lookup", "test"))
    except DatasetError as exc:
        raise EvalError(str(exc)) from None
    completion = [CompletionInstance.from_record(r) for r in completion_records]
    if completion and scope == SCOPE_NEWEST:
        recent = _at_or_after(manifest.cutoff)
        completion = [i for i in completion if recent(i.author_date)]
        if not completion:
            raise EvalError(
                f"no test instances at or after the cutoff ({manifest.cutoff}); the "
                "test split only holds older commits of some authors: use --scope split, "
                "or mine again with a later mine.cutoff"
            )
    if not completion:
        share = settings.mine.test_share
        needed = math.ceil(2 / share)
        counted = manifest.mined_commits
        have = f" (the mined history has {counted} usable commits)" if counted else ""
        raise EvalError(
            f"the mined dataset has no completion test instances{have}: the test split is "
            f"the newest {share:.0%} of commits, so a repository needs at least {needed} "
            "commits that add code for one to exist (a few hundred for figures worth "
            "reading). Mine a longer history (`shoptalk mine --since ...`) or lower "
            "mine.test_share."
        )
    if author is not None:
        completion = _of_author(completion, author, scope)
    lookup = [
        ModuleLookupInstance.from_record(r)
        for r in lookup_records
        if r.get("source", "commit_message") == "commit_message" and r.get("modules")
    ]
    if scope == SCOPE_NEWEST:
        recent = _at_or_after(manifest.cutoff)
        lookup = [i for i in lookup if recent(i.author_date)]
    lookup.sort(key=lambda i: (i.author_date, i.id), reverse=True)
    chosen = _interleave_by_author(completion, limit)
    return EvalSet(
        completion=chosen,
        module_lookup=lookup[:limit] if limit else lookup,
        manifest=manifest.data,
        available=len(completion),
        scope=scope,
    )


class NoAuthorInstances(EvalError):
    """The author asked for has no completion instances in the test set."""


def _of_author(
    completion: list[CompletionInstance], author: str, scope: str
) -> list[CompletionInstance]:
    """The instances of one author (a per-developer comparison); a clear error
    naming the authors that have some when this one has none."""
    mine = [i for i in completion if i.author_id == author]
    if mine:
        return mine
    counts: dict[str, int] = {}
    for instance in completion:
        counts[instance.author_id] = counts.get(instance.author_id, 0) + 1
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:8]
    raise NoAuthorInstances(
        f"author {author!r} has no completion test instances in scope {scope!r}; authors "
        "that have some: "
        + ", ".join(f"{a} ({n})" for a, n in top)
        + ". Use an author id from the dataset manifest (`authors`), or --scope split."
    )


# ------------------------------------------------------------------ models


def context_overrides(name: str | None, **keys: Any) -> dict[str, Any]:
    """The serve settings a run evaluates with: the preset `name` of
    `CONTEXT_CONFIGS` (None: the serve settings as they are), then each of
    `keys` that is not None (prefix_chars, suffix_chars, suffix_layout,
    context_chars, context_sources)."""
    if name is not None and name not in CONTEXT_CONFIGS:
        raise EvalError(
            f"unknown --context-config {name!r}: use one of {', '.join(CONTEXT_CONFIGS)} "
            "(or set the serve keys one by one: --prefix-chars, --suffix-layout, "
            "--context-chars, --context-sources)"
        )
    chosen = dict(CONTEXT_CONFIGS[name]) if name is not None else {}
    chosen.update({key: value for key, value in keys.items() if value is not None})
    return chosen


def prompt_description(settings: Settings, name: str | None) -> dict[str, Any]:
    """What the report says about the prompts: the configuration's name and
    its serve keys (every model of the run is prompted the same way)."""
    return {
        "context_config": name or "serve settings",
        **PromptConfig.of(settings.serve).describe(),
    }


def parse_specs(text: str) -> list[str]:
    specs = [s.strip() for s in text.split(",") if s.strip()]
    problems = []
    for spec in specs:
        if spec in ROLE_SPECS:
            continue
        if any(spec.startswith(p) and len(spec) > len(p) for p in PARAMETRIC_SPECS):
            continue
        problems.append(spec)
    if problems:
        raise EvalError(
            f"unknown model name(s) {', '.join(map(repr, problems))} in --models: use "
            "base, org, baseline+, dev:ID, org+dev:ID or run:RUN_ID, separated by commas"
        )
    if len(set(specs)) != len(specs):
        raise EvalError(f"--models names a model twice: {text!r}")
    if not specs:
        raise EvalError("--models is empty: name at least one model (e.g. base,org)")
    return specs


def _base_names(base: BaseModel) -> set[str]:
    names = {base.key}
    if base.hf_id:
        names.add(base.hf_id)
    if base.local_path:
        names.update({str(base.local_path), base.local_path.name})
    return names


def _same_base(recorded: str, base: BaseModel) -> bool:
    if recorded in _base_names(base):
        return True
    try:
        return resolve_base(recorded).key == base.key
    except ShopTalkError:
        return False


def _check_manifest(spec: str, manifest: ModelManifest, repo: Path, base: BaseModel) -> None:
    if manifest.repo and manifest.repo not in {str(repo.resolve()), repo_key(repo)}:
        raise EvalError(
            f"model {spec!r} ({manifest.file}) was tuned on repository {manifest.repo}, not "
            f"{repo.resolve()}: evaluate it with --repo {manifest.repo}, or train this "
            "repository's own model"
        )
    if manifest.base and not _same_base(manifest.base, base):
        raise EvalError(
            f"model {spec!r} ({manifest.file}) was tuned from base {manifest.base!r}, but "
            f"this comparison's base is {base.key!r}: set train.base (or --base) to "
            f"{manifest.base!r} so that every model is compared with its own base"
        )


def _verify(spec: str, path: Path, repo: Path, base: BaseModel) -> dict[str, Any]:
    manifest = verify_model_file(path)
    _check_manifest(spec, manifest, repo, base)
    return asdict(manifest)


def base_gguf(base: BaseModel, data_dir: Path, report: Report) -> Path:
    """The GGUF of the untuned base: the packaged one, or one exported into
    the base's folder of the data dir."""
    from shoptalk.models.provision import base_paths, ensure_gguf

    if base.package:
        return ensure_gguf(data_dir, base, report)
    path = base_paths(data_dir, base).gguf
    if not path.is_file():
        raise EvalError(
            f"no GGUF of the base {base.key!r} at {path}: export the untuned base there "
            "(`shoptalk export --base-only`) or leave `base` out of --models"
        )
    return path


def _run_files(run: RunFolder, quant: str) -> tuple[Path | None, Path | None]:
    """The run's exported full model (preferring `quant`) and adapter GGUF."""
    models = run.exported_models()
    preferred = [m for m in models if m.name == f"model-{quant}.gguf"]
    adapters = run.exported_adapters()
    candidates = preferred or models
    return (candidates[0] if candidates else None), (adapters[0] if adapters else None)


def _has_final_pass(run_dir: Path) -> bool:
    from shoptalk.trainer.export import has_final_pass

    return has_final_pass(run_dir, RunFolder(run_dir).read_record())


def _measured(spec: str, run: RunFolder) -> tuple[Path | None, str | None]:
    """For a run whose served adapter came from a final pass over the held-out
    windows (it has trained on the test window, so its figures there mean
    nothing): the measured checkpoint's exported adapter and a note naming
    it, or no file and a warning saying why the figures are not held out.
    (None, None) for a run whose served model is the measured one."""
    if not _has_final_pass(run.root):
        return None, None
    exported = run.exported_measured_adapters()
    step = (run.read_record().get("measured") or {}).get("step")
    if exported:
        return exported[0], (
            f"{spec} is run {run.run_id}'s measured checkpoint (step {step}), served on the "
            "base: the served adapter has trained on the test window since (final pass)"
        )
    return None, (
        f"{spec} is run {run.run_id}'s served model, which has trained on the test window "
        "(final pass): its figures here are not held out. Its measured checkpoint was not "
        f"exported; `shoptalk export {run.run_id}` writes it, and eval then uses it"
    )


def _find_run(store: RepoStore, purpose: str, developer: str | None) -> Path | None:
    """The newest complete run of `purpose` (see docs/architecture.md, run
    record) that has an export; None if there is none."""
    found: list[tuple[float, Path]] = []
    for run in run_folders(store.runs_dir):
        try:
            record = run.load_record()
        except RunRecordError:
            continue
        if not record.complete or record.purpose != purpose:
            continue
        if developer is not None and str(record.developer) != developer:
            continue
        model, adapter = _run_files(run, "")
        if model or adapter:
            found.append((run.root.stat().st_mtime, run.root))
    return max(found)[1] if found else None


def resolve_models(
    specs: Sequence[str],
    repo: Path,
    settings: Settings,
    data_dir: Path,
    report: Report = log.info,
) -> list[ResolvedModel]:
    """Every model of the comparison, verified, or one error naming all the
    models that are missing or do not belong here."""
    store = RepoStore.for_repo(data_dir, repo)
    base = resolve_base(settings.train.base)
    quant = settings.export.quant
    resolved: list[ResolvedModel] = []
    missing: list[str] = []
    base_file: Path | None = None

    def the_base_file() -> Path:
        nonlocal base_file
        if base_file is None:
            base_file = base_gguf(base, data_dir, report)
        return base_file

    def on_base(spec: str, run_dir: Path, adapter: Path, note: str | None) -> ResolvedModel:
        manifests = {"adapter": _verify(spec, adapter, repo, base)}
        fim = served_with_fim(manifests["adapter"].get("extra", {}).get("prompt_format"))
        return ResolvedModel(
            spec, the_base_file(), adapter, fim, base, run_dir.name, manifests, note
        )

    def from_run(spec: str, run_dir: Path) -> ResolvedModel:
        """A run's merged GGUF, or else its adapter GGUF on the base; for a
        run with a final pass, its measured checkpoint (see `_measured`)."""
        folder = RunFolder(run_dir)
        measured, note = _measured(spec, folder)
        if measured is not None:
            return on_base(spec, run_dir, measured, note)
        if note is not None:
            report(f"warning: {note}")
        model, adapter = _run_files(folder, quant)
        if model is not None:
            manifests = {"model": _verify(spec, model, repo, base)}
            fim = served_with_fim(manifests["model"].get("extra", {}).get("prompt_format"))
            return ResolvedModel(spec, model, None, fim, base, run_dir.name, manifests, note)
        if adapter is None:
            raise EvalError(f"run {run_dir.name} has no exported model; run `shoptalk export`")
        return on_base(spec, run_dir, adapter, note)

    for spec in specs:
        if spec == "base":
            resolved.append(
                ResolvedModel(spec, the_base_file(), None, base.fim.trained, base, None, {})
            )
        elif spec == "org":
            current = store.current()
            if current is None:
                missing.append(
                    "org (no promoted model: run `shoptalk train` and `shoptalk export`)"
                )
                continue
            promoted_run = store.run_dir(str(current.get("run_id") or ""))
            if current.get("run_id") and promoted_run.is_dir() and _has_final_pass(promoted_run):
                resolved.append(from_run(spec, promoted_run))  # its measured checkpoint
                continue
            resolved.append(_from_current(spec, current, repo, base, settings, data_dir))
        elif spec == "baseline+":
            run_dir = _find_run(store, "baseline+", None)
            if run_dir is None:
                missing.append(
                    "baseline+ (no complete run trained on general code only: "
                    "`shoptalk train --purpose baseline+` then `shoptalk export`)"
                )
                continue
            resolved.append(from_run(spec, run_dir))
        elif spec.startswith("run:"):
            run_id = resolve_run_id(store, spec[4:])  # `run:latest`: the newest complete run
            run_dir = store.run_dir(run_id)
            if not run_dir.is_dir():
                missing.append(f"{spec} (no run {spec[4:]!r} in {store.runs_dir})")
                continue
            resolved.append(from_run(f"run:{run_id}", run_dir))
        else:
            on_org = spec.startswith("org+dev:")
            developer = spec.split(":", 1)[1]
            run_dir = _find_run(store, "org+dev" if on_org else "dev", developer)
            if run_dir is None:
                missing.append(
                    f"{spec} (no developer adapter for {developer!r}: it exists only where "
                    "that developer enabled personalization, see `personal.enabled`)"
                )
                continue
            # An org+dev adapter continues the team's LoRA (it contains the team's
            # update), so it is served on the base, like a dev adapter.
            resolved.append(from_run(spec, run_dir))
    if missing:
        raise EvalError(
            "cannot compare the requested models; missing:\n"
            + "\n".join(f"  - {m}" for m in missing)
            + "\nCreate them, or leave them out of --models."
        )
    return resolved


def _from_current(
    spec: str,
    current: dict[str, Any],
    repo: Path,
    base: BaseModel,
    settings: Settings,
    data_dir: Path,
) -> ResolvedModel:
    """The promoted model, checked exactly as the server checks it before
    serving (sha256 of model, adapter and the adapter's host), then for this
    repository and base."""
    from shoptalk.models.registry import promoted_choice

    choice = promoted_choice(current, settings, data_dir)
    manifests: dict[str, Any] = {}
    for role, path in (
        ("adapter", choice.adapter),
        ("model", None if choice.adapter else choice.model),
    ):
        if path is not None:
            manifest = read_manifest(path)
            _check_manifest(spec, manifest, repo, base)
            manifests[role] = asdict(manifest)
    return ResolvedModel(
        spec, choice.model, choice.adapter, choice.use_fim, base, choice.run_id, manifests
    )


# ------------------------------------------------------------------ engine


# Eval lets every answer finish: a latency budget would make the figures
# depend on how busy the machine is. Latency is measured and reported instead.
EVAL_BUDGET_MS = 120_000
# HumanEval bodies run long; they are generated without the line stop.
HUMANEVAL_BUDGET_S = 300.0


class EvalEngine(Protocol):
    """What evaluation asks of a model (`ServedModel` is the real one);
    `path` and `context` (the instance's mined context candidates) give the
    repository context."""

    def complete(
        self,
        prefix: str,
        suffix: str,
        path: str | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> str: ...

    def generate(self, prompt: str, max_tokens: int, stop: Sequence[str]) -> str: ...

    def close(self) -> None: ...


class ServedModel:
    """A model behind the language server's own engine: `LlamaBackend` on the
    GGUF (plus LoRA adapter), `CompletionEngine` with the shared prompt
    builder, token healing, stop rules and post-filters, greedy decoding.

    The instance is the masked tail of one line, so the single-line stop
    applies (under greedy decoding the first line of a multi-line answer is
    the same), the suggestion cache is off, and the latency budget is lifted
    (see EVAL_BUDGET_MS)."""

    def __init__(self, model: ResolvedModel, settings: Settings):
        from shoptalk.models.backends import BackendError
        from shoptalk.models.registry import ModelChoice, build_backend, engine_options

        self.model = model
        serve = settings.serve.model_copy(update={"backend": "llama"})
        choice = ModelChoice(
            model.model, model.adapter, model.base, model.use_fim, model.run_id, "eval"
        )
        try:
            self.backend = build_backend(choice, serve)
        except BackendError as exc:
            raise EvalError(f"cannot evaluate {model.spec!r}: {exc}") from None
        options = replace(
            engine_options(serve),
            max_tokens=settings.eval.max_tokens,
            max_latency_ms=EVAL_BUDGET_MS,
            multiline="never",
        )
        self.engine = StoredContextEngine(self.backend, choice.template, choice.use_fim, options)

    def complete(
        self,
        prefix: str,
        suffix: str,
        path: str | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> str:
        self.engine.stored = context
        try:
            suggestion = self.engine.complete(
                prefix + suffix, len(prefix), use_cache=False, path=path
            )
        finally:
            self.engine.stored = None
        return suggestion.text.split(LINE_STOP, 1)[0]

    def generate(self, prompt: str, max_tokens: int, stop: Sequence[str]) -> str:
        """Plain continuation of `prompt` (HumanEval), healed at its end,
        cut before the first of `stop`."""
        from shoptalk.models.completion import GenerationRequest, PromptPlan

        def stop_at(text: str) -> int | None:
            cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
            return min(cuts) if cuts else None

        plan = PromptPlan("", prompt, "", (self.model.template.end,))
        request = GenerationRequest(
            plan, max_tokens, time.monotonic() + HUMANEVAL_BUDGET_S, heal=True, stop_at=stop_at
        )
        text = self.backend.generate(request).text
        cut = stop_at(text)
        return text if cut is None else text[:cut]

    def generate_with_grammar(self, prompt: str, grammar: str, max_tokens: int) -> str:
        return str(self.backend.generate_with_grammar(prompt, grammar, max_tokens))  # type: ignore[attr-defined]

    def close(self) -> None:
        self.backend.close()


class StoredContextEngine(CompletionEngine):
    """The server's engine whose repository context is the one mined with
    the instance answered (`stored`: its context candidates), rendered for
    the engine's options, instead of one built from a live workspace: the
    block the server would have built at the instance's parent commit."""

    stored: Mapping[str, Any] | None = None

    def context_block(
        self,
        text: str,
        offset: int,
        path: str | None,
        workspace: Workspace | None,
        refresh: bool = False,
    ) -> str:
        if self.stored is None or self.options.context_chars <= 0:
            return ""
        return stored_context_block(
            path or "", self.stored, text[:offset], text[offset:], self.context_options()
        )


def open_engine(model: ResolvedModel, settings: Settings) -> ServedModel:
    return ServedModel(model, settings)


# ------------------------------------------------------------------ module lookup

# A ranking answers a query with module ids, best first.
ModuleRanking = Callable[[str, int], list[str]]
LOOKUP_DEPTH = 3


def rank_queries(
    ranking: ModuleRanking, queries: Sequence[ModuleLookupInstance]
) -> list[list[str]]:
    return [ranking(q.query, LOOKUP_DEPTH) for q in queries]


# ------------------------------------------------------------------ running


class _Count:
    """One counted piece of work, reported as `Progress(done, total, label)`
    from 0 until `end()`."""

    def __init__(self, report: Report, label: str, total: int):
        self.report, self.label, self.total, self.done = report, label, total, 0
        report(Progress(0, total, label))

    def advance(self) -> None:
        self.done += 1
        self.report(Progress(self.done, self.total, self.label))

    def end(self) -> None:
        self.report(Progress(self.done, self.total, self.label, final=True))


def run_model(
    engine: EvalEngine,
    spec: str,
    instances: Sequence[CompletionInstance],
    report: Report = quiet,
) -> ModelRun:
    count = _Count(report, f"{spec}: completions", len(instances))
    predictions: list[str] = []
    latencies: list[float] = []
    for inst in instances:
        started = time.perf_counter()
        text = engine.complete(inst.prefix, inst.suffix, inst.path or None, inst.context)
        latencies.append(time.perf_counter() - started)
        predictions.append(text.split(LINE_STOP, 1)[0])
        count.advance()
    count.end()
    return ModelRun(spec, predictions, latencies)


@dataclass
class EvalReport:
    """Where the report went, and its content (the same dict as report.json)."""

    directory: Path
    data: dict[str, Any]

    @property
    def json_path(self) -> Path:
        return self.directory / "report.json"

    @property
    def html_path(self) -> Path:
        return self.directory / "report.html"


def evaluate_models(
    repo: Path,
    specs: Sequence[str],
    settings: Settings,
    data_dir: Path,
    limit: int | None = None,
    *,
    general_instances: int = 50,
    humaneval_problems: int = 0,
    out_dir: Path | None = None,
    command: str | None = None,
    scope: str = SCOPE_NEWEST,
    lookup_queries: int = 0,
    author: str | None = None,
    report: Report | None = None,
    context_config: str | None = None,
) -> EvalReport:
    """Evaluate `specs` (see the module docstring) on the repository's mined
    test split and write report.json, report.html, predictions.jsonl and
    lookup.jsonl to `out_dir` (default: `<repo store>/eval/<id>/`).

    Module lookup runs only when `lookup_queries` > 0: it is slow on CPU, and
    gates that compare completion figures do not need it. `report` gets what
    a person follows (default: the log): lines, and a `Progress` per model
    and part ("base: completions") for a bar. Completions are prompted as
    `settings.serve` says (budgets, suffix layout, repository context, the
    latter from the candidates mined with each instance); `context_config`
    names that configuration in the report (see `context_overrides`)."""
    from shoptalk.trainer import retention
    from shoptalk.trainer.metrics import score_completion
    from shoptalk.trainer.report import build_report_data, write_report

    repo = repo.resolve()
    store = RepoStore.for_repo(data_dir, repo)
    if scope not in SCOPES:
        raise EvalError(f"unknown --scope {scope!r}: use {' or '.join(SCOPES)}")
    test_set = load_test_set(store, settings, limit or settings.eval.limit, scope, author)
    say = report or to_log(log)
    models = resolve_models(specs, repo, settings, data_dir, report=say)
    trivial = retention.trivial_ngram_set(data_dir)
    general = (
        retention.general_instances(
            general_instances, settings.serve.prefix_chars, settings.serve.suffix_chars
        )
        if general_instances
        else []
    )
    problems = retention.humaneval_problems(humaneval_problems) if humaneval_problems else []
    say(
        f"evaluating {', '.join(m.spec for m in models)} on {len(test_set.completion)} "
        f"completion instances ({test_set.available} in scope {scope!r} of the test split)"
        + (f", {len(general)} general-code instances" if general else "")
        + (f", {len(problems)} HumanEval problems" if problems else "")
    )
    runs: list[ModelRun] = []
    lookup = LookupRankings()
    modules: ModuleLookupEval | None = None
    # Grammar-constrained generation is slow on CPU: lookup has its own cap.
    test_set.module_lookup = test_set.module_lookup[:lookup_queries]
    if not test_set.module_lookup:
        lookup.reason = "not requested (--lookup 0)" if lookup_queries == 0 else None
    if test_set.module_lookup:
        modules = ModuleLookupEval(repo, test_set.module_lookup)
        if not modules.ids:
            lookup.reason = f"no modules were found in {repo} (no supported source files)"
            modules = None
        else:
            lookup.rankings["retrieval (BM25)"] = modules.retrieval()
    started = time.time()
    for model in models:
        engine = open_engine(model, settings)
        try:
            run = run_model(engine, model.spec, test_set.completion, say)
            _run_retention(engine, run, general, problems, say)
            if modules is not None:
                lookup.rankings.update(modules.with_model(model, engine, say))
        finally:
            engine.close()
        runs.append(run)
    scores = {
        run.spec: [
            score_completion(p, i.target, trivial)
            for p, i in zip(run.predictions, test_set.completion, strict=True)
        ]
        for run in runs
    }
    data = build_report_data(
        repo=repo,
        test_set=test_set,
        models=models,
        runs=runs,
        scores=scores,
        settings=settings,
        command=command or _command_line(),
        seconds=time.time() - started,
        lookup=lookup,
    )
    data["prompt"] = prompt_description(settings, context_config)
    eval_id = time.strftime("eval-%Y%m%d-%H%M%S", time.gmtime())
    target = out_dir or store.root / "eval" / eval_id
    write_report(target, data, test_set, runs, lookup)
    return EvalReport(target, data)


class ModuleLookupEval:
    """Module lookup on the repository's module map (its working tree, read
    only), ranked as the server ranks: BM25 alone, the model alone (picks
    under a grammar of all module ids), and the server's fusion of both."""

    def __init__(self, repo: Path, queries: Sequence[ModuleLookupInstance]):
        from shoptalk.models.module_lookup import ModuleIndex
        from shoptalk.models.module_map import module_map_from_tree

        self.queries = list(queries)
        self.index = ModuleIndex(module_map_from_tree(repo))
        self.ids = sorted(self.index.module_map.modules)

    def retrieval(self) -> list[list[str]]:
        from shoptalk.models.module_lookup import find_modules

        return [
            [hit.id for hit in find_modules(q.query, self.index, None, LOOKUP_DEPTH)]
            for q in self.queries
        ]

    def with_model(
        self, model: ResolvedModel, engine: ServedModel, report: Report = quiet
    ) -> dict[str, list[list[str]]]:
        from shoptalk.models.module_lookup import (
            BASE_MODEL_WEIGHT,
            MAX_GRAMMAR_IDS,
            TUNED_MODEL_WEIGHT,
            find_modules,
            model_picks,
        )

        # The server trusts a tuned model's pick more than the base's.
        weight = TUNED_MODEL_WEIGHT if model.run_id else BASE_MODEL_WEIGHT
        generate = engine.generate_with_grammar
        hybrid: list[list[str]] = []
        alone: list[list[str]] = []
        count = _Count(report, f"{model.spec}: module lookup", len(self.queries))
        for q in self.queries:
            hits = find_modules(q.query, self.index, generate, LOOKUP_DEPTH, model_weight=weight)
            hybrid.append([hit.id for hit in hits])
            alone.append(model_picks(q.query, self.ids[:MAX_GRAMMAR_IDS], generate, LOOKUP_DEPTH))
            count.advance()
        count.end()
        return {f"{model.spec}: hybrid": hybrid, f"{model.spec}: model": alone}


def _run_retention(
    engine: EvalEngine,
    run: ModelRun,
    general: Sequence[GeneralInstance],
    problems: Sequence[HumanEvalProblem],
    report: Report = quiet,
) -> None:
    """General-code EM and HumanEval pass@1 of one model, into `run`."""
    from shoptalk.trainer import retention

    if general:
        count = _Count(report, f"{run.spec}: general code", len(general))

        def complete(prefix: str, suffix: str) -> str:
            count.advance()
            return engine.complete(prefix, suffix).split(LINE_STOP, 1)[0]

        outcome = retention.general_completion_em(complete, general)
        count.end()
        run.general_instances, run.general_exact = outcome.instances, outcome.exact
    if problems:
        count = _Count(report, f"{run.spec}: HumanEval", len(problems))
        result = retention.humaneval_pass_at_1(engine.generate, problems, progress=count.advance)
        count.end()
        run.humaneval_total, run.humaneval_passed = result.total, result.passed


def _command_line() -> str:
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv else ["shoptalk"]
    return shlex.join(argv)
