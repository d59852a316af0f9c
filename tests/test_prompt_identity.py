"""One prompt builder for serving, mining, training and evaluation (issue 19
item 5, issue 20 item 1): a completion instance mined from a real git
history carries the repository context the server would have built at the
instance's parent commit, and the server (the engine over a workspace of
that commit), the training formatter and the evaluation (the served model
on a tiny GGUF) all build the same prompt string from it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from shoptalk.models.completion import CompletionEngine, EngineOptions
from shoptalk.models.context import (
    ContextCandidates,
    PromptConfig,
    Workspace,
    gather_candidates,
)
from shoptalk.models.module_map import build_module_map
from shoptalk.models.settings import MineSettings, ServeSettings, Settings
from shoptalk.models.workspace_index import WorkspaceIndex
from shoptalk.trainer.evaluate import ServedModel, context_overrides, resolve_models
from shoptalk.trainer.formats import record_context, record_items
from shoptalk.trainer.mine import mine_repository
from tests.git_repos import BOB, RepoBuilder, git
from tests.test_context_e2e import TAXES
from tests.tiny_models import place_base_gguf

LEDGER = "".join(
    f"def ledger_entry_{i}(journal_book, amount):\n"
    f"    journal_book.append_posting(amount, reconcile_flag={i})\n\n"
    for i in range(12)
)

INVOICES = '''from billing.taxes import vat_rate


def invoice_total(journal_book, amount, country):
    """The total of an invoice, tax included, posted to the journal."""
    rate = vat_rate(country)
    journal_book.append_posting(amount, reconcile_flag=True)
    return amount * (1 + rate)
'''

# Added by the second commit: the new lines are masked instances.
REFUND = '''

def refund_total(journal_book, amount, country):
    """A refund, tax included, posted to the journal."""
    rate = vat_rate(country)
    journal_book.append_posting(-amount, reconcile_flag=False)
    return -amount * (1 + rate) + refund_penalty_zq7(country, amount)
'''
# Also in the second commit, in another file: the future for its instances.
FUTURE = "\n\ndef ledger_future_marker_q9(journal_book):\n    return journal_book.close_books()\n"

ALL_ON = PromptConfig(
    prefix_chars=6000,
    suffix_chars=400,
    suffix_layout="before",
    context_chars=2048,
    context_sources=("snippets", "imports", "recent"),
)


@pytest.fixture(scope="module")
def mined(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("prompt-identity")
    repo = RepoBuilder(root / "repo")
    repo.write("billing/__init__.py", "")
    repo.write("billing/taxes.py", TAXES)
    repo.write("billing/ledger.py", LEDGER)
    repo.write("billing/invoices.py", INVOICES)
    first = repo.commit("Billing: taxes, ledger and invoices")
    repo.write("billing/invoices.py", INVOICES + REFUND)
    repo.write("billing/ledger.py", LEDGER + FUTURE)
    second = repo.commit("Refunds", author=BOB)
    settings = MineSettings(kinds=["completion"], test_share=0.5, validation_share=0.0)
    result = mine_repository(repo.path, settings, root / "data")
    records = [
        json.loads(line)
        for shard in sorted(result.dataset_dir.glob("completion.*.jsonl"))
        for line in shard.read_text().splitlines()
    ]
    return {
        "repo": repo.path,
        "root": root,
        "first": first,
        "second": second,
        "records": records,
        "settings": settings,
    }


def _of_second(mined: dict[str, Any]) -> list[dict[str, Any]]:
    found = [
        r
        for r in mined["records"]
        if r["commit"] == mined["second"] and r["path"] == "billing/invoices.py"
    ]
    assert found, "the second commit's new lines were mined"
    return found


def _tree(repo: Path, commit: str) -> dict[str, str]:
    paths = git(repo, "ls-tree", "-r", "--name-only", commit).split()
    return {p: git(repo, "show", f"{commit}:{p}") for p in paths}


def _document(repo: Path, record: dict[str, Any]) -> tuple[str, int]:
    """The file at the instance's commit with the masked span taken out, and
    the cursor: what the editor holds when the user is about to type it."""
    text = git(repo, "show", f"{record['commit']}:{record['path']}")
    lines = text.split("\n")
    line_start = sum(len(line) + 1 for line in lines[: record["line"] - 1])
    line = lines[record["line"] - 1]
    cursor = line_start + len(line.rstrip()) - len(record["target"])
    assert text[cursor : cursor + len(record["target"])] == record["target"]
    return text[:cursor] + text[cursor + len(record["target"]) :], cursor


def _server_prompt(
    mined: dict[str, Any],
    record: dict[str, Any],
    template: Any,
    use_fim: bool,
    config: PromptConfig = ALL_ON,
) -> str:
    """The engine as the server runs it, over a workspace of the parent commit."""
    files = _tree(mined["repo"], mined["first"])
    workspace = Workspace(WorkspaceIndex.from_contents(files), build_module_map(files))
    options = EngineOptions(
        prefix_chars=config.prefix_chars,
        suffix_chars=config.suffix_chars,
        suffix_layout=config.suffix_layout,
        context_chars=config.context_chars,
        context_sources=config.context_sources,
    )
    engine = CompletionEngine(None, template, use_fim, options)  # type: ignore[arg-type]
    text, cursor = _document(mined["repo"], record)
    return engine.plan(text, cursor, record["path"], workspace).text()


def _training_prompt(
    record: dict[str, Any], template: Any, use_fim: bool, config: PromptConfig = ALL_ON
) -> str:
    (item,) = record_items(record, template, use_fim=use_fim, config=config)
    return "".join(segment.text for segment in item.prompt)


def test_mined_context_comes_from_the_parent_commit(mined: dict[str, Any]) -> None:
    for record in _of_second(mined):
        block = record_context(record, ALL_ON, False, record["prefix"], record["suffix"])
        stored = json.dumps(record["context"])
        full_line = git(mined["repo"], "show", f"{record['commit']}:{record['path']}").split("\n")[
            record["line"] - 1
        ]
        # The line being written, and anything else the commit itself adds,
        # is nowhere in the context: only the parent's files are.
        assert full_line.strip() not in block and full_line.strip() not in stored
        assert "refund_penalty_zq7" not in stored
        assert "ledger_future_marker_q9" not in stored
        # What the parent had is: a ledger window and the imported definition.
        assert "# billing/ledger.py\n" in block
        assert "def vat_rate(country: str) -> float:" in block
    # Instances of the first commit (no parent) have no repository to see.
    for record in mined["records"]:
        if record["commit"] == mined["first"]:
            assert record_context(record, ALL_ON, False, record["prefix"], record["suffix"]) == ""


def test_stored_candidates_are_those_of_a_fresh_index_of_the_parent(
    mined: dict[str, Any],
) -> None:
    """Mining moves one index along the history; the server builds its own:
    both rank alike (ties by path and line), so the stored candidates are
    those of an index built from the parent's files at once."""
    files = _tree(mined["repo"], mined["first"])
    workspace = Workspace(WorkspaceIndex.from_contents(files), build_module_map(files))
    for record in _of_second(mined):
        text, cursor = _document(mined["repo"], record)
        fresh = gather_candidates(workspace, record["path"], text[:cursor], text[cursor:])
        stored = ContextCandidates.from_record(record["path"], record["context"])
        assert stored.imports == fresh.imports
        assert set(stored.snippets) <= set(fresh.snippets)
        assert [p for p in fresh.snippets if p.path != record["path"]] == [
            p for p in stored.snippets if p.path != record["path"]
        ]


