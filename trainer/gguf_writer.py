"""Our HF → GGUF converter, written on gguf-py, for the catalog's
architectures (gemma3, qwen2, llama).

llama.cpp's own conversion scripts are not part of any installable wheel, so
this module does the part of `convert_hf_to_gguf.py` / `convert_lora_to_gguf.py`
ShopTalk needs: hyperparameter keys, tensor names (`gguf.TensorNameMap`), the
tokenizer (SentencePiece "llama" or byte-level BPE "gpt2" with merges and
pre-tokenizer id), and each architecture's quirks:

- Gemma's RMSNorm multiplies by (1 + w); GGUF stores 1 + w.
- Llama's q/k projections are permuted the way llama.cpp's converter does it.
- Tied embeddings: no `output.weight`; llama.cpp reuses `token_embd`.
- A base that came from a GGUF (the packaged default Gemma) keeps that GGUF's
  tokenizer and general metadata instead of re-deriving them.

`write_gguf` writes a full model (F32/F16; quantization happens afterwards in
llama.cpp), `write_lora_gguf` a GGUF LoRA adapter that llama.cpp applies at run
time. Outputs are written under a temp name and renamed into place.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from shoptalk.models.catalog import SUPPORTED_ARCHITECTURES, hf_architecture
from shoptalk.models.errors import ShopTalkError
from shoptalk.models.files import fault_point, final_name, free_bytes, partial_name
from shoptalk.models.progress import Report, quiet

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)
# gguf-py logs every file it writes at INFO, which would cut through progress bars.
logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)

GGUF_ARCH = {
    "gemma3": gguf.MODEL_ARCH.GEMMA3,
    "qwen2": gguf.MODEL_ARCH.QWEN2,
    "llama": gguf.MODEL_ARCH.LLAMA,
}
FLOAT_TYPES = {
    "f32": (np.float32, gguf.LlamaFileType.ALL_F32),
    "f16": (np.float16, gguf.LlamaFileType.MOSTLY_F16),
}
# llama.cpp's id for the pre-tokenizer regex of byte-level BPE vocabularies.
BPE_PRE_TOKENIZER = {"qwen2": "qwen2", "llama": "llama-bpe"}
# Keys carried over from a source GGUF besides `tokenizer.*`.
_CARRIED_GENERAL = ("name", "basename", "size_label", "license", "tags", "languages", "finetune")
# llama.cpp's gemma3 hard-codes these; a checkpoint that differs cannot be served.
_GEMMA3_SWA_PERIOD = 6
_GEMMA3_LOCAL_ROPE_BASE = 10000.0


class GGUFWriteError(ShopTalkError):
    pass


def architecture_of(config: Mapping[str, Any]) -> str:
    """Our architecture name for an HF config dict, or a clear error."""
    model_type = str(config.get("model_type", ""))
    arch = hf_architecture(dict(config))
    if arch is None:
        raise GGUFWriteError(
            f"cannot write GGUF for model_type {model_type!r}: supported architectures are "
            + ", ".join(SUPPORTED_ARCHITECTURES)
            + "; pick a base from `shoptalk models list`"
        )
    return arch


def text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The language-model part of a config (multimodal Gemma nests it)."""
    inner = config.get("text_config")
    if isinstance(inner, Mapping) and inner.get("hidden_size"):
        return dict(inner)
    return dict(config)


def _head_dim(cfg: Mapping[str, Any]) -> int:
    head_dim = cfg.get("head_dim")
    return int(head_dim) if head_dim else int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])


