"""Which files of a repository are the team's own source, and what they are.

Skip rules (vendored, generated, minified, binary, lock and huge files, the
user's globs and `.shoptalkignore`), language detection by file name, and
which files are tests or documentation. Symbols and module ids come from
`shoptalk.models.module_map` (tree-sitter), shared with the server.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePosixPath

import pathspec

# Mining skips what the server never indexes: one list of each, in the shared core.
from shoptalk.models.exclusion import (
    GENERATED_GLOBS,
    GENERATED_MARKER,
    LOCK_FILES,
    VENDORED_DIRS,
)
from shoptalk.models.module_map import MODULE_LANGUAGES

# The module map's languages (parsed for symbols) plus ones only mined as text.
LANGUAGES: dict[str, str] = {
    **MODULE_LANGUAGES,
    ".rs": "rust",
    ".c": "c",
    ".h": "c",
    ".cc": "cpp",
    ".cpp": "cpp",
    ".hpp": "cpp",
    ".cs": "csharp",
    ".kt": "kotlin",
    ".rb": "ruby",
    ".php": "php",
    ".scala": "scala",
    ".swift": "swift",
    ".sh": "shell",
    ".lua": "lua",
    ".sql": "sql",
}
DOC_EXTENSIONS = {".md", ".rst", ".adoc", ".txt"}

# Keys, certificates and keystores: never code, and never to be shown to a model.
KEY_MATERIAL_SUFFIXES = {
    ".pem",
    ".crt",
    ".cer",
    ".der",
    ".key",
    ".p12",
    ".pfx",
    ".jks",
    ".keystore",
    ".asc",
    ".gpg",
    ".pub",
}


def parse_ignore_file(text: str) -> tuple[str, ...]:
    """The lines of a gitignore-syntax file (`.shoptalkignore`); `ignored_by`
    matches them with pathspec's GitIgnoreSpec, git's own rules (`**`,
    anchors, directory-only patterns, `!` re-includes, escapes)."""
    return tuple(text.splitlines())


@functools.lru_cache(maxsize=64)
def _ignore_spec(lines: tuple[str, ...]) -> pathspec.GitIgnoreSpec:
    return pathspec.GitIgnoreSpec.from_lines(lines)


def ignored_by(rules: Iterable[str], path: str) -> bool:
    lines = tuple(rules)
    return bool(lines) and _ignore_spec(lines).match_file(path)


def language_of(path: str) -> str | None:
    return LANGUAGES.get(PurePosixPath(path).suffix.lower())


def is_doc_file(path: str) -> bool:
    pure = PurePosixPath(path)
    if pure.suffix.lower() not in DOC_EXTENSIONS:
        return False
    lowered = path.lower()
    return (
        "doc" in lowered.split("/")[0]
        or "adr" in lowered
        or "/docs/" in f"/{lowered}"
        or pure.name.lower().startswith(("readme", "architecture", "design"))
        or pure.suffix.lower() in (".md", ".rst", ".adoc")
    )


def is_test_file(path: str) -> bool:
    name = PurePosixPath(path).name
    lowered = name.lower()
    parts = [p.lower() for p in PurePosixPath(path).parts[:-1]]
    return (
        lowered.startswith("test_")
        or re.search(r"[._-](test|spec)\.[a-z]+\Z", lowered) is not None
        or re.search(r"_test\.[a-z]+\Z", lowered) is not None
        or re.search(r"Tests?\.java\Z", name) is not None
        or any(p in ("tests", "test", "__tests__", "spec") for p in parts)
    )


def stem_under_test(path: str) -> str | None:
    """The file stem a test file is about (`test_foo.py`, `foo_test.go`,
    `FooTest.java`, `foo.spec.ts` -> `foo`/`Foo`), or None."""
    base = PurePosixPath(path).name.rsplit(".", 1)[0]
    for pattern in (
        r"\Atest_(.+)\Z",
        r"\A(.+)_test\Z",
        r"\A(.+)Tests?\Z",
        r"\A(.+)[.-](?:test|spec)\Z",
    ):
        match = re.match(pattern, base)
        if match:
            return match.group(1)
    return None


@dataclass(frozen=True)
class SkipRules:
    """Why a path (or content) is not mined; `skip_reason` returns the reason
    as a counter key, or None to keep the file."""

    globs: tuple[str, ...] = ()
    ignore_rules: tuple[str, ...] = ()  # .shoptalkignore lines
    max_file_bytes: int = 1_000_000
    max_line_chars: int = 1000

    def path_reason(self, path: str) -> str | None:
        pure = PurePosixPath(path)
        lowered_parts = [p.lower() for p in pure.parts]
        if any(p in VENDORED_DIRS for p in lowered_parts[:-1]):
            return "vendored"
        name = pure.name.lower()
        if name in LOCK_FILES or name.endswith(".lock"):
            return "lock_file"
        if pure.suffix.lower() in KEY_MATERIAL_SUFFIXES or name.startswith("id_rsa"):
            return "key_material"
        if any(fnmatch.fnmatchcase(name, g) for g in GENERATED_GLOBS):
            return "generated"
        if any(fnmatch.fnmatch(path, g) or fnmatch.fnmatch(name, g) for g in self.globs):
            return "ignore_glob"
        if self.ignore_rules and ignored_by(self.ignore_rules, path):
            return "shoptalkignore"
        return None

    def content_reason(self, data: bytes) -> str | None:
        if len(data) > self.max_file_bytes:
            return "huge"
        if b"\x00" in data[:8192]:
            return "binary"
        if GENERATED_MARKER.search(data[:600]):
            return "generated"
        lines = data.split(b"\n")
        if any(len(line) > self.max_line_chars for line in lines):
            return "minified_or_long_lines"
        return None


def decode_source(data: bytes) -> str | None:
    """UTF-8 text (a BOM is dropped), or None for any other encoding: other
    encodings are skipped and counted, never guessed."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text.removeprefix("\ufeff")
