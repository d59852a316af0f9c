"""`shoptalk train`: a LoRA adapter for a repository's mined dataset.

Entry point for other stages (the watcher, personalization):

    train_adapter(repo, settings, data_dir, init_adapter=None, ...) -> TrainResult

One run, in `runs/<run_id>/` of the repository's store (see
`shoptalk.trainer.run_record`):

1. optional phase 1 (`train.pretrain_minutes` > 0): causal LM on the
   repository's own source files at the dataset's cutoff commit;
2. phase 2, SFT on the instance mix (`train.kind_weights`) plus a share of
   general code (`train.replay_share`, `shoptalk.trainer.replay`), loss on the
   answers only (`shoptalk.trainer.formats`);
3. validation loss every `val_every` steps with early stopping
   (`patience` evaluations without improvement; 0 = never stop early), a
   checkpoint after each, resumable with `--resume`;
4. at the end the best adapter (lowest validation loss) is validated once
   more and written atomically to `adapter/`; only then does `record.json`
   say `complete`.

This module is the run's recipe: resolve the request (a resumed run's
saved settings) → prepare (data, base, record) → fit (both phases) → finish
(adapter, complete record). One phase's loop and its budget are in
`shoptalk.trainer.train_loop`; checkpoints and resuming in
`shoptalk.trainer.checkpoints`.

Multi-GPU / multi-node: run the same command under `accelerate launch "$(command -v shoptalk)" train ... --run-id NAME`
(DDP); each process takes its share of every step's micro-batches and only
the main process writes. A single process never needs a launcher.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoptalk.models.catalog import BaseModel, resolve_base
from shoptalk.models.files import atomic_dir, write_failure
from shoptalk.models.module_map import language_for
from shoptalk.models.progress import Progress, Report, to_log
from shoptalk.models.settings import Settings, TrainSettings
from shoptalk.models.store import RepoStore
from shoptalk.trainer.budget import SAVE_SECONDS, CommandBudget, fine_tuning_seconds
from shoptalk.trainer.checkpoints import (
    PHASE_PRETRAIN,
    PHASE_SFT,
    TrainError,
    TrainInterrupted,
    TrainState,
    find_resumable,
    load_checkpoint,
    load_trainable,
    progress_fields,
    record_evaluation,
    resume_command,
    trainable_state,
)
from shoptalk.trainer.run_record import (
    STATUS_COMPLETE,
    STATUS_FAILED,
    STATUS_INTERRUPTED,
    STATUS_RUNNING,
    LossRow,
    RunFolder,
    command_line,
    library_versions,
)
from shoptalk.trainer.train_loop import STOP_MESSAGE as STOP_MESSAGE  # the CLI styles it
from shoptalk.trainer.train_loop import (
    Distributed,
    Loop,
    PhaseBudget,
    StopRequest,
    checkpoint_now,
    distributed,
    fmt_loss,
    lr_factor,
    optimizer_step,
    run_phase,
    validation_loss,
)

if TYPE_CHECKING:
    import torch

    from shoptalk.trainer.em_difference import EmDifference
    from shoptalk.trainer.formats import Example, SequenceBuilder
    from shoptalk.trainer.train_data import Dataset
    from shoptalk.trainer.train_model import BaseIdentity, DevicePlan

log = logging.getLogger(__name__)

# Share of completion instances that get a second copy with the cursor moved
# inside the target (inside a word, after a space).
AUGMENT_SHARE = 0.5
# Validation instances scored at each evaluation (the newest mined split).
DEFAULT_VAL_LIMIT = 64
# When the dataset has no validation split, this share of train is held out.
FALLBACK_VAL_SHARE = 0.05
# Phase 1 reads source files up to this size at the cutoff commit.
PRETRAIN_MAX_FILE_BYTES = 200_000
# Records tokenized between two looks at the clock (and two bar updates).
PREPARE_CHUNK = 200
# Held-out examples whose loss is compared before and after the final pass.
FINAL_PROBE = 64
# What the record and the summary say of a run that kept its start (step 0).
OUTCOME_NO_GAIN = "complete — no gain"


@dataclass
class TrainResult:
    run_id: str
    run_dir: Path
    adapter_dir: Path | None  # None unless status is complete
    status: str
    stop_reason: str
    steps: int
    tokens: int
    wall_seconds: float
    tokens_per_second: float
    base_val_loss: float | None
    best_val_loss: float | None
    final_val_loss: float | None
    record: dict[str, Any] = field(default_factory=dict)
    outcome: str = STATUS_COMPLETE  # OUTCOME_NO_GAIN when the run kept its start


def _split_validation(
    train: list[dict[str, Any]], validation: list[dict[str, Any]], seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    if validation:
        return train, validation, "validation split"
    # No validation split (a short history): hold out the newest train records.
    ordered = sorted(train, key=lambda r: str(r.get("author_date", "")))
    held = max(1, int(len(ordered) * FALLBACK_VAL_SHARE))
    return ordered[:-held], ordered[-held:], f"newest {held} train instances"


def _val_examples(examples: list[Example], limit: int, seed: int) -> list[Example]:
    if len(examples) <= limit:
        return examples
    rng = random.Random(seed)
    return rng.sample(examples, limit)


def pretrain_examples(
    repo: Path, manifest: dict[str, Any], builder: SequenceBuilder, seed: int
) -> list[Example]:
    """Windows of the repository's source files at the dataset's cutoff commit
    (so phase 1 never sees code from the test period)."""
    from shoptalk.trainer.formats import code_windows
    from shoptalk.trainer.git_log import BlobReader, run_git, tree_paths

    head = str(manifest.get("head") or "HEAD")
    cutoff = manifest.get("cutoff")
    args = ["rev-list", "-1", head] + ([f"--before={cutoff}"] if cutoff else [])
    commit = run_git(repo, *args).strip()
    if not commit:
        return []
    paths = [p for p in tree_paths(repo, commit) if language_for(p) is not None]
    examples: list[Example] = []
    with BlobReader(repo) as blobs:
        for path in paths:
            data = blobs.read(f"{commit}:{path}", PRETRAIN_MAX_FILE_BYTES)
            if not data:
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                continue
            examples += code_windows(builder, text)
    random.Random(seed).shuffle(examples)
    return examples


def train_adapter(
    repo: Path,
    settings: Settings,
    data_dir: Path,
    init_adapter: Path | None = None,
    *,
    resume: bool = False,
    run_id: str | None = None,
    purpose: str = "org",
    developer: str | None = None,
    dataset_dir: Path | None = None,
    val_limit: int = DEFAULT_VAL_LIMIT,
    precision: str = "auto",
    show_progress: bool = True,
    report: Report | None = None,
    started: float | None = None,
) -> TrainResult:
    """Train (or, with `init_adapter`, continue training) a LoRA adapter on
    the repository's mined dataset; returns where it is and how it went.

    `resume`: continue the newest unfinished run (or `run_id`) from its last
    checkpoint with its saved settings. `developer`: train only on that
    author id's instances (a personal adapter; use `purpose="dev"` and an
    `init_adapter` of the team). Raises `TrainError`/`DatasetError`/
    `ModelError` (ShopTalkError) with what to do; Ctrl-C raises
    `TrainInterrupted` after saving a checkpoint.

    `report` gets what a person follows (default: the log): lines, and with
    `show_progress` each phase's `Progress` (label, step, speed, loss) for a
    bar; on Ctrl-C, `STOP_MESSAGE`.

    `train.max_minutes` bounds the whole call from `started` (a
    `time.perf_counter()` value; default: now): every phase takes its share.
    """
    say = report or to_log(log)
    store = RepoStore.for_repo(data_dir, repo)
    dist = distributed()
    if resume:
        run = find_resumable(store, run_id)
        saved = json.loads(run.config_file.read_text())
        settings = Settings.model_validate(saved["settings"])
        init_adapter = Path(saved["init_adapter"]) if saved.get("init_adapter") else None
        purpose = saved.get("purpose", purpose)
        developer = saved.get("developer", developer)
        dataset_dir = Path(saved["dataset_dir"])
        val_limit = int(saved.get("val_limit", val_limit))
        precision = saved.get("precision", precision)
        say(f"resuming run {run.run_id}")
    else:
        # Under `accelerate launch` every process takes the main one's run id and finding.
        run = RunFolder(store.run_dir(dist.agree(run_id or store.new_run_id(purpose))))
        if dist.agree(run.root.exists()):
            raise TrainError(f"run {run.run_id} exists already; pick another --run-id")
    wall_started = started if started is not None else time.perf_counter()
    request = _Request(
        repo,
        settings,
        data_dir,
        run,
        dist,
        init_adapter,
        resume,
        purpose,
        developer,
        dataset_dir or store.dataset_dir,
        val_limit,
        precision,
        show_progress,
        say,
        wall_started,
        CommandBudget.of_minutes(settings.train.max_minutes, wall_started),
    )
    try:
        return _train(request)
    except TrainInterrupted:
        raise
    except BaseException as exc:
        if run.record_file.is_file() and dist.is_main:
            record = run.read_record()
            if record.get("status") == STATUS_RUNNING:
                record["status"] = STATUS_FAILED
                record["error"] = str(exc) or type(exc).__name__
                # On a full disk this write fails too: the error at hand is the one to report.
                with contextlib.suppress(OSError):
                    run.write_record(record)
        raise


def _prompt_format(setting: str, base: BaseModel, init_adapter: Path | None) -> str:
    """The completion prompt format of a run: a continued adapter keeps the
    format it learned (its run record says which); else the setting."""
    from shoptalk.models.prompt import training_prompt_format

    if init_adapter is not None:
        parent = RunFolder(init_adapter.parent).read_record()
        if parent:
            # Runs from before the format was recorded were all FIM-trained.
            return str(parent.get("prompt_format") or "fim")
    return training_prompt_format(setting, base.fim)


@dataclass
class _Request:
    """One run as `train_adapter` resolved it (a resumed run's saved settings
    applied): where, on what, for whom, and how it reports."""

    repo: Path
    settings: Settings
    data_dir: Path
    run: RunFolder
    dist: Distributed
    init_adapter: Path | None
    resume: bool
    purpose: str
    developer: str | None
    dataset_dir: Path
    val_limit: int
    precision: str
    show_progress: bool
    say: Report
    wall_started: float
    budget: CommandBudget

    def bar(self, done: float, total: float, label: str, detail: str, final: bool = False) -> None:
        """A phase's bar (with its ETA), when progress is shown."""
        if self.show_progress and self.dist.is_main:
            self.say(Progress(done, total, label, detail, final))