def _rope(cfg: Mapping[str, Any], layer_type: str | None = None) -> dict[str, Any]:
    """Rope parameters in one shape for transformers 4 (`rope_theta` +
    `rope_scaling`) and 5 (`rope_parameters`, per layer type for Gemma 3)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, Mapping) and layer_type is not None and layer_type in params:
        params = params[layer_type]
    if isinstance(params, Mapping) and "rope_theta" in params:
        out = dict(params)
    else:
        out = dict(cfg.get("rope_scaling") or {})
        out["rope_theta"] = cfg.get("rope_theta", 10000.0)
    out["rope_type"] = str(out.get("rope_type") or out.get("type") or "default")
    return out


# --- tokenizer -------------------------------------------------------------


@dataclass
class Vocabulary:
    """A tokenizer as GGUF stores it."""

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str
    tokens: list[str]
    scores: list[float]
    types: list[int]
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None

    def pad_to(self, n_vocab: int) -> None:
        """llama.cpp needs one token per embedding row; checkpoints often pad
        the embedding matrix beyond the tokenizer."""
        if len(self.tokens) > n_vocab:
            raise GGUFWriteError(
                f"the tokenizer has {len(self.tokens)} tokens but the model only {n_vocab} "
                "embedding rows; the checkpoint's tokenizer does not belong to its weights"
            )
        for i in range(len(self.tokens), n_vocab):
            self.tokens.append(f"[PAD{i}]")
            self.scores.append(-1000.0)
            self.types.append(gguf.TokenType.UNUSED)


def read_vocabulary(tokenizer_dir: Path, arch: str) -> Vocabulary:
    """The tokenizer of an HF checkpoint folder, for GGUF."""
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as exc:
        raise GGUFWriteError(
            f"cannot load the tokenizer in {tokenizer_dir} ({exc}); the base checkpoint is incomplete"
        ) from None
    tokenizer_json: dict[str, Any] = {}
    if (tokenizer_dir / "tokenizer.json").is_file():
        tokenizer_json = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    added = {int(t["id"]): t for t in tokenizer_json.get("added_tokens", [])}
    model = tokenizer_json.get("model", {})

    if (tokenizer_dir / "tokenizer.model").is_file() and arch in ("gemma3", "llama"):
        vocab = _sentencepiece_vocabulary(tokenizer_dir / "tokenizer.model", added)
    elif model.get("type") == "BPE" and not model.get("byte_fallback", False):
        if arch not in BPE_PRE_TOKENIZER:
            raise GGUFWriteError(f"a byte-level BPE tokenizer is not supported for {arch}")
        vocab = _byte_level_vocabulary(model, added, BPE_PRE_TOKENIZER[arch])
    elif model.get("type") == "BPE":
        vocab = _byte_fallback_vocabulary(tokenizer_json, added)
    else:
        raise GGUFWriteError(
            f"{tokenizer_dir}: no tokenizer.model and no BPE tokenizer.json; "
            "cannot export this tokenizer to GGUF"
        )
    for role in ("bos", "eos", "unk", "pad"):
        token_id = getattr(hf, f"{role}_token_id", None)
        if token_id is not None:
            vocab.special_ids[role] = int(token_id)
    probe = hf("a").input_ids
    vocab.add_bos = (
        "bos" in vocab.special_ids and bool(probe) and probe[0] == vocab.special_ids["bos"]
    )
    vocab.add_eos = (
        "eos" in vocab.special_ids and bool(probe) and probe[-1] == vocab.special_ids["eos"]
    )
    return vocab


def _added_type(entry: Mapping[str, Any]) -> gguf.TokenType:
    return gguf.TokenType.CONTROL if entry.get("special") else gguf.TokenType.USER_DEFINED


def _append_added(vocab: Vocabulary, added: Mapping[int, Mapping[str, Any]]) -> None:
    """Added tokens beyond the base vocabulary; ids must follow on."""
    for token_id in sorted(i for i in added if i >= len(vocab.tokens)):
        if token_id != len(vocab.tokens):
            raise GGUFWriteError(f"added token ids are not consecutive (gap before id {token_id})")
        vocab.tokens.append(str(added[token_id]["content"]))
        vocab.scores.append(-1000.0)
        vocab.types.append(int(_added_type(added[token_id])))


def _sentencepiece_vocabulary(
    model_file: Path, added: Mapping[int, Mapping[str, Any]]
) -> Vocabulary:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        if sp.is_unknown(i):
            kind = gguf.TokenType.UNKNOWN
        elif sp.is_control(i):
            kind = gguf.TokenType.CONTROL
        elif sp.is_byte(i):
            kind = gguf.TokenType.BYTE
        elif sp.is_unused(i):
            kind = gguf.TokenType.UNUSED
        elif i in added:
            # SentencePiece user-defined symbols (FIM tokens): the HF
            # tokenizer lists them as added tokens.
            kind = _added_type(added[i])
        else:
            kind = gguf.TokenType.NORMAL
        types.append(int(kind))
    pieces = sp.encode("x", out_type=str)
    vocab = Vocabulary(
        model="llama",
        pre="default",
        tokens=tokens,
        scores=scores,
        types=types,
        add_space_prefix=bool(pieces) and pieces[0].startswith("\u2581"),
    )
    _append_added(vocab, added)
    return vocab


def _merges(model: Mapping[str, Any]) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _byte_level_vocabulary(
    model: Mapping[str, Any], added: Mapping[int, Mapping[str, Any]], pre: str
) -> Vocabulary:
    by_id = {int(i): str(t) for t, i in model["vocab"].items()}
    size = max(by_id) + 1 if by_id else 0
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    types = [
        int(gguf.TokenType.NORMAL if i in by_id else gguf.TokenType.UNUSED) for i in range(size)
    ]
    for i, entry in added.items():
        if i < size:
            types[i] = int(_added_type(entry))
    vocab = Vocabulary(
        model="gpt2",
        pre=pre,
        tokens=tokens,
        scores=[0.0] * size,
        types=types,
        merges=_merges(model),
    )
    _append_added(vocab, added)
    return vocab


def _byte_fallback_vocabulary(
    tokenizer_json: Mapping[str, Any], added: Mapping[int, Mapping[str, Any]]
) -> Vocabulary:
    """A SentencePiece-style BPE known only from tokenizer.json: scores follow
    the id order, which is SentencePiece BPE's merge priority."""
    model = tokenizer_json["model"]
    by_id = {int(i): str(t) for t, i in model["vocab"].items()}
    size = max(by_id) + 1 if by_id else 0
    tokens, scores, types = [], [], []
    for i in range(size):
        token = by_id.get(i, f"[PAD{i}]")
        tokens.append(token)
        scores.append(-float(i))
        if i in added:
            kind = _added_type(added[i])
        elif token.startswith("<0x") and len(token) == 6 and token.endswith(">"):
            kind = gguf.TokenType.BYTE
        elif i not in by_id:
            kind = gguf.TokenType.UNUSED
        else:
            kind = gguf.TokenType.NORMAL
        types.append(int(kind))
    text = json.dumps(tokenizer_json.get("normalizer")) + json.dumps(
        tokenizer_json.get("pre_tokenizer")
    )
    prepends = '"Prepend"' in text or ('"Metaspace"' in text and '"never"' not in text)
    vocab = Vocabulary(
        model="llama",
        pre="default",
        tokens=tokens,
        scores=scores,
        types=types,
        add_space_prefix=prepends,
    )
    _append_added(vocab, added)
    return vocab


