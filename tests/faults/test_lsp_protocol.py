"""Fault injection on the language server's wire: a raw JSON-RPC client (bytes
over the real `shoptalk serve --stdio` process's stdin and stdout, no pygls
client) sends malformed frames, invalid params and protocol-order violations.

For every case: each request gets exactly one well-formed answer (its id, the
expected error code or a result), nothing else is answered, and a probe
request right behind the case is answered too (the stream re-synchronised).
At the end, real completions and the status still work and the log holds no
traceback. A case is one line of `CASES`: a builder `(a, b) -> (bytes sent,
[(id, expected code or RESULT)])`, where `a` and `b` are fresh request ids.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shutil
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from test_server_e2e import SOURCE, _make_workspace

from shoptalk.models.manifest import write_manifest
from shoptalk.server.protocol import MAX_MESSAGE_BYTES

pytestmark = [pytest.mark.e2e, pytest.mark.asyncio(loop_scope="module")]

RESULT = None  # an expected successful answer
PARSE, INVALID_REQUEST, NO_METHOD, INVALID_PARAMS = -32700, -32600, -32601, -32602
NOT_INITIALIZED = -32002
Id = int | str | None
Expected = list[tuple[Id, int | None]]


# ---- the raw client ------------------------------------------------------------


def frame(value: Any, delta: int = 0, header: bytes | None = None) -> bytes:
    """`value` framed; `delta` bytes off in Content-Length, or another header."""
    body = value if isinstance(value, bytes) else json.dumps(value).encode()
    if header is None:
        header = b"Content-Length: %d\r\n\r\n" % (len(body) + delta)
    return header + body


def request(msg_id: Id, method: str, params: Any = None) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": msg_id, "method": method}
    if params is not None:
        message["params"] = params
    return message


def notification(method: str, params: Any = None) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method, "params": params}


def status(msg_id: Id) -> dict[str, Any]:
    return request(msg_id, "shoptalk/status", {})


class RawClient:
    """The server process, written to and read from byte by byte."""

    def __init__(self, process: asyncio.subprocess.Process, workspace: Path) -> None:
        self.process = process
        self.workspace = workspace
        self.uri = (workspace / "billing" / "invoices.py").as_uri()
        self.responses: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.notifications: list[dict[str, Any]] = []
        self.stderr = bytearray()
        self.ids = itertools.count(1)
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._drain())]

    @classmethod
    async def start(cls, workspace: Path, data_dir: Path, model: Path) -> RawClient:
        env = {**os.environ, "SHOPTALK_DATA_DIR": str(data_dir), "SHOPTALK_SERVE__THREADS": "1"}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "shoptalk.models.cli", "serve", "--stdio"),
            *("--model", str(model), "--poll-seconds", "0"),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=env,
        )
        return cls(process, workspace)

    async def _drain(self) -> None:
        assert self.process.stderr is not None
        while chunk := await self.process.stderr.read(65536):
            self.stderr.extend(chunk)

    async def _read(self) -> None:
        """Every message from the server, checked to be well-formed LSP."""
        stdout = self.process.stdout
        assert stdout is not None
        while True:
            try:
                header = await stdout.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            lengths = [
                int(line.split(b":", 1)[1])
                for line in header.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ]
            assert len(lengths) == 1, header
            message = json.loads(await stdout.readexactly(lengths[0]))
            assert message.get("jsonrpc") == "2.0", message
            if "method" in message and "id" in message:  # a request to the client
                self.write(frame({"jsonrpc": "2.0", "id": message["id"], "result": None}))
            elif "method" in message:
                self.notifications.append(message)
            else:
                assert ("result" in message) != ("error" in message), message
                if "error" in message:
                    error = message["error"]
                    assert isinstance(error["code"], int) and isinstance(error["message"], str)
                await self.responses.put(message)

    def write(self, data: bytes) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        stdin.write(data)

    def next_id(self) -> int:
        return next(self.ids)

    async def answers(self, until: Id, timeout: float = 60) -> list[dict[str, Any]]:
        """Every response up to and including the one to `until`."""
        got: list[dict[str, Any]] = []
        while not got or got[-1].get("id") != until:
            try:
                got.append(await asyncio.wait_for(self.responses.get(), timeout))
            except TimeoutError:
                raise AssertionError(
                    f"no answer to {until!r}; got {got}; log:\n{self.stderr.decode()[-3000:]}"
                ) from None
        return got

    async def call(self, method: str, params: Any = None) -> dict[str, Any]:
        msg_id = self.next_id()
        self.write(frame(request(msg_id, method, params)))
        answers = await self.answers(msg_id)
        assert len(answers) == 1, answers
        return answers[0]

    async def initialize(self) -> dict[str, Any]:
        answer = await self.call(
            "initialize",
            {"processId": None, "rootUri": self.workspace.as_uri(), "capabilities": {}},
        )
        self.write(frame(notification("initialized", {})))
        return answer

    async def open_document(self) -> None:
        item = {"uri": self.uri, "languageId": "python", "version": 0, "text": SOURCE}
        self.write(frame(notification("textDocument/didOpen", {"textDocument": item})))

    def inline(self, msg_id: Id, line: Any, character: Any, uri: str | None = None) -> bytes:
        params = {
            "textDocument": {"uri": uri or self.uri},
            "position": {"line": line, "character": character},
            "context": {"triggerKind": 2},
        }
        return frame(request(msg_id, "textDocument/inlineCompletion", params))

    async def wait_loaded(self) -> dict[str, Any]:
        for _ in range(600):
            answer = await self.call("shoptalk/status", {})
            if not answer["result"]["loading"]:
                return answer["result"]  # type: ignore[no-any-return]
            await asyncio.sleep(0.1)
        raise AssertionError("the model did not load")

    async def exit_code(self, timeout: float = 30) -> int:
        code = await asyncio.wait_for(self.process.wait(), timeout)
        for task in self._tasks:
            await asyncio.wait_for(task, timeout)
        return code

    async def close(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        for task in self._tasks:
            task.cancel()


# ---- the shared server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def parts(
    tiny_gguf: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("protocol")
    workspace = _make_workspace(root)
    data_dir = root / "data"
    data_dir.mkdir()
    model = root / "models" / "model-a.gguf"
    model.parent.mkdir()
    shutil.copy(tiny_gguf("gemma3"), model)
    write_manifest(model, kind="model", base="gemma3-270m", run_id="run-a")
    return workspace, data_dir, model


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(parts: tuple[Path, Path, Path]) -> AsyncIterator[RawClient]:
    client = await RawClient.start(*parts)
    answer = await client.initialize()
    assert "inlineCompletionProvider" in answer["result"]["capabilities"]
    await client.open_document()
    await client.wait_loaded()
    yield client
    await client.close()


# ---- the cases -------------------------------------------------------------------

Builder = Callable[[RawClient, int, int], tuple[bytes, Expected]]

S = status
INLINE = "textDocument/inlineCompletion"


def padded(message: dict[str, Any], size: int) -> bytes:
    """`message` as a JSON body of `size` bytes (spaces before its last brace)."""
    body = json.dumps(message).encode()
    return body[:-1] + b" " * (size - len(body)) + b"}"


# One case a line: (name, (client, a, b) -> (bytes sent, expected answers)).
# fmt: off
CASES: list[tuple[str, Builder]] = [
    # framing
    ("valid", lambda c, a, b: (frame(S(a)), [(a, RESULT)])),
    ("length one short", lambda c, a, b: (frame(S(a), -1), [(a, PARSE)])),
    ("length ten short", lambda c, a, b: (frame(S(a), -10), [(a, PARSE)])),
    ("length one long", lambda c, a, b: (frame(S(a), +1), [(a, RESULT)])),
    ("length five long", lambda c, a, b: (frame(S(a), +5), [(a, RESULT)])),
    ("huge length", lambda c, a, b: (frame(S(a), header=b"Content-Length: 60000000000\r\n\r\n"), [(a, INVALID_REQUEST)])),
    ("over the limit", lambda c, a, b: (frame(padded(S(a), MAX_MESSAGE_BYTES + 1)), [(a, INVALID_REQUEST)])),
    ("no length", lambda c, a, b: (frame(S(a), header=b"Content-Type: application/json\r\n\r\n"), [(a, INVALID_REQUEST)])),
    ("no header at all", lambda c, a, b: (frame(S(a), header=b""), [(a, INVALID_REQUEST)])),
    ("length not a number", lambda c, a, b: (frame(S(a), header=b"Content-Length: 6e10\r\n\r\n"), [(a, INVALID_REQUEST)])),
    ("negative length", lambda c, a, b: (frame(S(a), header=b"Content-Length: -5\r\n\r\n"), [(a, INVALID_REQUEST)])),
    ("length zero", lambda c, a, b: (b"Content-Length: 0\r\n\r\n", [(None, PARSE)])),
    ("lower-case header, extra header", lambda c, a, b: (frame(S(a), header=b"content-length: %d\r\nContent-Type: application/vscode-jsonrpc; charset=utf-8\r\n\r\n" % len(json.dumps(S(a)))), [(a, RESULT)])),
    ("noise between frames", lambda c, a, b: (b"hello\r\n\r\n\x00\xff\r\n" + frame(S(a)), [(a, RESULT)])),
    ("a long line of noise", lambda c, a, b: (b"x" * 100_000 + frame(S(a)), [(a, RESULT)])),
    # bodies
    ("truncated JSON", lambda c, a, b: (frame(json.dumps(S(a)).encode()[:-3]), [(a, PARSE)])),
    ("not JSON", lambda c, a, b: (frame(b"{hello"), [(None, PARSE)])),
    ("not UTF-8", lambda c, a, b: (frame(b'{"jsonrpc": "2.0", "id": "\xff"}'), [(None, PARSE)])),
    ("nested too deeply", lambda c, a, b: (frame(b"[" * 100_000 + b"]" * 100_000), [(None, PARSE)])),
    ("a number", lambda c, a, b: (frame(42), [(None, INVALID_REQUEST)])),
    ("a string", lambda c, a, b: (frame("initialize"), [(None, INVALID_REQUEST)])),
    ("null", lambda c, a, b: (frame(None), [(None, INVALID_REQUEST)])),
    ("a batch of requests", lambda c, a, b: (frame([S(a), S(b)]), [(a, INVALID_REQUEST), (b, INVALID_REQUEST)])),
    ("an empty batch", lambda c, a, b: (frame([]), [(None, INVALID_REQUEST)])),
    ("a batch of notifications", lambda c, a, b: (frame([notification("initialized", {})]), [(None, INVALID_REQUEST)])),
    ("no jsonrpc member", lambda c, a, b: (frame({"id": a, "method": "shoptalk/status"}), [(a, INVALID_REQUEST)])),
    ("jsonrpc 1.0", lambda c, a, b: (frame({**S(a), "jsonrpc": "1.0"}), [(a, INVALID_REQUEST)])),
    ("method a number", lambda c, a, b: (frame({**S(a), "method": 7}), [(a, INVALID_REQUEST)])),
    ("id an object", lambda c, a, b: (frame({**S(a), "id": {"n": a}}), [(None, INVALID_REQUEST)])),
    ("id a fraction", lambda c, a, b: (frame({**S(a), "id": 1.5}), [(None, INVALID_REQUEST)])),
    ("id true", lambda c, a, b: (frame({**S(a), "id": True}), [(None, INVALID_REQUEST)])),
    ("id null", lambda c, a, b: (frame({**S(a), "id": None}), [(None, INVALID_REQUEST)])),
    ("a string id", lambda c, a, b: (frame(S(f"s-{a}")), [(f"s-{a}", RESULT)])),
    ("unknown method", lambda c, a, b: (frame(request(a, "shoptalk/noSuch", {})), [(a, NO_METHOD)])),
    ("unknown notification", lambda c, a, b: (frame(notification("shoptalk/noSuch", {})), [])),
    ("a response to nothing", lambda c, a, b: (frame({"jsonrpc": "2.0", "id": a, "result": 1}), [])),
    ("an error response to nothing", lambda c, a, b: (frame({"jsonrpc": "2.0", "id": a, "error": {"code": 1, "message": "x"}}), [])),
    # invalid params
    ("negative position", lambda c, a, b: (c.inline(a, -1, -1), [(a, INVALID_PARAMS)])),
    ("position of strings", lambda c, a, b: (c.inline(a, "1", "x"), [(a, INVALID_PARAMS)])),
    ("position null", lambda c, a, b: (c.inline(a, None, None), [(a, INVALID_PARAMS)])),
    ("params a list", lambda c, a, b: (frame(request(a, INLINE, [1, 2])), [(a, INVALID_PARAMS)])),
    ("params missing", lambda c, a, b: (frame(request(a, INLINE)), [(a, INVALID_PARAMS)])),
    ("no text document", lambda c, a, b: (frame(request(a, "textDocument/completion", {"position": {"line": 0, "character": 0}})), [(a, INVALID_PARAMS)])),
    ("unknown document", lambda c, a, b: (c.inline(a, 0, 0, uri="file:///no/such/file.py"), [(a, RESULT)])),
    ("not a file URI", lambda c, a, b: (c.inline(a, 0, 0, uri="untitled:Untitled-1"), [(a, RESULT)])),
    ("past the last line", lambda c, a, b: (c.inline(a, 10_000, 3), [(a, RESULT)])),
    ("past the line's end", lambda c, a, b: (c.inline(a, 3, 10_000), [(a, RESULT)])),
    ("a huge position", lambda c, a, b: (c.inline(a, 2**31 - 1, 2**31 - 1), [(a, RESULT)])),
    ("completion past the end", lambda c, a, b: (frame(request(a, "textDocument/completion", {"textDocument": {"uri": c.uri}, "position": {"line": 999, "character": 999}})), [(a, RESULT)])),
    ("findModule with a number", lambda c, a, b: (frame(request(a, "shoptalk/findModule", {"query": 5, "limit": "x"})), [(a, RESULT)])),
    ("findModule with a string", lambda c, a, b: (frame(request(a, "shoptalk/findModule", "vat")), [(a, RESULT)])),
    ("status with a list", lambda c, a, b: (frame(request(a, "shoptalk/status", [1])), [(a, RESULT)])),
    ("unknown command", lambda c, a, b: (frame(request(a, "workspace/executeCommand", {"command": "rm -rf"})), [(a, INVALID_PARAMS)])),
    ("command with odd arguments", lambda c, a, b: (frame(request(a, "workspace/executeCommand", {"command": "shoptalk.findModule", "arguments": [{"q": 1}, None, 3]})), [(a, RESULT)])),
    ("didOpen without a document", lambda c, a, b: (frame(notification("textDocument/didOpen", {})), [])),
    ("didChange of an unknown document", lambda c, a, b: (frame(notification("textDocument/didChange", {"textDocument": {"uri": "file:///nope.py", "version": 3}, "contentChanges": [{"text": "x"}]})), [])),
    ("prefill with garbage", lambda c, a, b: (frame(notification("shoptalk/prefill", {"textDocument": {"uri": c.uri}, "position": {"line": "x"}})), [])),
    ("cancel of nothing", lambda c, a, b: (frame(notification("$/cancelRequest", {"id": a})), [])),
    ("cancel without an id", lambda c, a, b: (frame(notification("$/cancelRequest", {})), [])),
    ("configuration of a list", lambda c, a, b: (frame(notification("workspace/didChangeConfiguration", {"settings": [1, 2]})), [])),
    # protocol order
    ("initialize again", lambda c, a, b: (frame(request(a, "initialize", {"processId": None, "rootUri": None, "capabilities": {}})), [(a, INVALID_REQUEST)])),
]
# fmt: on


def _answered(answers: list[dict[str, Any]]) -> Expected:
    return sorted(
        ((a.get("id"), a["error"]["code"] if "error" in a else RESULT) for a in answers),
        key=repr,
    )


@pytest.mark.parametrize("builder", [case[1] for case in CASES], ids=[case[0] for case in CASES])
async def test_each_request_is_answered_once_and_the_stream_recovers(
    server: RawClient, builder: Builder
) -> None:
    a, b = server.next_id(), server.next_id()
    data, expected = builder(server, a, b)
    server.write(data)
    probe = server.next_id()
    server.write(frame(status(probe)))
    answers = await server.answers(probe)
    # Answers to the case's requests that run on the model may come after the probe's.
    pending = {msg_id for msg_id, _ in expected} - {a.get("id") for a in answers}
    for msg_id in pending:
        answers += await server.answers(msg_id)
    late = server.next_id()
    server.write(frame(status(late)))
    answers += await server.answers(late)  # nothing more came for the case meanwhile
    assert _answered(answers) == sorted([*expected, (probe, RESULT), (late, RESULT)], key=repr)


async def test_after_all_that_the_server_still_completes(server: RawClient) -> None:
    msg_id = server.next_id()
    server.write(server.inline(msg_id, 5, 4))
    (answer,) = await server.answers(msg_id)
    assert "result" in answer
    for item in (answer["result"] or {}).get("items", []):
        assert item["range"]["start"] == {"line": 5, "character": 4}
    found = await server.call("shoptalk/findModule", {"query": "vat rate per country"})
    assert found["result"]["modules"][0]["id"] == "billing.taxes"
    status_now = (await server.call("shoptalk/status", {}))["result"]
    assert status_now["error"] is None and status_now["model"].endswith("model-a.gguf")
    assert status_now["swaps"] == 0  # one model, loaded once, whatever came in
    assert server.stderr.count(b"model: loading") == 1
    # Protocol noise is logged, never shown; bad settings are shown (once).
    shown = [n["params"]["message"] for n in server.notifications]
    assert all("settings were ignored" in message for message in shown), shown
    assert len(shown) == 1
    assert not crashes(server.stderr), server.stderr.decode()[-3000:]
    assert server.process.returncode is None


def crashes(log: bytes) -> list[str]:
    """Tracebacks in the server's log, but for pygls' log of a request it
    answered with an error (an unknown command is the client's mistake)."""
    records = re.split(r"\n(?=\d{4}-\d\d-\d\d )", log.decode(errors="replace"))
    answered = "ERROR pygls.protocol.json_rpc: Exception occurred for message"
    return [r for r in records if "Traceback" in r and answered not in r.split("\n", 1)[0]]


# ---- protocol order on fresh servers -------------------------------------------------


@pytest_asyncio.fixture(loop_scope="module")
async def fresh(parts: tuple[Path, Path, Path]) -> AsyncIterator[RawClient]:
    client = await RawClient.start(*parts)
    yield client
    await client.close()


async def test_requests_before_initialize_are_refused(fresh: RawClient) -> None:
    a, b = fresh.next_id(), fresh.next_id()
    fresh.write(frame(status(a)))
    fresh.write(frame(notification("textDocument/didOpen", {"textDocument": {}})))
    fresh.write(frame(request(b, "shutdown")))
    answers = await fresh.answers(b)
    assert _answered(answers) == sorted([(a, NOT_INITIALIZED), (b, NOT_INITIALIZED)], key=repr)
    await fresh.initialize()
    await fresh.open_document()
    await fresh.wait_loaded()
    msg_id = fresh.next_id()
    fresh.write(fresh.inline(msg_id, 5, 4))
    assert "result" in (await fresh.answers(msg_id))[0]


async def test_after_shutdown_only_exit_and_the_exit_code_is_0(fresh: RawClient) -> None:
    await fresh.initialize()
    assert (await fresh.call("shutdown"))["result"] is None
    a = fresh.next_id()
    fresh.write(frame(status(a)))
    fresh.write(frame(notification("textDocument/didOpen", {})))
    (answer,) = await fresh.answers(a)
    assert answer["error"]["code"] == INVALID_REQUEST
    fresh.write(frame(notification("exit")))
    assert await fresh.exit_code() == 0, fresh.stderr.decode()[-3000:]


async def test_exit_without_shutdown_exits_with_1(fresh: RawClient) -> None:
    await fresh.initialize()
    fresh.write(frame(notification("exit")))
    assert await fresh.exit_code() == 1
    assert not crashes(fresh.stderr)


async def test_exit_before_initialize_exits_with_1(fresh: RawClient) -> None:
    fresh.write(frame(notification("exit")))
    assert await fresh.exit_code() == 1
