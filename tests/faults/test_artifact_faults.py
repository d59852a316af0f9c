"""Fault injection at every step that writes an artifact: the disk fills up,
or the process is killed (`kill -9`), while ShopTalk writes

- the dataset (`shoptalk mine`),
- a checkpoint and the finished adapter (`shoptalk train`),
- the GGUF, its quantization and its manifest (`shoptalk export`),
- the evaluation report (`shoptalk eval`),
- the promoted-model pointer `current.json` (`shoptalk models rollback`).

Every fault is real and hits the real CLI, each command its own process
(forked from one that has imported torch once: `forked_cli.py`). The
`SHOPTALK_FAULT_INJECT` hook of `shoptalk.models.files` SIGKILLs the process
at the chosen moment of a write, or sets its file size limit to 0 bytes
there (RLIMIT_FSIZE: from then on the kernel fails every write with EFBIG, as
on a full disk); one case sets a size limit from the start instead, so that
torch's own writer is the one that fails. After each fault: every file under
a final name is whole (it parses), the user's repository is untouched, a
full disk gets a message without a traceback, and the next run completes and
removes what killed runs left behind. And no command, faulted or not, tries
to reach another machine (`forked_cli` reports any socket that would).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from forked_cli import NETWORK, ForkedCli
from test_train import memorisable
from tiny_models import place_base_gguf

from shoptalk.models.files import FAULT_ENV
from shoptalk.models.manifest import manifest_path, verify_model_file
from shoptalk.models.store import RepoStore

pytestmark = [pytest.mark.e2e]

# Temp names of ShopTalk's writers (see shoptalk.models.files), and the
# previous folder that `atomic_dir` keeps aside while it swaps in the new one.
TEMP_NAME = re.compile(r"^\..+\.(partial|tmp|old)$")
KILLED = -signal.SIGKILL


@pytest.fixture(scope="module")
def cli() -> Iterator[ForkedCli]:
    forked = ForkedCli()
    yield forked
    forked.close()


def shoptalk(
    cli: ForkedCli,
    data_dir: Path,
    *args: str,
    fault: str | None = None,
    file_limit: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the CLI with one fault: `fault` for the hook, or `file_limit` bytes
    as the largest file the process may write (RLIMIT_FSIZE from the start)."""
    env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}
    if fault is not None:
        env[FAULT_ENV] = fault
    done = cli.run(["--data-dir", str(data_dir), *args], env, file_limit=file_limit)
    # Whatever happens, nothing is sent anywhere.
    assert NETWORK not in done.stderr, done.stderr[-3000:]
    return done


def tree_state(root: Path) -> dict[str, tuple[int, str]]:
    """Every entry under `root`: mode and content hash (git's index and locks,
    which git itself may rewrite on a read, left out)."""
    state: dict[str, tuple[int, str]] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel == ".git/index" or rel.endswith(".lock"):
            continue
        info = path.lstat()
        digest = ""
        if path.is_file() and not path.is_symlink():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        state[rel] = (info.st_mode, digest)
    return state


def temp_entries(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(".*") if TEMP_NAME.match(p.name))


def final_files(root: Path) -> list[Path]:
    """Files under a final name: not a temp, not inside a temp folder."""
    return [
        p
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(TEMP_NAME.match(part) for part in p.relative_to(root).parts)
    ]


def assert_whole(root: Path) -> None:
    """Every file under a final name below `root` reads back completely."""
    for path in final_files(root):
        data = path.read_bytes()
        name = path.name
        try:
            if name.endswith(".json"):
                json.loads(data)
            elif name.endswith(".jsonl"):
                assert not data or data.endswith(b"\n")
                for line in data.splitlines():
                    json.loads(line)
            elif name.endswith(".safetensors"):
                from safetensors.torch import load_file

                load_file(path)
            elif name.endswith(".pt"):
                import torch

                torch.load(path, weights_only=False)
            elif name.endswith(".gguf"):
                if manifest_path(path).exists():
                    verify_model_file(path)
                else:
                    import gguf

                    gguf.GGUFReader(path)
            elif name.endswith((".csv", ".html")):
                assert data.endswith(b"\n") or data.rstrip().endswith(b"</html>")
        except Exception as exc:  # any failure to read back is the finding
            raise AssertionError(f"{path} is half-written: {exc!r}") from exc


