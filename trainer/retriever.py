"""The module-lookup retriever: an embedding model fine-tuned on the team's
own history, so that "ledger" finds `acct_book` when the team's commits say so.

Training (torch, plain loop): the mined pairs (commit message → the modules
it touched, docstring → its module, doc → the modules it names) pull each
query's embedding towards its modules' documents. The loss is a softmax over
*every* candidate module's document (multi-positive, temperature 0.05, mean
pooling): BM25's wrong top hits and the sibling modules of the same package
are in it by construction, so every step sees all hard negatives. Document
vectors are recomputed without gradients at the start of each epoch (the
query side carries the gradient: commit messages are short, documents are 256
word pieces, and a document pass with gradients would cost ~10x more CPU),
and each module learns a residual added to its document vector — a prototype
of the words the team uses for it.

Export (one folder in the run, written atomically): the fine-tuned encoder
(`config.json`, `model.safetensors`, `tokenizer.json`), the module documents'
vectors at HEAD (`module_embeddings.npy` + `modules.json`), the residuals, and
`retriever.json` (arguments, figures, calibration, gate). The gate serves it
(moves `<repo store>/lookup/current.json`) only when BM25 fused with it beats
BM25 alone on the held-out newest queries.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from shoptalk.models.dense_index import (
    EMBEDDINGS_FILE,
    MEMORY_FILE,
    MODULES_FILE,
    RESIDUALS_FILE,
    RETRIEVER_FILE,
    Calibration,
    export_metadata,
    fit_calibration,
    load_export,
    promote_export,
    write_history,
)
from shoptalk.models.embedder import base_embedder_dir
from shoptalk.models.errors import ShopTalkError
from shoptalk.models.files import atomic_dir
from shoptalk.models.module_docs import ModuleDoc, history_from_pairs, split_subject
from shoptalk.models.module_lookup import ModuleIndex, lookup_modules
from shoptalk.models.module_map import ModuleMap
from shoptalk.models.progress import Report

log = logging.getLogger(__name__)

LOOKUP_KINDS = ("module_lookup", "doc_modules")

# Made-up requests that no code base of a developer tool implements; the
# calibration learns from them what "nothing matches" looks like. (The
# benchmark's no-match queries are a different list.)
NO_MATCH_QUERIES = (
    "send invoices to customers every month",
    "book a table at a restaurant",
    "compute the orbit of a satellite",
    "recommend recipes from the fridge contents",
    "water the plants when the soil is dry",
    "translate poems into ancient greek",
    "schedule nurses for hospital night shifts",
    "track the migration of whales",
    "tune a guitar by ear",
    "predict tomorrow's weather in paris",
    "bake sourdough bread at home",
    "register a car with the motor vehicle office",
    "calculate mortgage interest for a house",
    "grade student essays on shakespeare",
    "order pizza with extra cheese",
    "count calories in a banana smoothie",
    "pay employees their monthly salary",
    "render a 3d model of a cathedral",
    "adopt a puppy from a shelter",
    "plan a wedding seating chart",
    "buy groceries for the week",
    "repair a leaking roof",
    "choose paint colours for a bedroom",
    "count sheep to fall asleep",
    "rent a bicycle in amsterdam",
    "harvest apples in autumn",
    "sing lullabies to a baby",
    "clean the aquarium filter",
    "file a tax return for a farm",
    "write a love letter",
    "walk the dog around the park",
    "bake a birthday cake for twelve",
    "learn to swim in the ocean",
    "sell tickets for a circus show",
    "knit a sweater for winter",
    "collect stamps from old letters",
    "polish silver cutlery",
    "organise a chess tournament",
    "feed chickens on a farm",
    "measure rainfall in the garden",
)


class RetrieverError(ShopTalkError):
    pass


@dataclass(frozen=True)
class LookupPair:
    """One training or test query and the modules that answer it."""

    query: str
    modules: tuple[str, ...]
    source: str  # "commit_message" | "docstring" | "doc"
    date: str = ""


@dataclass
class RetrieverArgs:
    """How a retriever trains (`--max-minutes` bounds the whole step)."""

    max_minutes: float = 4.0
    epochs: int = 4
    batch_size: int = 32
    lr: float = 5e-5
    residual_lr: float = 1e-2
    temperature: float = 0.05
    query_tokens: int = 64
    doc_tokens: int = 256
    residual: bool = True
    # Encoder layers fine-tuned from the top (0: the encoder stays frozen and
    # only the module residuals learn, which costs seconds instead of minutes).
    tune_layers: int = 2
    docstring_share: float = 1.0  # docstring/doc pairs kept per commit-message pair
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.max_minutes <= 0:
            problems.append(f"max_minutes must be > 0 (got {self.max_minutes})")
        if self.epochs < 1:
            problems.append(f"epochs must be >= 1 (got {self.epochs})")
        if self.batch_size < 2:
            problems.append(f"batch_size must be >= 2 (got {self.batch_size})")
        if not 0 < self.temperature <= 1:
            problems.append(f"temperature must be in (0, 1] (got {self.temperature})")
        if self.tune_layers < 0:
            problems.append(f"tune_layers must be >= 0 (got {self.tune_layers})")
        if self.tune_layers == 0 and not self.residual:
            problems.append("nothing to train: tune_layers is 0 and residual is off")
        if problems:
            raise RetrieverError("bad retriever arguments: " + "; ".join(problems))


@dataclass
class RetrieverResult:
    export_dir: Path | None
    promoted: bool
    reason: str
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def pairs_from_records(records: Iterable[Mapping[str, Any]]) -> list[LookupPair]:
    """Lookup pairs from mined records (module_lookup, doc_modules), newest first."""
    pairs = []
    for record in records:
        kind = record.get("kind")
        if kind not in LOOKUP_KINDS:
            continue
        modules = tuple(str(m) for m in record.get("modules") or ())
        query = str(record.get("query") or "").strip()
        if not query or not modules:
            continue
        source = "doc" if kind == "doc_modules" else str(record.get("source") or "commit_message")
        pairs.append(LookupPair(query, modules, source, str(record.get("author_date") or "")))
    pairs.sort(key=lambda p: p.date, reverse=True)
    return pairs


def answerable(pairs: Iterable[LookupPair], docs: Mapping[str, ModuleDoc]) -> list[LookupPair]:
    """Pairs restricted to modules that exist and are not tests; pairs left with none dropped."""
    kept = []
    for pair in pairs:
        modules = tuple(m for m in pair.modules if m in docs and not docs[m].is_test)
        if modules:
            kept.append(LookupPair(pair.query, modules, pair.source, pair.date))
    return kept


def commit_history(pairs: Iterable[LookupPair]) -> dict[str, list[str]]:
    """`{module: [recent subjects]}` from commit-message pairs given newest first."""
    return history_from_pairs((p.query, p.modules) for p in pairs if p.source == "commit_message")


def training_mix(pairs: Sequence[LookupPair], args: RetrieverArgs) -> list[LookupPair]:
    """Commit-message pairs, plus docstring/doc pairs up to `docstring_share` of them."""
    messages = [p for p in pairs if p.source == "commit_message"]
    others = [p for p in pairs if p.source != "commit_message"]
    cap = max(int(len(messages) * args.docstring_share), 0 if messages else len(others))
    return messages + others[:cap]


# ---------------------------------------------------------------- training


class _Encoder:
    """The torch BERT with the served tokenizer (mean pooling, L2 norm)."""

    def __init__(self, checkpoint: Path, threads: int | None) -> None:
        import torch
        from tokenizers import Tokenizer
        from transformers import BertModel

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.model = BertModel.from_pretrained(str(checkpoint), add_pooling_layer=False)
        self.tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.checkpoint = checkpoint

    def encode(self, texts: Sequence[str], max_tokens: int) -> Any:
        torch = self.torch
        self.tokenizer.enable_truncation(max_tokens)
        rows = [e.ids for e in self.tokenizer.encode_batch(list(texts))]
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)

    def encode_frozen(self, texts: Sequence[str], max_tokens: int, batch: int = 16) -> Any:
        torch = self.torch
        self.model.eval()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.zeros((len(texts), self.model.config.hidden_size))
        with torch.no_grad():
            for start in range(0, len(order), batch):
                chosen = order[start : start + batch]
                out[chosen] = self.encode([texts[i] for i in chosen], max_tokens)
        return out


@dataclass
class _Trained:
    encoder: _Encoder
    residuals: dict[str, np.ndarray]
    steps: int
    epochs: float
    losses: list[float]
    seconds: float
    stop_reason: str


def fit_retriever(
    checkpoint: Path,
    docs: Mapping[str, ModuleDoc],
    pairs: Sequence[LookupPair],
    args: RetrieverArgs,
    report: Report = log.info,
) -> _Trained:
    """Fine-tune the encoder at `checkpoint` on `pairs` against `docs` (candidates: non-test docs)."""
    import torch

    started = time.monotonic()
    deadline = started + args.max_minutes * 60
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    encoder = _Encoder(checkpoint, args.threads)
    ids = [mid for mid, d in docs.items() if not d.is_test]
    row = {mid: i for i, mid in enumerate(ids)}
    usable = [p for p in pairs if any(m in row for m in p.modules)]
    if not usable or not ids:
        raise RetrieverError("no lookup pairs name a module of the repository: mine first")
    residual = torch.nn.Parameter(torch.zeros((len(ids), encoder.model.config.hidden_size)))
    tuned = _tuned_parameters(encoder, args.tune_layers)
    groups: list[dict[str, Any]] = [{"params": tuned, "lr": args.lr}] if tuned else []
    if args.residual:
        groups.append({"params": [residual], "lr": args.residual_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(usable) / args.batch_size)
    total_steps = steps_per_epoch * args.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, total_steps // 10))
    )
    steps, losses, stop = 0, [], "epochs"
    for epoch in range(args.epochs):
        if time.monotonic() > deadline:
            stop = "budget"
            break
        if epoch == 0 or tuned:
            documents = encoder.encode_frozen([docs[m].text for m in ids], args.doc_tokens)
        if not tuned and epoch == 0:
            frozen = encoder.encode_frozen([p.query for p in usable], args.query_tokens)
            position = {id(p): i for i, p in enumerate(usable)}
        encoder.model.train(bool(tuned))
        order = random.sample(usable, len(usable))
        for start in range(0, len(order), args.batch_size):
            batch = order[start : start + args.batch_size]
            if tuned:
                queries = encoder.encode([p.query for p in batch], args.query_tokens)
            else:
                queries = frozen[[position[id(p)] for p in batch]]
            targets = torch.nn.functional.normalize(documents + residual, dim=-1)
            logits = queries @ targets.T / args.temperature
            positive = torch.full_like(logits, float("-inf"))
            for i, pair in enumerate(batch):
                for mid in pair.modules:
                    if mid in row:
                        positive[i, row[mid]] = 0.0
            loss = (logits.logsumexp(-1) - (logits + positive).logsumexp(-1)).mean()
            optimizer.zero_grad()
            loss.backward()
            if tuned:
                torch.nn.utils.clip_grad_norm_(tuned, 1.0)
            optimizer.step()
            schedule.step()
            steps += 1
            losses.append(float(loss.item()))
            if time.monotonic() > deadline:
                stop = "budget"
                break
        report(
            f"retriever: epoch {epoch + 1}, {steps} steps, loss {np.mean(losses[-steps_per_epoch:]):.3f}"
        )
        if stop == "budget":
            break
    encoder.model.eval()
    vectors = residual.detach().numpy() if args.residual else np.zeros((len(ids), 1))
    residuals = (
        {mid: vectors[row[mid]].copy() for mid in ids if np.any(vectors[row[mid]])}
        if args.residual
        else {}
    )
    return _Trained(
        encoder,
        residuals,
        steps,
        steps / max(1, steps_per_epoch),
        losses,
        time.monotonic() - started,
        stop,
    )


def _tuned_parameters(encoder: _Encoder, layers: int) -> list[Any]:
    """Unfreeze the top `layers` encoder layers only: backward stops below them."""
    model = encoder.model
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    stack = model.encoder.layer
    chosen = [p for layer in stack[max(0, len(stack) - layers) :] for p in layer.parameters()]
    for parameter in chosen:
        parameter.requires_grad_(True)
    return chosen if layers > 0 else []


# ---------------------------------------------------------------- export


def write_export(
    out: Path,
    trained: _Trained,
    docs: Mapping[str, ModuleDoc],
    args: RetrieverArgs,
    meta: Mapping[str, Any],
    memory: Sequence[tuple[LookupPair, str]] = (),
) -> Path:
    """The served folder: encoder, tokenizer, module vectors at HEAD, residuals,
    the memory of past subjects ((pair, role) → vectors + `memory.json`), metadata."""
    encoder = trained.encoder
    ids = list(docs)
    remembered = encoder.encode_frozen([p.query for p, _ in memory], args.query_tokens)
    vectors = encoder.encode_frozen([docs[m].text for m in ids], args.doc_tokens).numpy()
    for i, mid in enumerate(ids):  # what the server scores: document + the module's residual
        moved = vectors[i] + trained.residuals.get(mid, 0.0)
        vectors[i] = moved / max(float(np.linalg.norm(moved)), 1e-12)
    with atomic_dir(out) as tmp:
        encoder.model.save_pretrained(str(tmp), safe_serialization=True)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (encoder.checkpoint / name).is_file():
                shutil.copyfile(encoder.checkpoint / name, tmp / name)
        np.save(tmp / EMBEDDINGS_FILE, vectors.astype(np.float32))
        rows = [{"id": m, "digest": docs[m].digest} for m in ids]
        (tmp / MODULES_FILE).write_text(json.dumps(rows))
        residual_ids = sorted(trained.residuals)
        np.save(
            tmp / RESIDUALS_FILE,
            np.stack([trained.residuals[m] for m in residual_ids]).astype(np.float32)
            if residual_ids
            else np.zeros((0, vectors.shape[1]), dtype=np.float32),
        )
        (tmp / "residual_ids.json").write_text(json.dumps(residual_ids))
        np.save(tmp / MEMORY_FILE, remembered.numpy().astype(np.float32))
        entries = [
            {"text": split_subject(p.query), "modules": list(p.modules), "role": role}
            for p, role in memory
        ]
        (tmp / "memory.json").write_text(json.dumps(entries))
        (tmp / RETRIEVER_FILE).write_text(json.dumps(dict(meta), indent=2, default=str))
    return out


# ---------------------------------------------------------------- evaluation


@dataclass
class Rankings:
    """Ranked module ids per query for each method, and the gold modules."""

    gold: list[tuple[str, ...]]
    ranked: dict[str, list[list[str]]] = field(default_factory=dict)
    top_cosine: dict[str, list[float]] = field(default_factory=dict)

    def metrics(self) -> dict[str, dict[str, float]]:
        return {name: rank_metrics(lists, self.gold) for name, lists in self.ranked.items()}


def rank_metrics(
    ranked: Sequence[Sequence[str]], gold: Sequence[Sequence[str]]
) -> dict[str, float]:
    """top-1, top-3, top-10 (%, any gold module) and MRR over queries
    (top-10: what a reranker of the first ten could reach at most)."""
    n = len(gold) or 1
    top1 = top3 = top10 = rr = 0.0
    for answer, wanted in zip(ranked, gold, strict=True):
        positions = [i for i, mid in enumerate(answer[:10]) if mid in wanted]
        if positions:
            top1 += positions[0] == 0
            top3 += positions[0] < 3
            top10 += 1
            rr += 1.0 / (positions[0] + 1)
    return {
        "queries": len(gold),
        "top1": round(100 * top1 / n, 1),
        "top3": round(100 * top3 / n, 1),
        "top10": round(100 * top10 / n, 1),
        "mrr": round(rr / n, 4),
    }


def rank_queries(
    index: ModuleIndex, pairs: Sequence[LookupPair], name: str, rankings: Rankings, depth: int = 10
) -> None:
    """Rank each pair's query with `index` (its retriever fused when it has one) into `rankings`."""
    fused: list[list[str]] = []
    dense_alone: list[list[str]] = []
    tops: list[float] = []
    for pair in pairs:
        answer = lookup_modules(pair.query, index, None, depth)
        fused.append(answer.ids())
        if index.dense is not None:
            scores = index.dense_scores(pair.query)
            allowed = set(index.candidates(pair.query))
            docs = index.docs
            dense_alone.append(
                sorted(
                    (m for m in scores if m in allowed),
                    key=lambda m: (docs[m].is_test, -scores[m]),  # tests after code, as fused
                )[:depth]
            )
            tops.append(answer.signal)
    if index.dense is None:
        rankings.ranked[name] = fused
        return
    rankings.ranked[name] = dense_alone
    rankings.ranked[f"{name}+bm25"] = fused
    rankings.top_cosine[name] = tops


