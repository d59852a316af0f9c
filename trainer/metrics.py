"""Completion and module-lookup metrics, as pure functions on plain data.

The method is arXiv 2503.14201's: exact match after whitespace
normalisation is the headline figure; strict exact match, prefix match, edit
similarity and CrystalBLEU say *how* a prediction misses. Statistics
(bootstrap confidence intervals, McNemar's test on paired exact matches) are
here too, so that `shoptalk.trainer.evaluate` only gathers predictions and
`shoptalk.trainer.report` only presents numbers.

Nothing here loads a model or touches a file: every function can be checked
on hand-made cases.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from rapidfuzz.distance import Levenshtein

# CrystalBLEU's paper ignores the k most frequent n-grams (n = 1..4) of a
# general corpus; 500 is its default for the languages it studied.
DEFAULT_TRIVIAL_K = 500
BLEU_ORDER = 4

# Code tokens: identifiers, numbers, common multi-character operators, then any
# other single non-space character. The same tokenizer builds the trivial
# n-gram set and scores predictions, as CrystalBLEU requires.
_TOKEN = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*"
    r"|\d+(?:\.\d+)?"
    r"|\*\*=?|//=?|->|:=|==|!=|<=|>=|<<=?|>>=?|[-+*/%&|^@]="
    r"|\S"
)

Ngram = tuple[str, ...]


def normalize_whitespace(text: str) -> str:
    """The paper's normalisation: runs of whitespace become one space, and
    leading/trailing whitespace goes."""
    return " ".join(text.split())


def exact_match(prediction: str, target: str) -> bool:
    """Exact match after whitespace normalisation (the headline metric)."""
    return normalize_whitespace(prediction) == normalize_whitespace(target)


def strict_exact_match(prediction: str, target: str) -> bool:
    """Character-exact match, indentation and inner spacing kept. Only
    whitespace at the very end is ignored: a stopping rule may or may not
    leave the line's newline in the prediction."""
    return prediction.rstrip() == target.rstrip()


def prefix_match(prediction: str, target: str) -> bool:
    """The prediction starts with the whole target (after normalisation): the
    user gets the masked span and maybe more, which an editor can trim. An
    empty target never counts."""
    norm_target = normalize_whitespace(target)
    return bool(norm_target) and normalize_whitespace(prediction).startswith(norm_target)


def edit_similarity(prediction: str, target: str) -> float:
    """1 - Levenshtein distance / length of the longer string, on normalised
    text, in [0, 1]; two empty strings are identical (1.0)."""
    return float(
        Levenshtein.normalized_similarity(
            normalize_whitespace(prediction), normalize_whitespace(target)
        )
    )


def code_tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def ngrams(tokens: Sequence[str], n: int) -> list[Ngram]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def trivial_ngrams(
    corpus: Iterable[str], k: int = DEFAULT_TRIVIAL_K, max_n: int = BLEU_ORDER
) -> frozenset[Ngram]:
    """The `k` most frequent n-grams (n = 1..max_n, counted together) of a
    general corpus: the trivially shared n-grams CrystalBLEU ignores.

    Ties at the cut are broken by the n-gram itself so the set is the same on
    every run."""
    counts: Counter[Ngram] = Counter()
    for text in corpus:
        tokens = code_tokens(text)
        for n in range(1, max_n + 1):
            counts.update(ngrams(tokens, n))
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return frozenset(gram for gram, _ in ranked[:k])


@dataclass(frozen=True)
class BleuStats:
    """One instance's contribution to corpus CrystalBLEU: clipped n-gram
    matches and n-gram counts of the prediction per order (trivial n-grams
    left out), and both lengths in tokens."""

    matches: tuple[int, ...]
    totals: tuple[int, ...]
    hyp_len: int
    ref_len: int
    ref_all_trivial: bool  # the reference has no non-trivial n-gram at all
    ref_too_short: bool  # fewer tokens than BLEU_ORDER: no 4-gram to match

    def as_row(self) -> list[int]:
        return [*self.matches, *self.totals, self.hyp_len, self.ref_len]


