"""The model side of training: device and precision, the base checkpoint, the
LoRA adapter, and the loss computed only where it counts.

Speed on CPU comes from three choices made here:

* logits only at answer positions — the decoder body runs on the whole
  sequence, then the hidden states of the answer positions are gathered and
  only those go through the output layer (Gemma 3's 262k-entry vocabulary
  costs as much as the rest of the network when applied everywhere);
* bf16 on CPUs that have AVX512-BF16/AMX (the frozen base is stored in bf16
  and autocast runs the matmuls in it; the adapter stays fp32), fp32 on other
  CPUs; an explicit thread count;
* LoRA only on the upper layers when `layers_from` > 0, so backward stops at
  the first adapted layer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from shoptalk.models.catalog import HF_MODEL_TYPES, SUPPORTED_ARCHITECTURES, BaseModel
from shoptalk.models.errors import ShopTalkError
from shoptalk.models.files import sha256_file, sha256_text
from shoptalk.models.provision import HF_MARKER
from shoptalk.models.settings import TrainSettings
from shoptalk.trainer.formats import Example

log = logging.getLogger(__name__)

# All attention and MLP projections: LoRA on every linear layer of a block is
# what the seed experiments used; these names are the same in the three
# supported architectures. Embeddings and lm_head are never targets (a GGUF
# LoRA adapter cannot carry them).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    arch: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for arch in SUPPORTED_ARCHITECTURES
}
FORBIDDEN_TARGETS = ("embed_tokens", "lm_head", "norm")

# Above this many answer positions per micro-batch the output layer runs in
# checkpointed chunks, so a long causal-LM window never holds all its logits.
LOGIT_CHUNK = 256


class ModelError(ShopTalkError):
    pass


@dataclass(frozen=True)
class DevicePlan:
    device: torch.device
    # dtype matmuls run in under autocast; None: plain fp32
    autocast: torch.dtype | None
    # dtype the frozen base weights are stored in
    weights: torch.dtype
    grad_scaler: bool
    threads: int | None
    description: str


def cpu_has_bf16() -> bool:
    """AVX512-BF16 or AMX-BF16 present (and oneDNN able to use them)."""
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except (AttributeError, RuntimeError):
        return False
    if platform.system() == "Linux":
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def choose_device(setting: str, threads: int | None, precision: str = "auto") -> DevicePlan:
    """The device and precision to train with. `precision`: auto | fp32 | bf16."""
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelError(
                "train.device is 'cuda' but torch sees no CUDA device: install a CUDA build "
                "of torch, or use --device cpu"
            )
        index = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", index)
        if precision == "fp32":
            return DevicePlan(device, None, torch.float32, False, None, "cuda fp32")
        if torch.cuda.is_bf16_supported():
            return DevicePlan(device, torch.bfloat16, torch.bfloat16, False, None, "cuda bf16")
        # fp16 needs fp32 master weights and a loss scaler to train stably.
        return DevicePlan(device, torch.float16, torch.float32, True, None, "cuda fp16")
    if setting == "mps" or (setting == "auto" and torch.backends.mps.is_available()):
        if not torch.backends.mps.is_available():
            raise ModelError("train.device is 'mps' but this torch has no MPS backend; use cpu")
        # fp32 on MPS: its autocast coverage of backward ops varies by release.
        return DevicePlan(torch.device("mps"), None, torch.float32, False, None, "mps fp32")
    if setting not in ("auto", "cpu"):
        raise ModelError(f"unknown train.device {setting!r}; use auto, cpu, cuda or mps")
    # Processes started together by `accelerate launch` share the cores.
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    count = threads or max(1, _physical_cores() // max(1, local_world))
    torch.set_num_threads(count)
    bf16 = precision == "bf16" or (precision == "auto" and cpu_has_bf16())
    if bf16:
        return DevicePlan(
            torch.device("cpu"), torch.bfloat16, torch.bfloat16, False, count, f"cpu bf16 x{count}"
        )
    return DevicePlan(torch.device("cpu"), None, torch.float32, False, count, f"cpu fp32 x{count}")


def _physical_cores() -> int:
    logical = os.cpu_count() or 1
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = logical
    return max(1, min(logical, affinity))


def autocast(plan: DevicePlan) -> contextlib.AbstractContextManager[Any]:
    if plan.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=plan.device.type, dtype=plan.autocast)


# ---- base ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BaseIdentity:
    """What the run record says about the base it trained on."""

    key: str
    source: str
    path: str
    architecture: str
    sha256: str | None
    tokenizer_sha256: str

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def checkpoint_architecture(path: Path) -> str:
    config_file = path / "config.json"
    if not config_file.is_file():
        return ""
    config = json.loads(config_file.read_text())
    model_type = str(config.get("model_type", ""))
    arch = HF_MODEL_TYPES.get(model_type)
    if arch is None:
        raise ModelError(
            f"{path}: model_type {model_type!r} is not a supported architecture "
            f"({', '.join(SUPPORTED_ARCHITECTURES)}); pick a base from `shoptalk models list`"
        )
    return arch


def weights_sha256(path: Path) -> str | None:
    """A digest of the checkpoint's weight files (from the provisioning marker
    when there is one, so the 1 GB file is not hashed again)."""
    if not path.is_dir():
        return None
    marker = path / HF_MARKER
    files: dict[str, str] = {}
    if marker.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError):
            recorded = json.loads(marker.read_text())["files"]
            files = {k: v for k, v in recorded.items() if k.endswith(".safetensors")}
    if not files:
        files = {p.name: sha256_file(p) for p in sorted(path.glob("*.safetensors"))}
    if not files:
        return None
    return sha256_text(json.dumps(files, sort_keys=True))


def tokenizer_sha256(path: Path, tokenizer: Any) -> str:
    """Digest of the tokenizer files, or of its vocabulary when there are none."""
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    files = {n: sha256_file(path / n) for n in names if (path / n).is_file()}
    if files:
        return sha256_text(json.dumps(files, sort_keys=True))
    vocab = sorted(tokenizer.get_vocab().items())
    return sha256_text(json.dumps(vocab))


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as exc:
        raise ModelError(
            f"cannot load the tokenizer of the base from {path} ({exc}); "
            "run `shoptalk models pull` or pass a local checkpoint with --base PATH"
        ) from None


def load_causal_lm(path: str, plan: DevicePlan) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=plan.weights, attn_implementation="sdpa"
        )
    except OSError as exc:
        raise ModelError(
            f"cannot load the base model from {path} ({exc}); run `shoptalk models pull` "
            "for the default, or pass a local HF checkpoint with --base PATH"
        ) from None
    arch = HF_MODEL_TYPES.get(str(getattr(model.config, "model_type", "")))
    if arch is None:
        raise ModelError(
            f"{path}: architecture {model.config.model_type!r} is not supported for training; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    model.config.use_cache = False
    moved: Any = model.to(plan.device)  # type: ignore[arg-type]
    return moved


def describe_base(base: BaseModel, path: str, tokenizer: Any) -> BaseIdentity:
    folder = Path(path)
    sha = weights_sha256(folder)
    return BaseIdentity(
        key=base.key,
        source=base.source,
        path=str(folder.resolve()) if folder.is_dir() else path,
        architecture=base.architecture,
        sha256=sha,
        tokenizer_sha256=tokenizer_sha256(folder, tokenizer),
    )


# ---- LoRA ---------------------------------------------------------------------------


def layer_count(model: Any) -> int:
    config = model.config
    return int(
        getattr(config, "num_hidden_layers", 0) or config.get_text_config().num_hidden_layers
    )


def target_modules(settings: TrainSettings, architecture: str) -> list[str]:
    targets = list(settings.target_modules or DEFAULT_TARGET_MODULES[architecture])
    bad = [t for t in targets if any(f in t for f in FORBIDDEN_TARGETS)]
    if bad:
        raise ModelError(
            f"train.target_modules {bad} would adapt embeddings, norms or the output layer, "
            "which a GGUF LoRA adapter cannot carry; target projections only "
            f"(default: {', '.join(DEFAULT_TARGET_MODULES[architecture])})"
        )
    return targets


CPU_LAYERS_FROM = 0.5


def lora_layers_from(settings: TrainSettings, device: torch.device) -> float:
    """The fraction of depth LoRA starts at: the setting, or the per-device default."""
    if settings.layers_from is not None:
        return settings.layers_from
    return CPU_LAYERS_FROM if device.type == "cpu" else 0.0


def apply_lora(
    model: Any,
    settings: TrainSettings,
    architecture: str,
    init_adapter: Path | None,
    device: torch.device | None = None,
) -> Any:
    """Wrap `model` with a trainable LoRA adapter: a new one from the settings,
    or `init_adapter` (a PEFT folder) to continue training it."""
    from peft import LoraConfig, PeftModel, get_peft_model

    for param in model.parameters():
        param.requires_grad_(False)
    if init_adapter is not None:
        if not (init_adapter / "adapter_config.json").is_file():
            raise ModelError(
                f"{init_adapter} is not a PEFT adapter folder (no adapter_config.json); "
                "pass a run's adapter/ folder"
            )
        return PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    layers = layer_count(model)
    first = int(lora_layers_from(settings, device or torch.device("cpu")) * layers)
    config = LoraConfig(
        r=settings.lora_rank,
        lora_alpha=settings.lora_alpha,
        lora_dropout=settings.lora_dropout,
        target_modules=target_modules(settings, architecture),
        layers_to_transform=list(range(first, layers)) if first > 0 else None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ModelError(
            f"cannot apply LoRA with target modules {config.target_modules} ({exc}); "
            "check train.target_modules"
        ) from None


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# ---- loss ---------------------------------------------------------------------------


@dataclass
class Batch:
    input_ids: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor
    labels: torch.Tensor
    tokens: int  # input tokens, padding excluded

    @property
    def answer_tokens(self) -> int:
        return int(self.labels.numel())


def collate(examples: Sequence[Example], pad_id: int, device: torch.device) -> Batch:
    """Right-padded ids plus the (row, column, label) of every position whose
    next token is an answer token (no attention mask: attention is causal, so
    no real position sees the pads after it)."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    rows: list[int] = []
    cols: list[int] = []
    labels: list[int] = []
    for b, example in enumerate(examples):
        n = len(example)
        ids[b, :n] = torch.tensor(example.input_ids, dtype=torch.long)
        for t in range(example.answer_start - 1, n - 1):
            rows.append(b)
            cols.append(t)
            labels.append(example.input_ids[t + 1])
    return Batch(
        ids.to(device),
        torch.tensor(rows, dtype=torch.long, device=device),
        torch.tensor(cols, dtype=torch.long, device=device),
        torch.tensor(labels, dtype=torch.long, device=device),
        sum(len(e) for e in examples),
    )


