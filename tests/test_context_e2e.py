"""End to end, over stdio, with the tiny model: the server builds the
workspace index on initialize and keeps it current; the prompt starts with a
context block holding a snippet of another file and the definition of an
imported name; that block stays put (and the KV cache with it) while the user
types on a line; excluded files never reach a prompt; the copy channel
answers with a repository line the model scores above its own answer."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from lsprotocol import types
from test_server_e2e import Session, items_of, start_session, stop_session
from test_server_engine import DOCUMENT, model_preferences

from shoptalk.models.backends import LlamaBackend, LlamaOptions
from shoptalk.models.catalog import GEMMA3_FIM
from shoptalk.models.completion import CompletionEngine, EngineOptions
from shoptalk.models.context import CONTEXT_LINE_STEP
from shoptalk.models.manifest import write_manifest
from shoptalk.server.lsp import _plain

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

SECRET = "SECRET_MARKER_Q7"

TAXES = '''"""Value added tax."""

RATES = {"fr": 0.2, "de": 0.19}


def vat_rate(country: str) -> float:
    """The value added tax rate of a country (ISO code)."""
    return RATES[country]
'''

LEDGER = "".join(
    f"def ledger_entry_{i}(journal_book, amount):\n"
    f"    journal_book.append_posting(amount, reconcile_flag={i})\n\n"
    for i in range(10)
)

INVOICE = """from billing.taxes import vat_rate


def total_with_tax(journal_book, lines, country):
    subtotal = sum(line.amount for line in lines)
    journal_book.append_posting(subtotal, reconcile_flag=0)
    return subtotal * (1 + vat_rate(country))


def book_invoice(journal_book, invoice):
    amount = total_with_tax(journal_book, invoice.lines, invoice.country)
    journal_book."""

# Every excluded file matches the cursor's identifiers better than anything else.
EXCLUDED = {
    ".env": f"journal_book.append_posting = '{SECRET}'\n",
    "config/credentials.py": f"def vat_rate(country):\n    journal_book.append_posting({SECRET})\n",
    "private/notes.py": f"journal_book.append_posting(amount, {SECRET})\n",
}


def write_workspace(root: Path) -> Path:
    files = {
        "billing/__init__.py": '"""Billing."""\n',
        "billing/taxes.py": TAXES,
        "billing/invoices.py": INVOICE,
        "accounting/ledger.py": LEDGER,
        ".shoptalkignore": "private/\n",
        **EXCLUDED,
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def copy_model(tiny_gguf: Callable[..., Path], folder: Path) -> Path:
    model = folder / "models" / "model-a.gguf"
    model.parent.mkdir(parents=True)
    shutil.copy(tiny_gguf("gemma3"), model)
    write_manifest(model, kind="model", base="gemma3-270m", run_id="run-a")
    return model


async def wait_indexed(session: Session) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = await session.status()
        if not status.get("loading") and status.get("index") and status.get("modules"):
            return status
        await asyncio.sleep(0.1)
    raise AssertionError(f"the workspace was not indexed: {session.stderr.decode()[-2000:]}")


async def last_prompt(session: Session) -> dict[str, Any]:
    answer = await session.request("shoptalk/lastPrompt", {})
    assert answer is not None, "no completion was answered yet"
    plain: dict[str, Any] = _plain(answer)
    return plain


def position_at_end(text: str) -> tuple[int, int]:
    lines = text.split("\n")
    return len(lines) - 1, len(lines[-1])


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def context_session(
    tiny_gguf: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Session]:
    root = tmp_path_factory.mktemp("context")
    workspace = write_workspace(root / "repo")
    data_dir = root / "data"
    data_dir.mkdir()
    options = {"context_chars": 1500, "max_tokens": 6, "max_latency_ms": 20000}
    session = await start_session(workspace, data_dir, copy_model(tiny_gguf, root), options)
    await wait_indexed(session)
    yield session
    await stop_session(session)


async def test_prompt_holds_a_snippet_and_the_imported_definition_and_stays_put_while_typing(
    context_session: Session,
) -> None:
    session = context_session
    uri = await session.open("billing/invoices.py", INVOICE)
    line, character = position_at_end(INVOICE)
    await session.inline(uri, line, character)
    first = await last_prompt(session)
    context = first["context"]
    assert first["path"] == "billing/invoices.py"
    assert "# accounting/ledger.py\n" in context  # a snippet of another file
    assert "journal_book.append_posting(amount, reconcile_flag=" in context
    assert '# billing/taxes.py\ndef vat_rate(country: str) -> float:\n    """The value' in context
    assert context.endswith("# billing/invoices.py\n")
    assert INVOICE in first["prompt"]  # FIM: the block sits inside the prefix section
    # Typing on the line: the block stays and only the new tokens are evaluated.
    typed = INVOICE
    for key in "app":
        typed += key
        session.replace(uri, typed)
        line, character = position_at_end(typed)
        await session.inline(uri, line, character)
        again = await last_prompt(session)
        assert again["context"] == context
        assert again["evaluated_tokens"] <= 4 < again["prompt_tokens"]


