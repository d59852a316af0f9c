"""`shoptalk mine`: a repository's git history → a clean, time-split dataset.

Entry point for other stages (the watcher calls it after each commit):
`mine_repository(repo, settings, data_dir)`. It

1. lists the branch's non-merge commits (one cheap `git log` pass) and skips
   bot authors and mass changes (more files than Q3 + k·IQR);
2. streams the patches of the commits it has not mined yet (`git log -p`
   over stdin, `git cat-file --batch` for contents) and turns them into
   instances (`shoptalk.trainer.instances`), scrubbing secrets first;
3. keeps the scrubbed instances in a per-branch state folder of the repo's
   store, so the next run only reads new commits; commits that left the
   branch (a rebase) take their instances with them and their replacements
   are mined — nothing is duplicated;
4. builds the dataset from all kept instances: author ids (aliases merged),
   temporal splits, test/train dedup, module balance; then writes the shards
   and manifest into a temp folder renamed into place (all or nothing).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import stat
import statistics
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoptalk.models.errors import ShopTalkError
from shoptalk.models.files import atomic_dir, atomic_open, sha256_file, write_json_atomic
from shoptalk.models.progress import Progress, Report, quiet
from shoptalk.models.settings import MineSettings
from shoptalk.models.store import RepoStore
from shoptalk.trainer.authors import Alias, AliasFileError, is_bot, merge_aliases
from shoptalk.trainer.git_log import (
    BlobReader,
    Commit,
    CommitSummary,
    FileChange,
    GitError,
    is_text_path,
    iso_utc,
    iter_commits,
    list_commits,
    run_git,
    tree_paths,
)
from shoptalk.trainer.hygiene import (
    SecretScrubber,
    cap_module_share,
    has_placeholder,
    remove_test_overlap,
)
from shoptalk.trainer.instances import (
    SourceFile,
    added_lines,
    clean_message,
    commit_message_instance,
    completion_instances,
    diff_text,
    doc_modules_instance,
    docstring_lookup_instances,
    message_lookup_instance,
    test_pair_instances,
)
from shoptalk.trainer.source_files import (
    SkipRules,
    decode_source,
    is_doc_file,
    is_test_file,
    language_of,
    parse_ignore_file,
)
from shoptalk.trainer.splits import CommitPoint, parse_cutoff, plan_splits

log = logging.getLogger(__name__)

# Bump when instance extraction changes: cached instances are then re-mined.
# 2: exact paths (git quoting, no trailing tab); 3: secrets scrubbed in every field
EXTRACTION_VERSION = 3
STATE_VERSION = 1
IGNORE_FILE = ".shoptalkignore"
MIN_MASS_CHANGE_FILES = 20
KINDS = ("completion", "module_lookup", "commit_message", "test_pair", "doc_modules")
SPLIT_NAMES = ("train", "validation", "test")
# Fields a record carries only until the dataset is built.
_INTERNAL = ("author_name", "author_email", "author_time")
# Fields of an instance that hold no text from the repository (everything
# else — texts, path, module ids, symbol — is scrubbed for secrets).
_STRUCTURAL_FIELDS = frozenset(
    {"id", "kind", "split", "commit", "author_id", "author_time", "author_date", "language"}
    | {"source", "line", "masked_tokens", "modification"}
)
# The manifest names its producer, so that only a folder ShopTalk wrote is
# ever replaced (`--out`); older datasets are known by the keys they hold.
DATASET_PRODUCER = "shoptalk mine"
_LEGACY_MANIFEST_KEYS = frozenset(
    {"format", "repo", "repo_name", "branch", "head", "cutoff", "counts", "shards"}
)
_SHARD_NAME = re.compile(r"\A[a-z_]+\.(?:train|validation|test)\.jsonl\Z")


class MineError(ShopTalkError):
    """The repository or the request cannot be mined as asked."""


@dataclass
class MineResult:
    dataset_dir: Path
    manifest: dict[str, Any]
    new_commits: int  # commits read this run (mined or skipped)
    new_instances: int  # instances mined from them, before splitting
    removed_commits: int  # commits that left the branch (rewritten history)
    full: bool  # everything was (re)mined
    warnings: list[str] = field(default_factory=list)


# ---- the repository -------------------------------------------------------------


def _toplevel(repo: Path) -> Path:
    if not repo.exists():
        raise MineError(f"{repo} does not exist; pass --repo with the path of a git repository")
    if not repo.is_dir():
        raise MineError(f"{repo} is not a folder; pass --repo with the path of a git repository")
    inside = run_git(repo, "rev-parse", "--is-inside-work-tree", check=False).strip()
    bare = run_git(repo, "rev-parse", "--is-bare-repository", check=False).strip()
    if inside != "true" and bare != "true":
        raise MineError(
            f"{repo} is not a git repository (no .git found); run `git init` there "
            "or point --repo at a clone"
        )
    if bare == "true":
        return repo.resolve()
    top = run_git(repo, "rev-parse", "--show-toplevel").strip()
    return Path(top).resolve()


def _resolve_branch(repo: Path, branch: str | None) -> tuple[str, str]:
    """(branch name, the commit it points at)."""
    if branch is None:
        head = run_git(repo, "symbolic-ref", "-q", "--short", "HEAD", check=False).strip()
        if not head:
            sha = run_git(repo, "rev-parse", "--short", "HEAD", check=False).strip()
            raise MineError(
                f"HEAD of {repo} is detached (at {sha or 'an unknown commit'}); "
                "pass --branch NAME to say which branch to mine"
            )
        branch = head
    sha = run_git(repo, "rev-parse", "-q", "--verify", f"{branch}^{{commit}}", check=False).strip()
    if not sha:
        if not run_git(repo, "rev-parse", "-q", "--verify", "HEAD", check=False).strip():
            raise MineError(f"{repo} has no commits yet; commit something, then mine it")
        known = run_git(repo, "for-each-ref", "--format=%(refname:short)", "refs/heads").split()
        raise MineError(
            f"branch {branch!r} does not exist in {repo}; known branches: "
            f"{', '.join(known[:20]) or '(none)'}"
        )
    return branch, sha


def _is_shallow(repo: Path) -> bool:
    return run_git(repo, "rev-parse", "--is-shallow-repository", check=False).strip() == "true"


def _ignore_text(repo: Path, rev: str, warnings: list[str]) -> str:
    """`.shoptalkignore` of the working tree (never followed out of the
    repository), else the one committed on the branch."""
    on_disk = repo / IGNORE_FILE
    if on_disk.exists() or on_disk.is_symlink():
        try:
            resolved = on_disk.resolve()
        except (OSError, RuntimeError):  # a symlink loop
            resolved = on_disk
        if not resolved.is_relative_to(repo):
            warnings.append(f"{on_disk} points outside the repository; ignoring it")
            return ""
        if not resolved.is_file():
            warnings.append(f"{on_disk} is not a readable file; ignoring it")
            return ""
        try:
            return resolved.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            warnings.append(f"cannot read {on_disk}: {exc.strerror}; ignoring it")
    # (a blob only: a folder of that name gives nothing)
    return run_git(repo, "cat-file", "blob", f"{rev}:{IGNORE_FILE}", check=False)


def _alias_file(settings: MineSettings) -> Path | None:
    if settings.alias_file is None:
        return None
    path = settings.alias_file.expanduser()
    if not path.is_file():
        raise AliasFileError(
            f"alias file {path} does not exist; fix [mine] alias_file (it uses the "
            ".mailmap format: `Proper Name <proper@email> Other Name <other@email>`)"
        )
    return path.resolve()


def _config_hash(settings: MineSettings, ignore_text: str, alias_file: Path | None) -> str:
    """What changes the per-commit instances; a change re-mines everything.
    (Splits, dedup and balance are recomputed on every run anyway.)"""
    keys = (
        "bot_patterns",
        "mass_change_iqr_factor",
        "max_file_bytes",
        "max_line_chars",
        "ignore_globs",
        "secrets",
        "kinds",
        "max_instances_per_commit",
        "prefix_chars",
        "suffix_chars",
        "seed",
    )
    data: dict[str, Any] = {k: getattr(settings, k) for k in keys}
    data["extraction_version"] = EXTRACTION_VERSION
    data["ignore"] = ignore_text
    data["aliases"] = alias_file.read_text(errors="replace") if alias_file else ""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def mass_change_threshold(counts: list[int], factor: float) -> float:
    """Q3 + factor·IQR of files touched per commit (inf for tiny histories),
    never below MIN_MASS_CHANGE_FILES: where most commits touch one or two
    files the IQR is ~0, and the bare rule would skip every ordinary feature."""
    if len(counts) < 4:
        return float("inf")
    q1, _, q3 = statistics.quantiles(counts, n=4, method="inclusive")
    return max(float(MIN_MASS_CHANGE_FILES), q3 + factor * (q3 - q1))


# ---- state: what was mined already ------------------------------------------------


def _branch_key(branch: str, label: str) -> str:
    """The state folder's name: readable from `label` (the branch name with
    any secret replaced), unique by a hash of the name itself."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in label)[:60]
    return f"{safe}-{hashlib.sha1(branch.encode()).hexdigest()[:8]}"


