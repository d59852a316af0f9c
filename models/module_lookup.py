"""Module lookup: which module of the workspace implements what the user asks for.

Rankings fused by weighted reciprocal rank:

- BM25 over each module's document (`shoptalk.models.module_docs`: id, path,
  symbols, docstrings, imports and importers, subjects of the commits that
  touched it), names weighted above prose;
- the retriever (`shoptalk.models.dense_index`): cosine between the query and
  each module document under an embedding model trained on the team's own
  history (commit message → modules it touched), or the zero-shot base;
- optionally the language model's pick under a llama.cpp grammar that only
  admits real module ids. It is slow on CPU (35-80 s per query on a loaded
  2-core machine) and picks the right module ~5% of the time, so the server
  leaves it out (evaluation still measures it); it only breaks near-ties.

Test modules are left out of the answers unless the query asks about tests:
a test is not where a feature is implemented.

`lookup_modules` also says how sure it is: the top answer's cosine against
thresholds fitted on held-out and made-up no-match queries gives high /
medium / low, and below the lowest it abstains ("no module clearly does ...;
closest: ...").
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from shoptalk.models.dense_index import (
    Calibration,
    DenseIndex,
    lookup_dir,
    read_history,
    served_dense_index,
)
from shoptalk.models.module_docs import ModuleDoc, module_documents
from shoptalk.models.module_map import Module, ModuleMap
from shoptalk.models.module_names import NameTable
from shoptalk.models.prompt import module_lookup_prompt

log = logging.getLogger(__name__)

# Generates text for (prompt, GBNF grammar, max tokens).
GrammarGenerator = Callable[[str, str, int], str]

BM25_K1 = 1.2
BM25_B = 0.75
RRF_K = 10  # small: the top of each ranking matters most
MAX_GRAMMAR_IDS = 2000  # with no lexical match, the grammar admits at most this many ids
RERANK_CANDIDATES = 20  # with lexical matches, the model chooses among the best fused ones
MODEL_PICKS = 1
# How much the model's pick counts (reciprocal-rank fusion). Measured on 20
# newest commit messages of pallets/click (docs/benchmarks.md): BM25 alone
# top-1 50%; the models alone 5% (base and a 25-minute tuned model); fused
# with weight 0.3 (base) top-1 40%, with 1.0 (tuned) 20%. So the model only
# breaks near-ties.
TUNED_MODEL_WEIGHT = 0.15
BASE_MODEL_WEIGHT = 0.05
# How much each ranking counts in the fusion (docs/benchmarks.md, "module lookup"):
# a retriever trained on the team's history beats BM25 and leads; the
# zero-shot base is weaker than BM25 and only helps it.
# Tuned on pallets/click (154 queries): trained alone 58.4% top-1, fused at
# weight 1.5 53.9%, 3: 57.8%, 5: 59.1% (top-3 77.3 / 78.6 / 79.2).
BM25_WEIGHT = 1.0
TRAINED_WEIGHT = 4.0
ZERO_SHOT_WEIGHT = 0.5
# The trained retriever's memory of past subjects (5 nearest vote), weight 2:
# served top-1 on click 56.5 -> 63.6, textual 30.8 -> 34.2, typer 73.6 -> 72.4
# (docs/benchmarks.md).
MEMORY_WEIGHT = 2.0
# A module the query names in code (`HelpFormatter.write_usage`, a dotted id, a
# path): top-1 with weight 0 / 2 / 4 (served fusion, newest commits after
# 2025-04): click 63.6 / 69.5 / 73.4, ipython 54.2 / 55.8 / 58.4, textual
# 35.4 / 37.0 / 36.7, typer 72.4 / 72.4 / 73.6 (docs/benchmarks.md).
NAME_WEIGHT = 4.0
# A test module that the query asks about still ranks below the code it tests.
TEST_PENALTY = 0.5
# BM25 alone: abstain when the matched terms carry less than this share of the query's IDF.
BM25_CALIBRATION = Calibration(abstain_below=0.45, medium_at=0.6, high_at=0.8, fitted_on="bm25")
_TEST_WORDS = frozenset({"test", "tests", "testing", "fixture", "fixtures", "conftest", "spec"})

_STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "of",
        "to",
        "in",
        "on",
        "for",
        "with",
        "by",
        "from",
        "at",
        "as",
        "is",
        "are",
        "be",
        "it",
        "this",
        "that",
        "these",
        "those",
        "which",
        "where",
        "what",
        "who",
        "how",
        "do",
        "does",
        "add",
        "added",
        "adds",
        "fix",
        "fixed",
        "fixes",
        "use",
        "used",
        "uses",
        "make",
        "new",
        "when",
        "into",
        "via",
        "not",
        "no",
        "all",
        "any",
        "can",
        "should",
        "would",
        "will",
        "module",
        "modules",
        "code",
        "file",
    ]
)


def terms(text: str) -> list[str]:
    """Lower-case word terms; identifiers split at `_`, `.`, `/` and camelCase."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", text)
    spaced = re.sub(r"([A-Z]+)([A-Z][a-z])", r"\1 \2", spaced)
    words = re.findall(r"[A-Za-z][A-Za-z0-9]*", spaced)
    found = []
    for word in words:
        lowered = word.lower()
        if len(lowered) < 2 or lowered in _STOPWORDS:
            continue
        found.append(_stem(lowered))
    return found


