"""`shoptalk eval`: compare models on a repository's newest code.

Models are compared on the same instances through the serving path users
get: the exported GGUF in llama.cpp, the shared prompt builder, the server's
stopping rules. The comparison list names models by role:

    base          the untuned base (prefix-only unless it was trained on FIM)
    org           the repository's promoted model (`RepoStore.current()`)
    baseline+     the base tuned on as much general code (size control)
    dev:ID        a developer's adapter tuned from the base
    org+dev:ID    a developer's adapter tuned on top of the org model
    run:RUN_ID    any exported run of this repository

Every model is resolved and checked (manifest sha256, repository, base)
before the first instance is run, and the report is written only when every
part finished: a missing model or an interrupted run never leaves a report
that looks whole.

`evaluate_models` is the entry point for other stages (`shoptalk demo`,
continuous learning); the CLI is a thin wrapper around it.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from shoptalk.models.catalog import BaseModel, FimTemplate, resolve_base
from shoptalk.models.errors import ShopTalkError
from shoptalk.models.manifest import ModelManifest, verify_model_file
from shoptalk.models.prompt import clip_context, completion_prompt
from shoptalk.models.settings import Settings
from shoptalk.models.store import RepoStore, repo_key

if TYPE_CHECKING:
    from shoptalk.trainer.retention import GeneralInstance, HumanEvalProblem

log = logging.getLogger(__name__)
console = Console(stderr=True)

DEFAULT_SPECS = ("base", "org")
ROLE_SPECS = ("base", "org", "baseline+")
PARAMETRIC_SPECS = ("dev:", "org+dev:", "run:")

# A team instance is the masked tail of one line, so a prediction is cut at
# its first line end, as the server's single-line stopping rule does.
LINE_STOP = "\n"


class EvalError(ShopTalkError):
    pass


# ------------------------------------------------------------------ test set


@dataclass(frozen=True)
class CompletionInstance:
    id: str
    commit: str
    author_id: str
    author_date: str
    path: str
    prefix: str
    suffix: str
    target: str
    masked_tokens: int

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> CompletionInstance:
        target = str(record["target"])
        return cls(
            id=str(record["id"]),
            commit=str(record.get("commit", "")),
            author_id=str(record.get("author_id", "unknown")),
            author_date=str(record.get("author_date", "")),
            path=str(record.get("path", "")),
            prefix=str(record.get("prefix", "")),
            suffix=str(record.get("suffix", "")),
            target=target,
            masked_tokens=int(record.get("masked_tokens") or len(target.split())),
        )


@dataclass(frozen=True)
class ModuleLookupInstance:
    id: str
    commit: str
    author_id: str
    query: str
    modules: tuple[str, ...]

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> ModuleLookupInstance:
        return cls(
            id=str(record["id"]),
            commit=str(record.get("commit", "")),
            author_id=str(record.get("author_id", "unknown")),
            query=str(record["query"]),
            modules=tuple(str(m) for m in record.get("modules", [])),
        )


@dataclass
class EvalSet:
    """The instances every model is scored on, and where they came from."""

    completion: list[CompletionInstance]
    module_lookup: list[ModuleLookupInstance]
    manifest: dict[str, Any]
    available: int  # completion test instances in the split before --limit

    def commit_range(self) -> dict[str, Any]:
        dates = sorted(i.author_date for i in self.completion if i.author_date)
        return {
            "commits": len({i.commit for i in self.completion}),
            "first_author_date": dates[0] if dates else None,
            "last_author_date": dates[-1] if dates else None,
            "cutoff": self.manifest.get("cutoff"),
            "mined_range": self.manifest.get("commit_range") or self.manifest.get("range"),
        }


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except ValueError:
                        raise EvalError(
                            f"{path}:{number} is not valid JSON: the dataset is damaged; "
                            "mine it again with `shoptalk mine`"
                        ) from None
    except FileNotFoundError:
        return []
    return records


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


def load_test_set(store: RepoStore, settings: Settings, limit: int | None) -> EvalSet:
    """The mined test split of a repository; clear errors when there is none."""
    manifest_file = store.dataset_dir / "manifest.json"
    if not manifest_file.is_file():
        raise EvalError(
            f"no mined dataset in {store.dataset_dir}: run `shoptalk mine --repo REPO` first"
        )
    try:
        manifest = json.loads(manifest_file.read_text())
    except ValueError as exc:
        raise EvalError(
            f"{manifest_file} is not valid JSON ({exc}); mine the repository again"
        ) from None
    completion = [
        CompletionInstance.from_record(r)
        for r in _read_jsonl(store.dataset_dir / "completion.test.jsonl")
    ]
    if not completion:
        share = settings.mine.test_share
        needed = math.ceil(2 / share)
        counted = manifest.get("commits") or manifest.get("commit_count")
        have = f" (the mined history has {counted} usable commits)" if counted else ""
        raise EvalError(
            f"the mined dataset has no completion test instances{have}: the test split is "
            f"the newest {share:.0%} of commits, so a repository needs at least {needed} "
            "commits that add code for one to exist (a few hundred for figures worth "
            "reading). Mine a longer history (`shoptalk mine --since ...`) or lower "
            "mine.test_share."
        )
    lookup = [
        ModuleLookupInstance.from_record(r)
        for r in _read_jsonl(store.dataset_dir / "module_lookup.test.jsonl")
        if r.get("source", "commit_message") == "commit_message" and r.get("modules")
    ]
    lookup.sort(key=lambda i: i.id)
    chosen = _interleave_by_author(completion, limit)
    return EvalSet(
        completion=chosen,
        module_lookup=lookup[:limit] if limit else lookup,
        manifest=manifest,
        available=len(completion),
    )


# ------------------------------------------------------------------ models


@dataclass(frozen=True)
class ResolvedModel:
    """A model of the comparison: the GGUF (and adapter) to load, how to
    prompt it, and what its manifests say it is."""

    spec: str
    model: Path
    adapter: Path | None
    use_fim: bool
    template: FimTemplate
    run_id: str | None = None
    manifests: dict[str, Any] = field(default_factory=dict)


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


def base_gguf(base: BaseModel, data_dir: Path, report: Callable[[str], None]) -> Path:
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


def _run_files(run_dir: Path, quant: str) -> tuple[Path | None, Path | None]:
    """The run's exported full model (preferring `quant`) and adapter GGUF."""
    export = run_dir / "export"
    models = sorted(export.glob("model-*.gguf"))
    preferred = [m for m in models if m.name == f"model-{quant}.gguf"]
    adapters = sorted(export.glob("adapter-*.gguf"))
    candidates = preferred or models
    return (candidates[0] if candidates else None), (adapters[0] if adapters else None)


