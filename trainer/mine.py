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

This module reads the history (steps 1-3); the state it keeps is
`shoptalk.trainer.mine_state`, and step 4 is `shoptalk.trainer.dataset_build`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import multiprocessing
import multiprocessing.util
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Collection, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shoptalk.models.context import mined_context
from shoptalk.models.errors import ShopTalkError
from shoptalk.models.exclusion import Exclusion
from shoptalk.models.progress import Progress, Report, quiet
from shoptalk.models.settings import MineSettings
from shoptalk.models.store import RepoStore
from shoptalk.models.workspace_index import IndexLimits
from shoptalk.trainer.authors import Alias, AliasFileError, is_bot
from shoptalk.trainer.commit_workspace import CommitWorkspace
from shoptalk.trainer.dataset_build import (
    SHARD_NAME,
    SPLIT_NAMES,
    DatasetPlan,
    build_dataset,
    current_manifest,
    is_shoptalk_manifest,
    plan_dataset,
    scrub_texts,
)
from shoptalk.trainer.git_log import (
    BlobReader,
    Commit,
    CommitSummary,
    FileChange,
    GitError,
    is_text_path,
    iter_commits,
    list_commits,
    run_git,
    tree_paths,
)
from shoptalk.trainer.hygiene import (
    SecretScrubber,
    has_placeholder,
)
from shoptalk.trainer.instances import (
    ContextOf,
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
from shoptalk.trainer.mine_state import (
    BATCH_RECORDS,
    BatchWriter,
    MineState,
    branch_key,
    mass_change_threshold,
)
from shoptalk.trainer.source_files import (
    SkipRules,
    decode_source,
    is_doc_file,
    is_test_file,
    language_of,
    parse_ignore_file,
)
from shoptalk.trainer.splits import parse_cutoff

log = logging.getLogger(__name__)

# Bump when instance extraction changes: cached instances are then re-mined.
# 2: exact paths (git quoting, no trailing tab); 3: secrets scrubbed in every field;
# 4: completions carry the parent commit's repository context; 5: that context scrubbed
EXTRACTION_VERSION = 5
IGNORE_FILE = ".shoptalkignore"
# Fields of an instance that hold no text from the repository (everything
# else — texts, path, module ids, symbol — is scrubbed for secrets).
_STRUCTURAL_FIELDS = frozenset(
    {"id", "kind", "split", "commit", "author_id", "author_time", "author_date", "language"}
    | {"source", "line", "masked_tokens", "modification"}
)


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
        "context",
    )
    data: dict[str, Any] = {k: getattr(settings, k) for k in keys}
    data["extraction_version"] = EXTRACTION_VERSION
    data["ignore"] = ignore_text
    data["aliases"] = alias_file.read_text(errors="replace") if alias_file else ""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


# ---- state: what was mined already ------------------------------------------------


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
    # The parent commit's files, for the completions' context (None: off).
    workspace: CommitWorkspace | None = None
    # The commits whose completions get that context (None: every commit).
    context_commits: Collection[str] | None = None


def _holds_placeholder(value: Any) -> bool:
    if isinstance(value, str):
        return has_placeholder(value)
    if isinstance(value, dict):
        return any(_holds_placeholder(k) or _holds_placeholder(v) for k, v in value.items())
    return isinstance(value, list) and any(_holds_placeholder(v) for v in value)


def _scrub_record(record: dict[str, Any], scrubber: SecretScrubber) -> tuple[bool, bool]:
    """Scrub every field of an instance but its structural ones (ids, shas,
    dates, numbers): texts, path, module ids, symbol — and replace there any
    secret found elsewhere in the commit. (The repository context of a
    completion, a dict of other files' texts read unscrubbed at the parent
    commit, is scrubbed like the rest.) Whether it holds a placeholder, and
    whether only in its repository context."""
    context = str(record.get("path", ""))
    outside = in_context = False
    for name, value in record.items():
        if name in _STRUCTURAL_FIELDS or not isinstance(value, str | list | dict):
            continue
        record[name] = scrubber.scrub_value(value, context)
        if name == "context":
            in_context = _holds_placeholder(record[name])
        else:
            outside = outside or _holds_placeholder(record[name])
    return outside or in_context, in_context and not outside


