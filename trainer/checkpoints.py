"""Checkpoints of a training run: what one restores (`TrainState`, the
trainable weights, the optimizer, the random generators, the loss rows),
written completely into `checkpoints/<phase>-<step>/` before `latest.json`
points at it, the two newest kept; loading the latest for `--resume`, and
finding the run to resume.

Used by the loop (`shoptalk.trainer.train_loop`) and the run
(`shoptalk.trainer.train`); imports neither.
"""

from __future__ import annotations

import json
import random
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoptalk.models.errors import ShopTalkError
from shoptalk.models.files import atomic_dir, write_json_atomic
from shoptalk.models.store import RepoStore
from shoptalk.trainer.run_record import (
    STATUS_COMPLETE,
    STATUS_FAILED,
    STATUS_INTERRUPTED,
    STATUS_RUNNING,
    LossRow,
    RunFolder,
)
from shoptalk.trainer.sharding import sharded_like, sharded_optimizer_state, whole

if TYPE_CHECKING:
    import torch

KEEP_CHECKPOINTS = 2
PHASE_PRETRAIN = "pretrain"
PHASE_SFT = "sft"


class TrainError(ShopTalkError):
    pass


class TrainInterrupted(ShopTalkError):
    exit_code = 130


@dataclass
class TrainState:
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
    base_val_em: float | None = None  # held-out exact match (percent) before training
    best_val_em: float | None = None  # ... of the checkpoint kept
    # Whether the kept weights were trained here (False: the start is kept,
    # the base or the initial adapter, so the run gained nothing).
    best_trained: bool = False
    # Phase 1's end point, measured before fine-tuning starts (None: no phase 1).
    pretrain_val_loss: float | None = None
    pretrain_val_em: float | None = None
    # Every evaluation: {"step", "val_loss", "val_em"} (val_em None: by loss alone).
    evaluations: list[dict[str, Any]] = field(default_factory=list)
    final_steps: int = 0  # the final pass over the held-out windows
    final_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def better(state: TrainState, val_loss: float, val_em: float | None) -> bool:
    """Whether weights scoring `val_loss` / `val_em` beat the kept ones:
    higher held-out exact match, ties broken by lower validation loss (by
    loss alone without exact match)."""
    if state.best_val_loss is None:
        return True
    if val_em is not None and state.best_val_em is not None and val_em != state.best_val_em:
        return val_em > state.best_val_em
    return val_loss < state.best_val_loss


def record_evaluation(
    state: TrainState, val_loss: float, val_em: float | None, trained: bool = True
) -> bool:
    """Add an evaluation at the current step (`trained`: of weights this run
    changed, not its start); returns whether its weights are now the kept
    ones (the state's best figures then are theirs)."""
    state.evaluations.append({"step": state.step, "val_loss": val_loss, "val_em": val_em})
    if not better(state, val_loss, val_em):
        return False
    state.best_val_loss, state.best_val_em, state.best_step = val_loss, val_em, state.step
    state.best_trained = trained
    return True


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """A CPU copy of the trainable (LoRA) weights, whole; under FSDP each is
    gathered from the processes' shards, so every process must call this."""
    return {
        name: whole(p.detach()).to("cpu", copy=True).contiguous()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def load_trainable(model: Any, state: dict[str, torch.Tensor]) -> None:
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
            target = params[name]
            target.copy_(sharded_like(target, tensor.to(target.device, target.dtype)))


def save_checkpoint(
    run: RunFolder,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scaler: Any,
    state: TrainState,
    best: dict[str, torch.Tensor] | None,
    losses: list[LossRow],
) -> Path:
    """Write `checkpoints/step-N/` completely, then point `latest.json` at it:
    the trainable `weights` (`trainable_state`) and the optimizer's state
    (whole, `sharding.whole_optimizer_state`), gathered beforehand by every
    process. A failure (disk full) leaves the previous checkpoint as latest."""
    import torch
    from safetensors.torch import save_file

    name = (
        f"{state.phase}-{state.pretrain_steps if state.phase == PHASE_PRETRAIN else state.step:06d}"
    )
    final = run.checkpoints_dir / name
    with atomic_dir(final) as tmp:
        save_file(weights, str(tmp / "adapter.safetensors"))
        if best is not None:
            save_file(best, str(tmp / "best.safetensors"))
        torch.save(
            {
                "optimizer": optimizer_state,
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


def latest_checkpoint(run: RunFolder) -> str | None:
    try:
        return str(json.loads(run.latest_file.read_text())["checkpoint"])
    except (OSError, ValueError, KeyError):
        return None


def load_checkpoint(
    run: RunFolder, model: Any, optimizer: Any, scaler: Any
) -> tuple[TrainState, dict[str, torch.Tensor] | None, list[LossRow]]:
    import torch
    from safetensors.torch import load_file

    name = latest_checkpoint(run)
    folder = run.checkpoints_dir / name if name else None
    if folder is None or not (folder / "state.json").is_file():
        raise TrainError(
            f"run {run.run_id} has no complete checkpoint to resume from; start a new run "
            "(without --resume)"
        )
    load_trainable(model, load_file(str(folder / "adapter.safetensors")))
    best_file = folder / "best.safetensors"
    best = load_file(str(best_file)) if best_file.is_file() else None
    extra = torch.load(folder / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(sharded_optimizer_state(optimizer, extra["optimizer"]))
    if scaler is not None and extra.get("scaler"):
        scaler.load_state_dict(extra["scaler"])
    torch.set_rng_state(extra["torch_rng"])
    random.setstate(extra["python_rng"])
    saved = json.loads((folder / "state.json").read_text())
    # Checkpoints from before `best_trained`: only a later step was trained.
    saved.setdefault("best_trained", saved.get("best_step", 0) > 0)
    state = TrainState(**saved)
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


def resume_command(run: RunFolder) -> str:
    repo = run.read_record().get("repo")
    where = f" --repo {shlex.quote(str(repo))}" if repo else ""
    return f"`shoptalk train{where} --resume --run-id {run.run_id}`"


def progress_fields(state: TrainState) -> dict[str, Any]:
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
        "base_val_em": state.base_val_em,
        "best_val_em": state.best_val_em,
        "best_trained": state.best_trained,
        "pretrain_val_loss": state.pretrain_val_loss,
        "pretrain_val_em": state.pretrain_val_em,
        "evaluations": state.evaluations,
    }