def bm25_rankings(
    index: ModuleIndex, pairs: Sequence[LookupPair], depth: int = 10, names: bool = False
) -> list[list[str]]:
    """BM25 alone (the baseline), or with the names the queries spell out fused in."""
    bare = index.with_dense(None)
    return [lookup_modules(p.query, bare, None, depth, use_names=names).ids() for p in pairs]


def calibrate(
    index: ModuleIndex, pairs: Sequence[LookupPair], fitted_on: str
) -> tuple[Calibration, dict[str, float]]:
    """Thresholds from `pairs` (held-out queries) and the made-up no-match queries."""
    real, correct = [], []
    for pair in pairs:
        answer = lookup_modules(pair.query, index, None, 3)
        real.append(answer.signal)
        correct.append(bool(answer.hits) and answer.hits[0].id in pair.modules)
    nonsense = [lookup_modules(q, index, None, 3).signal for q in NO_MATCH_QUERIES]
    calibration = fit_calibration(real, correct, nonsense, fitted_on)
    figures = {
        "no_match_abstained": round(
            100 * sum(calibration.abstains(s) for s in nonsense) / len(nonsense), 1
        ),
        "real_abstained": round(
            100 * sum(calibration.abstains(s) for s in real) / max(1, len(real)), 1
        ),
    }
    return calibration, figures