def _stem(word: str) -> str:
    """Plural to singular, enough to match `rates` with `rate` and `classes` with `class`."""
    if len(word) <= 3:
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "zes", "ches", "shes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


def wants_tests(query: str) -> bool:
    return any(word in _TEST_WORDS for word in re.findall(r"[a-z]+", query.lower()))


def _doc_terms(doc: ModuleDoc) -> Counter[str]:
    counts: Counter[str] = Counter()
    for text, weight in doc.fields():
        for term in terms(text):
            counts[term] += weight
    return counts


@dataclass(frozen=True)
class ModuleHit:
    id: str
    path: str
    start_line: int  # 0-based, for LSP ranges
    end_line: int
    score: float  # the fused score (rank-based: compare within one answer only)
    reason: str
    confidence: str = ""  # "high" | "medium" | "low" (calibrated; "" when not rated)
    similarity: float | None = None  # cosine with the module document (the retriever's)


@dataclass(frozen=True)
class LookupAnswer:
    """Hits best first, how sure the lookup is, and whether it abstained."""

    query: str
    hits: list[ModuleHit]
    confidence: str  # "high" | "medium" | "low" | "none" (abstained)
    abstained: bool
    # What the confidence was read from: the best candidate's cosine above the
    # mean cosine of all candidates (the retriever), or BM25's IDF coverage.
    signal: float
    source: str  # "trained" | "zero-shot" | "bm25"
    message: str = ""

    def ids(self) -> list[str]:
        return [hit.id for hit in self.hits]


