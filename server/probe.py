"""Ask the real language server for one inline completion, as an editor
does: start `shoptalk serve --stdio` with pygls' `LanguageClient`, open the
document, request `textDocument/inlineCompletion` (again, once a second,
while the model is still loading), shut the server down.

`python -m shoptalk.server.probe --repo R --file F --line L --character C
[--data-dir D] [--text-file T]` prints `{"suggestion": ..., "seconds": ...}`
(T: the document as the user has it; default: F as it is on disk). The demo
runs it as a process: the training half never imports the LSP stack.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from lsprotocol import types
from pygls.lsp.client import LanguageClient

REQUEST_TIMEOUT_S = 120.0


def _text(
    result: types.InlineCompletionList | Sequence[types.InlineCompletionItem] | None,
) -> str:
    items = result.items if isinstance(result, types.InlineCompletionList) else (result or [])
    if not items:
        return ""
    insert = items[0].insert_text
    return insert if isinstance(insert, str) else insert.value


async def complete_once(
    repo: Path,
    path: Path,
    document: str,
    line: int,
    character: int,
    data_dir: Path | None = None,
    attempts: int = 30,
) -> tuple[str, float]:
    """(suggestion, seconds of the request that answered); "" when none came."""
    command = ["-m", "shoptalk.models.cli"]
    if data_dir is not None:
        command += ["--data-dir", str(data_dir)]
    command += ["serve", "--stdio", "--repo", str(repo)]
    client = LanguageClient("shoptalk-probe", "1")
    await client.start_io(sys.executable, *command, cwd=str(repo))
    uri = path.resolve().as_uri()
    try:
        await asyncio.wait_for(
            client.initialize_async(
                types.InitializeParams(
                    capabilities=types.ClientCapabilities(), root_uri=repo.resolve().as_uri()
                )
            ),
            REQUEST_TIMEOUT_S,
        )
        client.initialized(types.InitializedParams())
        client.text_document_did_open(
            types.DidOpenTextDocumentParams(
                text_document=types.TextDocumentItem(
                    uri=uri, language_id="python", version=1, text=document
                )
            )
        )
        params = types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri),
            position=types.Position(line=line, character=character),
            context=types.InlineCompletionContext(
                trigger_kind=types.InlineCompletionTriggerKind.Automatic
            ),
        )
        suggestion, seconds = "", 0.0
        for _ in range(attempts):  # the first requests may come while the model loads
            started = time.perf_counter()
            result = await asyncio.wait_for(
                client.text_document_inline_completion_async(params), REQUEST_TIMEOUT_S
            )
            seconds = time.perf_counter() - started
            suggestion = _text(result)
            if suggestion:
                break
            await asyncio.sleep(1.0)
        return suggestion, seconds
    finally:
        await _stop(client)


async def _stop(client: LanguageClient) -> None:
    server = client._server
    try:
        if server is not None and server.returncode is None:
            await asyncio.wait_for(client.shutdown_async(None), 10)
            client.exit(None)
            await asyncio.wait_for(server.wait(), 10)
    except Exception:  # a server that will not stop is killed: the answer is in
        if server is not None and server.returncode is None:
            server.kill()
    await client.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shoptalk.server.probe", description=__doc__)
    parser.add_argument("--repo", type=Path, required=True)
    parser.add_argument("--file", type=Path, required=True)
    parser.add_argument("--line", type=int, required=True)
    parser.add_argument("--character", type=int, required=True)
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--text-file", type=Path, help="the document's text (default: the file)")
    args = parser.parse_args(argv)
    text_file = args.text_file or args.file
    document = text_file.read_text(encoding="utf-8", errors="replace")
    suggestion, seconds = asyncio.run(
        complete_once(args.repo, args.file, document, args.line, args.character, args.data_dir)
    )
    print(json.dumps({"suggestion": suggestion, "seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