def _run_record(run_dir: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((run_dir / "record.json").read_text())
        return data
    except (OSError, ValueError):
        return {}


def _find_run(store: RepoStore, purpose: str, developer: str | None) -> Path | None:
    """The newest complete run of `purpose` (see docs/architecture.md, run
    record) that has an export; None if there is none."""
    if not store.runs_dir.is_dir():
        return None
    found: list[tuple[float, Path]] = []
    for run_dir in store.runs_dir.iterdir():
        record = _run_record(run_dir)
        if record.get("status") != "complete" or record.get("purpose", "org") != purpose:
            continue
        if developer is not None and str(record.get("developer")) != developer:
            continue
        model, adapter = _run_files(run_dir, "")
        if model or adapter:
            found.append((run_dir.stat().st_mtime, run_dir))
    return max(found)[1] if found else None


def resolve_models(
    specs: Sequence[str],
    repo: Path,
    settings: Settings,
    data_dir: Path,
    report: Callable[[str], None] = log.info,
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

    def from_run(spec: str, run_dir: Path, on_top_of: Path | None = None) -> ResolvedModel:
        model, adapter = _run_files(run_dir, quant)
        manifests: dict[str, Any] = {}
        if model is not None and on_top_of is None:
            manifests["model"] = _verify(spec, model, repo, base)
            return ResolvedModel(spec, model, None, True, base.fim, run_dir.name, manifests)
        if adapter is None:
            raise EvalError(f"run {run_dir.name} has no exported model; run `shoptalk export`")
        manifests["adapter"] = _verify(spec, adapter, repo, base)
        host = on_top_of or the_base_file()
        return ResolvedModel(spec, host, adapter, True, base.fim, run_dir.name, manifests)

    for spec in specs:
        if spec == "base":
            resolved.append(
                ResolvedModel(spec, the_base_file(), None, base.fim.trained, base.fim, None, {})
            )
        elif spec == "org":
            current = store.current()
            if current is None:
                missing.append(
                    "org (no promoted model: run `shoptalk train` and `shoptalk export`)"
                )
                continue
            resolved.append(_from_current(spec, current, repo, base))
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
            run_dir = store.run_dir(spec[4:])
            if not run_dir.is_dir():
                missing.append(f"{spec} (no run {spec[4:]!r} in {store.runs_dir})")
                continue
            resolved.append(from_run(spec, run_dir))
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
            host = None
            if on_org:
                current = store.current()
                if current is None:
                    missing.append(f"{spec} (needs the org model, and none is promoted)")
                    continue
                host = _from_current("org", current, repo, base).model
            resolved.append(from_run(spec, run_dir, on_top_of=host))
    if missing:
        raise EvalError(
            "cannot compare the requested models; missing:\n"
            + "\n".join(f"  - {m}" for m in missing)
            + "\nCreate them, or leave them out of --models."
        )
    return resolved


def _from_current(spec: str, current: dict[str, Any], repo: Path, base: BaseModel) -> ResolvedModel:
    model = Path(str(current.get("model") or ""))
    adapter_value = current.get("adapter")
    run_id = current.get("run_id")
    manifests: dict[str, Any] = {}
    if adapter_value:
        adapter = Path(str(adapter_value))
        host = Path(str(current.get("base_model") or ""))
        if not host.is_file():
            raise EvalError(
                f"the promoted model's base {host} is missing: pull it again "
                "(`shoptalk models pull`) or roll back (`shoptalk models rollback`)"
            )
        manifests["adapter"] = _verify(spec, adapter, repo, base)
        return ResolvedModel(spec, host, adapter, True, base.fim, run_id, manifests)
    manifests["model"] = _verify(spec, model, repo, base)
    return ResolvedModel(spec, model, None, True, base.fim, run_id, manifests)


# ------------------------------------------------------------------ engine


class CompletionEngine(Protocol):
    def complete(self, prefix: str, suffix: str) -> str: ...

    def generate(self, prompt: str, max_tokens: int, stop: Sequence[str]) -> str: ...

    def close(self) -> None: ...


class LlamaEngine:
    """A model served the way the language server serves it: llama.cpp on
    the GGUF (plus LoRA adapter), the shared prompt builder and the serve
    settings' context budgets, greedy decoding, single-line stop."""

    def __init__(self, model: ResolvedModel, settings: Settings, max_tokens: int):
        from llama_cpp import Llama

        serve = settings.serve
        self.model = model
        self.serve = serve
        self.max_tokens = max_tokens
        try:
            self.llm = Llama(
                model_path=str(model.model),
                lora_path=str(model.adapter) if model.adapter else None,
                n_ctx=serve.context_tokens,
                n_threads=serve.threads or settings.train.threads,
                n_gpu_layers=serve.gpu_layers,
                seed=0,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            adapter = f" with adapter {model.adapter}" if model.adapter else ""
            raise EvalError(
                f"llama.cpp could not load {model.spec!r} ({model.model}{adapter}): {exc}. "
                "Export it again (`shoptalk export`) or leave it out of --models."
            ) from None

    def _text(self, prompt: str, max_tokens: int, stop: Sequence[str]) -> str:
        tokens = self.llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        # Keep the newest context when the prompt would not fit: the server
        # clips the same way (prefix tail kept).
        room = self.llm.n_ctx() - max_tokens - 1
        if len(tokens) > room:
            tokens = tokens[:1] + tokens[len(tokens) - room + 1 :]
        result = self.llm.create_completion(
            tokens, max_tokens=max_tokens, temperature=0.0, stop=list(stop), seed=0
        )
        return str(result["choices"][0]["text"])  # type: ignore[index]

    def complete(self, prefix: str, suffix: str) -> str:
        # Prefix-only, spaces before the cursor would end the prompt on a lone
        # space token, which tokenizers that glue spaces to words almost never
        # produce: the model then answers with digits or nothing. Leave them
        # out of the prompt and take them back off the answer. (With FIM the
        # answer follows the middle token, as in training: nothing to fix.)
        stripped = prefix if self.model.use_fim else prefix.rstrip(" \t")
        gap = prefix[len(stripped) :]
        parts = clip_context(stripped, suffix, self.serve.prefix_chars, self.serve.suffix_chars)
        prompt = completion_prompt(self.model.template, parts, self.model.use_fim)
        text = self._text(prompt, self.max_tokens, [LINE_STOP, self.model.template.end])
        if gap and text.startswith(gap):
            return text[len(gap) :]
        return text.lstrip(" \t") if gap else text

    def generate(self, prompt: str, max_tokens: int, stop: Sequence[str]) -> str:
        return self._text(prompt, max_tokens, [*stop, self.model.template.end])

    def close(self) -> None:
        self.llm.close()


def open_engine(model: ResolvedModel, settings: Settings) -> CompletionEngine:
    return LlamaEngine(model, settings, settings.eval.max_tokens)


# ------------------------------------------------------------------ module lookup

# A ranking answers a query with module ids, best first.
ModuleRanking = Callable[[str, int], list[str]]
LOOKUP_DEPTH = 3


@dataclass
class LookupRankings:
    """Ranked module ids per module-lookup query, per ranking ("retrieval",
    "<model>: hybrid", "<model>: model"); or why there are none."""

    rankings: dict[str, list[list[str]]] = field(default_factory=dict)
    reason: str | None = None


def rank_queries(
    ranking: ModuleRanking, queries: Sequence[ModuleLookupInstance]
) -> list[list[str]]:
    return [ranking(q.query, LOOKUP_DEPTH) for q in queries]


# ------------------------------------------------------------------ running


@dataclass
class ModelRun:
    """What one model produced on the test set (plain data, in instance order)."""

    spec: str
    predictions: list[str]
    latencies: list[float]
    general_instances: int = 0
    general_exact: int = 0
    humaneval_total: int = 0
    humaneval_passed: int = 0


@contextmanager
def _progress() -> Iterator[Progress]:
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as progress:
        yield progress


def run_model(
    engine: CompletionEngine,
    spec: str,
    instances: Sequence[CompletionInstance],
    progress: Progress | None = None,
) -> ModelRun:
    task = progress.add_task(f"{spec}: completions", total=len(instances)) if progress else None
    predictions: list[str] = []
    latencies: list[float] = []
    for inst in instances:
        started = time.perf_counter()
        text = engine.complete(inst.prefix, inst.suffix)
        latencies.append(time.perf_counter() - started)
        predictions.append(text.split(LINE_STOP, 1)[0])
        if progress is not None and task is not None:
            progress.advance(task)
    if progress is not None and task is not None:
        progress.remove_task(task)
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
) -> EvalReport:
    """Evaluate `specs` (see the module docstring) on the repository's mined
    test split and write report.json, report.html and predictions.jsonl to
    `out_dir` (default: `<repo store>/eval/<id>/`)."""
    from shoptalk.trainer import report as report_module
    from shoptalk.trainer import retention
    from shoptalk.trainer.metrics import score_completion

    repo = repo.resolve()
    store = RepoStore.for_repo(data_dir, repo)
    test_set = load_test_set(store, settings, limit or settings.eval.limit)
    models = resolve_models(specs, repo, settings, data_dir, report=console.print)
    trivial = retention.trivial_ngram_set(data_dir)
    general = (
        retention.general_instances(
            general_instances, settings.serve.prefix_chars, settings.serve.suffix_chars
        )
        if general_instances
        else []
    )
    problems = retention.humaneval_problems(humaneval_problems) if humaneval_problems else []
    console.print(
        f"evaluating {', '.join(m.spec for m in models)} on {len(test_set.completion)} "
        f"completion instances ({test_set.available} in the test split)"
        + (f", {len(general)} general-code instances" if general else "")
        + (f", {len(problems)} HumanEval problems" if problems else "")
    )
    runs: list[ModelRun] = []
    lookup = LookupRankings(reason=_module_lookup_unavailable())
    started = time.time()
    with _progress() as progress:
        for model in models:
            engine = open_engine(model, settings)
            try:
                run = run_model(engine, model.spec, test_set.completion, progress)
                _run_retention(engine, run, general, problems, progress)
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
    data = report_module.build_report_data(
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
    eval_id = time.strftime("eval-%Y%m%d-%H%M%S", time.gmtime())
    target = out_dir or store.root / "eval" / eval_id
    report_module.write_report(target, data, test_set, runs)
    return EvalReport(target, data)


def _module_lookup_unavailable() -> str | None:
    """Why module lookup cannot be evaluated here, or None when it can."""
    import importlib.util

    if importlib.util.find_spec("shoptalk.server.module_lookup") is None:
        return "the server's module lookup (shoptalk.server.module_lookup) is not installed"
    return "module lookup evaluation is not wired to the server's ranking in this build"


def _run_retention(
    engine: CompletionEngine,
    run: ModelRun,
    general: Sequence[GeneralInstance],
    problems: Sequence[HumanEvalProblem],
    progress: Progress,
) -> None:
    """General-code EM and HumanEval pass@1 of one model, into `run`."""
    from shoptalk.trainer import retention

    if general:
        task = progress.add_task(f"{run.spec}: general code", total=len(general))

        def complete(prefix: str, suffix: str) -> str:
            progress.advance(task)
            return engine.complete(prefix, suffix).split(LINE_STOP, 1)[0]

        outcome = retention.general_completion_em(complete, general)
        progress.remove_task(task)
        run.general_instances, run.general_exact = outcome.instances, outcome.exact
    if problems:
        task = progress.add_task(f"{run.spec}: HumanEval", total=len(problems))
        result = retention.humaneval_pass_at_1(
            engine.generate, problems, progress=lambda: progress.advance(task)
        )
        progress.remove_task(task)
        run.humaneval_total, run.humaneval_passed = result.total, result.passed


def _command_line() -> str:
    argv = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv else ["shoptalk"]
    return shlex.join(argv)


# ------------------------------------------------------------------ CLI


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_command(
        repo: Annotated[Path, typer.Option(help="Repository whose newest code to test on.")] = Path(
            "."
        ),
        models: Annotated[
            str,
            typer.Option(
                help="Models to compare, comma-separated: base, org, baseline+, dev:ID, "
                "org+dev:ID, run:RUN_ID."
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
            typer.Option(
                min=0, help="HumanEval problems for pass@1 (0: skip; 164: all; slow on CPU)."
            ),
        ] = 0,
        base: Annotated[str | None, typer.Option(help="Base model (default: train.base).")] = None,
        out: Annotated[
            Path | None,
            typer.Option(help="Write the report here (default: the repository's data folder)."),
        ] = None,
    ) -> None:
        """Compare models on the repository's newest commits: exact match, edit
        similarity, CrystalBLEU per author with confidence intervals, module
        lookup, general-ability retention, latency; writes report.html/json."""
        from shoptalk.models.cli import out as stdout_console
        from shoptalk.models.cli import settings_for
        from shoptalk.trainer.report import summary_tables

        overrides: dict[str, Any] = {}
        if base is not None:
            overrides["train"] = {"base": base}
        settings = settings_for(repo, overrides)
        result = evaluate_models(
            repo,
            parse_specs(models),
            settings,
            settings.resolved_data_dir(),
            limit,
            general_instances=general,
            humaneval_problems=humaneval,
            out_dir=out,
        )
        for table in summary_tables(result.data):
            stdout_console.print(table)
        console.print(f"report: {result.html_path}\n        {result.json_path}")