# ---------------------------------------------------------------- the step


def read_pairs(dataset_dir: Path) -> dict[str, list[LookupPair]]:
    """Lookup pairs of a mined dataset by split (train, validation, test), newest first."""
    from shoptalk.trainer.dataset_folder import read_shard, shard_path

    return {
        split: pairs_from_records(
            r for kind in LOOKUP_KINDS for r in read_shard(shard_path(dataset_dir, kind, split))
        )
        for split in ("train", "validation", "test")
    }


@dataclass
class LookupData:
    """What the retriever step trains, calibrates and gates on, against one module map."""

    module_map: ModuleMap
    train: list[LookupPair]
    validation: list[LookupPair]
    heldout: list[LookupPair]  # the newest commit messages (the test split)
    history_before: dict[str, list[str]]  # from commits before the held-out ones
    history_all: dict[str, list[str]]  # everything: what is served


def lookup_data(module_map: ModuleMap, splits: Mapping[str, list[LookupPair]]) -> LookupData:
    docs = ModuleIndex(module_map).docs
    train = answerable(splits.get("train", []), docs)
    validation = answerable(splits.get("validation", []), docs)
    heldout = [p for p in answerable(splits.get("test", []), docs) if p.source == "commit_message"]
    before = commit_history([*validation, *train])
    every = commit_history(
        sorted([*heldout, *validation, *train], key=lambda p: p.date, reverse=True)
    )
    return LookupData(module_map, train, validation, heldout, before, every)


