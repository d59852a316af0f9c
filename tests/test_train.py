"""Training on tiny random models: loss goes down on a memorisable set for
each architecture, the run folder is complete, the adapter is a standard
PEFT folder, and bad input fails with a clear message."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from shoptalk.models.settings import Settings, TrainSettings
from shoptalk.models.store import RepoStore

ARCHITECTURES = ("gemma3", "qwen2", "llama")

FUNCS = [
    ("def add(a, b):\n    return ", "a + b", "\n"),
    ("def sub(a, b):\n    return ", "a - b", "\n"),
    ("def greet(name):\n    print(", '"hello", name)', "\n"),
    ("class Box:\n    def size(self):\n        return ", "len(self.items)", "\n"),
    ("import os\npath = os.path.", "join(root, name)", "\n"),
    ("for item in items:\n    total += ", "item.price * item.count", "\n"),
    ("with open(path) as handle:\n    data = ", "json.load(handle)", "\n"),
    ("if not ok:\n    raise ", 'ValueError("not ok")', "\n"),
    ("def mul(a, b):\n    return ", "a * b", "\n"),
    ("log = logging.", "getLogger(__name__)", "\n"),
]


def record(kind: str, split: str, k: int, **fields: Any) -> dict[str, Any]:
    return {
        "id": f"{kind}-{split}-{k}",
        "kind": kind,
        "split": split,
        "repo": "fixture",
        "commit": f"{k:040x}",
        "author_id": "alice" if k % 2 else "bob",
        "author_date": f"2025-01-{1 + k % 28:02d}T00:00:00Z",
        "path": "pkg/mod.py",
        "language": "python",
        **fields,
    }


def completion(split: str, k: int) -> dict[str, Any]:
    prefix, target, suffix = FUNCS[k % len(FUNCS)]
    return record(
        "completion",
        split,
        k,
        prefix=prefix,
        target=target,
        suffix=suffix,
        symbol=None,
        modification=False,
        masked_tokens=len(target.split()),
        line=2,
    )


def write_dataset(
    directory: Path, repo: Path, records: list[dict[str, Any]], **manifest: Any
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    shards: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        shards.setdefault(f"{r['kind']}.{r['split']}.jsonl", []).append(r)
    for name, items in shards.items():
        (directory / name).write_text("".join(json.dumps(r) + "\n" for r in items))
    (directory / "manifest.json").write_text(
        json.dumps({"format": 1, "repo": str(repo), "head": "HEAD", **manifest})
    )
    return directory


def memorisable(repo: Path, data_dir: Path) -> Path:
    """Ten completions (plus one lookup) that are also the validation set."""
    records = [completion("train", k) for k in range(len(FUNCS))]
    records += [completion("validation", k) for k in range(len(FUNCS))]
    records.append(
        record(
            "module_lookup",
            "train",
            99,
            query="parse the config file",
            modules=["pkg.config"],
            source="commit_message",
        )
    )
    return write_dataset(RepoStore.for_repo(data_dir, repo).dataset_dir, repo, records)


def tiny_settings(base: Path, **train: Any) -> Settings:
    options: dict[str, Any] = {
        "base": str(base),
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "learning_rate": 2e-2,
        "batch_size": 4,
        "grad_accum": 1,
        "max_seq_tokens": 96,
        "max_steps": 40,
        "val_every": 8,
        "patience": 0,
        "replay_share": 0.0,
        "threads": 1,
        **train,
    }
    return Settings(train=TrainSettings(**options))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_loss_goes_down_and_run_is_complete(arch: str, tiny_hf: Any, tmp_path: Path) -> None:
    from shoptalk.trainer.train import train_adapter

    repo, data_dir = tmp_path / "repo", tmp_path / "data"
    repo.mkdir()
    memorisable(repo, data_dir)
    result = train_adapter(
        repo, tiny_settings(tiny_hf(arch)), data_dir, show_progress=False, report=lambda _m: None
    )
    assert result.status == "complete"
    assert result.steps == 40
    assert result.base_val_loss is not None and result.best_val_loss is not None
    assert result.best_val_loss < 0.7 * result.base_val_loss
    run = result.run_dir
    record = json.loads((run / "record.json").read_text())
    assert record["status"] == "complete"
    for key in ("base", "dataset", "seed", "versions", "throughput", "wall_seconds", "tokens"):
        assert record[key] is not None, key
    assert len(record["base"]["tokenizer_sha256"]) == 64
    assert len(record["base"]["sha256"]) == 64
    assert len(record["dataset"]["manifest_sha256"]) == 64
    assert record["versions"]["torch"]
    assert record["throughput"]["tokens_per_second"] > 0
    # Completion prompts are built as the server builds them ([serve]).
    assert record["prompt"]["prefix_chars"] == Settings().serve.prefix_chars
    config = json.loads((run / "config.json").read_text())
    assert config["settings"]["train"]["max_steps"] == 40
    csv_lines = (run / "loss.csv").read_text().splitlines()
    assert csv_lines[0].startswith("phase,step,tokens")
    assert len(csv_lines) > 40
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(tiny_hf(arch).resolve())
    assert not adapter_config.get("modules_to_save")
    assert not any(t in ("embed_tokens", "lm_head") for t in adapter_config["target_modules"])
    assert not (run / "checkpoints").exists()


def test_adapter_loads_with_peft_and_matches_validation(tiny_hf: Any, tmp_path: Path) -> None:
    """The adapter folder is what the export reads: a plain PeftModel, whose
    full-vocabulary loss on an answer equals the trainer's answer-only loss."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shoptalk.models.catalog import resolve_base
    from shoptalk.trainer.formats import SequenceBuilder, completion_item
    from shoptalk.trainer.train import train_adapter

    base = tiny_hf("qwen2")
    repo, data_dir = tmp_path / "repo", tmp_path / "data"
    repo.mkdir()
    memorisable(repo, data_dir)
    result = train_adapter(
        repo,
        tiny_settings(base, max_steps=8, final_pass=False),  # the measured adapter is served
        data_dir,
        show_progress=False,
        report=lambda _m: None,
        precision="fp32",
    )
    assert result.adapter_dir is not None
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), result.adapter_dir
    )
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(base)
    builder = SequenceBuilder(tokenizer, resolve_base(str(base)).fim, 96)
    losses = []
    for prefix, target, suffix in FUNCS:
        example = builder.build(completion_item(builder.template, prefix, target, suffix), "c")
        assert example is not None
        ids = torch.tensor([example.input_ids])
        labels = ids.clone()
        labels[0, : example.answer_start] = -100
        with torch.no_grad():
            out = model(input_ids=ids, labels=labels)
        losses.append((float(out.loss), example.answer_tokens))
    mean = sum(loss * n for loss, n in losses) / sum(n for _, n in losses)
    assert result.final_val_loss is not None
    assert mean == pytest.approx(result.final_val_loss, rel=1e-3)


