"""Safety of a training run: a killed run resumes from its checkpoint with the
same step count and ends where an uninterrupted run ends; Ctrl-C saves and
exits cleanly; a full disk while checkpointing leaves the previous checkpoint
as latest; and the whole chain runs on a dataset mined from a real git repo."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_train import memorisable, tiny_settings

from shoptalk.models.settings import MineSettings
from shoptalk.models.store import RepoStore

STEPS = 40


def _cli(data_dir: Path, repo: Path, base: Path, *extra: str) -> list[str]:
    return [
        str(Path(sys.executable).parent / "shoptalk"),
        "--data-dir",
        str(data_dir),
        "train",
        "--repo",
        str(repo),
        "--base",
        str(base),
        "--max-steps",
        str(STEPS),
        "--val-every",
        "5",
        "--lr",
        "0.02",
        "--lora-rank",
        "8",
        "--batch-size",
        "4",
        "--grad-accum",
        "1",
        "--max-seq-tokens",
        "96",
        "--replay-share",
        "0",
        "--threads",
        "1",
        "--run-id",
        "r1",
        *extra,
    ]


def _env() -> dict[str, str]:
    # lora_dropout 0 makes the run deterministic, so resumed == uninterrupted.
    return {**os.environ, "SHOPTALK_TRAIN__LORA_DROPOUT": "0.0", "SHOPTALK_TRAIN__PATIENCE": "0"}


def _start_and_signal(
    command: list[str], latest: Path, sig: int, after: int
) -> tuple[int, str, int]:
    """Run `command`, send `sig` once a checkpoint at step ≥ `after` exists;
    return (exit code, stderr, the step of the latest checkpoint right after)."""
    proc = subprocess.Popen(command, env=_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            try:
                if json.loads(latest.read_text())["step"] >= after:
                    break
            except (OSError, ValueError, KeyError):
                pass
            if proc.poll() is not None:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be stopped"
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stderr, int(json.loads(latest.read_text())["step"])


def _losses(run: Path) -> list[tuple[int, str, str]]:
    rows = (run / "loss.csv").read_text().splitlines()[1:]
    return [(int(r.split(",")[1]), r.split(",")[5], r.split(",")[6]) for r in rows]


@pytest.mark.e2e
def test_interrupted_and_killed_run_resumes_to_the_same_result(
    tiny_hf: Any, tmp_path: Path
) -> None:
    """Ctrl-C, resume, SIGKILL, resume: the run ends at the same step count
    and the same validation loss as an uninterrupted run."""
    base = tiny_hf("llama")
    repo = tmp_path / "repo"
    repo.mkdir()
    stopped, clean = tmp_path / "stopped", tmp_path / "clean"
    memorisable(repo, stopped)
    memorisable(repo, clean)
    run = RepoStore.for_repo(stopped, repo).run_dir("r1")
    latest = run / "checkpoints" / "latest.json"

    code, stderr, first = _start_and_signal(_cli(stopped, repo, base), latest, signal.SIGINT, 10)
    assert code == 130
    assert "Traceback" not in stderr
    assert "interrupted at step" in stderr and "--resume" in stderr
    record = json.loads((run / "record.json").read_text())
    assert record["status"] == "interrupted"
    assert record["steps"] == first

    code, stderr, second = _start_and_signal(
        _cli(stopped, repo, base, "--resume"), latest, signal.SIGKILL, first + 5
    )
    assert code == -signal.SIGKILL
    assert f"resumed at sft step {first}" in stderr
    assert json.loads((run / "record.json").read_text())["status"] == "running"
    assert not (run / "adapter").exists()

    done = subprocess.run(
        _cli(stopped, repo, base, "--resume"), env=_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert f"resumed at sft step {second}" in done.stderr
    record = json.loads((run / "record.json").read_text())
    assert record["status"] == "complete"
    assert record["steps"] == STEPS
    assert [r["step"] for r in record["resumed"]] == [first, second]
    steps = [s for s, train, _ in _losses(run) if train]
    assert steps == list(range(1, STEPS + 1))

    reference = subprocess.run(_cli(clean, repo, base), env=_env(), capture_output=True, text=True)
    assert reference.returncode == 0, reference.stderr
    ref = json.loads((RepoStore.for_repo(clean, repo).run_dir("r1") / "record.json").read_text())
    assert ref["steps"] == STEPS
    assert record["final_val_loss"] == pytest.approx(ref["final_val_loss"], rel=1e-4)


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(
    tiny_hf: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import peft.peft_model  # noqa: F401 (imported before save_file is patched)
    import safetensors.torch

    from shoptalk.trainer.run_record import RunFolder
    from shoptalk.trainer.train import TrainError, train_adapter

    base = tiny_hf("llama")  # built before save_file is patched
    repo, data_dir = tmp_path / "repo", tmp_path / "data"
    repo.mkdir()
    memorisable(repo, data_dir)
    real_save = safetensors.torch.save_file
    calls = {"n": 0}

    def save_until_full(tensors: Any, filename: str, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] > 2:  # the first checkpoint (adapter + best) fits
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_until_full)
    with pytest.raises(
        TrainError,
        match=r"the disk is full\. Nothing is lost: .*the last complete checkpoint \(sft-000004\) "
        r"is kept\. Free some space and resume with `shoptalk train --repo .* --resume",
    ):
        train_adapter(
            repo,
            tiny_settings(base, max_steps=12, val_every=4),
            data_dir,
            run_id="full",
            show_progress=False,
            report=lambda _m: None,
        )
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    run = RunFolder(RepoStore.for_repo(data_dir, repo).run_dir("full"))
    assert json.loads(run.latest_file.read_text())["checkpoint"] == "sft-000004"
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["latest.json", "sft-000004"]
    assert json.loads(run.record_file.read_text())["status"] == "failed"
    result = train_adapter(
        repo,
        tiny_settings(tiny_hf("llama")),
        data_dir,
        resume=True,
        show_progress=False,
        report=lambda _m: None,
    )
    assert result.status == "complete" and result.steps == 12


@pytest.mark.e2e
def test_trains_on_a_mined_fixture_repo_and_continues_from_its_adapter(
    history_repo: Any, tiny_hf: Any, tmp_path: Path
) -> None:
    from shoptalk.trainer.mine import mine_repository
    from shoptalk.trainer.train import train_adapter

    data_dir = tmp_path / "data"
    mined = mine_repository(
        history_repo.path,
        MineSettings(alias_file=history_repo.alias_file, test_per_author=3),
        data_dir,
    )
    kinds = {k for k, c in mined.manifest["counts"].items() if c["train"]}
    settings = tiny_settings(
        tiny_hf("qwen2"),
        max_steps=6,
        val_every=3,
        replay_share=0.1,
        pretrain_minutes=0.05,
        final_pass=False,  # the continued run starts from the measured weights
    )
    first = train_adapter(
        history_repo.path, settings, data_dir, show_progress=False, report=lambda _m: None
    )
    assert first.status == "complete" and first.adapter_dir is not None
    record = first.record
    assert set(record["dataset"]["train_examples"]) >= kinds | {"replay"}
    assert record["dataset"]["pretrain_windows"] > 0
    assert record["pretrain_steps"] > 0
    # The base is measured before phase 1 and phase 1's end point after it:
    # "before" in the summary is the base, not the continued pre-training.
    assert record["pretrain_val_loss"] is not None
    assert record["base_val_loss"] != pytest.approx(record["pretrain_val_loss"], rel=1e-6)
    assert [e["step"] for e in record["evaluations"][:2]] == [0, 0]
    assert record["evaluations"][0]["val_loss"] == record["base_val_loss"]
    assert record["dataset"]["manifest_sha256"]
    # The watcher's incremental path: continue from the adapter just made.
    second = train_adapter(
        history_repo.path,
        tiny_settings(tiny_hf("qwen2"), max_steps=3, val_every=3),
        data_dir,
        init_adapter=first.adapter_dir,
        show_progress=False,
        report=lambda _m: None,
    )
    assert second.status == "complete"
    assert second.base_val_loss == pytest.approx(first.final_val_loss, rel=1e-3)
