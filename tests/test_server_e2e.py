"""End to end: the real `shoptalk serve --stdio` process, a real pygls client,
real llama.cpp on a tiny random GGUF. Inline completion, the completion
fallback, cancellation, module lookup, status, hot-swap on promotion,
configuration changes, and the fault cases: the server stays up, answers what
it can and says what is wrong once."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

import pytest
import pytest_asyncio
from lsprotocol import types
from pygls.lsp.client import LanguageClient

from shoptalk.models.manifest import write_manifest
from shoptalk.models.store import RepoStore
from shoptalk.server.lsp import _plain

# One event loop for the module, so that read-only tests can share one server.
pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

SOURCE = '''"""Billing: invoices and their totals."""


def total(lines):
    """Sum of the invoice lines."""
    result = 0
    for line in lines:
        result += line.amount
    return result


def render(invoice):
    return "invoice " + str(total(invoice.lines))
'''


class Session:
    """A running server and the client talking to it."""

    def __init__(self, client: LanguageClient, workspace: Path, data_dir: Path) -> None:
        self.client = client
        self.workspace = workspace
        self.data_dir = data_dir
        self.messages: list[types.ShowMessageParams] = []
        # ("create", token) and ("progress", (token, value)) in arrival order.
        self.progress: list[tuple[str, Any]] = []
        self.stderr = bytearray()
        self._next_version = 1

    @property
    def process(self) -> asyncio.subprocess.Process:
        process = self.client._server
        assert process is not None
        return process

    async def open(self, name: str, text: str, language: str = "python") -> str:
        path = self.workspace / name
        uri = path.as_uri()
        self.client.text_document_did_open(
            types.DidOpenTextDocumentParams(
                text_document=types.TextDocumentItem(
                    uri=uri, language_id=language, version=0, text=text
                )
            )
        )
        return uri

    def replace(self, uri: str, text: str) -> None:
        self._next_version += 1
        self.client.text_document_did_change(
            types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(
                    uri=uri, version=self._next_version
                ),
                content_changes=[types.TextDocumentContentChangeWholeDocument(text=text)],
            )
        )

    def inline_params(self, uri: str, line: int, character: int) -> types.InlineCompletionParams:
        return types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri),
            position=types.Position(line=line, character=character),
            context=types.InlineCompletionContext(
                trigger_kind=types.InlineCompletionTriggerKind.Automatic
            ),
        )

    async def inline(self, uri: str, line: int, character: int) -> Any:
        return await asyncio.wait_for(
            self.client.text_document_inline_completion_async(
                self.inline_params(uri, line, character)
            ),
            60,
        )

    def send_inline(self, uri: str, line: int, character: int) -> tuple[str, Any]:
        """Send an inline completion request without waiting: (id, future)."""
        msg_id = str(uuid.uuid4())
        future = self.client.protocol.send_request_async(
            types.TEXT_DOCUMENT_INLINE_COMPLETION,
            self.inline_params(uri, line, character),
            msg_id=msg_id,
        )
        return msg_id, future

    def cancel(self, msg_id: str) -> None:
        self.client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id=msg_id))

    async def request(self, method: str, params: Any) -> Any:
        return await asyncio.wait_for(self.client.protocol.send_request_async(method, params), 60)

    async def status(self) -> dict[str, Any]:
        result = await self.request("shoptalk/status", {})
        return _plain(result)

    async def wait_loaded(self, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = await self.status()
            if not status.get("loading"):
                return status
            await asyncio.sleep(0.1)
        raise AssertionError(
            f"the model did not load in {timeout}s: {self.stderr.decode()[-2000:]}"
        )

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; server log:\n{self.stderr.decode()[-3000:]}")
            await asyncio.sleep(0.05)

    def write_raw(self, data: bytes) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write(data)


async def start_session(
    workspace: Path,
    data_dir: Path,
    model: Path | None,
    init_options: dict[str, Any] | None = None,
    extra_args: tuple[str, ...] = (),
    root: Path | Literal["workspace"] | None = "workspace",
) -> Session:
    """A server started like an editor starts it; `root` is the workspace
    folder it is told about (None: no folder, as for a lone file)."""
    client = LanguageClient("shoptalk-tests", "1")
    session = Session(client, workspace, data_dir)

    @client.feature(types.WINDOW_SHOW_MESSAGE)
    def show_message(params: types.ShowMessageParams) -> None:
        session.messages.append(params)

    @client.feature(types.WINDOW_WORK_DONE_PROGRESS_CREATE)
    def create_progress(params: types.WorkDoneProgressCreateParams) -> None:
        session.progress.append(("create", params.token))

    @client.feature(types.PROGRESS)
    def progress(params: types.ProgressParams) -> None:
        session.progress.append(("progress", (params.token, params.value)))

    env = dict(os.environ)
    env["SHOPTALK_DATA_DIR"] = str(data_dir)
    env.setdefault("SHOPTALK_SERVE__THREADS", "1")
    args = ["-m", "shoptalk.models.cli", "-v", "serve", "--stdio", "--poll-seconds", "0.2"]
    if model is not None:
        args += ["--model", str(model)]
    await client.start_io(sys.executable, *args, *extra_args, env=env)

    async def drain() -> None:
        stream = client._server.stderr if client._server else None
        while stream is not None:
            chunk = await stream.read(65536)
            if not chunk:
                return
            session.stderr.extend(chunk)

    client._async_tasks.append(asyncio.create_task(drain()))
    folder = workspace if root == "workspace" else root
    await asyncio.wait_for(
        client.initialize_async(
            types.InitializeParams(
                capabilities=types.ClientCapabilities(
                    window=types.WindowClientCapabilities(work_done_progress=True)
                ),
                root_uri=folder.as_uri() if isinstance(folder, Path) else None,
                initialization_options=init_options,
            )
        ),
        60,
    )
    client.initialized(types.InitializedParams())
    return session


async def stop_session(session: Session) -> None:
    client = session.client
    if client._server is not None and client._server.returncode is None:
        try:
            await asyncio.wait_for(client.shutdown_async(None), 10)
            client.exit(None)
        except Exception:
            client._server.kill()
        try:
            await asyncio.wait_for(client._server.wait(), 10)
        except TimeoutError:
            client._server.kill()
    await asyncio.wait_for(client.stop(), 10)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    return _make_workspace(tmp_path)


def _make_workspace(parent: Path) -> Path:
    root = parent / "repo"
    (root / "billing").mkdir(parents=True)
    (root / "billing" / "__init__.py").write_text('"""Billing."""\n')
    (root / "billing" / "invoices.py").write_text(SOURCE)
    (root / "billing" / "taxes.py").write_text(
        '"""Value added tax rates per country."""\n\n\ndef vat_rate(country):\n    return 0.2\n'
    )
    (root / "web").mkdir()
    (root / "web" / "server.py").write_text(
        '"""HTTP routes of the web application."""\n\n\ndef handle_request(request):\n    return 200\n'
    )
    return root


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


@pytest.fixture
def model_file(tiny_gguf: Callable[..., Path], tmp_path: Path) -> Path:
    """A copy of the tiny GGUF with its manifest (as `shoptalk export` writes it)."""
    target = tmp_path / "models" / "model-a.gguf"
    target.parent.mkdir(parents=True)
    shutil.copy(tiny_gguf("gemma3"), target)
    write_manifest(target, kind="model", base="gemma3-270m", run_id="run-a")
    return target


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def shared(
    tiny_gguf: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Session]:
    """One server for the tests that change neither its model nor its settings."""
    root = tmp_path_factory.mktemp("shared")
    workspace = _make_workspace(root)
    data_dir = root / "data"
    data_dir.mkdir()
    model = root / "models" / "model-a.gguf"
    model.parent.mkdir()
    shutil.copy(tiny_gguf("gemma3"), model)
    write_manifest(model, kind="model", base="gemma3-270m", run_id="run-a")
    running = await start_session(workspace, data_dir, model)
    await running.wait_loaded()
    yield running
    await stop_session(running)


async def counters_of(session: Session) -> dict[str, int]:
    counters: dict[str, int] = (await session.status())["counters"]
    return counters


@pytest_asyncio.fixture(loop_scope="module")
async def session(workspace: Path, data_dir: Path, model_file: Path) -> AsyncIterator[Session]:
    running = await start_session(workspace, data_dir, model_file)
    await running.wait_loaded()
    yield running
    await stop_session(running)


def items_of(result: Any) -> list[Any]:
    if result is None:
        return []
    if isinstance(result, list):
        return result
    return list(result.items)


# ---- the main paths -------------------------------------------------------------


async def test_inline_completion_and_fallback_answer_at_the_cursor(shared: Session) -> None:
    session = shared
    before = await counters_of(session)
    status = await session.status()
    assert status["model"].endswith("model-a.gguf")
    assert status["error"] is None
    assert any(kind == "create" for kind, _ in session.progress)  # workDoneProgress while loading
    uri = await session.open("billing/invoices.py", SOURCE + "\ndef average(lines):\n    ")
    line = SOURCE.count("\n") + 2
    result = await session.inline(uri, line, 4)
    items = items_of(result)
    # A random tiny model says something arbitrary, but it answers at the cursor.
    for item in items:
        assert item.range.start == types.Position(line=line, character=4)
        assert item.insert_text.strip()
    completion = await asyncio.wait_for(
        session.client.text_document_completion_async(
            types.CompletionParams(
                text_document=types.TextDocumentIdentifier(uri=uri),
                position=types.Position(line=line, character=4),
            )
        ),
        60,
    )
    assert completion is not None
    for item in completion.items:
        assert item.text_edit is not None
        assert item.text_edit.range.end == types.Position(line=line, character=4)
    counters = await counters_of(session)
    assert counters["requests"] - before["requests"] == 2
    assert not session.messages


async def test_find_module_over_the_workspace(shared: Session) -> None:
    session = shared
    result = _plain(
        await session.request("shoptalk/findModule", {"query": "vat rate per country", "limit": 2})
    )
    modules = result["modules"]
    assert modules and modules[0]["id"] == "billing.taxes"
    assert modules[0]["uri"] == (session.workspace / "billing" / "taxes.py").as_uri()
    assert modules[0]["range"]["start"]["line"] == 3  # def vat_rate, 0-based
    assert "vat" in modules[0]["reason"]
    assert len(modules) <= 2
    command = _plain(
        await asyncio.wait_for(
            session.client.workspace_execute_command_async(
                types.ExecuteCommandParams(
                    command="shoptalk.findModule", arguments=["http request routes", 3]
                )
            ),
            60,
        )
    )
    assert command["modules"][0]["id"] == "web.server"
    empty = _plain(await session.request("shoptalk/findModule", {"query": "  "}))
    assert empty["modules"] == [] and "empty" in empty["error"]


async def test_cancelled_and_stale_requests_are_dropped(shared: Session) -> None:
    session = shared
    before = await counters_of(session)
    uri = await session.open("billing/invoices.py", SOURCE)
    sent = [session.send_inline(uri, 3, character) for character in range(12)]
    # $/cancelRequest for some; the others become stale (newest wins).
    for msg_id, _ in sent[2:6]:
        session.cancel(msg_id)
    results = await asyncio.wait_for(
        asyncio.gather(*(future for _, future in sent), return_exceptions=True), 60
    )
    for result in results[2:6]:
        # Cancelled while waiting or running: the LSP "request cancelled" error;
        # a request that had already finished answers normally.
        assert result is None or "cancel" in str(result).lower() or hasattr(result, "items")
    assert not isinstance(results[-1], BaseException)  # the newest ran to its end
    counters = await counters_of(session)
    assert counters["requests"] - before["requests"] == 12
    # How many were skipped depends on how fast the model answers; some always are.
    skipped = counters["stale"] + counters["cancelled"] - before["stale"] - before["cancelled"]
    assert skipped >= 1
    # A request cancelled while the model works on it answers "cancelled".
    outcomes = []
    for _ in range(5):
        msg_id, future = session.send_inline(uri, 5, 4)
        session.cancel(msg_id)
        try:
            outcomes.append(await asyncio.wait_for(future, 60))
        except Exception as exc:
            outcomes.append(exc)
    cancelled = [o for o in outcomes if isinstance(o, Exception)]
    assert all("cancel" in str(o).lower() for o in cancelled)
    assert cancelled, outcomes
    assert (await counters_of(session))["cancelled"] - counters["cancelled"] == len(cancelled)


async def test_configuration_change_and_bad_options(session: Session) -> None:
    session.client.workspace_did_change_configuration(
        types.DidChangeConfigurationParams(
            settings={"shoptalk": {"max_tokens": 4, "multiline": "sometimes", "bogus": 1}}
        )
    )
    await session.wait_for(lambda: len(session.messages) >= 1)
    message = session.messages[0].message
    assert "multiline" in message and "bogus" in message
    assert "max_tokens" not in message
    # The same bad options again: no second message.
    session.client.workspace_did_change_configuration(
        types.DidChangeConfigurationParams(
            settings={"shoptalk": {"max_tokens": 4, "multiline": "sometimes", "bogus": 1}}
        )
    )
    await session.status()
    await asyncio.sleep(0.3)
    assert len(session.messages) == 1
    uri = await session.open("billing/invoices.py", SOURCE + "\nx = ")
    await session.inline(uri, SOURCE.count("\n") + 1, 4)
    assert (await session.status())["error"] is None


async def test_bad_initialization_options_fall_back_to_defaults(
    workspace: Path, data_dir: Path, model_file: Path
) -> None:
    running = await start_session(
        workspace, data_dir, model_file, init_options={"max_tokens": -3, "prefix_chars": 800}
    )
    try:
        await running.wait_loaded()
        await running.wait_for(lambda: len(running.messages) == 1)
        assert "max_tokens" in running.messages[0].message
        uri = await running.open("a.py", "import os\n")
        await running.inline(uri, 1, 0)
    finally:
        await stop_session(running)


async def test_hot_swap_to_a_newly_promoted_model(
    session: Session, tiny_gguf: Callable[..., Path], tmp_path: Path
) -> None:
    store = RepoStore.for_repo(session.data_dir, session.workspace)
    promoted = store.run_dir("run-b") / "export" / "model-q8_0.gguf"
    promoted.parent.mkdir(parents=True)
    shutil.copy(tiny_gguf("gemma3"), promoted)
    write_manifest(promoted, kind="model", base="gemma3-270m", run_id="run-b")
    uri = await session.open("billing/invoices.py", SOURCE)
    # Requests keep being answered while the new model loads.
    store.promote({"run_id": "run-b", "model": str(promoted), "adapter": None, "metrics": {}})
    deadline = time.monotonic() + 30
    while True:
        await session.inline(uri, 5, 4)
        status = await session.status()
        if status["model"] == str(promoted):
            break
        assert time.monotonic() < deadline, session.stderr.decode()[-2000:]
        await asyncio.sleep(0.1)
    assert status["run_id"] == "run-b" and status["swaps"] == 1
    # A tampered promotion is refused once; the server keeps serving.
    bad = store.run_dir("run-c") / "export" / "model-q8_0.gguf"
    bad.parent.mkdir(parents=True)
    shutil.copy(tiny_gguf("gemma3"), bad)
    write_manifest(bad, kind="model", base="gemma3-270m", run_id="run-c")
    with bad.open("r+b") as handle:
        handle.seek(-8, os.SEEK_END)
        handle.write(b"tampered")
    store.promote({"run_id": "run-c", "model": str(bad), "adapter": None, "metrics": {}})
    await session.wait_for(lambda: any("manifest" in m.message for m in session.messages))
    await asyncio.sleep(1.0)
    assert sum("manifest" in m.message for m in session.messages) == 1
    # It falls back to the model it was started with (--model), without a restart.
    fallback = str(session.data_dir.parent / "models" / "model-a.gguf")
    while (await session.status())["model"] != fallback:
        await session.inline(uri, 5, 4)
        assert time.monotonic() < deadline + 30, session.stderr.decode()[-2000:]
        await asyncio.sleep(0.1)
    # The status says why the promoted model is not the one served.
    error = (await session.status())["error"]
    assert "promoted model cannot be used" in error and "manifest" in error
    assert "Serving model-a.gguf" in error


# ---- faults ------------------------------------------------------------------------


async def test_malformed_messages_unknown_methods_and_odd_positions(shared: Session) -> None:
    session = shared
    body = b'{"jsonrpc": "2.0", "id": 999, "method": '  # cut short
    session.write_raw(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    garbage = b"\xff\xfe not json at all \x00"
    session.write_raw(b"Content-Length: %d\r\n\r\n%s" % (len(garbage), garbage))
    with pytest.raises(Exception, match=r"(?i)method not found|unknown"):
        await session.request("shoptalk/noSuchMethod", {})
    uri = await session.open("billing/invoices.py", SOURCE)
    for line, character in [(10_000, 5), (2, 10_000)]:
        await session.inline(uri, line, character)
    # Negative positions break the LSP types; send them raw.
    negative = json.dumps(
        {
            "jsonrpc": "2.0",
            "id": "negative",
            "method": "textDocument/inlineCompletion",
            "params": {
                "textDocument": {"uri": uri},
                "position": {"line": -1, "character": -1},
                "context": {"triggerKind": 2},
            },
        }
    ).encode()
    session.write_raw(b"Content-Length: %d\r\n\r\n%s" % (len(negative), negative))
    # A request for a document that was never opened answers empty.
    missing = await session.inline((session.workspace / "nope.py").as_uri(), 0, 0)
    assert missing is None
    status = await session.status()
    assert status["error"] is None
    assert not session.messages  # protocol noise is logged, not shown


async def test_huge_and_binary_documents(shared: Session) -> None:
    session = shared
    huge = ("def f(x):\n    return x + 1\n" * 400_000)[: 10 * 1024 * 1024]
    uri = await session.open("huge.py", huge)
    started = time.monotonic()
    await session.inline(uri, huge.count("\n"), 0)
    assert time.monotonic() - started < 30
    binary = "".join(chr(c) for c in range(0, 0x2FF)) * 20 + "\udcff".encode(
        "utf-8", "surrogatepass"
    ).decode("utf-8", "replace")
    uri_b = await session.open("blob.bin", binary, language="plaintext")
    await session.inline(uri_b, 3, 5)
    assert (await session.status())["error"] is None


async def test_a_burst_of_a_thousand_requests_with_cancels(shared: Session) -> None:
    session = shared
    before = await counters_of(session)
    uri = await session.open("billing/invoices.py", SOURCE)
    sent = [session.send_inline(uri, 4 + i % 6, i % 20) for i in range(1000)]
    for msg_id, _ in sent[:-1:3]:  # every third, but never the newest
        session.cancel(msg_id)
    started = time.monotonic()
    results = await asyncio.wait_for(
        asyncio.gather(*(future for _, future in sent), return_exceptions=True), 120
    )
    assert time.monotonic() - started < 60
    unexpected = [
        r for r in results if isinstance(r, BaseException) and "cancel" not in str(r).lower()
    ]
    assert not unexpected
    assert not isinstance(results[-1], BaseException)
    counters = await counters_of(session)
    assert counters["requests"] - before["requests"] == 1000
    # Most requests never reached the model: stale, cancelled or served from
    # the suggestion cache. How many of each depends on the machine's speed
    # (a quiet CPU answers more of them before the next arrives), so only the
    # coarse split is checked.
    assert counters["answered"] - before["answered"] < 500
    skipped = counters["stale"] + counters["cancelled"] - before["stale"] - before["cancelled"]
    assert skipped >= 100
    assert (await session.status())["error"] is None


async def test_a_client_that_vanishes(workspace: Path, data_dir: Path, model_file: Path) -> None:
    running = await start_session(workspace, data_dir, model_file)
    await running.wait_loaded()
    uri = await running.open("billing/invoices.py", SOURCE)
    running.send_inline(uri, 5, 4)
    stdin = running.process.stdin
    assert stdin is not None
    stdin.close()  # the editor died without shutdown/exit
    code = await asyncio.wait_for(running.process.wait(), 30)
    assert code == 0, running.stderr.decode()[-2000:]
    assert b"Traceback" not in running.stderr
    await asyncio.wait_for(running.client.stop(), 10)


@pytest.mark.parametrize("fault", ["missing", "corrupt", "tampered"])
async def test_a_bad_model_file_is_reported_once(
    fault: str, workspace: Path, data_dir: Path, model_file: Path, tmp_path: Path
) -> None:
    model = model_file
    if fault == "missing":
        model = tmp_path / "models" / "model-missing.gguf"
        shutil.copy(model_file, model)
        write_manifest(model, kind="model", base="gemma3-270m")
    elif fault == "corrupt":
        # A file that matches its manifest but is no GGUF.
        model.write_bytes(b"GGUF" + os.urandom(4096))
        write_manifest(model, kind="model", base="gemma3-270m")
    else:
        with model.open("r+b") as handle:
            handle.seek(-8, os.SEEK_END)
            handle.write(b"tampered")
    running = await start_session(workspace, data_dir, model)
    try:
        if fault == "missing":
            model.unlink()
        status = await running.wait_loaded()
        await running.wait_for(lambda: len(running.messages) >= 1)
        uri = await running.open("billing/invoices.py", SOURCE)
        for character in range(3):
            assert await running.inline(uri, 5, character) is None
        status = await running.status()
        assert status["model"] is None and status["error"]
        expected = {"missing": "does not exist", "corrupt": "cannot load", "tampered": "manifest"}
        assert expected[fault] in running.messages[0].message
        assert len(running.messages) == 1
        found = _plain(await running.request("shoptalk/findModule", {"query": "vat rate"}))
        assert found["modules"][0]["id"] == "billing.taxes"  # lookup still answers (BM25)
    finally:
        await stop_session(running)


async def _tcp_server_log(model: Path, data_dir: Path, *host_args: str) -> str:
    """Start `serve --tcp`, connect to it on loopback, and return its log."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ)
    env["SHOPTALK_DATA_DIR"] = str(data_dir)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "shoptalk.models.cli", "-v", "serve", "--tcp", "--port", str(port)),
        *host_args,
        *("--model", str(model), "--poll-seconds", "0"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                assert time.monotonic() < deadline, "the TCP server did not start"
                await asyncio.sleep(0.2)
        body = json.dumps(
            {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}}}
        ).encode()
        writer.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        header = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        length = int(header.split(b":")[1].split(b"\r\n")[0])
        answer = json.loads(await reader.readexactly(length))
        assert answer["id"] == 1 and "capabilities" in answer["result"]
        writer.close()
    finally:
        process.terminate()
        out, err = await asyncio.wait_for(process.communicate(), 30)
    assert out == b""  # nothing on stdout in TCP mode either
    return err.decode(errors="replace")


