"""Building the dataset from all kept instances: author ids (aliases
merged), temporal splits, test/train dedup, module balance; then the shards
and manifest written into a temp folder renamed into place (all or nothing),
every text of the manifest scrubbed for secrets. Also what a dataset folder
ShopTalk wrote looks like (`is_shoptalk_manifest`, `SHARD_NAME`).

Used by `shoptalk.trainer.mine`; reads `shoptalk.trainer.mine_state`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoptalk.models.files import (
    atomic_dir,
    partial_name,
    remove_stale_partials,
    sha256_file,
    write_json_atomic,
)
from shoptalk.models.settings import MineSettings
from shoptalk.trainer.authors import Alias, merge_aliases
from shoptalk.trainer.git_log import CommitSummary, iso_utc
from shoptalk.trainer.hygiene import (
    DedupResult,
    SecretScrubber,
    dedup_text,
    exact_key,
    module_cap_targets,
    module_sample,
    shingles,
    top_level_module,
)
from shoptalk.trainer.mine_state import BATCH_BYTES, BATCH_RECORDS, MineState
from shoptalk.trainer.spill_sort import SpillSort
from shoptalk.trainer.splits import (
    CommitPoint,
    SplitPlan,
    WindowSizes,
    parse_cutoff,
    plan_splits,
)

log = logging.getLogger(__name__)

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
# The folder of the sorted runs, beside the batches while the dataset is built.
_SORT_FOLDER = "dataset-sort"
_MANIFEST_AS_IS = frozenset(
    {"producer", "format", "repo", "head", "created_at", "commit_range", "cutoff"}
    | {"validation_from", "total", "mass_change_threshold", "config", "shards"}
)


def _assign_authors(
    summaries: list[CommitSummary],
    bots: set[str],
    cache_file: Path | None = None,
) -> tuple[dict[Alias, Any], dict[str, str]]:
    """The people behind the commits (aliases merged) and each commit's author id."""
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


Counts = dict[str, dict[str, int]]


@dataclass
class DatasetPlan:
    """What the dataset is made of before any record is read: the people,
    each commit's author and split, the commits mined."""

    people: dict[Alias, Any]  # authors.merge_aliases
    commit_author: dict[str, str]
    plan: SplitPlan
    mined: list[CommitSummary]
    commit_stats: dict[str, dict[str, Any]]

    def held_out_windows(self) -> set[str]:
        """The mined commits of the validation and test windows (at or after
        `validation_from`; not the older commits moved to test per author)."""
        start = self.plan.validation_from
        return {s.sha for s in self.mined if s.author_time >= start}


@dataclass
class _Written:
    """What writing the shards did: the records of each shard, counts, the
    test overlap removed and the module balance of train."""

    shards: dict[str, dict[str, Any]]
    total: int
    counts: Counts
    by_author: Counts
    by_language: Counts
    dedup: DedupResult
    balance: dict[str, dict[str, Any]]
    peak_records: int  # the most records (or their lines) held at once


