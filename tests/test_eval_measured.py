"""Evaluation of a run with a final pass, on tiny models: the served adapter
has trained on the test window, so `shoptalk eval` runs the measured
checkpoint instead (exported beside the served model as a GGUF LoRA), says
so in its verdict, and warns when an older export lacks that file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_train import tiny_settings
from test_train_honest import _held_out_dataset
from tiny_models import place_base_gguf

from shoptalk.models.files import sha256_file
from shoptalk.models.settings import Settings
from shoptalk.models.store import RepoStore
from shoptalk.trainer.eval_types import ResolvedModel

pytestmark = [pytest.mark.e2e]


class FinalPassRun:
    def __init__(self, repo: Path, data_dir: Path, settings: Settings, run_dir: Path):
        self.repo, self.data_dir, self.settings, self.run_dir = repo, data_dir, settings, run_dir

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    def resolve(self, spec: str, lines: list[str] | None = None) -> ResolvedModel:
        from shoptalk.trainer.evaluate import resolve_models

        say = lines.append if lines is not None else (lambda _line: None)
        return resolve_models([spec], self.repo, self.settings, self.data_dir, say)[0]


@pytest.fixture(scope="module")
def final_pass_run(tmp_path_factory: pytest.TempPathFactory, tiny_hf: Any, tiny_gguf: Any):
    """A run whose chosen checkpoint gained on validation, so that a final
    pass over the held-out windows made its served adapter; exported."""
    from shoptalk.trainer.export import export_run
    from shoptalk.trainer.train import train_adapter

    base = tiny_hf("qwen2")
    root = tmp_path_factory.mktemp("measured")
    repo, data_dir = root / "repo", root / "data"
    repo.mkdir()
    _held_out_dataset(repo, data_dir, train_copies=1, held_out=8)
    place_base_gguf(data_dir, base, tiny_gguf("qwen2"))
    settings = tiny_settings(base, max_steps=16, val_every=4, select_instances=8)
    settings = settings.model_copy(
        update={"eval": settings.eval.model_copy(update={"max_tokens": 8, "bootstrap": 50})}
    )
    trained = train_adapter(repo, settings, data_dir, show_progress=False, report=lambda _m: None)
    assert trained.record["served"]["final_pass"]["steps"] > 0, "the fixture needs a final pass"
    export_run(trained.run_dir, "f16")
    return FinalPassRun(repo, data_dir, settings, trained.run_dir)


def _answers(model: ResolvedModel, settings: Settings, data_dir: Path, repo: Path) -> list[str]:
    from shoptalk.trainer.evaluate import load_test_set, open_engine

    test_set = load_test_set(RepoStore.for_repo(data_dir, repo), settings, None)
    engine = open_engine(model, settings)
    try:
        return [engine.complete(i.prefix, i.suffix, i.path) for i in test_set.completion]
    finally:
        engine.close()


def test_export_writes_the_measured_checkpoint_beside_the_served_model(
    final_pass_run: FinalPassRun,
) -> None:
    from shoptalk.models.manifest import verify_model_file

    export = final_pass_run.run_dir / "export"
    assert sorted(p.name for p in export.glob("*.gguf")) == [
        "measured-adapter-f16.gguf",
        "model-f16.gguf",
    ]
    measured = verify_model_file(export / "measured-adapter-f16.gguf")
    served = verify_model_file(export / "model-f16.gguf")
    assert (measured.kind, measured.extra["checkpoint"]) == ("adapter", "measured")
    assert (served.kind, served.extra["checkpoint"]) == ("model", "final pass")
    weights = "adapter_model.safetensors"
    assert measured.extra["adapter_sha256"] == sha256_file(
        final_pass_run.run_dir / "measured-adapter" / weights
    )
    assert served.extra["adapter_sha256"] == sha256_file(
        final_pass_run.run_dir / "adapter" / weights
    )
    assert measured.extra["adapter_sha256"] != served.extra["adapter_sha256"]


def test_eval_of_the_run_answers_as_its_measured_checkpoint(
    final_pass_run: FinalPassRun, tmp_path: Path
) -> None:
    from shoptalk.trainer.export import export_run

    run = final_pass_run
    resolved = run.resolve(f"run:{run.run_id}")
    assert resolved.adapter == run.run_dir / "export" / "measured-adapter-f16.gguf"
    assert resolved.manifests["adapter"]["extra"]["checkpoint"] == "measured"
    assert resolved.note is not None and "measured checkpoint" in resolved.note

    # The measured checkpoint on its own: a copy of the run whose served
    # adapter is the measured one (no final pass), exported as an adapter.
    alone = tmp_path / "measured-alone"
    shutil.copytree(run.run_dir / "measured-adapter", alone / "adapter")
    record = json.loads((run.run_dir / "record.json").read_text())
    record.update(run_id="measured-alone", served={"final_pass": None})
    (alone / "record.json").write_text(json.dumps(record))
    exported = export_run(alone, "f16", adapter_only=True)
    assert [p.name for p in exported.files] == ["adapter-f16.gguf"]  # no final pass: one file
    reference = ResolvedModel(
        "reference", resolved.model, exported.files[0], resolved.use_fim, resolved.base
    )
    answers = _answers(resolved, run.settings, run.data_dir, run.repo)
    assert answers == _answers(reference, run.settings, run.data_dir, run.repo)
    # The served model, which has trained on these very lines, answers otherwise.
    served = ResolvedModel(
        "served",
        run.run_dir / "export" / "model-f16.gguf",
        None,
        resolved.use_fim,
        resolved.base,
    )
    assert answers != _answers(served, run.settings, run.data_dir, run.repo)


def test_the_promoted_run_is_evaluated_by_its_measured_checkpoint_too(
    final_pass_run: FinalPassRun,
) -> None:
    run = final_pass_run
    store = RepoStore.for_repo(run.data_dir, run.repo)
    model = run.run_dir / "export" / "model-f16.gguf"
    store.promote({"run_id": run.run_id, "model": str(model), "adapter": None})
    resolved = run.resolve("org")
    assert resolved.adapter == run.run_dir / "export" / "measured-adapter-f16.gguf"
    assert resolved.run_id == run.run_id and "measured checkpoint" in str(resolved.note)


def test_the_verdict_names_the_measured_checkpoint(
    final_pass_run: FinalPassRun, tmp_path: Path
) -> None:
    from shoptalk.trainer.evaluate import evaluate_models

    run = final_pass_run
    report = evaluate_models(
        run.repo,
        ["base", "run:latest"],
        run.settings,
        run.data_dir,
        4,
        general_instances=0,
        out_dir=tmp_path / "report",
    )
    text = report.data["verdict"]["text"]
    assert text.startswith(f"run:{run.run_id} ")
    assert f"run {run.run_id}'s measured checkpoint" in text and "final pass" in text
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    row = next(m for m in saved["models"] if m["spec"] == f"run:{run.run_id}")
    assert row["adapter"].endswith("measured-adapter-f16.gguf") and "measured" in row["note"]


def test_an_export_without_the_measured_checkpoint_is_evaluated_with_a_warning(
    final_pass_run: FinalPassRun, tmp_path: Path
) -> None:
    run = final_pass_run
    older = run.data_dir / "older-export"
    older.mkdir()
    export = run.run_dir / "export"
    moved = [p for p in export.iterdir() if p.name.startswith("measured-adapter-")]
    for path in moved:
        path.rename(older / path.name)
    try:
        lines: list[str] = []
        resolved = run.resolve(f"run:{run.run_id}", lines)
    finally:
        for path in moved:
            (older / path.name).rename(path)
    assert resolved.model == export / "model-f16.gguf" and resolved.adapter is None
    assert resolved.note is not None and "not held out" in resolved.note
    warning = next(line for line in lines if line.startswith("warning:"))
    assert "trained on the test window" in warning and f"shoptalk export {run.run_id}" in warning
