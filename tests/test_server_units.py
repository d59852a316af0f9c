"""The server's pure parts: positions, prompt planning, where suggestions end,
post-filters, the suggestion cache, token healing on a vocabulary, BM25
module lookup, client options."""

from __future__ import annotations

import itertools
import random

import pytest

from shoptalk.models.backends import VocabPieces, heal_split, heal_text
from shoptalk.models.catalog import GEMMA3_FIM, QWEN_CODER_FIM
from shoptalk.models.completion import (
    SuggestionCache,
    allows_multiline,
    offset_to_utf16,
    plan_prompt,
    postfilter,
    stable_tail,
    stop_rule,
    utf16_to_offset,
)
from shoptalk.models.module_lookup import (
    BASE_MODEL_WEIGHT,
    TUNED_MODEL_WEIGHT,
    ModuleIndex,
    find_modules,
    model_picks,
    module_grammar,
    terms,
)
from shoptalk.models.module_map import build_module_map
from shoptalk.models.prompt import clip_prefix, prefix_line_step
from shoptalk.models.settings import Settings
from shoptalk.server.lsp import parse_client_options


def test_positions_are_utf16_and_clamped() -> None:
    text = "a😀b\nxyz\n"
    assert utf16_to_offset(text, 0, 3) == 2  # the emoji is two UTF-16 units
    assert utf16_to_offset(text, 0, 4) == 3
    assert utf16_to_offset(text, 1, 1) == 5
    assert utf16_to_offset(text, 1, 99) == 7  # past the line's end: the line's end
    assert utf16_to_offset(text, 99, 0) == len(text)  # past the document: its end
    assert utf16_to_offset(text, -1, -1) == 0
    for offset in range(len(text) + 1):
        line, character = offset_to_utf16(text, offset)
        assert utf16_to_offset(text, line, character) == offset


def test_stable_tail_clips_like_the_whole_prefix() -> None:
    rng = random.Random(7)
    lines = ["x" * rng.randint(0, 90) for _ in range(3000)]
    document = "\n".join(lines)
    for _ in range(50):
        cut = rng.randint(0, len(document))
        prefix = document[:cut]
        for budget in (200, 1600):
            tail = stable_tail(prefix, budget)
            assert prefix.endswith(tail)
            assert clip_prefix(tail, budget) == clip_prefix(prefix, budget)


def test_plan_prompt_fim_and_prefix_only() -> None:
    fim = plan_prompt(QWEN_CODER_FIM, "def f(x):\n    ret", "\nprint(f(1))\n", True, 1600, 400)
    assert fim.lead == QWEN_CODER_FIM.prefix and fim.prefix.endswith("ret")
    assert fim.trail == f"{QWEN_CODER_FIM.suffix}\nprint(f(1))\n{QWEN_CODER_FIM.middle}"
    assert fim.end_markers == (QWEN_CODER_FIM.end,)
    plain = plan_prompt(GEMMA3_FIM, "a = 1\nb = ", "\n", False, 1600, 400)
    assert (plain.lead, plain.prefix, plain.trail) == ("", "a = 1\nb = ", "")
    # While the user types, the prompt's start does not move.
    document = "".join(f"line_{i} = {i}\n" for i in range(500))
    starts = {
        plan_prompt(GEMMA3_FIM, document + "value = comp"[:n], "", False, 1600, 400).prefix[:40]
        for n in range(12)
    }
    assert len(starts) == 1


def test_multiline_only_on_an_empty_line() -> None:
    assert allows_multiline("def f():\n    ", "\n", "auto")
    assert not allows_multiline("def f():\n    return", "\n", "auto")
    assert not allows_multiline("    ", ")\n", "auto")
    assert allows_multiline("x = ", ")", "always")
    assert not allows_multiline("\n", "", "never")