@pytest.mark.parametrize(
    ("use_fim", "layout"), [(False, "before"), (False, "none"), (True, "auto")]
)
def test_server_and_training_build_the_same_prompt(
    mined: dict[str, Any], use_fim: bool, layout: str
) -> None:
    from shoptalk.models.catalog import GEMMA3_FIM

    config = replace(ALL_ON, suffix_layout=layout)
    for record in _of_second(mined):
        server = _server_prompt(mined, record, GEMMA3_FIM, use_fim, config)
        assert "# billing/ledger.py\n" in server
        assert _training_prompt(record, GEMMA3_FIM, use_fim, config) == server


def _eval_settings(mined: dict[str, Any], tiny_hf: Any, tiny_gguf: Any, name: str) -> Settings:
    data_dir = mined["root"] / "data"
    checkpoint = tiny_hf("llama")
    place_base_gguf(data_dir, checkpoint, tiny_gguf("llama"))
    return Settings.model_validate(
        {
            "data_dir": str(data_dir),
            "train": {"base": str(checkpoint)},
            "serve": context_overrides(name),
            "eval": {"max_tokens": 4},
        }
    )


def _eval_prompt(
    mined: dict[str, Any], settings: Settings, record: dict[str, Any]
) -> tuple[str, Any]:
    """The prompt evaluation gave the served model for `record`."""
    (model,) = resolve_models(["base"], mined["repo"], settings, settings.resolved_data_dir())
    served = ServedModel(model, settings)
    try:
        served.complete(record["prefix"], record["suffix"], record["path"], record["context"])
        plan = served.engine.last_plan
        assert plan is not None
        return plan.text(), model
    finally:
        served.close()


