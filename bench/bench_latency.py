"""Benchmark: completion latency of `shoptalk serve` while a user types, next
to a naive baseline measured in the same run, and exact match with and
without token healing.

1. Typing replay: for a few real commits of a public repository, open the
   file as it was before the commit in the real server (stdio, default
   model), then type the commit's new lines one keystroke at a time with
   realistic gaps (seeded, ~150 ms), asking for an inline completion after
   each and cancelling the one still pending (as editors do). Latency of the
   keystroke requests and of the first request after opening, p50/p95; peak
   server RSS.
2. Naive baseline: the same requests through a fresh llama.cpp prompt each
   (no KV reuse, no cache, no prefill), in this process after the server
   has exited.
3. Token healing: exact match of prefix-only completions of real added lines
   (last n whitespace tokens masked, n in [3, min(50, T-1)]) from the
   repository's recent commits, with and without healing.

    .venv/bin/python bench/bench_latency.py --repo /tmp/click --model /tmp/gemma.gguf
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lsprotocol import types
from pygls.lsp.client import LanguageClient

from shoptalk.models.backends import LlamaBackend, LlamaOptions, default_threads
from shoptalk.models.catalog import CATALOG, DEFAULT_BASE
from shoptalk.models.completion import (
    CompletionEngine,
    EngineOptions,
    offset_to_utf16,
    plan_prompt,
)

BASE = CATALOG[DEFAULT_BASE]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    ).stdout


@dataclass
class TypingSession:
    path: str
    commit: str
    before: str  # the file before the commit, with the replaced lines removed
    cursor: int  # where typing starts
    typed: str  # what the user types


def typing_sessions(repo: Path, count: int, chars: int, since: str) -> list[TypingSession]:
    """Commits that add a block of Python code to an existing file: the user
    deletes nothing and types the block."""
    sessions: list[TypingSession] = []
    commits = git(
        repo, "log", f"--since={since}", "--no-merges", "--format=%H", "--", "*.py"
    ).split()
    for commit in commits:
        if len(sessions) >= count:
            break
        names = git(repo, "diff-tree", "--no-commit-id", "--name-only", "-r", commit).split()
        for name in names:
            if not name.endswith(".py") or "test" in name:
                continue
            try:
                old = git(repo, "show", f"{commit}^:{name}")
                new = git(repo, "show", f"{commit}:{name}")
            except subprocess.CalledProcessError:
                continue
            old_lines = old.splitlines(keepends=True)
            new_lines = new.splitlines(keepends=True)
            matcher = difflib.SequenceMatcher(a=old_lines, b=new_lines, autojunk=False)
            for tag, i1, _i2, j1, j2 in matcher.get_opcodes():
                if tag != "insert":
                    continue
                block = "".join(new_lines[j1:j2])
                if len(block.strip()) < 60 or i1 < 20:
                    continue
                cursor = len("".join(old_lines[:i1]))
                sessions.append(TypingSession(name, commit[:10], old, cursor, block[:chars]))
                break
            if len(sessions) >= count or (sessions and sessions[-1].commit == commit[:10]):
                break
    return sessions


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


@dataclass
class ReplayResult:
    keystroke_ms: list[float] = field(default_factory=list)
    first_ms: list[float] = field(default_factory=list)
    cancelled: int = 0
    shown: int = 0
    peak_rss_mb: float = 0.0
    counters: dict[str, Any] = field(default_factory=dict)


def rss_mb(pid: int) -> tuple[float, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    values = {}
    for line in status.splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            values[line.split(":")[0]] = int(line.split()[1]) / 1024
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


async def replay(
    sessions: list[TypingSession],
    model: Path,
    threads: int,
    seed: int,
    look_s: float,
    pause_share: float,
    options: dict[str, Any] | None = None,
    repo: Path | None = None,
) -> ReplayResult:
    result = ReplayResult()
    rng = random.Random(seed)
    client = LanguageClient("bench", "1")

    @client.feature(types.WINDOW_SHOW_MESSAGE)
    def show(params: types.ShowMessageParams) -> None:
        print(f"server says: {params.message}", file=sys.stderr)

    @client.feature(types.WINDOW_WORK_DONE_PROGRESS_CREATE)
    def create(params: Any) -> None:
        return None

    # With `repo`, the repository itself is the workspace and each file is
    # opened at its real path (the context engine indexes the rest).
    workspace = repo.resolve() if repo is not None else Path(tempfile.mkdtemp(prefix="bench-ws-"))
    env = dict(os.environ)
    env["SHOPTALK_DATA_DIR"] = tempfile.mkdtemp(prefix="bench-data-")
    env["SHOPTALK_SERVE__THREADS"] = str(threads)
    await client.start_io(
        sys.executable,
        *("-m", "shoptalk.models.cli", "serve", "--stdio", "--model", str(model)),
        *("--poll-seconds", "0"),
        env=env,
    )
    server = client._server
    assert server is not None

    async def drain() -> None:
        while server.stderr is not None and await server.stderr.read(65536):
            pass

    drainer = asyncio.create_task(drain())
    await client.initialize_async(
        types.InitializeParams(
            capabilities=types.ClientCapabilities(),
            root_uri=workspace.as_uri(),
            initialization_options=options or {},
        )
    )
    client.initialized(types.InitializedParams())
    wanted = options or {}
    wants_index = bool(wanted.get("context_chars", 0) or wanted.get("copy_channel"))
    while True:
        status: Any = await client.protocol.send_request_async("shoptalk/status", {})
        building = wants_index and getattr(status, "index", None) is None
        if not getattr(status, "loading", True) and not building:
            break  # the model is loaded and the workspace index (context on) built
        await asyncio.sleep(0.2)

    for number, session in enumerate(sessions):
        where = (
            Path(session.path) if repo is not None else Path(f"s{number}") / Path(session.path).name
        )
        uri = (workspace / where).as_uri()
        text = session.before
        client.text_document_did_open(
            types.DidOpenTextDocumentParams(
                text_document=types.TextDocumentItem(
                    uri=uri, language_id="python", version=0, text=text
                )
            )
        )
        cursor = session.cursor
        line, character = offset_to_utf16(text, cursor)
        # Editors tell the server where the cursor is when it moves (shoptalk/prefill).
        client.protocol.notify(
            "shoptalk/prefill",
            {"textDocument": {"uri": uri}, "position": {"line": line, "character": character}},
        )
        await asyncio.sleep(look_s)  # the user looks at the file before typing
        pending: dict[str, tuple[float, asyncio.Future[Any], bool]] = {}
        for index, char in enumerate(session.typed):
            line, character = offset_to_utf16(text, cursor)
            version = index + 1
            client.text_document_did_change(
                types.DidChangeTextDocumentParams(
                    text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
                    content_changes=[
                        types.TextDocumentContentChangePartial(
                            range=types.Range(
                                start=types.Position(line=line, character=character),
                                end=types.Position(line=line, character=character),
                            ),
                            text=char,
                        )
                    ],
                )
            )
            text = text[:cursor] + char + text[cursor:]
            cursor += 1
            for msg_id, (_, future, _) in list(pending.items()):
                if not future.done():
                    client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id=msg_id))
                    result.cancelled += 1
                del pending[msg_id]
            line, character = offset_to_utf16(text, cursor)
            msg_id = str(uuid.uuid4())
            sent = time.perf_counter()
            future = client.protocol.send_request_async(
                types.TEXT_DOCUMENT_INLINE_COMPLETION,
                types.InlineCompletionParams(
                    text_document=types.TextDocumentIdentifier(uri=uri),
                    position=types.Position(line=line, character=character),
                    context=types.InlineCompletionContext(
                        trigger_kind=types.InlineCompletionTriggerKind.Automatic
                    ),
                ),
                msg_id=msg_id,
            )
            first = index == 0

            def done(fut: asyncio.Future[Any], sent: float = sent, first: bool = first) -> None:
                if fut.cancelled() or fut.exception() is not None:
                    return
                elapsed = (time.perf_counter() - sent) * 1000
                (result.first_ms if first else result.keystroke_ms).append(elapsed)
                if fut.result() is not None and fut.result().items:
                    result.shown += 1

            future.add_done_callback(done)
            pending[msg_id] = (sent, future, first)
            if first:
                # The first request after opening is measured to its answer.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(future, 60)
            gap = min(0.6, max(0.05, rng.lognormvariate(-1.95, 0.35)))  # median ~140 ms
            if char in " \n(" and rng.random() < pause_share:
                # People pause between words and lines to think (median ~0.9 s).
                gap = min(3.0, max(0.3, rng.lognormvariate(-0.1, 0.5)))
            await asyncio.sleep(gap)
        for _, future, _ in pending.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(future, 30)
        result.peak_rss_mb = max(result.peak_rss_mb, rss_mb(server.pid)[1])
        client.text_document_did_close(
            types.DidCloseTextDocumentParams(text_document=types.TextDocumentIdentifier(uri=uri))
        )
    final: Any = await client.protocol.send_request_async("shoptalk/status", {})
    counters: Any = getattr(final, "counters", None)
    if hasattr(counters, "_asdict"):
        result.counters = dict(counters._asdict())
    result.peak_rss_mb = max(result.peak_rss_mb, rss_mb(server.pid)[1])
    await client.shutdown_async(None)
    client.exit(None)
    await asyncio.wait_for(server.wait(), 30)
    await client.stop()
    drainer.cancel()
    return result


def naive_baseline(
    sessions: list[TypingSession], model: Path, threads: int, every: int
) -> tuple[list[float], list[float]]:
    """A fresh prompt per request (no KV reuse, no suggestion cache, no
    prefill, no healing): llama-cpp-python's plain `create_completion`."""
    from llama_cpp import Llama

    llm = Llama(str(model), n_ctx=1024, n_threads=threads, n_threads_batch=threads, verbose=False)
    keystrokes: list[float] = []
    firsts: list[float] = []
    for session in sessions:
        text = session.before
        cursor = session.cursor
        for index, char in enumerate(session.typed):
            text = text[:cursor] + char + text[cursor:]
            cursor += 1
            if index % every and index:
                continue
            plan = plan_prompt(BASE.fim, text[:cursor], text[cursor:], False, 1600, 400)
            llm.reset()
            started = time.perf_counter()
            llm.create_completion(plan.prefix, max_tokens=48, temperature=0.0, stop=["\n"])
            elapsed = (time.perf_counter() - started) * 1000
            (firsts if index == 0 else keystrokes).append(elapsed)
    llm.close()
    return keystrokes, firsts