def test_replay_and_weights_enter_the_mix(tiny_hf: Any, tmp_path: Path) -> None:
    from shoptalk.trainer.train import train_adapter

    repo, data_dir = tmp_path / "repo", tmp_path / "data"
    repo.mkdir()
    memorisable(repo, data_dir)
    settings = tiny_settings(
        tiny_hf("llama"),
        max_steps=2,
        replay_share=0.3,
        kind_weights={"module_lookup": 3.0},
    )
    result = train_adapter(repo, settings, data_dir, show_progress=False, report=lambda _m: None)
    counts = result.record["dataset"]["train_examples"]
    assert counts["module_lookup"] == 3
    assert counts["replay"] >= 1
    assert counts["completion"] >= len(FUNCS)


def test_a_step_budget_prepares_only_the_records_its_steps_use(
    tiny_hf: Any, tmp_path: Path
) -> None:
    """A short run on a long history tokenizes what its steps read (the
    newest records first), not every record of the history."""
    from shoptalk.trainer.train import PREPARE_CHUNK, examples_for_steps, train_adapter

    repo, data_dir = tmp_path / "repo", tmp_path / "data"
    repo.mkdir()
    history = 3 * PREPARE_CHUNK + 50
    records = [completion("train", k) for k in range(history)]
    records += [completion("validation", k) for k in range(len(FUNCS))]
    write_dataset(RepoStore.for_repo(data_dir, repo).dataset_dir, repo, records)
    settings = tiny_settings(tiny_hf("llama"), max_steps=2, select_instances=0)
    enough = examples_for_steps(settings.train)
    assert enough is not None and enough < history
    said: list[str] = []
    result = train_adapter(
        repo, settings, data_dir, show_progress=False, report=lambda m: said.append(str(m))
    )
    prepared = result.record["dataset"]["train_examples"]["completion"]
    assert enough <= prepared < history
    assert any("enough for --max-steps 2" in line for line in said)
    assert examples_for_steps(TrainSettings()) is None  # no step budget: every record