@dataclass
class MineState:
    """Per repository + branch: commits seen (with what mining them gave) and
    the batch files holding their scrubbed instances."""

    directory: Path
    config_hash: str
    mass_threshold: float
    commits: dict[str, dict[str, Any]] = field(default_factory=dict)
    batches: list[str] = field(default_factory=list)

    @property
    def file(self) -> Path:
        return self.directory / "state.json"

    @classmethod
    def load(cls, directory: Path) -> MineState | None:
        try:
            data = json.loads((directory / "state.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        if data.get("version") != STATE_VERSION:
            return None
        threshold = data.get("mass_threshold")
        return cls(
            directory=directory,
            config_hash=data["config_hash"],
            mass_threshold=float("inf") if threshold is None else float(threshold),
            commits=data["commits"],
            batches=data["batches"],
        )

    def save(self, repo: Path, branch: str) -> None:
        threshold = None if self.mass_threshold == float("inf") else self.mass_threshold
        write_json_atomic(
            self.file,
            {
                "version": STATE_VERSION,
                "repo": str(repo),
                "branch": branch,
                "config_hash": self.config_hash,
                "mass_threshold": threshold,
                "commits": self.commits,
                "batches": self.batches,
            },
        )

    def records(self) -> Iterator[dict[str, Any]]:
        for name in self.batches:
            with (self.directory / name).open(encoding="utf-8") as handle:
                for line in handle:
                    if line.strip():
                        yield json.loads(line)

    def write_batch(self, records: Iterable[dict[str, Any]]) -> str:
        name = f"batch-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:12]}.jsonl"
        with atomic_open(self.directory / name) as handle:
            for record in records:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        return name

    def remove_stray_batches(self) -> None:
        """Delete batch files the state does not name: replaced ones, and any
        a killed run wrote before its state (their commits get mined again)."""
        for path in self.directory.glob("batch-*.jsonl"):
            if path.name not in self.batches:
                path.unlink(missing_ok=True)


# ---- mining one commit -----------------------------------------------------------


@dataclass
class _Context:
    repo: Path
    settings: MineSettings
    rules: SkipRules
    blobs: BlobReader
    scrubber: SecretScrubber
    package_files: frozenset[str]  # the tip's `__init__.py` files (Python module ids)
    module_of_path: dict[str, str]


def _holds_placeholder(value: Any) -> bool:
    if isinstance(value, str):
        return has_placeholder(value)
    return isinstance(value, list) and any(_holds_placeholder(v) for v in value)


def _scrub_record(record: dict[str, Any], scrubber: SecretScrubber) -> bool:
    """Scrub every field of an instance but its structural ones (ids, shas,
    dates, numbers): texts, path, module ids, symbol — and replace there any
    secret found elsewhere in the commit. True when it holds a placeholder."""
    context = str(record.get("path", ""))
    touched = False
    for name, value in record.items():
        if name in _STRUCTURAL_FIELDS or not isinstance(value, str | list):
            continue
        record[name] = scrubber.scrub_value(value, context)
        touched = touched or _holds_placeholder(record[name])
    return touched


def _path_secrets(changes: list[FileChange], scrubber: SecretScrubber) -> Counter[str]:
    """Secrets in the names of files a commit adds or renames (counted once,
    by that commit; the names are replaced in every field later)."""
    found: Counter[str] = Counter()
    for change in changes:
        if change.new_path is not None and (change.old_path is None or change.renamed):
            found.update(scrubber.scrub(change.new_path, change.new_path)[1])
    return found


def _mine_commit(commit: Commit, ctx: _Context) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Instances of one commit and what happened to its files and secrets."""
    settings = ctx.settings
    kinds = set(settings.kinds)
    skipped: Counter[str] = Counter()
    ctx.scrubber.forget()  # secrets of earlier commits are not looked for here
    secrets: Counter[str] = _path_secrets(commit.files, ctx.scrubber)
    sources: list[SourceFile] = []
    docs: list[SourceFile] = []
    diff_changes: list[FileChange] = []
    touched_modules: set[str] = set()
    read_paths: set[str] = set()
    # Module ids of Python files depend only on where `__init__.py` files are:
    # the tip's, plus those this commit adds (a small set, not the whole tree).
    package_files = ctx.package_files | {
        c.new_path
        for c in commit.files
        if c.new_path is not None
        and c.new_path.endswith("__init__.py")
        and is_text_path(c.new_path)
    }
    for change in commit.files:
        reason = _change_skip_reason(change, ctx.rules)
        if reason:
            skipped[reason] += 1
            continue
        path = change.path
        if change.new_path is None or not change.hunks or not change.new_blob:
            diff_changes.append(change)
            continue  # deleted, or renamed/mode change without new lines
        language = language_of(path)
        is_doc = is_doc_file(path)
        if language is None and not is_doc:
            # Not read (configs, data): its lines still belong to the diff,
            # unless they are minified/huge ones no prompt should carry.
            longest = max(len(line) for h in change.hunks for line in (*h.added, *h.removed, ""))
            if longest <= ctx.rules.max_line_chars:
                diff_changes.append(change)
            continue
        data = ctx.blobs.read(change.new_blob, ctx.rules.max_file_bytes)
        if data is None:
            skipped["huge"] += 1
            continue
        content_reason = ctx.rules.content_reason(data)
        if content_reason:
            skipped[content_reason] += 1
            continue
        text = decode_source(data)
        if text is None:
            skipped["encoding"] += 1
            continue
        diff_changes.append(change)
        read_paths.add(path)
        added = {a.line for a in added_lines(change.hunks)}
        text, found = ctx.scrubber.scrub(text, path, count_lines=added)
        secrets.update(found)
        source = SourceFile(change, path, language, text, package_files)
        if is_doc and language is None:
            docs.append(source)
            continue
        sources.append(source)
        module = ctx.module_of_path.get(path)
        if module is None and source.summary is not None:
            module = source.summary.module_id
        if module:
            touched_modules.add(module)
    records: list[dict[str, Any]] = []
    if "completion" in kinds:
        records += completion_instances(
            commit,
            sources,
            settings.seed,
            settings.prefix_chars,
            settings.suffix_chars,
            settings.max_instances_per_commit,
        )
    message, message_secrets = ctx.scrubber.scrub(clean_message(commit.message), "COMMIT_EDITMSG")
    secrets.update(message_secrets)
    budget = settings.prefix_chars + settings.suffix_chars
    if "commit_message" in kinds and diff_changes:
        diff, found = _scrubbed_diff(diff_changes, read_paths, ctx.scrubber, budget)
        secrets.update(found)
        record = commit_message_instance(commit, diff_changes, message, diff, budget)
        if record:
            records.append(record)
    if "module_lookup" in kinds:
        first_path = sources[0].path if sources else (diff_changes[0].path if diff_changes else "")
        record = message_lookup_instance(commit, message, sorted(touched_modules), first_path)
        if record:
            records.append(record)
        for source in sources:
            records += docstring_lookup_instances(commit, source)
    if "test_pair" in kinds:
        records += test_pair_instances(commit, sources, is_test_file, settings.prefix_chars)
    if "doc_modules" in kinds:
        for doc in docs:
            record = doc_modules_instance(commit, doc, ctx.module_of_path, budget)
            if record:
                records.append(record)
    kept: list[dict[str, Any]] = []
    dropped = scrubbed = 0
    for record in records:
        # Every field of every instance is scanned again: contexts were cut
        # from scrubbed text, but paths, module ids and symbols were not, and a
        # secret found in one file is replaced wherever the commit repeats it.
        touched = _scrub_record(record, ctx.scrubber)
        if touched and settings.secrets == "drop":
            dropped += 1
            continue
        scrubbed += touched
        kept.append(record)
    stats = {
        "status": "mined",
        "instances": len(kept),
        "completions": sum(1 for r in kept if r["kind"] == "completion"),
        "skipped_files": dict(skipped),
        "secrets": dict(secrets),
        "secret_instances_dropped": dropped,
        "secret_instances_scrubbed": scrubbed,
    }
    return kept, stats


# Diff text scrubbed beyond the prompt's budget, for secrets a placeholder made shorter.
_DIFF_MARGIN_CHARS = 4096


def _scrubbed_diff(
    changes: list[FileChange], read_paths: set[str], scrubber: SecretScrubber, budget: int
) -> tuple[str, Counter[str]]:
    """The commit's diff, scrubbed, as far as the commit-message prompt can
    use it (`budget` characters plus a margin: a 100 MB data file is not
    scanned line by line for a prompt of a few thousand characters), and the
    secrets found in it. Files read whole had their secrets counted already;
    for the others (configs, data) the diff's added lines are where they show."""
    parts: list[str] = []
    found: Counter[str] = Counter()
    used = 0
    for change in changes:
        if used >= budget:
            break
        part = diff_text([change])
        limit = budget - used + _DIFF_MARGIN_CHARS
        if len(part) > limit:
            part = part[: part.rfind("\n", 0, limit) + 1] or part[:limit]
        plus = {
            n for n, line in enumerate(part.split("\n"), 1) if n > 2 and line.startswith("+")
        }  # lines 1-2 are the ---/+++ header
        count = set() if change.path in read_paths else plus
        clean, secrets = scrubber.scrub(part, change.path, count_lines=count)
        found.update(secrets)
        parts.append(clean)
        used += len(clean)
    return "".join(parts), found


def _change_skip_reason(change: FileChange, rules: SkipRules) -> str | None:
    if not all(is_text_path(p) for p in (change.old_path, change.new_path) if p):
        return "undecodable_path"  # a name that is not UTF-8 cannot be written out
    if change.is_submodule:
        return "submodule"
    if change.is_symlink:
        return "symlink"
    if change.binary:
        return "binary"
    return rules.path_reason(change.path)


def _module_index(known_paths: frozenset[str]) -> dict[str, str]:
    """Module id of every parsed file of the branch tip, by path (Java files
    by folder here: their declared package is read when they are mined)."""
    from shoptalk.models.module_map import language_for, module_id_for

    index: dict[str, str] = {}
    # A plain set: module_map copies any other iterable on every call.
    paths = set(known_paths)
    for path in paths:
        language = language_for(path)
        if language is not None and language != "java":
            index[path] = module_id_for(path, language, paths)
    return index


# ---- building the dataset ----------------------------------------------------------


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
    plan = plan_splits(
        points, settings.test_share, settings.validation_share, settings.test_per_author, cutoff
    )
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
    repo_name = _scrub_texts([repo.name])[0]  # every record carries it
    counts: dict[str, dict[str, int]] = {k: dict.fromkeys(SPLIT_NAMES, 0) for k in KINDS}
    by_author: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(SPLIT_NAMES, 0))
    by_language: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(SPLIT_NAMES, 0))
    for record in final:
        counts[record["kind"]][record["split"]] += 1
        by_author[record["author_id"]][record["split"]] += 1
        by_language[record["language"]][record["split"]] += 1
    shards: dict[str, dict[str, Any]] = {}
    folder_mode = _folder_mode(out_dir)
    with atomic_dir(out_dir) as tmp:
        os.chmod(tmp, folder_mode)
        handles: dict[str, Any] = {}
        try:
            for record in final:
                name = f"{record['kind']}.{record['split']}.jsonl"
                if name not in handles:
                    handles[name] = (tmp / name).open("w", encoding="utf-8")
                handles[name].write(json.dumps(_public(record, repo_name), ensure_ascii=False))
                handles[name].write("\n")
        finally:
            for handle in handles.values():
                handle.flush()
                os.fsync(handle.fileno())
                handle.close()
        for name in sorted(handles):
            kind, split = name.split(".")[:2]
            shards[name] = {"sha256": sha256_file(tmp / name), "records": counts[kind][split]}
        skipped_commits = Counter(
            info["status"] for info in commit_stats.values() if info["status"] != "mined"
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
                "mined_commits": len(mined),
                "since": settings.since,
                "until": settings.until,
            },
            "cutoff": iso_utc(plan.cutoff),
            "validation_from": iso_utc(plan.validation_from),
            "per_author_test_commits": plan.moved_to_test,
            "total": len(final),
            "counts": counts,
            "counts_by_author": dict(sorted(by_author.items())),
            "counts_by_language": dict(sorted(by_language.items())),
            "authors": {
                person.id: {
                    "names": person.names,
                    "emails": person.emails,
                    "commits": person.commits,
                }
                for person in {p.id: p for p in people.values()}.values()
            },
            "skipped_commits": dict(sorted(skipped_commits.items())),
            "mass_change_threshold": None
            if state.mass_threshold == float("inf")
            else state.mass_threshold,
            "skipped_files": _sum_counts(i.get("skipped_files", {}) for i in commit_stats.values()),
            "secrets": {
                "policy": settings.secrets,
                "found": _sum_counts(i.get("secrets", {}) for i in commit_stats.values()),
                "instances_dropped": sum(
                    int(i.get("secret_instances_dropped", 0)) for i in commit_stats.values()
                ),
                "instances_scrubbed": sum(
                    int(i.get("secret_instances_scrubbed", 0)) for i in commit_stats.values()
                ),
            },
            "dedup": {"exact": dedup.exact, "near": dedup.near, "by_kind": dedup.by_kind},
            "balance": {"cap": settings.module_share_cap, "train_by_module": balance},
            "config": json.loads(settings.model_dump_json()),
            "shards": shards,
            **extra,
        }
        manifest = _scrub_manifest(manifest)
        write_json_atomic(tmp / "manifest.json", manifest)
        os.chmod(tmp / "manifest.json", 0o666 & ~_umask())  # as the shards (not 0600)
    return manifest


