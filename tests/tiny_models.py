"""Tiny random HF checkpoints (and their GGUF) of each supported architecture
for the tests (registered in `tests/conftest.py` through `pytest_plugins`).

Each checkpoint has 2 layers and a small hidden size, random weights from a
fixed seed, and a real tokenizer trained in a fraction of a second on Python
standard-library source, so code tokenizes into sensible pieces:

- gemma3 / llama: a SentencePiece BPE model with byte fallback (the
  `tokenizer.model` is kept beside `tokenizer.json`, as in real checkpoints);
- qwen2: a byte-level BPE with Qwen 2's pre-tokenizer regex.

The vocabulary holds the architecture's FIM tokens from the catalog plus
bos/eos/pad, so prompts built by `shoptalk.models.prompt` work unchanged.

Fixtures (session scoped, built once): `tiny_hf(arch, hidden_size=64) -> Path`
and `tiny_gguf(arch, dtype="f32", hidden_size=64) -> Path`.
"""

from __future__ import annotations

import io
import json
import shutil
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

TINY_ARCHITECTURES = ("gemma3", "qwen2", "llama")

# Fixed text every correctness test evaluates on (tokenizes to ~100 tokens).
CODE_TEXT = '''def parse_header(line: str) -> dict[str, str]:
    """Split a `Key: value` header line."""
    key, _, value = line.partition(":")
    if not key:
        raise ValueError(f"bad header: {line!r}")
    return {key.strip().lower(): value.strip()}


class Cache:
    def __init__(self, size: int = 128) -> None:
        self.size = size
        self.items: dict[str, bytes] = {}
'''

# Standard-library files the tokenizers learn from: plain, stable Python.
_CORPUS_FILES = (
    "textwrap.py",
    "string.py",
    "json/decoder.py",
    "json/encoder.py",
    "functools.py",
    "dataclasses.py",
    "shlex.py",
    "fnmatch.py",
)

_SEED = 1234
_VOCAB_SIZE = 1000


def _corpus_lines() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    for name in _CORPUS_FILES:
        path = stdlib / name
        if path.is_file():
            lines.extend(line for line in path.read_text(encoding="utf-8").splitlines() if line)
    if not lines:
        raise RuntimeError(f"no standard-library source found under {stdlib}")
    return lines


def _special_tokens(arch: str) -> dict[str, Any]:
    from shoptalk.models.catalog import GEMMA3_FIM, LLAMA3_FIM, QWEN_CODER_FIM

    if arch == "gemma3":
        return {
            "pad": "<pad>",
            "eos": "<eos>",
            "bos": "<bos>",
            "unk": "<unk>",
            "extra": [GEMMA3_FIM.prefix, GEMMA3_FIM.suffix, GEMMA3_FIM.middle],
        }
    if arch == "llama":
        return {
            "unk": "<unk>",
            "bos": "<|begin_of_text|>",
            "eos": LLAMA3_FIM.end,
            "pad": "<|finetune_right_pad_id|>",
            "extra": [LLAMA3_FIM.prefix, LLAMA3_FIM.suffix, LLAMA3_FIM.middle],
        }
    if arch == "qwen2":
        return {
            "eos": QWEN_CODER_FIM.end,
            "pad": QWEN_CODER_FIM.end,
            "bos": None,
            "unk": None,
            "extra": [
                "<|im_start|>",
                "<|im_end|>",
                QWEN_CODER_FIM.prefix,
                QWEN_CODER_FIM.middle,
                QWEN_CODER_FIM.suffix,
                "<|fim_pad|>",
                "<|repo_name|>",
                "<|file_sep|>",
            ],
        }
    raise ValueError(f"no tiny model for architecture {arch!r}; choose one of {TINY_ARCHITECTURES}")


def _train_sentencepiece(arch: str) -> bytes:
    """A SentencePiece BPE model (serialized proto) with byte fallback."""
    import sentencepiece as spm

    special = _special_tokens(arch)
    if arch == "gemma3":
        ids = {"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3}
        user = list(special["extra"])
    else:
        ids = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1}
        user = [special["pad"], *special["extra"]]
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus_lines()),
        model_writer=buffer,
        vocab_size=_VOCAB_SIZE,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        # No dummy "▁" prefix (as Gemma): llama.cpp would also prepend one after
        # every special token, which HF's tokenizer does not.
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        character_coverage=1.0,
        max_sentence_length=100_000,
        num_threads=1,
        seed_sentencepiece_size=100_000,
        user_defined_symbols=user,
        pad_piece=special["pad"],
        eos_piece=special["eos"],
        bos_piece=special["bos"],
        unk_piece=special["unk"],
        minloglevel=2,
        **ids,
    )
    return buffer.getvalue()


