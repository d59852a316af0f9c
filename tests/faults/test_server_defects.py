"""Regression tests for the server defects of issue 14, each with real parts:
real files in a real data dir, the real `shoptalk` CLI, the real server over
stdio (and over TCP where the defect is about TCP)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from lsprotocol import types
from test_server_e2e import SOURCE, Session, _make_workspace, start_session, stop_session

from shoptalk.models.manifest import write_manifest
from shoptalk.models.store import DamagedPointer, RepoStore
from shoptalk.server.lsp import _plain

pytestmark = pytest.mark.e2e


def run_cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SHOPTALK_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "shoptalk.models.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    return _make_workspace(tmp_path)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path


def exported(tiny_gguf: Callable[..., Path], folder: Path, run_id: str) -> Path:
    """A tiny GGUF with its manifest, as `shoptalk export` leaves it."""
    target = folder / run_id / "model-q8_0.gguf"
    target.parent.mkdir(parents=True)
    shutil.copy(tiny_gguf("gemma3"), target)
    write_manifest(target, kind="model", base="gemma3-270m", run_id=run_id)
    return target


@pytest.fixture
def model_file(tiny_gguf: Callable[..., Path], tmp_path: Path) -> Path:
    return exported(tiny_gguf, tmp_path / "models", "run-a")


# ---- 4. the repository's shoptalk.toml when an editor starts the server --------------


def git_repository(workspace: Path, toml: str | None) -> Path:
    subprocess.run(["git", "init", "-q", str(workspace)], check=True)
    if toml is not None:
        (workspace / "shoptalk.toml").write_text(toml)
    return workspace.resolve()


REPO_TOML = """
[serve]
max_tokens = 7
multiline = "never"
prefix_chars = 1000
suffix_chars = 200
"""


@pytest.mark.asyncio
async def test_the_repository_settings_apply_in_their_layer(
    workspace: Path, data_dir: Path, model_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """defaults < user config < the repository's shoptalk.toml < environment <
    initializationOptions, with the workspace folder a sub-folder of the
    repository (found upwards, as `--repo` names it)."""
    repo = git_repository(workspace, REPO_TOML)
    Path(os.environ["SHOPTALK_CONFIG"]).write_text(
        "[serve]\nmax_tokens = 5\nidle_prefill_ms = 111\nsuffix_chars = 50\n"
    )
    monkeypatch.setenv("SHOPTALK_SERVE__PREFIX_CHARS", "900")
    session = await start_session(
        workspace, data_dir, model_file, init_options={"suffix_chars": 123}, root=repo / "billing"
    )
    try:
        status = await session.wait_loaded()
        assert status["repo"] == str(repo)
        serve = status["serve"]
        assert serve["max_tokens"] == 7  # the repository's file beats the user's
        assert serve["idle_prefill_ms"] == 111  # the user's, where the repository is silent
        assert serve["multiline"] == "never"
        assert serve["prefix_chars"] == 900  # the environment beats the file
        assert serve["suffix_chars"] == 123  # the client's options beat everything
        assert not session.messages
    finally:
        await stop_session(session)


@pytest.mark.parametrize(
    ("toml", "named"),
    [
        ('[serve]\nmax_tokens = "many"\n', "max_tokens"),
        ("[serve\nmax_tokens = 7\n", "not valid TOML"),
        ("[serve]\nbogus_key = 1\n", "bogus_key"),
    ],
)
@pytest.mark.asyncio
async def test_a_broken_repository_file_is_reported_and_the_server_runs_on(
    toml: str, named: str, workspace: Path, data_dir: Path, model_file: Path
) -> None:
    git_repository(workspace, toml)
    session = await start_session(workspace, data_dir, model_file)
    try:
        status = await session.wait_loaded()
        await session.wait_for(lambda: bool(session.messages))
        (message,) = [m.message for m in session.messages]
        assert "shoptalk.toml" in message and named in message
        assert status["serve"]["max_tokens"] == 48  # the default
        uri = await session.open("billing/invoices.py", SOURCE)
        await session.inline(uri, 5, 4)
        assert (await session.status())["model"] == str(model_file)
    finally:
        await stop_session(session)


@pytest.mark.asyncio
async def test_without_a_workspace_folder_the_first_document_names_the_repository(
    workspace: Path, data_dir: Path, model_file: Path, tiny_gguf: Callable[..., Path]
) -> None:
    repo = git_repository(workspace, REPO_TOML)
    promoted = exported(tiny_gguf, data_dir.parent / "runs", "run-p")
    RepoStore.for_repo(data_dir, repo).promote({"run_id": "run-p", "model": str(promoted)})
    session = await start_session(workspace, data_dir, model_file, root=None)
    try:
        before = await session.wait_loaded()
        assert before["repo"] is None and before["source"] == "--model"
        await session.open("billing/invoices.py", SOURCE)
        status = await wait_status(session, lambda s: s["run_id"] == "run-p")
        assert status["repo"] == str(repo) and status["serve"]["max_tokens"] == 7
        await wait_status(session, lambda s: bool(s["modules"]))
        found = _plain(await session.request("shoptalk/findModule", {"query": "vat rate"}))
        assert found["modules"][0]["id"] == "billing.taxes"
    finally:
        await stop_session(session)


# ---- 5. a damaged promotion pointer --------------------------------------------------

GOOD = {"run_id": "run-p", "model": "/models/p.gguf", "adapter": None, "metrics": {}}

# (what current.json holds, what the message says is wrong)
DAMAGED_POINTERS = [
    (b'{"run_id": "run-p", "model": ', "not JSON"),
    (b"", "not JSON"),
    (json.dumps([GOOD]).encode(), "JSON list, not an object"),
    (b"null", "JSON null, not an object"),
    (b'"current"', "JSON string, not an object"),
    (b'{"run_id": "run-p", "metrics": {}}', "names no model"),
    (json.dumps({**GOOD, "model": 5}).encode(), "'model' is a number, not a string"),
    (json.dumps({**GOOD, "run_id": ["a"]}).encode(), "'run_id' is a list, not a string"),
    (json.dumps({**GOOD, "metrics": "high"}).encode(), "'metrics' is a string, not an object"),
    (json.dumps({**GOOD, "promoted_at": "today"}).encode(), "'promoted_at' is a string"),
    (b'{"model": "\xff\xfe.gguf"}', "not UTF-8"),
]


@pytest.mark.parametrize(("content", "reason"), DAMAGED_POINTERS)
def test_a_damaged_pointer_is_named_by_its_one_loader(
    content: bytes, reason: str, tmp_path: Path
) -> None:
    store = RepoStore.for_repo(tmp_path, tmp_path / "repo")
    store.current_file.parent.mkdir(parents=True)
    store.current_file.write_bytes(content)
    with pytest.raises(DamagedPointer, match="models rollback") as raised:
        store.promotion()
    assert reason in raised.value.reason
    with pytest.raises(DamagedPointer):
        store.current()  # the record view goes through the same loader


def test_promoting_over_a_damaged_pointer_keeps_it_and_its_history(tmp_path: Path) -> None:
    store = RepoStore.for_repo(tmp_path, tmp_path / "repo")
    store.promote({"run_id": "one", "model": "one.gguf"})
    store.promote({"run_id": "two", "model": "two.gguf"})
    damaged = json.loads(store.current_file.read_text())
    damaged["model"] = {"oops": True}
    store.current_file.write_text(json.dumps(damaged))
    promoted = store.promote({"run_id": "three", "model": "three.gguf"})
    assert promoted.run_id == "three"
    assert [entry.run_id for entry in promoted.history] == ["one"]  # what was readable
    assert json.loads(store.damaged_file.read_text())["model"] == {"oops": True}
    assert store.rollback().run_id == "one"


def test_status_and_rollback_on_a_damaged_pointer(tmp_path: Path) -> None:
    """`shoptalk status` says what is wrong instead of crashing; `models
    rollback` restores the newest readable earlier model, or else removes the
    pointer (kept aside) so that the base is served."""
    data_dir = tmp_path / "data"
    repo = tmp_path / "repo"
    repo.mkdir()
    store = RepoStore.for_repo(data_dir, repo)
    store.promote({"run_id": "one", "model": "one.gguf"})
    store.promote({"run_id": "two", "model": "two.gguf"})
    record = json.loads(store.current_file.read_text())
    store.current_file.write_text(json.dumps({**record, "model": 7}))

    status = run_cli("status", "--repo", str(repo), data_dir=data_dir)
    assert status.returncode == 0, status.stderr
    assert "Traceback" not in status.stderr
    assert "'model' is a number" in status.stdout and "models rollback" in status.stdout

    repaired = run_cli("models", "rollback", "--repo", str(repo), data_dir=data_dir)
    assert repaired.returncode == 0, repaired.stderr
    assert "restored" in repaired.stderr and "one" in repaired.stderr
    assert store.promotion() is not None and store.promotion().run_id == "one"  # type: ignore[union-attr]

    store.current_file.write_text(json.dumps([record]))  # nothing readable in it
    repaired = run_cli("models", "rollback", "--repo", str(repo), data_dir=data_dir)
    assert repaired.returncode == 0, repaired.stderr
    assert "base model is served" in repaired.stderr
    assert store.promotion() is None
    assert json.loads(store.damaged_file.read_text()) == [record]
    status = run_cli("status", "--repo", str(repo), data_dir=data_dir)
    assert status.returncode == 0 and "none yet" in status.stdout


async def wait_status(session: Session, predicate: Callable[[dict[str, Any]], bool]) -> dict:
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        status = await session.status()
        if predicate(status):
            return status
        assert asyncio.get_running_loop().time() < deadline, (status["error"], status["run_id"])
        await asyncio.sleep(0.1)


@pytest.mark.asyncio
async def test_the_server_serves_the_fallback_on_a_damaged_pointer_and_says_so(
    workspace: Path, data_dir: Path, model_file: Path, tiny_gguf: Callable[..., Path]
) -> None:
    store = RepoStore.for_repo(data_dir, workspace)
    promoted = exported(tiny_gguf, data_dir.parent / "runs", "run-p")
    store.promote({"run_id": "run-p", "model": str(promoted)})
    store.promote({"run_id": "run-q", "model": str(promoted)})
    record = json.loads(store.current_file.read_text())
    store.current_file.write_text(json.dumps([record]))  # a JSON list
    session = await start_session(workspace, data_dir, model_file)
    try:
        status = await session.wait_loaded()
        assert status["model"] == str(model_file) and status["source"] == "--model"
        assert "JSON list" in status["error"] and "models rollback" in status["error"]
        await session.wait_for(lambda: any("JSON list" in m.message for m in session.messages))
        uri = await session.open("billing/invoices.py", SOURCE)
        await session.inline(uri, 5, 4)  # completions still answer, from the fallback
        # Each other damage is named too, and the status keeps answering.
        for content, reason in DAMAGED_POINTERS:
            store.current_file.write_bytes(content)
            await wait_status(session, lambda s, r=reason: r in (s["error"] or ""))
        # `models rollback` repairs it from the history; the server swaps to it.
        store.current_file.write_text(json.dumps({**record, "model": 5}))
        repaired = run_cli("models", "rollback", "--repo", str(workspace), data_dir=data_dir)
        assert repaired.returncode == 0, repaired.stderr
        status = await wait_status(session, lambda s: s["run_id"] == "run-p")
        assert status["error"] is None and status["model"] == str(promoted)
        assert b"Traceback" not in session.stderr
    finally:
        await stop_session(session)


# ---- 6. one model per process, one client per TCP server ----------------------------


@pytest.mark.asyncio
async def test_initialize_again_is_refused_and_loads_nothing(
    workspace: Path, data_dir: Path, model_file: Path
) -> None:
    session = await start_session(workspace, data_dir, model_file)
    try:
        await session.wait_loaded()
        params = types.InitializeParams(
            capabilities=types.ClientCapabilities(), root_uri=workspace.as_uri()
        )
        for _ in range(3):
            with pytest.raises(Exception, match="already initialized"):
                await session.request("initialize", params)
        uri = await session.open("billing/invoices.py", SOURCE)
        await session.inline(uri, 5, 4)
        status = await session.status()
        assert status["swaps"] == 0 and status["model"] == str(model_file)
        assert session.stderr.count(b"model: loading") == 1, session.stderr.decode()[-3000:]
    finally:
        await stop_session(session)


async def send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    body = json.dumps(message).encode()
    writer.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()


async def answer(reader: asyncio.StreamReader, msg_id: int) -> dict[str, Any]:
    """The response to `msg_id` (notifications and server requests skipped)."""
    while True:
        header = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
        length = int(header.split(b"Content-Length:")[1].split(b"\r\n")[0])
        message: dict[str, Any] = json.loads(await reader.readexactly(length))
        if message.get("id") == msg_id and "method" not in message:
            return message


async def tcp_call(
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    msg_id: int,
    method: str,
    params: Any,
) -> dict[str, Any]:
    reader, writer = connection
    await send(writer, {"jsonrpc": "2.0", "id": msg_id, "method": method, "params": params})
    return await answer(reader, msg_id)


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        try:
            return await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            assert asyncio.get_running_loop().time() < deadline, "the TCP server did not start"
            await asyncio.sleep(0.2)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.asyncio
async def test_a_second_tcp_client_is_refused_and_the_first_keeps_working(
    workspace: Path, data_dir: Path, model_file: Path
) -> None:
    port = free_port()
    env = {**os.environ, "SHOPTALK_DATA_DIR": str(data_dir), "SHOPTALK_SERVE__THREADS": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "shoptalk.models.cli", "serve", "--tcp", "--port", str(port)),
        *("--model", str(model_file), "--poll-seconds", "0"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    init = {"processId": None, "rootUri": workspace.as_uri(), "capabilities": {}}
    uri = (workspace / "billing" / "invoices.py").as_uri()
    inline = {
        "textDocument": {"uri": uri},
        "position": {"line": 5, "character": 4},
        "context": {"triggerKind": 2},
    }
    try:
        first = await connect(port)
        assert "capabilities" in (await tcp_call(first, 1, "initialize", init))["result"]
        item = {"uri": uri, "languageId": "python", "version": 0, "text": SOURCE}
        await send(first[1], {"jsonrpc": "2.0", "method": "initialized", "params": {}})
        await send(
            first[1],
            {"jsonrpc": "2.0", "method": "textDocument/didOpen", "params": {"textDocument": item}},
        )
        for msg_id in range(2, 600):
            if not (await tcp_call(first, msg_id, "shoptalk/status", {}))["result"]["loading"]:
                break
            await asyncio.sleep(0.1)
        # A second client is told why and hung up on; it loads nothing.
        second = await connect(port)
        refused = await tcp_call(second, 1, "initialize", init)
        assert "already serves a client" in refused["error"]["message"]
        assert await asyncio.wait_for(second[0].read(), 10) == b""  # closed by the server
        second[1].close()
        # The first client keeps working after the second one has gone.
        await asyncio.sleep(0.5)
        assert "result" in await tcp_call(first, 1000, "textDocument/inlineCompletion", inline)
        status = (await tcp_call(first, 1001, "shoptalk/status", {}))["result"]
        assert status["swaps"] == 0 and status["error"] is None
        assert (await tcp_call(first, 1002, "shutdown", None))["result"] is None
        await send(first[1], {"jsonrpc": "2.0", "method": "exit", "params": None})
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        log = (await process.stderr.read()).decode() if process.stderr else ""
    assert log.count("model: loading") == 1, log[-3000:]
    assert "refused a second client" in log and "Traceback" not in log


# ---- serve's command line: clear messages, no tracebacks --------------------------


def _serve_error_cases(tmp_path: Path, busy_port: int) -> list[tuple[list[str], str]]:
    folder = tmp_path / "a-folder"
    folder.mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    free = str(free_port())
    return [
        (["--tcp", "--port", "99999"], "Invalid value for '--port'"),
        (["--tcp", "--port", "-1"], "Invalid value for '--port'"),
        (["--tcp", "--port", "0"], "Invalid value for '--port'"),
        (["--tcp", "--port", str(busy_port)], f"cannot listen on 127.0.0.1:{busy_port}"),
        (["--tcp", "--host", "999.1.1.1", "--port", free], "cannot listen on 999.1.1.1"),
        (["--log-file", str(folder)], f"cannot write the log file {folder}"),
        (["--log-file", str(a_file / "serve.log")], "cannot write the log file"),
        (["--model", str(folder)], f"--model {folder} is a folder; give the path of a .gguf"),
        (["--model", str(tmp_path / "nope.gguf")], "nope.gguf does not exist"),
    ]


def test_serve_refuses_bad_options_with_a_message(tmp_path: Path, data_dir: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        for args, message in _serve_error_cases(tmp_path, busy.getsockname()[1]):
            result = run_cli("serve", *args, data_dir=data_dir)
            assert result.returncode != 0, (args, result.stderr)
            assert message in result.stderr, (args, result.stderr)
            assert "Traceback" not in result.stderr, (args, result.stderr)
