"""The training loop of one phase: a typed budget (`PhaseBudget`), the
pieces a phase runs with (`Loop`), one optimizer step over this process's
micro-batches, validation with the best weights kept, a checkpoint at the
validation cadence, and Ctrl-C/SIGTERM turned into a clean stop
(`StopRequest`). Each phase reports a `Progress` (label, step, speed, loss)
for a bar.

Used by the run (`shoptalk.trainer.train`); uses the checkpoints
(`shoptalk.trainer.checkpoints`).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

from shoptalk.models.files import write_failure
from shoptalk.models.progress import Progress, Report, quiet
from shoptalk.models.settings import TrainSettings
from shoptalk.trainer.checkpoints import (
    PHASE_SFT,
    TrainError,
    TrainState,
    latest_checkpoint,
    progress_fields,
    record_evaluation,
    resume_command,
    save_checkpoint,
    trainable_state,
)
from shoptalk.trainer.run_record import LossRow, RunFolder
from shoptalk.trainer.sharding import ShardPlan, shard_module, shard_plan, whole_optimizer_state

if TYPE_CHECKING:
    import torch

    from shoptalk.trainer.formats import Example
    from shoptalk.trainer.train_model import DevicePlan

T = TypeVar("T")

MAX_GRAD_NORM = 1.0
# What the report gets when Ctrl-C (or SIGTERM) asks training to stop.
STOP_MESSAGE = "stopping after this step: saving a checkpoint…"


@dataclass
class Distributed:
    """Rank and world size under `accelerate launch`; one process otherwise.

    Every process runs the same steps on its share of each step's
    micro-batches; the decisions that end a phase (budgets, Ctrl-C) and the
    figures that are reported are agreed through collectives, so no process
    waits in a collective that another one skipped. Only the main process
    writes (checkpoints, the record, the adapter) and reports. Under FSDP
    (`shard` set) the model is sharded instead of copied, and every forward
    pass is a collective: all processes run the same ones."""

    accelerator: Any = None
    rank: int = 0
    world: int = 1
    shard: ShardPlan | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.shard is not None

    def shard_model(self, module: Any, plan: DevicePlan) -> Any:
        """Under FSDP, the loss module sharded over the processes on the
        plan's device (make the optimizer afterwards: the parameters are new
        objects); otherwise `module` as it is (DDP wraps it later)."""
        if self.shard is None:
            return module
        if plan.grad_scaler:
            raise TrainError(
                f"FSDP on {plan.description}: ShopTalk trains fp16 GPUs with its own loss "
                "scaler, which does not work on sharded gradients; use GPUs with bf16 "
                "(Ampere or newer) or DDP (docs/accelerate/ddp-gpus.yaml)"
            )
        return shard_module(module, self.shard, plan.device, self.world)

    def eval_share(self, items: Sequence[T]) -> list[T]:
        """What this process scores of `items`: its share, or all of them
        under FSDP (the same forward passes in every process)."""
        return list(items) if self.sharded else self.share(items)

    def whole(self, module: Any) -> contextlib.AbstractContextManager[Any]:
        """The root unit's weights gathered, for code that calls the loss
        module's parts (decoder, output layer) rather than the module."""
        if self.shard is None:
            return contextlib.nullcontext()
        return _unsharded(module)

    def wait(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's share of `items` (every world-th, from its rank)."""
        return list(items[self.rank :: self.world])

    def total(self, *values: float) -> list[float]:
        """Each value summed over the processes."""
        if self.accelerator is None:
            return list(values)
        import torch

        summed = self.accelerator.reduce(torch.tensor(values, dtype=torch.float64), "sum")
        return [float(v) for v in summed]

    def any(self, *flags: bool) -> list[bool]:
        """Each flag, true when it is true in any process."""
        return [v > 0 for v in self.total(*(float(f) for f in flags))]

    def agree(self, value: T) -> T:
        """The main process's `value`, in every process."""
        if self.accelerator is None:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def sync_after(self, module: Any, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Gradients are averaged over the processes after the last
        micro-batch of a step only (the others accumulate locally)."""
        if self.shard is not None:
            module.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if self.accelerator is None or last:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(module)

    def unwrap(self, module: Any) -> Any:
        """The module without its DDP wrapper (validation needs no
        collectives); a sharded module as it is (it cannot run without them)."""
        if self.accelerator is None or self.sharded:
            return module
        return self.accelerator.unwrap_model(module)


@contextlib.contextmanager
def _unsharded(module: Any) -> Any:
    module.unshard()
    try:
        yield module
    finally:
        module.reshard()


def is_main_process() -> bool:
    """Whether this process reports and writes: the only one, or rank 0 under
    `accelerate launch` (readable before any `Distributed` exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def distributed() -> Distributed:
    """One process, or this process's place among those `accelerate launch`
    started (gloo on CPU, NCCL on GPUs), with the FSDP settings of an FSDP
    launch. Raises `TrainError` (or `ShardingError`) for launch settings the
    trainer does not support."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Distributed()
    import torch
    from accelerate import Accelerator

    follow_launcher()
    shard = shard_plan(os.environ)
    # accelerate picks the CPU (gloo) only when asked; without a GPU its
    # launcher's processes would each train alone. (On the CPU accelerate
    # ignores FSDP; ShopTalk shards the model itself, `sharding`.)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    kind = "FSDP" if shard is not None else accelerator.distributed_type.value
    check_launch(kind, str(accelerator.mixed_precision))
    return Distributed(accelerator, accelerator.process_index, accelerator.num_processes, shard)


# prctl(2): the signal a process gets when its parent dies (Linux).
PR_SET_PDEATHSIG = 1


def follow_launcher() -> None:
    """torchrun (under `accelerate launch`) starts each training process in a
    session of its own, so a launcher that is killed (kill -9, its terminal's
    process group) would leave them training on alone, writing a run nobody
    watches. On Linux each process gets SIGTERM when the launcher dies, which
    `StopRequest` turns into an agreed stop: a checkpoint, then `--resume`."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def check_launch(distributed_type: str, mixed_precision: str) -> None:
    """Refuse the launch settings ShopTalk's loop does not handle, saying
    which to use instead (docs/team-scale.md)."""
    if mixed_precision == "fp16":
        raise TrainError(
            "accelerate's mixed_precision is fp16: ShopTalk chooses the precision itself (bf16 "
            "where the GPU has it, else fp16 with its own loss scaler); launch with "
            "--mixed_precision no or bf16 (docs/accelerate/ has ready configs)"
        )
    if distributed_type not in ("MULTI_CPU", "MULTI_GPU", "FSDP"):
        raise TrainError(
            f"accelerate launched a {distributed_type} run: ShopTalk trains with DDP (one "
            "process per GPU, or gloo on CPU) or FSDP; use one of the configs in "
            "docs/accelerate/"
        )


def check_even_share(grad_accum: int, world: int) -> None:
    """Every process must take the same number of micro-batches per step, or
    one would wait for gradients the others never send."""
    if grad_accum % world:
        lower = max(world, grad_accum - grad_accum % world)
        raise TrainError(
            f"train.grad_accum is {grad_accum} but {world} processes share each step's "
            f"micro-batches: set --grad-accum to a multiple of {world} (e.g. {lower} or "
            f"{lower + world}) so that each process takes the same number"
        )


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


class StopRequest:
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

    def __enter__(self) -> StopRequest:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class Loop:
    """The pieces one phase of training runs with."""

    model: Any
    loss_module: Any
    optimizer: Any
    scaler: Any
    plan: DevicePlan
    pad_id: int
    batch_size: int
    run: RunFolder
    dist: Distributed
    state: TrainState
    losses: list[LossRow]
    val: list[Example]
    best: dict[str, torch.Tensor] | None = None
    report: Report = quiet  # a bar's events go here only with show_progress
    show_progress: bool = True
    # Held-out exact match (percent) of the weights now; None: choose by loss.
    held_out_em: Callable[[Loop], float] | None = None


def validation_loss(loop: Loop) -> float:
    """Mean answer-token loss of the validation examples; under `accelerate
    launch` each process scores its share and the sums are combined (under
    FSDP every process scores all of them, in the same forward passes)."""
    from shoptalk.trainer.train_model import mean_loss

    dist = loop.dist
    mine = dist.eval_share(loop.val)
    module = dist.unwrap(loop.loss_module)
    mean = mean_loss(module, mine, loop.pad_id, loop.plan, max(1, loop.batch_size)) if mine else 0.0
    if dist.sharded:
        return mean
    count = sum(e.answer_tokens for e in mine)
    total, count_all = dist.total(mean * count, count)
    return total / max(1, count_all)


def fmt_loss(value: float | None) -> str:
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


def optimizer_step(loop: Loop, micro: list[list[Example]], answer_total: int) -> tuple[float, int]:
    """Forward and backward over this process's micro-batches, then one
    optimizer step; returns the loss summed over all the step's answer
    tokens and the step's input tokens (over every process)."""
    import torch

    from shoptalk.trainer.train_model import batch_loss, collate

    dist = loop.dist
    mine = dist.share(micro)
    step_loss = 0.0
    step_tokens = 0
    for index, mb in enumerate(mine):
        batch = collate(mb, loop.pad_id, loop.plan.device)
        with dist.sync_after(loop.loss_module, last=index == len(mine) - 1):
            loss = batch_loss(loop.loss_module, batch, loop.plan)
            # DDP averages gradients over processes; scale back to a sum.
            scaled = loss * (dist.world / max(1, answer_total))
            if loop.scaler is not None:
                loop.scaler.scale(scaled).backward()
            elif dist.accelerator is not None:
                dist.accelerator.backward(scaled)
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
    total_loss, total_tokens = dist.total(step_loss, step_tokens)
    return total_loss, int(total_tokens)


def validate_step(loop: Loop) -> float:
    """Validation loss (and held-out exact match) now; keeps the weights when
    they are the best yet (`checkpoints.better`)."""
    state = loop.state
    val_loss = validation_loss(loop)
    val_em = loop.held_out_em(loop) if loop.held_out_em is not None else None
    if record_evaluation(state, val_loss, val_em):
        state.bad_evals = 0
        loop.best = trainable_state(loop.model)
    else:
        state.bad_evals += 1
    return val_loss


def bar_detail(state: TrainState, steps: str, speed: float, loss: str) -> str:
    """A training bar's figures: the step, speed, loss, the latest validation
    loss and the step whose weights are kept (chosen by held-out exact match,
    so not always the lowest loss)."""
    latest = state.evaluations[-1]["val_loss"] if state.evaluations else None
    figures = (
        steps,
        f"{speed:.0f} tok/s",
        f"loss {loss}",
        f"val {fmt_loss(latest)}",
        f"kept step {state.best_step}" if state.evaluations else "",
    )
    return " ".join(figure for figure in figures if figure)


def run_phase(
    loop: Loop,
    phase: str,
    examples: Sequence[Example],
    budget: PhaseBudget,
    stop: StopRequest,
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
    check_even_share(budget.grad_accum, loop.dist.world)
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
        """The phase's bar: how far, and `bar_detail`."""
        if not loop.show_progress:
            return
        done = step_of() if max_steps is not None else min(total, seconds_of())
        loop.report(Progress(done, total, label, bar_detail(state, steps, speed, loss), final))

    last_loss: float | None = None
    reason = ""
    step_text, speed, loss_text = "", 0.0, "-"
    show(step_text, speed, loss_text)
    while True:
        if max_steps is not None and step_of() >= max_steps:
            reason = "one pass over the data done" if one_epoch else "step budget reached"
            break
        # Agreed by every process: each measures its own time and gets its own signals.
        timed_out = max_seconds is not None and seconds_of() >= max_seconds
        out_of_time, stopping = loop.dist.any(timed_out, stop.requested)
        if out_of_time:
            reason = "time budget reached"
            break
        if stopping:
            raise KeyboardInterrupt
        started = time.perf_counter()
        micro = schedule.step(step_of())
        answer_total = sum(e.answer_tokens for mb in micro for e in mb)
        factor = lr_factor(step_of(), planned)
        for group in loop.optimizer.param_groups:
            group["lr"] = learning_rate * factor
        try:
            step_loss, step_tokens = optimizer_step(loop, micro, answer_total)
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
        state.tokens += step_tokens
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
            val_loss = validate_step(loop)
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
        speed, loss_text = step_tokens / max(elapsed, 1e-9), f"{last_loss:.3f}"
        show(step_text, speed, loss_text)
        if evaluate or step_of() % val_every == 0:
            checkpoint_now(loop)
        if evaluate and patience and state.bad_evals >= patience:
            reason = (
                f"early stop: validation loss did not improve for {patience} evaluations "
                f"(best {state.best_val_loss:.4f} at step {state.best_step})"
            )
            break
    show(step_text, speed, loss_text, final=True)
    return reason


def checkpoint_now(loop: Loop) -> None:
    """A checkpoint of the run now, written by the main process; the weights
    and the optimizer's state are gathered by every process first (under
    FSDP each holds a shard of them)."""
    weights = trainable_state(loop.model)
    optimizer_state = whole_optimizer_state(loop.optimizer)
    if loop.dist.is_main:
        try:
            save_checkpoint(
                loop.run,
                weights,
                optimizer_state,
                loop.scaler,
                loop.state,
                loop.best,
                loop.losses,
            )
            loop.run.write_losses(loop.losses)
            record = loop.run.read_record()
            record.update(progress_fields(loop.state))
            loop.run.write_record(record)
        except Exception as exc:
            reason = write_failure(exc)  # None: not a failed write, a bug
            if reason is None:
                raise
            latest = latest_checkpoint(loop.run)
            safe = (
                f"the last complete checkpoint ({latest}) is kept. Free some space and "
                f"resume with {resume_command(loop.run)}"
                if latest
                else "no checkpoint was complete yet. Free some space and start the run again"
            )
            raise TrainError(
                f"could not write a checkpoint to {loop.run.checkpoints_dir}: {reason}. "
                f"Nothing is lost: the dataset and earlier runs are untouched, and {safe}"
            ) from None
    loop.dist.wait()