class ModuleIndex:
    """BM25 over the module documents of a map, plus the retriever when given."""

    def __init__(
        self,
        module_map: ModuleMap,
        history: Mapping[str, Sequence[str]] | None = None,
        dense: DenseIndex | None = None,
    ) -> None:
        self.module_map = module_map
        self.history = dict(history or {})
        self.dense = dense
        self.docs: dict[str, ModuleDoc] = module_documents(module_map, self.history)
        self._docs: dict[str, Counter[str]] = {mid: _doc_terms(d) for mid, d in self.docs.items()}
        self.names = NameTable.of(module_map.modules.values())
        self._lengths = {mid: sum(c.values()) for mid, c in self._docs.items()}
        self._avg = (sum(self._lengths.values()) / len(self._lengths)) if self._lengths else 1.0
        frequency: Counter[str] = Counter()
        for counts in self._docs.values():
            frequency.update(counts.keys())
        n = len(self._docs)
        self._idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in frequency.items()}
        self._max_idf = math.log(1 + (n + 0.5) / 0.5) if n else 1.0
        self._dense_synced = False
        self.pointer_stamp: float | None = None  # the served retriever's pointer when loaded
        self.served = False  # built by `served_module_index` (watches the pointer)

    def with_map(self, module_map: ModuleMap) -> ModuleIndex:
        """The same history and retriever over a changed map (changed documents
        are re-embedded at the next dense lookup)."""
        index = ModuleIndex(module_map, self.history, self.dense)
        index.pointer_stamp, index.served = self.pointer_stamp, self.served
        return index

    def with_dense(self, dense: DenseIndex | None) -> ModuleIndex:
        index = ModuleIndex.__new__(ModuleIndex)
        index.__dict__.update(self.__dict__)
        index.dense = dense
        index._dense_synced = False
        return index

    def candidates(self, query: str) -> list[str]:
        """Module ids an answer may name: test modules only when the query is about tests."""
        allow_tests = wants_tests(query)
        ids = [mid for mid, d in self.docs.items() if allow_tests or not d.is_test]
        return ids or list(self.docs)

    def bm25(self, query: str, limit: int = 10) -> list[tuple[str, float, list[str]]]:
        """(module id, score, matched terms), best first; modules matching no term are left out."""
        wanted = list(dict.fromkeys(terms(query)))
        allowed = set(self.candidates(query))
        scored: list[tuple[str, float, list[str]]] = []
        for mid, counts in self._docs.items():
            if mid not in allowed:
                continue
            score = 0.0
            matched = []
            length = self._lengths[mid] or 1
            for term in wanted:
                tf = counts.get(term, 0)
                if not tf:
                    continue
                matched.append(term)
                norm = (
                    tf * (BM25_K1 + 1) / (tf + BM25_K1 * (1 - BM25_B + BM25_B * length / self._avg))
                )
                score += self._idf.get(term, 0.0) * norm
            if score > 0:
                scored.append((mid, score, matched))
        scored.sort(key=lambda item: (-item[1], item[0]))
        return scored[:limit]

    def coverage(self, query: str, matched: Sequence[str]) -> float:
        """The share of the query's IDF mass that `matched` carries (a word no
        module has counts as the rarest)."""
        wanted = list(dict.fromkeys(terms(query)))
        if not wanted:
            return 0.0
        total = sum(self._idf.get(t, self._max_idf) for t in wanted)
        return sum(self._idf.get(t, 0.0) for t in matched) / total if total else 0.0

    def prepare(self) -> None:
        """Embed the documents the retriever lacks now rather than at the first
        query (the server calls this on its background thread)."""
        if self.dense is not None and not self._dense_synced:
            self.dense.sync(self.docs)
            self._dense_synced = True

    def dense_scores(self, query: str) -> dict[str, float]:
        """Cosine per module document from the retriever ({} without one)."""
        dense = self.dense
        if dense is None:
            return {}
        if not self._dense_synced:
            dense.sync(self.docs)
            self._dense_synced = True
        return dense.scores(query)


def _gbnf_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def module_grammar(ids: list[str]) -> str:
    """A GBNF grammar admitting exactly one of `ids` (after an optional space)
    and a newline."""
    if not ids:
        raise ValueError("a module grammar needs at least one module id")
    alternatives = " | ".join(_gbnf_string(i) for i in ids)
    return f'root ::= " "? module "\\n"\nmodule ::= {alternatives}\n'


