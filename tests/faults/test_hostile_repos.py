"""Hostile repositories mined by the real `shoptalk mine`: bytes that are
not UTF-8 in names, every kind of path quoting git does, submodules, a
shallow clone, huge and binary files, empty commits, symlinks changing type,
non-UTF-8 metadata, odd dates, a hostile git config, a broken
`.shoptalkignore`.

Each must mine without a traceback (exit 0), keep what is minable (the
mining cache holds instances of the files named), report what it skipped
(`skipped_files` exactly) and write nothing but valid UTF-8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from git_repos import ALICE, BOB, CAROL, RepoBuilder, bytes_name, git, python_module

from shoptalk.models.store import RepoStore

pytestmark = pytest.mark.e2e


@dataclass(frozen=True)
class Hostile:
    """A repository built by `build` (which returns the folder to mine), and
    what mining it must give."""

    build: Callable[[Path], Path]
    skipped: dict[str, int]  # manifest["skipped_files"], exactly
    mined: frozenset[str]  # paths with instances in the mining cache (at least these)
    warning: str = ""  # a warning the run must print
    commits: int | None = None  # commits in the manifest's range, when it matters
    not_mined: frozenset[str] = field(default_factory=frozenset)


def _module(repo: RepoBuilder, path: str, name: str = "mod") -> None:
    repo.write(path, python_module(name, 2))


# ---- the repositories ------------------------------------------------------------------


def _bytes_in_names(root: Path) -> Path:
    repo = RepoBuilder(root / "repo")
    _module(repo, "good.py")
    _module(repo, bytes_name(b"caf\xe9.py"))  # Latin-1
    _module(repo, bytes_name(b"\xff\xfe/mod.py"))  # not UTF-8 in a folder name
    _module(repo, "ok_é.py")  # UTF-8 is fine
    repo.commit("Add modules with odd names", ALICE)
    repo.write(bytes_name(b"bad\x80pkg/__init__.py"), '"""A package."""\n')
    _module(repo, "later.py", "later")
    repo.commit("Add a package and a later module", BOB)
    return repo.path


def _quoting(root: Path) -> Path:
    repo = RepoBuilder(root / "repo")
    for path in QUOTED_NAMES:
        _module(repo, path, "quoted")
    repo.commit("Add modules whose names git quotes", ALICE)
    repo.move("a b/c d.py", "a b/e  f.py")  # a rename, spaces on both sides
    repo.write("a b/e  f.py", (repo.path / "a b/e  f.py").read_text() + "\n\nX_TOTAL = 1 + 2 + 3\n")
    repo.remove("with space.py")
    repo.commit("Rename one, delete another", BOB)
    return repo.path


QUOTED_NAMES = (
    "with space.py",
    "tab\tname.py",
    "new\nline.py",
    'quo"te.py',
    "back\\slash.py",
    "-dash.py",
    "cafe\u0301.py",  # decomposed é
    "snake_🐍.py",
    ".hidden.py",
    "a b/c d.py",
    "trailing space .py",
    "#hash.py",
)


def _submodule(root: Path) -> Path:
    library = RepoBuilder(root / "library")
    _module(library, "lib.py", "lib")
    library.commit("Library", ALICE)
    repo = RepoBuilder(root / "repo")
    _module(repo, "app.py", "app")
    repo.commit("Add the app", ALICE)
    git(
        repo.path,
        "-c",
        "protocol.file.allow=always",
        "submodule",
        "add",
        "-q",
        str(library.path),
        "libs/shared",
    )
    repo.commit("Track the shared library", BOB)
    _module(repo, "more.py", "more")
    repo.commit("More app", BOB)
    return repo.path


def _shallow(root: Path) -> Path:
    repo = RepoBuilder(root / "origin")
    for index in range(5):
        _module(repo, f"m{index}.py", f"m{index}")
        repo.commit(f"Add module number {index}", ALICE)
    clone = root / "clone"
    subprocess.run(
        ["git", "clone", "-q", "--depth", "2", f"file://{repo.path}", str(clone)],
        check=True,
        capture_output=True,
    )
    return clone


def _huge_files(root: Path) -> Path:
    repo = RepoBuilder(root / "repo")
    _module(repo, "small.py", "small")
    # Over max_file_bytes (1 MB): skipped as huge.
    repo.write("generated_tables.py", "TABLE = [\n" + "    1234567890,\n" * 90_000 + "]\n")
    # One 200 kB line: minified.
    repo.write("static/app.js", "var a=[" + "1," * 100_000 + "0];\n")
    # 8 MB of data (not code): never read whole, never scanned line by line.
    repo.write("data/big.csv", "".join(f"{i},{i * 7 % 13},row {i}\n" for i in range(400_000)))
    repo.commit("Add tables, a bundle and the data set", ALICE)
    return repo.path


def _binary_files(root: Path) -> Path:
    repo = RepoBuilder(root / "repo")
    _module(repo, "code.py", "code")
    repo.write("logo.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    repo.write("nul.py", b"x = 1\x00\ny = 2\n")
    repo.write("lib.so", bytes(range(256)) * 16)
    repo.write("latin.py", "# caf\xe9 cr\xe8me\nvalue = compute(a, b, c)\n".encode("latin-1"))
    repo.commit("Add code, images and a library", ALICE)
    return repo.path


def _empty_commits(root: Path) -> Path:
    repo = RepoBuilder(root / "repo")
    repo.commit("An empty start", ALICE)
    _module(repo, "one.py", "one")
    repo.commit("The first module", ALICE)
    repo.commit("Nothing changed here", BOB)
    _module(repo, "two.py", "two")
    repo.commit("The second module", BOB)
    return repo.path


def _only_empty_commits(root: Path) -> Path:
    repo = RepoBuilder(root / "repo")
    repo.commit("An empty start", ALICE)
    repo.commit("Still nothing", BOB)
    return repo.path


def _symlinks(root: Path) -> Path:
    repo = RepoBuilder(root / "repo")
    _module(repo, "real.py", "real")
    repo.commit("Add the real module", ALICE)
    os.symlink("real.py", repo.path / "link.py")
    os.symlink("/etc/passwd", repo.path / "outside.py")
    os.symlink(".", repo.path / "loop")
    repo.commit("Add links (one out of the repository, one to itself)", ALICE)
    (repo.path / "link.py").unlink()
    os.symlink("/etc/hostname", repo.path / "link.py")
    repo.commit("Point the link elsewhere", BOB)
    (repo.path / "link.py").unlink()
    _module(repo, "link.py", "nowreal")  # a link becomes a file
    (repo.path / "real.py").unlink()
    os.symlink("link.py", repo.path / "real.py")  # a file becomes a link
    repo.commit("Swap the link and the file", BOB)
    return repo.path


def _odd_metadata(root: Path) -> Path:
    repo = RepoBuilder(root / "repo")
    _module(repo, "a.py", "a")
    repo.commit("Plain start", ALICE)
    message = root / "message.txt"
    message.write_bytes(b"Caf\xe9 cr\xe8me fix\n\nA body with \xff\xfe bytes\n")
    _module(repo, "b.py", "b")
    git(repo.path, "add", "-A")
    latin_author = {
        "GIT_AUTHOR_NAME": bytes_name(b"Jos\xe9 M\xfcller"),
        "GIT_AUTHOR_EMAIL": "",
        "GIT_AUTHOR_DATE": "@0 +0000",  # the epoch
        "GIT_COMMITTER_DATE": "@0 +0000",
    }
    git(
        repo.path,
        "-c",
        "i18n.commitEncoding=ISO-8859-1",
        "commit",
        "-q",
        "-F",
        str(message),
        env=latin_author,
    )
    _module(repo, "c.py", "c")
    git(repo.path, "add", "-A")
    future = {"GIT_AUTHOR_DATE": "@4102444800 +1400", "GIT_COMMITTER_DATE": "@4102444800 +1400"}
    git(repo.path, "commit", "-q", "-F", str(message), env=future)  # no encoding header
    return repo.path


def _broken_ignore_file(root: Path) -> Path:
    repo = RepoBuilder(root / "repo")
    _module(repo, "app.py", "app")
    repo.commit("Add the app", CAROL)
    (repo.path / ".shoptalkignore").mkdir()
    (repo.path / ".shoptalkignore" / "app.py").write_text("# a folder where a file belongs\n")
    return repo.path


def _attributes(root: Path) -> Path:
    repo = RepoBuilder(root / "repo")
    repo.write(".gitattributes", "*.dat binary\ndocs/*.md diff=custom\n")
    git(repo.path, "config", "diff.custom.textconv", "false")
    _module(repo, "app.py", "app")
    repo.write("blob.dat", "text that git is told is binary\n")
    repo.write(
        "docs/guide.md", "# Guide\n\nThe `app.py` module holds the whole app, see it first.\n"
    )
    repo.commit("Add the app, its data and a guide", ALICE)
    return repo.path


CASES: dict[str, Hostile] = {
    "bytes in names": Hostile(
        _bytes_in_names,
        {"undecodable_path": 3},
        frozenset({"good.py", "ok_é.py", "later.py"}),
    ),
    "quoting": Hostile(_quoting, {}, frozenset({*QUOTED_NAMES, "a b/e  f.py"})),
    "submodule": Hostile(_submodule, {"submodule": 1}, frozenset({"app.py", "more.py"})),
    "shallow clone": Hostile(
        _shallow, {}, frozenset({"m3.py", "m4.py"}), warning="shallow clone", commits=2
    ),
    "huge files": Hostile(
        _huge_files,
        {"huge": 1, "minified_or_long_lines": 1},
        frozenset({"small.py", "data/big.csv"}),
        not_mined=frozenset({"generated_tables.py", "static/app.js"}),
    ),
    "binary files": Hostile(
        _binary_files,
        {"binary": 3, "encoding": 1},
        frozenset({"code.py"}),
        not_mined=frozenset({"nul.py", "latin.py"}),
    ),
    "empty commits": Hostile(_empty_commits, {}, frozenset({"one.py", "two.py"}), commits=4),
    "only empty commits": Hostile(_only_empty_commits, {}, frozenset(), commits=2),
    "symlinks": Hostile(
        _symlinks,
        # added link.py, outside.py, loop; retargeted link.py; link.py's and
        # real.py's sides of the two type changes
        {"symlink": 6},
        frozenset({"real.py", "link.py"}),
        not_mined=frozenset({"outside.py", "loop"}),
    ),
    "odd metadata": Hostile(_odd_metadata, {}, frozenset({"a.py", "b.py", "c.py"}), commits=3),
    "broken .shoptalkignore": Hostile(
        _broken_ignore_file, {}, frozenset({"app.py"}), warning="not a readable file"
    ),
    "gitattributes": Hostile(_attributes, {"binary": 1}, frozenset({"app.py", "docs/guide.md"})),
}


# ---- running the real CLI ----------------------------------------------------------------


def _mine(repo: Path, data: Path) -> subprocess.CompletedProcess[str]:
    config = data.parent / "config.toml"
    config.touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOPTALK_")}
    env |= {"SHOPTALK_DATA_DIR": str(data), "SHOPTALK_CONFIG": str(config)}
    return subprocess.run(
        [sys.executable, "-m", "shoptalk.models.cli", "mine", "--repo", str(repo)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=300,
    )


def _cached_records(store: RepoStore) -> list[dict[str, Any]]:
    """Every instance in the mining cache, read as strict UTF-8."""
    records: list[dict[str, Any]] = []
    for batch in sorted(store.root.rglob("batch-*.jsonl")):
        text = batch.read_bytes().decode("utf-8")
        records += [json.loads(line) for line in text.splitlines() if line.strip()]
    return records


@pytest.mark.parametrize("name", list(CASES))
def test_a_hostile_repository_mines_keeps_what_it_can_and_reports_the_rest(
    name: str, tmp_path: Path
) -> None:
    case = CASES[name]
    repo = case.build(tmp_path)
    data = tmp_path / "data"
    run = _mine(repo, data)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    if case.warning:
        assert case.warning in run.stderr
    store = RepoStore.for_repo(data, repo)
    manifest = json.loads((store.dataset_dir / "manifest.json").read_bytes().decode("utf-8"))
    assert manifest["skipped_files"] == case.skipped
    if case.commits is not None:
        assert manifest["commit_range"]["commits"] == case.commits
    records = _cached_records(store)
    paths = {r["path"] for r in records}
    assert case.mined <= paths, sorted(case.mined - paths)
    assert not case.not_mined & paths
    for shard in store.dataset_dir.glob("*.jsonl"):
        shard.read_bytes().decode("utf-8")  # valid UTF-8 (raises otherwise)
    assert manifest["total"] == sum(info["records"] for info in manifest["shards"].values())
    if not case.mined:
        assert manifest["total"] == 0


HOSTILE_CONFIG = {
    "diff.noprefix": "true",
    "diff.mnemonicPrefix": "true",
    "diff.srcPrefix": "x/",
    "diff.dstPrefix": "y/",
    "color.ui": "always",
    "color.diff": "always",
    "core.quotePath": "true",
    "diff.renames": "copies",
    "diff.external": "false",
    "diff.algorithm": "histogram",
    "diff.indentHeuristic": "false",
    "diff.context": "7",
    "diff.relative": "true",
    "i18n.logOutputEncoding": "ISO-8859-1",
    "log.showSignature": "true",
    "log.decorate": "full",
    "log.abbrevCommit": "true",
    "format.pretty": "oneline",
}


def test_the_users_git_config_changes_nothing(tmp_path: Path) -> None:
    """Prefixes, quoting, colour, rename, algorithm and encoding settings of
    the user's git config must not change what is mined."""
    plain = _quoting(tmp_path / "plain")
    hostile = _quoting(tmp_path / "hostile")
    for key, value in HOSTILE_CONFIG.items():
        git(hostile, "config", key, value)
    results = []
    for repo in (plain, hostile):
        data = repo.parent / "data"
        run = _mine(repo, data)
        assert run.returncode == 0, run.stderr
        records = _cached_records(RepoStore.for_repo(data, repo))
        results.append(sorted(json.dumps({**r, "commit": ""}, sort_keys=True) for r in records))
    assert results[0] == results[1]
    assert any('"path": "tab\\tname.py"' in r for r in results[1])
