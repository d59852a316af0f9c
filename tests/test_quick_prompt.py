"""The first request after opening a file, on real llama.cpp (the tiny GGUF):
while the whole prompt (context block, code after the cursor, the long
prefix) is not read yet, the engine answers from the quick prompt in its own
KV sequence, and the whole prompt's prefill goes on between requests without
losing what it read (issue 19). Evaluated-token counts, not wall time, prove
it: the backend's prompt speed is pinned, so the choice is deterministic."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from shoptalk.models.backends import EVAL_CHUNK, LlamaBackend, LlamaOptions
from shoptalk.models.catalog import GEMMA3_FIM
from shoptalk.models.completion import (
    QUICK_PREFIX_CHARS,
    READ_SHARE,
    CompletionEngine,
    EngineOptions,
)
from shoptalk.models.context import Workspace
from shoptalk.models.module_map import build_module_map
from shoptalk.models.workspace_index import WorkspaceIndex

pytestmark = pytest.mark.e2e

MS_PER_TOKEN = 2.4  # the default base on two cores
BUDGET_MS = 1000
# What a request may read of the whole prompt before answering.
ALLOWANCE = READ_SHARE * BUDGET_MS / MS_PER_TOKEN

LIBRARY = "".join(
    f"def render_widget_{i}(canvas, palette):\n    return canvas.paint(palette, layer={i})\n\n"
    for i in range(12)
)
OPTIONS = EngineOptions(
    max_tokens=8,
    max_latency_ms=BUDGET_MS,
    prefix_chars=3000,
    suffix_layout="before",
    context_chars=1000,
    copy_channel=True,
)


def document(name: str) -> tuple[str, int]:
    """A long file (more than the prefix budget) and a cursor inside it."""
    before = "".join(
        f"def {name}_{i}(canvas, palette):\n    return render_widget_{i % 12}(canvas, palette)\n\n"
        for i in range(60)
    )
    before += f"def {name}_show(canvas, palette):\n    canvas.pai"
    after = "\n\n" + "".join(f"def {name}_after_{i}():\n    return {i}\n\n" for i in range(8))
    return before + after, len(before)


@pytest.fixture(scope="module")
def backend(tiny_gguf: Callable[..., Path]) -> LlamaBackend:
    options = LlamaOptions(context_tokens=3072, threads=1, prompt_ms_per_token=MS_PER_TOKEN)
    return LlamaBackend(tiny_gguf("gemma3"), options)


@pytest.fixture
def workspace() -> Workspace:
    files = {"ui/widgets.py": LIBRARY}
    return Workspace(WorkspaceIndex.from_contents(files), build_module_map(files))


def test_first_request_reads_the_quick_prompt_then_the_whole_one_is_reused(
    backend: LlamaBackend, workspace: Workspace
) -> None:
    engine = CompletionEngine(backend, GEMMA3_FIM, False, OPTIONS)
    text, cursor = document("opened")
    path = "app/opened.py"
    whole, quick = engine.prompts(text, cursor, path, workspace)
    assert quick is not None and "# ui/widgets.py\n" in whole.context
    lacking = backend.pending_tokens(whole)
    assert lacking is not None and lacking > 4 * ALLOWANCE  # the whole prompt is long

    first = engine.complete(text, cursor, use_cache=False, path=path, workspace=workspace)
    generation = first.generation
    assert first.slot == "quick" and generation is not None
    # Only the quick prompt was read: the code just before the cursor, no context.
    assert engine.last_plan == quick and quick.context == ""
    assert len(quick.prefix) <= QUICK_PREFIX_CHARS and text[:cursor].endswith(quick.prefix)
    assert generation.evaluated_tokens == generation.prompt_tokens <= backend.options.quick_tokens
    assert generation.prompt_tokens < lacking / 3
    assert backend.pending_tokens(whole) == lacking  # the whole prompt's cache is untouched

    # Idle (or right after the answer, as the server does): the whole prompt
    # is read; the quick one is still cached (one token again for its logits).
    read = engine.prefill(text, cursor, path=path, workspace=workspace)
    assert read == lacking + 1
    assert backend.pending_tokens(whole) == 0

    # The next keystroke answers from the whole prompt, reading only what changed.
    typed = text[:cursor] + "n" + text[cursor:]
    again = engine.complete(typed, cursor + 1, use_cache=False, path=path, workspace=workspace)
    assert again.slot == "main" and again.generation is not None
    assert engine.last_plan is not None and engine.last_plan.context == whole.context
    assert again.generation.evaluated_tokens <= 4 < again.generation.prompt_tokens


def test_an_interrupted_prefill_keeps_what_it_read_while_quick_answers_come(
    backend: LlamaBackend, workspace: Workspace
) -> None:
    engine = CompletionEngine(backend, GEMMA3_FIM, False, OPTIONS)
    text, cursor = document("edited")
    path = "app/edited.py"
    whole = engine.plan(text, cursor, path, workspace)
    lacking = backend.pending_tokens(whole)
    assert lacking is not None
    # A request arrives while the whole prompt is being read: the prefill
    # stops after its current chunk.
    interrupted = threading.Event()
    interrupted.set()
    assert backend.prefill(whole, interrupted) == EVAL_CHUNK
    assert backend.pending_tokens(whole) == lacking - EVAL_CHUNK
    for typed in ("n", "nt", "nt("):
        edited = text[:cursor] + typed + text[cursor:]
        answer = engine.complete(
            edited, cursor + len(typed), use_cache=False, path=path, workspace=workspace
        )
        assert answer.slot == "quick" and answer.generation is not None
        if typed != "n":  # typing on the line reuses the quick prompt's cache too
            assert answer.generation.evaluated_tokens <= 4
    # The quick answers did not evict what the prefill had read.
    edited = text[:cursor] + "nt(" + text[cursor:]
    now = engine.plan(edited, cursor + 3, path, workspace)
    assert now.context == whole.context
    assert backend.pending_tokens(whole) == lacking - EVAL_CHUNK
    now_lacking = backend.pending_tokens(now)
    assert now_lacking is not None and now_lacking <= lacking - EVAL_CHUNK + 4
    # The rest fills in, from where it stopped.
    read = engine.prefill(edited, cursor + 3, path=path, workspace=workspace)
    assert read <= now_lacking + 1  # the quick prompt's last token, for its logits
    answer = engine.complete(edited, cursor + 3, use_cache=False, path=path, workspace=workspace)
    assert answer.slot == "main" and answer.generation is not None
    assert answer.generation.evaluated_tokens <= 1


def test_the_whole_prompt_is_read_when_there_is_time_or_no_measured_speed(
    backend: LlamaBackend, tiny_gguf: Callable[..., Path], workspace: Workspace
) -> None:
    text, cursor = document("patient")
    path = "app/patient.py"
    # A lifted budget (evaluation, the context benchmark): the whole prompt,
    # however long, so quality figures are those of the whole prompt.
    engine = CompletionEngine(backend, GEMMA3_FIM, False, OPTIONS)
    answer = engine.complete(
        text, cursor, use_cache=False, path=path, workspace=workspace, budget_ms=120_000
    )
    assert answer.slot == "main" and answer.generation is not None
    assert answer.generation.evaluated_tokens > 4 * ALLOWANCE
    assert engine.last_plan is not None and "# ui/widgets.py\n" in engine.last_plan.context
    # A backend that has read nothing yet does not know its speed: whole prompt.
    fresh = LlamaBackend(tiny_gguf("gemma3"), LlamaOptions(context_tokens=3072, threads=1))
    assert fresh.prompt_ms_per_token is None
    other = CompletionEngine(fresh, GEMMA3_FIM, False, OPTIONS)
    assert other.prompts(text, cursor, path, workspace)[1] is None
    fresh.close()
