"""FSDP under `accelerate launch`: the base and its LoRA sharded across the
processes with torch's FSDP2 (`fully_shard`), one unit per decoder layer and
the rest (embeddings, final norm, output layer) in the root unit.

ShopTalk shards the model itself rather than through `accelerator.prepare`:
accelerate turns FSDP on only for GPU-like devices (on CPU it wraps the
model in DDP instead), and torch's FSDP1 crashes on CPU, so the only form a
CPU test can run is FSDP2 applied directly; the GPU run takes the same path
with a CUDA device mesh. The settings come from accelerate's launcher
(`FSDP_*` in the environment, from the config's `fsdp_config`); the ones
ShopTalk does not implement are refused with what to set instead.

Sharded tensors are `DTensor`s: `whole` gathers one (a collective: every
process calls it, in the same order), `sharded_like` cuts a whole tensor
back to a parameter's shard (no communication), and the optimizer's state
goes through the same two, so checkpoints hold whole tensors in the
single-process format whatever the process count.

Used by the loop (`shoptalk.trainer.train_loop`) and the checkpoints
(`shoptalk.trainer.checkpoints`); imports neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shoptalk.models.errors import ShopTalkError

if TYPE_CHECKING:
    import torch
    from torch import nn

FSDP_VERSION = "2"
# (environment variable, the config key that sets it): settings ShopTalk's
# FSDP does not implement; each must be false.
UNSUPPORTED = (
    ("FSDP_OFFLOAD_PARAMS", "fsdp_offload_params"),
    ("FSDP_CPU_RAM_EFFICIENT_LOADING", "fsdp_cpu_ram_efficient_loading"),
    ("FSDP_ACTIVATION_CHECKPOINTING", "fsdp_activation_checkpointing"),
)


class ShardingError(ShopTalkError):
    pass


@dataclass(frozen=True)
class ShardPlan:
    """How the loss module is sharded: the decoder layer classes that each
    become an FSDP unit (empty: the base's own `_no_split_modules`), and
    whether a unit frees its gathered weights after the forward pass
    (FULL_SHARD) or keeps them for the backward pass (SHARD_GRAD_OP)."""

    layer_classes: tuple[str, ...] = ()
    reshard_after_forward: bool = True


def _flag(env: Mapping[str, str], key: str, default: str = "false") -> bool:
    return env.get(key, default).strip().lower() in ("true", "1", "yes")


def shard_plan(env: Mapping[str, str]) -> ShardPlan | None:
    """The FSDP settings `accelerate launch` passed (None: not an FSDP
    launch). Raises `ShardingError` for settings ShopTalk does not honour."""
    if not _flag(env, "ACCELERATE_USE_FSDP"):
        return None
    version = env.get("FSDP_VERSION", "1").strip()
    if version != FSDP_VERSION:
        raise ShardingError(
            f"accelerate launched FSDP version {version}: ShopTalk shards with FSDP2 (torch's "
            "fully_shard); set `fsdp_version: 2` in the config's fsdp_config (see "
            "docs/accelerate/fsdp-gpus.yaml)"
        )
    policy = env.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").strip().upper()
    if policy != "TRANSFORMER_BASED_WRAP":
        raise ShardingError(
            f"fsdp_auto_wrap_policy is {policy}: ShopTalk makes one FSDP unit per decoder "
            "layer; set `fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP`"
        )
    for variable, key in UNSUPPORTED:
        if _flag(env, variable):
            raise ShardingError(
                f"{key} is true: ShopTalk's FSDP does not implement it; set `{key}: false` "
                "(docs/team-scale.md says what FSDP runs with)"
            )
    classes = env.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "")
    return ShardPlan(
        layer_classes=tuple(c.strip() for c in classes.split(",") if c.strip()),
        reshard_after_forward=_flag(env, "FSDP_RESHARD_AFTER_FORWARD", "true"),
    )


def _layer_classes(module: nn.Module, plan: ShardPlan) -> set[str]:
    if plan.layer_classes:
        return set(plan.layer_classes)
    return {n for m in module.modules() for n in (getattr(m, "_no_split_modules", None) or ())}


def shard_module(module: nn.Module, plan: ShardPlan, device: torch.device, world: int) -> Any:
    """Shard `module` in place over `world` processes on `device`'s kind:
    each decoder layer a unit, then the root; parameters become `DTensor`
    shards on `device` (a module loaded on the CPU moves only its shards).
    Optimizers must be made afterwards (the parameters are new objects)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    wanted = _layer_classes(module, plan)
    layers = [m for m in module.modules() if type(m).__name__ in wanted and m is not module]
    if not layers:
        found = sorted({type(m).__name__ for m in module.modules() if "Layer" in type(m).__name__})
        raise ShardingError(
            f"the base has no {', '.join(sorted(wanted)) or 'decoder layer class'} to shard: set "
            "fsdp_transformer_layer_cls_to_wrap to its decoder layer class (this base has "
            f"{', '.join(found) or 'none that is named like a layer'})"
        )
    mesh = init_device_mesh(device.type, (world,))
    # Inner layers first: a unit must be made before the one that holds it.
    for layer in reversed(layers):
        fully_shard(layer, mesh=mesh, reshard_after_forward=plan.reshard_after_forward)
    return fully_shard(module, mesh=mesh, reshard_after_forward=plan.reshard_after_forward)


def is_sharded(tensor: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (gathered from every process: each must
    call this for the same tensors in the same order); others as they are."""
    if is_sharded(tensor):
        full: torch.Tensor = tensor.full_tensor()  # type: ignore[attr-defined]
        return full
    return tensor


def sharded_like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` (a whole tensor every process holds) cut to `param`'s shard,
    on its device and in its dtype; `full` itself for a plain parameter."""
    if not is_sharded(param):
        return full
    from torch.distributed.tensor import distribute_tensor

    mesh, placements = param.device_mesh, param.placements  # type: ignore[attr-defined]
    local = full.to(param.device, param.dtype)
    # src_data_rank=None: each process cuts its own copy, no communication.
    return distribute_tensor(local, mesh, placements, src_data_rank=None)


def whole_optimizer_state(optimizer: Any) -> dict[str, Any]:
    """The optimizer's state dict with every sharded tensor gathered (every
    process must call this): the single-process format, loadable by any
    process count."""
    state: dict[str, Any] = optimizer.state_dict()
    # The state dict's per-parameter dicts are the optimizer's own: copies.
    state["state"] = {
        index: {key: _whole_cpu(value) for key, value in sorted(state["state"][index].items())}
        for index in sorted(state["state"])
    }
    return state


def _whole_cpu(value: Any) -> Any:
    return whole(value).cpu() if is_sharded(value) else value


def sharded_optimizer_state(optimizer: Any, saved: dict[str, Any]) -> dict[str, Any]:
    """A whole optimizer state (`whole_optimizer_state`, or a single
    process's) cut to this process's shards of the optimizer's parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, per_param in saved["state"].items():
        param = params[int(index)]
        if not is_sharded(param):
            continue
        for key, value in per_param.items():
            if hasattr(value, "shape") and tuple(value.shape) == tuple(param.shape):
                per_param[key] = sharded_like(param, value)
    return saved
