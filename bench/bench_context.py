"""Benchmark: what the model sees — completion quality of the real server
over LSP, one configuration of `[serve]` context settings against another,
on a checkout of a public repository as of a date, with the newest later
commits as the test (the way an editor meets the product).

For each configuration a fresh `shoptalk serve --stdio` is started with the
checkout at the cutoff as its workspace (`rootUri`), the configuration as
`initializationOptions`, and the default model (or `--model`). Each test
instance is an added line of a commit after the cutoff, its last n
whitespace tokens masked (n in [3, min(50, T-1)], seeded: the product's own
`mask_span`); the file as of that commit, with the masked tail cut out of the
line, is opened at its real path, one inline completion is asked for at the
cut, and the answer is scored against the masked tail (exact match after
whitespace normalisation, edit similarity). The first configuration is the
baseline: every other one prints its difference with McNemar's exact test on
the same instances. By default the request latency budget is lifted so that
quality is measured apart from the machine's speed; `--budget-ms` keeps one.

    .venv/bin/python bench/bench_context.py --source /path/to/repo.git \
        --cutoff 2025-06-01 --limit 300 --configs today,file6k,snippets
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lsprotocol import types
from pygls.lsp.client import LanguageClient

from shoptalk.models.completion import offset_to_utf16
from shoptalk.models.module_map import language_for
from shoptalk.trainer.git_log import git_date
from shoptalk.trainer.instances import line_rng, mask_span
from shoptalk.trainer.metrics import edit_similarity, exact_match, mcnemar

# Named configurations: flat `[serve]` keys sent as initializationOptions.
CONFIGS: dict[str, dict[str, Any]] = {
    "today": {"prefix_chars": 1600, "suffix_chars": 400},
    "file3k": {"prefix_chars": 3500},
    "file6k": {"prefix_chars": 6000},
    "file8k": {"prefix_chars": 8000},
    "suffix": {"prefix_chars": 6000, "suffix_layout": "before"},
    "snippets": {
        "prefix_chars": 6000,
        "context_chars": 2000,
        "context_sources": ["snippets"],
    },
    "imports": {
        "prefix_chars": 6000,
        "context_chars": 2000,
        "context_sources": ["snippets", "imports"],
    },
    "copy": {"prefix_chars": 6000, "copy_channel": True},
    "all": {
        "prefix_chars": 6000,
        "suffix_layout": "before",
        "context_chars": 2000,
        "context_sources": ["snippets", "imports", "recent"],
        "copy_channel": True,
    },
    "ctx4k": {
        "prefix_chars": 6000,
        "suffix_layout": "before",
        "context_chars": 4000,
        "context_sources": ["snippets", "imports", "recent"],
        "copy_channel": True,
    },
    "defaults": {},
}

BOT = re.compile(r"(?i)(\[bot\]|dependabot|renovate|pre-commit-ci|github-actions)")


def git(repo: Path, *args: str, check: bool = True) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=check
    ).stdout


@dataclass
class Instance:
    commit: str
    path: str
    line: int  # 1-based, in the file as of `commit`
    text: str  # the document opened: the file with the masked tail cut out
    cursor: int  # offset of the cut
    target: str  # the masked tail


def checkout_at(source: Path, cutoff: str, root: Path) -> tuple[Path, str]:
    """A clone of `source` whose work tree is the last commit before `cutoff`."""
    repo = root / "repo"
    if not repo.exists():
        subprocess.run(["git", "clone", "-q", str(source), str(repo)], check=True)
    # From the default branch, not HEAD: HEAD is wherever the last run left it.
    tip = git(repo, "rev-parse", "--verify", "-q", "origin/HEAD", check=False).strip() or "HEAD"
    base = git(repo, "rev-list", "-1", f"--before={git_date(cutoff)}", tip).strip()
    if not base:
        raise SystemExit(f"no commit before {cutoff} in {source}")
    git(repo, "checkout", "-q", "--detach", base)
    return repo, base


def test_instances(repo: Path, base: str, limit: int, per_commit: int, seed: int) -> list[Instance]:
    """Added lines of the non-merge, non-bot commits after `base`, oldest commit
    first, at most `per_commit` from each (sampled, seeded); then `limit`
    spread evenly over them."""
    log = git(repo, "log", "--reverse", "--no-merges", "--format=%H%x00%an", f"{base}..origin/HEAD")
    pool: list[Instance] = []
    for row in log.splitlines():
        commit, author = row.split("\0", 1)
        if BOT.search(author):
            continue
        pool.extend(commit_instances(repo, commit, per_commit, seed))
    if len(pool) <= limit:
        return pool
    step = len(pool) / limit
    return [pool[int(i * step)] for i in range(limit)]


_HUNK = re.compile(r"^@@ -\d+(?:,\d+)? \+(\d+)(?:,(\d+))? @@")


def commit_instances(repo: Path, commit: str, per_commit: int, seed: int) -> list[Instance]:
    diff = git(repo, "diff", "-U0", "--no-renames", "--no-color", f"{commit}^", commit, check=False)
    added: list[tuple[str, int]] = []
    path = None
    for line in diff.splitlines():
        if line.startswith("+++ "):
            name = line[4:]
            path = name[2:] if name.startswith("b/") else None
            if path is not None and (language_for(path) is None or "/test" in f"/{path}"):
                path = None
        elif path is not None and (match := _HUNK.match(line)):
            start, count = int(match.group(1)), int(match.group(2) or "1")
            added.extend((path, start + offset) for offset in range(count))
    rng = random.Random(f"{seed}:{commit}")
    rng.shuffle(added)
    instances: list[Instance] = []
    texts: dict[str, str | None] = {}
    for path, number in added:
        if len(instances) >= per_commit:
            break
        if path not in texts:
            shown = subprocess.run(
                ["git", "-C", str(repo), "show", f"{commit}:{path}"], capture_output=True
            )
            try:
                texts[path] = shown.stdout.decode("utf-8") if shown.returncode == 0 else None
            except UnicodeDecodeError:
                texts[path] = None
        text = texts[path]
        if text is None:
            continue
        lines = text.splitlines(keepends=True)
        if number > len(lines):
            continue
        body = lines[number - 1].rstrip("\r\n")
        span = mask_span(body, line_rng(seed, commit, path, number))
        if span is None:
            continue
        start, end, _ = span
        line_start = sum(len(x) for x in lines[: number - 1])
        document = text[: line_start + start] + text[line_start + end :]
        instances.append(
            Instance(commit, path, number, document, line_start + start, body[start:end])
        )
    return instances


@dataclass
class Answer:
    prediction: str
    latency_ms: float


async def run_config(
    name: str,
    options: dict[str, Any],
    workspace: Path,
    instances: list[Instance],
    model: Path | None,
    data_dir: Path,
) -> list[Answer]:
    client = LanguageClient("bench-context", "1")

    @client.feature(types.WINDOW_SHOW_MESSAGE)
    def show(params: types.ShowMessageParams) -> None:
        print(f"[{name}] server says: {params.message}", file=sys.stderr)

    @client.feature(types.WINDOW_WORK_DONE_PROGRESS_CREATE)
    def create(params: Any) -> None:
        return None

    env = dict(os.environ, SHOPTALK_DATA_DIR=str(data_dir))
    args = ["-m", "shoptalk.models.cli", "serve", "--stdio", "--poll-seconds", "0"]
    if model is not None:
        args += ["--model", str(model)]
    await client.start_io(sys.executable, *args, env=env)
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
            workspace_folders=[types.WorkspaceFolder(uri=workspace.as_uri(), name="ws")],
            initialization_options=options,
        )
    )
    client.initialized(types.InitializedParams())
    while True:
        status: Any = await client.protocol.send_request_async("shoptalk/status", {})
        if not getattr(status, "loading", True):
            break
        await asyncio.sleep(0.2)
    answers: list[Answer] = []
    started = time.perf_counter()
    for number, instance in enumerate(instances):
        answers.append(await ask(client, workspace, instance, number))
        if (number + 1) % 25 == 0:
            done = sum(
                exact_match(a.prediction, i.target)
                for a, i in zip(answers, instances, strict=False)
            )
            rate = (time.perf_counter() - started) / (number + 1)
            print(
                f"  [{name}] {number + 1}/{len(instances)}  EM {100 * done / (number + 1):.1f}"
                f"  {rate:.1f} s/instance",
                file=sys.stderr,
            )
    await client.shutdown_async(None)
    client.exit(None)
    await asyncio.wait_for(server.wait(), 30)
    await client.stop()
    drainer.cancel()
    return answers


async def ask(client: LanguageClient, workspace: Path, instance: Instance, number: int) -> Answer:
    uri = (workspace / instance.path).as_uri()
    client.text_document_did_open(
        types.DidOpenTextDocumentParams(
            text_document=types.TextDocumentItem(
                uri=uri,
                language_id=language_for(instance.path) or "plaintext",
                version=number,
                text=instance.text,
            )
        )
    )
    line, character = offset_to_utf16(instance.text, instance.cursor)
    sent = time.perf_counter()
    result: Any = await client.protocol.send_request_async(
        types.TEXT_DOCUMENT_INLINE_COMPLETION,
        types.InlineCompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri),
            position=types.Position(line=line, character=character),
            context=types.InlineCompletionContext(
                trigger_kind=types.InlineCompletionTriggerKind.Invoked
            ),
        ),
    )
    latency = (time.perf_counter() - sent) * 1000
    client.text_document_did_close(
        types.DidCloseTextDocumentParams(text_document=types.TextDocumentIdentifier(uri=uri))
    )
    return Answer(suggestion_at_cursor(result, instance), latency)


def suggestion_at_cursor(result: Any, instance: Instance) -> str:
    """The text the editor would insert at the cursor, first line only."""
    items = getattr(result, "items", None) or []
    if not items:
        return ""
    item = items[0]
    text = item.insert_text if isinstance(item.insert_text, str) else item.insert_text.value
    if item.range is not None:
        # A range that starts before the cursor repeats what is already typed.
        line, character = offset_to_utf16(instance.text, instance.cursor)
        start = item.range.start
        if (start.line, start.character) < (line, character) and start.line == line:
            typed = character - start.character
            text = text[typed:]
    return text.split("\n", 1)[0]


def summarize(
    names: list[str], results: dict[str, list[Answer]], instances: list[Instance]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    baseline = [
        exact_match(a.prediction, i.target)
        for a, i in zip(results[names[0]], instances, strict=True)
    ]
    for name in names:
        answers = results[name]
        em = [exact_match(a.prediction, i.target) for a, i in zip(answers, instances, strict=True)]
        es = [
            edit_similarity(a.prediction, i.target) for a, i in zip(answers, instances, strict=True)
        ]
        latencies = sorted(a.latency_ms for a in answers)
        test = mcnemar(baseline, em)
        rows.append(
            {
                "config": name,
                "n": len(em),
                "exact_match": 100 * sum(em) / len(em),
                "edit_similarity": 100 * sum(es) / len(es),
                "delta_em": 100 * (sum(em) - sum(baseline)) / len(em),
                "mcnemar_p": test.p_value,
                "p50_ms": latencies[len(latencies) // 2],
                "p95_ms": latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source", type=Path, required=True, help="a git repository (bare is fine)"
    )
    parser.add_argument("--cutoff", required=True, help="workspace = last commit before this date")
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--per-commit", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", default="today,file6k,suffix,snippets,copy,all")
    parser.add_argument("--model", type=Path, default=None, help="GGUF (default: the base)")
    parser.add_argument("--budget-ms", type=int, default=120_000, help="max_latency_ms")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; known: {', '.join(CONFIGS)}")
    source = args.source.resolve()
    workdir = args.workdir or Path(tempfile.gettempdir()) / f"bench-context-{source.parent.name}"
    workdir.mkdir(parents=True, exist_ok=True)
    repo, base = checkout_at(source, args.cutoff, workdir)
    instances = test_instances(repo, base, args.limit, args.per_commit, args.seed)
    print(
        f"{source}: workspace at {base[:10]} (before {args.cutoff}); "
        f"{len(instances)} instances from later commits",
        file=sys.stderr,
    )
    data_dir = Path(tempfile.mkdtemp(prefix="bench-context-data-"))
    results: dict[str, list[Answer]] = {}
    for name in names:
        options = dict(CONFIGS[name])
        options.setdefault("max_latency_ms", args.budget_ms)
        results[name] = asyncio.run(
            run_config(name, options, repo, instances, args.model, data_dir)
        )
        if args.out is not None:  # each configuration's answers as soon as it ends
            write_results(args.out, list(results), results, instances)
    rows = summarize(names, results, instances)
    print(f"\n{source.parent.name}: {len(instances)} instances, baseline = {names[0]}")
    print(f"{'config':<10} {'EM':>6} {'ES':>6} {'dEM':>6} {'p':>7} {'p50 ms':>8} {'p95 ms':>8}")
    for row in rows:
        print(
            f"{row['config']:<10} {row['exact_match']:6.1f} {row['edit_similarity']:6.1f} "
            f"{row['delta_em']:+6.1f} {row['mcnemar_p']:7.3f} {row['p50_ms']:8.0f} "
            f"{row['p95_ms']:8.0f}"
        )
    if args.out is not None:
        write_results(args.out, names, results, instances)


def write_results(
    out: Path, names: list[str], results: dict[str, list[Answer]], instances: list[Instance]
) -> None:
    """The summary rows and every answer, as JSON."""
    detail = {
        name: [
            {**asdict(i), "text": None, "prediction": a.prediction, "latency_ms": a.latency_ms}
            for a, i in zip(results[name], instances, strict=True)
        ]
        for name in names
    }
    rows = summarize(names, results, instances)
    out.write_text(json.dumps({"rows": rows, "answers": detail}, indent=1))


if __name__ == "__main__":
    main()
