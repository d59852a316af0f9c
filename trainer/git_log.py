"""Reading a repository's history fast: one streaming `git log -p` process
parsed line by line, and one `git cat-file --batch` process for file contents.

Mining reads every added line of thousands of commits; spawning git (or
building GitPython diff objects) per commit or per file is what makes the
obvious tools slow, so everything here goes through two long-lived pipes.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from shoptalk.models.errors import ShopTalkError

SYMLINK_MODE = "120000"
SUBMODULE_MODE = "160000"

# Field separator in our --format headers: NUL cannot occur in git's metadata
# and marks a header line unambiguously in the patch stream.
_NUL = b"\x00"
_HEADER = b"\x00\x00"


class GitError(ShopTalkError):
    """git refused or is missing."""


def run_git(repo: Path, *args: str, check: bool = True, input_text: str | None = None) -> str:
    """Run git in `repo` and return its stdout (text); raise GitError with git's
    own message when `check` and it fails."""
    try:
        proc = subprocess.run(
            ["git", "-C", str(repo), *args],
            capture_output=True,
            text=True,
            encoding="utf-8",
            errors="replace",
            input=input_text,
            check=False,
        )
    except FileNotFoundError:
        raise GitError("git is not installed or not on PATH; install git and retry") from None
    if check and proc.returncode != 0:
        message = proc.stderr.strip() or f"exit status {proc.returncode}"
        raise GitError(f"`git {' '.join(args[:3])}` failed in {repo}: {message}")
    return proc.stdout


@dataclass
class Hunk:
    """One -U0 hunk: `removed` lines were replaced by `added` lines, which
    start at line `new_start` (1-based) of the new file."""

    old_start: int
    old_count: int
    new_start: int
    new_count: int
    removed: list[str] = field(default_factory=list)
    added: list[str] = field(default_factory=list)


@dataclass
class FileChange:
    old_path: str | None  # None: added
    new_path: str | None  # None: deleted
    old_mode: str | None = None
    new_mode: str | None = None
    new_blob: str | None = None
    binary: bool = False
    renamed: bool = False
    hunks: list[Hunk] = field(default_factory=list)
    truncated: bool = False  # lines past MAX_DIFF_BYTES_PER_FILE were not kept

    @property
    def path(self) -> str:
        return self.new_path if self.new_path is not None else self.old_path or ""

    @property
    def is_symlink(self) -> bool:
        return SYMLINK_MODE in (self.new_mode, self.old_mode)

    @property
    def is_submodule(self) -> bool:
        return SUBMODULE_MODE in (self.new_mode, self.old_mode)

    def added_count(self) -> int:
        return sum(len(h.added) for h in self.hunks)


@dataclass
class Commit:
    sha: str
    parents: tuple[str, ...]
    author_name: str  # after .mailmap (git's %aN)
    author_email: str  # after .mailmap (git's %aE)
    author_time: int  # unix seconds
    message: str
    files: list[FileChange] = field(default_factory=list)

    @property
    def author_date(self) -> str:
        """ISO 8601, UTC."""
        return iso_utc(self.author_time)


def iso_utc(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class CommitSummary:
    """What the cheap first pass learns about a commit (no diff text)."""

    sha: str
    author_name: str
    author_email: str
    author_time: int
    files_touched: int


_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def git_date(value: str) -> str:
    """A date for git's --since/--until/--before: a bare day (2025-06-01)
    means its midnight UTC. Git alone reads it as that day at the current
    time of day, so the same setting would pick a different commit hour by
    hour."""
    return f"{value} 00:00:00 +0000" if _DAY.fullmatch(value.strip()) else value


def _git_base(repo: Path, mailmap_file: Path | None) -> list[str]:
    """git with the settings the parsers rely on, whatever the user's config
    says: paths unquoted unless they hold control characters, quotes or
    backslashes; messages in UTF-8; no signatures in the log."""
    args = ["git", "-C", str(repo), "-c", "core.quotepath=false", "-c", "log.showSignature=false"]
    args += ["-c", "i18n.logOutputEncoding=UTF-8"]
    if mailmap_file is not None:
        args += ["-c", f"mailmap.file={mailmap_file}"]
    return args


def list_commits(
    repo: Path,
    rev: str,
    since: str | None = None,
    until: str | None = None,
    mailmap_file: Path | None = None,
) -> list[CommitSummary]:
    """Non-merge commits reachable from `rev` (newest first) with their
    author and the number of files they touch."""
    args = [
        *_git_base(repo, mailmap_file),
        "log",
        "--no-merges",
        "--no-renames",
        "--name-only",
        "--format=%x00%x00%H%x00%aN%x00%aE%x00%at",
    ]
    if since:
        args.append(f"--since={git_date(since)}")
    if until:
        args.append(f"--until={git_date(until)}")
    args += [rev, "--"]
    proc = subprocess.run(args, capture_output=True, check=False)
    if proc.returncode != 0:
        raise GitError(
            f"`git log` failed in {repo}: {proc.stderr.decode(errors='replace').strip()}"
        )
    commits: list[CommitSummary] = []
    header: list[str] | None = None
    count = 0
    for raw in proc.stdout.split(b"\n"):
        if raw.startswith(_HEADER):
            if header is not None:
                commits.append(_summary(header, count))
            header = raw[2:].decode("utf-8", errors="replace").split("\x00")
            count = 0
        elif raw:
            count += 1
    if header is not None:
        commits.append(_summary(header, count))
    return commits


def _summary(header: list[str], count: int) -> CommitSummary:
    sha, name, email, seconds = header[:4]
    return CommitSummary(sha, name, email, int(seconds), count)


def iter_commits(
    repo: Path, shas: Iterable[str], mailmap_file: Path | None = None
) -> Iterator[Commit]:
    """Stream the given commits (in the given order) with their -U0 patches.

    Renames are detected (a pure rename has no hunks, so it yields no added
    lines); binary files, symlinks and submodules are flagged, not read."""
    args = [
        *_git_base(repo, mailmap_file),
        "log",
        "--no-walk=unsorted",
        "--stdin",
        "-p",
        "-U0",
        "--full-index",
        "--find-renames",
        "--no-color",
        "--no-ext-diff",
        "--no-textconv",
        "--src-prefix=a/",
        "--dst-prefix=b/",
        "--diff-algorithm=myers",  # the same hunks whatever diff.algorithm says
        "--indent-heuristic",
        "--diff-merges=off",
        "--format=%x00%x00%H%x00%P%x00%aN%x00%aE%x00%at%x00%B%x00",
    ]
    sha_list = list(shas)
    if not sha_list:
        return
    proc = subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    # git reads all revisions before printing anything, so writing them all
    # first cannot dead-lock on a full stdout pipe.
    proc.stdin.write(("\n".join(sha_list) + "\n").encode())
    proc.stdin.close()
    try:
        yield from _parse_patch_stream(proc.stdout)
    finally:
        proc.stdout.close()
        stderr = proc.stderr.read() if proc.stderr else b""
        code = proc.wait()
    if code != 0:
        raise GitError(f"`git log -p` failed in {repo}: {stderr.decode(errors='replace').strip()}")


_C_ESCAPES = {
    ord("a"): 7,
    ord("b"): 8,
    ord("t"): 9,
    ord("n"): 10,
    ord("v"): 11,
    ord("f"): 12,
    ord("r"): 13,
    ord('"'): 34,
    ord("\\"): 92,
}
_OCTAL = frozenset(b"01234567")


def decode_path(raw: bytes) -> str:
    """A path's bytes as text; bytes that are not UTF-8 become lone
    surrogates (`surrogateescape`), so nothing is lost and nothing fails here.
    `is_text_path` tells such a path apart."""
    return raw.decode("utf-8", errors="surrogateescape")


def is_text_path(path: str) -> bool:
    """Whether `path` is valid UTF-8 text (it can be written to a JSON line)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unquote(path: bytes) -> str:
    """A path as git prints it: as is, or C-quoted (`"..."` with `\"`, `\\`,
    `\t`, `\n`... and three-digit octal escapes for other bytes) when it holds
    control characters, a quote or a backslash (or, where core.quotePath is
    on, any byte above 0x7f)."""
    if not (len(path) >= 2 and path.startswith(b'"') and path.endswith(b'"')):
        return decode_path(path)
    body = path[1:-1]
    out = bytearray()
    i = 0
    while i < len(body):
        c = body[i]
        if c != 92 or i + 1 == len(body):  # not a backslash (or a stray last one)
            out.append(c)
            i += 1
            continue
        digits = body[i + 1 : i + 4]
        if len(digits) == 3 and all(d in _OCTAL for d in digits):
            out.append(int(digits, 8) & 0xFF)
            i += 4
            continue
        nxt = body[i + 1]
        out.append(_C_ESCAPES.get(nxt, nxt))
        i += 2
    return decode_path(bytes(out))


