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
from pathlib import Path, PurePosixPath

from shoptalk.models.context import Workspace
from shoptalk.models.exclusion import Exclusion, decode_source, path_skip_reason
from shoptalk.models.module_map import (
    SKIPPED_DIRS,
    ModuleMap,
    build_module_map,
    language_for,
)
from shoptalk.models.workspace_index import IndexLimits, WorkspaceIndex
from shoptalk.trainer.git_log import BlobReader, GitError, decode_path

# Above this many changed files the module map is rebuilt once rather than
# file by file (`ModuleMap.with_file` regroups every module).
MODULE_MAP_REBUILD = 32
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
        self._modules: dict[str, str] = {}  # texts the module map reads
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
                self._apply(dict(tree_blobs(self.repo, commit)), rebuild=True)
            else:
                self._apply(tree_changes(self.repo, self.commit, commit))
            self.commit = commit
        self.seconds += time.perf_counter() - started
        return Workspace(self.index, self.module_map)

    def _reset(self) -> None:
        self.index = WorkspaceIndex(self.exclusion, self.limits)
        self._modules = {}
        self.module_map = build_module_map({})

    def _apply(self, changes: dict[str, str | None], rebuild: bool = False) -> None:
        rebuild = rebuild or len(changes) > MODULE_MAP_REBUILD
        for path in sorted(changes):
            blob = changes[path]
            indexed = self.index.accepts(path) and path_skip_reason(path) is None
            mapped = _module_map_reads(path)
            if not (indexed or mapped):
                continue
            text = self._read(blob) if blob is not None else None
            if indexed:
                self.index.update(path, text)
            if mapped:
                if text is None:
                    self._modules.pop(path, None)
                else:
                    self._modules[path] = text
                if not rebuild:
                    self.module_map = self.module_map.with_file(path, text)
        if rebuild:
            self.module_map = build_module_map(self._modules)

    def _read(self, blob: str) -> str | None:
        data = self.blobs.read(blob, self.limits.max_file_bytes)
        if data is None:
            return None
        self.files_read += 1
        return decode_source(data)