def _path_secrets(changes: list[FileChange], scrubber: SecretScrubber) -> Counter[str]:
    """Secrets in the names of files a commit adds or renames (counted once,
    by that commit; the names are replaced in every field later)."""
    found: Counter[str] = Counter()
    for change in changes:
        if change.new_path is not None and (change.old_path is None or change.renamed):
            found.update(scrubber.scrub(change.new_path, change.new_path)[1])
    return found


@dataclass
class _CommitFiles:
    """What one commit's files gave: the source and doc files read (secrets
    scrubbed), the changes that belong to its diff, the modules it touched."""

    sources: list[SourceFile] = field(default_factory=list)
    docs: list[SourceFile] = field(default_factory=list)
    diff_changes: list[FileChange] = field(default_factory=list)
    touched_modules: set[str] = field(default_factory=set)
    read_paths: set[str] = field(default_factory=set)


def _mine_commit(commit: Commit, ctx: _Context) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Instances of one commit and what happened to its files and secrets."""
    settings = ctx.settings
    skipped: Counter[str] = Counter()
    ctx.scrubber.forget()  # secrets of earlier commits are not looked for here
    secrets: Counter[str] = _path_secrets(commit.files, ctx.scrubber)
    files = _read_files(commit, ctx, skipped, secrets)
    records = _commit_instances(commit, ctx, files, secrets)
    kept: list[dict[str, Any]] = []
    dropped = scrubbed = context_scrubbed = 0
    for record in records:
        # Every field of every instance is scanned again: contexts were cut
        # from scrubbed text, but paths, module ids and symbols were not, and a
        # secret found in one file is replaced wherever the commit repeats it.
        touched, only_context = _scrub_record(record, ctx.scrubber)
        if touched and settings.secrets == "drop":
            dropped += 1
            continue
        scrubbed += touched
        context_scrubbed += only_context
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
    if ctx.workspace is not None:
        # Whether its completions carry their repository context; instances
        # scrubbed only there are not counted when the dataset leaves it out.
        stats["context"] = _with_context(commit, ctx)
        if context_scrubbed:
            stats["context_scrubbed"] = context_scrubbed
    return kept, stats


def _read_files(
    commit: Commit, ctx: _Context, skipped: Counter[str], secrets: Counter[str]
) -> _CommitFiles:
    """The commit's changed files, each skipped (counted in `skipped` by
    reason), kept for the diff only, or read and scrubbed (secrets counted)."""
    files = _CommitFiles()
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
            files.diff_changes.append(change)
            continue  # deleted, or renamed/mode change without new lines
        language = language_of(path)
        is_doc = is_doc_file(path)
        if language is None and not is_doc:
            # Not read (configs, data): its lines still belong to the diff,
            # unless they are minified/huge ones no prompt should carry.
            longest = max(len(line) for h in change.hunks for line in (*h.added, *h.removed, ""))
            if longest <= ctx.rules.max_line_chars:
                files.diff_changes.append(change)
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
        files.diff_changes.append(change)
        files.read_paths.add(path)
        added = {a.line for a in added_lines(change.hunks)}
        text, found = ctx.scrubber.scrub(text, path, count_lines=added)
        secrets.update(found)
        source = SourceFile(change, path, language, text, package_files)
        if is_doc and language is None:
            files.docs.append(source)
            continue
        files.sources.append(source)
        module = ctx.module_of_path.get(path)
        if module is None and source.summary is not None:
            module = source.summary.module_id
        if module:
            files.touched_modules.add(module)
    return files


def _commit_instances(
    commit: Commit, ctx: _Context, files: _CommitFiles, secrets: Counter[str]
) -> list[dict[str, Any]]:
    """The instances of each kind mined from the commit's files and message
    (the message and diff scrubbed, their secrets counted)."""
    settings = ctx.settings
    kinds = set(settings.kinds)
    sources, diff_changes = files.sources, files.diff_changes
    records: list[dict[str, Any]] = []
    if "completion" in kinds:
        records += completion_instances(
            commit,
            sources,
            settings.seed,
            settings.prefix_chars,
            settings.suffix_chars,
            settings.max_instances_per_commit,
            _context_of(commit, ctx),
        )
    message, message_secrets = ctx.scrubber.scrub(clean_message(commit.message), "COMMIT_EDITMSG")
    secrets.update(message_secrets)
    budget = settings.prefix_chars + settings.suffix_chars
    if "commit_message" in kinds and diff_changes:
        diff, found = _scrubbed_diff(diff_changes, files.read_paths, ctx.scrubber, budget)
        secrets.update(found)
        record = commit_message_instance(commit, diff_changes, message, diff, budget)
        if record:
            records.append(record)
    if "module_lookup" in kinds:
        first_path = sources[0].path if sources else (diff_changes[0].path if diff_changes else "")
        modules = sorted(files.touched_modules)
        record = message_lookup_instance(commit, message, modules, first_path)
        if record:
            records.append(record)
        for source in sources:
            records += docstring_lookup_instances(commit, source)
    if "test_pair" in kinds:
        records += test_pair_instances(commit, sources, is_test_file, settings.prefix_chars)
    if "doc_modules" in kinds:
        for doc in files.docs:
            record = doc_modules_instance(commit, doc, ctx.module_of_path, budget)
            if record:
                records.append(record)
    return records


def _context_of(commit: Commit, ctx: _Context) -> ContextOf | None:
    """The context of a cursor of `commit` as the server would build it over
    a checkout of the commit's parent (None: mining without context)."""
    if not _with_context(commit, ctx):
        return None
    moving = ctx.workspace
    assert moving is not None
    parent = commit.parents[0] if commit.parents else None
    settings = ctx.settings

    def context(path: str, prefix: str, suffix: str) -> dict[str, Any]:
        workspace = moving.at(parent)  # moved once, on the commit's first instance
        started = time.perf_counter()
        found = mined_context(
            workspace, path, prefix, suffix, settings.prefix_chars, settings.suffix_chars
        )
        moving.seconds += time.perf_counter() - started
        return found

    return context