# Manifest entries that hold no text from the repository's history: the
# user's own path and settings, hashes, dates and numbers (kept as they are:
# they identify the dataset).
_MANIFEST_AS_IS = frozenset(
    {"producer", "format", "repo", "head", "created_at", "commit_range", "cutoff"}
    | {"validation_from", "total", "mass_change_threshold", "config", "shards"}
)


def _scrub_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """Every other entry (branch, authors, warnings, module names...) with any
    secret replaced, keys included."""
    with SecretScrubber() as scrubber:
        return {
            key: value if key in _MANIFEST_AS_IS else scrubber.scrub_value(value, "manifest.json")
            for key, value in manifest.items()
        }


def _current_manifest(dataset_dir: Path, tip: str, settings: MineSettings) -> dict[str, Any] | None:
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
        and all(isinstance(n, str) and _SHARD_NAME.match(n) for n in shards)
    )


def _not_replaceable(folder: Path) -> str | None:
    """Why `folder` must not be replaced as a whole, or None when it is new,
    empty, or a dataset ShopTalk wrote holding nothing else."""
    if not folder.exists() and not folder.is_symlink():
        return None
    if not folder.is_dir():
        return "is not a folder"
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return None
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if not is_shoptalk_manifest(manifest):
        return "is not empty and is not a dataset ShopTalk wrote (no ShopTalk manifest.json)"
    others = [n for n in entries if n != "manifest.json" and not _SHARD_NAME.match(n)]
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        return f"holds a ShopTalk dataset but also files ShopTalk did not write ({shown})"
    return None


