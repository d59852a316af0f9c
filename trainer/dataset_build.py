"""Building the dataset from all kept instances: author ids (aliases
merged), temporal splits, test/train dedup, module balance; then the shards
and manifest written into a temp folder renamed into place (all or nothing),
every text of the manifest scrubbed for secrets. Also what a dataset folder
ShopTalk wrote looks like (`is_shoptalk_manifest`, `SHARD_NAME`).

Used by `shoptalk.trainer.mine`; reads `shoptalk.trainer.mine_state`.
"""

from __future__ import annotations

import json
import os
import re
import stat
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoptalk.models.files import atomic_dir, sha256_file, write_json_atomic
from shoptalk.models.settings import MineSettings
from shoptalk.trainer.authors import Alias, merge_aliases
from shoptalk.trainer.git_log import CommitSummary, iso_utc
from shoptalk.trainer.hygiene import (
    DedupResult,
    SecretScrubber,
    cap_module_share,
    remove_test_overlap,
)
from shoptalk.trainer.mine_state import MineState
from shoptalk.trainer.splits import (
    CommitPoint,
    SplitPlan,
    WindowSizes,
    parse_cutoff,
    plan_splits,
)

KINDS = ("completion", "module_lookup", "commit_message", "test_pair", "doc_modules")
SPLIT_NAMES = ("train", "validation", "test")
# Fields a record carries only until the dataset is built.
_INTERNAL = ("author_name", "author_email", "author_time")
# The manifest names its producer, so that only a folder ShopTalk wrote is
# ever replaced (`--out`); older datasets are known by the keys they hold.
DATASET_PRODUCER = "shoptalk mine"
_LEGACY_MANIFEST_KEYS = frozenset(
    {"format", "repo", "repo_name", "branch", "head", "cutoff", "counts", "shards"}
)
SHARD_NAME = re.compile(r"\A[a-z_]+\.(?:train|validation|test)\.jsonl\Z")
# Manifest entries that hold no text from the repository's history: the
# user's own path and settings, hashes, dates and numbers (kept as they are:
# they identify the dataset).
_MANIFEST_AS_IS = frozenset(
    {"producer", "format", "repo", "head", "created_at", "commit_range", "cutoff"}
    | {"validation_from", "total", "mass_change_threshold", "config", "shards"}
)


def _assign_authors(
    records: list[dict[str, Any]],
    summaries: list[CommitSummary],
    bots: set[str],
    cache_file: Path | None = None,
) -> tuple[dict[Alias, Any], dict[str, str]]:
    first_seen: dict[Alias, int] = {}
    counts: Counter[Alias] = Counter()
    for summary in summaries:
        if summary.sha in bots:
            continue
        alias = Alias(summary.author_name, summary.author_email)
        first_seen[alias] = min(first_seen.get(alias, summary.author_time), summary.author_time)
        counts[alias] += 1
    people = merge_aliases(first_seen, dict(counts), cache_file)
    commit_author: dict[str, str] = {}
    for summary in summaries:
        person = people.get(Alias(summary.author_name, summary.author_email))
        if person is not None:
            commit_author[summary.sha] = person.id
    for record in records:
        record["author_id"] = commit_author.get(record["commit"], "unknown")
    return dict(people), commit_author


def _public(record: dict[str, Any], repo_name: str) -> dict[str, Any]:
    out = {k: v for k, v in record.items() if k not in _INTERNAL}
    out["repo"] = repo_name
    order = ["id", "kind", "split", "repo", "commit", "author_id", "author_date", "path"]
    return {k: out[k] for k in order if k in out} | {k: v for k, v in out.items() if k not in order}


