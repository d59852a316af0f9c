"""The context engine's pure parts: exclusion, the workspace index (windows,
BM25 retrieval, incremental updates), the context block (snippets, imported
definitions, recent files, budget, stability while typing), copy candidates,
and the prompt layouts shared by serving and training."""

from __future__ import annotations

from pathlib import Path

import pytest

from shoptalk.models import workspace_index
from shoptalk.models.catalog import GEMMA3_FIM, QWEN_CODER_FIM
from shoptalk.models.completion import EngineOptions, needed_context_tokens, plan_prompt
from shoptalk.models.context import (
    ContextOptions,
    Workspace,
    build_context,
    copy_candidates,
)
from shoptalk.models.exclusion import Exclusion
from shoptalk.models.module_map import build_module_map
from shoptalk.models.prompt import (
    PromptParts,
    clip_context,
    completion_prompt,
    file_header,
    resolve_suffix_layout,
    suffix_block,
)
from shoptalk.models.workspace_index import (
    CHUNK_LINES,
    IndexLimits,
    WorkspaceIndex,
    window_starts,
)

TAXES = '''"""Value added tax."""

RATES = {"fr": 0.2, "de": 0.19}


def vat_rate(country: str) -> float:
    """The value added tax rate of a country (ISO code)."""
    return RATES[country]


def unrelated_helper():
    return 42
'''

LEDGER = "".join(
    f"def ledger_entry_{i}(journal_book, amount):\n"
    f"    journal_book.append_posting(amount, reconcile_flag={i})\n\n"
    for i in range(12)
)

INVOICES_HEAD = """from billing.taxes import vat_rate


def total_with_tax(lines, country):
    subtotal = sum(line.amount for line in lines)
"""

SECRET_LINE = "journal_book.append_posting(amount, reconcile_flag=SECRET_TOKEN_X9)"


def write_workspace(root: Path) -> Path:
    files = {
        "billing/__init__.py": '"""Billing."""\n',
        "billing/taxes.py": TAXES,
        "billing/invoices.py": INVOICES_HEAD,
        "accounting/ledger.py": LEDGER,
        # Excluded or skipped: none of these may ever reach a prompt.
        ".env": f"{SECRET_LINE}\n",
        "config/credentials.py": f"{SECRET_LINE}\n",
        "private/notes.py": f"{SECRET_LINE}\n",
        "vendor/lib.py": f"{SECRET_LINE}\n",
        "generated_pb2.py": f"{SECRET_LINE}\n",
        "binary.py": "journal_book = 1\x00\n",
        "README.md": "journal_book docs\n",
    }
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (root / "latin.py").write_bytes("journal_book = 'caf\xe9'\n".encode("latin-1"))
    (root / ".shoptalkignore").write_text("private/\n")
    return root


@pytest.fixture
def workspace_root(tmp_path: Path) -> Path:
    return write_workspace(tmp_path / "ws")


def workspace_of(root: Path) -> Workspace:
    index = WorkspaceIndex.from_tree(root)
    contents = {p: index.text(p) or "" for p in index.paths()}
    return Workspace(index, build_module_map(contents))


# ---- exclusion ---------------------------------------------------------------------


def test_exclusion_never_sends_keys_secrets_and_ignored_files() -> None:
    rules = Exclusion("private/\n*.local.py\n!keep.local.py\n", ("*.draft.py",))
    assert rules.reason(".env") == "never_send"
    assert rules.reason("deploy/.env.production") == "never_send"
    assert rules.reason("certs/Server.PEM") == "never_send"
    assert rules.reason("config/AppSecrets.py") == "never_send"
    assert rules.reason("home/.ssh/config") == "never_send"
    assert rules.reason("id_rsa.pub") == "never_send"
    assert rules.reason("private/plan.py") == "shoptalkignore"
    assert rules.reason("x/settings.local.py") == "shoptalkignore"
    assert rules.reason("keep.local.py") is None
    assert rules.reason("notes/today.draft.py") == "ignore_glob"
    assert rules.reason("billing/taxes.py") is None