def train_lookup_retriever(
    data: LookupData,
    base: Path,
    out: Path,
    args: RetrieverArgs,
    run_id: str,
    report: Report = log.info,
) -> tuple[Path, dict[str, Any]]:
    """Train on `data.train`, export to `out`, calibrate on the validation
    queries and measure on the held-out ones; returns the export and its figures."""
    started = time.monotonic()
    train_docs = ModuleIndex(data.module_map, data.history_before).docs
    mix = training_mix(data.train, args)
    report(
        f"retriever: {len(mix)} pairs, {sum(not d.is_test for d in train_docs.values())} modules"
    )
    trained = fit_retriever(base, train_docs, mix, args, report)
    served_docs = ModuleIndex(data.module_map, data.history_all).docs
    meta: dict[str, Any] = {
        "run_id": run_id,
        "base": str(base),
        "args": asdict(args),
        "train_pairs": len(mix),
        "steps": trained.steps,
        "epochs": round(trained.epochs, 2),
        "stop_reason": trained.stop_reason,
        "train_seconds": round(trained.seconds, 1),
        "final_loss": round(float(np.mean(trained.losses[-10:])), 4) if trained.losses else None,
    }
    write_export(out, trained, served_docs, args, meta, memory_of(data))
    return out, measure_export(
        data, out, meta, trained.encoder, args.doc_tokens, started, served_docs
    )