@dataclass(frozen=True)
class Instance:
    prefix: str
    target: str


def completion_instances(repo: Path, count: int, since: str, seed: int) -> list[Instance]:
    """Added lines of recent commits, the last n whitespace tokens masked
    (n in [3, min(50, T-1)]), the file before the line as context."""
    rng = random.Random(seed)
    found: list[Instance] = []
    commits = git(
        repo, "log", f"--since={since}", "--no-merges", "--format=%H", "--", "*.py"
    ).split()
    rng.shuffle(commits)
    for commit in commits:
        if len(found) >= count * 3:
            break
        diff = git(repo, "show", "--format=", "-U0", commit, "--", "*.py")
        path = None
        for line in diff.splitlines():
            if line.startswith("+++ b/"):
                path = line[6:]
                continue
            if not line.startswith("+") or line.startswith("+++") or path is None:
                continue
            added = line[1:]
            tokens = added.split()
            if len(tokens) < 4 or len(added) > 200:
                continue
            try:
                content = git(repo, "show", f"{commit}:{path}")
            except subprocess.CalledProcessError:
                continue
            at = content.find(added + "\n")
            if at < 0:
                continue
            masked = rng.randint(3, min(50, len(tokens) - 1))
            # The cut sits right before the first masked token (after its space).
            spans = [m.start() for m in re.finditer(r"\S+", added)]
            cut = spans[len(spans) - masked]
            line_prefix, target = added[:cut], added[cut:]
            if not line_prefix.strip() or not target.strip():
                continue
            found.append(Instance(content[:at] + line_prefix, target))
    rng.shuffle(found)
    return found[:count]