def _safe_out_dir(out_dir: Path, chosen: bool = True) -> None:
    """The dataset folder is replaced as a whole (the previous one moved aside
    to `.<name>.old` meanwhile): refuse when either holds anything ShopTalk
    did not write. `chosen`: the user named it (--out), else it is the
    repository's folder in the data dir."""
    fix = "pass a new or empty folder with --out" if chosen else "move them out of it"
    problem = _not_replaceable(out_dir)
    if problem:
        raise MineError(
            f"{out_dir} {problem}; nothing was changed: {fix} (the dataset folder is "
            "replaced as a whole)"
        )
    aside = out_dir.with_name(f".{out_dir.name}.old")
    problem = _not_replaceable(aside)
    if problem:
        raise MineError(
            f"{aside} {problem}; ShopTalk keeps the previous dataset under that name while "
            f"it replaces {out_dir.name}, so nothing was changed: move or rename it"
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


def _scrub_history_labels(
    summaries: list[CommitSummary], branch: str
) -> tuple[list[CommitSummary], str]:
    """Author names and emails, and the branch name, with any secret replaced:
    they reach the manifest, the alias cache and folder names (a token typed
    as an email address is a secret like any other)."""
    clean: dict[tuple[str, str], tuple[str, str]] = {}
    with SecretScrubber() as scrubber:
        for summary in summaries:
            key = (summary.author_name, summary.author_email)
            if key not in clean:
                clean[key] = (
                    scrubber.scrub_value(summary.author_name, "AUTHORS"),
                    scrubber.scrub_value(summary.author_email, "AUTHORS"),
                )
        label = scrubber.scrub_value(branch, "BRANCH")
    scrubbed: list[CommitSummary] = []
    for summary in summaries:
        name, email = clean[(summary.author_name, summary.author_email)]
        scrubbed.append(dataclasses.replace(summary, author_name=name, author_email=email))
    return scrubbed, label


def _scrub_texts(texts: list[str]) -> list[str]:
    """Messages for the user (warnings) with any secret replaced."""
    if not texts:
        return texts
    with SecretScrubber() as scrubber:
        return [scrubber.scrub_value(text, "WARNING") for text in texts]


# ---- the entry point -----------------------------------------------------------------


def mine_repository(
    repo: Path,
    settings: MineSettings,
    data_dir: Path,
    *,
    out_dir: Path | None = None,
    full: bool = False,
    report: Report = quiet,
) -> MineResult:
    """Mine `repo` (incrementally) and (re)write its dataset; see the module doc.

    `report` gets a `Progress(done, total)` of the commits read. Raises
    MineError/GitError (ShopTalkError) with a message for the user."""
    repo = _toplevel(repo.expanduser())
    warnings: list[str] = []
    branch, tip = _resolve_branch(repo, settings.branch)
    if _is_shallow(repo):
        warnings.append(
            f"{repo} is a shallow clone: its history is cut, so the dataset misses older "
            "commits (run `git fetch --unshallow` for all of it)"
        )
    if settings.cutoff:
        parse_cutoff(settings.cutoff)  # a bad date fails before any work
    alias_file = _alias_file(settings)
    target = out_dir.expanduser().resolve() if out_dir else None
    if target is not None:
        _safe_out_dir(target)
    ignore_text = _ignore_text(repo, tip, warnings)
    rules = SkipRules(
        globs=tuple(settings.ignore_globs),
        ignore_rules=tuple(parse_ignore_file(ignore_text)),
        max_file_bytes=settings.max_file_bytes,
        max_line_chars=settings.max_line_chars,
    )
    summaries = list_commits(repo, tip, settings.since, settings.until, alias_file)
    summaries, branch_label = _scrub_history_labels(summaries, branch)
    if not summaries:
        raise MineError(
            f"no commits to mine on {branch} of {repo} in the range asked "
            f"(since={settings.since}, until={settings.until}); widen the range"
        )
    store = RepoStore.for_repo(data_dir, repo)
    if target is None:
        _safe_out_dir(store.dataset_dir, chosen=False)
    state_dir = store.root / "mine-state" / _branch_key(branch, branch_label)
    config_hash = _config_hash(settings, ignore_text, alias_file)
    state = None if full else MineState.load(state_dir)
    fresh = state is None or state.config_hash != config_hash
    if state is None or fresh:
        if state is not None:
            log.info("mining settings changed since the last run: mining everything again")
        human = [
            s.files_touched
            for s in summaries
            if not is_bot(Alias(s.author_name, s.author_email), settings.bot_patterns)
        ]
        state = MineState(
            directory=state_dir,
            config_hash=config_hash,
            mass_threshold=mass_change_threshold(human, settings.mass_change_iqr_factor),
        )
    state_dir.mkdir(parents=True, exist_ok=True)
    current = {s.sha for s in summaries}
    removed = [sha for sha in state.commits if sha not in current]
    todo = [s for s in reversed(summaries) if s.sha not in state.commits]
    if removed:
        warnings.append(
            f"{len(removed)} commit(s) mined before are no longer on {branch} "
            "(rewritten history or a narrower range): their instances were dropped"
        )
    new_records: list[dict[str, Any]] = []
    to_read: list[CommitSummary] = []
    for summary in todo:
        if is_bot(Alias(summary.author_name, summary.author_email), settings.bot_patterns):
            state.commits[summary.sha] = {"status": "bot"}
        elif summary.files_touched > state.mass_threshold:
            state.commits[summary.sha] = {"status": "mass_change", "files": summary.files_touched}
        else:
            to_read.append(summary)
    if to_read:
        known_paths = frozenset(p for p in tree_paths(repo, tip) if is_text_path(p))
        with BlobReader(repo) as blobs, SecretScrubber() as scrubber:
            ctx = _Context(
                repo=repo,
                settings=settings,
                rules=rules,
                blobs=blobs,
                scrubber=scrubber,
                package_files=frozenset(p for p in known_paths if p.endswith("__init__.py")),
                module_of_path=_module_index(known_paths),
            )
            stream = iter_commits(repo, (s.sha for s in to_read), alias_file)
            for done, commit in enumerate(stream, 1):
                records, stats = _mine_commit(commit, ctx)
                new_records += records
                state.commits[commit.sha] = stats
                report(Progress(done, len(to_read)))
            missing = [s.sha for s in to_read if s.sha not in state.commits]
            if missing:
                raise GitError(f"git did not return {len(missing)} commit(s) of {branch}; retry")
    if removed:
        kept_records = [r for r in state.records() if r["commit"] in current]
        for sha in removed:
            del state.commits[sha]
        state.batches = [state.write_batch(kept_records)]
    if new_records:
        state.batches.append(state.write_batch(new_records))
    # The state names its batches; it is saved only after they are complete,
    # then files it no longer names (replaced, or left by a killed run) go.
    state.save(repo, branch_label)
    state.remove_stray_batches()
    warnings = _scrub_texts(warnings)
    dataset_dir = target or store.dataset_dir
    up_to_date = _current_manifest(dataset_dir, tip, settings)
    if up_to_date is not None and not todo and not removed and not fresh:
        # Nothing new on the branch and the same settings: the dataset on disk
        # is what a rebuild would write (the watcher calls this often).
        return MineResult(dataset_dir, up_to_date, 0, 0, 0, False, warnings)
    records = [r for r in state.records() if r["commit"] in current]
    extra = {
        "incremental": {
            "new_commits": len(todo),
            "new_instances": len(new_records),
            "removed_commits": len(removed),
            "full": fresh,
        },
        "warnings": warnings,
    }
    manifest = build_dataset(
        dataset_dir,
        records,
        summaries,
        state,
        settings,
        repo=repo,
        branch=branch_label,
        tip=tip,
        extra=extra,
    )
    return MineResult(
        dataset_dir=dataset_dir,
        manifest=manifest,
        new_commits=len(todo),
        new_instances=len(new_records),
        removed_commits=len(removed),
        full=fresh,
        warnings=warnings,
    )


def summary_table(manifest: dict[str, Any]) -> Any:
    from rich.table import Table

    from shoptalk.models.tables import counts_text

    table = Table(title=f"dataset of {manifest['repo_name']} ({manifest['branch']})")
    table.add_column("kind")
    for split in SPLIT_NAMES:
        table.add_column(split, justify="right")
    for kind, counts in manifest["counts"].items():
        table.add_row(kind, *(str(counts[s]) for s in SPLIT_NAMES))
    secrets = manifest["secrets"]
    table.caption = (
        f"cutoff {manifest['cutoff']} · {len(manifest['authors'])} authors · "
        f"secrets found {sum(secrets['found'].values())} ({secrets['policy']}) · "
        f"dedup removed {manifest['dedup']['exact']} exact + {manifest['dedup']['near']} near · "
        f"skipped commits: {counts_text(manifest['skipped_commits'])}"
    )
    return table
