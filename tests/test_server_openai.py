"""The OpenAI-compatible backend against a real `python -m llama_cpp.server`
on loopback (serving the tiny GGUF): streamed completions that stop at the
end of the line, healing through a grammar, module lookup through a grammar,
the language server configured to use it, and a clear error when the server
cannot be reached."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from llama_servers import free_port
from llama_servers import llama_server as llama_server_at
from test_server_e2e import SOURCE, start_session, stop_session

from shoptalk.models.backends import BackendError, OpenAIBackend
from shoptalk.models.catalog import GEMMA3_FIM
from shoptalk.models.completion import CompletionEngine, EngineOptions
from shoptalk.models.module_lookup import module_grammar

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def llama_server(
    tiny_gguf: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    model = ["--model", str(tiny_gguf("gemma3")), "--n_ctx", "1024", "--n_threads", "1"]
    with llama_server_at(model, log) as url:
        yield url


def test_completion_stops_at_the_line_end_and_heals(llama_server: str) -> None:
    backend = OpenAIBackend(llama_server)
    engine = CompletionEngine(backend, GEMMA3_FIM, False, EngineOptions(max_tokens=24))
    document = SOURCE + "\n\ndef count(lines):\n    return len(li"
    suggestion = engine.complete(document, len(document), use_cache=False)
    generation = suggestion.generation
    assert generation is not None
    assert generation.healed == "li"  # backed off, then required of the answer
    assert generation.stop_reason in ("stop", "end", "max_tokens")
    assert "\n" not in suggestion.text  # the rest of this line only
    assert backend.describe()["backend"] == "openai"


def test_grammar_constrains_module_answers(llama_server: str) -> None:
    backend = OpenAIBackend(llama_server + "/v1")
    grammar = module_grammar(["billing.taxes", "web.server"])
    answer = backend.generate_with_grammar("# Module:", grammar, 16)
    assert answer.strip() in {"billing.taxes", "web.server"}


def test_unreachable_or_invalid_servers_are_clear_errors() -> None:
    with pytest.raises(BackendError, match="not an http"):
        OpenAIBackend("ftp://example")
    port = free_port()  # closed again: nothing listens there
    engine = CompletionEngine(OpenAIBackend(f"http://127.0.0.1:{port}"), GEMMA3_FIM, False)
    with pytest.raises(BackendError, match="cannot reach"):
        engine.complete("x = ", 4, use_cache=False)


@pytest.mark.asyncio
async def test_language_server_uses_the_openai_backend(llama_server: str, tmp_path: Path) -> None:
    workspace = tmp_path / "repo"
    workspace.mkdir()
    (workspace / "invoices.py").write_text(SOURCE)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    session = await start_session(
        workspace, data_dir, None, init_options={"backend": "openai", "openai_url": llama_server}
    )
    try:
        status = await session.wait_loaded()
        assert status["backend"] == "openai" and status["error"] is None
        uri = await session.open("invoices.py", SOURCE + "\nx = tot")
        await session.inline(uri, SOURCE.count("\n") + 1, 7)
        counters = (await session.status())["counters"]
        assert counters["requests"] == 1
        assert not session.messages
    finally:
        await stop_session(session)