def test_stop_rule_ends_lines_and_blocks() -> None:
    single = stop_rule("x = comp", multiline=False)
    assert single("ute(1)") is None
    assert single("ute(1)\ny = 2") == len("ute(1)")
    block = stop_rule("def f(x):\n    ", multiline=True)
    text = "y = x + 1\n    return y\n\ndef g():\n"
    assert block(text) == len("y = x + 1\n    return y")
    dedent = "y = x + 1\n    return y\nprint(f(2))\n"
    assert block(dedent) == len("y = x + 1\n    return y")
    assert block("y = x + 1\n    ret") is None  # the last line may still grow
    many = "".join(f"a{i} = {i}\n    " for i in range(20))
    cut = block(many)
    assert cut is not None and many[:cut].count("\n") < 8


def test_postfilter_drops_useless_suggestions() -> None:
    assert postfilter("   \n  ", "x = ", "") == ""
    assert postfilter("foo(a)", "x = ", "foo(a)\n") == ""  # repeats what follows
    assert postfilter("foo(a))", "x = bar(", ")\n") == "foo(a)"  # closing char already there
    assert postfilter("a = 1\nb = 2\na = 1\nb = 2", "", "\n") == "a = 1\nb = 2"
    assert postfilter("total = 0", "    total = 0\n    ", "\n") == ""  # the line above again
    assert postfilter("x = 1\n    return x", "def f():\n    ", "\n    return x\n") == "x = 1"
    assert postfilter("compute(a, b)", "r = ", "\n") == "compute(a, b)"


def test_cache_answers_while_the_user_types_the_suggestion() -> None:
    cache = SuggestionCache(size=4)
    prefix = "import os\nvalue = os.pa"
    cache.put(prefix, "\nprint(value)\n", "th.join(a, b)")
    assert cache.get(prefix, "\nprint(value)\n") == "th.join(a, b)"
    assert cache.get(prefix + "th.jo", "\nprint(value)\n") == "in(a, b)"
    assert cache.get(prefix + "tx", "\nprint(value)\n") is None  # diverged
    assert cache.get(prefix + "th.join(a, b)", "\nprint(value)\n") is None  # all typed
    assert cache.get(prefix + "th", ")\n") is None  # different rest of line
    assert cache.get("other\n" + prefix[6:] + "th", "\nprint(value)\n") is None
    for i in range(5):
        cache.put(f"p{i}", "", "s")
    assert cache.get(prefix, "\nprint(value)\n") is None  # evicted


def test_vocab_candidates_and_heal_split() -> None:
    pieces = [b"", b" ", b" foo", b"foo", b"ba", b"bar", b"b", b"a", b"r(", b"\n", b"baz"]
    vocab = VocabPieces(pieces)
    assert sorted(vocab.candidates(b"ba").tolist()) == [4, 5, 6, 10]  # ba, bar, baz; b then a
    assert sorted(vocab.candidates(b" ").tolist()) == [1, 2]
    assert vocab.candidates(b"\xff").tolist() == []
    assert 0 not in vocab.candidates(b"").tolist()  # empty (control) pieces never heal
    tokens = [3, 4]  # "foo" "ba"
    assert heal_split(tokens, vocab, b"fooba") == ([3], b"ba")
    assert heal_split([], vocab, b"") == ([], b"")


def test_heal_text_backs_off_partial_words_and_spaces() -> None:
    assert heal_text("x = compu") == ("x = ", "compu")
    assert heal_text("return ") == ("return", " ")
    assert heal_text("f(") == ("f(", "")


MODULES = {
    "billing/__init__.py": '"""Billing."""\n',
    "billing/invoices.py": '"""Invoices and totals."""\n\n\ndef invoice_total(lines):\n    return 0\n',
    "billing/taxes.py": '"""Value added tax rates per country."""\n\n\ndef vat_rate(country):\n    return 0.2\n',
    "web/server.py": '"""HTTP routes."""\n\n\ndef handle_request(request):\n    return 200\n',
}


def test_bm25_ranks_names_symbols_and_docs() -> None:
    index = ModuleIndex(build_module_map(MODULES))
    assert terms("parseHTTPHeader the tax_rates") == ["parse", "http", "header", "tax", "rate"]
    hits = find_modules("which country vat rates", index, None, limit=3)
    assert hits[0].id == "billing.taxes"
    assert hits[0].path == "billing/taxes.py" and hits[0].start_line == 3
    assert "vat" in hits[0].reason and "Value added tax" in hits[0].reason
    assert find_modules("handle http requests", index)[0].id == "web.server"
    assert find_modules("   ", index) == []
    assert find_modules("zzz qqq", index) == []


