"""The workspace a completion instance's context is built from: the
repository as it was at the instance's parent commit.

Mining walks the history oldest first; `CommitWorkspace.at(sha)` moves one
`WorkspaceIndex` (and module map) from the commit it holds to the asked one
by applying `git diff-tree` between them, reading only the files that
changed, so following the walk costs about one small diff per commit instead
of reading the whole tree each time. The index ranks the same whatever order
its files came in (`WorkspaceIndex.search`), so the context is the one the
server would build over a checkout of that commit: never a file of the
future, so never the instance's own new line unless it already existed.
"""

from __future__ import annotations

import subprocess
import time
from collections import OrderedDict
from pathlib import Path, PurePosixPath

from shoptalk.models.context import Workspace
from shoptalk.models.exclusion import Exclusion, decode_source, path_skip_reason
from shoptalk.models.module_map import (
    SKIPPED_DIRS,
    FileSummary,
    ModuleMap,
    build_module_map,
    language_for,
    module_id_for,
    module_map_of,
    summarize_file,
)
from shoptalk.models.workspace_index import IndexLimits, WorkspaceIndex
from shoptalk.trainer.git_log import BlobReader, GitError, decode_path

# Parsed files kept by (path, blob): a merge-heavy history moves between
# branches' trees again and again, and parsing (tree-sitter) is the cost.
SUMMARY_CACHE = 20_000
_REGULAR = (b"100644", b"100755")


def _git(repo: Path, *args: str) -> bytes:
    out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=False)
    if out.returncode != 0:
        message = out.stderr.decode("utf-8", "replace").strip()
        raise GitError(f"git {args[0]} failed in {repo}: {message}")
    return out.stdout


def tree_blobs(repo: Path, rev: str) -> dict[str, str]:
    """{path: blob id} of the regular files in the tree of `rev`."""
    found: dict[str, str] = {}
    for entry in _git(repo, "ls-tree", "-r", "-z", "--full-tree", rev).split(b"\x00"):
        meta, _, path = entry.partition(b"\t")
        fields = meta.split(b" ")
        if len(fields) == 3 and fields[0] in _REGULAR:
            found[decode_path(path)] = fields[2].decode()
    return found


def tree_changes(repo: Path, old: str, new: str) -> dict[str, str | None]:
    """{path: new blob id, or None when gone} between two trees (renames
    count as a deletion and an addition; symlinks and submodules as gone)."""
    out = _git(repo, "diff-tree", "-r", "-z", "--no-renames", "--raw", old, new)
    fields = out.split(b"\x00")
    changes: dict[str, str | None] = {}
    for meta, path in zip(fields[0::2], fields[1::2], strict=False):
        if not meta.startswith(b":"):
            continue
        _old_mode, new_mode, _old_blob, new_blob, _status = meta[1:].split(b" ")
        changes[decode_path(path)] = new_blob.decode() if new_mode in _REGULAR else None
    return changes


def _module_map_reads(path: str) -> bool:
    """Whether the server's module map (`module_map_from_tree`) reads `path`."""
    parts = PurePosixPath(path).parts
    if any(p.startswith(".") or p in SKIPPED_DIRS for p in parts[:-1]):
        return False
    return language_for(path) is not None


class CommitWorkspace:
    """One workspace moved along the history (see the module doc)."""

    def __init__(
        self,
        repo: Path,
        blobs: BlobReader,
        exclusion: Exclusion | None = None,
        limits: IndexLimits | None = None,
    ) -> None:
        self.repo = repo
        self.blobs = blobs
        self.exclusion = exclusion or Exclusion()
        self.limits = limits or IndexLimits()
        self.commit: str | None = None  # what the workspace holds (None: empty)
        self.index = WorkspaceIndex(self.exclusion, self.limits)
        self._blobs: dict[str, str] = {}  # {path: blob} of the files the module map reads
        self._summaries: dict[str, FileSummary] = {}  # their parsed forms
        self._parsed: OrderedDict[tuple[str, str, str], FileSummary | None] = OrderedDict()
        self.module_map: ModuleMap = build_module_map({})
        self.seconds = 0.0  # spent moving (mining reports the cost)
        self.files_read = 0

    def at(self, commit: str | None) -> Workspace:
        """The workspace of `commit`'s tree (None: an empty repository)."""
        started = time.perf_counter()
        if commit != self.commit:
            if commit is None:
                self._reset()
            elif self.commit is None:
                self._apply(dict(tree_blobs(self.repo, commit)))
            else:
                self._apply(tree_changes(self.repo, self.commit, commit))
            self.commit = commit
        self.seconds += time.perf_counter() - started
        return Workspace(self.index, self.module_map)

    def _reset(self) -> None:
        self.index = WorkspaceIndex(self.exclusion, self.limits)
        self._blobs = {}
        self._summaries = {}
        self.module_map = build_module_map({})

    def _apply(self, changes: dict[str, str | None]) -> None:
        texts: dict[str, str | None] = {}
        mapped: list[str] = []
        inits_before = {p for p in self._blobs if p.endswith("__init__.py")}
        for path in sorted(changes):
            blob = changes[path]
            indexed = self.index.accepts(path) and path_skip_reason(path) is None
            if indexed:
                texts[path] = self._read(blob) if blob is not None else None
                self.index.update(path, texts[path])
            if _module_map_reads(path):
                mapped.append(path)
                if blob is None:
                    self._blobs.pop(path, None)
                    self._summaries.pop(path, None)
                else:
                    self._blobs[path] = blob
        if not mapped:
            return
        inits = {p for p in self._blobs if p.endswith("__init__.py")}
        # Python module ids (and so relative imports) follow the packages'
        # `__init__.py` files: when those changed, every Python file is checked.
        check = self._blobs if inits != inits_before else [p for p in mapped if p in self._blobs]
        paths = set(self._blobs)
        for path in check:
            summary = self._summary(path, self._blobs[path], paths, texts)
            if summary is None:
                self._summaries.pop(path, None)
            else:
                self._summaries[path] = summary
        self.module_map = module_map_of(self._summaries)

    def _summary(
        self, path: str, blob: str, paths: set[str], texts: dict[str, str | None]
    ) -> FileSummary | None:
        """The parsed file `path` at `blob` under the module id `paths` give
        it (parsed once per blob and id: from the cache when seen before)."""
        language = language_for(path)
        module_id = module_id_for(path, language, paths) if language == "python" else ""
        key = (path, blob, module_id)
        if key in self._parsed:
            self._parsed.move_to_end(key)
            return self._parsed[key]
        text = texts[path] if path in texts else self._read(blob)
        summary = summarize_file(path, text, paths) if text is not None else None
        self._parsed[key] = summary
        if len(self._parsed) > SUMMARY_CACHE:
            self._parsed.popitem(last=False)
        return summary

    def _read(self, blob: str) -> str | None:
        data = self.blobs.read(blob, self.limits.max_file_bytes)
        if data is None:
            return None
        self.files_read += 1
        return decode_source(data)