@dataclass
class _Prepared:
    """What fitting needs besides the model: the base, its tokenizer and
    device plan, and the examples of both phases and validation."""

    base: BaseModel
    base_path: str
    plan: DevicePlan
    tokenizer: Any
    identity: BaseIdentity
    prompt_format: str
    dataset: Dataset
    weights: dict[str, float]
    train_records: list[dict[str, Any]]
    val_source: str
    examples: list[Example]
    val: list[Example]
    pretrain: list[Example]
    select: list[Example]  # validation completions scored for exact match
    measure: list[Example]  # the newest test-window completions
    final: list[Example]  # the held-out windows, for the final pass
    prompt: dict[str, Any] | None = None  # the completion prompt's configuration ([serve])

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for example in self.examples:
            counts[example.kind] = counts.get(example.kind, 0) + 1
        return counts


def _train(request: _Request) -> TrainResult:
    """The run: prepare (data, base, record) → fit (both phases) → finish
    (the best adapter written, the record complete)."""
    prepared = _prepare(request)
    _start_record(request, prepared)
    request.bar(0, 1, "loading the model", "base + LoRA")
    loop = _build_loop(request, prepared)
    request.bar(1, 1, "loading the model", "base + LoRA", final=True)
    final_val = _fit(request, loop, prepared)
    served = _measure_and_serve(request, loop, prepared)
    return _finish(loop, prepared.identity.path, final_val, request, served)


