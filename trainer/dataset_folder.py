"""A mined dataset folder as the later stages read it (training, evaluation,
retraining, promotion): its `manifest.json`, typed, with one loader, and
its `<kind>.<split>.jsonl` shards. `shoptalk.trainer.mine` writes both; the
keys are listed in docs/architecture.md (Dataset).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoptalk.models.errors import ShopTalkError

MANIFEST_FILE = "manifest.json"
SPLITS = ("train", "validation", "test")


class DatasetError(ShopTalkError):
    pass


@dataclass(frozen=True)
class DatasetManifest:
    """A dataset's manifest as read: the fields other stages decide on, and
    the whole manifest as written (`data`, unchanged, for everything else)."""

    file: Path
    sha256: str  # of the file's bytes: what a run records as its dataset
    repo: str | None  # the repository mined ("general:..." for general code)
    head: str | None
    cutoff: str | None  # test instances are the commits at or after it
    mined_commits: int | None
    authors: dict[str, Any]  # author_id -> {names, emails, commits}
    data: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], file: Path, sha256: str) -> DatasetManifest:
        def text(key: str) -> str | None:
            value = data.get(key)
            return None if value is None else str(value)

        span = data.get("commit_range")
        mined = span.get("mined_commits") if isinstance(span, dict) else None
        authors = data.get("authors")
        return cls(
            file=file,
            sha256=sha256,
            repo=text("repo"),
            head=text("head"),
            cutoff=text("cutoff"),
            mined_commits=int(mined) if isinstance(mined, int | float) else None,
            authors=authors if isinstance(authors, dict) else {},
            data=data,
        )


def load_manifest(directory: Path, repo: Path | None = None) -> DatasetManifest:
    """The manifest of the dataset in `directory`; `DatasetError` (saying to
    mine, naming `repo` when given) when there is none or it is damaged."""
    file = directory / MANIFEST_FILE
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        where = f" of {repo}" if repo is not None else ""
        raise DatasetError(
            f"no mined dataset{where} at {directory}: run `shoptalk mine --repo "
            f"{repo or 'PATH'}` first"
        ) from None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise DatasetError(f"{file} is not valid JSON ({exc}); mine the repository again") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{file} holds no dataset manifest; mine the repository again")
    return DatasetManifest.from_dict(data, file, hashlib.sha256(raw).hexdigest())


def shard_path(directory: Path, kind: str, split: str) -> Path:
    return directory / f"{kind}.{split}.jsonl"


def shard_files(directory: Path) -> list[tuple[str, str, Path]]:
    """(kind, split, path) of every `<kind>.<split>.jsonl` shard, by name."""
    found = []
    for path in sorted(directory.glob("*.jsonl")):
        parts = path.name.split(".")
        if len(parts) == 3 and parts[1] in SPLITS:
            found.append((parts[0], parts[1], path))
    return found


def read_shard(path: Path) -> list[dict[str, Any]]:
    """The records of one shard ([] when it does not exist)."""
    records: list[dict[str, Any]] = []
    try:
        handle = path.open(encoding="utf-8")
    except FileNotFoundError:
        return records
    with handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                raise DatasetError(
                    f"{path}:{number} is not valid JSON; the dataset is damaged — "
                    "mine the repository again"
                ) from None
    return records


def read_split(directory: Path, split: str) -> list[dict[str, Any]]:
    """The records of one split, every kind (shards in name order)."""
    return [
        r for _kind, name, path in shard_files(directory) if name == split for r in read_shard(path)
    ]
