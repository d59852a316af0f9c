"""Watching a repository's git metadata for new commits.

The watcher observes the git directory (HEAD, refs, packed-refs, reflogs),
not the working tree, so commits, fetches, rebases and branch switches are
noticed while edits in the editor are not. Bursts of events (a rebase writes
dozens of refs) are debounced into one check of the tracked branch's head.
"""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from shoptalk.models.errors import ShopTalkError

log = logging.getLogger(__name__)

# Files under the git dir whose change can move a branch head.
_GIT_METADATA = ("HEAD", "packed-refs", "FETCH_HEAD", "ORIG_HEAD")
_GIT_METADATA_DIRS = ("refs", "logs")


class WatchError(ShopTalkError):
    pass


@dataclass(frozen=True)
class HeadChange:
    repo: Path
    branch: str
    old: str | None
    new: str | None  # None: the branch (or the repository) is gone


def _git(repo: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=30
    )
    if result.returncode != 0:
        raise WatchError(f"git {' '.join(args)} failed in {repo}: {result.stderr.strip()}")
    return result.stdout.strip()


def git_dir(repo: Path) -> Path:
    if not repo.is_dir():
        raise WatchError(f"{repo} does not exist or is not a folder")
    try:
        path = Path(_git(repo, "rev-parse", "--absolute-git-dir"))
    except WatchError:
        raise WatchError(
            f"{repo} is not a git repository: point --repo at a git checkout"
        ) from None
    return path


def branch_head(repo: Path, branch: str) -> str | None:
    try:
        return _git(repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{branch}^{{commit}}")
    except WatchError:
        return None


def current_branch(repo: Path) -> str:
    try:
        return _git(repo, "symbolic-ref", "--short", "HEAD")
    except WatchError:
        raise WatchError(
            f"{repo} has a detached HEAD: name the branch to follow (--branch main)"
        ) from None


class _Handler(FileSystemEventHandler):
    def __init__(self, git_dir: Path, poke: Callable[[], None]):
        self.git_dir = git_dir
        self.poke = poke

    def on_any_event(self, event: FileSystemEvent) -> None:
        path = Path(str(event.src_path))
        try:
            rel = path.relative_to(self.git_dir)
        except ValueError:
            return
        parts = rel.parts
        if not parts:
            self.poke()  # the git dir itself (deleted or moved)
            return
        if parts[0] in _GIT_METADATA or parts[0] in _GIT_METADATA_DIRS:
            self.poke()


class GitWatcher:
    """Calls `on_change(HeadChange)` once per burst that moved `branch`'s head.

    `quiet_seconds` is the debounce: the head is read only after that long
    without further events. `check()` can be called directly (tests, polling).
    """

    def __init__(
        self,
        repo: Path,
        on_change: Callable[[HeadChange], None],
        branch: str | None = None,
        quiet_seconds: float = 2.0,
    ):
        self.repo = repo.resolve()
        self.git_dir = git_dir(self.repo)
        self.branch = branch or current_branch(self.repo)
        self.on_change = on_change
        self.quiet_seconds = quiet_seconds
        self.head = branch_head(self.repo, self.branch)
        if self.head is None:
            raise WatchError(f"branch {self.branch!r} does not exist in {self.repo}")
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._observer = Observer()
        self._observer.schedule(
            _Handler(self.git_dir, self._poke), str(self.git_dir), recursive=True
        )

    def start(self) -> None:
        self._observer.start()
        log.info("watching %s (branch %s, head %s)", self.repo, self.branch, (self.head or "")[:10])

    def stop(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
        self._observer.stop()
        self._observer.join(timeout=5)

    def _poke(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.quiet_seconds, self.check)
            self._timer.daemon = True
            self._timer.start()

    def check(self) -> HeadChange | None:
        """Read the branch head now; report and remember it if it moved."""
        if not self.git_dir.exists():
            change = HeadChange(self.repo, self.branch, self.head, None)
            log.error("%s is gone (deleted or moved); stopped following it", self.repo)
            self.head = None
            self.on_change(change)
            return change
        new = branch_head(self.repo, self.branch)
        if new == self.head:
            return None
        change = HeadChange(self.repo, self.branch, self.head, new)
        self.head = new
        self.on_change(change)
        return change
