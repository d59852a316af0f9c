"""Metrics on hand-made cases: normalisation, CrystalBLEU edge cases,
bootstrap intervals and McNemar's test (checked against scipy)."""

from __future__ import annotations

import math

import pytest
from crystalbleu import corpus_bleu
from scipy.stats import binomtest

from shoptalk.trainer import metrics
from shoptalk.trainer.metrics import (
    bootstrap_mean,
    code_tokens,
    corpus_crystal_bleu,
    crystal_bleu_stats,
    edit_similarity,
    exact_match,
    mcnemar,
    prefix_match,
    strict_exact_match,
    summarize_completions,
    top_k_hit,
    trivial_ngrams,
)


@pytest.mark.parametrize(
    ("prediction", "target", "em", "strict"),
    [
        ("foo(a, b)", "foo(a, b)", True, True),
        ("foo(a,  b)\n", "foo(a, b)", True, False),
        ("  return x\n", "return x", True, False),
        ("return x\n", "return x", True, True),  # the stop's newline is not a miss
        ("return\tx", "return x", True, False),
        ("foo(a,b)", "foo(a, b)", False, False),  # spaces between tokens are not free
        ("", "", True, True),
        ("", "x", False, False),
        ("Return x", "return x", False, False),
    ],
)
def test_exact_match_normalisation(prediction: str, target: str, em: bool, strict: bool) -> None:
    assert exact_match(prediction, target) is em
    assert strict_exact_match(prediction, target) is strict


def test_prefix_match_needs_the_whole_target() -> None:
    assert prefix_match("self.close()  # done", "self.close()")
    assert prefix_match("self.close()", "self.close()")
    assert not prefix_match("self.cl", "self.close()")
    assert not prefix_match("anything", "")
    assert prefix_match("a  b c", "a b")


def test_edit_similarity() -> None:
    assert edit_similarity("abc", "abc") == 1.0
    assert edit_similarity("", "") == 1.0
    assert edit_similarity("", "abc") == 0.0
    assert edit_similarity("abd", "abc") == pytest.approx(2 / 3)
    assert edit_similarity("a   b", "a b") == 1.0


def test_code_tokens() -> None:
    assert code_tokens("x += foo.bar(1.5, 'a')  # c") == [
        "x",
        "+=",
        "foo",
        ".",
        "bar",
        "(",
        "1.5",
        ",",
        "'",
        "a",
        "'",
        ")",
        "#",
        "c",
    ]
    assert code_tokens("a ** b // c -> d != e") == ["a", "**", "b", "//", "c", "->", "d", "!=", "e"]


def test_trivial_ngrams_are_the_most_frequent_and_deterministic() -> None:
    corpus = ["self . x = 1", "self . y = 2", "self . z = 3"]
    top = trivial_ngrams(corpus, k=3)
    # "self", ".", "=" and ("self", ".") occur 3 times; ties are broken by value.
    assert top == trivial_ngrams(list(reversed(corpus)), k=3)
    assert len(top) == 3
    assert all(gram in {("self",), (".",), ("=",), ("self", ".")} for gram in top)
    assert ("x",) not in trivial_ngrams(corpus, k=4)


CASES = [
    ("result = compute_total(items, tax)", "result = compute_total(items, rate)"),
    ("log.info('started %s', name)", "log.warning('started %s', name)"),
    ("return None", "raise ValueError(msg)"),
    ("for row in rows:", "for row in rows:"),
]


@pytest.mark.parametrize("trivial", [frozenset(), frozenset({("(",), (")",), ("=",), (",",)})])
def test_corpus_crystal_bleu_equals_the_package(trivial: frozenset[tuple[str, ...]]) -> None:
    stats = [crystal_bleu_stats(p, t, trivial) for p, t in CASES]
    expected = corpus_bleu(
        [[code_tokens(t)] for _, t in CASES],
        [code_tokens(p) for p, _ in CASES],
        ignoring=trivial or None,
    )
    assert corpus_crystal_bleu(stats) == pytest.approx(expected, abs=1e-9)
    assert 0 < corpus_crystal_bleu(stats) < 1


