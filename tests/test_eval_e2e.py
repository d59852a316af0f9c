"""`shoptalk eval` end to end on a fixture repository with tiny models: real
mining, a real (two-step) training run, a real export, real llama.cpp
through the server's engine; the report's figures must match a
recomputation from what the models said and from the mined test split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import place_base_gguf

from shoptalk.models.cli import main as cli_main
from shoptalk.models.settings import Settings
from shoptalk.models.store import RepoStore
from shoptalk.trainer.evaluate import evaluate_models, open_engine, resolve_models
from shoptalk.trainer.metrics import (
    corpus_crystal_bleu,
    crystal_bleu_stats,
    edit_similarity,
    exact_match,
    mcnemar,
    percentile,
    strict_exact_match,
    top_k_hit,
)
from shoptalk.trainer.retention import trivial_ngram_set
from tests.git_repos import HistoryRepo

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def evaluated(
    tmp_path_factory: pytest.TempPathFactory, history_repo: HistoryRepo, tiny_hf, tiny_gguf
):
    from shoptalk.trainer.export import export_run
    from shoptalk.trainer.mine import mine_repository
    from shoptalk.trainer.train import train_adapter

    root = tmp_path_factory.mktemp("eval-e2e")
    data_dir = root / "data"
    repo = history_repo.path
    checkpoint = tiny_hf("llama")
    place_base_gguf(data_dir, checkpoint, tiny_gguf("llama"))
    settings = Settings.model_validate(
        {
            "data_dir": str(data_dir),
            "mine": {"alias_file": str(history_repo.alias_file)},
            # FIM on a base without FIM tokens: the tuned model is then served
            # with FIM (its manifest says so) and the base prefix-only.
            "train": {
                "base": str(checkpoint),
                "max_steps": 2,
                "val_every": 1,
                "completion_format": "fim",
            },
            "export": {"quant": "f32"},
            "eval": {"bootstrap": 200, "max_tokens": 12},
        }
    )
    mine_repository(repo, settings.mine, data_dir)
    trained = train_adapter(repo, settings, data_dir, show_progress=False)
    assert trained.adapter_dir is not None, trained.stop_reason
    exported = export_run(trained.run_dir, "f32")
    model_file = next(p for p in exported.files if p.name.startswith("model-"))
    store = RepoStore.for_repo(data_dir, repo)
    store.promote({"run_id": trained.run_id, "model": str(model_file), "adapter": None})
    report = evaluate_models(
        repo,
        ["base", "org"],
        settings,
        data_dir,
        8,
        general_instances=3,
        humaneval_problems=1,
        out_dir=root / "report",
        command="shoptalk eval --limit 8",
        lookup_queries=4,
    )
    return report, settings, data_dir, repo


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_report_matches_a_recomputation(evaluated) -> None:
    report, _settings, data_dir, repo = evaluated
    data = json.loads(report.json_path.read_text())
    assert data["complete"] is True and data["command"] == "shoptalk eval --limit 8"
    store = RepoStore.for_repo(data_dir, repo)
    mined = {r["id"]: r for r in _lines(store.dataset_dir / "completion.test.jsonl")}
    answers = _lines(report.directory / "predictions.jsonl")
    assert len(answers) == data["dataset"]["instances"]["completion"] == 8
    cutoff = json.loads((store.dataset_dir / "manifest.json").read_text())["cutoff"]
    assert data["dataset"]["commit_range"]["cutoff"] == cutoff
    for answer in answers:  # every instance is a mined test instance, after the cutoff
        assert mined[answer["id"]]["target"] == answer["target"]
        assert mined[answer["id"]]["author_date"] >= cutoff[:10]
    trivial = trivial_ngram_set(data_dir)
    models = {m["spec"]: m for m in data["models"]}
    assert models["base"]["prompt"] == "prefix-only" and models["org"]["prompt"] == "fim"
    for spec in ("base", "org"):
        said = [a["predictions"][spec] for a in answers]
        targets = [a["target"] for a in answers]
        pooled = models[spec]["completion"]["pooled"]
        assert "\n" not in "".join(said)
        expect = {
            "exact_match": [exact_match(p, t) for p, t in zip(said, targets, strict=True)],
            "strict_exact_match": [
                strict_exact_match(p, t) for p, t in zip(said, targets, strict=True)
            ],
            "edit_similarity": [edit_similarity(p, t) for p, t in zip(said, targets, strict=True)],
        }
        for metric, values in expect.items():
            assert pooled[metric]["value"] == pytest.approx(100 * sum(values) / len(values))
        bleu = corpus_crystal_bleu(
            [crystal_bleu_stats(p, t, trivial) for p, t in zip(said, targets, strict=True)]
        )
        assert pooled["crystal_bleu"]["value"] == pytest.approx(100 * bleu)
        latencies = [a["latency_ms"][spec] for a in answers]
        assert models[spec]["latency"]["p50_ms"] == pytest.approx(percentile(latencies, 50))
        assert models[spec]["latency"]["p95_ms"] > 0
        for author, count in data["dataset"]["instances"]["per_author"].items():
            mine = [
                e
                for e, a in zip(expect["exact_match"], answers, strict=True)
                if a["author_id"] == author
            ]
            assert len(mine) == count
            cell = models[spec]["completion"]["per_author"][author]["exact_match"]
            assert cell["value"] == pytest.approx(100 * sum(mine) / count)
        general = models[spec]["retention"]["general"]
        assert general["instances"] == 3 and 0 <= general["exact"] <= 3
        humaneval = models[spec]["retention"]["humaneval"]
        assert humaneval["problems"] == 1 and humaneval["passed"] in (0, 1)
    (comparison,) = data["comparisons"]
    paired = mcnemar(
        [exact_match(a["predictions"]["org"], a["target"]) for a in answers],
        [exact_match(a["predictions"]["base"], a["target"]) for a in answers],
    )
    assert comparison["p_value"] == pytest.approx(paired.p_value)
    # The promoted two-step run gained on validation, so a final pass over the
    # held-out windows made its served adapter: `org` is evaluated by its
    # measured checkpoint, the adapter GGUF export wrote beside the model.
    run_dir = store.run_dir(models["org"]["run_id"])
    assert json.loads((run_dir / "record.json").read_text())["served"]["final_pass"]
    org_manifest = models["org"]["manifests"]["adapter"]
    assert org_manifest["repo"] == str(repo.resolve()) and org_manifest["kind"] == "adapter"
    assert org_manifest["extra"]["checkpoint"] == "measured"
    assert models["org"]["adapter"] == str(run_dir / "export" / "measured-adapter-f32.gguf")
    assert "measured checkpoint" in models["org"]["note"]
    assert report.html_path.read_text().count("data:image/png;base64,") == 3


def test_module_lookup_matches_a_recomputation(evaluated) -> None:
    report, *_ = evaluated
    data = json.loads(report.json_path.read_text())
    section = data["module_lookup"]
    assert section["evaluated"] is True, section
    queries = _lines(report.directory / "lookup.jsonl")
    assert len(queries) == data["dataset"]["instances"]["module_lookup"] > 0
    rows = {r["ranking"]: r for r in section["rows"]}
    assert set(rows) == {
        "retrieval (BM25)",
        "base: hybrid",
        "base: model",
        "org: hybrid",
        "org: model",
    }
    for name, row in rows.items():
        hits = [top_k_hit(q["rankings"][name], q["modules"], 1) for q in queries]
        assert row["top1"] == pytest.approx(100 * sum(hits) / len(hits))
        hits3 = [top_k_hit(q["rankings"][name], q["modules"], 3) for q in queries]
        assert row["top3"] == pytest.approx(100 * sum(hits3) / len(hits3))


def test_predictions_are_reproducible_through_the_engine(evaluated) -> None:
    report, settings, data_dir, repo = evaluated
    store = RepoStore.for_repo(data_dir, repo)
    mined = {r["id"]: r for r in _lines(store.dataset_dir / "completion.test.jsonl")}
    answers = _lines(report.directory / "predictions.jsonl")[:3]
    (org,) = resolve_models(["org"], repo, settings, data_dir)
    engine = open_engine(org, settings)
    try:
        for answer in answers:
            record = mined[answer["id"]]
            # The instance's path and mined context, as the evaluation gave them.
            text = engine.complete(
                record["prefix"], record["suffix"], record.get("path"), record.get("context")
            )
            assert text == answer["predictions"]["org"]
    finally:
        engine.close()


def test_cli_refuses_missing_models_without_a_report(evaluated, capsys) -> None:
    _report, settings, data_dir, repo = evaluated
    out = data_dir.parent / "refused"
    with pytest.raises(SystemExit) as exited:
        cli_main(
            [
                "--data-dir",
                str(data_dir),
                "eval",
                "--repo",
                str(repo),
                "--models",
                "base,org,baseline+,dev:nobody",
                "--base",
                settings.train.base,
                "--out",
                str(out),
            ]
        )
    assert exited.value.code == 2
    message = capsys.readouterr().err
    assert "baseline+" in message and "dev:nobody" in message and "Traceback" not in message
    assert not out.exists()