def build_dataset(
    out_dir: Path,
    state: MineState,
    current: set[str],
    summaries: list[CommitSummary],
    settings: MineSettings,
    *,
    repo: Path,
    branch: str,
    tip: str,
    extra: dict[str, Any],
    max_records: int = BATCH_RECORDS,
    planned: DatasetPlan | None = None,
    context_commits: Collection[str] | None = None,
) -> dict[str, Any]:
    """Split, dedup, balance and write the state's records of the `current`
    commits to `out_dir` (atomically), in passes over the state's batches
    holding at most about `max_records` records; returns the manifest.
    `planned`: `plan_dataset` of these arguments, when the caller has it.
    `context_commits`: the commits whose completions keep their repository
    context (None: all); the others' is left out, as mined without it."""
    if planned is None:
        planned = plan_dataset(summaries, state, settings)
    repo_name = scrub_texts([repo.name])[0]  # every record carries it
    folder_mode = _folder_mode(out_dir)
    with atomic_dir(out_dir) as tmp:
        os.chmod(tmp, folder_mode)
        written = _write_dataset(
            tmp, state, current, planned, settings, repo_name, max_records, context_commits
        )
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
                "mined_commits": len(planned.mined),
                "since": settings.since,
                "until": settings.until,
            },
            "cutoff": iso_utc(planned.plan.cutoff),
            "validation_from": iso_utc(planned.plan.validation_from),
            "per_author_test_commits": planned.plan.moved_to_test,
            "total": written.total,
            "counts": written.counts,
            "counts_by_author": dict(sorted(written.by_author.items())),
            "counts_by_language": dict(sorted(written.by_language.items())),
            "authors": {
                person.id: {
                    "names": person.names,
                    "emails": person.emails,
                    "commits": person.commits,
                }
                for person in {p.id: p for p in planned.people.values()}.values()
            },
            **_commit_figures(planned.commit_stats, state, settings, context_commits),
            "dedup": {
                "exact": written.dedup.exact,
                "near": written.dedup.near,
                "by_kind": written.dedup.by_kind,
            },
            "balance": {"cap": settings.module_share_cap, "train_by_module": written.balance},
            "config": json.loads(settings.model_dump_json()),
            "shards": written.shards,
            **extra,
        }
        manifest = _scrub_manifest(manifest)
        write_json_atomic(tmp / "manifest.json", manifest)
        os.chmod(tmp / "manifest.json", 0o666 & ~_umask())  # as the shards (not 0600)
    log.debug("dataset built holding at most %d records at once", written.peak_records)
    return manifest


def plan_dataset(
    summaries: list[CommitSummary], state: MineState, settings: MineSettings
) -> DatasetPlan:
    """Author ids and the temporal split of every commit, from the commits'
    summaries and what mining each gave (no record is read)."""
    in_range = {s.sha for s in summaries}
    commit_stats = {sha: info for sha, info in state.commits.items() if sha in in_range}
    bots = {sha for sha, info in commit_stats.items() if info["status"] == "bot"}
    people, commit_author = _assign_authors(summaries, bots, state.directory / "gambit-cache.json")
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
    return DatasetPlan(people, commit_author, plan, mined, commit_stats)


def _write_dataset(
    folder: Path,
    state: MineState,
    current: set[str],
    planned: DatasetPlan,
    settings: MineSettings,
    repo_name: str,
    max_records: int,
    context_commits: Collection[str] | None = None,
) -> _Written:
    """Three passes: the test records' dedup keys; every record split, test
    overlap dropped, train counted per module, all sorted (spilling to
    disk); the sorted records, train capped per module, into the shards."""
    split_of = planned.plan.split_of
    overlap = TestOverlap(chunk=max_records)
    for record in state.records_of(current):
        if split_of.get(record["commit"], "train") == "test":
            overlap.add_test(record)
    overlap.index_tests()
    remove_stale_partials(state.directory, _SORT_FOLDER)
    sort_folder = partial_name(state.directory / _SORT_FOLDER)
    sort_folder.mkdir()
    try:
        sorter = SpillSort(sort_folder, max_records, BATCH_BYTES)
        modules = _sort_records(
            state, current, planned, overlap, sorter, repo_name, context_commits
        )
        balance, keep = _plan_balance(modules, settings)
        written = _write_sorted(folder, sorter, keep)
    finally:
        shutil.rmtree(sort_folder, ignore_errors=True)
    written.dedup, written.balance = overlap.result, balance
    written.peak_records = max(sorter.peak_entries, overlap.peak_pending)
    return written


# Train records per kind, then per top-level module, in the order they were read.
_Modules = dict[str, dict[str, int]]