def measure_export(
    data: LookupData,
    out: Path,
    meta: dict[str, Any],
    encoder: _Encoder | None = None,
    doc_tokens: int = RetrieverArgs.doc_tokens,
    started: float | None = None,
    served_docs: Mapping[str, ModuleDoc] | None = None,
) -> dict[str, Any]:
    """Calibrate the export at `out` on the validation queries, measure it on
    the held-out ones and write its figures (`retriever.json`); returns them.
    `encoder` (the torch model just trained) embeds changed documents faster
    than the served numpy path, which does it otherwise."""
    started = time.monotonic() if started is None else started
    if served_docs is None:  # the documents the export was written with
        served_docs = ModuleIndex(data.module_map, data.history_all).docs
    dense = load_export(out)
    served_memory = dense.memory
    dense.memory = served_memory.only({"train", "validation"})  # never the held-out subjects
    index = ModuleIndex(data.module_map, data.history_before, dense)
    changed = [d for mid, d in index.docs.items() if served_docs[mid].digest != d.digest]
    if changed and encoder is not None:  # the held-out commits' subjects are left out of these
        vectors = encoder.encode_frozen([d.text for d in changed], doc_tokens)
        dense.remember({d.id: (d.digest, v) for d, v in zip(changed, vectors.numpy(), strict=True)})
    # Calibrated on the validation queries against documents that do not carry
    # their own subjects (as a new query meets the index).
    unseen = ModuleIndex(data.module_map, commit_history(data.train), dense)
    calibration_pairs = data.validation or data.train[:200]
    dense.memory = served_memory.only({"train"})
    calibration, abstention = calibrate(unseen, calibration_pairs, "validation queries")
    dense.memory = served_memory.only({"train", "validation"})
    dense.calibration = calibration
    figures = heldout_figures(index, data.heldout)
    meta.update(
        export_metadata(calibration, heldout=figures, abstention=abstention),
        seconds=round(time.monotonic() - started, 1),
    )
    from shoptalk.models.files import write_json_atomic

    write_json_atomic(out / RETRIEVER_FILE, meta)
    return meta


