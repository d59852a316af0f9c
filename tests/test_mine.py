"""End-to-end tests of `shoptalk mine` on real git repositories built by
`tests/git_repos.py`: counts, masks, splits, aliases, dedup, canaries,
incremental runs, rewritten history, bad input and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from git_repos import (
    ALICE,
    AWS_KEY,
    BOB,
    CANARIES,
    CAROL,
    HistoryRepo,
    RepoBuilder,
    bytes_name,
    git,
    python_module,
)

from shoptalk.models.errors import ShopTalkError
from shoptalk.models.files import sha256_file
from shoptalk.models.progress import Progress
from shoptalk.models.prompt import clip_context
from shoptalk.models.settings import MineSettings
from shoptalk.models.store import RepoStore
from shoptalk.trainer.hygiene import dedup_text, exact_key
from shoptalk.trainer.instances import MAX_MASK, MIN_MASK
from shoptalk.trainer.mine import MineError, MineResult, mine_repository

pytestmark = pytest.mark.e2e


def _records(dataset: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for shard in sorted(dataset.glob("*.jsonl")):
        out += [json.loads(line) for line in shard.read_text().splitlines()]
    return out


@pytest.fixture(scope="module")
def mined(history_repo: HistoryRepo, tmp_path_factory: pytest.TempPathFactory) -> MineResult:
    data = tmp_path_factory.mktemp("mined-data")
    # No balance cap here, so that every instance the checks look for stays in
    # (the cap itself is checked in test_out_dir_and_module_balance).
    settings = MineSettings(
        alias_file=history_repo.alias_file, test_per_author=3, module_share_cap=1.0
    )
    return mine_repository(history_repo.path, settings, data)


def test_counts_add_up_and_shards_match_the_manifest(mined: MineResult) -> None:
    manifest = json.loads((mined.dataset_dir / "manifest.json").read_text())
    records = _records(mined.dataset_dir)
    assert manifest["total"] == len(records) > 0
    by_shard = Counter(f"{r['kind']}.{r['split']}.jsonl" for r in records)
    assert {name: info["records"] for name, info in manifest["shards"].items()} == dict(by_shard)
    for name, info in manifest["shards"].items():
        assert info["sha256"] == sha256_file(mined.dataset_dir / name)
    for key in ("counts", "counts_by_author", "counts_by_language"):
        assert sum(sum(v.values()) for v in manifest[key].values()) == len(records)
    assert sum(manifest["counts"]["completion"].values()) == sum(
        1 for r in records if r["kind"] == "completion"
    )
    assert len({r["id"] for r in records}) == len(records)
    # 32 commits: one bot, one mass change (30 files), the rest mined.
    assert manifest["commit_range"]["commits"] == 32
    assert manifest["skipped_commits"] == {"bot": 1, "mass_change": 1}
    assert manifest["commit_range"]["mined_commits"] == 30
    assert manifest["skipped_files"] == {
        "binary": 2,  # logo.png, and nul.py (git sees its NUL byte)
        "encoding": 1,  # latin.py
        "generated": 1,  # api_pb2.py
        "huge": 1,  # huge.js, one line of 1.2 MB
        "lock_file": 1,
        "submodule": 1,
        "symlink": 1,  # outside.py -> /etc/passwd
        "vendored": 2,  # vendor/, node_modules/
    }
    required = {"id", "kind", "split", "repo", "commit", "author_id", "author_date", "path"}
    for record in records:
        assert required | {"language"} <= set(record)
        assert not {"author_name", "author_email", "author_time"} & set(record)
    paths = {r["path"] for r in records}
    for skipped in ("vendor/", "node_modules/", "poetry.lock", "_pb2", "huge.js", "outside.py"):
        assert not any(skipped in p for p in paths)


def test_aliases_merge_into_four_people(mined: MineResult) -> None:
    authors = mined.manifest["authors"]
    assert len(authors) == 4  # the bot is not a person
    emails = sorted(sorted(a["emails"]) for a in authors.values())
    assert emails == [
        ["alice.smith@corp.example", "alice@example.com"],  # gambit
        ["bob@example.com"],  # same email, other name
        ["carol@example.com"],  # .mailmap rewrote ck <ck@laptop.local>
        ["dave@example.com"],  # the alias file rewrote Mr Pickles
    ]
    bob = next(a for a in authors.values() if "bob@example.com" in a["emails"])
    assert sorted(bob["names"]) == ["Bob Jones", "bjones"]
    records = _records(mined.dataset_dir)
    assert {r["author_id"] for r in records} <= set(authors)
    assert "unknown" not in {r["author_id"] for r in records}


def test_completion_masks_match_the_file_at_the_commit(
    mined: MineResult, history_repo: HistoryRepo
) -> None:
    settings = MineSettings()
    completions = [r for r in _records(mined.dataset_dir) if r["kind"] == "completion"]
    assert completions
    checked = 0
    for record in completions:
        tokens = record["target"].split()
        assert len(tokens) == record["masked_tokens"]
        source = git(history_repo.path, "show", f"{record['commit']}:{record['path']}")
        lines = source.split("\n")
        line = lines[record["line"] - 1]
        if "<SECRET_" in record["prefix"] + record["target"] + record["suffix"]:
            continue
        total = len(line.split())
        assert MIN_MASK <= record["masked_tokens"] <= min(MAX_MASK, total - 1)
        assert line.rstrip().endswith(record["target"])
        assert line.split()[-record["masked_tokens"] :] == tokens
        # prefix/suffix are the file around the span, clipped like the server clips.
        start = (
            sum(len(x) + 1 for x in lines[: record["line"] - 1])
            + len(line.rstrip())
            - len(record["target"])
        )
        parts = clip_context(
            source[:start],
            source[start + len(record["target"]) :],
            settings.prefix_chars,
            settings.suffix_chars,
        )
        assert (parts.prefix, parts.suffix) == (record["prefix"], record["suffix"])
        checked += 1
    assert checked >= len(completions) - 5
    # The rename-with-edit commit yields only the new function's lines.
    renamed = [r for r in completions if r["path"] == "src/billing/invoicing.py"]
    original = git(
        history_repo.path, "show", f"{history_repo.shas['initial']}:src/billing/invoices.py"
    )
    assert renamed and {r["symbol"] for r in renamed} == {"invoice_total"}
    assert all(r["line"] > original.count("\n") for r in renamed)
    # Lines that replaced lines are flagged as modifications.
    assert any(r["modification"] for r in completions)
    assert any(not r["modification"] for r in completions)


def test_no_canary_secret_reaches_any_written_file(
    mined: MineResult, history_repo: HistoryRepo, tmp_path: Path
) -> None:
    found = mined.manifest["secrets"]["found"]
    assert {"AWS Access Key", "GitHub Token", "Private Key"} <= set(found)
    assert mined.manifest["secrets"]["instances_scrubbed"] > 0
    written = [p for p in mined.dataset_dir.parent.rglob("*") if p.is_file()]
    assert any(p.name == "state.json" for p in written)
    text = "\n".join(p.read_text(errors="replace") for p in written)
    assert "<SECRET_" in text
    for canary in CANARIES:
        assert canary not in text, canary
    # drop: instances holding a secret are left out instead.
    settings = MineSettings(alias_file=history_repo.alias_file, secrets="drop")
    dropped = mine_repository(history_repo.path, settings, tmp_path)
    assert dropped.manifest["secrets"]["instances_dropped"] > 0
    dropped_text = "\n".join(
        p.read_text(errors="replace") for p in dropped.dataset_dir.glob("*.jsonl")
    )
    assert "<SECRET_" not in dropped_text
    for canary in CANARIES:
        assert canary not in dropped_text


def test_splits_are_temporal_and_test_is_deduplicated_from_train(mined: MineResult) -> None:
    manifest = mined.manifest
    records = _records(mined.dataset_dir)
    cutoff = manifest["cutoff"]
    assert all(r["author_date"] < cutoff for r in records if r["split"] != "test")
    assert any(r["split"] == "test" for r in records)
    assert any(r["split"] == "train" for r in records)
    test_keys = {(r["kind"], exact_key(dedup_text(r))) for r in records if r["split"] == "test"}
    for record in records:
        if record["split"] != "test":
            assert (record["kind"], exact_key(dedup_text(record))) not in test_keys
    # The rounding helpers were added early and copied late: the early copy is gone.
    assert manifest["dedup"]["exact"] > 0
    rounding = [
        r for r in records if r["path"].endswith("rounding.py") and r["kind"] == "completion"
    ]
    assert {r["split"] for r in rounding} == {"test"}
    kinds = {r["kind"] for r in records}
    assert {"completion", "module_lookup", "commit_message", "test_pair", "doc_modules"} <= kinds


def test_module_lookup_and_artifact_instances(mined: MineResult) -> None:
    records = _records(mined.dataset_dir)
    lookups = [r for r in records if r["kind"] == "module_lookup"]
    by_source = Counter(r["source"] for r in lookups)
    assert by_source["commit_message"] > 0 and by_source["docstring"] > 0
    payments = next(r for r in lookups if r["query"].startswith("Add payments with a first test"))
    assert payments["query"] == "Add payments with a first test"  # "(#12)" stripped
    assert payments["modules"] == ["billing.payments", "tests.test_payments"]
    doc = next(r for r in lookups if r["query"] == "Sum the lines of an invoice.")
    assert doc["modules"] == ["billing.invoicing"] and doc["source"] == "docstring"
    pair = next(r for r in records if r["kind"] == "test_pair")
    assert pair["path"] == "tests/test_payments.py"
    assert pair["prompt"].startswith("# src/billing/payments.py\n")
    assert "def test_payments_step_zero" in pair["target"]
    adr = next(r for r in records if r["kind"] == "doc_modules")
    assert adr["modules"] == ["billing.invoicing", "billing.payment_flow"]
    messages = [r for r in records if r["kind"] == "commit_message"]
    ledger = next(m for m in messages if m["target"] == "Extend ledger with step 0")
    assert "Co-authored-by" not in ledger["target"]
    assert ledger["prompt"].startswith("--- ")


def _copy_repo(history_repo: HistoryRepo, tmp_path: Path) -> RepoBuilder:
    target = tmp_path / "team"
    shutil.copytree(history_repo.path, target, symlinks=True)
    builder = RepoBuilder.__new__(RepoBuilder)
    builder.path = target
    builder.day = 40
    return builder


def test_second_run_reads_only_new_commits(history_repo: HistoryRepo, tmp_path: Path) -> None:
    repo = _copy_repo(history_repo, tmp_path)
    settings = MineSettings(alias_file=history_repo.alias_file, test_per_author=3)
    data = tmp_path / "data"
    first = mine_repository(repo.path, settings, data)
    assert first.full and first.new_commits == 32
    written = (first.dataset_dir / "manifest.json").stat().st_mtime_ns
    again = mine_repository(repo.path, settings, data)
    assert (again.new_commits, again.new_instances, again.full) == (0, 0, False)
    assert again.manifest["counts"] == first.manifest["counts"]
    assert (again.dataset_dir / "manifest.json").stat().st_mtime_ns == written  # not rebuilt
    resplit = mine_repository(repo.path, settings.model_copy(update={"test_share": 0.2}), data)
    assert resplit.new_commits == 0 and resplit.manifest["cutoff"] < first.manifest["cutoff"]
    everything = mine_repository(repo.path, settings, data, full=True)
    assert everything.full and everything.new_commits == 32
    assert everything.manifest["counts"] == first.manifest["counts"]
    repo.write(
        "src/billing/fees.py",
        "def late_fee(days: int, rate: float = 0.05) -> float:\n"
        "    return round(days * rate * 100, 2) if days > 0 else 0.0\n",
    )
    repo.commit("Add late fees", BOB)
    third = mine_repository(repo.path, settings, data)
    assert (third.new_commits, third.full) == (1, False)
    assert third.new_instances > 0
    before = {r["id"] for r in _records(first.dataset_dir)}
    records = _records(third.dataset_dir)
    assert any(r["path"] == "src/billing/fees.py" for r in records)
    assert third.manifest["total"] == len(records)
    # Instances mined before keep their ids (only splits/dedup may move them).
    assert (
        len(before - {r["id"] for r in records})
        <= third.manifest["dedup"]["exact"] + len(before) // 2
    )


def test_rewritten_history_is_remined_without_duplicates(
    history_repo: HistoryRepo, tmp_path: Path
) -> None:
    repo = _copy_repo(history_repo, tmp_path)
    settings = MineSettings(alias_file=history_repo.alias_file, test_per_author=3)
    data = tmp_path / "data"
    repo.write("src/billing/fees.py", "def fee(days: int) -> float:\n    return days * 0.05 + 1\n")
    old_sha = repo.commit("Add fees", ALICE)
    mine_repository(repo.path, settings, data)
    repo.write(
        "src/billing/fees.py", "def fee(days: int) -> float:\n    return days * 0.07 + 2.5\n"
    )
    new_sha = repo.commit("Add fees (rate 7%)", ALICE, amend=True)
    result = mine_repository(repo.path, settings, data)
    assert (result.removed_commits, result.new_commits) == (1, 1)
    assert any("no longer on main" in w for w in result.warnings)
    records = _records(result.dataset_dir)
    commits = {r["commit"] for r in records}
    assert old_sha not in commits and new_sha in commits
    assert len({r["id"] for r in records}) == len(records)
    fee_lines = [
        r for r in records if r["path"] == "src/billing/fees.py" and r["kind"] == "completion"
    ]
    assert fee_lines and all("0.07" in r["prefix"] + r["target"] + r["suffix"] for r in fee_lines)
    state_dir = RepoStore.for_repo(data, repo.path).root / "mine-state"
    cached = [
        json.loads(line)
        for batch in state_dir.rglob("batch-*.jsonl")
        for line in batch.read_text().splitlines()
    ]
    assert old_sha not in {r["commit"] for r in cached}


def test_a_killed_run_leaves_no_dataset_and_the_next_run_completes(
    history_repo: HistoryRepo, tmp_path: Path
) -> None:
    settings = MineSettings(alias_file=history_repo.alias_file)

    def killed(event: str | Progress) -> None:
        if isinstance(event, Progress) and event.done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mine_repository(history_repo.path, settings, tmp_path, report=killed)
    store = RepoStore.for_repo(tmp_path, history_repo.path)
    assert not store.dataset_dir.exists()
    assert not list(store.root.rglob("state.json"))
    result = mine_repository(history_repo.path, settings, tmp_path)
    assert result.full and result.new_commits == 32
    assert (store.dataset_dir / "manifest.json").is_file()
    assert not [p for p in store.root.iterdir() if p.name.endswith(".partial")]


def test_out_dir_and_module_balance(history_repo: HistoryRepo, tmp_path: Path) -> None:
    settings = MineSettings(
        alias_file=history_repo.alias_file, kinds=["completion"], module_share_cap=0.3
    )
    out = tmp_path / "out"
    result = mine_repository(history_repo.path, settings, tmp_path / "data", out_dir=out)
    assert result.dataset_dir == out.resolve()
    assert {p.name.split(".")[0] for p in out.glob("*.jsonl")} == {"completion"}
    balance = result.manifest["balance"]["train_by_module"]["completion"]
    train = [r for r in _records(out) if r["split"] == "train"]
    modules = balance["modules"]
    assert sum(v["after"] for v in modules.values()) == len(train)
    # billing, ledger, refunds, reports hold >= 5% each: 4 modules * 0.3 >= 1.
    assert balance["applied"]
    assert any(v["after"] < v["before"] for v in modules.values())
    assert max(v["after"] for v in modules.values()) <= 0.3 * len(train) + 1
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    with pytest.raises(MineError, match="not empty"):
        mine_repository(history_repo.path, settings, tmp_path / "data", out_dir=precious)
    assert (precious / "notes.txt").read_text() == "mine"


def test_bad_input_gets_clear_messages(tmp_path: Path, history_repo: HistoryRepo) -> None:
    settings = MineSettings()
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(MineError, match="not a git repository"):
        mine_repository(plain, settings, tmp_path / "d")
    with pytest.raises(MineError, match="does not exist"):
        mine_repository(tmp_path / "missing", settings, tmp_path / "d")
    empty = RepoBuilder(tmp_path / "empty")
    with pytest.raises(MineError, match="no commits yet"):
        mine_repository(empty.path, settings, tmp_path / "d")
    with pytest.raises(MineError, match=r"branch 'nope' does not exist.*main"):
        mine_repository(history_repo.path, MineSettings(branch="nope"), tmp_path / "d")
    detached = _copy_repo(history_repo, tmp_path)
    git(detached.path, "checkout", "-q", "--detach", "HEAD~1")
    with pytest.raises(MineError, match="detached"):
        mine_repository(detached.path, settings, tmp_path / "d")
    ok = mine_repository(detached.path, MineSettings(branch="main"), tmp_path / "d")
    assert ok.manifest["branch"] == "main"
    with pytest.raises(ShopTalkError, match="alias file"):
        mine_repository(
            history_repo.path, MineSettings(alias_file=tmp_path / "none"), tmp_path / "d"
        )
    with pytest.raises(ShopTalkError, match="not an ISO date"):
        mine_repository(history_repo.path, MineSettings(cutoff="last tuesday"), tmp_path / "d")
    with pytest.raises(MineError, match="no commits to mine"):
        mine_repository(history_repo.path, MineSettings(since="2030-01-01"), tmp_path / "d")


def test_shallow_clone_warns(history_repo: HistoryRepo, tmp_path: Path) -> None:
    clone = tmp_path / "shallow"
    subprocess.run(
        ["git", "clone", "-q", "--depth", "3", f"file://{history_repo.path}", str(clone)],
        check=True,
        capture_output=True,
    )
    result = mine_repository(clone, MineSettings(), tmp_path / "d")
    assert any("shallow clone" in w for w in result.warnings)
    assert result.manifest["commit_range"]["commits"] == 3


def test_small_repo_exact_counts(repo_builder: RepoBuilder, tmp_path: Path) -> None:
    repo = repo_builder
    repo.write(
        "app/core.py",
        "import os\n\n\nclass Store:\n"
        "    def get(self, key: str) -> str:\n"
        "        return os.environ.get(key, '') or self.default\n"
        "    def put(self, key: str, value: str) -> None:\n"
        "        os.environ[key] = value  # set it for children\n",
    )
    repo.write(".shoptalkignore", "scratch/\n")
    repo.write("scratch/tmp.py", "value = compute(a, b, c, d)\n")
    repo.commit("Add the store", ALICE)
    repo.write(
        "app/core.py",
        "import os\n\n\nclass Store:\n"
        "    def get(self, key: str) -> str:\n"
        "        return os.environ.get(key, 'missing') or self.default\n"
        "    def put(self, key: str, value: str) -> None:\n"
        "        os.environ[key] = value  # set it for children\n"
        "    def drop(self, key: str) -> None:\n"
        "        os.environ.pop(key, None)  # gone\n",
    )
    repo.commit("Store: default and drop", CAROL)
    settings = MineSettings(test_per_author=0, validation_share=0)
    result = mine_repository(repo.path, settings, tmp_path / "d")
    completions = [r for r in _records(result.dataset_dir) if r["kind"] == "completion"]
    # Commit 1: lines with at least 4 tokens: class? no (2). def get (7), return (6),
    # def put (9), os.environ[...] (7) -> 4. Commit 2: changed return (6), def drop (7),
    # pop (5) -> 3. scratch/ is ignored.
    removed = result.manifest["dedup"]["by_kind"]["completion"]
    assert len(completions) + removed["exact"] + removed["near"] == 7
    assert result.manifest["skipped_files"] == {"shoptalkignore": 1}
    second = sorted(
        (r["line"], r["modification"], r["symbol"])
        for r in completions
        if r["author_id"].startswith("carol")
    )
    assert second == [(6, True, "Store.get"), (9, False, "Store.drop"), (10, False, "Store.drop")]
    assert {r["split"] for r in completions if r["author_id"].startswith("carol")} == {"test"}
    assert {r["split"] for r in completions if r["author_id"].startswith("alice")} == {"train"}
    assert result.manifest["counts"]["completion"] == {
        "train": 4 - removed["exact"] - removed["near"],
        "validation": 0,
        "test": 3,
    }


def test_cli_mine_prints_a_summary_and_errors_without_traceback(
    history_repo: HistoryRepo, tmp_path: Path
) -> None:
    env = _cli_env(tmp_path / "data")
    command = [sys.executable, "-m", "shoptalk.models.cli", "mine", "--repo"]
    ok = subprocess.run(
        [*command, str(history_repo.path), "--cutoff", "2023-12-10"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert "completion" in ok.stdout and "cutoff 2023-12-10" in ok.stdout
    assert "(full run)" in ok.stderr
    wrong_kind = subprocess.run(
        [*command, str(history_repo.path), "--kinds", "completion,poems"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert wrong_kind.returncode == 2
    assert "kinds" in wrong_kind.stderr and "Traceback" not in wrong_kind.stderr
    bad = subprocess.run(
        [*command, str(tmp_path)], capture_output=True, text=True, env=env, check=False
    )
    assert bad.returncode == 2
    assert "not a git repository" in bad.stderr and "Traceback" not in bad.stderr


def test_a_secret_is_counted_by_the_commit_that_added_it(
    repo_builder: RepoBuilder, tmp_path: Path
) -> None:
    repo = repo_builder
    body = "def connect(host: str, port: int = 5432) -> object:\n    return open_connection(host, port, retries=3)\n"
    repo.write("app/db.py", f'AWS_ACCESS_KEY_ID = "{AWS_KEY}"\n\n\n{body}')
    repo.commit("Add the database client", ALICE)
    repo.write(
        "app/db.py",
        f'AWS_ACCESS_KEY_ID = "{AWS_KEY}"\n\n\n{body}{body.replace("connect", "reconnect")}',
    )
    repo.commit("Add reconnect", ALICE)
    result = mine_repository(repo.path, MineSettings(test_per_author=0), tmp_path / "d")
    assert result.manifest["secrets"]["found"] == {"AWS Access Key": 1}
    text = "\n".join(p.read_text() for p in result.dataset_dir.glob("*.jsonl"))
    assert AWS_KEY not in text and "<SECRET_AWS_ACCESS_KEY>" in text


def test_shoptalkignore_pointing_outside_the_repo_is_ignored_with_a_warning(
    repo_builder: RepoBuilder, tmp_path: Path
) -> None:
    outside = tmp_path / "outside-ignore"
    outside.write_text("app/\n")
    repo = repo_builder
    repo.write(
        "app/main.py", "def main(argv: list[str]) -> int:\n    return run(argv[1:], verbose=True)\n"
    )
    repo.commit("Add main", ALICE)
    os.symlink(outside, repo.path / ".shoptalkignore")
    result = mine_repository(repo.path, MineSettings(test_per_author=0), tmp_path / "d")
    assert any("points outside the repository" in w for w in result.warnings)
    assert result.manifest["skipped_files"] == {}  # app/ was not ignored
    assert result.manifest["total"] > 0


def _small_repo(repo: RepoBuilder) -> RepoBuilder:
    repo.write(
        "app/main.py",
        "def main(argv: list[str]) -> int:\n    return run(argv[1:], verbose=True, retries=3)\n",
    )
    repo.commit("Add main", ALICE)
    return repo


def _cli_env(data: Path) -> dict[str, str]:
    """The environment of a `shoptalk` run: its data dir, and an empty user
    config file beside it (never the real user's)."""
    config = data.parent / "cli-config.toml"
    config.touch()
    return {**os.environ, "SHOPTALK_DATA_DIR": str(data), "SHOPTALK_CONFIG": str(config)}


def _cli_mine(repo: Path, data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shoptalk.models.cli", "mine", "--repo", str(repo), *args],
        capture_output=True,
        text=True,
        env=_cli_env(data),
        check=False,
    )


def test_out_never_replaces_a_folder_shoptalk_did_not_write(
    repo_builder: RepoBuilder, tmp_path: Path
) -> None:
    """Issue 14, defect 1: any `manifest.json` made `--out` replace the whole
    folder (the user's other files gone, the mode turned 0700)."""
    repo = _small_repo(repo_builder)
    data = tmp_path / "data"
    user = tmp_path / "d"
    (user / "sub").mkdir(parents=True)
    (user / "manifest.json").write_text('{"name": "app"}')
    (user / "keep.txt").write_text("x\n")
    (user / "sub" / "deep.txt").write_text("y\n")
    user.chmod(0o751)
    before = sorted(str(p.relative_to(user)) for p in user.rglob("*"))
    refused = _cli_mine(repo.path, data, "--out", str(user))
    assert refused.returncode == 2, refused.stderr
    assert "not a dataset ShopTalk wrote" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert sorted(str(p.relative_to(user)) for p in user.rglob("*")) == before
    assert (user / "keep.txt").read_text() == "x\n"
    assert (user / "manifest.json").read_text() == '{"name": "app"}'
    assert stat.S_IMODE(user.stat().st_mode) == 0o751
    # A new folder gets the umask's mode, not the temp folder's 0700.
    umask = os.umask(0o022)
    os.umask(umask)
    fresh = tmp_path / "fresh"
    assert _cli_mine(repo.path, data, "--out", str(fresh)).returncode == 0
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o777 & ~umask
    manifest = json.loads((fresh / "manifest.json").read_text())
    assert manifest["producer"] == "shoptalk mine"
    # ShopTalk's own dataset is replaced and keeps the mode the user gave it.
    fresh.chmod(0o750)
    again = mine_repository(repo.path, MineSettings(), data, out_dir=fresh, full=True)
    assert again.dataset_dir == fresh.resolve()
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o750
    # A dataset written before the producer marker is still recognised.
    del manifest["producer"]
    (fresh / "manifest.json").write_text(json.dumps(manifest))
    mine_repository(repo.path, MineSettings(), data, out_dir=fresh, full=True)
    assert json.loads((fresh / "manifest.json").read_text())["producer"] == "shoptalk mine"
    # ... but not when the user put a file of their own into it.
    (fresh / "notes.md").write_text("mine\n")
    with pytest.raises(MineError, match=r"files ShopTalk did not write \(notes.md\)"):
        mine_repository(repo.path, MineSettings(), data, out_dir=fresh, full=True)
    assert (fresh / "notes.md").read_text() == "mine\n"
    # The name the previous dataset is moved aside to while it is replaced.
    (fresh / "notes.md").unlink()
    aside = tmp_path / ".fresh.old"
    aside.mkdir()
    (aside / "mine.txt").write_text("user's\n")
    with pytest.raises(MineError, match=r"\.fresh\.old is not empty.*move or rename it"):
        mine_repository(repo.path, MineSettings(), data, out_dir=fresh, full=True)
    assert (aside / "mine.txt").read_text() == "user's\n"
    # A file where the folder should be, and the default dataset folder alike.
    with pytest.raises(MineError, match="not a folder"):
        mine_repository(repo.path, MineSettings(), data, out_dir=user / "keep.txt")
    store = mine_repository(repo.path, MineSettings(), data).dataset_dir
    (store / "mine.txt").write_text("z\n")
    with pytest.raises(MineError, match=r"did not write \(mine.txt\).*move them out"):
        mine_repository(repo.path, MineSettings(), data, full=True)
    assert (store / "mine.txt").read_text() == "z\n"


def _jsonl_records_strict(folder: Path) -> list[dict[str, Any]]:
    """Every record of every JSONL file under `folder`, read as strict UTF-8."""
    out: list[dict[str, Any]] = []
    for path in sorted(folder.rglob("*.jsonl")):
        text = path.read_bytes().decode("utf-8")  # raises on invalid UTF-8
        out += [json.loads(line) for line in text.splitlines() if line.strip()]
    return out


def test_a_non_utf8_file_name_anywhere_in_history_is_skipped_and_the_rest_mined(
    repo_builder: RepoBuilder, tmp_path: Path
) -> None:
    """Issue 14, defect 2: one Latin-1 byte in a file name made the whole
    repository unminable (UnicodeEncodeError in `line_rng`)."""
    repo = repo_builder
    latin = bytes_name(b"app/caf\xe9_menu.py")
    package = bytes_name(b"lib\xff/__init__.py")
    repo.write(
        latin, "def menu(items: list[str]) -> str:\n    return ', '.join(items) + ' today'\n"
    )
    repo.write(package, '"""A package with a Latin-1 name."""\n')
    repo.write(
        "app/orders.py",
        "def order(item: str, count: int) -> dict:\n    return {'item': item, 'n': count * 2}\n",
    )
    repo.commit("Add the menu and orders", ALICE)
    repo.move(latin, "app/menu.py")  # renamed out of the bad name later
    repo.commit("Rename the menu module", BOB)
    repo.write(
        "app/orders.py",
        "def order(item: str, count: int) -> dict:\n    return {'item': item, 'n': count * 3, 'ok': True}\n",
    )
    repo.commit("Orders count three times", BOB)
    data = tmp_path / "data"
    run = _cli_mine(repo.path, data)
    assert run.returncode == 0, run.stderr
    store = RepoStore.for_repo(data, repo.path)
    manifest = json.loads((store.dataset_dir / "manifest.json").read_bytes().decode("utf-8"))
    # caf\xe9_menu.py and lib\xff/__init__.py when added, and the rename away.
    assert manifest["skipped_files"] == {"undecodable_path": 3}
    records = _jsonl_records_strict(store.root)  # dataset and mining cache
    assert {r["path"] for r in records if r["kind"] == "completion"} == {"app/orders.py"}
    assert manifest["total"] > 0 and manifest["commit_range"]["mined_commits"] == 3
    assert not any("\ufffd" in json.dumps(r, ensure_ascii=False) for r in records)


def test_paths_with_spaces_tabs_quotes_and_unicode_keep_their_exact_names(
    repo_builder: RepoBuilder, tmp_path: Path
) -> None:
    """Issue 14, defect 3: git ends `+++ b/with space.py` with a tab, which
    stayed in the path, so the file was not seen as Python."""
    repo = repo_builder
    names = ["app/with space.py", "app/tab\there.py", 'app/quo"te.py', "app/ünï cödé.py"]
    names += ["app/back\\slash.py", "app/new\nline.py"]
    for index, name in enumerate(names):
        repo.write(name, python_module(f"handler{index}", 3))
    repo.commit("Add handlers with odd names", ALICE)
    repo.move("app/with space.py", "app/still spaced.py")
    text = (repo.path / "app/still spaced.py").read_text()
    repo.write(
        "app/still spaced.py",
        text + "\n\ndef handler_extra(event: dict) -> int:\n    return len(event) + 9 * 11\n",
    )
    repo.commit("Rename and extend the spaced handler", BOB)
    result = mine_repository(repo.path, MineSettings(test_per_author=0), tmp_path / "d")
    assert result.manifest["skipped_files"] == {}
    records = _jsonl_records_strict(result.dataset_dir)
    completions = [r for r in records if r["kind"] == "completion"]
    assert {r["path"] for r in completions} == {*names, "app/still spaced.py"}
    assert {r["language"] for r in completions} == {"python"}
    renamed = [r for r in completions if r["path"] == "app/still spaced.py"]
    assert {r["symbol"] for r in renamed} == {"handler_extra"}  # only the new lines
    message = next(r for r in records if r["target"] == "Rename and extend the spaced handler")
    assert message["prompt"].startswith("--- a/app/with space.py\n+++ b/app/still spaced.py\n")
    first = next(r for r in records if r["target"] == "Add handlers with odd names")
    assert '+++ "b/app/back\\\\slash.py"\n' in first["prompt"]  # quoted as git quotes it