def test_model_picks_are_fused_with_bm25() -> None:
    index = ModuleIndex(build_module_map(MODULES))
    seen: list[str] = []

    def generate(prompt: str, grammar: str, max_tokens: int) -> str:
        seen.append(grammar)
        return " billing.invoices\n"

    hits = find_modules("invoice totals and tax", index, generate, limit=3)
    assert hits[0].id == "billing.invoices"
    assert "the model's first choice" in hits[0].reason
    assert '"billing.invoices"' in seen[0] and '"web.server"' not in seen[0]  # BM25 candidates only
    assert model_picks("x", ["a"], lambda *_: "not a module") == []

    # The untuned base's pick never overturns BM25's leader; a tuned model's
    # pick can only lift BM25's runner-up (measured: fusing a guessing model
    # with more weight lowered top-1).
    lexical = [h.id for h in find_modules("invoice totals and tax", index, None, limit=5)]
    assert len(lexical) >= 2

    def pick_second(prompt: str, grammar: str, max_tokens: int) -> str:
        return f" {lexical[1]}\n"

    query = "invoice totals and tax"
    fused = find_modules(query, index, pick_second, limit=5, model_weight=BASE_MODEL_WEIGHT)
    assert [h.id for h in fused[:2]] == lexical[:2]
    assert "the model's first choice" in fused[1].reason
    tuned = find_modules(query, index, pick_second, limit=5, model_weight=TUNED_MODEL_WEIGHT)
    assert [h.id for h in tuned[:2]] == [lexical[1], lexical[0]]


def test_module_grammar_compiles_in_llama_cpp() -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    grammar = module_grammar(["billing.taxes", 'odd"name', "web/server"])
    assert llama_cpp.LlamaGrammar.from_string(grammar, verbose=False) is not None
    with pytest.raises(ValueError):
        module_grammar([])


def test_client_options_keep_good_keys_and_name_bad_ones() -> None:
    base = Settings()
    settings, problems = parse_client_options(
        {"max_tokens": 12, "multiline": "sometimes", "personal": {"enabled": True}, "bogus": 1},
        base,
    )
    assert settings.serve.max_tokens == 12
    assert settings.serve.multiline == base.serve.multiline
    assert settings.personal.enabled is True
    assert any("multiline" in p for p in problems) and any("bogus" in p for p in problems)
    nested, problems = parse_client_options({"shoptalk": {"serve": {"max_latency_ms": 300}}}, base)
    assert nested.serve.max_latency_ms == 300 and not problems
    same, problems = parse_client_options(None, base)
    assert same == base and not problems
    _, problems = parse_client_options(["not", "an", "object"], base)
    assert problems


def test_default_threads_is_one_per_usable_physical_core(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from shoptalk.models import backends

    usable = len(os.sched_getaffinity(0))
    assert 1 <= backends.default_threads() <= usable
    monkeypatch.setattr(backends, "_physical_cores", lambda: 64)
    assert backends.default_threads() == usable  # never more than this process may use
    monkeypatch.setattr(backends, "_physical_cores", lambda: None)
    assert backends.default_threads() == max(1, usable // 2)  # unknown: assume hyper-threads


def test_the_prefix_start_moves_rarely_and_in_large_steps() -> None:
    """At the default 6,000 characters the start moves once per 32 lines typed
    (each move means reading the whole prompt again), at 1,600 once per 8."""
    assert (prefix_line_step(1600), prefix_line_step(6000), prefix_line_step(8000)) == (8, 32, 40)
    document = "".join(f"value_{i} = compute(value_{i - 1}, {i})\n" for i in range(1000))
    for budget, step in ((6000, 32), (1600, 8)):
        starts = [
            len(document[: 20_000 + n * 35]) - len(clip_prefix(document[: 20_000 + n * 35], budget))
            for n in range(4 * step)
        ]
        moves = sum(1 for a, b in itertools.pairwise(starts) if a != b)
        assert moves <= 4, (budget, moves)
        assert all(len(document[: 20_000 + n * 35]) - s <= budget for n, s in enumerate(starts))
