"""The completion engine on real llama.cpp (the tiny GGUF): KV-cache reuse
across keystrokes, prefill, healing at the prompt boundary, stopping, the
suggestion cache, cancellation and the time budget."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from shoptalk.models.catalog import GEMMA3_FIM
from shoptalk.models.backends import LlamaBackend, LlamaOptions
from shoptalk.models.completion import CompletionEngine, EngineOptions, GenerationRequest

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