async def wait_for_index_version(session: Session, above: int) -> int:
    deadline = time.monotonic() + 30
    while (version := (await session.status())["index"]["version"]) <= above:
        assert time.monotonic() < deadline, "the change was not indexed"
        await asyncio.sleep(0.1)
    return int(version)


async def test_edits_and_files_changed_on_disk_reach_the_prompt_of_the_next_stretch(
    context_session: Session,
) -> None:
    session = context_session
    version = (await session.status())["index"]["version"]
    # An open document edited in the editor (indexed once typing pauses).
    ledger_uri = await session.open("accounting/ledger.py", LEDGER)
    edited = LEDGER + "def close_quarter(journal_book):\n    journal_book.seal_quarterly_vault()\n"
    session.replace(ledger_uri, edited)
    version = await wait_for_index_version(session, version)
    text = INVOICE + "seal_quarterly_vault()\n\ndef close(journal_book):\n    journal_book."
    uri = await session.open("billing/closing.py", text)
    line, character = position_at_end(text)
    await session.inline(uri, line, character)
    assert "journal_book.seal_quarterly_vault()" in (await last_prompt(session))["context"]
    # A file written on disk (a checkout, another tool), reported by the client.
    archive = session.workspace / "accounting" / "archive.py"
    archive.write_text("def archive(journal_book):\n    journal_book.freeze_cold_storage()\n")
    session.client.workspace_did_change_watched_files(
        types.DidChangeWatchedFilesParams(
            changes=[types.FileEvent(uri=archive.as_uri(), type=types.FileChangeType.Created)]
        )
    )
    await wait_for_index_version(session, version)
    before = (await last_prompt(session))["context"]
    # The next line, in the same stretch of lines: the block stays put (the
    # KV cache keeps the whole prompt), new index content waits.
    text += "freeze_cold_storage()\n    journal_book."
    session.replace(uri, text)
    line, character = position_at_end(text)
    await session.inline(uri, line, character)
    assert (await last_prompt(session))["context"] == before
    # The first line of the next stretch gets a block built afresh.
    while text.count("\n") % CONTEXT_LINE_STEP != 0:  # the cursor's line starts a stretch
        text += "close_period()\n    journal_book."
    session.replace(uri, text)
    line, character = position_at_end(text)
    await session.inline(uri, line, character)
    assert "journal_book.freeze_cold_storage()" in (await last_prompt(session))["context"]


