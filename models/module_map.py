"""The module map of a source tree: which modules exist, where they live, what
they define, say and import.

Built from a folder on disk (`module_map_from_tree`) or from `{path: text}`
contents, e.g. the blobs of a historical commit (`build_module_map`), so that
mining and serving agree on what a module id is:

- Python: the dotted import path. A file inside a chain of packages (folders
  with `__init__.py`) is named from the topmost package; `pkg/__init__.py` is
  `pkg`; other files are named from their path with a leading `src/` dropped.
- Java: the declared `package` (the folder, dotted, when there is none).
- Go, JavaScript, TypeScript: the folder (POSIX path relative to the root,
  `.` for the root itself), as these languages group files by folder.

Symbols, docstrings and imports come from tree-sitter grammars (the
`tree-sitter-<language>` wheels, which work offline; the language pack is a
fallback). Pure: nothing here touches git, the network or the user's files
beyond reading them in `module_map_from_tree`.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

# File suffix -> language, for the languages this map parses.
MODULE_LANGUAGES: dict[str, str] = {
    ".py": "python",
    ".pyi": "python",
    ".java": "java",
    ".js": "javascript",
    ".mjs": "javascript",
    ".cjs": "javascript",
    ".jsx": "javascript",
    ".ts": "typescript",
    ".mts": "typescript",
    ".cts": "typescript",
    ".tsx": "tsx",
    ".go": "go",
}

# Folders never part of the team's own modules.
SKIPPED_DIRS = frozenset(
    {
        "node_modules",
        "bower_components",
        "vendor",
        "vendored",
        "third_party",
        "third-party",
        "site-packages",
        "venv",
        "dist",
        "build",
        "__pycache__",
    }
)
DEFAULT_MAX_FILE_BYTES = 1_000_000
DOC_CHARS = 400  # a module's doc is a summary, not the whole header


@dataclass(frozen=True)
class Symbol:
    """A function, method, class or type defined in a module."""

    name: str  # qualified within its file: `Outer.method`
    kind: str  # "function" | "method" | "class" | "interface" | "type"
    path: str  # POSIX path of the file that defines it
    start_line: int  # 1-based, inclusive
    end_line: int  # 1-based, inclusive
    doc: str | None = None  # first line of its docstring / leading comment


@dataclass(frozen=True)
class FileSummary:
    """What one source file contributes to its module."""

    path: str
    language: str
    module_id: str
    doc: str
    symbols: tuple[Symbol, ...]
    imports: tuple[str, ...]
    line_count: int
    package: str | None = None  # the declared package (Java), which names the module


@dataclass(frozen=True)
class Module:
    """One module: a Python module/package, a Java package or a folder."""

    id: str
    language: str
    path: str  # the file a lookup points at (package `__init__.py`, the documented file, ...)
    files: tuple[str, ...]
    symbols: tuple[Symbol, ...]
    doc: str  # module docstring or leading comment ("" when none)
    imports: tuple[str, ...]  # module names / import paths as written (relative ones resolved)
    line_count: int = 0  # lines of `path`

    def summary(self) -> str:
        """One line for prompts and reasons: the doc's first sentence, else its symbols."""
        if self.doc:
            first = self.doc.strip().split("\n\n", 1)[0]
            return " ".join(first.split())[:200]
        names = [s.name for s in self.symbols[:6]]
        return ("defines " + ", ".join(names)) if names else ""


@dataclass(frozen=True)
class ModuleMap:
    """All modules of a tree, by id; `files` maps each parsed file to its summary."""

    modules: Mapping[str, Module]
    files: Mapping[str, FileSummary] = field(default_factory=dict)

    def ids(self) -> list[str]:
        return sorted(self.modules)

    def get(self, module_id: str) -> Module | None:
        return self.modules.get(module_id)

    def module_of(self, path: str) -> Module | None:
        summary = self.files.get(_posix(path))
        return self.modules.get(summary.module_id) if summary else None

    def __len__(self) -> int:
        return len(self.modules)

    def with_file(self, path: str, text: str | None) -> ModuleMap:
        """This map after `path` changed to `text` (None: deleted). Module ids of
        Python files depend on which `__init__.py` exist, so adding or removing
        one rebuilds from the known summaries' paths."""
        key = _posix(path)
        files = dict(self.files)
        if text is None:
            files.pop(key, None)
        else:
            known_paths = set(files) | {key}
            summary = summarize_file(key, text, known_paths)
            if summary is None:
                files.pop(key, None)
            else:
                files[key] = summary
        if PurePosixPath(key).name == "__init__.py":
            paths = set(files)
            files = {
                p: replace(s, module_id=module_id_for(p, s.language, paths, s.package))
                for p, s in files.items()
            }
        return ModuleMap(_group(files.values()), files)


