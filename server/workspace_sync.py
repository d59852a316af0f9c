"""Keeps the workspace index (`shoptalk.models.workspace_index`) current for
the language server: built on a background thread at `initialize`, then
updated per file as documents open, change (debounced: typing never waits
for the index), are saved or closed, and as files change on disk
(`workspace/didChangeWatchedFiles`: edits, deletions, checkouts of new
commits). The completion engine reads it through one long-lived `Workspace`
object, so the engine's context block cache stays valid between keystrokes.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from pygls.uris import to_fs_path

from shoptalk.models.context import Workspace
from shoptalk.models.exclusion import Exclusion
from shoptalk.models.module_map import ModuleMap
from shoptalk.models.settings import Settings
from shoptalk.models.workspace_index import IndexLimits, WorkspaceIndex

log = logging.getLogger(__name__)

# Edits are indexed once typing pauses this long.
CHANGE_DEBOUNCE_S = 0.5


def relative_path(root: Path, uri: str) -> str | None:
    """The POSIX path of a document's `uri` relative to `root`; None outside it."""
    path = to_fs_path(uri)
    if path is None:
        return None
    try:
        return Path(path).resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return None


class WorkspaceSync:
    """The index of one workspace root and the updates that keep it current."""

    def __init__(self, root: Path, settings: Settings) -> None:
        self.root = root
        self._resolved_root = root.resolve()
        mine = settings.mine
        self.exclusion = Exclusion.for_root(root, mine.ignore_globs)
        self.limits = IndexLimits(
            max_file_bytes=mine.max_file_bytes, max_line_chars=mine.max_line_chars
        )
        self.workspace: Workspace | None = None  # None until the first build ends
        self.build_seconds: float | None = None
        self._lock = threading.Lock()
        self._pending: dict[str, str | None] = {}  # texts of edits not indexed yet
        self._touched: list[str] = []  # opened or edited before the build ended
        self._timer: threading.Timer | None = None
        self._closed = threading.Event()

    def relative(self, uri: str) -> str | None:
        """The POSIX path of `uri` relative to the root; None outside it."""
        return relative_path(self._resolved_root, uri)

    def excludes(self, uri: str) -> bool:
        """Whether the document at `uri` must never enter a prompt."""
        relative = self.relative(uri)
        return relative is not None and self.exclusion.excludes(relative)

    def build(self, module_map: ModuleMap | None = None) -> None:
        """Index the root (run on a background thread), then apply the edits
        that arrived meanwhile."""
        started = time.monotonic()
        index = WorkspaceIndex.from_tree(self.root, self.exclusion, self.limits, self._closed)
        self.build_seconds = time.monotonic() - started
        with self._lock:
            pending, self._pending = self._pending, {}
            touched, self._touched = self._touched, []
        for path, text in pending.items():
            self._apply(index, path, text)
        for path in touched:
            index.touch(path)
        self.workspace = Workspace(index, module_map)
        log.info(
            "workspace index: %d files, %d windows in %.1fs",
            len(index),
            index.stats()["windows"],
            self.build_seconds,
        )

    def _apply(self, index: WorkspaceIndex, path: str, text: str | None) -> None:
        if text is None:
            index.update_from_disk(self.root, path)  # closed, deleted or changed on disk
        else:
            index.update(path, text)

    def document(self, uri: str, text: str | None, debounce: bool = False) -> None:
        """A document's text now (None: read the file on disk again: it was
        closed, or changed on disk), indexed at once or after a pause."""
        path = self.relative(uri)
        if path is None:
            return
        with self._lock:
            self._pending[path] = text
            if text is not None:
                self._touched.append(path)
            workspace = self.workspace
            if workspace is None:
                return  # the build applies it
            if debounce:
                if self._timer is None:
                    self._timer = threading.Timer(CHANGE_DEBOUNCE_S, self.flush)
                    self._timer.daemon = True
                    self._timer.start()
                return
        self.flush()

    def flush(self) -> None:
        """Index every pending edit now."""
        with self._lock:
            workspace = self.workspace
            if workspace is None:
                return
            pending, self._pending = self._pending, {}
            touched, self._touched = self._touched, []
            self._timer = None
        for path, text in pending.items():
            self._apply(workspace.index, path, text)
        for path in touched:
            workspace.index.touch(path)

    def files_changed(self, uris: list[str]) -> None:
        """Files created, changed or deleted on disk."""
        for uri in uris:
            self.document(uri, None)

    def stats(self) -> dict[str, Any] | None:
        workspace = self.workspace
        if workspace is None:
            return None
        return {**workspace.index.stats(), "build_seconds": self.build_seconds}

    @property
    def closed(self) -> bool:
        """Whether the server let go of this index (shutdown)."""
        return self._closed.is_set()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