def _with_context(commit: Commit, ctx: _Context) -> bool:
    if ctx.workspace is None:
        return False
    return ctx.context_commits is None or commit.sha in ctx.context_commits


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
    others = [n for n in entries if n != "manifest.json" and not SHARD_NAME.match(n)]
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


# ---- the entry point -----------------------------------------------------------------


def _open_state(
    state_dir: Path,
    config_hash: str,
    full: bool,
    summaries: list[CommitSummary],
    settings: MineSettings,
) -> tuple[MineState, bool]:
    """The branch's state, or a fresh one (with `full`, or when the settings
    that shape instances changed); True when fresh."""
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
    return state, fresh


@dataclass(frozen=True)
class _ReadPlan:
    """Where the commits to read are, and how to read them."""

    repo: Path
    tip: str
    branch: str
    settings: MineSettings
    rules: SkipRules
    alias_file: Path | None
    ignore_text: str = ""


# Mining in worker processes pays from this many commits (each opens its own
# git readers and scrubber); commits go to them in chunks of CHUNK_COMMITS.
PARALLEL_FROM = 256
CHUNK_COMMITS = 32


@dataclass(frozen=True)
class _MineSetup:
    """What mining a commit needs, for this process or a worker's."""

    plan: _ReadPlan
    package_files: frozenset[str]  # the tip's `__init__.py` files (Python module ids)
    module_of_path: dict[str, str]
    context_commits: frozenset[str] | None


def _open_context(setup: _MineSetup, stack: contextlib.ExitStack) -> _Context:
    """The readers, scrubber and workspace mining commits holds (closed with `stack`)."""
    plan, settings = setup.plan, setup.plan.settings
    blobs = stack.enter_context(BlobReader(plan.repo))
    workspace = None
    if settings.context and "completion" in settings.kinds:
        exclusion = Exclusion(plan.ignore_text, tuple(settings.ignore_globs))
        limits = IndexLimits(
            max_file_bytes=settings.max_file_bytes, max_line_chars=settings.max_line_chars
        )
        parent_blobs = stack.enter_context(BlobReader(plan.repo))
        workspace = CommitWorkspace(plan.repo, parent_blobs, exclusion, limits)
    return _Context(
        repo=plan.repo,
        settings=settings,
        rules=plan.rules,
        blobs=blobs,
        scrubber=stack.enter_context(SecretScrubber()),
        package_files=setup.package_files,
        module_of_path=setup.module_of_path,
        workspace=workspace,
        context_commits=setup.context_commits,
    )


