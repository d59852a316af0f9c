"""Names a lookup query spells out point at the module that defines them."""

from __future__ import annotations

from shoptalk.models.module_lookup import ModuleIndex, lookup_modules
from shoptalk.models.module_map import build_module_map
from shoptalk.models.module_names import NamedModule, NameTable

FORMATTING = '''"""Help output."""


class HelpFormatter:
    """Formats help pages."""

    def write_usage(self, prog):
        """Write the usage line."""
        return prog


def wrap_text(text):
    """Wrap text to the terminal width."""
    return text
'''

CORE = '''"""Commands, groups and their parameters: the core of the library."""


class Command:
    """A command with options and arguments. Formats help and usage."""

    def format_help(self, ctx):
        """Format the help page of the command: usage, options, text."""
        return ctx

    def main(self):
        return 0

    def open(self):
        return None
'''

UTILS = '''"""Small helpers."""


def main():
    return 0


def open(path):
    return path


def echo(message):
    """Print a message and a newline."""
    return message
'''

SHELL = '''"""Shell completion."""


def main():
    return 0


def split_arg_string(string):
    """Split an argument string as a shell would."""
    return string.split()
'''


def index() -> ModuleIndex:
    files = {
        "src/tool/__init__.py": "",
        "src/tool/formatting.py": FORMATTING,
        "src/tool/core.py": CORE,
        "src/tool/utils.py": UTILS,
        "src/tool/shell_completion.py": SHELL,
        "src/tool/extra.py": "def main():\n    return 0\n",
        "tests/test_formatting.py": "def write_usage():\n    pass\n",
    }
    return ModuleIndex(build_module_map(files))


def named(query: str) -> list[str]:
    idx = index()
    return [n.id for n in idx.names.named(query, set(idx.candidates(query)))]


def test_code_written_names_point_at_their_definers() -> None:
    assert named("Fix `HelpFormatter.write_usage` producing spurious characters") == [
        "tool.formatting"
    ]
    assert named("optimize split_arg_string with extend") == ["tool.shell_completion"]
    assert named("make wrap_text() faster") == ["tool.formatting"]
    assert named("Add type annotations in `formatting`") == ["tool.formatting"]
    # A plain word that is a module's name is prose too.
    assert named("Document the shell completion utils") == []


def test_prose_and_names_defined_everywhere_point_nowhere() -> None:
    # "open" and "echo" are functions here, but as plain words they are prose.
    assert named("open the file and echo a message") == []
    # `main` is defined in four modules: it points at none of them.
    assert named("Fix `main` exit code") == []
    # Test modules are not answers unless the query asks for tests.
    # (the test module also defines `write_usage`)
    assert named("`write_usage` prints the name twice") == ["tool.formatting"]


def test_a_named_module_wins_the_fused_lookup_and_is_not_abstained() -> None:
    idx = index()
    query = "the command help options usage: `wrap_text`"
    # BM25 alone prefers core: its documents say command, help, options and usage.
    assert idx.bm25(query, 5)[0][0] == "tool.core"
    answer = lookup_modules(query, idx, None, 3)
    assert answer.ids()[:2] == ["tool.formatting", "tool.core"]
    assert "wrap_text" in answer.hits[0].reason
    assert not answer.abstained


def test_the_table_indexes_symbols_and_module_names() -> None:
    table = NameTable.of(
        build_module_map({"pkg/_termui_impl.py": "def open_url(u):\n    pass\n"}).modules.values()
    )
    assert table.named("fix `termui_impl.open_url`", {"pkg._termui_impl"}) == [
        NamedModule("pkg._termui_impl", "termui_impl")
    ]


def test_full_module_ids_and_file_paths_name_their_module() -> None:
    assert named("Deprecate tool.utils.echo") == ["tool.utils"]
    assert named("Add annotations to src/tool/shell_completion.py") == ["tool.shell_completion"]
    assert named("Add annotations to shell_completion.py and utils.py") == [
        "tool.shell_completion",
        "tool.utils",
    ]
