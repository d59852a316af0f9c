"""Issue 20 on tiny models: checkpoints are chosen by held-out exact match,
a run that kept its start ends "complete — no gain" and is exported but not
promoted without --force, `--max-minutes` bounds the whole command, and the served
adapter has trained on the held-out windows while the record names the
checkpoint that was measured."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from test_train import FUNCS, completion, memorisable, tiny_settings, write_dataset

from shoptalk.models.store import RepoStore
from shoptalk.trainer.checkpoints import TrainState, record_evaluation


def test_the_kept_checkpoint_is_the_best_exact_match_not_the_lowest_loss() -> None:
    state = TrainState()
    assert record_evaluation(state, 2.0, 0.0)  # the start
    state.step = 8
    assert record_evaluation(state, 1.5, 20.0)  # more exact
    state.step = 16
    assert not record_evaluation(state, 1.0, 10.0)  # lower loss, fewer exact: not kept
    state.step = 24
    assert record_evaluation(state, 1.2, 20.0)  # as exact, lower loss: kept
    state.step = 32
    assert not record_evaluation(state, 1.3, 20.0)
    assert (state.best_step, state.best_val_em, state.best_val_loss) == (24, 20.0, 1.2)
    assert [e["step"] for e in state.evaluations] == [0, 8, 16, 24, 32]
    by_loss = TrainState()
    record_evaluation(by_loss, 2.0, None)
    by_loss.step = 8
    assert record_evaluation(by_loss, 1.0, None)  # no exact match: the loss decides


def test_a_kept_phase_1_end_point_is_a_gain_although_it_is_step_0() -> None:
    state = TrainState()
    assert record_evaluation(state, 2.0, 10.0, trained=False)  # the base
    assert not state.best_trained
    assert record_evaluation(state, 1.8, 12.5)  # after phase 1, still step 0
    state.step = 20
    assert not record_evaluation(state, 1.7, 9.4)  # fine-tuning lost exact matches
    assert state.best_step == 0 and state.best_trained


def test_training_records_both_figures_and_keeps_the_best_exact_match(
    tiny_hf: Any, tmp_path: Path
) -> None:
    from shoptalk.trainer.train import train_adapter

    repo, data_dir = tmp_path / "repo", tmp_path / "data"
    repo.mkdir()
    memorisable(repo, data_dir)
    result = train_adapter(
        repo,
        tiny_settings(tiny_hf("qwen2"), max_steps=24, val_every=4, select_instances=10),
        data_dir,
        show_progress=False,
        report=lambda _m: None,
    )
    record = result.record
    evaluations = record["evaluations"]
    assert [e["step"] for e in evaluations] == list(range(0, 25, 4))
    assert all(e["val_em"] is not None and e["val_loss"] is not None for e in evaluations)
    # The tiny random models lower their loss but rarely write a whole line
    # exactly, so the exact matches may all tie and the loss decides; the
    # unit test above has exact match overrule the loss.
    best = max(e["val_em"] for e in evaluations)
    tied = [e for e in evaluations if e["val_em"] == best]
    chosen = min(tied, key=lambda e: e["val_loss"])
    assert record["best_step"] == chosen["step"] == record["measured"]["step"]
    assert record["measured"]["val_em"] == best
    assert record["selection"].startswith("held-out exact match")
    assert record["outcome"] == "complete"


def test_a_run_that_kept_its_start_is_exported_but_not_promoted_without_force(
    tiny_hf: Any, tmp_path: Path
) -> None:
    from shoptalk.trainer.promotion import check_export_promotion
    from shoptalk.trainer.train import OUTCOME_NO_GAIN, summary_table, train_adapter

    repo, data_dir = tmp_path / "repo", tmp_path / "data"
    repo.mkdir()
    memorisable(repo, data_dir)
    # A learning rate too small to move any weight: nothing beats the start.
    settings = tiny_settings(tiny_hf("llama"), max_steps=4, val_every=2, learning_rate=1e-12)
    result = train_adapter(repo, settings, data_dir, show_progress=False, report=lambda _m: None)
    assert result.outcome == OUTCOME_NO_GAIN == result.record["outcome"]
    assert result.record["best_step"] == 0
    assert result.record["served"]["final_pass"] is None  # the start is served as it was
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(summary_table(result))
    assert "complete — no gain" in console.export_text()

    serve, why = check_export_promotion(result.record, force=False)
    assert not serve and "kept its start" in why
    serve, why = check_export_promotion(result.record, force=True)
    assert serve and "--force although" in why and "kept its start" in why

    shoptalk = str(Path(sys.executable).parent / "shoptalk")
    export = [shoptalk, "--data-dir", str(data_dir), "export", result.run_id, "--promote"]
    export += ["--repo", str(repo), "--quant", "f16"]
    kept = subprocess.run(export, capture_output=True, text=True, timeout=120)
    # The export is what was asked for; not serving it is the gate's decision.
    assert kept.returncode == 0, kept.stderr
    model = result.run_dir / "export" / "model-f16.gguf"
    assert model.is_file()
    line = next(x for x in kept.stdout.splitlines() if x.startswith("not promoted:"))
    assert "kept its start" in line and "the base stays served" in line
    assert line.endswith("--force serves it anyway")
    assert RepoStore.for_repo(data_dir, repo).current() is None
    # No export was ever measured here: nothing beside the served model.
    assert sorted(p.name for p in model.parent.glob("*.gguf")) == ["model-f16.gguf"]

    forced = subprocess.run([*export, "--force"], capture_output=True, text=True, timeout=120)
    assert forced.returncode == 0, forced.stderr
    assert "promoted:" in forced.stdout and "--force although" in forced.stdout
    current = RepoStore.for_repo(data_dir, repo).current()
    assert current is not None and current["run_id"] == result.run_id
    again = subprocess.run(export, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"run {result.run_id} stays served" in again.stdout  # not "the base"


def _held_out_dataset(repo: Path, data_dir: Path, train_copies: int, held_out: int) -> None:
    """Train on FUNCS; the validation and test windows hold other lines."""
    records = [completion("train", k) for k in range(len(FUNCS) * train_copies)]
    newer = [
        ("def div(a, b):\n    return ", "a / b", "\n"),
        ("def neg(a):\n    return ", "-a", "\n"),
        ("def pow2(a):\n    return ", "a ** 2", "\n"),
        ("logger = logging.", "getLogger(__name__)", "\n"),
    ]
    for split, offset in (("validation", 1000), ("test", 2000)):
        for k in range(held_out):
            prefix, target, suffix = newer[k % len(newer)]
            item = completion(split, offset + k)
            item.update(prefix=prefix, target=target, suffix=suffix)
            item["author_date"] = f"2025-02-{1 + k % 28:02d}T00:00:00Z"
            records.append(item)
    write_dataset(RepoStore.for_repo(data_dir, repo).dataset_dir, repo, records)


def test_a_run_that_kept_the_base_does_not_measure_it_against_itself(
    tiny_hf: Any, tmp_path: Path
) -> None:
    from shoptalk.trainer.train import OUTCOME_NO_GAIN, train_adapter

    repo, data_dir = tmp_path / "repo", tmp_path / "data"
    repo.mkdir()
    _held_out_dataset(repo, data_dir, train_copies=1, held_out=8)
    said: list[str] = []
    result = train_adapter(
        repo,
        tiny_settings(tiny_hf("qwen2"), max_steps=4, val_every=2, learning_rate=1e-12),
        data_dir,
        show_progress=False,
        report=lambda m: said.append(str(m)),
    )
    assert result.outcome == OUTCOME_NO_GAIN
    assert "test_window" not in result.record["measured"]
    assert any("not measured on the test window" in m for m in said), said


def test_the_served_adapter_knows_the_held_out_window_and_the_record_names_both(
    tiny_hf: Any, tmp_path: Path
) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shoptalk.models.catalog import resolve_base
    from shoptalk.trainer.formats import SequenceBuilder, completion_item
    from shoptalk.trainer.train import train_adapter

    base = tiny_hf("qwen2")
    repo, data_dir = tmp_path / "repo", tmp_path / "data"
    repo.mkdir()
    _held_out_dataset(repo, data_dir, train_copies=1, held_out=8)
    result = train_adapter(
        repo,
        tiny_settings(base, max_steps=16, val_every=4, select_instances=8),
        data_dir,
        show_progress=False,
        report=lambda _m: None,
    )
    record = result.record
    measured, served = record["measured"], record["served"]
    assert record["best_step"] > 0, "the fixture must gain on validation"
    assert measured["step"] == record["best_step"]
    assert measured["adapter"] == str(result.run_dir / "measured-adapter")
    assert served["adapter"] == str(result.adapter_dir)
    assert served["final_pass"]["steps"] == served["final_pass"]["planned_steps"] > 0
    assert measured["test_window"]["instances"] == 8

    tokenizer = AutoTokenizer.from_pretrained(base)
    builder = SequenceBuilder(tokenizer, resolve_base(str(base)).fim, 96)
    rows = [
        json.loads(line)
        for line in (result.run_dir.parent.parent / "dataset")
        .joinpath("completion.test.jsonl")
        .read_text()
        .splitlines()
    ]

    def test_window_loss(adapter: str) -> float:
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
        )
        model.eval()
        total, count = 0.0, 0
        for row in rows:
            item = completion_item(builder.template, row["prefix"], row["target"], row["suffix"])
            example = builder.build(item, "completion")
            assert example is not None
            ids = torch.tensor([example.input_ids])
            labels = ids.clone()
            labels[0, : example.answer_start] = -100
            with torch.no_grad():
                total += float(model(input_ids=ids, labels=labels).loss) * example.answer_tokens
            count += example.answer_tokens
        return total / count

    assert test_window_loss(served["adapter"]) < test_window_loss(measured["adapter"])


def test_max_minutes_bounds_the_whole_command(tiny_hf: Any, tmp_path: Path) -> None:
    budget_seconds = 12.0
    repo, data_dir = tmp_path / "repo", tmp_path / "data"
    repo.mkdir()
    # More records than 20% of the budget can prepare, and held-out windows
    # longer than the time left for the final pass.
    _held_out_dataset(repo, data_dir, train_copies=3000, held_out=3000)
    shoptalk = str(Path(sys.executable).parent / "shoptalk")
    command = [shoptalk, "--data-dir", str(data_dir), "train", "--repo", str(repo)]
    command += ["--base", str(tiny_hf("qwen2")), "--max-minutes", str(budget_seconds / 60)]
    command += ["--lr", "0.02", "--lora-rank", "8", "--batch-size", "4", "--grad-accum", "1"]
    command += ["--max-seq-tokens", "96", "--replay-share", "0", "--threads", "1"]
    command += ["--val-every", "5", "--run-id", "budget"]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    # The budget is counted from the command's start; the margin covers the
    # interpreter's start-up and one step or evaluation past a deadline.
    assert wall < budget_seconds + 10, (wall, done.stderr)
    record = json.loads(
        (RepoStore.for_repo(data_dir, repo).run_dir("budget") / "record.json").read_text()
    )
    assert record["status"] == "complete"
    assert record["wall_seconds"] < budget_seconds + 3
    assert record["dataset"]["train_examples"]["completion"] < len(FUNCS) * 3000
    assert "data preparation reached its share of --max-minutes" in done.stderr
    for phase in ("preparing data", "loading the model", "fine-tuning"):
        assert phase in done.stderr, phase


def test_the_bar_shows_the_latest_validation_loss_and_the_kept_step() -> None:
    from shoptalk.trainer.train_loop import bar_detail

    state = TrainState()
    assert "kept" not in bar_detail(state, "step 0/120", 0.0, "-")  # nothing evaluated yet
    record_evaluation(state, 2.792, 12.5, trained=False)
    state.step = 40
    record_evaluation(state, 2.394, 9.4)  # lower loss, fewer exact: the base stays kept
    detail = bar_detail(state, "step 45/120", 290.0, "1.0")
    assert "val 2.394" in detail and "kept step 0" in detail, detail