_Mined = tuple[str, list[dict[str, Any]], dict[str, Any]]  # sha, records, stats


def _mine_stream(ctx: _Context, shas: list[str], alias_file: Path | None) -> Iterator[_Mined]:
    for commit in iter_commits(ctx.repo, shas, alias_file):
        yield commit.sha, *_mine_commit(commit, ctx)


def _mine_here(setup: _MineSetup, shas: list[str]) -> Iterator[_Mined]:
    with contextlib.ExitStack() as stack:
        ctx = _open_context(setup, stack)
        yield from _mine_stream(ctx, shas, setup.plan.alias_file)
        _log_context_cost(ctx)


def _log_context_cost(ctx: _Context) -> None:
    if ctx.workspace is not None:
        log.info(
            "repository context: %.1f s moving and searching (%d files read)",
            ctx.workspace.seconds,
            ctx.workspace.files_read,
        )


# A worker process's context, opened once by `_worker_start` (closed when it exits).
_WORKER: tuple[_Context, _MineSetup] | None = None


def _worker_start(setup: _MineSetup) -> None:
    global _WORKER
    stack = contextlib.ExitStack()
    _WORKER = (_open_context(setup, stack), setup)
    multiprocessing.util.Finalize(None, stack.close, exitpriority=10)


def _worker_mine(shas: list[str]) -> list[_Mined]:
    assert _WORKER is not None, "_worker_start runs first"
    ctx, setup = _WORKER
    return list(_mine_stream(ctx, shas, setup.plan.alias_file))