def quote_path(path: str) -> str:
    """`path` the way git prints it with core.quotePath off: C-quoted when it
    holds a control character, a quote or a backslash; else as is."""
    if not any(ord(c) < 32 or c in '"\\' or ord(c) == 127 for c in path):
        return path
    names = {v: chr(k) for k, v in _C_ESCAPES.items()}
    out = []
    for char in path:
        code = ord(char)
        if code in names and (code < 32 or char in '"\\'):
            out.append("\\" + names[code])
        elif code < 32 or code == 127:
            out.append(f"\\{code:03o}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _file_line_path(field: bytes) -> str | None:
    """The path of a `--- ` / `+++ ` line (without its `a/`/`b/` prefix), or
    None for /dev/null. git ends the line with a tab when the name holds a
    space; an unquoted name never holds a tab (git would quote it)."""
    return _strip_prefix(field.removesuffix(b"\t"))


def _strip_prefix(path: bytes) -> str | None:
    if path == b"/dev/null":
        return None
    name = _unquote(path)
    return name[2:] if name[:2] in ("a/", "b/") else name


def _quoted_end(text: bytes, start: int) -> int:
    """Index just past the C-quoted name that opens at text[start] (a `"`)."""
    i = start + 1
    while i < len(text):
        if text[i] == 92:
            i += 2
            continue
        if text[i] == 34:
            return i + 1
        i += 1
    return len(text)


def _paths_from_diff_line(rest: bytes) -> tuple[str, str]:
    """Old and new path from `diff --git a/X b/Y`, where either may be
    C-quoted (only used when no ---/+++ or rename lines say it better:
    binary files, mode-only changes, pure renames)."""
    if rest.startswith(b'"'):
        end = _quoted_end(rest, 0)
        return _strip_prefix(rest[:end]) or "", _strip_prefix(rest[end + 1 :]) or ""
    if rest.endswith(b'"'):
        # Unquoted old name, quoted new one: the new one opens at the first
        # ` "b/` whose quoted name runs to the end of the line.
        at = rest.find(b' "b/')
        while at >= 0 and _quoted_end(rest, at + 1) != len(rest):
            at = rest.find(b' "b/', at + 1)
        if at >= 0:
            return _strip_prefix(rest[:at]) or "", _strip_prefix(rest[at + 1 :]) or ""
    # Both unquoted: "a/P b/P", the same P twice unless renamed.
    half = (len(rest) - 1) // 2
    old, new = rest[:half], rest[half + 1 :]
    if len(rest) % 2 == 1 and rest[half : half + 1] == b" " and old[2:] == new[2:]:
        return _strip_prefix(old) or "", _strip_prefix(new) or ""
    at = rest.find(b" b/")  # a rename of names with spaces: rename lines follow
    if at < 0:
        return _strip_prefix(rest) or "", _strip_prefix(rest) or ""
    return _strip_prefix(rest[:at]) or "", _strip_prefix(rest[at + 1 :]) or ""


def _parse_hunk_header(line: bytes) -> Hunk:
    # @@ -a[,b] +c[,d] @@ ...
    parts = line.split(b" ", 3)
    old, new = parts[1][1:], parts[2][1:]
    old_start, _, old_count = old.partition(b",")
    new_start, _, new_count = new.partition(b",")
    return Hunk(
        int(old_start),
        int(old_count) if old_count else 1,
        int(new_start),
        int(new_count) if new_count else 1,
    )


# A huge file must not become huge strings: a diff line is cut after this many
# bytes, and a file's diff keeps at most this many bytes of lines (line
# numbers come from the hunk headers, which are always read).
MAX_DIFF_LINE_BYTES = 1 << 20
MAX_DIFF_BYTES_PER_FILE = 1 << 20


def _bounded_lines(stream: IO[bytes]) -> Iterator[bytes]:
    """The lines of `stream`, a `+`/`-` line longer than MAX_DIFF_LINE_BYTES
    cut there (the rest is read and dropped)."""
    while raw := stream.readline(MAX_DIFF_LINE_BYTES):
        if len(raw) == MAX_DIFF_LINE_BYTES and not raw.endswith(b"\n"):
            if raw[:1] in (b"+", b"-"):
                rest = raw
                while rest and not rest.endswith(b"\n"):
                    rest = stream.readline(MAX_DIFF_LINE_BYTES)
                raw += b"\n"
            else:  # a header or message line: read all of it
                parts = [raw]
                while parts[-1] and not parts[-1].endswith(b"\n"):
                    parts.append(stream.readline(MAX_DIFF_LINE_BYTES))
                raw = b"".join(parts)
        yield raw


def _parse_patch_stream(stream: IO[bytes]) -> Iterator[Commit]:
    commit: Commit | None = None
    change: FileChange | None = None
    hunk: Hunk | None = None
    header_parts: list[bytes] = []
    in_header = False
    kept = 0  # bytes of diff lines kept for the current file
    for raw in _bounded_lines(stream):
        line = raw[:-1] if raw.endswith(b"\n") else raw
        if in_header:
            header_parts.append(raw)
            if _NUL in raw:
                commit = _commit_from_header(b"".join(header_parts))
                in_header = False
            continue
        if line.startswith(_HEADER):
            if commit is not None:
                yield commit
            change = hunk = None
            header_parts = [raw]
            # header: NUL NUL sha NUL parents NUL name NUL email NUL time NUL body NUL
            if raw.count(_NUL) >= 8:
                commit = _commit_from_header(raw)
            else:
                commit = None
                in_header = True
            continue
        if commit is None:
            continue
        if line.startswith(b"diff --git "):
            old, new = _paths_from_diff_line(line[len(b"diff --git ") :])
            change = FileChange(old_path=old, new_path=new)
            commit.files.append(change)
            hunk = None
            kept = 0
            continue
        if change is None:
            continue
        if hunk is not None:
            first = line[:1]
            if first in (b"+", b"-"):
                kept += len(line)
                if kept > MAX_DIFF_BYTES_PER_FILE:
                    change.truncated = True
                elif first == b"+":
                    hunk.added.append(line[1:].decode("utf-8", errors="replace"))
                else:
                    hunk.removed.append(line[1:].decode("utf-8", errors="replace"))
                continue
            if first == b"\\":  # "\ No newline at end of file"
                continue
        if line.startswith(b"@@ "):
            hunk = _parse_hunk_header(line)
            change.hunks.append(hunk)
        elif line.startswith(b"--- "):
            change.old_path = _file_line_path(line[4:])
        elif line.startswith(b"+++ "):
            change.new_path = _file_line_path(line[4:])
        elif line.startswith(b"index "):
            blobs, _, mode = line[6:].partition(b" ")
            _, _, new_blob = blobs.partition(b"..")
            change.new_blob = new_blob.decode()
            if mode:
                change.old_mode = change.new_mode = mode.decode()
        elif line.startswith(b"new file mode "):
            change.new_mode = line[14:].decode()
            change.old_path = None
        elif line.startswith(b"deleted file mode "):
            change.old_mode = line[18:].decode()
            change.new_path = None
        elif line.startswith(b"new mode "):
            change.new_mode = line[9:].decode()
        elif line.startswith(b"old mode "):
            change.old_mode = line[9:].decode()
        elif line.startswith(b"rename from "):
            change.old_path = _unquote(line[12:])
            change.renamed = True
        elif line.startswith(b"rename to "):
            change.new_path = _unquote(line[10:])
            change.renamed = True
        elif line.startswith(b"Binary files ") or line.startswith(b"GIT binary patch"):
            change.binary = True
    if commit is not None:
        yield commit


def _commit_from_header(raw: bytes) -> Commit:
    fields = raw[2:].split(_NUL)
    sha, parents, name, email, seconds, body = (f.decode("utf-8", "replace") for f in fields[:6])
    return Commit(
        sha=sha,
        parents=tuple(parents.split()),
        author_name=name,
        author_email=email,
        author_time=int(seconds),
        message=body.strip("\n"),
    )


class BlobReader:
    """File contents by blob id through one `git cat-file --batch` process.

    `read` returns None for a blob larger than `max_bytes` (its bytes are
    drained from the pipe unread), so a 10 MB file never becomes a string."""

    def __init__(self, repo: Path) -> None:
        self._proc = subprocess.Popen(
            ["git", "-C", str(repo), "cat-file", "--batch"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )

    def read(self, blob: str, max_bytes: int | None = None) -> bytes | None:
        proc = self._proc
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(blob.encode() + b"\n")
        proc.stdin.flush()
        header = proc.stdout.readline().split()
        if len(header) < 3 or header[1] == b"missing":
            return None
        size = int(header[2])
        if max_bytes is not None and size > max_bytes:
            remaining = size + 1
            while remaining:
                remaining -= len(proc.stdout.read(min(remaining, 1 << 20)))
            return None
        data = proc.stdout.read(size)
        proc.stdout.read(1)  # the newline after each object
        return data

    def close(self) -> None:
        if self._proc.stdin:
            self._proc.stdin.close()
        if self._proc.stdout:
            self._proc.stdout.close()
        self._proc.wait()

    def __enter__(self) -> BlobReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tree_paths(repo: Path, rev: str) -> list[str]:
    """Regular files (no symlinks, no submodules) in the tree of `rev`."""
    out = subprocess.run(
        ["git", "-C", str(repo), "ls-tree", "-r", "-z", "--full-tree", rev],
        capture_output=True,
        check=False,
    )
    if out.returncode != 0:
        return []
    paths: list[str] = []
    for entry in out.stdout.split(b"\x00"):
        if not entry:
            continue
        meta, _, path = entry.partition(b"\t")
        mode = meta.split(b" ", 1)[0]
        if mode in (b"100644", b"100755"):
            paths.append(decode_path(path))
    return paths