def _sentencepiece_tokenizer(arch: str, out_dir: Path) -> int:
    """Write tokenizer.model + HF tokenizer files; return the vocabulary size."""
    import sentencepiece as spm
    from transformers import GemmaTokenizer, LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    proto = _train_sentencepiece(arch)
    (out_dir / "tokenizer.model").write_bytes(proto)
    processor = spm.SentencePieceProcessor(model_proto=proto)
    size = processor.get_piece_size()
    vocab = {processor.id_to_piece(i): i for i in range(size)}
    special = _special_tokens(arch)
    scores = {processor.id_to_piece(i): processor.get_score(i) for i in range(size)}
    skip = {
        processor.id_to_piece(i)
        for i in range(size)
        if processor.is_control(i) or processor.is_unknown(i) or processor.is_byte(i)
    }
    # Merges ranked by SentencePiece's piece scores, as HF's own converter does.
    merges = generate_merges(vocab, scores, skip_tokens=skip | set(special["extra"]))
    tokenizer: Any
    if arch == "gemma3":
        tokenizer = GemmaTokenizer(
            vocab=vocab,
            merges=merges,
            unk_token=special["unk"],
            bos_token=special["bos"],
            eos_token=special["eos"],
            pad_token=special["pad"],
            mask_token=None,
            extra_special_tokens=special["extra"],
            add_bos_token=True,
        )
    else:
        tokenizer = LlamaTokenizer(
            vocab=vocab,
            merges=merges,
            unk_token=special["unk"],
            bos_token=special["bos"],
            eos_token=special["eos"],
            pad_token=special["pad"],
            extra_special_tokens=special["extra"],
            add_prefix_space=False,
            add_bos_token=True,
        )
    tokenizer.save_pretrained(out_dir)
    return size


