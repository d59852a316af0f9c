"""Training under `accelerate launch` with two processes on CPU (gloo), for
real: the same optimizer steps and losses as one process with the same
effective batch, only rank 0 writes the run, `--resume` after the launcher's
process group is stopped (SIGTERM) and killed (SIGKILL), and the run exports
like a single-process one. The GPU forms that cannot run here (DDP on N
GPUs, FSDP, bf16) are checked as configurations with accelerate's own
classes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_train import memorisable
from tiny_models import llama_cpp_logits

from shoptalk.models.store import RepoStore

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "docs" / "accelerate"
BIN = Path(sys.executable).parent
STEPS = 40
# One process: 2 micro-batches of 2 per step; two processes: one each.
BATCH, ACCUM = 2, 2

# Installed as `sitecustomize` in the launched processes: every process but
# rank 0 logs each write, rename, mkdir or removal under the watched folder.
WRITE_WATCH = """
import os, sys
_watch = os.environ.get("SHOPTALK_TEST_WATCH")
_log = os.environ.get("SHOPTALK_TEST_WRITES")
_rank = os.environ.get("RANK")
if _watch and _log and _rank not in (None, "0"):
    def _note(text):
        fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, (text + "\\n").encode())
        finally:
            os.close(fd)

    def _watched(path):
        try:
            return os.path.abspath(os.fsdecode(path)).startswith(_watch)
        except TypeError:
            return False

    def _hook(event, args):
        if event == "open":
            flags = args[2] if isinstance(args[2], int) else 0
            if flags & (os.O_WRONLY | os.O_RDWR) and _watched(args[0]):
                _note(f"rank {_rank} {event} {args[0]}")
        elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
            paths = args[:2] if event == "os.rename" else args[:1]
            if any(_watched(p) for p in paths):
                _note(f"rank {_rank} {event} {args[0]}")

    sys.addaudithook(_hook)
    _note(f"rank {_rank} watching")
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _train_args(base: Path) -> list[str]:
    return [
        *("--base", str(base), "--max-steps", str(STEPS), "--val-every", "4"),
        *("--lr", "0.02", "--lora-rank", "8", "--batch-size", str(BATCH)),
        *("--grad-accum", str(ACCUM), "--max-seq-tokens", "96", "--replay-share", "0"),
        *("--threads", "1", "--precision", "fp32", "--run-id", "ddp"),
    ]


def _launch(data_dir: Path, repo: Path, base: Path, *extra: str) -> list[str]:
    return [
        str(BIN / "accelerate"),
        "launch",
        *("--config_file", str(CONFIGS / "ddp-cpu.yaml")),
        *("--main_process_port", str(_free_port())),
        str(BIN / "shoptalk"),
        *("--data-dir", str(data_dir), "train", "--repo", str(repo)),
        *_train_args(base),
        *extra,
    ]


def _env(hooks: Path, run: Path, writes: Path) -> dict[str, str]:
    return {
        **os.environ,
        # lora_dropout 0: the run is deterministic, so it can match one process.
        "SHOPTALK_TRAIN__LORA_DROPOUT": "0.0",
        "PYTHONPATH": os.pathsep.join([str(hooks), os.environ.get("PYTHONPATH", "")]),
        "SHOPTALK_TEST_WATCH": str(run),
        "SHOPTALK_TEST_WRITES": str(writes),
    }