def _mine_in_workers(setup: _MineSetup, shas: list[str], workers: int) -> Iterator[_Mined]:
    """The commits mined by `workers` processes, each handed the next chunk
    of CHUNK_COMMITS when it is free; yielded in `shas` order. A commit's
    instances depend on nothing mined before it (the scrubber forgets
    between commits, the workspace is moved to its parent whatever it held),
    so the state and dataset are those of one process. Two chunks per
    worker at most are held (done or queued)."""
    chunks = [shas[i : i + CHUNK_COMMITS] for i in range(0, len(shas), CHUNK_COMMITS)]
    # Forked: a started ("spawn") worker runs the caller's main module again,
    # which hangs a script that calls mining without a `__main__` guard.
    fork = multiprocessing.get_context("fork")
    pool = ProcessPoolExecutor(workers, fork, initializer=_worker_start, initargs=(setup,))
    try:
        queued = iter(chunks)
        pending = deque(pool.submit(_worker_mine, c) for c in itertools.islice(queued, 2 * workers))
        while pending:
            mined = pending.popleft().result()
            following = next(queued, None)
            if following is not None:
                pending.append(pool.submit(_worker_mine, following))
            yield from mined
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def worker_count(settings: MineSettings, commits: int, parallel_from: int = PARALLEL_FROM) -> int:
    """Processes mining `commits` commits: `mine.workers` (no more than the
    CPUs or the chunks), one for fewer than `parallel_from` commits and off
    Linux (the workers are forked, which macOS does not make safe)."""
    if commits < parallel_from or not sys.platform.startswith("linux"):
        return 1
    return max(1, min(settings.workers, os.cpu_count() or 1, -(-commits // CHUNK_COMMITS)))


def _read_commits(
    plan: _ReadPlan,
    to_read: list[CommitSummary],
    writer: BatchWriter,
    report: Report,
    context_commits: Collection[str] | None = None,
    parallel_from: int = PARALLEL_FROM,
) -> None:
    """Mine each commit of `to_read` (`git log -p` streams, in worker
    processes for a long list), recording what each gave in the writer's
    state and streaming its instances into the state's batches, in
    `to_read` order; with `mine.context`, the completions of
    `context_commits` (None: all) carry their repository context. `report`
    gets a `Progress(done, total)` per commit."""
    state = writer.state
    known_paths = frozenset(p for p in tree_paths(plan.repo, plan.tip) if is_text_path(p))
    setup = _MineSetup(
        plan,
        frozenset(p for p in known_paths if p.endswith("__init__.py")),
        _module_index(known_paths),
        None if context_commits is None else frozenset(context_commits),
    )
    shas = [s.sha for s in to_read]
    workers = worker_count(plan.settings, len(shas), parallel_from)
    if workers > 1:
        log.info("mining %d commits in %d processes", len(shas), workers)
    mined = _mine_in_workers(setup, shas, workers) if workers > 1 else _mine_here(setup, shas)
    for done, (sha, records, stats) in enumerate(mined, 1):
        writer.add(records)
        # Named in the state with its records: both are saved together
        # when the batch is full (a killed run mines it again).
        state.commits[sha] = stats
        writer.end_commit()
        report(Progress(done, len(to_read)))
    missing = [s.sha for s in to_read if s.sha not in state.commits]
    if missing:
        raise GitError(f"git did not return {len(missing)} commit(s) of {plan.branch}; retry")


def _newest_commits(summaries: list[CommitSummary], settings: MineSettings) -> set[str] | None:
    """The commits whose completions carry their repository context, before
    the held-out windows are known: the newest `context_commits` (None: all)."""
    if settings.context_commits is None:
        return None
    return {s.sha for s in summaries[: settings.context_commits]}


def _context_missing(
    state: MineState, summaries: list[CommitSummary], wanted: Collection[str]
) -> list[CommitSummary]:
    """The commits of `wanted` (oldest first) that yielded completions mined
    without their repository context. (A state from before `context_commits`
    mined every commit with it: no flag means it has it.)"""
    missing: list[CommitSummary] = []
    for summary in reversed(summaries):
        info = state.commits.get(summary.sha, {})
        mined = info.get("status") == "mined" and info.get("completions")
        if summary.sha in wanted and mined and not info.get("context", True):
            missing.append(summary)
    return missing


def _fill_context(
    plan: _ReadPlan,
    summaries: list[CommitSummary],
    newest: set[str],
    writer: BatchWriter,
    report: Report,
    parallel_from: int = PARALLEL_FROM,
) -> tuple[DatasetPlan, set[str], int]:
    """Mine again, with their repository context, the commits of the
    validation and test windows (and the newest ones) that were mined
    without it: windows longer than `context_commits`, or a setting raised.
    Returns the dataset's plan, the commits whose completions keep their
    context, and how many commits were mined again."""
    state = writer.state
    again = rounds = 0
    while True:
        planned = plan_dataset(summaries, state, plan.settings)
        wanted = newest | planned.held_out_windows()
        missing = _context_missing(state, summaries, wanted)
        # (with secrets = "drop" a context can drop instances, so move the windows)
        if not missing or rounds == 3:
            break
        rounds += 1
        log.info("mining %d commit(s) again with their repository context", len(missing))
        writer.flush()  # their records may be in the open batch
        state.drop_commits([s.sha for s in missing])
        _read_commits(plan, missing, writer, report, {s.sha for s in missing}, parallel_from)
        again += len(missing)
    return planned, wanted, again


def _mine_new_commits(
    plan: _ReadPlan,
    to_read: list[CommitSummary],
    summaries: list[CommitSummary],
    writer: BatchWriter,
    report: Report,
    parallel_from: int,
) -> tuple[DatasetPlan | None, set[str] | None, int]:
    """Mine `to_read` (the newest `context_commits` of `summaries` with their
    repository context), then the windows' commits that lack it; returns
    `_fill_context`'s plan, commits with context and commits mined again
    (None, None, 0 when every commit has it, or none)."""
    settings = plan.settings
    newest = _newest_commits(summaries, settings)
    if to_read:
        _read_commits(plan, to_read, writer, report, newest, parallel_from)
    if newest is None or not settings.context or "completion" not in settings.kinds:
        return None, None, 0
    return _fill_context(plan, summaries, newest, writer, report, parallel_from)


def _save_state(state: MineState, repo: Path, branch_label: str, final: bool) -> None:
    """Save the state (naming only complete batches); at the end of the run,
    delete the batch files it no longer names (replaced, or left by a killed
    run)."""
    state.save(repo, branch_label)
    if final:
        state.remove_stray_batches()


def _skip_rules(settings: MineSettings, ignore_text: str) -> SkipRules:
    return SkipRules(
        globs=tuple(settings.ignore_globs),
        ignore_rules=tuple(parse_ignore_file(ignore_text)),
        max_file_bytes=settings.max_file_bytes,
        max_line_chars=settings.max_line_chars,
    )


def _triage(
    todo: list[CommitSummary], state: MineState, settings: MineSettings
) -> list[CommitSummary]:
    """The new commits to read; bots' and mass changes' are marked in the state instead."""
    to_read: list[CommitSummary] = []
    for summary in todo:
        if is_bot(Alias(summary.author_name, summary.author_email), settings.bot_patterns):
            state.commits[summary.sha] = {"status": "bot"}
        elif summary.files_touched > state.mass_threshold:
            state.commits[summary.sha] = {"status": "mass_change", "files": summary.files_touched}
        else:
            to_read.append(summary)
    return to_read


def mine_repository(
    repo: Path,
    settings: MineSettings,
    data_dir: Path,
    *,
    out_dir: Path | None = None,
    full: bool = False,
    report: Report = quiet,
    batch_records: int = BATCH_RECORDS,
    parallel_from: int = PARALLEL_FROM,
) -> MineResult:
    """Mine `repo` (incrementally) and (re)write its dataset; see the module doc.

    `report` gets a `Progress(done, total)` of the commits read. Instances
    are streamed into batches of `batch_records` (the state saved after
    each), and the dataset built holding about that many at once; from
    `parallel_from` commits to read, `mine.workers` processes read them. Raises
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
    rules = _skip_rules(settings, ignore_text)
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
    state_dir = store.root / "mine-state" / branch_key(branch, branch_label)
    config_hash = _config_hash(settings, ignore_text, alias_file)
    state, fresh = _open_state(state_dir, config_hash, full, summaries, settings)
    current = {s.sha for s in summaries}
    removed = [sha for sha in state.commits if sha not in current]
    todo = [s for s in reversed(summaries) if s.sha not in state.commits]
    if removed:
        warnings.append(
            f"{len(removed)} commit(s) mined before are no longer on {branch} "
            "(rewritten history or a narrower range): their instances were dropped"
        )
    to_read = _triage(todo, state, settings)
    if removed:
        # The instances of commits that left the branch go first (batch by
        # batch), so the state saved while reading never names them.
        state.drop_commits(removed)
    saved = functools.partial(_save_state, state, repo, branch_label)
    read_plan = _ReadPlan(repo, tip, branch, settings, rules, alias_file, ignore_text)
    with BatchWriter(state, saved, batch_records) as writer:
        planned, context_commits, again = _mine_new_commits(
            read_plan, to_read, summaries, writer, report, parallel_from
        )
    new_instances = writer.written
    warnings = scrub_texts(warnings)
    dataset_dir = target or store.dataset_dir
    up_to_date = current_manifest(dataset_dir, tip, settings)
    if up_to_date is not None and not todo and not removed and not fresh and not again:
        # Nothing new on the branch and the same settings: the dataset on disk
        # is what a rebuild would write (the watcher calls this often).
        return MineResult(dataset_dir, up_to_date, 0, 0, 0, False, warnings)
    extra = {
        "incremental": {
            "new_commits": len(todo),
            "new_instances": new_instances,
            "removed_commits": len(removed),
            "full": fresh,
        },
        "warnings": warnings,
    }
    manifest = build_dataset(
        dataset_dir,
        state,
        current,
        summaries,
        settings,
        repo=repo,
        branch=branch_label,
        tip=tip,
        extra=extra,
        max_records=batch_records,
        planned=planned,
        context_commits=context_commits,
    )
    return MineResult(
        dataset_dir=dataset_dir,
        manifest=manifest,
        new_commits=len(todo),
        new_instances=new_instances,
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