def _prepare(request: _Request) -> _Prepared:
    """The base (converted once), its tokenizer and device plan, checked
    against the dataset; the training mix (team instances by kind weight,
    newest first if asked, plus replayed general code), validation examples
    and phase 1's windows."""
    from shoptalk.models.context import PromptConfig
    from shoptalk.trainer.formats import SequenceBuilder, build_examples
    from shoptalk.trainer.heldout_em import completion_examples
    from shoptalk.trainer.hf_checkpoint import ensure_hf_checkpoint
    from shoptalk.trainer.train_data import (
        check_dataset_base,
        check_enough,
        kind_weights,
        load_dataset,
    )
    from shoptalk.trainer.train_model import (
        checkpoint_architecture,
        choose_device,
        describe_base,
        load_tokenizer,
    )

    cfg = request.settings.train
    base: BaseModel = resolve_base(cfg.base)
    dataset = load_dataset(request.dataset_dir, request.repo)
    weights = kind_weights(cfg.kind_weights)
    base_path = str(ensure_hf_checkpoint(request.data_dir, base, request.say))
    if Path(base_path).is_dir():
        checkpoint_architecture(Path(base_path))
    plan = choose_device(cfg.device, cfg.threads, request.precision)
    tokenizer = load_tokenizer(base_path)
    identity = describe_base(base, base_path, tokenizer)
    check_dataset_base(dataset.manifest, base.key, identity.tokenizer_sha256, request.dataset_dir)
    prompt_format = _prompt_format(cfg.completion_format, base, request.init_adapter)
    # Completion prompts as the server builds them: its prefix/suffix budgets,
    # layout and repository context (`[serve]`), from the context mined at
    # each instance's parent commit.
    builder = SequenceBuilder(
        tokenizer,
        base.fim,
        cfg.max_seq_tokens,
        prompt_format,
        prompt=PromptConfig.of(request.settings.serve),
    )

    def mine_only(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if request.developer is None:
            return records
        return [r for r in records if r.get("author_id") == request.developer]

    all_train = mine_only(dataset.split("train"))
    check_enough(len(all_train), request.dataset_dir)
    train_records, val_records, val_source = _split_validation(
        all_train, mine_only(dataset.split("validation")), cfg.seed
    )
    examples = _training_mix(request, builder, train_records, weights)
    val = _val_examples(build_examples(val_records, builder, cfg.seed), request.val_limit, cfg.seed)
    pretrain: list[Example] = []
    if cfg.pretrain_minutes > 0:
        pretrain = pretrain_examples(request.repo, dataset.manifest, builder, cfg.seed)
    test_records = mine_only(dataset.split("test"))
    select = completion_examples(val_records, builder, cfg.select_instances, seed=cfg.seed)
    measure = completion_examples(test_records, builder, cfg.measure_instances)
    final: list[Example] = []
    if cfg.final_pass:
        final = build_examples(val_records + test_records, builder, cfg.seed, AUGMENT_SHARE)
    return _Prepared(
        base,
        base_path,
        plan,
        tokenizer,
        identity,
        prompt_format,
        dataset,
        weights,
        train_records,
        val_source,
        examples,
        val,
        pretrain,
        select,
        measure,
        final,
        asdict(builder.prompt),
    )


def _training_mix(
    request: _Request,
    builder: SequenceBuilder,
    train_records: list[dict[str, Any]],
    weights: dict[str, float],
) -> list[Example]:
    """Phase 2's examples: the team's instances by kind weight (newest first
    with `recent_first`, some with the cursor moved), interleaved with a
    share of general code."""
    from shoptalk.trainer.formats import build_examples
    from shoptalk.trainer.replay import replay_records
    from shoptalk.trainer.train_data import (
        check_enough,
        interleave,
        newest_first,
        replay_count,
        weighted_records,
    )

    cfg, mine_cfg = request.settings.train, request.settings.mine
    chosen = weighted_records(train_records, weights, cfg.seed)
    if cfg.recent_first:
        chosen = newest_first(chosen)
    team = _tokenize(request, builder, chosen)
    check_enough(len(team), request.dataset_dir, "training (after tokenizing)")
    general = replay_records(
        replay_count(len(team), cfg.replay_share),
        mine_cfg.prefix_chars,
        mine_cfg.suffix_chars,
        cfg.seed,
        cfg.replay_dirs,
    )
    replay = [replace(e, kind="replay") for e in build_examples(general, builder, cfg.seed)]
    return interleave(team, replay)


def examples_for_steps(cfg: TrainSettings) -> int | None:
    """The team examples a `max_steps` run can use in one pass (its steps'
    sequences less the replayed share, with a margin for the examples that
    tokenizing drops); None without a step budget. Preparing more would
    tokenize a large history's every record for a short run."""
    if cfg.max_steps is None:
        return None
    sequences = cfg.max_steps * cfg.batch_size * cfg.grad_accum * (1 - cfg.replay_share)
    return math.ceil(sequences * 1.1) + PREPARE_CHUNK


def _tokenize(
    request: _Request, builder: SequenceBuilder, records: Sequence[Mapping[str, Any]]
) -> list[Example]:
    """The training records as examples (some with the cursor moved), a chunk
    at a time under a bar; with `--max-minutes`, preparation stops at its
    share of the budget and trains on what it has (the first records: the
    newest with `recent_first`)."""
    from shoptalk.trainer.formats import build_examples

    seed, deadline = request.settings.train.seed, request.budget.prepare_deadline()
    enough = examples_for_steps(request.settings.train)
    examples: list[Example] = []
    total = len(records)
    done = 0
    for start in range(0, total, PREPARE_CHUNK):
        if deadline is not None and examples and time.perf_counter() >= deadline:
            request.say(
                f"data preparation reached its share of --max-minutes: {done} of {total} "
                "training records prepared; training on those"
            )
            break
        if enough is not None and len(examples) >= enough:
            request.say(
                f"{done} of {total} training records prepared: enough for --max-steps "
                f"{request.settings.train.max_steps}"
            )
            break
        chunk = records[start : start + PREPARE_CHUNK]
        examples += build_examples(chunk, builder, seed + start, AUGMENT_SHARE)
        done = start + len(chunk)
        request.bar(*_prepared_share(done, total, len(examples), enough))
    request.bar(*_prepared_share(done, total, len(examples), enough), final=True)
    return examples


def _prepared_share(
    done: int, total: int, examples: int, enough: int | None
) -> tuple[float, float, str, str]:
    """The preparation bar's arguments: records done of all of them, or, for
    a step budget, examples made of those its steps need (so its ETA is the
    preparation's, not the whole history's)."""
    detail = f"{examples} examples"
    # A record makes at least one example, so a need of `total` or more is
    # not reached before the records run out: count records then.
    if enough is None or enough >= total:
        return done, total, "preparing data", detail
    return min(examples, enough), enough, "preparing data", detail


def _start_record(request: _Request, prepared: _Prepared) -> None:
    """A new run's config.json and `running` record (the main process; a
    resumed run keeps its own), then the run's one-line description."""
    run, dist, cfg = request.run, request.dist, request.settings.train
    counts = prepared.counts()
    config = {
        "command": command_line(),
        "repo": str(request.repo.resolve()),
        "purpose": request.purpose,
        "developer": request.developer,
        "init_adapter": str(request.init_adapter) if request.init_adapter else None,
        "dataset_dir": str(request.dataset_dir),
        "val_limit": request.val_limit,
        "precision": request.precision,
        "device": prepared.plan.description,
        "augment_share": AUGMENT_SHARE,
        "kind_weights": prepared.weights,
        "settings": json.loads(request.settings.model_dump_json()),
    }
    if dist.is_main and not request.resume:
        manifest = prepared.dataset.manifest
        run.root.mkdir(parents=True, exist_ok=True)
        run.write_config(config)
        run.write_record(
            {
                "run_id": run.run_id,
                "status": STATUS_RUNNING,
                "purpose": request.purpose,
                "developer": request.developer,
                "repo": str(request.repo.resolve()),
                "base": prepared.identity.as_dict(),
                "init_adapter": config["init_adapter"],
                "dataset": {
                    "dir": str(request.dataset_dir),
                    "manifest_sha256": prepared.dataset.manifest_sha256,
                    "head": manifest.get("head"),
                    "cutoff": manifest.get("cutoff"),
                    "train_examples": counts,
                    "train_records": len(prepared.train_records),
                    "validation_examples": len(prepared.val),
                    "validation_source": prepared.val_source,
                    "pretrain_windows": len(prepared.pretrain),
                    "selection_instances": len(prepared.select),
                    "measure_instances": len(prepared.measure),
                    "final_pass_examples": len(prepared.final),
                },
                "selection": "held-out exact match, ties by validation loss"
                if prepared.select
                else "validation loss",
                "budget_seconds": request.budget.seconds,
                "seed": cfg.seed,
                "prompt_format": prepared.prompt_format,
                "prompt": prepared.prompt,
                "device": prepared.plan.description,
                "versions": library_versions(),
                "started_at": time.time(),
            }
        )
    dist.wait()
    request.say(
        f"run {run.run_id}: {len(prepared.examples)} training examples "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + f"; {len(prepared.val)} validation ({prepared.val_source}); "
        + prepared.plan.description
    )


def _build_loop(request: _Request, prepared: _Prepared) -> Loop:
    """The model with its LoRA, the optimizer (and loss scaler), and, when
    resuming, everything the last checkpoint restores."""
    import torch

    from shoptalk.trainer.train_model import (
        AnswerLoss,
        apply_lora,
        load_causal_lm,
        trainable_parameters,
    )

    cfg, run, dist, plan = request.settings.train, request.run, request.dist, prepared.plan
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    # Under FSDP the base is read into CPU memory and only each process's
    # shard moves to its device.
    model = load_causal_lm(
        prepared.base_path, replace(plan, device=torch.device("cpu")) if dist.sharded else plan
    )
    model = apply_lora(model, cfg, prepared.base.architecture, request.init_adapter, plan.device)
    model.train()
    loss_module: Any = dist.shard_model(AnswerLoss(model.get_base_model()), plan)
    params = trainable_parameters(model)
    optimizer: Any = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cuda") if plan.grad_scaler else None
    if dist.accelerator is not None and not dist.sharded:
        loss_module, optimizer = dist.accelerator.prepare(loss_module, optimizer)
    tokenizer = prepared.tokenizer
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    state = TrainState()
    losses: list[LossRow] = []
    best: dict[str, torch.Tensor] | None = None
    if request.resume:
        state, best, losses = load_checkpoint(run, model, optimizer, scaler)
        request.say(f"resumed at {state.phase} step {state.step or state.pretrain_steps}")
        record = run.read_record()
        record["status"] = STATUS_RUNNING
        record.pop("error", None)
        record.setdefault("resumed", []).append({"at": time.time(), "step": state.step})
        if dist.is_main:
            run.write_record(record)
    return Loop(
        model=model,
        loss_module=loss_module,
        optimizer=optimizer,
        scaler=scaler,
        plan=plan,
        pad_id=int(pad_id),
        batch_size=cfg.batch_size,
        run=run,
        dist=dist,
        state=state,
        losses=losses,
        val=prepared.val,
        best=best,
        report=request.say,
        show_progress=request.show_progress and dist.is_main,
        held_out_em=_em_scorer(prepared.select),
    )


def _em_scorer(select: list[Example]) -> Callable[[Loop], float] | None:
    """Exact match (percent) of the selection subset under the weights now."""
    if not select:
        return None
    from shoptalk.trainer.heldout_em import exact_matches, percent

    def score(loop: Loop) -> float:
        with loop.dist.whole(loop.loss_module):
            return percent(
                exact_matches(loop.loss_module, select, loop.pad_id, loop.plan, loop.batch_size)
            )

    return score


def _fit(request: _Request, loop: Loop, prepared: _Prepared) -> float | None:
    """Phase 1 (if any), the start's validation loss and exact match, phase 2
    (within the command's budget), then the best weights kept and
    checkpointed; returns their validation loss. Ctrl-C saves a checkpoint
    and raises `TrainInterrupted`."""
    run, state = request.run, loop.state
    with StopRequest(request.say) as stop:
        try:
            eval_seconds = 0.0
            if state.phase == PHASE_PRETRAIN:
                if prepared.pretrain:
                    if state.base_val_loss is None and loop.val:
                        eval_seconds = _validate_start(loop, request.say)
                    run_phase(loop, PHASE_PRETRAIN, prepared.pretrain, _pretraining(request), stop)
                    if state.pretrain_val_loss is None and loop.val:
                        eval_seconds = _validate_pretrained(loop, request.say)
                state.phase = PHASE_SFT
            if state.base_val_loss is None and loop.val:
                eval_seconds = _validate_start(loop, request.say)
            reason = _fine_tune(request, loop, prepared, stop, eval_seconds)
        except KeyboardInterrupt:
            state.stop_reason = "interrupted"
            checkpoint_now(loop)
            if request.dist.is_main:
                record = run.read_record()
                record["status"] = STATUS_INTERRUPTED
                run.write_record(record)
            raise TrainInterrupted(
                f"interrupted at step {state.step}; checkpoint saved in {run.checkpoints_dir}. "
                f"Resume with `shoptalk train --repo {request.repo} --resume --run-id "
                f"{run.run_id}`"
            ) from None
        state.stop_reason = reason
        final_val = _keep_best(loop)
        checkpoint_now(loop)
    return final_val


def _pretraining(request: _Request) -> PhaseBudget:
    """Phase 1's budget: its minutes, and never more than a third of what is
    left of the command's."""
    budget = PhaseBudget.pretraining(request.settings.train)
    left = request.budget.left()
    if left is None or budget.max_seconds is None:
        return budget
    return replace(budget, max_seconds=min(budget.max_seconds, left / 3))


def _fine_tune(
    request: _Request, loop: Loop, prepared: _Prepared, stop: StopRequest, eval_seconds: float
) -> str:
    """Phase 2. Under `--max-minutes` it ends when the time set aside for the
    rest (final validation, measurement, final pass, saving) is reached:
    the loop's clock counts training steps only, so it runs in slices, each
    given what is left of the wall clock, under one bar."""
    budget = PhaseBudget.fine_tuning(request.settings.train)
    left = request.budget.left()
    if left is None:
        return run_phase(loop, PHASE_SFT, prepared.examples, budget, stop)
    per_example = eval_seconds / max(1, len(loop.val) + len(prepared.select))
    reserve = (
        eval_seconds
        + per_example * (2 * len(prepared.measure) + 2 * min(FINAL_PROBE, len(prepared.final)))
        + SAVE_SECONDS
    )
    final_share = min(
        0.25, len(prepared.final) / max(1, len(prepared.final) + len(prepared.examples))
    )
    started = time.perf_counter()
    end = started + fine_tuning_seconds(left, reserve, final_share)
    shown = _SlicedBar(loop.report, started, end)
    loop.report = shown
    reason = "time budget reached"
    try:
        while (wall := end - time.perf_counter()) > max(1.0, 0.01 * (end - started)):
            sliced = replace(budget, max_seconds=loop.state.train_seconds + wall * 0.8)
            reason = run_phase(loop, PHASE_SFT, prepared.examples, sliced, stop)
            if reason != "time budget reached":
                break
    finally:
        loop.report = shown.report
        shown.close()
    return reason


class _SlicedBar:
    """The bar of a phase run in slices: one bar from the phase's start to
    its planned end (by the wall clock, so the ETA is the phase's), ended
    once, at the end of the last slice."""

    def __init__(self, report: Report, started: float, end: float) -> None:
        self.report, self.started, self.end = report, started, end
        self.last: Progress | None = None

    def __call__(self, event: str | Progress) -> None:
        if not isinstance(event, Progress):
            self.report(event)
            return
        total = max(1.0, self.end - self.started)
        done = min(total, time.perf_counter() - self.started)
        self.last = Progress(round(done, 1), round(total, 1), event.label, event.detail)
        self.report(self.last)

    def close(self) -> None:
        if self.last is not None:
            last = self.last
            self.report(Progress(last.done, last.total, last.label, last.detail, final=True))


def _validate_start(loop: Loop, say: Report) -> float:
    """The start point: the validation loss (and held-out exact match) of the
    base (or the initial adapter) before fine-tuning, the best so far;
    returns the seconds it took (what each later evaluation costs)."""
    started = time.perf_counter()
    state = loop.state
    scored = " and held-out exact match" if loop.held_out_em is not None else ""
    say(f"measuring the start point: validation loss on {len(loop.val)} sequences{scored}")
    state.base_val_loss, state.base_val_em = _evaluate_now(loop)
    if state.best_val_loss is None:
        record_evaluation(state, state.base_val_loss, state.base_val_em, trained=False)
        loop.best = trainable_state(loop.model)
    loop.losses.append(
        LossRow(PHASE_SFT, state.step, state.tokens, 0.0, 0.0, None, state.base_val_loss)
    )
    em = "" if state.base_val_em is None else f", held-out exact match {state.base_val_em:.1f}%"
    say(f"validation loss at the start (before any training): {state.base_val_loss:.4f}{em}")
    return time.perf_counter() - started


def _evaluate_now(loop: Loop) -> tuple[float, float | None]:
    """The current weights' validation loss and held-out exact match (in
    that order: under FSDP the loss's forward initializes the sharded root
    that the exact-match pass then reuses)."""
    loss = validation_loss(loop)
    return loss, loop.held_out_em(loop) if loop.held_out_em is not None else None


def _validate_pretrained(loop: Loop, say: Report) -> float:
    """Phase 1's end point, measured like a fine-tuning step (kept when it
    beats the base); returns the seconds it took."""
    started = time.perf_counter()
    state = loop.state
    state.pretrain_val_loss, state.pretrain_val_em = _evaluate_now(loop)
    if record_evaluation(state, state.pretrain_val_loss, state.pretrain_val_em):
        loop.best = trainable_state(loop.model)
    em = (
        ""
        if state.pretrain_val_em is None
        else f", held-out exact match {state.pretrain_val_em:.1f}%"
    )
    say(f"validation loss after phase 1: {state.pretrain_val_loss:.4f}{em}")
    return time.perf_counter() - started


def _keep_best(loop: Loop) -> float | None:
    """Final evaluation of the current weights (unless the loop evaluated
    this very step), then the best ones loaded; returns their validation
    loss (None without validation)."""
    state = loop.state
    if not loop.val:
        return None
    evaluated = bool(state.evaluations) and state.evaluations[-1]["step"] == state.step
    if not evaluated:
        current = validation_loss(loop)
        em = loop.held_out_em(loop) if loop.held_out_em is not None else None
        if record_evaluation(state, current, em):
            loop.best = trainable_state(loop.model)
        loop.losses.append(
            LossRow(PHASE_SFT, state.step, state.tokens, state.train_seconds, 0.0, None, current)
        )
    if loop.best is None:
        return state.best_val_loss
    # The best weights were validated when they were kept: their loss is
    # known, no second pass over the validation set.
    load_trainable(loop.model, loop.best)
    return state.best_val_loss


def _measure_and_serve(request: _Request, loop: Loop, prepared: _Prepared) -> dict[str, Any]:
    """The chosen checkpoint measured against the base on the newest
    test-window completions, then (with `train.final_pass`, when the run
    gained on validation) written aside and trained once over the held-out
    windows, so that the served adapter knows the newest code. Returns the
    record's `measured` and `served` parts."""
    state, run = loop.state, loop.run
    measured: dict[str, Any] = {
        "step": state.best_step,
        "val_loss": state.best_val_loss,
        "val_em": state.best_val_em,
        "adapter": str(run.adapter_dir),
    }
    if prepared.measure and not state.best_trained and request.init_adapter is None:
        # The kept weights are the base's: nothing to tell apart.
        request.say("not measured on the test window: the run kept the base (no gain)")
    elif prepared.measure:
        difference = _measure(request, loop, prepared.measure)
        if difference is not None:
            measured["test_window"] = difference.as_dict()
            request.say("measured checkpoint: " + difference.text())
    served: dict[str, Any] = {"adapter": str(run.adapter_dir), "final_pass": None}
    if not prepared.final:
        return {"measured": measured, "served": served}
    if not state.best_trained:
        request.say("final pass skipped: the run kept its start (no gain); the start is served")
        return {"measured": measured, "served": served}
    weights = trainable_state(loop.model)  # every process: gathered under FSDP
    if request.dist.is_main:
        measured["adapter"] = str(
            _write_adapter(loop, prepared.base_path, weights, run.measured_adapter_dir)
        )
    served["final_pass"] = _final_pass(request, loop, prepared)
    return {"measured": measured, "served": served}


def _measure(request: _Request, loop: Loop, examples: list[Example]) -> EmDifference | None:
    """Paired greedy exact match of the weights now and of the base (the
    adapter switched off) on `examples`, in chunks under a bar; with
    `--max-minutes`, on as many as the time set aside allows."""
    from shoptalk.trainer.em_difference import paired_difference
    from shoptalk.trainer.heldout_em import exact_matches

    ours: list[bool] = []
    base: list[bool] = []
    label, total = "measuring on the test window", len(examples)
    chunk = max(1, loop.batch_size) * 4
    for start in range(0, total, chunk):
        if request.budget.spent(SAVE_SECONDS + _final_reserve(request)) and start:
            request.say(f"measurement cut by --max-minutes at {start} of {total} instances")
            break
        part = examples[start : start + chunk]
        with loop.dist.whole(loop.loss_module):
            ours += exact_matches(loop.loss_module, part, loop.pad_id, loop.plan, loop.batch_size)
            with loop.model.disable_adapter():
                base += exact_matches(
                    loop.loss_module, part, loop.pad_id, loop.plan, loop.batch_size
                )
        request.bar(len(ours), total, label, f"{sum(ours)} vs base {sum(base)} exact")
    request.bar(len(ours), total, label, f"{sum(ours)} vs base {sum(base)} exact", final=True)
    if not ours:
        return None
    return paired_difference(ours, base, ("this run", "base"))


def _final_reserve(request: _Request) -> float:
    """Seconds the final pass keeps for itself while measuring (a tenth of
    the budget when it runs; 0 without a budget)."""
    seconds = request.budget.seconds
    if seconds is None or not request.settings.train.final_pass:
        return 0.0
    return seconds * 0.1


def _final_pass(request: _Request, loop: Loop, prepared: _Prepared) -> dict[str, Any]:
    """One pass over the held-out windows (validation + test) from the chosen
    weights, within what is left of the budget; returns what it did and the
    loss of the newest test-window completions before and after."""
    from shoptalk.trainer.train_data import BatchSchedule
    from shoptalk.trainer.train_model import mean_loss

    cfg, state = request.settings.train, loop.state
    probe = (prepared.measure or prepared.final)[:FINAL_PROBE]
    module = getattr(loop.loss_module, "module", loop.loss_module)
    probe_started = time.perf_counter()
    before = mean_loss(module, probe, loop.pad_id, loop.plan, max(1, loop.batch_size))
    probe_seconds = time.perf_counter() - probe_started
    schedule = BatchSchedule(prepared.final, loop.batch_size, cfg.grad_accum, cfg.seed, False)
    planned = schedule.steps_per_epoch
    getattr(loop.optimizer, "optimizer", loop.optimizer).state.clear()  # a fresh start
    reason, label, detail = "one pass over the held-out windows", "final pass", ""
    started = time.perf_counter()
    for step in range(planned):
        if request.budget.spent(probe_seconds + SAVE_SECONDS):
            reason = f"time budget reached after {step} of {planned} steps"
            break
        micro = schedule.step(step)
        answer_total = sum(e.answer_tokens for mb in micro for e in mb)
        for group in loop.optimizer.param_groups:
            group["lr"] = cfg.learning_rate * lr_factor(step, planned)
        step_loss, _tokens = optimizer_step(loop, micro, answer_total)
        state.final_steps += 1
        detail = f"step {step + 1}/{planned} loss {step_loss / max(1, answer_total):.3f}"
        request.bar(step + 1, planned, label, detail)
    state.final_seconds = time.perf_counter() - started
    request.bar(state.final_steps, planned, label, detail or "no step", final=True)
    after = mean_loss(module, probe, loop.pad_id, loop.plan, max(1, loop.batch_size))
    request.say(
        f"final pass over the held-out windows: {state.final_steps} steps; loss of the newest "
        f"{len(probe)} held-out instances {before:.3f} → {after:.3f}"
    )
    return {
        "examples": len(prepared.final),
        "steps": state.final_steps,
        "planned_steps": planned,
        "seconds": round(state.final_seconds, 2),
        "stop_reason": reason,
        "probe": {"instances": len(probe), "loss_before": before, "loss_after": after},
    }


def _finish(
    loop: Loop,
    base_path: str,
    final_val: float | None,
    request: _Request,
    served: dict[str, Any],
) -> TrainResult:
    """The served adapter written atomically, the record completed (only then
    does it say `complete`; a run that kept its start says so), the
    checkpoints removed; returns the result."""
    run, dist, state = loop.run, loop.dist, loop.state
    adapter: Path | None = None
    wall = time.perf_counter() - request.wall_started
    outcome = STATUS_COMPLETE if state.best_trained else OUTCOME_NO_GAIN
    record = run.read_record() if dist.is_main else {}
    weights = trainable_state(loop.model)  # every process: gathered under FSDP
    if dist.is_main:
        try:
            adapter = _write_adapter(loop, base_path, weights)
        except Exception as exc:
            raise _finishing_error(run, exc) from None
        seconds = state.train_seconds + state.pretrain_seconds
        record.update(progress_fields(state))
        record.update(
            {
                "status": STATUS_COMPLETE,
                "outcome": outcome,
                **served,
                "stop_reason": state.stop_reason,
                "final_val_loss": final_val,
                "adapter": str(adapter),
                "wall_seconds": round(wall, 2),
                "finished_at": time.time(),
                "throughput": {
                    "tokens_per_second": round(state.tokens / seconds, 2) if seconds else None,
                    "answer_tokens_per_second": round(state.answer_tokens / seconds, 2)
                    if seconds
                    else None,
                    "seconds_per_step": round(
                        seconds / max(1, state.step + state.pretrain_steps), 3
                    ),
                },
            }
        )
        try:
            run.write_losses(loop.losses)
            run.write_record(record)
        except OSError as exc:
            raise _finishing_error(run, exc) from None
        shutil.rmtree(run.checkpoints_dir, ignore_errors=True)
    dist.wait()
    seconds = state.train_seconds + state.pretrain_seconds
    return TrainResult(
        run_id=run.run_id,
        run_dir=run.root,
        adapter_dir=adapter,
        status=STATUS_COMPLETE,
        stop_reason=state.stop_reason,
        steps=state.step,
        tokens=state.tokens,
        wall_seconds=wall,
        tokens_per_second=state.tokens / seconds if seconds else 0.0,
        base_val_loss=state.base_val_loss,
        best_val_loss=state.best_val_loss,
        final_val_loss=final_val,
        record=record,
        outcome=outcome,
    )


def _finishing_error(run: RunFolder, exc: Exception) -> Exception:
    """The message for a failed write of the finished adapter or its record
    (`exc` itself when it is not a failed write)."""
    reason = write_failure(exc)
    if reason is None:
        return exc
    return TrainError(
        f"could not write the finished adapter to {run.adapter_dir}: {reason}. Nothing is "
        f"lost: the trained weights are in the last checkpoint in {run.checkpoints_dir}. "
        f"Free some space and finish with {resume_command(run)}"
    )


def _write_adapter(
    loop: Loop, base_path: str, weights: dict[str, Any], target: Path | None = None
) -> Path:
    """Save the adapter's whole `weights` (`trainable_state`, gathered by
    every process) to `adapter/` unless `target` says otherwise, as a
    standard PEFT folder, atomically, and check it reads back to the same
    tensors."""
    import torch
    from safetensors.torch import load_file

    target = target or loop.run.adapter_dir
    model = loop.model
    with atomic_dir(target) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True, state_dict=weights)
        config_file = tmp / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = base_path
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
        saved = load_file(str(tmp / "adapter_model.safetensors"))
        from peft import get_peft_model_state_dict

        expected = get_peft_model_state_dict(model, state_dict=weights)
        if set(saved) != set(expected) or any(
            not torch.equal(saved[k].cpu(), expected[k].detach().cpu()) for k in expected
        ):
            raise TrainError(
                f"the adapter written to {tmp} does not read back as trained; the disk may be "
                "failing — check it and run training again"
            )
    return target