def language_for(path: str) -> str | None:
    """The parsed language of a file, by suffix; None for files the map skips."""
    return MODULE_LANGUAGES.get(PurePosixPath(path).suffix.lower())


def _posix(path: str) -> str:
    return PurePosixPath(path.replace("\\", "/")).as_posix().removeprefix("./")


def python_module_id(path: str, paths: Iterable[str] | set[str]) -> str:
    """Dotted module name of a Python file; `paths` is every file of the tree
    (used to find `__init__.py` files)."""
    known = paths if isinstance(paths, set) else set(paths)
    pure = PurePosixPath(_posix(path))
    parts = list(pure.parent.parts)
    stem = pure.stem
    # Walk up while the folder is a package; the topmost package names the module.
    top = len(parts)
    while top > 0 and "/".join([*parts[:top], "__init__.py"]) in known:
        top -= 1
    if top < len(parts):
        dotted = parts[top:]
    else:
        dotted = parts[1:] if parts and parts[0] == "src" else parts
    names = dotted if stem == "__init__" else [*dotted, stem]
    return ".".join(names) if names else stem


def module_id_for(
    path: str, language: str, paths: Iterable[str] | set[str], java_package: str | None = None
) -> str:
    """The module id a file belongs to (see the module docstring)."""
    if language == "python":
        return python_module_id(path, paths)
    if language == "java" and java_package:
        return java_package
    folder = PurePosixPath(_posix(path)).parent.as_posix()
    if language == "java":
        return folder.replace("/", ".") if folder != "." else "."
    return folder


# ---- tree-sitter --------------------------------------------------------------


@functools.cache
def _parser(language: str) -> Any:
    """A tree-sitter parser for `language`, or None when no grammar is installed."""
    try:
        from tree_sitter import Language, Parser
    except ImportError:
        return None
    grammar: Any = None
    try:
        if language == "python":
            import tree_sitter_python

            grammar = tree_sitter_python.language()
        elif language == "java":
            import tree_sitter_java

            grammar = tree_sitter_java.language()
        elif language == "javascript":
            import tree_sitter_javascript

            grammar = tree_sitter_javascript.language()
        elif language in ("typescript", "tsx"):
            import tree_sitter_typescript

            grammar = (
                tree_sitter_typescript.language_tsx()
                if language == "tsx"
                else tree_sitter_typescript.language_typescript()
            )
        elif language == "go":
            import tree_sitter_go

            grammar = tree_sitter_go.language()
    except ImportError:
        grammar = None
    if grammar is not None:
        return Parser(Language(grammar))
    try:
        # The pack downloads grammars on first use, which fails offline.
        from tree_sitter_language_pack import get_parser

        return get_parser(language)
    except Exception:
        return None


def has_grammar(language: str) -> bool:
    return _parser(language) is not None


_CLASS_KINDS: dict[str, str] = {
    "class_definition": "class",
    "class_declaration": "class",
    "abstract_class_declaration": "class",
    "enum_declaration": "class",
    "record_declaration": "class",
    "interface_declaration": "interface",
    "type_alias_declaration": "type",
}
_FUNCTION_TYPES = frozenset(
    {
        "function_definition",
        "function_declaration",
        "generator_function_declaration",
        "method_definition",
        "method_declaration",
        "constructor_declaration",
    }
)
# Wrappers whose children are the real definitions.
_TRANSPARENT = frozenset(
    {"decorated_definition", "export_statement", "type_declaration", "program", "module"}
)


def _text(node: Any) -> str:
    raw = node.text
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else ""