def model_picks(
    query: str, ids: list[str], generate: GrammarGenerator, picks: int = MODEL_PICKS
) -> list[str]:
    """Module ids the model names for `query`, best first (each pick excludes the earlier ones)."""
    chosen: list[str] = []
    remaining = list(ids)
    prompt = module_lookup_prompt(query)
    for _ in range(picks):
        if not remaining:
            break
        longest = max(len(i) for i in remaining)
        text = generate(prompt, module_grammar(remaining), max(8, longest // 2 + 4))
        answer = text.strip()
        if answer not in remaining:
            break
        chosen.append(answer)
        remaining.remove(answer)
    return chosen


def _best_symbol_range(module: Module, wanted: set[str]) -> tuple[str, int, int]:
    best = None
    best_score = 0
    for symbol in module.symbols:
        score = len(wanted & set(terms(symbol.name))) * 2 + len(
            wanted & set(terms(symbol.doc or ""))
        )
        if score > best_score:
            best, best_score = symbol, score
    if best is None:
        return module.path, 0, 0
    return best.path, best.start_line - 1, best.end_line - 1


@dataclass
class _Fusion:
    scores: dict[str, float] = field(default_factory=dict)
    reasons: dict[str, list[str]] = field(default_factory=dict)

    def add(self, ranking: Sequence[str], weight: float, reason: Callable[[str, int], str]) -> None:
        for rank, mid in enumerate(ranking):
            self.scores[mid] = self.scores.get(mid, 0.0) + weight / (RRF_K + rank + 1)
            text = reason(mid, rank)
            if text:
                self.reasons.setdefault(mid, []).append(text)

    def ranked(self) -> list[str]:
        return [m for m, _ in sorted(self.scores.items(), key=lambda item: (-item[1], item[0]))]


def dense_weight(source: str) -> float:
    return TRAINED_WEIGHT if source == "trained" else ZERO_SHOT_WEIGHT


def lookup_modules(
    query: str,
    index: ModuleIndex,
    generate: GrammarGenerator | None = None,
    limit: int = 5,
    model_weight: float = TUNED_MODEL_WEIGHT,
    use_dense: bool = True,
    use_names: bool = True,
) -> LookupAnswer:
    """The modules best matching `query`, with a calibrated confidence: BM25
    fused with the retriever (when the index has one) and, when `generate` is
    given, the language model's grammar-constrained pick among the best."""
    limit = max(1, min(limit, 50))
    modules = index.module_map.modules
    if not modules or not query.strip():
        return LookupAnswer(query, [], "none", True, 0.0, "bm25", "there are no modules to search")
    depth = max(limit * 4, 20)
    lexical = index.bm25(query, limit=depth)
    matched = {mid: terms_ for mid, _s, terms_ in lexical}
    fusion = _Fusion()
    fusion.add(
        [m for m, _s, _t in lexical],
        BM25_WEIGHT,
        lambda m, _r: "matches " + ", ".join(matched[m][:4]),
    )
    allowed = set(index.candidates(query))
    named = {n.id: n for n in index.names.named(query, allowed)} if use_names else {}
    fusion.add(list(named), NAME_WEIGHT, lambda m, _r: f"defines or is `{named[m].name}`")
    cosine = index.dense_scores(query) if use_dense and index.dense is not None else {}
    source = index.dense.source if cosine and index.dense is not None else "bm25"
    baseline = 0.0
    if cosine:
        ranked = sorted((m for m in cosine if m in allowed), key=lambda m: -cosine[m])[:depth]
        fusion.add(ranked, dense_weight(source), lambda m, r: "close in meaning" if r < 3 else "")
        # Relative to the mean: some encoders (and every random one) give all
        # texts high cosines; how far the best stands out is what carries.
        baseline = sum(cosine[m] for m in allowed if m in cosine) / max(1, len(allowed))
        cosine = {m: c - baseline for m, c in cosine.items()}
        _add_memory(query, index, allowed, fusion)
    if generate is not None:
        _add_model_pick(query, index, generate, fusion, model_weight)
    for mid in fusion.scores:
        if index.docs[mid].is_test:
            fusion.scores[mid] *= TEST_PENALTY
    order = fusion.ranked()[:limit]
    calibration = (
        index.dense.calibration if cosine and index.dense is not None else BM25_CALIBRATION
    )
    if cosine:
        # The best document match, whichever answer the fusion put first: read
        # off the first answer instead, the memory's votes moved the signal of
        # made-up queries (click: 70% abstained at 5.2 points of top-1, vs 76.7%
        # at 1.9; docs/benchmarks.md).
        signal = max((c for m, c in cosine.items() if m in allowed), default=0.0)
    else:
        signal = index.coverage(query, matched.get(order[0], [])) if order else 0.0
    hits = [_hit(mid, index, query, fusion, cosine, baseline, calibration) for mid in order]
    # A name the query writes as code that few modules define is a match,
    # however far the words are from every document.
    abstained = not hits or (calibration.abstains(signal) and not named)
    confidence = "none" if abstained else calibration.level(signal)
    return LookupAnswer(
        query,
        hits,
        confidence,
        abstained,
        round(signal, 4),
        source,
        _message(query, hits, abstained),
    )


def _add_memory(query: str, index: ModuleIndex, allowed: set[str], fusion: _Fusion) -> None:
    """Past subjects like the query vote for the modules they touched."""
    if index.dense is None:
        return
    recalled = [(m, text) for m, text in index.dense.recalled(query) if m in allowed]
    why = dict(recalled)
    fusion.add(
        [m for m, _ in recalled],
        MEMORY_WEIGHT,
        lambda m, r: f"like the change {why[m][:60]!r}" if r < 2 else "",
    )


def _add_model_pick(
    query: str,
    index: ModuleIndex,
    generate: GrammarGenerator,
    fusion: _Fusion,
    model_weight: float,
) -> None:
    ids = sorted(fusion.ranked()[:RERANK_CANDIDATES]) or sorted(index.candidates(query))
    try:
        picks = model_picks(query, ids[:MAX_GRAMMAR_IDS], generate)
    except Exception as exc:  # the model is an extra signal; the rankings still answer
        log.warning("module lookup: the model could not answer (%s); leaving it out", exc)
        return
    fusion.add(
        picks,
        model_weight,
        lambda _m, r: "the model's first choice" if r == 0 else "the model's next choice",
    )


def _hit(
    mid: str,
    index: ModuleIndex,
    query: str,
    fusion: _Fusion,
    relative: Mapping[str, float],
    baseline: float,
    calibration: Calibration,
) -> ModuleHit:
    module = index.module_map.modules[mid]
    path, start, end = _best_symbol_range(module, set(terms(query)))
    summary = module.summary()
    reason = "; ".join(fusion.reasons.get(mid, []))
    if summary:
        reason = f"{reason} — {summary}" if reason else summary
    above = relative.get(mid)
    return ModuleHit(
        mid,
        path,
        start,
        end,
        round(fusion.scores[mid], 4),
        reason[:200],
        calibration.level(above) if above is not None else "",
        round(above + baseline, 4) if above is not None else None,
    )


def _message(query: str, hits: Sequence[ModuleHit], abstained: bool) -> str:
    if not abstained:
        return ""
    short = " ".join(query.split())[:80]
    closest = ", ".join(hit.id for hit in hits[:3])
    return f"no module clearly does {short!r}" + (f"; closest: {closest}" if closest else "")


def find_modules(
    query: str,
    index: ModuleIndex,
    generate: GrammarGenerator | None = None,
    limit: int = 5,
    model_weight: float = TUNED_MODEL_WEIGHT,
) -> list[ModuleHit]:
    """The hits of `lookup_modules` (best first), without the verdict."""
    return lookup_modules(query, index, generate, limit, model_weight).hits


def _pointer_stamp(store_root: Path | None) -> float | None:
    if store_root is None:
        return None
    try:
        return (lookup_dir(store_root) / "current.json").stat().st_mtime
    except OSError:
        return None


def served_module_index(
    module_map: ModuleMap, store_root: Path | None, data_dir: Path | None
) -> ModuleIndex:
    """The index the server answers from: the repository's module history and
    served retriever (trained, else zero-shot base, else none), documents embedded."""
    stamp = _pointer_stamp(store_root)
    history = read_history(store_root) if store_root is not None else {}
    index = ModuleIndex(module_map, history, served_dense_index(store_root, data_dir))
    index.prepare()
    index.pointer_stamp, index.served = stamp, True
    return index


def retriever_changed(index: ModuleIndex, store_root: Path | None) -> bool:
    """A new retriever was promoted since `index` was built (rebuild it)."""
    return index.served and _pointer_stamp(store_root) != index.pointer_stamp