def crystal_bleu_stats(
    prediction: str, target: str, trivial: frozenset[Ngram], max_n: int = BLEU_ORDER
) -> BleuStats:
    """Sufficient statistics of CrystalBLEU for one instance, counted with the
    `crystalbleu` package's own modified precision."""
    from crystalbleu import modified_precision

    hyp = code_tokens(prediction)
    ref = code_tokens(target)
    matches: list[int] = []
    totals: list[int] = []
    for n in range(1, max_n + 1):
        fraction = modified_precision([ref], hyp, n, ignoring=trivial)
        # Kept exactly as the package counts them (it clamps an empty
        # denominator to 1), so corpus scores equal crystalbleu.corpus_bleu.
        matches.append(int(fraction.numerator))
        totals.append(int(fraction.denominator))
    all_trivial = all(gram in trivial for n in range(1, max_n + 1) for gram in ngrams(ref, n))
    return BleuStats(
        matches=tuple(matches),
        totals=tuple(totals),
        hyp_len=len(hyp),
        ref_len=len(ref),
        ref_all_trivial=all_trivial,
        ref_too_short=len(ref) < max_n,
    )


def _bleu_from_sums(sums: np.ndarray, max_n: int = BLEU_ORDER) -> np.ndarray:
    """Corpus BLEU from summed statistics; `sums` has shape (..., 2*max_n + 2).
    Without smoothing, like crystalbleu.corpus_bleu: any order with no match
    gives 0."""
    matches = sums[..., :max_n].astype(float)
    totals = sums[..., max_n : 2 * max_n].astype(float)
    hyp_len = sums[..., 2 * max_n].astype(float)
    ref_len = sums[..., 2 * max_n + 1].astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = matches / np.maximum(totals, 1.0)
        log_mean = np.log(np.where(matches > 0, precision, 1.0)).mean(axis=-1)
        brevity = np.where(
            hyp_len >= ref_len, 1.0, np.exp(1.0 - ref_len / np.maximum(hyp_len, 1.0))
        )
    score = brevity * np.exp(log_mean)
    return np.where((matches > 0).all(axis=-1) & (hyp_len > 0), score, 0.0)


def corpus_crystal_bleu(stats: Sequence[BleuStats]) -> float:
    """Corpus-level CrystalBLEU in [0, 1] over the instances' statistics."""
    if not stats:
        return 0.0
    rows = np.array([s.as_row() for s in stats], dtype=np.int64)
    return float(_bleu_from_sums(rows.sum(axis=0)))


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap confidence interval."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return {"value": self.value, "low": self.low, "high": self.high}


def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, n, size=(resamples, n))


def _percentile_interval(value: float, samples: np.ndarray, confidence: float) -> Interval:
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return Interval(value, float(low), float(high))