def test_crystal_bleu_edge_cases() -> None:
    trivial = frozenset({("return",), ("None",), ("return", "None")})
    # A perfect prediction whose reference is all trivial n-grams scores 0
    # (nothing left to match): counted, so the report can say how many.
    only_trivial = crystal_bleu_stats("return None", "return None", trivial)
    assert only_trivial.ref_all_trivial and only_trivial.ref_too_short
    assert corpus_crystal_bleu([only_trivial]) == 0.0
    # A span shorter than four tokens has no 4-gram: 0 on its own, even when exact.
    short = crystal_bleu_stats("x = y", "x = y", frozenset())
    assert short.ref_too_short and not short.ref_all_trivial
    assert corpus_crystal_bleu([short]) == 0.0
    # ... but it still adds its matches when pooled with longer instances.
    long = crystal_bleu_stats("a = b + c + d", "a = b + c + d", frozenset())
    assert corpus_crystal_bleu([long]) == pytest.approx(1.0)
    assert 0 < corpus_crystal_bleu([long, short]) <= 1.0
    # An empty prediction scores 0, as does an empty corpus.
    empty = crystal_bleu_stats("", "a = b + c + d", frozenset())
    assert corpus_crystal_bleu([empty]) == 0.0
    assert corpus_crystal_bleu([]) == 0.0


def test_bootstrap_mean_interval() -> None:
    values = [1.0] * 30 + [0.0] * 70
    interval = bootstrap_mean(values, resamples=2000, seed=1)
    assert interval.value == pytest.approx(0.3)
    # Normal approximation: 0.3 ± 1.96 * sqrt(0.3 * 0.7 / 100) = [0.21, 0.39].
    assert interval.low == pytest.approx(0.21, abs=0.025)
    assert interval.high == pytest.approx(0.39, abs=0.025)
    assert bootstrap_mean(values, seed=1) == bootstrap_mean(values, seed=1)
    constant = bootstrap_mean([0.5] * 10)
    assert (constant.low, constant.high) == (0.5, 0.5)
    assert math.isnan(bootstrap_mean([]).value)


@pytest.mark.parametrize(
    ("only_a", "only_b", "both", "neither"),
    [(0, 0, 5, 5), (10, 2, 30, 8), (3, 4, 0, 0), (40, 20, 10, 10), (1, 0, 0, 0)],
)
def test_mcnemar_matches_exact_binomial(only_a: int, only_b: int, both: int, neither: int) -> None:
    a = [True] * only_a + [False] * only_b + [True] * both + [False] * neither
    b = [False] * only_a + [True] * only_b + [True] * both + [False] * neither
    result = mcnemar(a, b)
    assert (result.only_a, result.only_b) == (only_a, only_b)
    if only_a + only_b == 0:
        assert result.p_value == 1.0
    else:
        expected = binomtest(only_a, only_a + only_b, 0.5).pvalue
        assert result.p_value == pytest.approx(expected, rel=1e-9)
    assert mcnemar(b, a).p_value == pytest.approx(result.p_value)


def test_mcnemar_rejects_unpaired() -> None:
    with pytest.raises(ValueError, match="paired"):
        mcnemar([True], [True, False])


def test_top_k_hit() -> None:
    ranked = ["pkg.a", "pkg.b", "pkg.c", "pkg.d"]
    assert top_k_hit(ranked, {"pkg.a"}, 1)
    assert not top_k_hit(ranked, {"pkg.c"}, 1)
    assert top_k_hit(ranked, {"pkg.c", "x"}, 3)
    assert not top_k_hit(ranked, {"pkg.d"}, 3)
    assert not top_k_hit([], {"pkg.a"}, 3)


def test_summary_counts_and_percentages() -> None:
    trivial = frozenset({("return",)})
    pairs = [("return x", "return x"), ("return  y", "return y"), ("z = 1", "q = 2"), ("", "pass")]
    scores = [metrics.score_completion(p, t, trivial) for p, t in pairs]
    summary = summarize_completions(scores, resamples=200)
    assert summary.count == 4
    assert summary.exact.value == pytest.approx(50.0)
    assert summary.strict_exact.value == pytest.approx(25.0)
    assert summary.too_short_references == 4
    assert summary.all_trivial_references == 0
    assert summary.exact.low <= summary.exact.value <= summary.exact.high