def _sort_records(
    state: MineState,
    current: set[str],
    planned: DatasetPlan,
    overlap: TestOverlap,
    sorter: SpillSort,
    repo_name: str,
    context_commits: Collection[str] | None = None,
) -> _Modules:
    """Every record of `current` split, given its author id (its repository
    context left out unless its commit is in `context_commits`), dropped when
    it overlaps test, and added to `sorter` under the dataset's order (kind,
    split, author time, id; ties in the order mined); returns how many train
    records each kind has per module."""
    modules: _Modules = {}

    def add(record: dict[str, Any], position: int) -> None:
        kind, split = record["kind"], record["split"]
        module, index = "", 0
        if split == "train":
            module = top_level_module(str(record.get("path", "")))
            of_kind = modules.setdefault(kind, {})
            index = of_kind.get(module, 0)
            of_kind[module] = index + 1
        key = [kind, split, record["author_time"], record["id"], position]
        meta = [record["author_id"], record["language"], module, index]
        sorter.add(key, meta, json.dumps(_public(record, repo_name), ensure_ascii=False))

    records = enumerate(state.records_of(current))
    for position, record in records:
        record["split"] = planned.plan.split_of.get(record["commit"], "train")
        record["author_id"] = planned.commit_author.get(record["commit"], "unknown")
        if context_commits is not None and record["commit"] not in context_commits:
            record.pop("context", None)
        if record["split"] == "test":
            add(record, position)
        else:
            overlap.check(record, position, add)
    overlap.finish(add)
    return modules