def bootstrap_mean(
    values: Sequence[float], resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """Mean of `values` with a percentile bootstrap interval (instances
    resampled with replacement). An empty sample has no estimate: NaN."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return Interval(math.nan, math.nan, math.nan)
    samples = data[_resample_indices(data.size, resamples, seed)].mean(axis=1)
    return _percentile_interval(float(data.mean()), samples, confidence)


def bootstrap_crystal_bleu(
    stats: Sequence[BleuStats], resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> Interval:
    """Corpus CrystalBLEU with a bootstrap interval over instances."""
    if not stats:
        return Interval(math.nan, math.nan, math.nan)
    rows = np.array([s.as_row() for s in stats], dtype=np.int64)
    idx = _resample_indices(len(stats), resamples, seed)
    samples = _bleu_from_sums(rows[idx].sum(axis=1))
    return _percentile_interval(corpus_crystal_bleu(stats), samples, confidence)


def bootstrap_statistic(
    n: int,
    statistic: Callable[[np.ndarray], float],
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Any statistic of a sample of `n` instances, given as a function of an
    index array, with a percentile bootstrap interval."""
    if n == 0:
        return Interval(math.nan, math.nan, math.nan)
    idx = _resample_indices(n, resamples, seed)
    samples = np.array([statistic(row) for row in idx])
    return _percentile_interval(statistic(np.arange(n)), samples, confidence)


@dataclass(frozen=True)
class McNemar:
    """McNemar's test on paired binary outcomes (exact binomial form).

    `only_a`: instances A got right and B wrong; `only_b`: the reverse."""

    only_a: int
    only_b: int
    statistic: float  # chi-square with continuity correction, for reference
    p_value: float  # exact two-sided binomial p-value

    def as_dict(self) -> dict[str, float]:
        return {
            "only_a": self.only_a,
            "only_b": self.only_b,
            "statistic": self.statistic,
            "p_value": self.p_value,
        }


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> McNemar:
    """Do A and B differ in exact match on the same instances? Exact: under
    the null hypothesis the discordant pairs split as Binomial(n, 1/2)."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes differ in length: {len(a)} != {len(b)}")
    only_a = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    only_b = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    discordant = only_a + only_b
    if discordant == 0:
        return McNemar(0, 0, 0.0, 1.0)
    k = min(only_a, only_b)
    tail = sum(math.comb(discordant, i) for i in range(k + 1)) / 2.0**discordant
    p_value = min(1.0, 2.0 * tail)
    statistic = (abs(only_a - only_b) - 1) ** 2 / discordant if discordant else 0.0
    return McNemar(only_a, only_b, float(statistic), float(p_value))


def top_k_hit(ranked: Sequence[str], gold: Iterable[str], k: int) -> bool:
    """Whether any of the first `k` ranked module ids is a correct one."""
    wanted = set(gold)
    return any(module in wanted for module in ranked[:k])


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (linear interpolation); NaN for no values."""
    if not values:
        return math.nan
    return float(np.percentile(np.asarray(values, dtype=float), q))


@dataclass(frozen=True)
class CompletionScore:
    """Every per-instance metric of one prediction against its target."""

    exact: bool
    strict_exact: bool
    prefix: bool
    edit_similarity: float
    bleu: BleuStats


def score_completion(prediction: str, target: str, trivial: frozenset[Ngram]) -> CompletionScore:
    return CompletionScore(
        exact=exact_match(prediction, target),
        strict_exact=strict_exact_match(prediction, target),
        prefix=prefix_match(prediction, target),
        edit_similarity=edit_similarity(prediction, target),
        bleu=crystal_bleu_stats(prediction, target, trivial),
    )


@dataclass(frozen=True)
class CompletionSummary:
    """Aggregate metrics of one model on one set of instances (in percent,
    except counts)."""

    count: int
    exact: Interval
    strict_exact: Interval
    prefix: Interval
    edit_similarity: Interval
    crystal_bleu: Interval
    all_trivial_references: int
    too_short_references: int

    def as_dict(self) -> dict[str, object]:
        return {
            "count": self.count,
            "exact_match": self.exact.as_dict(),
            "strict_exact_match": self.strict_exact.as_dict(),
            "prefix_match": self.prefix.as_dict(),
            "edit_similarity": self.edit_similarity.as_dict(),
            "crystal_bleu": self.crystal_bleu.as_dict(),
            "all_trivial_references": self.all_trivial_references,
            "too_short_references": self.too_short_references,
        }


def _percent(interval: Interval) -> Interval:
    return Interval(interval.value * 100.0, interval.low * 100.0, interval.high * 100.0)


def summarize_completions(
    scores: Sequence[CompletionScore], resamples: int = 1000, seed: int = 0
) -> CompletionSummary:
    """Means (and corpus CrystalBLEU) with 95% bootstrap intervals, in percent.

    The same seed resamples the same instances for every metric and model, so
    intervals of models scored on the same instances are comparable."""

    def mean_of(values: list[float]) -> Interval:
        return _percent(bootstrap_mean(values, resamples=resamples, seed=seed))

    return CompletionSummary(
        count=len(scores),
        exact=mean_of([float(s.exact) for s in scores]),
        strict_exact=mean_of([float(s.strict_exact) for s in scores]),
        prefix=mean_of([float(s.prefix) for s in scores]),
        edit_similarity=mean_of([s.edit_similarity for s in scores]),
        crystal_bleu=_percent(
            bootstrap_crystal_bleu([s.bleu for s in scores], resamples=resamples, seed=seed)
        ),
        all_trivial_references=sum(1 for s in scores if s.bleu.ref_all_trivial),
        too_short_references=sum(1 for s in scores if s.bleu.ref_too_short),
    )