def test_too_few_instances_says_how_many(tiny_hf: Any, tmp_path: Path) -> None:
    from shoptalk.trainer.train import train_adapter
    from shoptalk.trainer.train_data import MIN_TRAIN_INSTANCES, DatasetError

    repo, data_dir = tmp_path / "repo", tmp_path / "data"
    repo.mkdir()
    write_dataset(
        RepoStore.for_repo(data_dir, repo).dataset_dir,
        repo,
        [completion("train", k) for k in range(3)],
    )
    with pytest.raises(DatasetError, match=f"3 usable training.*at least {MIN_TRAIN_INSTANCES}"):
        train_adapter(repo, tiny_settings(tiny_hf("llama")), data_dir, show_progress=False)


def test_missing_dataset_and_unknown_base(tiny_hf: Any, tmp_path: Path) -> None:
    from shoptalk.models.catalog import UnknownBaseModel
    from shoptalk.trainer.train import train_adapter
    from shoptalk.trainer.train_data import DatasetError

    repo, data_dir = tmp_path / "repo", tmp_path / "data"
    repo.mkdir()
    with pytest.raises(DatasetError, match="shoptalk mine"):
        train_adapter(repo, tiny_settings(tiny_hf("llama")), data_dir, show_progress=False)
    memorisable(repo, data_dir)
    with pytest.raises(UnknownBaseModel, match="catalog key"):
        train_adapter(repo, Settings(train=TrainSettings(base="no-such-model")), data_dir)


def test_dataset_of_another_repo_or_tokenizer_is_refused(tiny_hf: Any, tmp_path: Path) -> None:
    from shoptalk.trainer.train import train_adapter
    from shoptalk.trainer.train_data import DatasetError

    repo, other, data_dir = tmp_path / "repo", tmp_path / "other", tmp_path / "data"
    repo.mkdir()
    other.mkdir()
    records = [completion("train", k) for k in range(10)]
    dataset = RepoStore.for_repo(data_dir, repo).dataset_dir
    write_dataset(dataset, other, records)
    with pytest.raises(DatasetError, match="was mined from"):
        train_adapter(repo, tiny_settings(tiny_hf("llama")), data_dir, show_progress=False)
    write_dataset(dataset, repo, records, base="qwen2.5-coder-0.5b", tokenizer_sha256="0" * 64)
    with pytest.raises(DatasetError, match="another tokenizer"):
        train_adapter(
            repo,
            tiny_settings(tiny_hf("llama")),
            data_dir,
            show_progress=False,
            report=lambda _m: None,
        )


def test_unsupported_architecture(tmp_path: Path) -> None:
    from shoptalk.models.catalog import UnknownBaseModel
    from shoptalk.trainer.train import train_adapter

    checkpoint = tmp_path / "gpt2"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    repo, data_dir = tmp_path / "repo", tmp_path / "data"
    repo.mkdir()
    memorisable(repo, data_dir)
    with pytest.raises(UnknownBaseModel, match="not supported"):
        train_adapter(repo, Settings(train=TrainSettings(base=str(checkpoint))), data_dir)


def test_newest_instances_come_first_and_replay_is_spread_through() -> None:
    from shoptalk.trainer.formats import Example
    from shoptalk.trainer.train_data import (
        ORDERED_WINDOW,
        BatchSchedule,
        interleave,
        newest_first,
    )

    records = [{"id": i, "author_date": f"2025-01-{i % 28 + 1:02d}"} for i in range(40)]
    dates = [r.get("author_date", "") for r in newest_first([*records, {"id": "undated"}])]
    assert dates[:-1] == sorted(dates[:-1], reverse=True) and dates[-1] == ""

    team = [Example((1, k), 1, "completion") for k in range(2 * ORDERED_WINDOW)]
    replay = [Example((2, k), 1, "replay") for k in range(8)]
    mixed = interleave(team, replay)
    assert sorted(mixed, key=lambda e: e.input_ids) == sorted(
        team + replay, key=lambda e: e.input_ids
    )
    positions = [i for i, e in enumerate(mixed) if e.kind == "replay"]
    assert positions[0] > 0 and positions[-1] < len(mixed) - 1
    assert max(b - a for a, b in itertools.pairwise(positions)) <= 70

    # First epoch: the front of the list (newest) first, shuffled inside windows;
    # later epochs: shuffled over the whole set.
    schedule = BatchSchedule(team, 1, 1, 0, ordered=True)
    first = [schedule.step(s)[0][0].input_ids[1] for s in range(ORDERED_WINDOW)]
    assert sorted(first) == list(range(ORDERED_WINDOW)) and first != sorted(first)
    second = [schedule.step(len(team) + s)[0][0].input_ids[1] for s in range(ORDERED_WINDOW)]
    assert max(second) >= ORDERED_WINDOW
    plain = BatchSchedule(team, 1, 1, 0)
    assert max(plain.step(s)[0][0].input_ids[1] for s in range(ORDERED_WINDOW)) >= ORDERED_WINDOW