# --- metadata --------------------------------------------------------------

MetadataValue = tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]


def _scalar(value: Any) -> MetadataValue:
    if isinstance(value, bool):
        return value, gguf.GGUFValueType.BOOL, None
    if isinstance(value, int):
        return value, gguf.GGUFValueType.UINT32, None
    if isinstance(value, float):
        return value, gguf.GGUFValueType.FLOAT32, None
    return str(value), gguf.GGUFValueType.STRING, None


def model_metadata(
    arch: str, config: Mapping[str, Any], file_type: int
) -> dict[str, MetadataValue]:
    """Hyperparameter keys llama.cpp reads for `arch`; refuses what it cannot run."""
    cfg = text_config(config)
    name = gguf.MODEL_ARCH_NAMES[GGUF_ARCH[arch]]
    llm = gguf.Keys.LLM
    attn = gguf.Keys.Attention
    rope_keys = gguf.Keys.Rope
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    head_dim = _head_dim(cfg)
    meta: dict[str, MetadataValue] = {
        gguf.Keys.General.TYPE: _scalar("model"),
        gguf.Keys.General.FILE_TYPE: _scalar(file_type),
        llm.CONTEXT_LENGTH.format(arch=name): _scalar(
            int(cfg.get("max_position_embeddings") or 2048)
        ),
        llm.EMBEDDING_LENGTH.format(arch=name): _scalar(hidden),
        llm.BLOCK_COUNT.format(arch=name): _scalar(int(cfg["num_hidden_layers"])),
        llm.FEED_FORWARD_LENGTH.format(arch=name): _scalar(int(cfg["intermediate_size"])),
        attn.HEAD_COUNT.format(arch=name): _scalar(heads),
        attn.HEAD_COUNT_KV.format(arch=name): _scalar(int(cfg.get("num_key_value_heads") or heads)),
        attn.LAYERNORM_RMS_EPS.format(arch=name): _scalar(float(cfg.get("rms_norm_eps", 1e-6))),
    }
    if arch == "gemma3" or head_dim != hidden // heads:
        meta[attn.KEY_LENGTH.format(arch=name)] = _scalar(head_dim)
        meta[attn.VALUE_LENGTH.format(arch=name)] = _scalar(head_dim)

    if arch == "gemma3":
        _check_gemma3(cfg, head_dim)
        rope = _rope(cfg, "full_attention")
        meta[attn.SLIDING_WINDOW.format(arch=name)] = _scalar(int(cfg["sliding_window"]))
    else:
        rope = _rope(cfg)
        if arch == "qwen2" and cfg.get("use_sliding_window"):
            raise GGUFWriteError("qwen2 checkpoints with use_sliding_window=true are not supported")
    meta[rope_keys.FREQ_BASE.format(arch=name)] = _scalar(float(rope["rope_theta"]))
    if arch == "llama":
        meta[rope_keys.DIMENSION_COUNT.format(arch=name)] = _scalar(head_dim)
    rope_type = rope["rope_type"]
    if rope_type == "linear":
        meta[rope_keys.SCALING_TYPE.format(arch=name)] = _scalar("linear")
        meta[rope_keys.SCALING_FACTOR.format(arch=name)] = _scalar(float(rope["factor"]))
    elif rope_type not in ("default",) and not (arch == "llama" and rope_type == "llama3"):
        raise GGUFWriteError(f"rope scaling {rope_type!r} is not supported for {arch}")
    return meta