def assert_reported(done: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert done.returncode not in (0, KILLED), done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    for phrase in phrases:
        assert phrase in done.stderr, done.stderr[-3000:]


def assert_killed(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == KILLED, done.stderr[-3000:]


def dead_pid() -> int:
    """The id of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# --- mine ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mined(cli: ForkedCli, history_repo: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data dir holding the mined history repository (copy before changing)."""
    data = tmp_path_factory.mktemp("faults-mined") / "data"
    done = shoptalk(cli, data, "mine", "--repo", str(history_repo.path))
    assert done.returncode == 0, done.stderr[-3000:]
    return data


def test_mine_dataset(cli: ForkedCli, history_repo: Any, mined: Path, tmp_path: Path) -> None:
    repo = history_repo.path
    user_repo = tree_state(repo)
    data = tmp_path / "data"
    shutil.copytree(mined, data)
    dataset = RepoStore.for_repo(data, repo).dataset_dir
    before = tree_state(dataset)

    def mine(fault: str) -> subprocess.CompletedProcess[str]:
        return shoptalk(cli, data, "mine", "--repo", str(repo), "--full", fault=fault)

    full = mine("full:begin:dataset")
    assert_reported(full, "could not write", "Nothing was half-written", "Free some space")
    assert tree_state(dataset) == before
    assert_killed(mine("kill:commit:dataset"))
    assert tree_state(dataset) == before
    # Killed between moving the old dataset aside and the new one in.
    assert_killed(mine("kill:swap:dataset"))
    assert not dataset.exists() and dataset.with_name(".dataset.old").is_dir()
    assert_whole(data)

    again = shoptalk(cli, data, "mine", "--repo", str(repo), "--full")
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(tree_state(dataset)) == sorted(before)
    assert temp_entries(data / "repos") == []
    assert_whole(data)
    assert tree_state(repo) == user_repo


# --- train -----------------------------------------------------------------------


def _train_args(repo: Path, base: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--repo",
        str(repo),
        "--base",
        str(base),
        "--max-steps",
        "8",
        "--val-every",
        "4",
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


def test_train_checkpoints_and_adapter(cli: ForkedCli, tiny_hf: Any, tmp_path: Path) -> None:
    base = tiny_hf("llama")
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "notes.txt").write_text("the user's own file\n")
    user_repo = tree_state(repo)
    data = tmp_path / "data"
    memorisable(repo, data)
    run = RepoStore.for_repo(data, repo).run_dir("r1")
    checkpoints = run / "checkpoints"

    def train(*extra: str, **fault: Any) -> subprocess.CompletedProcess[str]:
        return shoptalk(cli, data, *_train_args(repo, base, *extra), **fault)

    def complete_checkpoints() -> list[str]:
        return sorted(p.name for p in checkpoints.iterdir() if not TEMP_NAME.match(p.name))

    def latest() -> str:
        return str(json.loads((checkpoints / "latest.json").read_text())["checkpoint"])

    # The disk fills up while the second checkpoint is written (safetensors fails).
    done = train(fault="full:begin:sft-000008")
    resume = f"shoptalk train --repo {repo} --resume --run-id r1"
    assert_reported(
        done,
        "could not write a checkpoint",
        "Nothing is lost",
        "the last complete checkpoint (sft-000004) is kept",
        resume,
    )
    assert complete_checkpoints() == ["latest.json", "sft-000004"] and latest() == "sft-000004"
    # The record cannot say "failed" on a full disk; it stays resumable.
    assert json.loads((run / "record.json").read_text())["status"] == "running"
    assert not (run / "adapter").exists()
    assert_whole(run)

    # torch's own writer fails: files up to the size of the safetensors fit,
    # the optimizer state (larger: two moments per weight) does not.
    kept = checkpoints / "sft-000004"
    weights = max((kept / n).stat().st_size for n in ("adapter.safetensors", "best.safetensors"))
    optimizer = (kept / "optimizer.pt").stat().st_size
    assert optimizer > weights + 4096
    done = train("--resume", file_limit=(weights + optimizer) // 2)
    assert_reported(done, "could not write a checkpoint", "(sft-000004) is kept", resume)
    assert complete_checkpoints() == ["latest.json", "sft-000004"]
    assert_whole(run)

    assert_killed(train("--resume", fault="kill:commit:sft-000008"))
    assert complete_checkpoints() == ["latest.json", "sft-000004"] and latest() == "sft-000004"

    # Training is done; the disk fills up while the adapter is written.
    done = train("--resume", fault="full:begin:adapter")
    assert_reported(done, "could not write the finished adapter", "Nothing is lost", resume)
    assert latest() == "sft-000008" and not (run / "adapter").exists()
    assert_whole(run)

    assert_killed(train("--resume", fault="kill:commit:adapter"))
    assert not (run / "adapter").exists()
    assert_whole(run)

    done = train("--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((run / "record.json").read_text())
    assert record["status"] == "complete" and record["steps"] == 8
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert temp_entries(run) == []
    assert_whole(run)
    assert tree_state(repo) == user_repo


# --- export ----------------------------------------------------------------------


def test_export_gguf_quantize_and_manifest(cli: ForkedCli, tiny_run: Any, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # An untrained LoRA (random B) is a LoRA all the same, and cheap to make.
    shutil.copytree(
        tiny_run("llama", train_steps=0), run_dir, ignore=shutil.ignore_patterns("export")
    )
    trained = tree_state(run_dir)
    export_dir = run_dir / "export"
    data = tmp_path / "data"

    def export(*args: str, fault: str) -> subprocess.CompletedProcess[str]:
        return shoptalk(cli, data, "export", str(run_dir), *args, fault=fault)

    def exported() -> list[str]:
        if not export_dir.exists():
            return []
        return sorted(p.name for p in export_dir.iterdir() if not TEMP_NAME.match(p.name))

    adapter, merged = ("--adapter-only",), ("--quant", "q8_0")
    # The GGUF writer (the LoRA alone, and the merged model before quantizing).
    assert_killed(export(*adapter, fault="kill:commit:adapter-f16.gguf"))
    assert [p.name.split(".")[1] for p in temp_entries(export_dir)] == ["adapter-f16"]
    # Each export first removes what killed exports left (here: a whole GGUF).
    assert_reported(export(*adapter, fault="full:begin:adapter-f16.gguf"), "disk filled up")
    assert temp_entries(export_dir) == []
    assert_reported(export(*merged, fault="full:begin:.model-q8_0.gguf.*.f32.partial"), "disk")
    assert exported() == [] and temp_entries(export_dir) == []
    # Quantizing (llama.cpp writes the file): killed, it leaves the merged
    # f32 GGUF and the quantized one, both under temp names.
    assert_killed(export(*merged, fault="kill:commit:model-q8_0.gguf"))
    assert len(temp_entries(export_dir)) == 2 and exported() == []
    assert_reported(export(*merged, fault="full:begin:model-q8_0.gguf"), "quantize", "disk")
    assert exported() == [] and temp_entries(export_dir) == []
    # The manifest: a model never stays without it.
    manifest = "adapter-f16.gguf.manifest.json"
    assert_reported(export(*adapter, fault=f"full:begin:{manifest}"), "disk filled up")
    assert exported() == []
    assert_killed(export(*adapter, fault=f"kill:commit:{manifest}"))
    assert manifest not in exported()
    assert_whole(export_dir)

    # A concurrent export's temp file (its process is alive) must survive.
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) as live:
        try:
            running = export_dir / f".model-q8_0.gguf.{live.pid}.partial"
            running.write_bytes(b"still being written")
            done = shoptalk(cli, data, "export", str(run_dir), *merged)
            assert done.returncode == 0, done.stderr[-3000:]
            assert temp_entries(export_dir) == [running]
        finally:
            live.kill()
    assert "model-q8_0.gguf" in exported()
    assert verify_model_file(export_dir / "model-q8_0.gguf").quant == "q8_0"
    assert_whole(export_dir)
    assert {k: v for k, v in tree_state(run_dir).items() if not k.startswith("export")} == trained


# --- eval ------------------------------------------------------------------------


def test_eval_report(
    cli: ForkedCli, history_repo: Any, mined: Path, tiny_hf: Any, tiny_gguf: Any, tmp_path: Path
) -> None:
    repo = history_repo.path
    user_repo = tree_state(repo)
    data = tmp_path / "data"
    shutil.copytree(mined, data)
    checkpoint = tiny_hf("llama")
    place_base_gguf(data, checkpoint, tiny_gguf("llama"))
    report = tmp_path / "report"

    def evaluate(fault: str | None = None) -> subprocess.CompletedProcess[str]:
        return shoptalk(
            cli,
            data,
            "eval",
            "--repo",
            str(repo),
            "--models",
            "base",
            "--base",
            str(checkpoint),
            "--limit",
            "1",
            "--general",
            "0",
            "--lookup",
            "0",
            "--out",
            str(report),
            fault=fault,
        )

    first = evaluate()
    assert first.returncode == 0, first.stderr[-3000:]
    written = tree_state(report)
    assert_reported(evaluate("full:begin:report"), "could not write", "Nothing was half-written")
    assert tree_state(report) == written
    assert_killed(evaluate("kill:commit:report"))
    # (The next report's write removes the killed one's temp folder, as for
    # every folder written whole: see test_mine_dataset.)
    assert tree_state(report) == written and len(list(tmp_path.glob(".report.*"))) == 1
    assert_whole(report)
    assert tree_state(repo) == user_repo


# --- promotion -------------------------------------------------------------------


def test_promoted_pointer(cli: ForkedCli, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    data = tmp_path / "data"
    store = RepoStore.for_repo(data, repo)
    store.promote({"run_id": "one", "model": str(tmp_path / "one.gguf")})
    store.promote({"run_id": "two", "model": str(tmp_path / "two.gguf")})
    pointer = store.current_file.read_bytes()

    def rollback(fault: str | None = None) -> subprocess.CompletedProcess[str]:
        return shoptalk(cli, data, "models", "rollback", "--repo", str(repo), fault=fault)

    assert_reported(rollback("full:begin:current.json"), "could not write", "Free some space")
    assert store.current_file.read_bytes() == pointer
    assert_killed(rollback("kill:commit:current.json"))
    assert store.current_file.read_bytes() == pointer
    assert len(temp_entries(store.root)) == 1
    done = rollback()
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(store.current_file.read_text())["run_id"] == "one"
    assert temp_entries(store.root) == []


# --- the pieces ------------------------------------------------------------------


def test_write_failures_of_torch_and_safetensors_are_recognised(tmp_path: Path) -> None:
    """The errors torch and safetensors raise on a full disk (no OSError) are
    told apart from bugs."""
    script = (
        "import resource, torch\n"
        "from pathlib import Path\n"
        "from safetensors.torch import save_file\n"
        "from shoptalk.models.files import write_failure\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))\n"
        "tensors = {'w': torch.zeros(4096)}\n"
        "for write in (lambda: save_file(tensors, 'a.safetensors'),\n"
        "              lambda: torch.save(tensors, 'a.pt'),\n"
        "              lambda: Path('a.txt').write_text('x' * 4096)):\n"
        "    try:\n"
        "        write()\n"
        "    except Exception as exc:\n"
        "        print(type(exc).__name__, '|', write_failure(exc))\n"
        "print('bug |', write_failure(RuntimeError('shape mismatch')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line.split(" | ") for line in done.stdout.splitlines()]
    assert [kind for kind, _ in lines] == ["SafetensorError", "RuntimeError", "OSError", "bug"]
    assert all("size limit" in why or "disk" in why for _, why in lines[:3])
    assert lines[3][1] == "None"


def test_stale_partials_of_dead_processes_only(tmp_path: Path) -> None:
    from shoptalk.models.files import remove_stale_partials

    dead = dead_pid()
    stale = [
        f".model-q8_0.gguf.{dead}.partial",
        f".model-q8_0.gguf.{dead}.f32.partial",
        f".state.json.{dead}.k2j_x9.tmp",
        f".dataset.{dead}.a1b2c3.partial",  # a folder
    ]
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]) as live:
        try:
            kept = [
                f".model-q8_0.gguf.{live.pid}.partial",  # a concurrent export's
                "model-q8_0.gguf",
                f".notes.{dead}.txt",
                f"keep.{dead}.partial",
            ]
            for name in stale + kept:
                if name.startswith(".dataset"):
                    (tmp_path / name).mkdir()
                    (tmp_path / name / "shard.jsonl").write_text("{}\n")
                else:
                    (tmp_path / name).write_bytes(b"x")
            removed = remove_stale_partials(tmp_path)
            only_dataset = remove_stale_partials(tmp_path, "dataset")
        finally:
            live.kill()
    assert sorted(p.name for p in removed) == sorted(stale)
    assert only_dataset == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