def _byte_level_tokenizer(out_dir: Path) -> int:
    """Qwen 2 style: byte-level BPE behind Qwen's split regex, specials appended."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    special = _special_tokens("qwen2")
    template = Qwen2Tokenizer(vocab={"a": 0}, merges=[])
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = template.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus_lines(), trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=dict(model["vocab"]),
        merges=merges,
        eos_token=special["eos"],
        pad_token=special["pad"],
        unk_token=None,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(special["extra"])})
    tokenizer.save_pretrained(out_dir)
    return len(tokenizer)


def _config(arch: str, vocab_size: int, hidden_size: int, special_ids: dict[str, int]) -> Any:
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden_size // 4,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.02,
        **special_ids,
    }
    if arch == "gemma3":
        return Gemma3TextConfig(
            **common,
            # Shorter than the test text, so the sliding-window path is exercised;
            # the layer pattern stays the default (every 6th layer global), the
            # only one llama.cpp's gemma3 knows.
            sliding_window=16,
            query_pre_attn_scalar=hidden_size // 4,
            tie_word_embeddings=True,
        )
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=False)
    return LlamaConfig(**common, tie_word_embeddings=False)


def build_tiny_hf(arch: str, out_dir: Path, hidden_size: int = 64) -> Path:
    """Write a seeded random tiny HF checkpoint of `arch` into `out_dir`.

    `hidden_size` must be a multiple of 32 (Q8_0 blocks); use 256 where K-quant
    blocks (Q4_K/Q5_K) must apply to every matrix."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if arch not in TINY_ARCHITECTURES:
        raise ValueError(
            f"no tiny model for architecture {arch!r}; choose one of {TINY_ARCHITECTURES}"
        )
    if hidden_size % 32:
        raise ValueError(f"hidden_size must be a multiple of 32, not {hidden_size}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if arch == "qwen2":
        vocab_size = _byte_level_tokenizer(out_dir)
    else:
        vocab_size = _sentencepiece_tokenizer(arch, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    special_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = _config(arch, vocab_size, hidden_size, special_ids)
    torch.manual_seed(_SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # The final norm's gain sets the logits' spread (std ≈ 3): a random model
    # with flat logits has near-ties everywhere that any rounding flips, and
    # bigger weights inside the blocks would make it chaotic instead.
    final_gain = 3.0 / (0.02 * hidden_size**0.5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() != 1:
                continue
            # Random norm weights too, so a writer that mishandles them fails.
            gain = final_gain if name == "model.norm.weight" else 1.0
            param.copy_(gain * (1.0 + 0.1 * torch.randn_like(param)))
            if arch == "gemma3":
                param.sub_(1.0)  # Gemma's RMSNorm multiplies by (1 + w)
    model.generation_config.do_sample = False
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


TinyHf = Callable[..., Path]
TinyGguf = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> TinyHf:
    """Factory: `tiny_hf(arch, hidden_size=64)` → a cached tiny HF checkpoint.
    Treat the folder as read-only (it is shared by the whole session)."""
    built: dict[tuple[str, int], Path] = {}

    def make(arch: str, hidden_size: int = 64) -> Path:
        key = (arch, hidden_size)
        if key not in built:
            built[key] = build_tiny_hf(
                arch, tmp_path_factory.mktemp(f"tiny-{arch}-{hidden_size}"), hidden_size
            )
        return built[key]

    return make


def build_tiny_gguf(checkpoint: Path, out_path: Path, dtype: str = "f32") -> Path:
    """Our GGUF writer on a tiny checkpoint (what `shoptalk export` writes)."""
    from shoptalk.trainer.gguf_writer import write_gguf_from_checkpoint

    return write_gguf_from_checkpoint(checkpoint, out_path, dtype=dtype)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory, tiny_hf: TinyHf) -> TinyGguf:
    """Factory: `tiny_gguf(arch, dtype="f32", hidden_size=64)` → a cached GGUF
    of the tiny checkpoint that real llama.cpp (llama-cpp-python) loads."""
    built: dict[tuple[str, str, int], Path] = {}

    def make(arch: str, dtype: str = "f32", hidden_size: int = 64) -> Path:
        key = (arch, dtype, hidden_size)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"tiny-gguf-{arch}-{dtype}-{hidden_size}")
            built[key] = build_tiny_gguf(
                tiny_hf(arch, hidden_size), folder / f"tiny-{arch}-{dtype}.gguf", dtype
            )
        return built[key]

    return make


def place_base_gguf(data_dir: Path, checkpoint: Path, gguf_file: Path) -> Path:
    """Put a tiny checkpoint's GGUF where the product keeps its base's GGUF
    (as `shoptalk models pull` would), so that evaluation can run the untuned
    base; returns that path."""
    from shoptalk.models.catalog import resolve_base
    from shoptalk.models.provision import base_paths

    target = base_paths(data_dir, resolve_base(str(checkpoint))).gguf
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(gguf_file, target)
    return target


def hf_logits(model: Any, ids: list[int]) -> Any:
    """Next-token logits (n × vocab, numpy float32) of an HF model."""
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def llama_cpp_logits(gguf_path: Path, ids: list[int]) -> Any:
    """Next-token logits (n × vocab, numpy float32) of a GGUF in real llama.cpp."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(
        str(gguf_path), n_ctx=512, logits_all=True, verbose=False, n_threads=1, seed=0
    )
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def decisive_positions(reference: Any, margin: float) -> Any:
    """Positions whose top-1 beats the runner-up by more than `margin`: on a
    random model some positions are near ties that rounding may flip."""
    import numpy as np

    top2 = np.sort(reference, axis=-1)[:, -2:]
    return (top2[:, 1] - top2[:, 0]) > margin


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_tiny_run(
    checkpoint: Path,
    run_dir: Path,
    *,
    seed: int = 7,
    rank: int = 8,
    alpha: float = 16.0,
    train_steps: int = 40,
) -> Path:
    """A finished training run folder as `shoptalk train` leaves it: a PEFT
    LoRA made directly with peft on the tiny checkpoint and `record.json`
    saying complete. B starts random and non-zero (so even `train_steps=0`
    changes the outputs); a few Adam steps on `CODE_TEXT` then give the merged
    model the confident top-1 of a tuned model, which is what quantization
    agreement is measured on."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from shoptalk.models.catalog import resolve_base
    from shoptalk.models.files import sha256_file

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(LORA_TARGETS), lora_dropout=0.0
    )
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    if train_steps:
        from transformers import AutoTokenizer

        ids = torch.tensor([AutoTokenizer.from_pretrained(checkpoint)(CODE_TEXT).input_ids])
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trainable, lr=1e-2)
        peft_model.train()
        for _ in range(train_steps):
            loss = peft_model(input_ids=ids, labels=ids).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        peft_model.eval()
    run_dir.mkdir(parents=True, exist_ok=True)
    adapter = run_dir / "adapter"
    peft_model.save_pretrained(str(adapter), safe_serialization=True)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(checkpoint)
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    base = resolve_base(str(checkpoint))
    record = {
        "run_id": run_dir.name,
        "status": "complete",
        "purpose": "org",
        "developer": None,
        "repo": "/tmp/some-repo",
        "base": {
            "key": base.key,
            "source": base.source,
            "path": str(checkpoint),
            "architecture": base.architecture,
            "sha256": sha256_file(checkpoint / "model.safetensors"),
            "tokenizer_sha256": sha256_file(checkpoint / "tokenizer.json"),
        },
        "dataset": {"manifest_sha256": "d" * 64},
        "seed": seed,
        "best_val_loss": 1.25,
    }
    (run_dir / "record.json").write_text(json.dumps(record, indent=2))
    return run_dir


TinyRun = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_hf: TinyHf) -> TinyRun:
    """Factory: `tiny_run(arch, seed=7, train_steps=40)` → a cached complete
    run folder (see `build_tiny_run`; `train_steps=0` is cheap: random B only).
    Shared by the session: copy it before changing it."""
    built: dict[tuple[str, int, int], Path] = {}

    def make(arch: str, seed: int = 7, train_steps: int = 40) -> Path:
        key = (arch, seed, train_steps)
        if key not in built:
            root = tmp_path_factory.mktemp(f"tiny-run-{arch}-{seed}")
            built[key] = build_tiny_run(
                tiny_hf(arch), root / f"run-{arch}-{seed}", seed=seed, train_steps=train_steps
            )
        return built[key]

    return make