def memory_of(data: LookupData) -> list[tuple[LookupPair, str]]:
    """The commit subjects the served retriever remembers, with their roles."""
    return [
        (pair, role)
        for role, pairs in (
            ("train", data.train),
            ("validation", data.validation),
            ("heldout", data.heldout),
        )
        for pair in pairs
        if pair.source == "commit_message"
    ]


def heldout_figures(index: ModuleIndex, heldout: Sequence[LookupPair]) -> dict[str, Any]:
    rankings = Rankings([p.modules for p in heldout])
    rankings.ranked["bm25"] = bm25_rankings(index, heldout)
    rank_queries(index, heldout, "trained", rankings)
    return rankings.metrics()


def gate(figures: Mapping[str, Any], min_queries: int = 5) -> tuple[bool, str]:
    """Serve the trained retriever only when BM25 fused with it beats BM25 alone
    on the held-out newest queries (MRR higher, top-1 not lower)."""
    bm25 = figures.get("bm25") or {}
    fused = figures.get("trained+bm25") or {}
    queries = int(bm25.get("queries", 0))
    if queries < min_queries:
        return False, f"only {queries} held-out lookup queries (need {min_queries}): not judged"
    if fused.get("mrr", 0) > bm25.get("mrr", 0) and fused.get("top1", 0) >= bm25.get("top1", 0):
        return True, (
            f"fused MRR {fused['mrr']:.3f} > BM25 {bm25['mrr']:.3f} on {queries} held-out queries"
        )
    return False, (
        f"fused MRR {fused.get('mrr', 0):.3f} / top-1 {fused.get('top1', 0)} does not beat BM25 "
        f"{bm25.get('mrr', 0):.3f} / {bm25.get('top1', 0)} on {queries} held-out queries"
    )