def _string_literal(node: Any) -> str:
    raw = _text(node)
    raw = re.sub(r"\A[rRbBuUfF]*('''|\"\"\"|'|\"|`)", "", raw)
    return re.sub(r"('''|\"\"\"|'|\"|`)\Z", "", raw)


def _comment_text(raw: str) -> str:
    lines = []
    for line in raw.splitlines():
        stripped = line.strip()
        stripped = re.sub(r"\A(/\*\*?|\*/|\*|//+|#+)\s?", "", stripped)
        stripped = re.sub(r"\*/\Z", "", stripped).rstrip()
        lines.append(stripped)
    return "\n".join(lines).strip()


def _python_docstring(body: Any) -> str | None:
    if body is None or not body.named_children:
        return None
    first = body.named_children[0]
    if first.type != "expression_statement" or not first.named_children:
        return None
    string = first.named_children[0]
    if string.type != "string":
        return None
    return _string_literal(string).strip()


def _leading_comment(node: Any) -> str | None:
    """The comment block directly above `node` (javadoc, `//` lines)."""
    comments: list[str] = []
    sibling = node.prev_named_sibling
    line = node.start_point[0]
    while sibling is not None and sibling.type in ("comment", "line_comment", "block_comment"):
        if sibling.end_point[0] < line - 1:
            break
        comments.insert(0, _text(sibling))
        line = sibling.start_point[0]
        sibling = sibling.prev_named_sibling
    return _comment_text("\n".join(comments)) if comments else None


_LICENSE = re.compile(r"(?i)copyright|licen[sc]e|spdx-license")


def _file_doc(root: Any, language: str) -> str:
    if language == "python":
        doc = _python_docstring(root)
        return doc or ""
    # The first comment block of the file that is not a license header.
    blocks: list[list[Any]] = []
    for child in root.named_children:
        if child.type not in ("comment", "line_comment", "block_comment"):
            if blocks:
                break
            if child.type in ("package_clause", "package_declaration", "expression_statement"):
                continue
            break
        if blocks and child.start_point[0] <= blocks[-1][-1].end_point[0] + 1:
            blocks[-1].append(child)
        else:
            blocks.append([child])
    for block in blocks:
        text = _comment_text("\n".join(_text(c) for c in block))
        if text and not _LICENSE.search(text[:200]):
            return text
    return ""


def _first_line(doc: str | None) -> str | None:
    if not doc:
        return None
    for line in doc.strip().splitlines():
        if line.strip():
            return line.strip()
    return None


def _symbols(root: Any, language: str, path: str) -> list[Symbol]:
    found: list[Symbol] = []

    def visit(node: Any, scope: tuple[str, ...], in_class: bool) -> None:
        for child in node.named_children:
            kind_type = child.type
            if kind_type in _TRANSPARENT:
                visit(child, scope, in_class)
                continue
            if language == "go" and kind_type == "type_spec":
                name_node = child.child_by_field_name("name")
                if name_node is not None:
                    type_node = child.child_by_field_name("type")
                    kind = (
                        "interface"
                        if type_node is not None and type_node.type == "interface_type"
                        else "type"
                    )
                    found.append(_symbol(child, _text(name_node), kind, path, language))
                continue
            is_class = kind_type in _CLASS_KINDS
            is_function = kind_type in _FUNCTION_TYPES
            if language in ("javascript", "typescript", "tsx") and kind_type in (
                "lexical_declaration",
                "variable_declaration",
            ):
                # `const handler = (...) => {...}` is how JS names most functions.
                for declarator in child.named_children:
                    value = declarator.child_by_field_name("value")
                    name_node = declarator.child_by_field_name("name")
                    if (
                        value is not None
                        and name_node is not None
                        and value.type in ("arrow_function", "function_expression", "function")
                    ):
                        name = ".".join((*scope, _text(name_node)))
                        found.append(_symbol(child, name, "function", path, language))
                continue
            if not (is_class or is_function):
                if in_class and kind_type in ("class_body", "declaration_list", "interface_body"):
                    visit(child, scope, in_class)
                continue
            name_node = child.child_by_field_name("name")
            if name_node is None:
                continue
            name = _text(name_node)
            if language == "go" and kind_type == "method_declaration":
                receiver = child.child_by_field_name("receiver")
                owner = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", _text(receiver) if receiver else "")
                if owner:
                    name = f"{owner[-1]}.{name}"
            qualified = ".".join((*scope, name))
            if is_class:
                kind = _CLASS_KINDS[kind_type]
            else:
                kind = "method" if in_class or kind_type == "method_declaration" else "function"
            found.append(_symbol(child, qualified, kind, path, language))
            if is_class:
                body = child.child_by_field_name("body")
                if body is not None:
                    visit(body, (*scope, name), True)

    visit(root, (), False)
    return found