def _check_gemma3(cfg: Mapping[str, Any], head_dim: int) -> None:
    layers = int(cfg["num_hidden_layers"])
    expected = [
        "full_attention" if (i + 1) % _GEMMA3_SWA_PERIOD == 0 else "sliding_attention"
        for i in range(layers)
    ]
    layer_types = cfg.get("layer_types") or expected
    problems = []
    if list(layer_types) != expected:
        problems.append("its sliding/global layer pattern is not every 6th layer global")
    if float(_rope(cfg, "sliding_attention")["rope_theta"]) != _GEMMA3_LOCAL_ROPE_BASE:
        problems.append("its local rope base is not 10000")
    if int(cfg.get("query_pre_attn_scalar") or head_dim) != head_dim:
        problems.append("query_pre_attn_scalar differs from head_dim")
    if cfg.get("final_logit_softcapping") or cfg.get("attn_logit_softcapping"):
        problems.append("it uses logit soft-capping")
    if problems:
        raise GGUFWriteError(
            "this Gemma 3 checkpoint cannot run in llama.cpp: " + "; ".join(problems)
        )


def vocabulary_metadata(vocab: Vocabulary) -> dict[str, MetadataValue]:
    tok = gguf.Keys.Tokenizer
    meta: dict[str, MetadataValue] = {
        tok.MODEL: _scalar(vocab.model),
        tok.PRE: _scalar(vocab.pre),
        tok.LIST: (vocab.tokens, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING),
        tok.SCORES: (vocab.scores, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32),
        tok.TOKEN_TYPE: (vocab.types, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32),
    }
    if vocab.merges:
        meta[tok.MERGES] = (vocab.merges, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING)
    keys = {"bos": tok.BOS_ID, "eos": tok.EOS_ID, "unk": tok.UNK_ID, "pad": tok.PAD_ID}
    for role, token_id in vocab.special_ids.items():
        meta[keys[role]] = _scalar(token_id)
    meta[tok.ADD_BOS] = _scalar(vocab.add_bos)
    meta[tok.ADD_EOS] = _scalar(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        meta[tok.ADD_PREFIX] = _scalar(vocab.add_space_prefix)
    return meta


def carried_metadata(source_gguf: Path) -> dict[str, MetadataValue]:
    """Tokenizer and descriptive keys of the GGUF a base was converted from."""
    try:
        reader = gguf.GGUFReader(source_gguf)
    except (OSError, ValueError) as exc:
        raise GGUFWriteError(
            f"cannot read the base GGUF {source_gguf} ({exc}); pull it again"
        ) from None
    carried: dict[str, MetadataValue] = {}
    general = {f"general.{key}" for key in _CARRIED_GENERAL}
    for key, reader_field in reader.fields.items():
        if not (key.startswith("tokenizer.") or key in general):
            continue
        kind = reader_field.types[0]
        sub = reader_field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        carried[key] = (reader_field.contents(), kind, sub)
    return carried


# --- tensors ---------------------------------------------------------------


def _permute_rows(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rope layout for Llama q/k (as `LlamaModel.permute` in
    convert_hf_to_gguf.py): interleaved halves per head."""
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def _strip_prefix(name: str) -> str:
    for prefix in ("model.language_model.", "language_model."):
        if name.startswith(prefix):
            rest = name[len(prefix) :]
            return rest if rest.startswith(("model.", "lm_head")) else "model." + rest
    return name


def _skipped(name: str) -> bool:
    return (
        name.endswith("rotary_emb.inv_freq")
        or name.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower."))
        or name.startswith("model.multi_modal_projector.")
    )


def _llama3_rope_factors(cfg: Mapping[str, Any]) -> np.ndarray:
    """The `rope_freqs` tensor llama.cpp needs for Llama 3.x rope scaling."""
    rope = _rope(cfg)
    dim = _head_dim(cfg)
    base = float(rope["rope_theta"])
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    factors = []
    for i in range(0, dim, 2):
        freq = 1.0 / (base ** (i / dim))
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    import torch

    array: np.ndarray = tensor.detach().to(torch.float32).cpu().numpy()
    return array


def gguf_tensor_name(arch: str, n_layers: int, hf_name: str) -> str | None:
    """GGUF name of an HF weight (`blk.0.attn_q.weight`), None if unknown."""
    name_map = gguf.get_tensor_name_map(GGUF_ARCH[arch], n_layers)
    mapped = name_map.get_name(_strip_prefix(hf_name), try_suffixes=(".weight", ".bias"))
    return str(mapped) if mapped else None


def model_tensors(
    arch: str, config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]
) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every weight of the model."""
    cfg = text_config(config)
    n_layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    tied = bool(config.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False)))
    names = {_strip_prefix(n): n for n in state_dict if not _skipped(_strip_prefix(n))}
    unknown = []
    if not tied and "lm_head.weight" not in names:
        raise GGUFWriteError(
            "the checkpoint has no lm_head.weight although embeddings are not tied"
        )
    for name in sorted(names):
        if tied and name == "lm_head.weight":
            continue
        target = gguf_tensor_name(arch, n_layers, name)
        if target is None:
            unknown.append(name)
            continue
        data = _to_numpy(state_dict[names[name]])
        if arch == "gemma3" and name.endswith("norm.weight"):
            data = data + 1.0
        if arch == "llama" and name.endswith("self_attn.q_proj.weight"):
            data = _permute_rows(data, heads)
        if arch == "llama" and name.endswith("self_attn.k_proj.weight"):
            data = _permute_rows(data, kv_heads)
        yield target, data
    if unknown:
        raise GGUFWriteError(
            f"{len(unknown)} weights have no GGUF name for {arch} (e.g. {', '.join(unknown[:3])}); "
            "the checkpoint is not a plain causal LM of this architecture"
        )
    if arch == "llama" and _rope(cfg)["rope_type"] == "llama3":
        yield gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", _llama3_rope_factors(cfg)