def _step(latest: Path) -> int:
    try:
        return int(json.loads(latest.read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def _status(run: Path) -> str:
    return str(json.loads((run / "record.json").read_text())["status"])


def _launch_and_signal(
    command: list[str], env: dict[str, str], latest: Path, sig: int, after: int
) -> tuple[int, str]:
    """Start the launcher in its own process group; once a checkpoint at
    step ≥ `after` exists, send `sig` to the whole group; (exit code, stderr)."""
    proc = subprocess.Popen(
        command, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.monotonic() + 240
    try:
        while _step(latest) < after and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be stopped"
        os.killpg(proc.pid, sig)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, stderr


def _train_losses(run: Path) -> dict[int, float]:
    rows = [r.split(",") for r in (run / "loss.csv").read_text().splitlines()[1:]]
    return {int(r[1]): float(r[5]) for r in rows if r[5]}


def _export_summary(folder: Path) -> dict[str, Any]:
    summary = {}
    for manifest in sorted(folder.glob("*.manifest.json")):
        data = json.loads(manifest.read_text())
        summary[manifest.name] = {
            k: data.get(k) for k in ("kind", "base", "quant", "architecture", "base_sha256")
        }
    return summary


@pytest.mark.e2e
@pytest.mark.slow
def test_two_processes_train_resume_and_export_like_one(tiny_hf: Any, tmp_path: Path) -> None:
    from shoptalk.trainer.export import export_run

    base = tiny_hf("llama")
    repo = tmp_path / "repo"
    repo.mkdir()
    one, two = tmp_path / "one", tmp_path / "two"
    memorisable(repo, one)
    memorisable(repo, two)

    # The reference: the same command without a launcher (one process).
    alone = subprocess.run(
        [
            str(BIN / "shoptalk"),
            "--data-dir",
            str(one),
            "train",
            "--repo",
            str(repo),
            *_train_args(base),
        ],
        env={**os.environ, "SHOPTALK_TRAIN__LORA_DROPOUT": "0.0"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert alone.returncode == 0, alone.stderr[-3000:]
    single = RepoStore.for_repo(one, repo).run_dir("ddp")
    reference_record = json.loads((single / "record.json").read_text())
    assert reference_record["steps"] == STEPS

    hooks, writes = tmp_path / "hooks", tmp_path / "writes.log"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(WRITE_WATCH)
    run = RepoStore.for_repo(two, repo).run_dir("ddp")
    latest = run / "checkpoints" / "latest.json"
    env = _env(hooks, run, writes)

    # Stopped: every process gets SIGTERM, they agree to stop after the step.
    code, stderr = _launch_and_signal(_launch(two, repo, base), env, latest, signal.SIGTERM, 8)
    assert code != 0
    assert stderr.count("interrupted at step") >= 1, stderr[-3000:]
    record = json.loads((run / "record.json").read_text())
    assert record["status"] == "interrupted"
    first = record["steps"]
    assert first >= 8 and _step(latest) == first

    # Killed: the launcher's group at once. torchrun's processes live in
    # sessions of their own; they get SIGTERM when the launcher dies and stop
    # with a checkpoint instead of training on alone.
    code, stderr = _launch_and_signal(
        _launch(two, repo, base, "--resume"), env, latest, signal.SIGKILL, first + 4
    )
    assert code == -signal.SIGKILL
    assert f"resumed at sft step {first}" in stderr
    deadline = time.monotonic() + 60
    while _status(run) == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _status(run) == "interrupted"
    second = _step(latest)
    assert STEPS > second >= first + 4 and not (run / "adapter").exists()

    done = subprocess.run(
        _launch(two, repo, base, "--resume"), env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count(f"resumed at sft step {second}") == 1  # rank 0 alone reports
    assert done.stdout.count("training run ddp") == 1
    record = json.loads((run / "record.json").read_text())
    assert record["status"] == "complete" and record["steps"] == STEPS
    assert [r["step"] for r in record["resumed"]] == [first, second]

    # Only rank 0 wrote: rank 1 ran (three launches) and touched nothing in the run.
    noted = writes.read_text().splitlines()
    assert noted == ["rank 1 watching"] * 3, noted

    # Same steps, same losses as one process with the same effective batch.
    reference = _train_losses(single)
    losses = _train_losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1)) == sorted(reference)
    for step, loss in reference.items():
        assert losses[step] == pytest.approx(loss, rel=1e-3), step
    assert record["final_val_loss"] == pytest.approx(reference_record["final_val_loss"], rel=1e-3)
    assert record["tokens"] == reference_record["tokens"]
    assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in single.iterdir())

    # The export of the two-process run is the single-process one's kind and figures.
    exported = subprocess.run(
        [
            str(BIN / "shoptalk"),
            "--data-dir",
            str(two),
            "export",
            "ddp",
            "--repo",
            str(repo),
            *("--quant", "f32"),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    export_run(single, "f32")
    ours, theirs = run / "export", single / "export"
    assert _export_summary(ours) == _export_summary(theirs) != {}
    ids = list(range(3, 40))
    model = "model-f32.gguf"
    assert llama_cpp_logits(ours / model, ids) == pytest.approx(
        llama_cpp_logits(theirs / model, ids), abs=2e-3
    )


@pytest.mark.parametrize(
    ("name", "kind", "processes", "precision"),
    [
        ("ddp-cpu", "MULTI_GPU", 2, "no"),
        ("ddp-gpus", "MULTI_GPU", 8, "bf16"),
        ("fsdp-gpus", "FSDP", 8, "bf16"),
    ],
)
def test_shipped_accelerate_configs_load_as_documented(
    name: str, kind: str, processes: int, precision: str
) -> None:
    """Each config in docs/accelerate/ loads with accelerate's own config
    class, turns into the launcher's settings, says in its first line the
    command that runs it, and is documented in docs/team-scale.md; the
    trainer accepts the DDP ones and refuses FSDP with what to do."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    from shoptalk.trainer.checkpoints import TrainError
    from shoptalk.trainer.train_loop import check_launch

    path = CONFIGS / f"{name}.yaml"
    config = load_config_from_file(str(path))
    assert config.compute_environment.value == "LOCAL_MACHINE"
    assert config.distributed_type.value == kind
    assert config.num_processes == processes and config.num_machines == 1
    assert str(config.mixed_precision) == precision and config.use_cpu is False
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith(f"# accelerate launch --config_file docs/accelerate/{name}.yaml")
    assert f"docs/accelerate/{name}.yaml" in (ROOT / "docs" / "team-scale.md").read_text()

    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_MIXED_PRECISION"] == precision
    assert int(env.get("WORLD_SIZE", args.num_processes)) == processes
    if kind == "FSDP":
        fsdp = config.fsdp_config
        assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
        assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
        assert fsdp["fsdp_use_orig_params"] is True  # PEFT: frozen and trainable in one unit
        assert env["ACCELERATE_USE_FSDP"] == "true"
        assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
        with pytest.raises(TrainError, match=r"FSDP.*not implemented yet.*DDP"):
            check_launch(kind, precision)
    else:
        assert args.multi_gpu and not args.use_fsdp
        check_launch(kind, precision)


def test_launch_settings_the_loop_cannot_honour_are_refused() -> None:
    from shoptalk.trainer.checkpoints import TrainError
    from shoptalk.trainer.train_loop import check_even_share, check_launch

    with pytest.raises(TrainError, match=r"mixed_precision is fp16.*--mixed_precision no or bf16"):
        check_launch("MULTI_GPU", "fp16")
    with pytest.raises(TrainError, match="DEEPSPEED run"):
        check_launch("DEEPSPEED", "bf16")
    check_launch("MULTI_CPU", "no")
    with pytest.raises(TrainError, match=r"grad_accum is 3 but 2 processes.*\(e\.g\. 2 or 4\)"):
        check_even_share(3, 2)
    check_even_share(4, 2)
    check_even_share(3, 1)