def exact_match(engine: CompletionEngine, instances: list[Instance]) -> float:
    hits = 0
    for instance in instances:
        suggestion = engine.complete(instance.prefix, len(instance.prefix), use_cache=False)
        got = " ".join(suggestion.text.split())
        hits += got == " ".join(instance.target.split())
    return 100.0 * hits / max(1, len(instances))


def load_average() -> str:
    return " / ".join(f"{value:.1f}" for value in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--repo", type=Path, required=True, help="a git clone of a public repository"
    )
    parser.add_argument("--model", type=Path, required=True, help="the default base GGUF")
    parser.add_argument("--sessions", type=int, default=3)
    parser.add_argument("--chars", type=int, default=120, help="characters typed per session")
    parser.add_argument("--since", default="2025-04-01", help="commits after the base's release")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--baseline-every", type=int, default=10)
    parser.add_argument("--em-instances", type=int, default=50)
    parser.add_argument("--look-seconds", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pause-share", type=float, default=0.3, help="share of word/line ends followed by a pause"
    )
    parser.add_argument(
        "--options",
        type=json.loads,
        default=None,
        help="[serve] settings as initializationOptions, e.g. '{\"context_chars\": 2000}'",
    )
    parser.add_argument(
        "--in-repo",
        action="store_true",
        help="the repository is the workspace and files open at their real paths (context on)",
    )
    args = parser.parse_args()

    sessions = typing_sessions(args.repo, args.sessions, args.chars, args.since)
    typed = sum(len(s.typed) for s in sessions)
    print(f"load average at the start: {load_average()}")
    print(
        f"typing {typed} characters in {len(sessions)} sessions: "
        + ", ".join(f"{s.path}@{s.commit}" for s in sessions)
    )
    result = asyncio.run(
        replay(
            sessions,
            args.model,
            args.threads,
            args.seed,
            args.look_seconds,
            args.pause_share,
            args.options,
            args.repo if args.in_repo else None,
        )
    )
    print(
        f"shoptalk keystroke p50 {percentile(result.keystroke_ms, 50):.0f} ms, first request "
        f"p50 {percentile(result.first_ms, 50):.0f} ms; baseline next",
        flush=True,
    )
    naive_keys, naive_first = naive_baseline(
        sessions, args.model, args.threads, args.baseline_every
    )

    print("\nlatency (ms)             p50      p95    n")
    rows = [
        ("shoptalk keystroke", result.keystroke_ms),
        ("naive keystroke", naive_keys),
        ("shoptalk first request", result.first_ms),
        ("naive first request", naive_first),
    ]
    for name, values in rows:
        print(
            f"{name:24s} {percentile(values, 50):7.0f}  {percentile(values, 95):7.0f}  {len(values):3d}"
        )
    p50_ratio = percentile(naive_keys, 50) / max(1e-9, percentile(result.keystroke_ms, 50))
    p95_ratio = percentile(naive_keys, 95) / max(1e-9, percentile(result.keystroke_ms, 95))
    print(f"keystroke speed-up vs naive: p50 x{p50_ratio:.1f}, p95 x{p95_ratio:.1f}")
    print(
        f"cancelled stale requests: {result.cancelled}; suggestions shown: {result.shown}; "
        f"server counters: {result.counters}"
    )
    print(f"server peak RSS: {result.peak_rss_mb:.0f} MB")
    print(
        f"load average at the end: {load_average()} (a shared machine's figures are not a quiet one's)"
    )

    if args.em_instances <= 0:
        return
    instances = completion_instances(args.repo, args.em_instances, args.since, args.seed)
    backend = LlamaBackend(args.model, LlamaOptions(threads=args.threads))

    def engine(heal: bool) -> CompletionEngine:
        options = EngineOptions(max_tokens=48, max_latency_ms=20_000, multiline="never", heal=heal)
        return CompletionEngine(backend, BASE.fim, False, options)

    healed = exact_match(engine(True), instances)
    raw = exact_match(engine(False), instances)
    print(
        f"\nexact match on {len(instances)} masked lines (prefix-only, default base): "
        f"with healing {healed:.1f}%, raw prefix {raw:.1f}% "
        f"({healed - raw:+.1f} points)"
    )


if __name__ == "__main__":
    main()
