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
import shlex
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from shoptalk.models.catalog import BaseModel, resolve_base
from shoptalk.models.errors import ShopTalkError
from shoptalk.models.files import atomic_dir, write_failure, write_json_atomic
from shoptalk.models.module_map import language_for
from shoptalk.models.progress import Progress, Report, quiet, to_log
from shoptalk.models.settings import Settings, TrainSettings
from shoptalk.models.store import RepoStore
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

if TYPE_CHECKING:
    import torch

    from shoptalk.trainer.formats import Example, SequenceBuilder
    from shoptalk.trainer.train_model import DevicePlan

log = logging.getLogger(__name__)

# Share of completion instances that get a second copy with the cursor moved
# inside the target (inside a word, after a space).
AUGMENT_SHARE = 0.5
# Validation instances scored at each evaluation (the newest mined split).
DEFAULT_VAL_LIMIT = 64
# When the dataset has no validation split, this share of train is held out.
FALLBACK_VAL_SHARE = 0.05
KEEP_CHECKPOINTS = 2
MAX_GRAD_NORM = 1.0
PHASE_PRETRAIN = "pretrain"
PHASE_SFT = "sft"
# Phase 1 reads source files up to this size at the cutoff commit.
PRETRAIN_MAX_FILE_BYTES = 200_000
# What the report gets when Ctrl-C (or SIGTERM) asks training to stop.
STOP_MESSAGE = "stopping after this step: saving a checkpoint…"


class TrainError(ShopTalkError):
    pass


class TrainInterrupted(ShopTalkError):
    exit_code = 130


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


