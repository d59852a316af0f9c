"""The completion engine on real llama.cpp (the tiny GGUF): KV-cache reuse
across keystrokes (with and without repository context), prefill, healing at
the prompt boundary, stopping, the suggestion cache, cancellation, the time
budget (a cut answer is not shown; the next request goes on from it), scoring
continuations and the copy channel."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tiny_models import llama_cpp_logits

from shoptalk.models.backends import ROW_CHUNK, LlamaBackend, LlamaOptions
from shoptalk.models.catalog import GEMMA3_FIM
from shoptalk.models.completion import (
    CompletionEngine,
    EngineOptions,
    Generation,
    GenerationRequest,
    complete_lines,
)
from shoptalk.models.context import CONTEXT_LINE_STEP, Workspace
from shoptalk.models.module_map import build_module_map
from shoptalk.models.workspace_index import WorkspaceIndex

pytestmark = pytest.mark.e2e

DOCUMENT = "".join(
    f"def handler_{i}(request):\n    return respond(request, {i})\n\n" for i in range(30)
)


@pytest.fixture(scope="module")
def backend(tiny_gguf: Callable[..., Path]) -> LlamaBackend:
    return LlamaBackend(tiny_gguf("gemma3"), LlamaOptions(context_tokens=2048, threads=1))


def test_keystrokes_reuse_the_kv_cache(backend: LlamaBackend) -> None:
    engine = CompletionEngine(backend, GEMMA3_FIM, False, EngineOptions(max_tokens=8))
    text = DOCUMENT + "def handler_x(req"
    first = engine.complete(text, len(text), use_cache=False).generation
    assert first is not None and first.prompt_tokens > 100
    again = engine.complete(text + "u", len(text) + 1, use_cache=False).generation
    assert again is not None
    # Only the tokens after the common prefix are evaluated again.
    assert again.evaluated_tokens <= 4 < again.prompt_tokens


def test_prefill_warms_the_first_request(backend: LlamaBackend) -> None:
    engine = CompletionEngine(backend, GEMMA3_FIM, False, EngineOptions(max_tokens=4))
    text = "import os\n" + DOCUMENT.replace("handler", "view") + "def view_new(arg"
    evaluated = engine.prefill(text, len(text))
    assert evaluated > 100
    generation = engine.complete(text, len(text), use_cache=False).generation
    assert generation is not None and generation.evaluated_tokens <= 1


def test_healing_backs_off_the_last_token(backend: LlamaBackend) -> None:
    engine = CompletionEngine(backend, GEMMA3_FIM, False, EngineOptions(max_tokens=6))
    text = DOCUMENT + "def handler_y(request):\n    return resp"
    healed = engine.complete(text, len(text), use_cache=False).generation
    assert healed is not None and healed.healed and text.endswith(healed.healed)
    plain = CompletionEngine(
        backend, GEMMA3_FIM, False, EngineOptions(max_tokens=6, heal=False)
    ).complete(text, len(text), use_cache=False)
    assert plain.generation is not None and plain.generation.healed == ""
    # The healed prompt is one token shorter than the raw one.
    assert healed.prompt_tokens == plain.generation.prompt_tokens - 1


def test_single_line_stop_cache_cancel_and_budget(backend: LlamaBackend) -> None:
    engine = CompletionEngine(backend, GEMMA3_FIM, False, EngineOptions(max_tokens=32))
    text = DOCUMENT + "value = handler_3(req"
    suggestion = engine.complete(text, len(text))
    assert "\n" not in suggestion.text
    generation = suggestion.generation
    assert generation is not None
    if suggestion.text[1:].strip():
        cached = engine.complete(text + suggestion.text[0], len(text) + 1)
        if generation.stop_reason in ("stop", "end"):
            # A complete line is served again while the user types through it.
            assert cached.source == "cache" and cached.text == suggestion.text[1:]
        else:
            assert cached.source != "cache"  # a line cut short is not worth repeating
    cancelled = threading.Event()
    cancelled.set()
    stopped = engine.complete(text + "x", len(text) + 1, cancelled=cancelled, use_cache=False)
    assert stopped.text == "" and stopped.generation is not None
    assert stopped.generation.stop_reason == "cancelled"
    late = backend.generate(
        GenerationRequest(engine.plan(text, len(text)), 32, deadline=time.monotonic() - 1)
    )
    assert late.stop_reason == "budget" and late.text == ""


# ---- repository context, copy channel, cut generations ------------------------------

LIBRARY = "".join(
    f"def render_widget_{i}(canvas, palette):\n    return canvas.paint(palette, layer={i})\n\n"
    for i in range(12)
)


def workspace_with(files: dict[str, str]) -> Workspace:
    return Workspace(WorkspaceIndex.from_contents(files), build_module_map(files))


def test_context_block_stays_put_while_typing_so_the_kv_cache_is_reused(
    backend: LlamaBackend,
) -> None:
    text = DOCUMENT + "def show(canvas, palette):\n    canvas.pai"
    workspace = workspace_with({"ui/widgets.py": LIBRARY, "app.py": text})
    options = EngineOptions(max_tokens=8, context_chars=1200)
    engine = CompletionEngine(backend, GEMMA3_FIM, False, options)
    first = engine.complete(text, len(text), use_cache=False, path="app.py", workspace=workspace)
    plan = engine.last_plan
    assert plan is not None and first.generation is not None
    assert plan.context.startswith("# ui/widgets.py\n") and "canvas.paint(palette" in plan.context
    assert plan.context.endswith("# app.py\n") and plan.text().endswith(text[-1500:])
    # The index changes while the user types on the line: the block stays.
    workspace.index.update("ui/late.py", "def paint_late(canvas, palette):\n    pass\n")
    for typed in ("n", "nt"):
        again = engine.complete(
            text + typed,
            len(text) + len(typed),
            use_cache=False,
            path="app.py",
            workspace=workspace,
        )
        assert engine.last_plan is not None and engine.last_plan.context == plan.context
        assert again.generation is not None
        assert again.generation.evaluated_tokens <= 4 < again.generation.prompt_tokens
    # The first line of the next 16-line stretch builds the block again, with
    # what the index has now (a new line inside the stretch keeps it).
    moved = text + "nt(palette)\n    "
    engine.complete(moved, len(moved), use_cache=False, path="app.py", workspace=workspace)
    assert engine.last_plan is not None and engine.last_plan.context == plan.context
    while moved.count("\n") % CONTEXT_LINE_STEP != 0:
        moved += "canvas.paint(palette)\n    "
    engine.complete(moved, len(moved), use_cache=False, path="app.py", workspace=workspace)
    assert engine.last_plan is not None and "# ui/late.py\n" in engine.last_plan.context
    assert engine.prefill(moved, len(moved), path="app.py", workspace=workspace) <= 1


def test_score_is_the_models_log_probability_and_keeps_the_cache(
    backend: LlamaBackend, tiny_gguf: Callable[..., Path]
) -> None:
    engine = CompletionEngine(backend, GEMMA3_FIM, False, EngineOptions(max_tokens=6))
    text = DOCUMENT[:500] + "def handler_q(req"
    plan = engine.plan(text, len(text))
    tokens, healed = backend.tokenize_plan(plan, heal=True)
    # A short continuation, and one longer than a batch of read rows (ROW_CHUNK).
    for continuation in ("uest, extra):", "uest, extra):\n    return extra + request + 1  # ok"):
        answer = backend.llm.tokenize(healed + continuation.encode(), add_bos=False, special=False)
        reference = llama_cpp_logits(tiny_gguf("gemma3"), tokens + answer)
        rows = reference[len(tokens) - 1 : len(tokens) - 1 + len(answer)]
        shifted = rows - rows.max(axis=1, keepdims=True)
        log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        expected = float(sum(log_softmax[i, token] for i, token in enumerate(answer)))
        score = backend.score(plan, continuation)
        assert score is not None and score.tokens == len(answer)
        assert score.logprob == pytest.approx(expected, rel=1e-3, abs=1e-3)
    assert len(answer) > 2 * ROW_CHUNK
    # The scored tokens were dropped again: the prompt is still cached.
    generation = engine.complete(text, len(text), use_cache=False).generation
    assert generation is not None and generation.evaluated_tokens <= 1


BRANCH_STARTS = ("(", ")", ", ", ".", "_", "[", " = ", " + ", "s", "e", ":", "0", "1", " if ")


def model_preferences(engine: CompletionEngine, text: str) -> tuple[str, list[tuple[float, str]]]:
    """The model's own answer at the end of `text`, and continuations that
    start elsewhere (each branch then followed greedily) scored per token,
    best first: which one the model prefers is decided by the model itself."""
    plan = engine.plan(text, len(text))
    own = engine.complete(text, len(text), use_cache=False).generation
    assert own is not None and own.text.strip()
    branches = set()
    for start in BRANCH_STARTS:
        rest = engine.complete(text + start, len(text) + len(start), use_cache=False)
        assert rest.generation is not None
        candidate = (start + rest.generation.text).rstrip()
        if candidate.strip() and not own.text.startswith(candidate):
            branches.add(candidate)
    scored = []
    for candidate in branches:
        score = engine.backend.score(plan, candidate)
        assert score is not None
        scored.append((score.mean, candidate))
    own_score = engine.backend.score(plan, own.text)
    assert own_score is not None
    scored.sort(reverse=True)
    return own.text, [(mean - own_score.mean, c) for mean, c in scored]


def test_copy_channel_takes_a_repository_line_the_model_finds_likelier(
    backend: LlamaBackend,
) -> None:
    typed = "    total = handler_7(request, "
    text = DOCUMENT + "def summary(request):\n" + typed
    plain = CompletionEngine(backend, GEMMA3_FIM, False, EngineOptions(max_tokens=10))
    own, ranked = model_preferences(plain, text)
    better = [c for margin, c in ranked if margin > 0.05]
    worse = [c for margin, c in ranked if margin < -0.05]
    assert better and worse, f"the model prefers no branch over {own!r}: {ranked}"
    files = {
        "lib/a.py": f"def a(request):\n{typed}{better[0]}\n",
        "lib/b.py": f"def b(request):\n{typed}{worse[0]}\n",
    }
    options = EngineOptions(max_tokens=10, copy_channel=True)
    engine = CompletionEngine(backend, GEMMA3_FIM, False, options)
    copied = engine.complete(
        text, len(text), use_cache=False, path="app.py", workspace=workspace_with(files)
    )
    assert (copied.source, copied.text) == ("copy", better[0])
    # A line the model finds less likely than its own answer is not taken.
    worse_only = workspace_with({"lib/b.py": files["lib/b.py"]})
    kept = engine.complete(text, len(text), use_cache=False, path="app.py", workspace=worse_only)
    assert (kept.source, kept.text) == ("model", own.rstrip())


class SlowAfter:
    """The real backend, with the stop rule held up after `tokens` generated
    tokens until the request's time budget has passed: a cut under load,
    made deterministic."""

    def __init__(self, backend: LlamaBackend, tokens: int) -> None:
        self.backend = backend
        self.tokens = tokens

    def generate(
        self, request: GenerationRequest, cancelled: threading.Event | None = None
    ) -> Generation:
        calls = 0
        inner = request.stop_at

        def held_up(text: str) -> int | None:
            nonlocal calls
            calls += 1
            if calls == self.tokens:
                time.sleep(max(0.0, request.deadline - time.monotonic()) + 0.01)
            return inner(text) if inner is not None else None

        return self.backend.generate(dataclasses.replace(request, stop_at=held_up), cancelled)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)


def test_a_cut_answer_is_not_shown_and_the_next_request_goes_on_from_it(
    backend: LlamaBackend,
) -> None:
    options = EngineOptions(max_tokens=10)
    engine = CompletionEngine(backend, GEMMA3_FIM, False, options)
    text = DOCUMENT + "x = "
    whole = engine.complete(text, len(text), use_cache=False).generation
    assert whole is not None and whole.generated_tokens > 3
    cut_engine = CompletionEngine(SlowAfter(backend, 2), GEMMA3_FIM, False, options)  # type: ignore[arg-type]
    cut = cut_engine.complete(text, len(text), use_cache=False, budget_ms=300)
    assert cut.generation is not None and cut.generation.stop_reason == "budget"
    assert cut.generation.text and cut.text == "" and cut.source == "none"
    resumed = engine.complete(text, len(text), use_cache=False).generation
    assert resumed is not None and resumed.evaluated_tokens <= 1
    assert (resumed.text, resumed.generated_tokens) == (whole.text, whole.generated_tokens)
    # Multi-line answers keep the lines that were complete.
    assert complete_lines("return x\n    retu") == "return x"
    assert complete_lines("[") == ""


def test_a_draft_is_checked_in_one_batch_and_never_changes_the_answer(
    backend: LlamaBackend,
) -> None:
    engine = CompletionEngine(backend, GEMMA3_FIM, False, EngineOptions(max_tokens=12))
    text = DOCUMENT + "x = "
    plan = engine.plan(text, len(text))

    def generate(drafts: tuple[str, ...]) -> Generation:
        return backend.generate(GenerationRequest(plan, 12, time.monotonic() + 30, drafts=drafts))

    plain = generate(())
    assert plain.drafted_tokens == 0 and len(plain.text) > 4
    # The model's own answer as the draft: its tokens come from the batch for
    # as long as the text's own tokenization matches what the model chose.
    followed = generate((plain.text,))
    assert followed.text == plain.text and followed.drafted_tokens > 0
    # A draft that parts from the answer: its start at most, then greedy.
    parted = generate((plain.text[:2] + "#" * 8,))
    assert parted.text == plain.text
    assert parted.drafted_tokens <= followed.drafted_tokens
    # A wrong draft costs one batch and changes nothing.
    wrong = generate(("qqqq zzzz",))
    assert (wrong.text, wrong.drafted_tokens) == (plain.text, 0)
    # The cache is consistent afterwards: the next request reuses the prompt.
    again = engine.complete(text, len(text), use_cache=False).generation
    assert again is not None and again.evaluated_tokens <= 1


def test_closing_while_a_request_runs_frees_the_model_only_after_it(
    tiny_gguf: Callable[..., Path],
) -> None:
    """The server closes the backend when the editor vanishes, possibly while
    the inference thread is tokenizing or reading a prompt: the model is freed
    only when that request is done, and later requests get empty answers
    instead of touching freed memory (which killed the process, SIGSEGV)."""
    own = LlamaBackend(tiny_gguf("gemma3"), LlamaOptions(context_tokens=2048, threads=1))
    engine = CompletionEngine(own, GEMMA3_FIM, False, EngineOptions(max_tokens=16))
    answers: list[Generation | None] = []
    texts = [DOCUMENT.replace("handler", f"view{i}") + "x = view1_2(req" for i in range(6)]

    def type_along() -> None:
        for text in texts:
            answers.append(engine.complete(text, len(text), use_cache=False).generation)

    typist = threading.Thread(target=type_along)
    typist.start()
    while not answers:
        time.sleep(0.001)
    own.close()
    typist.join(60)
    assert not typist.is_alive() and len(answers) == len(texts)
    assert answers[0] is not None and answers[0].prompt_tokens > 100
    after = answers[-1]
    assert after is not None and after.text == "" and after.stop_reason == "cancelled"
    plan = engine.plan(texts[0], len(texts[0]))
    assert own.prefill(plan) == 0
    assert own.score(plan, "uest)") is None
    assert own.pending_tokens(plan) is None
    own.close()  # twice is harmless