def _plan_balance(
    modules: _Modules, settings: MineSettings
) -> tuple[dict[str, dict[str, Any]], dict[tuple[str, str], bytearray]]:
    """Each kind's train share per module capped (`hygiene.cap_module_share`):
    the manifest's entry, and for each module cut down, which of its records
    (by position among the kind's train records of the module) stay."""
    balance: dict[str, dict[str, Any]] = {}
    keep: dict[tuple[str, str], bytearray] = {}
    for kind in KINDS:
        sizes = modules.get(kind)
        if not sizes:
            continue
        targets, substantial = module_cap_targets(sizes, settings.module_share_cap)
        if targets is None:
            balance[kind] = {
                "applied": False,
                "reason": f"{substantial} substantial top-level module(s), fewer than 1/cap",
                "modules": {n: {"before": s, "after": s} for n, s in sorted(sizes.items())},
            }
            continue
        for name, size in sizes.items():
            if targets[name] < size:
                chosen = bytearray((size + 7) // 8)
                for index in module_sample(settings.seed, name, size, targets[name]):
                    chosen[index >> 3] |= 1 << (index & 7)
                keep[(kind, name)] = chosen
        balance[kind] = {
            "applied": True,
            "reason": f"{substantial} substantial top-level modules",
            "modules": {n: {"before": sizes[n], "after": targets[n]} for n in sorted(sizes)},
        }
    return balance, keep


def _write_sorted(
    folder: Path, sorter: SpillSort, keep: dict[tuple[str, str], bytearray]
) -> _Written:
    """`<kind>.<split>.jsonl` files of the sorted public records (synced to
    disk), train records of capped modules left out but those chosen."""
    counts: Counts = {k: dict.fromkeys(SPLIT_NAMES, 0) for k in KINDS}
    by_author: Counts = defaultdict(lambda: dict.fromkeys(SPLIT_NAMES, 0))
    by_language: Counts = defaultdict(lambda: dict.fromkeys(SPLIT_NAMES, 0))
    handles: dict[str, Any] = {}
    total = 0
    try:
        for key, (author_id, language, module, index), text in sorter.sorted():
            kind, split = key[0], key[1]
            chosen = keep.get((kind, module)) if split == "train" else None
            if chosen is not None and not chosen[index >> 3] & (1 << (index & 7)):
                continue
            name = f"{kind}.{split}.jsonl"
            if name not in handles:
                handles[name] = (folder / name).open("w", encoding="utf-8")
            handles[name].write(text + "\n")
            counts[kind][split] += 1
            by_author[author_id][split] += 1
            by_language[language][split] += 1
            total += 1
    finally:
        for handle in handles.values():
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
    shards: dict[str, dict[str, Any]] = {}
    for name in sorted(handles):
        kind, split = name.split(".")[:2]
        shards[name] = {"sha256": sha256_file(folder / name), "records": counts[kind][split]}
    return _Written(shards, total, counts, by_author, by_language, DedupResult([]), {}, 0)


class TestOverlap:
    """`hygiene.remove_test_overlap` in passes: the test records added first
    (`add_test`: their exact keys, MinHash LSH per kind), then each other
    record checked (`check`, in batches of MinHashes) and handed on when it
    equals no test record of its kind up to whitespace nor is near one."""

    __test__ = False  # not a pytest class
    CHUNK = 512

    def __init__(self, threshold: float = 0.8, num_perm: int = 64, chunk: int = CHUNK) -> None:
        from datasketch import MinHashLSH

        self._lsh_class = MinHashLSH
        self.threshold, self.num_perm = threshold, num_perm
        self.chunk = max(1, min(chunk, self.CHUNK))  # records checked (or indexed) at once
        self.exact_keys: set[tuple[str, str]] = set()
        self.indexes: dict[str, Any] = {}
        self._inserted: Counter[str] = Counter()
        self._tests: list[tuple[str, str]] = []
        self._pending: list[tuple[dict[str, Any], int, str]] = []
        self.peak_pending = 0
        self.result = DedupResult(kept=[])

    def _minhashes(self, texts: Iterable[str]) -> Iterator[Any]:
        from datasketch import MinHash

        return MinHash.generator((list(shingles(t)) for t in texts), num_perm=self.num_perm)

    def add_test(self, record: dict[str, Any]) -> None:
        kind, text = record["kind"], dedup_text(record)
        self.exact_keys.add((kind, exact_key(text)))
        self._tests.append((kind, text))
        if len(self._tests) >= self.chunk:
            self.index_tests()

    def index_tests(self) -> None:
        """Put the test records still pending into their kind's LSH index."""
        tests, self._tests = self._tests, []
        for (kind, _), minhash in zip(tests, self._minhashes(t for _, t in tests), strict=True):
            lsh = self.indexes.get(kind)
            if lsh is None:
                lsh = self.indexes[kind] = self._lsh_class(
                    threshold=self.threshold, num_perm=self.num_perm
                )
            lsh.insert(str(self._inserted[kind]), minhash)
            self._inserted[kind] += 1

    def check(
        self, record: dict[str, Any], position: int, keep: Callable[[dict[str, Any], int], None]
    ) -> None:
        self._pending.append((record, position, dedup_text(record)))
        self.peak_pending = max(self.peak_pending, len(self._pending))
        if len(self._pending) >= self.chunk:
            self.finish(keep)

    def finish(self, keep: Callable[[dict[str, Any], int], None]) -> None:
        """Check the records still pending."""
        pending, self._pending = self._pending, []
        minhashes = self._minhashes(text for _, _, text in pending)
        for (record, position, text), minhash in zip(pending, minhashes, strict=True):
            kind = record["kind"]
            counts = self.result.by_kind.setdefault(kind, {"exact": 0, "near": 0})
            if (kind, exact_key(text)) in self.exact_keys:
                self.result.exact += 1
                counts["exact"] += 1
                continue
            lsh = self.indexes.get(kind)
            if lsh is not None and lsh.query(minhash):
                self.result.near += 1
                counts["near"] += 1
                continue
            keep(record, position)


def _commit_figures(
    commit_stats: dict[str, dict[str, Any]],
    state: MineState,
    settings: MineSettings,
    context_commits: Collection[str] | None = None,
) -> dict[str, Any]:
    """The manifest's entries summed over the commits: skipped commits and
    files, the mass-change threshold, the secrets found and what was done
    (instances scrubbed only in a repository context left out are not counted)."""
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
            "instances_scrubbed": sum(
                int(info.get("secret_instances_scrubbed", 0))
                - (
                    0
                    if context_commits is None or sha in context_commits
                    else int(info.get("context_scrubbed", 0))
                )
                for sha, info in commit_stats.items()
            ),
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