def _symbol(node: Any, name: str, kind: str, path: str, language: str) -> Symbol:
    if language == "python":
        doc = _python_docstring(node.child_by_field_name("body"))
    else:
        doc = _leading_comment(node)
        if doc is None and node.parent is not None and node.parent.type == "export_statement":
            doc = _leading_comment(node.parent)
    return Symbol(
        name=name,
        kind=kind,
        path=path,
        start_line=node.start_point[0] + 1,
        end_line=node.end_point[0] + 1,
        doc=_first_line(doc),
    )


def _resolve_relative(module: str, current: str, is_package: bool) -> str:
    dots = len(module) - len(module.lstrip("."))
    if dots == 0:
        return module
    base = current.split(".") if current else []
    if not is_package:
        base = base[:-1]
    if dots > 1:
        base = base[: max(0, len(base) - (dots - 1))]
    rest = module[dots:]
    return ".".join([*base, rest] if rest else base)


def _imports(root: Any, language: str, module_id: str, path: str) -> list[str]:
    found: list[str] = []
    is_package = PurePosixPath(path).name == "__init__.py"
    stack = list(root.named_children)
    while stack:
        node = stack.pop(0)
        kind = node.type
        if language == "python":
            if kind == "import_statement":
                for name in node.children_by_field_name("name"):
                    target = (
                        name.child_by_field_name("name") if name.type == "aliased_import" else name
                    )
                    if target is not None:
                        found.append(_text(target))
            elif kind == "import_from_statement":
                module_node = node.child_by_field_name("module_name")
                if module_node is not None:
                    found.append(_resolve_relative(_text(module_node), module_id, is_package))
            elif kind in ("if_statement", "try_statement", "block", "else_clause", "except_clause"):
                # Guarded imports (`try: import x`) are still dependencies.
                stack.extend(node.named_children)
        elif language == "java" and kind == "import_declaration":
            text = _text(node).removeprefix("import").removesuffix(";").strip()
            found.append(text.removeprefix("static ").strip())
        elif language in ("javascript", "typescript", "tsx"):
            if kind in ("import_statement", "export_statement"):
                source = node.child_by_field_name("source")
                if source is not None:
                    found.append(_string_literal(source))
        elif language == "go" and kind == "import_declaration":
            for spec in _descendants(node, "import_spec"):
                path_node = spec.child_by_field_name("path")
                if path_node is not None:
                    found.append(_string_literal(path_node))
    return list(dict.fromkeys(found))


def _descendants(node: Any, kind: str) -> Iterable[Any]:
    stack = [node]
    while stack:
        current = stack.pop()
        if current.type == kind:
            yield current
        stack.extend(reversed(current.named_children))


def _java_package_of(root: Any) -> str | None:
    for child in root.named_children:
        if child.type == "package_declaration":
            for part in child.named_children:
                if part.type in ("scoped_identifier", "identifier"):
                    return _text(part)
    return None