@dataclass
class _State:
    """What a checkpoint restores (besides weights and optimizer)."""

    phase: str = PHASE_PRETRAIN
    step: int = 0
    pretrain_steps: int = 0
    tokens: int = 0
    answer_tokens: int = 0
    train_seconds: float = 0.0
    pretrain_seconds: float = 0.0
    base_val_loss: float | None = None
    best_val_loss: float | None = None
    best_step: int = 0
    bad_evals: int = 0
    stop_reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Distributed:
    """Rank and world size under `accelerate launch`; one process otherwise."""

    accelerator: Any = None
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wait(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()


def _distributed() -> _Distributed:
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return _Distributed()
    from accelerate import Accelerator

    accelerator = Accelerator()
    return _Distributed(accelerator, accelerator.process_index, accelerator.num_processes)


# ---- data ----------------------------------------------------------------------------


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


# ---- schedule -------------------------------------------------------------------------


def lr_factor(step: int, planned: int | None) -> float:
    """Linear warm-up, then cosine decay to 10% over `planned` steps (constant
    when the run is bounded only by time)."""
    warmup = min(20, max(1, (planned or 400) // 20))
    if step < warmup:
        return (step + 1) / warmup
    if planned is None or planned <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, planned - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---- checkpoints -----------------------------------------------------------------------


def _trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {
        name: p.detach().to("cpu", copy=True).contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def _load_trainable(model: Any, state: dict[str, torch.Tensor]) -> None:
    import torch

    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise TrainError(
            f"the checkpoint does not fit this model ({len(missing)} unknown tensors, e.g. "
            f"{missing[0]}): it was made with other LoRA settings; start a new run"
        )
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def save_checkpoint(
    run: RunFolder,
    model: Any,
    optimizer: Any,
    scaler: Any,
    state: _State,
    best: dict[str, torch.Tensor] | None,
    losses: list[LossRow],
) -> Path:
    """Write `checkpoints/step-N/` completely, then point `latest.json` at it.
    A failure (disk full) leaves the previous checkpoint as latest."""
    import torch
    from safetensors.torch import save_file

    name = (
        f"{state.phase}-{state.pretrain_steps if state.phase == PHASE_PRETRAIN else state.step:06d}"
    )
    final = run.checkpoints_dir / name
    with atomic_dir(final) as tmp:
        save_file(_trainable_state(model), str(tmp / "adapter.safetensors"))
        if best is not None:
            save_file(best, str(tmp / "best.safetensors"))
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "torch_rng": torch.get_rng_state(),
                "python_rng": random.getstate(),
            },
            tmp / "optimizer.pt",
        )
        write_json_atomic(tmp / "state.json", state.as_dict())
        write_json_atomic(tmp / "losses.json", [r.__dict__ for r in losses])
    write_json_atomic(run.latest_file, {"checkpoint": name, **state.as_dict()})
    for old in sorted(p for p in run.checkpoints_dir.iterdir() if p.is_dir())[:-KEEP_CHECKPOINTS]:
        if old.name != name and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
    return final


def _latest_name(run: RunFolder) -> str | None:
    try:
        return str(json.loads(run.latest_file.read_text())["checkpoint"])
    except (OSError, ValueError, KeyError):
        return None


def load_checkpoint(
    run: RunFolder, model: Any, optimizer: Any, scaler: Any
) -> tuple[_State, dict[str, torch.Tensor] | None, list[LossRow]]:
    import torch
    from safetensors.torch import load_file

    name = _latest_name(run)
    folder = run.checkpoints_dir / name if name else None
    if folder is None or not (folder / "state.json").is_file():
        raise TrainError(
            f"run {run.run_id} has no complete checkpoint to resume from; start a new run "
            "(without --resume)"
        )
    _load_trainable(model, load_file(str(folder / "adapter.safetensors")))
    best_file = folder / "best.safetensors"
    best = load_file(str(best_file)) if best_file.is_file() else None
    extra = torch.load(folder / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(extra["optimizer"])
    if scaler is not None and extra.get("scaler"):
        scaler.load_state_dict(extra["scaler"])
    torch.set_rng_state(extra["torch_rng"])
    random.setstate(extra["python_rng"])
    state = _State(**json.loads((folder / "state.json").read_text()))
    losses = [LossRow.from_dict(r) for r in json.loads((folder / "losses.json").read_text())]
    return state, best, losses


def find_resumable(store: RepoStore, run_id: str | None) -> RunFolder:
    if run_id is not None:
        run = RunFolder(store.run_dir(run_id))
        if not run.record_file.is_file():
            raise TrainError(f"no run {run_id!r} in {store.runs_dir}; see `ls {store.runs_dir}`")
        if run.read_record().get("status") == STATUS_COMPLETE:
            raise TrainError(f"run {run_id} is already complete; nothing to resume")
        return run
    candidates = []
    if store.runs_dir.is_dir():
        for folder in store.runs_dir.iterdir():
            run = RunFolder(folder)
            status = run.read_record().get("status")
            if (
                status in (STATUS_RUNNING, STATUS_INTERRUPTED, STATUS_FAILED)
                and run.latest_file.is_file()
            ):
                candidates.append((run.latest_file.stat().st_mtime, run.run_id, run))
    if not candidates:
        raise TrainError(
            f"no unfinished run with a checkpoint in {store.runs_dir}; start a new run "
            "(without --resume)"
        )
    return max(candidates)[2]


# ---- training --------------------------------------------------------------------------


class _StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current
    step, save, and exit cleanly; a second Ctrl-C interrupts at once."""

    def __init__(self, report: Report = quiet) -> None:
        self.report = report
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.report(STOP_MESSAGE)

    def __enter__(self) -> _StopRequest:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class _Loop:
    """The pieces one phase of training runs with."""

    model: Any
    loss_module: Any
    optimizer: Any
    scaler: Any
    plan: DevicePlan
    pad_id: int
    batch_size: int
    run: RunFolder
    dist: _Distributed
    state: _State
    losses: list[LossRow]
    val: list[Example]
    best: dict[str, torch.Tensor] | None = None
    report: Report = quiet  # a bar's events go here only with show_progress
    show_progress: bool = True


def _validate(loop: _Loop) -> float:
    from shoptalk.trainer.train_model import mean_loss

    return mean_loss(loop.loss_module, loop.val, loop.pad_id, loop.plan, max(1, loop.batch_size))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@dataclass(frozen=True)
class PhaseBudget:
    """What one phase of training may spend and how it steps: a step budget
    and/or a time budget (neither: one pass over the data), validation and
    checkpoint cadence, early-stopping patience (0: never), the schedule."""

    learning_rate: float
    grad_accum: int
    seed: int
    max_steps: int | None = None
    max_seconds: float | None = None
    val_every: int = 50
    patience: int = 0
    ordered: bool = False  # keep the examples' order in the first pass

    @classmethod
    def pretraining(cls, cfg: TrainSettings) -> PhaseBudget:
        return cls(
            cfg.learning_rate,
            cfg.grad_accum,
            cfg.seed,
            max_seconds=cfg.pretrain_minutes * 60,
            val_every=cfg.val_every,
        )

    @classmethod
    def fine_tuning(cls, cfg: TrainSettings) -> PhaseBudget:
        return cls(
            cfg.learning_rate,
            cfg.grad_accum,
            cfg.seed,
            max_steps=cfg.max_steps,
            max_seconds=cfg.max_minutes * 60 if cfg.max_minutes else None,
            val_every=cfg.val_every,
            patience=cfg.patience,
            ordered=cfg.recent_first,
        )


def _optimizer_step(
    loop: _Loop, micro: list[list[Example]], answer_total: int
) -> tuple[float, int]:
    """Forward and backward over this process's micro-batches, then one
    optimizer step; returns the summed loss and the tokens seen."""
    import torch

    from shoptalk.trainer.train_model import batch_loss, collate

    mine = [mb for k, mb in enumerate(micro) if k % loop.dist.world == loop.dist.rank]
    step_loss = 0.0
    step_tokens = 0
    for mb in mine:
        batch = collate(mb, loop.pad_id, loop.plan.device)
        loss = batch_loss(loop.loss_module, batch, loop.plan)
        # DDP averages gradients over processes; scale back to a sum.
        scaled = loss * (loop.dist.world / max(1, answer_total))
        if loop.scaler is not None:
            loop.scaler.scale(scaled).backward()
        elif loop.dist.accelerator is not None:
            loop.dist.accelerator.backward(scaled)
        else:
            scaled.backward()
        step_loss += float(loss.detach())
        step_tokens += batch.tokens
    if loop.scaler is not None:
        loop.scaler.unscale_(loop.optimizer)
    params = [p for g in loop.optimizer.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    if loop.scaler is not None:
        loop.scaler.step(loop.optimizer)
        loop.scaler.update()
    else:
        loop.optimizer.step()
    loop.optimizer.zero_grad(set_to_none=True)
    return step_loss, step_tokens


def _validate_step(loop: _Loop) -> float:
    """Validation loss now; keeps the weights when they are the best yet."""
    state = loop.state
    val_loss = _validate(loop)
    if state.best_val_loss is None or val_loss < state.best_val_loss:
        state.best_val_loss, state.best_step, state.bad_evals = val_loss, state.step, 0
        loop.best = _trainable_state(loop.model)
    else:
        state.bad_evals += 1
    return val_loss


def _run_phase(
    loop: _Loop,
    phase: str,
    examples: Sequence[Example],
    budget: PhaseBudget,
    stop: _StopRequest,
) -> str:
    """Train until a budget or early stopping ends the phase; returns why it ended."""
    from shoptalk.trainer.train_data import BatchSchedule
    from shoptalk.trainer.train_model import is_out_of_memory

    state = loop.state
    schedule = BatchSchedule(
        examples, loop.batch_size, budget.grad_accum, budget.seed, budget.ordered
    )
    max_steps, max_seconds = budget.max_steps, budget.max_seconds
    learning_rate, val_every, patience = budget.learning_rate, budget.val_every, budget.patience
    one_epoch = max_steps is None and max_seconds is None
    if one_epoch:
        max_steps = schedule.steps_per_epoch
    planned = max_steps
    is_sft = phase == PHASE_SFT

    def step_of() -> int:
        return state.step if is_sft else state.pretrain_steps

    def seconds_of() -> float:
        return state.train_seconds if is_sft else state.pretrain_seconds

    label = "continued pre-training" if not is_sft else "fine-tuning"
    total = float(max_steps) if max_steps is not None else float(max_seconds or 1)

    def show(steps: str, speed: float, loss: str, final: bool = False) -> None:
        """The phase's bar: how far, and the step, speed, loss and best
        validation loss so far."""
        if not loop.show_progress:
            return
        done = step_of() if max_steps is not None else min(total, seconds_of())
        figures = (steps, f"{speed:.0f} tok/s", f"loss {loss}", f"val {_fmt(state.best_val_loss)}")
        detail = " ".join(figure for figure in figures if figure)
        loop.report(Progress(done, total, label, detail, final))

    last_loss: float | None = None
    reason = ""
    step_text, speed, loss_text = "", 0.0, "-"
    show(step_text, speed, loss_text)
    while True:
        if max_steps is not None and step_of() >= max_steps:
            reason = "one pass over the data done" if one_epoch else "step budget reached"
            break
        if max_seconds is not None and seconds_of() >= max_seconds:
            reason = "time budget reached"
            break
        if stop.requested:
            raise KeyboardInterrupt
        started = time.perf_counter()
        micro = schedule.step(step_of())
        answer_total = sum(e.answer_tokens for mb in micro for e in mb)
        factor = lr_factor(step_of(), planned)
        for group in loop.optimizer.param_groups:
            group["lr"] = learning_rate * factor
        try:
            step_loss, step_tokens = _optimizer_step(loop, micro, answer_total)
        except (RuntimeError, MemoryError) as exc:
            if is_out_of_memory(exc):
                raise TrainError(
                    f"out of memory on {loop.plan.description} at step {step_of()} "
                    f"(micro-batch of {loop.batch_size} × up to "
                    f"{max(len(e) for mb in micro for e in mb)} tokens): lower "
                    "train.batch_size (raise train.grad_accum to keep the step size) or "
                    "train.max_seq_tokens, or set train.layers_from (e.g. 0.5)"
                ) from None
            raise
        elapsed = time.perf_counter() - started
        last_loss = step_loss / max(1, answer_total)
        tokens_all = step_tokens * loop.dist.world
        state.tokens += tokens_all
        state.answer_tokens += answer_total
        if is_sft:
            state.step += 1
            state.train_seconds += elapsed
        else:
            state.pretrain_steps += 1
            state.pretrain_seconds += elapsed
        val_loss: float | None = None
        evaluate = is_sft and loop.val and step_of() % val_every == 0
        if evaluate:
            val_loss = _validate_step(loop)
        loop.losses.append(
            LossRow(
                phase,
                step_of(),
                state.tokens,
                state.train_seconds + state.pretrain_seconds,
                learning_rate * factor,
                last_loss,
                val_loss,
            )
        )
        step_text = f"step {step_of()}" + (f"/{max_steps}" if max_steps else "")
        speed, loss_text = tokens_all / max(elapsed, 1e-9), f"{last_loss:.3f}"
        show(step_text, speed, loss_text)
        if evaluate or step_of() % val_every == 0:
            _checkpoint(loop)
        if evaluate and patience and state.bad_evals >= patience:
            reason = (
                f"early stop: validation loss did not improve for {patience} evaluations "
                f"(best {state.best_val_loss:.4f} at step {state.best_step})"
            )
            break
    show(step_text, speed, loss_text, final=True)
    return reason


def _checkpoint(loop: _Loop) -> None:
    if loop.dist.is_main:
        try:
            save_checkpoint(
                loop.run,
                loop.model,
                loop.optimizer,
                loop.scaler,
                loop.state,
                loop.best,
                loop.losses,
            )
            loop.run.write_losses(loop.losses)
            record = loop.run.read_record()
            record.update(_progress_fields(loop.state))
            loop.run.write_record(record)
        except Exception as exc:
            reason = write_failure(exc)  # None: not a failed write, a bug
            if reason is None:
                raise
            latest = _latest_name(loop.run)
            safe = (
                f"the last complete checkpoint ({latest}) is kept. Free some space and "
                f"resume with {_resume_command(loop.run)}"
                if latest
                else "no checkpoint was complete yet. Free some space and start the run again"
            )
            raise TrainError(
                f"could not write a checkpoint to {loop.run.checkpoints_dir}: {reason}. "
                f"Nothing is lost: the dataset and earlier runs are untouched, and {safe}"
            ) from None
    loop.dist.wait()


def _finishing_error(run: RunFolder, exc: Exception) -> Exception:
    """The message for a failed write of the finished adapter or its record
    (`exc` itself when it is not a failed write)."""
    reason = write_failure(exc)
    if reason is None:
        return exc
    return TrainError(
        f"could not write the finished adapter to {run.adapter_dir}: {reason}. Nothing is "
        f"lost: the trained weights are in the last checkpoint in {run.checkpoints_dir}. "
        f"Free some space and finish with {_resume_command(run)}"
    )


def _resume_command(run: RunFolder) -> str:
    repo = run.read_record().get("repo")
    where = f" --repo {shlex.quote(str(repo))}" if repo else ""
    return f"`shoptalk train{where} --resume --run-id {run.run_id}`"


def _progress_fields(state: _State) -> dict[str, Any]:
    seconds = state.train_seconds + state.pretrain_seconds
    return {
        "steps": state.step,
        "pretrain_steps": state.pretrain_steps,
        "tokens": state.tokens,
        "answer_tokens": state.answer_tokens,
        "train_seconds": round(seconds, 2),
        "tokens_per_second": round(state.tokens / seconds, 2) if seconds else None,
        "base_val_loss": state.base_val_loss,
        "best_val_loss": state.best_val_loss,
        "best_step": state.best_step,
    }


def _write_adapter(loop: _Loop, base_path: str) -> Path:
    """Save the adapter as a standard PEFT folder, atomically, and check it
    reads back to the same tensors."""
    import torch
    from safetensors.torch import load_file

    target = loop.run.adapter_dir
    model = loop.model
    with atomic_dir(target) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        config_file = tmp / "adapter_config.json"
        config = json.loads(config_file.read_text())
        config["base_model_name_or_path"] = base_path
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
        saved = load_file(str(tmp / "adapter_model.safetensors"))
        from peft import get_peft_model_state_dict

        expected = get_peft_model_state_dict(model)
        if set(saved) != set(expected) or any(
            not torch.equal(saved[k].cpu(), expected[k].detach().cpu()) for k in expected
        ):
            raise TrainError(
                f"the adapter written to {tmp} does not read back as trained; the disk may be "
                "failing — check it and run training again"
            )
    return target


# ---- the entry point ---------------------------------------------------------------------


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
    """
    say = report or to_log(log)
    store = RepoStore.for_repo(data_dir, repo)
    dist = _distributed()
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
        run = RunFolder(store.run_dir(run_id or store.new_run_id(purpose)))
        if run.root.exists():
            raise TrainError(f"run {run.run_id} exists already; pick another --run-id")
    wall_started = time.perf_counter()
    try:
        return _train(
            repo,
            settings,
            data_dir,
            store,
            run,
            dist,
            init_adapter=init_adapter,
            resume=resume,
            purpose=purpose,
            developer=developer,
            dataset_dir=dataset_dir or store.dataset_dir,
            val_limit=val_limit,
            precision=precision,
            show_progress=show_progress,
            say=say,
            wall_started=wall_started,
        )
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


def _train(
    repo: Path,
    settings: Settings,
    data_dir: Path,
    store: RepoStore,
    run: RunFolder,
    dist: _Distributed,
    *,
    init_adapter: Path | None,
    resume: bool,
    purpose: str,
    developer: str | None,
    dataset_dir: Path,
    val_limit: int,
    precision: str,
    show_progress: bool,
    say: Report,
    wall_started: float,
) -> TrainResult:
    import torch

    from shoptalk.trainer.formats import SequenceBuilder, build_examples
    from shoptalk.trainer.hf_checkpoint import ensure_hf_checkpoint
    from shoptalk.trainer.replay import replay_records
    from shoptalk.trainer.train_data import (
        check_dataset_base,
        check_enough,
        interleave,
        kind_weights,
        load_dataset,
        newest_first,
        replay_count,
        weighted_records,
    )
    from shoptalk.trainer.train_model import (
        AnswerLoss,
        apply_lora,
        checkpoint_architecture,
        choose_device,
        describe_base,
        load_causal_lm,
        load_tokenizer,
        trainable_parameters,
    )

    cfg = settings.train
    base: BaseModel = resolve_base(cfg.base)
    dataset = load_dataset(dataset_dir, repo)
    weights = kind_weights(cfg.kind_weights)
    base_path = str(ensure_hf_checkpoint(data_dir, base, say))
    if Path(base_path).is_dir():
        checkpoint_architecture(Path(base_path))
    plan = choose_device(cfg.device, cfg.threads, precision)
    tokenizer = load_tokenizer(base_path)
    identity = describe_base(base, base_path, tokenizer)
    check_dataset_base(dataset.manifest, base.key, identity.tokenizer_sha256, dataset_dir)
    prompt_format = _prompt_format(cfg.completion_format, base, init_adapter)
    builder = SequenceBuilder(tokenizer, base.fim, cfg.max_seq_tokens, prompt_format)

    def mine_only(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if developer is None:
            return records
        return [r for r in records if r.get("author_id") == developer]

    all_train = mine_only(dataset.split("train"))
    check_enough(len(all_train), dataset_dir)
    train_records, val_records, val_source = _split_validation(
        all_train, mine_only(dataset.split("validation")), cfg.seed
    )
    chosen = weighted_records(train_records, weights, cfg.seed)
    if cfg.recent_first:
        chosen = newest_first(chosen)
    team = build_examples(chosen, builder, cfg.seed, AUGMENT_SHARE)
    check_enough(len(team), dataset_dir, "training (after tokenizing)")
    mine_cfg = settings.mine
    general = replay_records(
        replay_count(len(team), cfg.replay_share),
        mine_cfg.prefix_chars,
        mine_cfg.suffix_chars,
        cfg.seed,
        cfg.replay_dirs,
    )
    replay = [replace(e, kind="replay") for e in build_examples(general, builder, cfg.seed)]
    examples = interleave(team, replay)
    val = _val_examples(build_examples(val_records, builder, cfg.seed), val_limit, cfg.seed)
    counts: dict[str, int] = {}
    for example in examples:
        counts[example.kind] = counts.get(example.kind, 0) + 1
    pretrain: list[Example] = []
    if cfg.pretrain_minutes > 0:
        pretrain = pretrain_examples(repo, dataset.manifest, builder, cfg.seed)

    config = {
        "command": command_line(),
        "repo": str(repo.resolve()),
        "purpose": purpose,
        "developer": developer,
        "init_adapter": str(init_adapter) if init_adapter else None,
        "dataset_dir": str(dataset_dir),
        "val_limit": val_limit,
        "precision": precision,
        "device": plan.description,
        "augment_share": AUGMENT_SHARE,
        "kind_weights": weights,
        "settings": json.loads(settings.model_dump_json()),
    }
    if dist.is_main and not resume:
        run.root.mkdir(parents=True, exist_ok=True)
        run.write_config(config)
        run.write_record(
            {
                "run_id": run.run_id,
                "status": STATUS_RUNNING,
                "purpose": purpose,
                "developer": developer,
                "repo": str(repo.resolve()),
                "base": identity.as_dict(),
                "init_adapter": config["init_adapter"],
                "dataset": {
                    "dir": str(dataset_dir),
                    "manifest_sha256": dataset.manifest_sha256,
                    "head": dataset.manifest.get("head"),
                    "cutoff": dataset.manifest.get("cutoff"),
                    "train_examples": counts,
                    "train_records": len(train_records),
                    "validation_examples": len(val),
                    "validation_source": val_source,
                    "pretrain_windows": len(pretrain),
                },
                "seed": cfg.seed,
                "prompt_format": prompt_format,
                "device": plan.description,
                "versions": library_versions(),
                "started_at": time.time(),
            }
        )
    dist.wait()
    say(
        f"run {run.run_id}: {len(examples)} training examples "
        + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        + f"; {len(val)} validation ({val_source}); {plan.description}"
    )

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model = load_causal_lm(base_path, plan)
    model = apply_lora(model, cfg, base.architecture, init_adapter, plan.device)
    model.train()
    loss_module: Any = AnswerLoss(model.get_base_model())
    params = trainable_parameters(model)
    optimizer: Any = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    scaler = torch.amp.GradScaler("cuda") if plan.grad_scaler else None
    if dist.accelerator is not None:
        loss_module, optimizer = dist.accelerator.prepare(loss_module, optimizer)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0

    state = _State()
    losses: list[LossRow] = []
    best: dict[str, torch.Tensor] | None = None
    if resume:
        state, best, losses = load_checkpoint(run, model, optimizer, scaler)
        say(f"resumed at {state.phase} step {state.step or state.pretrain_steps}")
        record = run.read_record()
        record["status"] = STATUS_RUNNING
        record.pop("error", None)
        record.setdefault("resumed", []).append({"at": time.time(), "step": state.step})
        if dist.is_main:
            run.write_record(record)
    loop = _Loop(
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
        val=val,
        best=best,
        report=say,
        show_progress=show_progress and dist.is_main,
    )
    with _StopRequest(say) as stop:
        try:
            if state.phase == PHASE_PRETRAIN:
                if pretrain:
                    _run_phase(loop, PHASE_PRETRAIN, pretrain, PhaseBudget.pretraining(cfg), stop)
                state.phase = PHASE_SFT
            if state.base_val_loss is None and val:
                # The start point: the base (or the initial adapter) before SFT.
                state.base_val_loss = _validate(loop)
                if state.best_val_loss is None:
                    state.best_val_loss = state.base_val_loss
                    loop.best = _trainable_state(model)
                loop.losses.append(
                    LossRow(
                        PHASE_SFT, state.step, state.tokens, 0.0, 0.0, None, state.base_val_loss
                    )
                )
                say(f"validation loss before fine-tuning: {state.base_val_loss:.4f}")
            reason = _run_phase(loop, PHASE_SFT, examples, PhaseBudget.fine_tuning(cfg), stop)
        except KeyboardInterrupt:
            state.stop_reason = "interrupted"
            _checkpoint(loop)
            if dist.is_main:
                record = run.read_record()
                record["status"] = STATUS_INTERRUPTED
                run.write_record(record)
            raise TrainInterrupted(
                f"interrupted at step {state.step}; checkpoint saved in {run.checkpoints_dir}. "
                f"Resume with `shoptalk train --repo {repo} --resume --run-id {run.run_id}`"
            ) from None
        state.stop_reason = reason
        # Final validation of the current weights, then keep the best ones.
        final_val: float | None = None
        if val:
            current = _validate(loop)
            if state.best_val_loss is None or current < state.best_val_loss:
                state.best_val_loss, state.best_step = current, state.step
                loop.best = _trainable_state(model)
            loop.losses.append(
                LossRow(
                    PHASE_SFT, state.step, state.tokens, state.train_seconds, 0.0, None, current
                )
            )
            final_val = current
            if loop.best is not None:
                # The best weights were validated when they were kept: their
                # loss is known, no second pass over the validation set.
                _load_trainable(model, loop.best)
                final_val = state.best_val_loss
        _checkpoint(loop)

    return _finish(loop, identity.path, final_val, wall_started)


def _finish(
    loop: _Loop, base_path: str, final_val: float | None, wall_started: float
) -> TrainResult:
    """The best adapter written atomically, the record completed (only then
    does it say `complete`), the checkpoints removed; returns the result."""
    run, dist, state = loop.run, loop.dist, loop.state
    adapter: Path | None = None
    wall = time.perf_counter() - wall_started
    record = run.read_record() if dist.is_main else {}
    if dist.is_main:
        try:
            adapter = _write_adapter(loop, base_path)
        except Exception as exc:
            raise _finishing_error(run, exc) from None
        seconds = state.train_seconds + state.pretrain_seconds
        record.update(_progress_fields(state))
        record.update(
            {
                "status": STATUS_COMPLETE,
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
    )


# ---- CLI -------------------------------------------------------------------------------


def summary_table(result: TrainResult) -> Any:
    from rich.table import Table

    from shoptalk.models.tables import whole_cells

    table = Table(title=f"training run {result.run_id}", show_header=False)
    table.add_column("what")
    table.add_column("value")
    table.add_row("status", f"{result.status} ({result.stop_reason})")
    table.add_row("steps", str(result.steps))
    table.add_row("input tokens", f"{result.tokens:,}")
    table.add_row("throughput", f"{result.tokens_per_second:.0f} tokens/s")
    table.add_row(
        "validation loss",
        f"{_fmt(result.base_val_loss)} before → {_fmt(result.best_val_loss)} best",
    )
    table.add_row("wall time", f"{result.wall_seconds / 60:.1f} min")
    table.add_row("adapter", str(result.adapter_dir))
    table.add_row("loss curve", str(result.run_dir / "loss.png"))
    return whole_cells(table)  # paths fold, never cut with "…"
