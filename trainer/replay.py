"""The replay buffer of general code mixed into training against forgetting.

Default source, offline and real: the Python standard library of the running
interpreter, minus the files the retention test holds out
(`shoptalk.trainer.retention.replay_files`). Users can add corpus folders
(`train.replay_dirs`); their source files of the languages the module map
knows (Python, Java, Go, JavaScript, TypeScript) are used.

Replay instances are completions in the mining format with the cursor at an
arbitrary character of a line (inside a word, after a space), so replay
trains the same FIM task the team data does, on general code.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from shoptalk.models.errors import ShopTalkError
from shoptalk.models.module_map import language_for
from shoptalk.models.prompt import clip_context
from shoptalk.trainer.retention import replay_files, stdlib_dir

# Per file, at most this many instances, so one huge module does not dominate.
PER_FILE = 3
MAX_FILE_BYTES = 400_000
MIN_LINE_TOKENS = 3
_SKIPPED_DIRS = frozenset(
    {".git", "node_modules", "vendor", "third_party", "__pycache__", "dist", "build"}
)


class ReplayError(ShopTalkError):
    pass


def corpus_files(extra_dirs: Sequence[Path] = (), include_stdlib: bool = True) -> list[Path]:
    """The replay corpus: stdlib replay files, then source files under `extra_dirs`."""
    files: list[Path] = list(replay_files()) if include_stdlib else []
    for root in extra_dirs:
        folder = root.expanduser()
        if not folder.is_dir():
            raise ReplayError(
                f"replay corpus folder {folder} does not exist; fix train.replay_dirs or remove it"
            )
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder)
            if _SKIPPED_DIRS & set(rel.parts[:-1]) or any(p.startswith(".") for p in rel.parts):
                continue
            if path.is_file() and language_for(path.name) is not None:
                files.append(path)
    return files


def _label(path: Path) -> str:
    try:
        return "stdlib/" + path.relative_to(stdlib_dir()).as_posix()
    except ValueError:
        return path.as_posix()


def replay_records(
    count: int,
    prefix_chars: int,
    suffix_chars: int,
    seed: int = 0,
    extra_dirs: Sequence[Path] = (),
    include_stdlib: bool = True,
) -> list[dict[str, Any]]:
    """Up to `count` general completion records (mining format, kind
    `completion`, repo `general:replay`), reproducible by `seed`."""
    if count <= 0:
        return []
    files = corpus_files(extra_dirs, include_stdlib)
    rng = random.Random(seed)
    rng.shuffle(files)
    records: list[dict[str, Any]] = []
    for path in files:
        if len(records) >= count:
            break
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                continue
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        lines = text.splitlines(keepends=True)
        candidates = [
            i
            for i, line in enumerate(lines)
            if len(line.split()) >= MIN_LINE_TOKENS and not line.lstrip().startswith(("#", "//"))
        ]
        offsets = [0]
        for line in lines:
            offsets.append(offsets[-1] + len(line))
        for index in sorted(rng.sample(candidates, min(PER_FILE, len(candidates)))):
            line = lines[index].rstrip("\r\n")
            first = len(line) - len(line.lstrip())
            end = len(line.rstrip())
            if end - first < 2:
                continue
            cursor = rng.randint(first + 1, end - 1)
            start = offsets[index] + cursor
            target = line[cursor:end]
            parts = clip_context(
                text[:start], text[start + len(target) :], prefix_chars, suffix_chars
            )
            records.append(
                {
                    "id": f"replay-{len(records)}",
                    "kind": "completion",
                    "split": "train",
                    "repo": "general:replay",
                    "path": _label(path),
                    "language": language_for(path.name),
                    "prefix": parts.prefix,
                    "target": target,
                    "suffix": parts.suffix,
                    "line": index + 1,
                }
            )
            if len(records) >= count:
                break
    return records