async def test_tcp_binds_loopback_unless_told_and_warns(model_file: Path, data_dir: Path) -> None:
    log = await _tcp_server_log(model_file, data_dir)
    assert "Serving on ('127.0.0.1'" in log
    assert "anyone who can reach" not in log
    exposed = await _tcp_server_log(model_file, data_dir, "--host", "0.0.0.0")
    assert "Serving on ('0.0.0.0'" in exposed
    assert "anyone who can reach this address can read your code" in exposed


async def test_hot_swap_of_a_promoted_adapter_keeps_the_weights(
    session: Session, tiny_run: Callable[..., Path], tmp_path: Path
) -> None:
    from shoptalk.trainer.export import export_run

    run = tmp_path / "run-lora"
    shutil.copytree(tiny_run("gemma3", seed=11, train_steps=0), run)
    adapter = export_run(run, "f32", adapter_only=True, threads=1).files[0]
    host = session.data_dir.parent / "models" / "model-a.gguf"
    store = RepoStore.for_repo(session.data_dir, session.workspace)
    uri = await session.open("billing/invoices.py", SOURCE)
    store.promote(
        {"run_id": "run-lora", "model": None, "adapter": str(adapter), "base_model": str(host)}
    )
    deadline = time.monotonic() + 30
    while (await session.status())["adapter"] != str(adapter):
        await session.inline(uri, 5, 4)
        assert time.monotonic() < deadline, session.stderr.decode()[-2000:]
        await asyncio.sleep(0.1)
    status = await session.status()
    assert status["model"] == str(host) and status["run_id"] == "run-lora"
    assert (
        b"applying adapter" in session.stderr
        and session.stderr.count(b"model: loading model-a") == 1
    )
    await session.inline(uri, 5, 4)
    # Promoting the plain model again removes the adapter, still without a reload.
    store.promote({"run_id": "run-a", "model": str(host), "adapter": None})
    while (await session.status())["adapter"] is not None:
        assert time.monotonic() < deadline + 30
        await asyncio.sleep(0.1)
    assert (await session.status())["swaps"] == 2
    assert session.stderr.count(b"model: loading model-a") == 1
    assert not session.messages