def summary_table(result: TrainResult) -> Any:
    from rich.table import Table

    from shoptalk.models.tables import whole_cells

    table = Table(title=f"training run {result.run_id}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("status", f"{result.outcome} ({result.stop_reason})")
    table.add_row("steps", str(result.steps))
    table.add_row("input tokens", f"{result.tokens:,}")
    table.add_row("throughput", f"{result.tokens_per_second:.0f} tokens/s")
    pretrained = result.record.get("pretrain_val_loss")
    phase1 = f" → {fmt_loss(pretrained)} after phase 1" if pretrained is not None else ""
    table.add_row(
        "validation loss",
        f"{fmt_loss(result.base_val_loss)} before{phase1} → {fmt_loss(result.best_val_loss)} best",
    )
    for name, value in _selection_rows(result.record):
        table.add_row(name, value)
    table.add_row("wall time", f"{result.wall_seconds / 60:.1f} min")
    table.add_row("adapter", str(result.adapter_dir))
    table.add_row("loss curve", str(result.run_dir / "loss.png"))
    return whole_cells(table)  # paths fold, never cut with "…"


def _selection_rows(record: dict[str, Any]) -> list[tuple[str, str]]:
    """The summary's rows on the checkpoint chosen, its measurement and the
    adapter served."""
    from shoptalk.trainer.em_difference import EmDifference

    measured = record.get("measured") or {}
    rows: list[tuple[str, str]] = []
    if record.get("base_val_em") is not None:
        rows.append(
            (
                "held-out exact match",
                f"{record['base_val_em']:.1f}% before → {measured.get('val_em') or 0:.1f}% "
                f"chosen (step {measured.get('step')}, {record.get('selection')})",
            )
        )
    if measured.get("test_window"):
        rows.append(("measured", EmDifference.from_dict(measured["test_window"]).text()))
    final = (record.get("served") or {}).get("final_pass")
    if final:
        probe = final["probe"]
        rows.append(
            (
                "served",
                f"measured checkpoint + final pass over the held-out windows ({final['steps']} "
                f"steps; newest held-out loss {probe['loss_before']:.3f} → "
                f"{probe['loss_after']:.3f}); measured adapter in {measured.get('adapter')}",
            )
        )
    return rows
