"""The embedding half of the module lookup: module-document vectors, the
served retriever, and the calibrated confidence of an answer.

A retriever export (written by `shoptalk.trainer.retriever`, one folder per
training run) is an embedding checkpoint (`config.json`, `model.safetensors`,
`tokenizer.json`) plus the module documents' vectors at the repository's HEAD
(`module_embeddings.npy`, rows in `modules.json` order with each document's
digest), a memory of the commit subjects it was trained on (their vectors and
modules: a query's nearest past subjects vote for their modules) and
`retriever.json` (run id, figures, calibration). The repository's
lookup folder in the artifact store says what is served:

    <repo store>/lookup/current.json        the promoted (gated) retriever export
    <repo store>/lookup/history.json        {module: [recent commit subjects]}, from mining
    <repo store>/lookup/base-embeddings.npz the zero-shot base's vectors, by digest

With no promoted retriever the base (all-MiniLM-L6-v2) answers zero-shot when
its package is installed; without it the lookup is BM25 alone. A document
whose text changed since the export (an edited file, a new module) is
re-embedded when first needed, with the served encoder. numpy only: the
server imports this.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shoptalk.models.embedder import Embedder, EmbedderError, load_base_embedder
from shoptalk.models.files import atomic_open, write_json_atomic
from shoptalk.models.module_docs import ModuleDoc

log = logging.getLogger(__name__)

LOOKUP_DIR = "lookup"
EMBEDDINGS_FILE = "module_embeddings.npy"
RESIDUALS_FILE = "module_residuals.npy"  # rows in `residual_ids.json` order
MEMORY_FILE = "memory_embeddings.npy"  # the training subjects' vectors, rows in `memory.json` order
MEMORY_NEIGHBOURS = 5
MODULES_FILE = "modules.json"
RETRIEVER_FILE = "retriever.json"
BASE_CACHE = "base-embeddings.npz"
CONFIDENCE_LEVELS = ("high", "medium", "low")
QUERY_CACHE = 512


@dataclass(frozen=True)
class Calibration:
    """Thresholds on how far the top answer's cosine (query vs module
    document) stands above the mean cosine of all candidate modules.

    Below `abstain_below` the lookup says no module clearly matches; at or
    above `high_at` the answer is "high", above `medium_at` "medium", else
    "low". Fitted on held-out queries and made-up no-match queries
    (`fit_calibration`); the defaults are the base model's, fitted on three
    public repositories (docs/benchmarks.md)."""

    abstain_below: float
    medium_at: float
    high_at: float
    fitted_on: str = "defaults"

    def level(self, score: float) -> str:
        if score >= self.high_at:
            return "high"
        if score >= self.medium_at:
            return "medium"
        return "low"

    def abstains(self, score: float) -> bool:
        return score < self.abstain_below

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, default: Calibration) -> Calibration:
        try:
            return cls(
                abstain_below=float(data["abstain_below"]),  # type: ignore[index]
                medium_at=float(data["medium_at"]),  # type: ignore[index]
                high_at=float(data["high_at"]),  # type: ignore[index]
                fitted_on=str(data.get("fitted_on", "")),  # type: ignore[union-attr]
            )
        except (TypeError, KeyError, ValueError):
            return default


# all-MiniLM-L6-v2 zero-shot. Fitted on pallets/click's validation commit
# subjects (bench_lookup) the abstention threshold came out at 0.056, where
# made-up requests on a small repository score 0.04-0.09 and plain requests
# 0.33-0.55: 0.10 abstains on those at some cost on terse commit subjects
# (docs/benchmarks.md has the cost per repository).
BASE_CALIBRATION = Calibration(
    abstain_below=0.10, medium_at=0.137, high_at=0.218, fitted_on="click validation queries"
)


def fit_calibration(
    real_top: list[float], real_correct: list[bool], nonsense_top: list[float], fitted_on: str
) -> Calibration:
    """Thresholds from held-out queries (top cosine, was the top answer right?)
    and made-up no-match queries (top cosine).

    Abstention: between the no-match queries (their 95th percentile) and the
    real queries' correct answers (their 5th percentile): half-way when the two
    are apart, else at the correct answers' 5th percentile, so that abstaining
    costs little of top-1. High: where answers at or above it were right at
    least 3 times in 4; medium: half-way. (docs/benchmarks.md, "module
    lookup": on click the 90th percentile alone abstained on 23 of the
    benchmark's 30 made-up queries, this rule on 26, at 3.2 points of top-1.)"""
    right = sorted(s for s, ok in zip(real_top, real_correct, strict=True) if ok)
    abstain = float(np.quantile(nonsense_top, 0.95)) if nonsense_top else 0.0
    if right:
        low_right = float(np.quantile(right, 0.05))
        abstain = (abstain + low_right) / 2 if low_right > abstain else low_right
    high = _precision_threshold(real_top, real_correct, 0.75, floor=abstain)
    medium = (abstain + high) / 2
    return Calibration(round(abstain, 4), round(medium, 4), round(high, 4), fitted_on)


def _precision_threshold(
    scores: list[float], correct: list[bool], precision: float, floor: float
) -> float:
    """The lowest score from which the answers at or above it are right `precision` of the time."""
    pairs = sorted(zip(scores, correct, strict=True), reverse=True)
    best = max([s for s, _ in pairs], default=floor + 0.2) + 1e-6
    hits = 0
    for count, (score, ok) in enumerate(pairs, 1):
        hits += ok
        if hits / count >= precision and count >= 3:
            best = score
    return max(best, floor + 0.02)


def lookup_dir(store_root: Path) -> Path:
    return store_root / LOOKUP_DIR


def read_history(store_root: Path) -> dict[str, list[str]]:
    """`{module: [subjects]}` written by the last retriever training; {} when none."""
    try:
        data = json.loads((lookup_dir(store_root) / "history.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): [str(s) for s in v][:50] for k, v in data.items() if isinstance(v, list)}


def write_history(store_root: Path, history: Mapping[str, list[str]]) -> None:
    write_json_atomic(lookup_dir(store_root) / "history.json", dict(history))


def promoted_export(store_root: Path) -> Path | None:
    """The promoted retriever export folder, or None."""
    try:
        data = json.loads((lookup_dir(store_root) / "current.json").read_text())
        folder = Path(data["dir"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return folder if (folder / RETRIEVER_FILE).is_file() else None


def promote_export(store_root: Path, export: Path, metrics: Mapping[str, Any]) -> None:
    """Serve `export` from now on (atomic pointer move)."""
    write_json_atomic(
        lookup_dir(store_root) / "current.json",
        {"dir": str(export.resolve()), "metrics": dict(metrics), "promoted_at": time.time()},
    )


class DenseIndex:
    """Module-document vectors and the encoder for queries (cosine scores)."""

    def __init__(
        self,
        embedder: Embedder,
        vectors: Mapping[str, tuple[str, np.ndarray]],
        calibration: Calibration,
        source: str,
        run_id: str | None = None,
        cache_file: Path | None = None,
        residuals: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.embedder = embedder
        # Learned per module in training, added to a re-embedded document's vector.
        self.residuals = dict(residuals or {})
        self.calibration = calibration
        self.source = source  # "trained" | "zero-shot"
        self.run_id = run_id
        self.cache_file = cache_file
        self._vectors: dict[str, tuple[str, np.ndarray]] = dict(vectors)  # id -> (digest, vector)
        self._ids: list[str] = []
        self._matrix = np.zeros((0, embedder.dimension), dtype=np.float32)
        self._query_vectors: dict[str, np.ndarray] = {}  # repeated queries are not re-encoded
        self.memory = Memory.empty(embedder.dimension)

    def clear_cache(self) -> None:
        self._query_vectors.clear()

    def sync(self, docs: Mapping[str, ModuleDoc], max_new: int | None = None) -> int:
        """Embed the documents that are new or changed (at most `max_new`);
        returns how many were embedded. The matrix then holds every doc with a vector."""
        stale = [d for d in docs.values() if self._vectors.get(d.id, ("",))[0] != d.digest]
        if max_new is not None:
            stale = stale[:max_new]
        if stale:
            started = time.monotonic()
            vectors = self.embedder.encode([d.text for d in stale])
            for doc, vector in zip(stale, vectors, strict=True):
                self._vectors[doc.id] = (doc.digest, self._with_residual(doc.id, vector))
            log.info(
                "embedded %d module documents in %.1fs", len(stale), time.monotonic() - started
            )
            self._save_cache()
        self._ids = [mid for mid in docs if mid in self._vectors]
        self._matrix = (
            np.stack([self._vectors[mid][1] for mid in self._ids])
            if self._ids
            else np.zeros((0, self.embedder.dimension), dtype=np.float32)
        )
        return len(stale)

    def remember(self, vectors: Mapping[str, tuple[str, np.ndarray]]) -> None:
        """Take document vectors computed elsewhere ({id: (digest, unit vector)}),
        e.g. by the trainer's torch encoder; the residuals are added here."""
        for mid, (digest, vector) in vectors.items():
            self._vectors[mid] = (digest, self._with_residual(mid, vector))

    def _with_residual(self, module_id: str, vector: np.ndarray) -> np.ndarray:
        residual = self.residuals.get(module_id)
        if residual is None:
            return vector
        moved = vector + residual
        return (moved / max(float(np.linalg.norm(moved)), 1e-12)).astype(np.float32)

    def query_vector(self, query: str) -> np.ndarray:
        vector = self._query_vectors.get(query)
        if vector is None:
            vector = self.embedder.encode([query])[0]
            if len(self._query_vectors) >= QUERY_CACHE:
                self._query_vectors.pop(next(iter(self._query_vectors)))
            self._query_vectors[query] = vector
        return vector

    def recalled(self, query: str, k: int = MEMORY_NEIGHBOURS) -> list[tuple[str, str]]:
        """Modules the query's nearest past subjects touched, best first, each with
        the subject that voted most for it; [] without a memory."""
        return self.memory.votes(self.query_vector(query), k)

    def scores(self, query: str) -> dict[str, float]:
        """Cosine of the query with every synced module document."""
        if not self._ids:
            return {}
        vector = self.query_vector(query)
        values = self._matrix @ vector
        return {mid: float(v) for mid, v in zip(self._ids, values, strict=True)}

    def _save_cache(self) -> None:
        if self.cache_file is None:
            return
        ids = sorted(self._vectors)
        try:
            with atomic_open(self.cache_file, "wb") as handle:
                np.savez(
                    handle,
                    ids=np.array(ids),
                    digests=np.array([self._vectors[i][0] for i in ids]),
                    vectors=np.stack([self._vectors[i][1] for i in ids])
                    if ids
                    else np.zeros((0, self.embedder.dimension), dtype=np.float32),
                )
        except OSError as exc:
            log.warning("could not cache the base module vectors: %s", exc)


@dataclass
class Memory:
    """Past commit subjects as vectors, the modules each touched, and a role
    (`train`, `validation`, `heldout`) so that an evaluation leaves out the
    subjects of the queries it asks."""

    vectors: np.ndarray
    entries: list[dict[str, Any]]  # {"text", "modules", "role"}

    @classmethod
    def empty(cls, dimension: int) -> Memory:
        return cls(np.zeros((0, dimension), dtype=np.float32), [])

    def only(self, roles: set[str]) -> Memory:
        keep = [i for i, e in enumerate(self.entries) if e.get("role") in roles]
        return Memory(self.vectors[keep], [self.entries[i] for i in keep])

    def votes(self, vector: np.ndarray, k: int) -> list[tuple[str, str]]:
        if not self.entries:
            return []
        similarity = self.vectors @ vector
        nearest = np.argsort(-similarity)[:k]
        tally: dict[str, float] = {}
        why: dict[str, str] = {}
        for i in nearest:
            for module in self.entries[i]["modules"]:
                tally[module] = tally.get(module, 0.0) + float(similarity[i])
                why.setdefault(module, str(self.entries[i]["text"]))
        return [(m, why[m]) for m in sorted(tally, key=lambda m: -tally[m])]


def _load_vectors(ids: list[str], digests: list[str], matrix: np.ndarray) -> dict[str, Any]:
    return {
        mid: (digest, matrix[i]) for i, (mid, digest) in enumerate(zip(ids, digests, strict=True))
    }


def load_export(folder: Path) -> DenseIndex:
    """A trained retriever export as a dense index (raises EmbedderError when damaged)."""
    embedder = Embedder.load(folder)
    try:
        meta = json.loads((folder / RETRIEVER_FILE).read_text())
        rows = json.loads((folder / MODULES_FILE).read_text())
        matrix = np.load(folder / EMBEDDINGS_FILE)
        vectors = _load_vectors([r["id"] for r in rows], [r["digest"] for r in rows], matrix)
        residual_ids = json.loads((folder / "residual_ids.json").read_text())
        residual_rows = np.load(folder / RESIDUALS_FILE)
        residuals = {mid: residual_rows[i] for i, mid in enumerate(residual_ids)}
        memory = (
            Memory(np.load(folder / MEMORY_FILE), json.loads((folder / "memory.json").read_text()))
            if (folder / MEMORY_FILE).is_file()
            else None
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EmbedderError(
            f"the retriever export at {folder} is damaged ({exc}); retrain with `shoptalk train`"
        ) from exc
    calibration = Calibration.from_dict(meta.get("calibration"), BASE_CALIBRATION)
    index = DenseIndex(
        embedder, vectors, calibration, "trained", meta.get("run_id"), residuals=residuals
    )
    if memory is not None:
        index.memory = memory
    return index


def load_base(data_dir: Path, store_root: Path | None) -> DenseIndex:
    """The zero-shot base encoder, with the vectors cached from an earlier start."""
    embedder = load_base_embedder(data_dir)
    cache = lookup_dir(store_root) / BASE_CACHE if store_root is not None else None
    vectors: dict[str, Any] = {}
    if cache is not None and cache.is_file():
        try:
            with np.load(cache) as data:
                vectors = _load_vectors(
                    [str(i) for i in data["ids"]],
                    [str(d) for d in data["digests"]],
                    data["vectors"],
                )
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring the damaged base vector cache %s: %s", cache, exc)
    return DenseIndex(embedder, vectors, BASE_CALIBRATION, "zero-shot", cache_file=cache)


def served_dense_index(store_root: Path | None, data_dir: Path | None) -> DenseIndex | None:
    """The promoted trained retriever, else the zero-shot base, else None (BM25 alone)."""
    if os.environ.get("SHOPTALK_LOOKUP_DENSE", "1") == "0":
        return None
    export = promoted_export(store_root) if store_root is not None else None
    if export is not None:
        try:
            return load_export(export)
        except EmbedderError as exc:
            log.warning("%s; falling back to the base embedding model", exc)
    if data_dir is None:
        return None
    try:
        return load_base(data_dir, store_root)
    except EmbedderError as exc:
        log.info("module lookup without embeddings: %s", exc)
        return None


def export_metadata(calibration: Calibration, **fields: Any) -> dict[str, Any]:
    return {**fields, "calibration": asdict(calibration)}