# --- writing ---------------------------------------------------------------


def _write_file(
    out_path: Path,
    arch: str,
    metadata: Mapping[str, MetadataValue],
    tensors: list[tuple[str, np.ndarray]],
) -> Path:
    """Write a GGUF under a temp name beside `out_path`, then rename it."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    needed = sum(t.nbytes for _, t in tensors) + (1 << 20)
    available = free_bytes(out_path.parent)
    if available < needed:
        raise GGUFWriteError(
            f"not enough disk space for {final_name(out_path)}: needs {needed / 1e6:.1f} MB, "
            f"{available / 1e6:.1f} MB free in {out_path.parent}; free some space and run again"
        )
    fault_point(out_path, "begin")
    tmp = partial_name(out_path)
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[GGUF_ARCH[arch]])
    try:
        for key, (value, kind, sub) in metadata.items():
            if key == gguf.Keys.General.ARCHITECTURE:
                continue
            writer.add_key_value(key, value, kind, sub_type=sub)
        for name, data in tensors:
            writer.add_tensor(name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        fault_point(out_path, "commit")
        os.replace(tmp, out_path)
    except OSError as exc:
        _discard(writer, tmp)
        # numpy's tofile reports a short write (fwrite on a full disk) without errno.
        if exc.errno in (None, errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise GGUFWriteError(
                f"the disk filled up while writing {final_name(out_path)}; nothing was kept. "
                "Free some space and run again"
            ) from None
        raise
    except BaseException:
        _discard(writer, tmp)
        raise
    return out_path


def _discard(writer: gguf.GGUFWriter, tmp: Path) -> None:
    """Remove a failed write's temp file. Closing flushes what is buffered,
    which fails again on a full disk: the file goes either way."""
    try:
        writer.close()
    except OSError:
        pass
    finally:
        tmp.unlink(missing_ok=True)


def write_gguf(
    out_path: Path,
    *,
    config: Mapping[str, Any],
    state_dict: Mapping[str, torch.Tensor],
    tokenizer_dir: Path,
    dtype: str = "f16",
    source_gguf: Path | None = None,
    name: str | None = None,
    progress: Report = quiet,
) -> Path:
    """Write a full model GGUF (F32 or F16; 1-D tensors always F32).

    `config` is the HF config as a dict, `state_dict` the HF weights (e.g. of a
    merged model). With `source_gguf` (the GGUF the base was converted from)
    the tokenizer and descriptive keys come from it unchanged."""
    if dtype not in FLOAT_TYPES:
        raise GGUFWriteError(
            f"unknown GGUF float type {dtype!r}; use one of {', '.join(FLOAT_TYPES)}"
        )
    arch = architecture_of(config)
    np_dtype, file_type = FLOAT_TYPES[dtype]
    metadata = model_metadata(arch, config, int(file_type))
    if name:
        metadata[gguf.Keys.General.NAME] = _scalar(name)
    progress("converting weights")
    tensors = [
        (tensor_name, data if data.ndim == 1 else data.astype(np_dtype))
        for tensor_name, data in model_tensors(arch, config, state_dict)
    ]
    embedding = next((t for n, t in tensors if n == "token_embd.weight"), None)
    if embedding is None:
        raise GGUFWriteError("the checkpoint has no token embedding (model.embed_tokens.weight)")
    if source_gguf is not None:
        progress(f"carrying the tokenizer over from {source_gguf.name}")
        carried = carried_metadata(source_gguf)
        n_tokens = len(carried.get(gguf.Keys.Tokenizer.LIST, ([],))[0])
        if n_tokens != embedding.shape[0]:
            raise GGUFWriteError(
                f"{source_gguf.name} has {n_tokens} tokens but the model {embedding.shape[0]} "
                "embedding rows; it is not the GGUF this base was converted from"
            )
        metadata.update(carried)
    else:
        progress("converting the tokenizer")
        vocab = read_vocabulary(tokenizer_dir, arch)
        vocab.pad_to(int(embedding.shape[0]))
        metadata.update(vocabulary_metadata(vocab))
    progress(f"writing {out_path.name}")
    return _write_file(out_path, arch, metadata, tensors)


def load_checkpoint(checkpoint: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and all safetensors weights of an HF checkpoint folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        config: dict[str, Any] = json.loads((checkpoint / "config.json").read_text())
    except FileNotFoundError:
        raise GGUFWriteError(
            f"{checkpoint} has no config.json; it is not an HF checkpoint"
        ) from None
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise GGUFWriteError(f"{checkpoint} has no .safetensors weights")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise GGUFWriteError(
                f"{file} is damaged ({exc}); download or convert the checkpoint again"
            ) from None
    return config, state


def write_gguf_from_checkpoint(
    checkpoint: Path,
    out_path: Path,
    dtype: str = "f16",
    source_gguf: Path | None = None,
    progress: Report = quiet,
) -> Path:
    """An HF checkpoint folder (config, safetensors, tokenizer) → GGUF."""
    config, state = load_checkpoint(checkpoint)
    return write_gguf(
        out_path,
        config=config,
        state_dict=state,
        tokenizer_dir=checkpoint,
        dtype=dtype,
        source_gguf=source_gguf,
        progress=progress,
    )


# --- LoRA adapters ---------------------------------------------------------


@dataclass(frozen=True)
class LoraWeights:
    """One adapted linear layer: HF weight name and PEFT's A (r × in) and
    B (out × r), with the scale PEFT applies (alpha / r, or alpha / sqrt(r))."""

    weight_name: str
    a: torch.Tensor
    b: torch.Tensor
    scale: float


def write_lora_gguf(
    out_path: Path,
    *,
    config: Mapping[str, Any],
    layers: list[LoraWeights],
    dtype: str = "f32",
    name: str | None = None,
) -> Path:
    """A GGUF LoRA adapter llama.cpp applies on top of the base at run time.

    llama.cpp scales each pair by `adapter.lora.alpha / rank`; any other
    per-layer scale (rank/alpha patterns, rsLoRA) is folded into B so one
    alpha serves every layer."""
    if dtype not in FLOAT_TYPES:
        raise GGUFWriteError(
            f"unknown GGUF float type {dtype!r}; use one of {', '.join(FLOAT_TYPES)}"
        )
    if not layers:
        raise GGUFWriteError("the adapter has no LoRA weights")
    arch = architecture_of(config)
    cfg = text_config(config)
    n_layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    np_dtype = FLOAT_TYPES[dtype][0]
    alpha = float(layers[0].scale * layers[0].a.shape[0])
    tensors: list[tuple[str, np.ndarray]] = []
    for layer in sorted(layers, key=lambda item: item.weight_name):
        target = gguf_tensor_name(arch, n_layers, layer.weight_name)
        if target is None or not target.endswith(".weight") or layer.a.dim() != 2:
            raise GGUFWriteError(
                f"LoRA on {layer.weight_name} cannot be exported as a GGUF adapter "
                "(only linear layers of the transformer blocks); export the merged model instead"
            )
        rank = int(layer.a.shape[0])
        a = _to_numpy(layer.a)
        b = _to_numpy(layer.b) * (layer.scale * rank / alpha)
        stripped = _strip_prefix(layer.weight_name)
        if arch == "llama" and stripped.endswith("self_attn.q_proj.weight"):
            b = _permute_rows(b, heads)
        if arch == "llama" and stripped.endswith("self_attn.k_proj.weight"):
            b = _permute_rows(b, kv_heads)
        tensors.append((target + ".lora_a", a.astype(np_dtype)))
        tensors.append((target + ".lora_b", b.astype(np_dtype)))
    metadata: dict[str, MetadataValue] = {
        gguf.Keys.General.TYPE: _scalar("adapter"),
        gguf.Keys.Adapter.TYPE: _scalar("lora"),
        gguf.Keys.Adapter.LORA_ALPHA: _scalar(alpha),
        gguf.Keys.General.FILE_TYPE: _scalar(int(FLOAT_TYPES[dtype][1])),
    }
    if name:
        metadata[gguf.Keys.General.NAME] = _scalar(name)
    return _write_file(out_path, arch, metadata, tensors)