def test_eval_prompts_as_server_and_training(
    mined: dict[str, Any], tiny_hf: Any, tiny_gguf: Any
) -> None:
    settings = _eval_settings(mined, tiny_hf, tiny_gguf, "all")
    config = PromptConfig.of(settings.serve)
    assert config == ALL_ON
    for record in _of_second(mined):
        prompt, model = _eval_prompt(mined, settings, record)
        assert prompt == _server_prompt(mined, record, model.template, model.use_fim)
        assert prompt == _training_prompt(record, model.template, model.use_fim)


def test_eval_context_config_changes_the_prompt(
    mined: dict[str, Any], tiny_hf: Any, tiny_gguf: Any
) -> None:
    record = min(_of_second(mined), key=lambda r: r["line"])  # code follows it
    prompts = {
        name: _eval_prompt(mined, _eval_settings(mined, tiny_hf, tiny_gguf, name), record)[0]
        for name in ("today", "file6k", "snippets", "all")
    }
    # The file is shorter than 1,600 characters: a longer budget shows nothing more.
    assert prompts["file6k"] == prompts["today"]
    assert len({prompts["today"], prompts["snippets"], prompts["all"]}) == 3
    assert "# billing/ledger.py\n" not in prompts["today"]
    assert "# billing/ledger.py\n" in prompts["snippets"]
    # The imported definition (signature, docstring, body elided) only with imports on.
    definition = '(ISO code)."""\n    ...\n'
    assert definition not in prompts["snippets"]
    assert definition in prompts["all"]
    assert "(later in this file)" in prompts["all"]


def test_training_follows_the_serve_defaults() -> None:
    assert PromptConfig.of(ServeSettings()) == PromptConfig()
    assert MineSettings().prefix_chars == ServeSettings().prefix_chars
    assert MineSettings().suffix_chars == ServeSettings().suffix_chars


def test_the_workspace_moved_along_history_is_the_parents_checkout(tmp_path: Path) -> None:
    """`CommitWorkspace` reaches each commit by diffs from wherever it is
    (forward, backward, across a deletion and a rename) and holds what an
    index built from that commit's files at once holds, ranking alike."""
    from shoptalk.trainer.commit_workspace import CommitWorkspace
    from shoptalk.trainer.git_log import BlobReader

    repo = RepoBuilder(tmp_path / "repo")
    repo.write("billing/__init__.py", "")
    repo.write("billing/taxes.py", TAXES)
    repo.write("billing/ledger.py", LEDGER)
    commits = [repo.commit("one")]
    repo.write("billing/invoices.py", INVOICES)
    repo.write("notes.txt", "not source")
    # A relative import: resolved against the module id, which changes when
    # the folder becomes a package (commit four).
    repo.write(
        "lib/pkg/c.py", "from . import d\nfrom .d import helper\n\n\ndef run():\n    helper()\n"
    )
    repo.write("lib/pkg/d.py", "def helper():\n    return 1\n")
    commits.append(repo.commit("two"))
    repo.move("billing/ledger.py", "billing/journal.py")
    repo.write("billing/invoices.py", INVOICES + REFUND)
    commits.append(repo.commit("three"))
    repo.remove("billing/taxes.py")
    repo.write("lib/pkg/__init__.py", "")
    commits.append(repo.commit("four"))
    query = ["journal_book", "append_posting", "vat_rate", "country", "amount"]
    with BlobReader(repo.path) as blobs:
        moving = CommitWorkspace(repo.path, blobs)
        for commit in [
            commits[0],
            commits[2],
            commits[1],
            commits[3],
            None,
            commits[2],
            commits[3],
        ]:
            workspace = moving.at(commit)
            files = _tree(repo.path, commit) if commit else {}
            fresh = WorkspaceIndex.from_contents(files)
            assert workspace.index.paths() == fresh.paths()
            assert [workspace.index.text(p) for p in fresh.paths()] == [
                fresh.text(p) for p in fresh.paths()
            ]
            assert workspace.index.search(query, 24) == fresh.search(query, 24)
            assert workspace.module_map is not None
            # The whole map: files, module ids, symbols and resolved imports.
            assert workspace.module_map == build_module_map(files)