def summarize_file(path: str, text: str, paths: Iterable[str] | set[str]) -> FileSummary | None:
    """Parse one file; None when its language is not parsed here or it has no grammar."""
    key = _posix(path)
    language = language_for(key)
    if language is None:
        return None
    parser = _parser(language)
    if parser is None:
        return None
    tree = parser.parse(text.encode("utf-8", errors="replace"))
    root = tree.root_node
    java_package = _java_package_of(root) if language == "java" else None
    module_id = module_id_for(key, language, paths, java_package)
    symbols = _symbols(root, language, key)
    doc = _file_doc(root, language)
    if not doc and language != "python":
        # Java and TS files document their main type, not the file.
        doc = next((s.doc for s in symbols if s.kind != "method" and s.doc), None) or ""
    return FileSummary(
        path=key,
        language="typescript" if language == "tsx" else language,
        module_id=module_id,
        doc=doc[: DOC_CHARS * 4],
        symbols=tuple(symbols),
        imports=tuple(_imports(root, language, module_id, key)),
        line_count=text.count("\n") + (0 if text.endswith("\n") or not text else 1),
        package=java_package,
    )


_MAIN_FILE_STEMS = ("__init__", "index", "main", "mod", "doc", "package-info")


def _group(summaries: Iterable[FileSummary]) -> dict[str, Module]:
    grouped: dict[str, list[FileSummary]] = {}
    for summary in summaries:
        grouped.setdefault(summary.module_id, []).append(summary)
    modules: dict[str, Module] = {}
    for module_id, members in grouped.items():
        members.sort(key=lambda s: s.path)
        main = _main_file(members)
        doc = main.doc or next((m.doc for m in members if m.doc), "")
        languages = [m.language for m in members]
        symbols = tuple(
            s for m in [main, *[m for m in members if m is not main]] for s in m.symbols
        )
        modules[module_id] = Module(
            id=module_id,
            language=max(set(languages), key=languages.count),
            path=main.path,
            files=tuple(m.path for m in members),
            symbols=symbols,
            doc=_clip_doc(doc),
            imports=tuple(dict.fromkeys(i for m in members for i in m.imports)),
            line_count=main.line_count,
        )
    return dict(sorted(modules.items()))


def _main_file(members: list[FileSummary]) -> FileSummary:
    for stem in _MAIN_FILE_STEMS:
        for member in members:
            if PurePosixPath(member.path).stem == stem:
                return member
    documented = [m for m in members if m.doc]
    pool = documented or members
    return max(pool, key=lambda m: (len(m.symbols), -len(m.path)))


def _clip_doc(doc: str) -> str:
    if len(doc) <= DOC_CHARS:
        return doc
    cut = doc.rfind("\n", 0, DOC_CHARS)
    return doc[: cut if cut > 0 else DOC_CHARS].rstrip()


def module_map_of(files: Mapping[str, FileSummary]) -> ModuleMap:
    """The module map of already parsed files (`summarize_file`), their
    module ids recomputed for this set of paths (Python ids depend on which
    `__init__.py` exist)."""
    paths = set(files)
    current = {
        p: replace(s, module_id=module_id_for(p, s.language, paths, s.package))
        for p, s in files.items()
    }
    return ModuleMap(_group(current.values()), current)


def build_module_map(contents: Mapping[str, str]) -> ModuleMap:
    """The module map of `{posix path: text}` (a checkout, or the blobs of a
    commit). Files in other languages are ignored."""
    normalized = {_posix(p): t for p, t in contents.items()}
    paths = set(normalized)
    files: dict[str, FileSummary] = {}
    for path in sorted(normalized):
        summary = summarize_file(path, normalized[path], paths)
        if summary is not None:
            files[path] = summary
    return ModuleMap(_group(files.values()), files)


def source_paths(root: Path, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> list[str]:
    """POSIX paths (relative to `root`) of the files a module map reads: parsed
    languages, outside hidden and vendored folders, not larger than the limit."""
    found: list[str] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS)
        for name in sorted(names):
            if language_for(name) is None:
                continue
            full = Path(folder) / name
            try:
                if not full.is_file() or full.stat().st_size > max_file_bytes:
                    continue
            except OSError:
                continue
            found.append(full.relative_to(root).as_posix())
    return found


def module_map_from_tree(root: Path, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> ModuleMap:
    """The module map of a folder on disk; files that are not UTF-8 are skipped."""
    contents: dict[str, str] = {}
    for rel in source_paths(root, max_file_bytes):
        try:
            data = (root / rel).read_bytes()
            contents[rel] = data.decode("utf-8").removeprefix("\ufeff")
        except (OSError, UnicodeDecodeError):
            continue
    return build_module_map(contents)