class AnswerLoss(nn.Module):
    """Summed cross-entropy of the answer tokens of a batch, with the output
    layer applied to the answer positions only. A module (not a function) so
    that DDP under `accelerate launch` can wrap it."""

    def __init__(self, causal_lm: nn.Module) -> None:
        super().__init__()
        self.decoder: nn.Module = causal_lm.model  # type: ignore[assignment]
        self.lm_head: nn.Module = causal_lm.lm_head  # type: ignore[assignment]
        config = causal_lm.config
        self.softcap: float | None = getattr(config, "final_logit_softcapping", None)

    def _token_losses(self, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return F.cross_entropy(logits, labels, reduction="sum")

    def forward(
        self,
        input_ids: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        # No attention mask: batches are right-padded and attention is causal,
        # so no real position ever sees a pad, and only real positions are
        # scored. Without a mask SDPA takes its causal path: ~17% less time a
        # step on CPU (docs/benchmarks.md).
        hidden = self.decoder(input_ids=input_ids, use_cache=False).last_hidden_state
        picked = hidden[rows, cols]
        if picked.shape[0] <= LOGIT_CHUNK:
            return self._token_losses(picked, labels)
        from torch.utils.checkpoint import checkpoint

        total = picked.new_zeros((), dtype=torch.float32)
        for start in range(0, picked.shape[0], LOGIT_CHUNK):
            part = checkpoint(
                self._token_losses,
                picked[start : start + LOGIT_CHUNK],
                labels[start : start + LOGIT_CHUNK],
                use_reentrant=False,
            )
            total = total + part
        return total


def batch_loss(module: nn.Module, batch: Batch, plan: DevicePlan) -> torch.Tensor:
    with autocast(plan):
        loss: torch.Tensor = module(batch.input_ids, batch.rows, batch.cols, batch.labels)
    return loss


@torch.no_grad()
def mean_loss(
    module: nn.Module,
    examples: Sequence[Example],
    pad_id: int,
    plan: DevicePlan,
    batch_size: int,
) -> float:
    """Mean answer-token loss of `examples` (eval mode, no dropout)."""
    was_training = module.training
    module.eval()
    total, count = 0.0, 0
    try:
        for chunk in _chunks(sorted(examples, key=len), batch_size):
            batch = collate(chunk, pad_id, plan.device)
            total += float(batch_loss(module, batch, plan))
            count += batch.answer_tokens
    finally:
        module.train(was_training)
    return total / max(1, count)


def _chunks(items: Sequence[Example], size: int) -> Iterator[Sequence[Example]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError | torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text
    )