def retriever_step(
    repo: Path,
    store_root: Path,
    run_dir: Path,
    data_dir: Path,
    args: RetrieverArgs | None = None,
    dataset_dir: Path | None = None,
    report: Report = log.info,
) -> RetrieverResult:
    """`shoptalk train`'s lookup step: train, export into `run_dir/retriever`,
    gate, and serve it when it passed; the module history is written either way."""
    from shoptalk.models.module_map import module_map_from_tree

    started = time.monotonic()
    args = args or RetrieverArgs()
    splits = read_pairs(dataset_dir or store_root / "dataset")
    data = lookup_data(module_map_from_tree(repo), splits)
    write_history(store_root, data.history_all)
    if not data.train:
        return RetrieverResult(None, False, "no mined lookup pairs name a module of the repository")
    out, meta = train_lookup_retriever(
        data, base_embedder_dir(data_dir), run_dir / "retriever", args, run_dir.name, report
    )
    passed, reason = gate(meta["heldout"])
    meta["gate"] = {"passed": passed, "reason": reason}
    from shoptalk.models.files import write_json_atomic

    write_json_atomic(out / RETRIEVER_FILE, meta)
    if passed:
        promote_export(store_root, out, meta["heldout"])
    report(f"retriever: {'served' if passed else 'not served'} ({reason})")
    return RetrieverResult(out, passed, reason, meta, time.monotonic() - started)


def retriever_args_for(settings: Any) -> RetrieverArgs:
    """The step's arguments from the run's settings (threads, seed)."""
    train = getattr(settings, "train", None)
    return RetrieverArgs(
        threads=getattr(train, "threads", None), seed=int(getattr(train, "seed", 0) or 0)
    )


def train_retriever_after(
    repo: Path,
    settings: Any,
    run_dir: Path,
    dataset_dir: Path | None = None,
    report: Report = log.info,
) -> RetrieverResult | None:
    """The lookup step after a completion run (`shoptalk train`, the watcher's
    job): a problem is reported and leaves the completion run untouched."""
    from shoptalk.models.store import RepoStore

    data_dir = settings.resolved_data_dir()
    store = RepoStore.for_repo(data_dir, repo)
    report("training the module-lookup retriever")
    try:
        result = retriever_step(
            repo, store.root, run_dir, data_dir, retriever_args_for(settings), dataset_dir, report
        )
    except ShopTalkError as exc:
        report(f"module-lookup retriever not trained: {exc}")
        return None
    return result


def retrain_lookup(repo: Path, settings: Any, run_dir: Path, report: Report = log.info) -> str:
    """The watcher job's lookup step: retrain the retriever when the team
    trains one (a run holds an export), else only refresh the module history
    the lookup's documents carry. Returns a note for the job's message."""
    from shoptalk.models.module_map import module_map_from_tree
    from shoptalk.models.store import RepoStore

    store = RepoStore.for_repo(settings.resolved_data_dir(), repo)
    if any(store.runs_dir.glob(f"*/retriever/{RETRIEVER_FILE}")):
        result = train_retriever_after(repo, settings, run_dir, report=report)
        if result is None:
            return "; lookup retriever not retrained"
        return f"; lookup retriever {'served' if result.promoted else 'kept'} ({result.reason})"
    try:
        data = lookup_data(module_map_from_tree(repo), read_pairs(store.dataset_dir))
    except (ShopTalkError, OSError) as exc:
        report(f"module history not refreshed: {exc}")
        return ""
    write_history(store.root, data.history_all)
    return ""
