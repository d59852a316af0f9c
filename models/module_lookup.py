"""Module lookup: which module of the workspace implements what the user asks for.

Two rankings fused by reciprocal rank: BM25 over each module's id, path,
symbol names and docstrings (from `shoptalk.models.module_map`), and the
model's own answer to the shared module-lookup prompt, generated under a
llama.cpp grammar that only admits module ids that exist. BM25 keeps the
answer sensible with an untuned base; a model tuned on the repository's
history lifts it.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from shoptalk.models.module_map import Module, ModuleMap
from shoptalk.models.prompt import module_lookup_prompt

log = logging.getLogger(__name__)

# Generates text for (prompt, GBNF grammar, max tokens).
GrammarGenerator = Callable[[str, str, int], str]

BM25_K1 = 1.2
BM25_B = 0.75
RRF_K = 10  # small: the top of each ranking matters most
MAX_GRAMMAR_IDS = 2000  # with no lexical match, the grammar admits at most this many ids
RERANK_CANDIDATES = 20  # with lexical matches, the model chooses among BM25's best
MODEL_PICKS = 1
# How much the model's pick counts against BM25 (reciprocal-rank fusion).
# Measured on 20 newest commit messages of pallets/click (docs/benchmarks.md):
# BM25 alone top-1 50%; the models alone 5% (base and a 25-minute tuned
# model); fused with weight 0.3 (base) top-1 40%, with 1.0 (tuned) 20% — a
# weak model's pick overturned good BM25 answers. So the model only breaks
# near-ties: a tuned pick can move BM25's second above its first (0.15), a
# base pick only reorders below the top (0.05).
TUNED_MODEL_WEIGHT = 0.15
BASE_MODEL_WEIGHT = 0.05

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


def _module_terms(module: Module) -> Counter[str]:
    counts: Counter[str] = Counter()
    # Names weigh more than prose: an id or a symbol name is a deliberate label.
    for term in terms(module.id) + terms(module.path):
        counts[term] += 3
    for symbol in module.symbols:
        for term in terms(symbol.name):
            counts[term] += 2
        if symbol.doc:
            counts.update(terms(symbol.doc))
    counts.update(terms(module.doc))
    return counts


@dataclass(frozen=True)
class ModuleHit:
    id: str
    path: str
    start_line: int  # 0-based, for LSP ranges
    end_line: int
    score: float
    reason: str


class ModuleIndex:
    """BM25 over a module map."""

    def __init__(self, module_map: ModuleMap) -> None:
        self.module_map = module_map
        self._docs: dict[str, Counter[str]] = {
            mid: _module_terms(m) for mid, m in module_map.modules.items()
        }
        self._lengths = {mid: sum(c.values()) for mid, c in self._docs.items()}
        self._avg = (sum(self._lengths.values()) / len(self._lengths)) if self._lengths else 1.0
        frequency: Counter[str] = Counter()
        for counts in self._docs.values():
            frequency.update(counts.keys())
        n = len(self._docs)
        self._idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in frequency.items()}

    def bm25(self, query: str, limit: int = 10) -> list[tuple[str, float, list[str]]]:
        """(module id, score, matched terms), best first; modules matching no term are left out."""
        wanted = list(dict.fromkeys(terms(query)))
        scored: list[tuple[str, float, list[str]]] = []
        for mid, counts in self._docs.items():
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


def find_modules(
    query: str,
    index: ModuleIndex,
    generate: GrammarGenerator | None = None,
    limit: int = 5,
    model_weight: float = TUNED_MODEL_WEIGHT,
) -> list[ModuleHit]:
    """The modules best matching `query`: BM25 fused with the model's
    grammar-constrained picks (when `generate` is given). With lexical matches
    the model chooses among BM25's best candidates; without, among all ids."""
    limit = max(1, min(limit, 50))
    modules = index.module_map.modules
    if not modules or not query.strip():
        return []
    lexical = index.bm25(query, limit=max(limit * 4, 20))
    fused: dict[str, float] = {}
    reasons: dict[str, list[str]] = {}
    for rank, (mid, _score, matched) in enumerate(lexical):
        fused[mid] = fused.get(mid, 0.0) + 1.0 / (RRF_K + rank + 1)
        reasons.setdefault(mid, []).append("matches " + ", ".join(matched[:4]))
    if generate is not None:
        ids = sorted(mid for mid, _s, _m in lexical[:RERANK_CANDIDATES]) or sorted(modules)
        ids = ids[:MAX_GRAMMAR_IDS]
        try:
            picks = model_picks(query, ids, generate)
        except Exception as exc:  # the model is an extra signal; BM25 still answers
            log.warning("module lookup: the model could not answer (%s); using BM25 only", exc)
            picks = []
        for rank, mid in enumerate(picks):
            fused[mid] = fused.get(mid, 0.0) + model_weight / (RRF_K + rank + 1)
            reasons.setdefault(mid, []).append(
                "the model's first choice" if rank == 0 else "the model's next choice"
            )
    wanted = set(terms(query))
    hits: list[ModuleHit] = []
    for mid, score in sorted(fused.items(), key=lambda item: (-item[1], item[0]))[:limit]:
        module = modules[mid]
        path, start, end = _best_symbol_range(module, wanted)
        summary = module.summary()
        reason = "; ".join(reasons.get(mid, []))
        if summary:
            reason = f"{reason} — {summary}" if reason else summary
        hits.append(ModuleHit(mid, path, start, end, round(score, 4), reason[:200]))
    return hits