def test_exclusion_reads_the_ignore_file_but_not_through_a_link_out(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("billing/\n")
    root = tmp_path / "repo"
    root.mkdir()
    (root / ".shoptalkignore").symlink_to(outside)
    assert Exclusion.for_root(root).reason("billing/taxes.py") is None
    (root / ".shoptalkignore").unlink()
    (root / ".shoptalkignore").write_text("billing/\n")
    assert Exclusion.for_root(root).reason("billing/taxes.py") == "shoptalkignore"


# ---- the index ---------------------------------------------------------------------


def test_windows_overlap_and_cover_the_file() -> None:
    assert window_starts(1) == [0]
    assert window_starts(CHUNK_LINES) == [0]
    assert window_starts(CHUNK_LINES + 1) == [0, 8]
    assert window_starts(40) == [0, 8, 16, 24]


def test_index_reads_only_the_teams_source(workspace_root: Path) -> None:
    index = WorkspaceIndex.from_tree(workspace_root)
    assert index.paths() == [
        "accounting/ledger.py",
        "billing/__init__.py",
        "billing/invoices.py",
        "billing/taxes.py",
    ]
    skipped = index.stats()["skipped"]
    assert skipped == {"binary": 1, "not_utf8": 1}  # the rest never got past their names
    for path in (".env", "config/credentials.py", "private/notes.py", "vendor/lib.py"):
        assert not index.update(path, f"{SECRET_LINE}\n")
        assert not index.update_from_disk(workspace_root, path)  # closed, changed on disk
        assert path not in index
    assert index.excludes("config/credentials.py")
    assert not index.excludes("billing/taxes.py")


def test_search_ranks_the_window_sharing_rare_identifiers(workspace_root: Path) -> None:
    index = WorkspaceIndex.from_tree(workspace_root)
    found = index.search(["vat_rate", "country", "RATES"], 3)
    assert found[0].path == "billing/taxes.py"
    assert "def vat_rate" in found[0].text
    assert found[0].score > (found[1].score if len(found) > 1 else 0)
    skipped = index.search(["vat_rate", "RATES"], 3, skip=lambda p, s, e: p == "billing/taxes.py")
    assert all(w.path != "billing/taxes.py" for w in skipped)
    assert index.search(["never_seen_identifier"], 3) == []


def test_incremental_updates_replace_a_files_windows(workspace_root: Path) -> None:
    index = WorkspaceIndex.from_tree(workspace_root)
    version = index.version
    assert index.update("billing/taxes.py", TAXES.replace("vat_rate", "sales_levy"))
    assert index.version > version
    assert all(w.path != "billing/taxes.py" for w in index.search(["vat_rate"], 5))
    assert index.search(["sales_levy"], 1)[0].path == "billing/taxes.py"
    assert index.update("billing/new_module.py", "def freshly_added():\n    return 1\n")
    assert index.search(["freshly_added"], 1)[0].path == "billing/new_module.py"
    index.remove("billing/new_module.py")
    assert index.search(["freshly_added"], 1) == []
    # Unchanged text is not reindexed.
    version = index.version
    index.update("billing/__init__.py", '"""Billing."""\n')
    assert index.version == version
    # From disk: an edit, then a deletion.
    (workspace_root / "billing" / "taxes.py").write_text("def stamp_duty():\n    pass\n")
    assert index.update_from_disk(workspace_root, "billing/taxes.py")
    assert index.search(["stamp_duty"], 1)[0].path == "billing/taxes.py"
    (workspace_root / "billing" / "taxes.py").unlink()
    assert not index.update_from_disk(workspace_root, "billing/taxes.py")
    assert "billing/taxes.py" not in index


def test_compaction_keeps_results_after_many_edits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(workspace_index, "COMPACT_MIN_DEAD", 100)
    index = WorkspaceIndex()
    index.update("a.py", "def anchor_function():\n    return other_name\n")
    for name in ("c", "d", "e"):
        index.update(f"{name}.py", f"def unrelated_{name}():\n    pass\n")
    for round_number in range(500):
        text = f"def churn_{round_number % 3}():\n    return anchor_function\n" * 2
        index.update("b.py", text + f"# {round_number}\n")
    assert index.stats()["windows"] == 5
    assert len(index._chunks) <= 2 * 100 + 5  # dead windows were dropped
    best = index.search(["anchor_function", "other_name"], 2)
    assert [w.path for w in best] == ["a.py", "b.py"]


def test_caps_on_files_and_bytes() -> None:
    index = WorkspaceIndex(limits=IndexLimits(max_files=2, max_bytes=10_000))
    assert index.update("a.py", "alpha_one = 1\n")
    assert index.update("b.py", "beta_two = 2\n")
    assert not index.update("c.py", "gamma_three = 3\n")
    assert not index.update("a.py", "x = 1\n" * 5000)  # would pass the byte cap
    assert index.stats()["skipped"]["cap"] == 2
    assert len(index) == 1


# ---- the context block -------------------------------------------------------------


def test_context_block_has_snippets_and_imported_definitions(workspace_root: Path) -> None:
    workspace = workspace_of(workspace_root)
    prefix = (
        INVOICES_HEAD + "    journal_book.append_posting(subtotal, reconcile_flag=1)\n    tax = "
    )
    block = build_context(
        workspace, "billing/invoices.py", prefix, "\n", ContextOptions(chars=1500)
    )
    assert len(block) <= 1500
    assert file_header("accounting/ledger.py") in block  # a snippet of another file
    assert "journal_book.append_posting(amount, reconcile_flag=" in block
    assert file_header("billing/taxes.py") in block  # the imported definition
    assert 'def vat_rate(country: str) -> float:\n    """The value added tax rate' in block
    assert "return RATES[country]" not in block  # signature and docstring, not the body
    assert "unrelated_helper" not in block  # not imported
    # The imported definition sits last, nearest the cursor.
    assert block.rindex("def vat_rate") > block.rindex("journal_book")
    assert "SECRET_TOKEN_X9" not in block
    # Off: no block.
    assert build_context(workspace, "billing/invoices.py", prefix, "", ContextOptions()) == ""
    sources = ContextOptions(chars=1500, sources=("imports",))
    only_imports = build_context(workspace, "billing/invoices.py", prefix, "", sources)
    assert "def vat_rate" in only_imports and "journal_book" not in only_imports


def test_context_block_is_stable_while_typing_and_skips_visible_lines() -> None:
    index = WorkspaceIndex()
    current = LEDGER + "def post(journal_book):\n"
    index.update("accounting/ledger.py", current)
    workspace = Workspace(index)
    options = ContextOptions(chars=2000, prefix_chars=200)
    first = build_context(workspace, "accounting/ledger.py", current + "    jour", "", options)
    typed = build_context(
        workspace, "accounting/ledger.py", current + "    journal_book.app", ")\n", options
    )
    assert first == typed and first
    # The last lines before the cursor are in the prompt itself: never repeated.
    visible = current.split("\n")[-6:-1]
    assert all(line not in first for line in visible if line.strip())
    # A budget smaller than any piece leaves the block empty.
    assert build_context(workspace, "x.py", current, "", ContextOptions(chars=20)) == ""


def test_recent_files_source(workspace_root: Path) -> None:
    workspace = workspace_of(workspace_root)
    prefix = "def settle(country):\n    rate = RATES[country]\n"
    options = ContextOptions(chars=800, sources=("recent",))
    assert build_context(workspace, "web/app.py", prefix, "", options) == ""
    workspace.index.touch("billing/taxes.py")
    block = build_context(workspace, "web/app.py", prefix, "", options)
    assert block.startswith(file_header("billing/taxes.py")) and "RATES" in block


def test_excluded_file_never_enters_the_block_even_when_it_matches_best(
    workspace_root: Path,
) -> None:
    (workspace_root / "config" / "credentials.py").write_text(
        "def vat_rate(country):\n    return SECRET_TOKEN_X9\n"
    )
    workspace = workspace_of(workspace_root)
    workspace.index.touch("config/credentials.py")
    prefix = "from config.credentials import vat_rate\n\nvat_rate(country)\n"
    block = build_context(workspace, "web/app.py", prefix, "", ContextOptions(chars=4000))
    assert "SECRET_TOKEN_X9" not in block and "credentials" not in block


# ---- copy candidates ---------------------------------------------------------------


def test_copy_candidates_from_the_index_and_the_document(workspace_root: Path) -> None:
    workspace = workspace_of(workspace_root)
    typed = "    journal_book.append_posting(amount, "
    found = copy_candidates(workspace, "billing/invoices.py", INVOICES_HEAD + typed, "\n")
    assert found[0].startswith("reconcile_flag=")
    assert all("SECRET_TOKEN_X9" not in c for c in found)
    # n-gram: the last tokens match in the middle of another line.
    ngram = copy_candidates(workspace, "x.py", "total = book.append_posting(amount, ", "")
    assert any(c.startswith("reconcile_flag=") for c in ngram)
    # An empty line after a line seen before: the line that followed it there.
    document = "for row in rows:\n    emit(row)\nsetup()\nfor row in rows:\n    "
    assert copy_candidates(None, None, document, "\n") == ["emit(row)"]
    # What the line already has after the cursor is not a candidate.
    assert copy_candidates(None, None, "x = f(1)\nx = f(", "1)\n") == []


# ---- prompts -------------------------------------------------------------------------


def test_layouts_and_the_shared_prompt_builder() -> None:
    assert resolve_suffix_layout("auto", True) == "fim"
    assert resolve_suffix_layout("auto", False) == "before"
    assert resolve_suffix_layout("before", True) == "before"
    prefix = "import os\n\ndef main():\n    path = os."
    suffix = "getcwd()\n    print(path)\n"
    context = "# lib/util.py\ndef helper():\n    pass\n\n"
    for template, use_fim in ((QWEN_CODER_FIM, True), (GEMMA3_FIM, False)):
        for layout in ("auto", "fim", "before", "none"):
            parts = clip_context(prefix, suffix, 1600, 400)
            trained = completion_prompt(
                template,
                PromptParts(parts.prefix, parts.suffix, context, "app/main.py"),
                use_fim,
                layout,
            )
            served = plan_prompt(
                template,
                prefix,
                suffix,
                use_fim,
                1600,
                400,
                layout=resolve_suffix_layout(layout, use_fim),
                context=context,
                path="app/main.py",
            )
            assert served.text() == trained
            assert served.context.startswith(context)
            assert served.context.endswith(file_header("app/main.py"))
    before = plan_prompt(GEMMA3_FIM, prefix, suffix, False, 1600, 400, layout="before", path="a.py")
    assert before.context == suffix_block(suffix, "a.py") + file_header("a.py")
    assert before.context.index("print(path)") < len(before.context)
    assert "getcwd" not in before.context  # the rest of the cursor's line is left out
    assert before.prefix == prefix and before.trail == ""
    # Without FIM the default shows the code after the cursor's line first.
    auto = completion_prompt(GEMMA3_FIM, PromptParts(prefix, suffix, "", "a.py"), False)
    assert auto == suffix_block(suffix, "a.py") + file_header("a.py") + prefix
    # Layout `none`, no context: the code before the cursor alone.
    plain = completion_prompt(GEMMA3_FIM, PromptParts(prefix, suffix), False, "none")
    assert plain == prefix
    fim = completion_prompt(QWEN_CODER_FIM, PromptParts(prefix, suffix), True)
    assert (
        fim
        == f"{QWEN_CODER_FIM.prefix}{prefix}{QWEN_CODER_FIM.suffix}{suffix}{QWEN_CODER_FIM.middle}"
    )


def test_context_tokens_grow_with_the_budgets() -> None:
    assert needed_context_tokens(EngineOptions()) <= 1024  # today's default still fits
    big = EngineOptions(prefix_chars=6000, suffix_chars=400, context_chars=2000)
    assert needed_context_tokens(big) >= (6000 + 400 + 2000) // 3 + big.max_tokens


CONTEXT_SCRIPT = """
import sys
from shoptalk.models.context import ContextOptions, Workspace, build_context
from shoptalk.models.module_map import build_module_map
from shoptalk.models.workspace_index import WorkspaceIndex

files = {
    "shop/__init__.py": "",
    "shop/taxes.py": "def vat_rate(country):\\n    '''Tax rate.'''\\n    return 0.2\\n",
    "shop/ledger.py": "def post_entry(book, amount):\\n    '''Post.'''\\n    book.add(amount)\\n",
    "shop/refunds.py": "def refund(order):\\n    '''Refund.'''\\n    return order\\n",
    "shop/orders.py": "def place(order):\\n    '''Place.'''\\n    return order\\n",
}
head = "import shop\\n\\n\\ndef close(book, order):\\n    "
# Used only after the cursor: no use is nearer the cursor than another (a tie).
tail = "\\n    shop.taxes.vat_rate('de')\\n    shop.ledger.post_entry(book, 1)\\n"
tail += "    shop.refunds.refund(order)\\n    shop.orders.place(order)\\n"
files["app.py"] = head + tail
workspace = Workspace(WorkspaceIndex.from_contents(files), build_module_map(files))
block = build_context(workspace, "app.py", head, tail, ContextOptions(chars=3000))
sys.stdout.write(block)
"""


def test_the_block_does_not_depend_on_the_hash_seed() -> None:
    """Mined and served blocks must be the same in every process: a set's
    iteration order follows PYTHONHASHSEED."""
    import os
    import subprocess
    import sys

    blocks = {
        subprocess.run(
            [sys.executable, "-c", CONTEXT_SCRIPT],
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in (1, 2, 3, 4)
    }
    assert len(blocks) == 1, blocks
    (block,) = blocks
    assert "def vat_rate" in block and "def post_entry" in block