def _sum_counts(items: Iterable[dict[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for item in items:
        total.update(item)
    return dict(sorted(total.items()))


@dataclass
class _Splits:
    """The records of the dataset, split, deduplicated and balanced, with
    what that did."""

    final: list[dict[str, Any]]
    people: dict[Alias, Any]  # authors.merge_aliases
    plan: SplitPlan
    mined: list[CommitSummary]
    commit_stats: dict[str, dict[str, Any]]
    dedup: DedupResult
    balance: dict[str, dict[str, Any]]


def build_dataset(
    out_dir: Path,
    records: list[dict[str, Any]],
    summaries: list[CommitSummary],
    state: MineState,
    settings: MineSettings,
    *,
    repo: Path,
    branch: str,
    tip: str,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Split, dedup, balance and write `records` to `out_dir` (atomically);
    returns the manifest."""
    splits = _split_records(records, summaries, state, settings)
    repo_name = scrub_texts([repo.name])[0]  # every record carries it
    counts, by_author, by_language = _counts(splits.final)
    folder_mode = _folder_mode(out_dir)
    with atomic_dir(out_dir) as tmp:
        os.chmod(tmp, folder_mode)
        shards = _write_shards(tmp, splits.final, repo_name, counts)
        manifest = {
            "producer": DATASET_PRODUCER,
            "format": 1,
            "repo": str(repo),
            "repo_name": repo_name,
            "branch": branch,
            "head": tip,
            "created_at": iso_utc(int(time.time())),
            "commit_range": {
                "first": iso_utc(min(s.author_time for s in summaries)),
                "last": iso_utc(max(s.author_time for s in summaries)),
                "commits": len(summaries),
                "mined_commits": len(splits.mined),
                "since": settings.since,
                "until": settings.until,
            },
            "cutoff": iso_utc(splits.plan.cutoff),
            "validation_from": iso_utc(splits.plan.validation_from),
            "per_author_test_commits": splits.plan.moved_to_test,
            "total": len(splits.final),
            "counts": counts,
            "counts_by_author": dict(sorted(by_author.items())),
            "counts_by_language": dict(sorted(by_language.items())),
            "authors": {
                person.id: {
                    "names": person.names,
                    "emails": person.emails,
                    "commits": person.commits,
                }
                for person in {p.id: p for p in splits.people.values()}.values()
            },
            **_commit_figures(splits.commit_stats, state, settings),
            "dedup": {
                "exact": splits.dedup.exact,
                "near": splits.dedup.near,
                "by_kind": splits.dedup.by_kind,
            },
            "balance": {"cap": settings.module_share_cap, "train_by_module": splits.balance},
            "config": json.loads(settings.model_dump_json()),
            "shards": shards,
            **extra,
        }
        manifest = _scrub_manifest(manifest)
        write_json_atomic(tmp / "manifest.json", manifest)
        os.chmod(tmp / "manifest.json", 0o666 & ~_umask())  # as the shards (not 0600)
    return manifest


def _split_records(
    records: list[dict[str, Any]],
    summaries: list[CommitSummary],
    state: MineState,
    settings: MineSettings,
) -> _Splits:
    """Author ids, the temporal split of every record, test overlap removed
    from train/validation, each kind's train share per module capped."""
    in_range = {s.sha for s in summaries}
    commit_stats = {sha: info for sha, info in state.commits.items() if sha in in_range}
    bots = {sha for sha, info in commit_stats.items() if info["status"] == "bot"}
    people, commit_author = _assign_authors(
        records, summaries, bots, state.directory / "gambit-cache.json"
    )
    mined = [s for s in summaries if commit_stats.get(s.sha, {}).get("status") == "mined"]
    points = [
        CommitPoint(
            s.sha,
            commit_author.get(s.sha, "unknown"),
            s.author_time,
            int(commit_stats[s.sha].get("completions", 0)),
        )
        for s in mined
    ]
    cutoff = parse_cutoff(settings.cutoff) if settings.cutoff else None
    sizes = WindowSizes(
        settings.test_instances,
        settings.validation_instances,
        settings.test_share,
        settings.validation_share,
    )
    plan = plan_splits(points, sizes, settings.test_per_author, cutoff)
    for record in records:
        record["split"] = plan.split_of.get(record["commit"], "train")
    test = [r for r in records if r["split"] == "test"]
    others = [r for r in records if r["split"] != "test"]
    dedup = remove_test_overlap(others, test)
    train_all = [r for r in dedup.kept if r["split"] == "train"]
    validation = [r for r in dedup.kept if r["split"] == "validation"]
    train: list[dict[str, Any]] = []
    balance: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        of_kind = [r for r in train_all if r["kind"] == kind]
        if of_kind:
            capped = cap_module_share(of_kind, settings.module_share_cap, settings.seed)
            train += capped.kept
            balance[kind] = {
                "applied": capped.applied,
                "reason": capped.reason,
                "modules": capped.distribution,
            }
    final = train + validation + test
    final.sort(key=lambda r: (r["kind"], r["split"], r["author_time"], r["id"]))
    return _Splits(final, people, plan, mined, commit_stats, dedup, balance)


Counts = dict[str, dict[str, int]]


def _counts(final: list[dict[str, Any]]) -> tuple[Counts, Counts, Counts]:
    """Records per split: by kind, by author, by language."""
    counts: Counts = {k: dict.fromkeys(SPLIT_NAMES, 0) for k in KINDS}
    by_author: Counts = defaultdict(lambda: dict.fromkeys(SPLIT_NAMES, 0))
    by_language: Counts = defaultdict(lambda: dict.fromkeys(SPLIT_NAMES, 0))
    for record in final:
        counts[record["kind"]][record["split"]] += 1
        by_author[record["author_id"]][record["split"]] += 1
        by_language[record["language"]][record["split"]] += 1
    return counts, by_author, by_language


def _write_shards(
    folder: Path, final: list[dict[str, Any]], repo_name: str, counts: Counts
) -> dict[str, dict[str, Any]]:
    """`<kind>.<split>.jsonl` files of the public records (synced to disk);
    returns each shard's sha256 and record count."""
    handles: dict[str, Any] = {}
    try:
        for record in final:
            name = f"{record['kind']}.{record['split']}.jsonl"
            if name not in handles:
                handles[name] = (folder / name).open("w", encoding="utf-8")
            handles[name].write(json.dumps(_public(record, repo_name), ensure_ascii=False))
            handles[name].write("\n")
    finally:
        for handle in handles.values():
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
    shards: dict[str, dict[str, Any]] = {}
    for name in sorted(handles):
        kind, split = name.split(".")[:2]
        shards[name] = {"sha256": sha256_file(folder / name), "records": counts[kind][split]}
    return shards


def _commit_figures(
    commit_stats: dict[str, dict[str, Any]], state: MineState, settings: MineSettings
) -> dict[str, Any]:
    """The manifest's entries summed over the commits: skipped commits and
    files, the mass-change threshold, the secrets found and what was done."""
    skipped_commits = Counter(
        info["status"] for info in commit_stats.values() if info["status"] != "mined"
    )
    stats = commit_stats.values()
    return {
        "skipped_commits": dict(sorted(skipped_commits.items())),
        "mass_change_threshold": None
        if state.mass_threshold == float("inf")
        else state.mass_threshold,
        "skipped_files": _sum_counts(i.get("skipped_files", {}) for i in stats),
        "secrets": {
            "policy": settings.secrets,
            "found": _sum_counts(i.get("secrets", {}) for i in stats),
            "instances_dropped": sum(int(i.get("secret_instances_dropped", 0)) for i in stats),
            "instances_scrubbed": sum(int(i.get("secret_instances_scrubbed", 0)) for i in stats),
        },
    }


def _scrub_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """Every other entry (branch, authors, warnings, module names...) with any
    secret replaced, keys included."""
    with SecretScrubber() as scrubber:
        return {
            key: value if key in _MANIFEST_AS_IS else scrubber.scrub_value(value, "manifest.json")
            for key, value in manifest.items()
        }


def current_manifest(dataset_dir: Path, tip: str, settings: MineSettings) -> dict[str, Any] | None:
    """The dataset's manifest when it was built from `tip` with these
    settings and all its shards are there; else None."""
    try:
        manifest: dict[str, Any] = json.loads((dataset_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("head") != tip or manifest.get("config") != json.loads(
        settings.model_dump_json()
    ):
        return None
    shards = manifest.get("shards", {})
    if not all((dataset_dir / name).is_file() for name in shards):
        return None
    return manifest


def is_shoptalk_manifest(manifest: object) -> bool:
    """Whether `manifest` is the manifest of a dataset `shoptalk mine` wrote:
    it carries DATASET_PRODUCER, or (written before that marker existed)
    format 1 with the keys mining has always written and shard names of
    `<kind>.<split>.jsonl`."""
    if not isinstance(manifest, dict):
        return False
    if manifest.get("producer") == DATASET_PRODUCER:
        return True
    shards = manifest.get("shards")
    return (
        manifest.get("format") == 1
        and manifest.keys() >= _LEGACY_MANIFEST_KEYS
        and isinstance(shards, dict)
        and all(isinstance(n, str) and SHARD_NAME.match(n) for n in shards)
    )


def _umask() -> int:
    """The process's umask, read without changing it where /proc tells it
    (setting and restoring it could give another thread's file mode 0o666)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _folder_mode(folder: Path) -> int:
    """The mode the rebuilt dataset folder gets: the one it has now, or the
    mode a new folder gets from the umask (never the temp folder's 0700)."""
    try:
        return stat.S_IMODE(folder.stat().st_mode)
    except OSError:
        return 0o777 & ~_umask()


def scrub_texts(texts: list[str]) -> list[str]:
    """Messages for the user (warnings) with any secret replaced."""
    if not texts:
        return texts
    with SecretScrubber() as scrubber:
        return [scrubber.scrub_value(text, "WARNING") for text in texts]
