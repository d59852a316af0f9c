"""Watching git metadata: commits are noticed, bursts debounced, edits ignored."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from shoptalk.server.watcher import GitWatcher, HeadChange, WatchError


def git(repo: Path, *args: str) -> str:
    env = {
        "GIT_AUTHOR_NAME": "Ann",
        "GIT_AUTHOR_EMAIL": "ann@example.com",
        "GIT_COMMITTER_NAME": "Ann",
        "GIT_COMMITTER_EMAIL": "ann@example.com",
        "HOME": str(repo.parent),
        "PATH": "/usr/bin:/bin",
    }
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env
    ).stdout.strip()


def commit(repo: Path, name: str, text: str) -> str:
    (repo / name).write_text(text)
    git(repo, "add", name)
    git(repo, "commit", "-qm", f"add {name}")
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    commit(path, "a.py", "x = 1\n")
    return path


class Changes:
    def __init__(self) -> None:
        self.items: list[HeadChange] = []
        self.event = threading.Event()

    def __call__(self, change: HeadChange) -> None:
        self.items.append(change)
        self.event.set()

    def wait(self, timeout: float = 10.0) -> HeadChange:
        assert self.event.wait(timeout), "no head change reported"
        self.event.clear()
        return self.items[-1]


def test_commit_burst_is_one_change(repo: Path) -> None:
    changes = Changes()
    watcher = GitWatcher(repo, changes, quiet_seconds=0.5)
    old = watcher.head
    watcher.start()
    try:
        for i in range(3):
            head = commit(repo, f"f{i}.py", f"v = {i}\n")
        change = changes.wait()
        assert change.old == old and change.new == head and change.branch == "main"
        assert len(changes.items) == 1
    finally:
        watcher.stop()


def test_working_tree_edits_are_ignored(repo: Path) -> None:
    changes = Changes()
    watcher = GitWatcher(repo, changes, quiet_seconds=0.2)
    watcher.start()
    try:
        (repo / "a.py").write_text("x = 2\n")
        assert not changes.event.wait(1.0)
    finally:
        watcher.stop()


def test_deleted_repository_is_reported(repo: Path) -> None:
    changes = Changes()
    watcher = GitWatcher(repo, changes, quiet_seconds=0.2)
    shutil.rmtree(repo)
    change = watcher.check()
    assert change is not None and change.new is None


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(WatchError, match="not a git repository"):
        GitWatcher(tmp_path, lambda c: None)
    with pytest.raises(WatchError, match="does not exist"):
        GitWatcher(tmp_path / "nope", lambda c: None)