async def test_excluded_files_never_enter_a_prompt(context_session: Session) -> None:
    session = context_session
    # The editor opens them: they are still neither indexed nor completed.
    for name, text in EXCLUDED.items():
        uri = await session.open(name, text)
        line, character = position_at_end(text.rstrip("\n"))
        assert items_of(await session.inline(uri, line, character)) == []
        assert (await last_prompt(session))["path"] not in EXCLUDED
        # Closed, and reported as changed on disk: the disk copy is excluded too.
        session.client.text_document_did_close(
            types.DidCloseTextDocumentParams(text_document=types.TextDocumentIdentifier(uri=uri))
        )
        session.client.workspace_did_change_watched_files(
            types.DidChangeWatchedFilesParams(
                changes=[types.FileEvent(uri=uri, type=types.FileChangeType.Changed)]
            )
        )
    prompts = []
    for tail in ("    journal_book.append_posting(", "    vat_rate(", "    "):
        text = INVOICE + "\n\ndef settle(journal_book, country):\n" + tail
        uri = await session.open("billing/settle.py", text)
        line, character = position_at_end(text)
        await session.inline(uri, line, character)
        prompts.append(await last_prompt(session))
    for prompt in prompts:
        assert prompt["path"] == "billing/settle.py"
        assert SECRET not in prompt["prompt"] and "credentials" not in prompt["prompt"]


async def test_copy_channel_answers_with_the_repository_line_the_model_prefers(
    tiny_gguf: Callable[..., Path], tmp_path: Path
) -> None:
    typed = "    total = handler_7(request, "
    text = DOCUMENT + "def summary(request):\n" + typed
    backend = LlamaBackend(tiny_gguf("gemma3"), LlamaOptions(context_tokens=1024, threads=1))
    try:
        engine = CompletionEngine(backend, GEMMA3_FIM, False, EngineOptions(max_tokens=10))
        own, ranked = model_preferences(engine, text)
    finally:
        backend.close()
    better = [c for margin, c in ranked if margin > 0.05]
    worse = [c for margin, c in ranked if margin < -0.05]
    assert better and worse, f"the model prefers no branch over {own!r}: {ranked}"
    root = tmp_path / "repo"
    (root / "lib").mkdir(parents=True)
    (root / "lib" / "a.py").write_text(f"def a(request):\n{typed}{better[0]}\n")
    (root / "lib" / "b.py").write_text(f"def b(request):\n{typed}{worse[0]}\n")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    options = {"copy_channel": True, "max_tokens": 10, "max_latency_ms": 20000}
    session = await start_session(root, data_dir, copy_model(tiny_gguf, tmp_path), options)
    try:
        await wait_indexed(session)
        uri = await session.open("app.py", text)
        line, character = position_at_end(text)
        items = items_of(await session.inline(uri, line, character))
        answer = await last_prompt(session)
        assert (answer["source"], answer["suggestion"]) == ("copy", better[0])
        assert [item.insert_text for item in items] == [better[0]]
    finally:
        await stop_session(session)


async def test_the_cursor_reported_after_opening_is_read_before_the_first_keystroke(
    context_session: Session,
) -> None:
    """The editor reports where the cursor rests after opening a file
    (shoptalk/prefill): the whole prompt there, context block included, is
    read before the first request there (not the end of the document, the
    server's guess when no cursor is reported). With FIM (the tiny model)
    the code after the cursor follows the prefix, so a keystroke reads it
    again; a request at the cursor reads only the last token."""
    session = context_session
    before = DOCUMENT + "def settle(journal_book, amount):\n    journal_book.append_po"
    after = "\n\n" + DOCUMENT.replace("handler", "later")
    uri = await session.open("billing/settle.py", before + after)
    line, character = position_at_end(before)
    position = {"line": line, "character": character}
    session.client.protocol.notify(
        "shoptalk/prefill", {"textDocument": {"uri": uri}, "position": position}
    )
    await asyncio.sleep(1.5)  # the user looks at the file (the tiny model reads it in ms)
    await session.inline(uri, line, character)
    first = await last_prompt(session)
    assert first["path"] == "billing/settle.py" and first["slot"] == "main"
    assert first["context"].startswith("# ") and first["context"] != "# billing/settle.py\n"
    assert first["evaluated_tokens"] <= 1 and first["prompt_tokens"] > 500
