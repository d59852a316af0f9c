"""`shoptalk export` on tiny runs: the merged GGUF agrees with the HF merged
model, Q8_0 keeps the top-1, the GGUF adapter applied at run time on the base
gives the merged model's outputs and removing it gives the base's back
exactly; bad runs fail with clear messages and leave no half-written file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from tiny_models import (
    CODE_TEXT,
    TINY_ARCHITECTURES,
    TinyGguf,
    TinyHf,
    TinyRun,
    decisive_positions,
    hf_logits,
    llama_cpp_logits,
)

from shoptalk.models.files import sha256_file
from shoptalk.models.manifest import verify_model_file
from shoptalk.trainer.export import ExportError, export_run, find_run, merged_model, read_run

Exported = Callable[..., Path]


@pytest.fixture(scope="session")
def exported(tiny_run: TinyRun) -> Exported:
    """`exported(arch, quant, adapter_only=False, seed=7)` → the exported file
    (cached). Seed 7 is the trained stand-in run; other seeds are untrained."""
    done: dict[tuple[str, str, bool, int], Path] = {}

    def make(arch: str, quant: str, adapter_only: bool = False, seed: int = 7) -> Path:
        key = (arch, quant, adapter_only, seed)
        if key not in done:
            run_dir = tiny_run(arch, seed, 40 if seed == 7 else 0)
            done[key] = export_run(run_dir, quant, adapter_only=adapter_only, threads=1).files[0]
        return done[key]

    return make


def _ids(checkpoint: Path) -> list[int]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(checkpoint)(CODE_TEXT).input_ids)


@pytest.mark.e2e
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_merged_gguf_matches_hf_merged_model(
    arch: str, tiny_hf: TinyHf, tiny_run: TinyRun, exported: Exported
) -> None:
    ids = _ids(tiny_hf(arch))
    reference = hf_logits(merged_model(read_run(tiny_run(arch))), ids)
    got = llama_cpp_logits(exported(arch, "f32"), ids)
    assert np.abs(got - reference).max() < 0.05
    decisive = decisive_positions(reference, 0.1)
    assert decisive.mean() > 0.8
    assert (got.argmax(-1) == reference.argmax(-1))[decisive].all()
    # The adapter matters: the merged model is not the base.
    base = hf_logits_of(tiny_hf(arch), ids)
    assert (base.argmax(-1) != reference.argmax(-1)).mean() > 0.2


def hf_logits_of(checkpoint: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    result: np.ndarray = hf_logits(AutoModelForCausalLM.from_pretrained(checkpoint), ids)
    return result


@pytest.mark.e2e
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_q8_0_keeps_the_top1(
    arch: str, tiny_hf: TinyHf, tiny_run: TinyRun, exported: Exported
) -> None:
    import gguf

    ids = _ids(tiny_hf(arch))
    reference = hf_logits(merged_model(read_run(tiny_run(arch))), ids)
    path = exported(arch, "q8_0")
    got = llama_cpp_logits(path, ids)
    # Where the top two logits are within Q8_0's rounding the choice may flip;
    # how many such near-ties a random tiny model has depends on the float
    # order of the fixture's few Adam steps (torch's thread count in the run).
    decisive = decisive_positions(reference, 0.1)
    assert decisive.mean() > 0.5
    assert (got.argmax(-1) == reference.argmax(-1))[decisive].mean() >= 0.98
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert path.stat().st_size < exported(arch, "f32").stat().st_size / 3


@pytest.mark.e2e
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_runtime_adapter_on_base_matches_merged_and_removes_cleanly(
    arch: str, tiny_hf: TinyHf, tiny_gguf: TinyGguf, exported: Exported
) -> None:
    import llama_cpp

    from shoptalk.models.lora import LoraAdapters

    ids = _ids(tiny_hf(arch))
    merged = llama_cpp_logits(exported(arch, "f32"), ids)
    llm = llama_cpp.Llama(
        str(tiny_gguf(arch, "f32")), n_ctx=512, logits_all=True, verbose=False, n_threads=1
    )
    adapters = LoraAdapters(llm)

    def run() -> np.ndarray:
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)

    try:
        base = run()
        adapters.apply(exported(arch, "f32", adapter_only=True))
        with_adapter = run()
        assert adapters.active is not None
        assert np.abs(with_adapter - merged).max() < 0.05
        decisive = decisive_positions(merged, 0.1)
        assert (with_adapter.argmax(-1) == merged.argmax(-1))[decisive].all()

        # Replacing it with another run's adapter gives that run's outputs.
        adapters.apply(exported(arch, "f32", adapter_only=True, seed=8))
        other = run()
        assert np.abs(other - llama_cpp_logits(exported(arch, "f32", seed=8), ids)).max() < 0.05
        assert not np.allclose(other, with_adapter)

        adapters.remove()
        assert adapters.active is None
        assert np.array_equal(run(), base)
    finally:
        llm.close()


def test_adapter_gguf_layout(exported: Exported, tiny_run: TinyRun) -> None:
    import gguf

    path = exported("llama", "f16", adapter_only=True)
    assert path.name == "adapter-f16.gguf"
    reader = gguf.GGUFReader(path)
    fields = {key: f.contents() for key, f in reader.fields.items()}
    assert fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(16.0)
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    # llama.cpp's layout: lora_a is [n_in, r], lora_b is [r, n_out] (ggml order).
    assert shapes["blk.0.attn_q.weight.lora_a"] == (64, 8)
    assert shapes["blk.0.attn_q.weight.lora_b"] == (8, 64)
    assert shapes["blk.0.ffn_down.weight.lora_a"] == (128, 8)
    assert len(shapes) == 2 * 7 * 2  # A and B for 7 linear layers in 2 blocks


def test_manifests_beside_every_file(exported: Exported, tiny_run: TinyRun) -> None:
    run_dir = tiny_run("gemma3")
    record = json.loads((run_dir / "record.json").read_text())
    adapter_sha = sha256_file(run_dir / "adapter" / "adapter_model.safetensors")
    for path, kind, quant in (
        (exported("gemma3", "q8_0"), "model", "q8_0"),
        (exported("gemma3", "f16", adapter_only=True), "adapter", "f16"),
    ):
        assert path.parent == run_dir / "export"
        manifest = verify_model_file(path)
        assert (manifest.kind, manifest.quant, manifest.run_id) == (kind, quant, run_dir.name)
        assert manifest.base == record["base"]["key"]
        assert manifest.base_sha256 == record["base"]["sha256"]
        assert manifest.tokenizer_sha256 == record["base"]["tokenizer_sha256"]
        assert manifest.dataset_sha256 == record["dataset"]["manifest_sha256"]
        assert manifest.extra["adapter_sha256"] == adapter_sha
        assert manifest.eval["best_val_loss"] == 1.25
    leftovers = [p.name for p in (run_dir / "export").iterdir() if p.name.startswith(".")]
    assert leftovers == []


# --- bad input ---------------------------------------------------------------


def _copy_run(tiny_run: TinyRun, tmp_path: Path, arch: str = "qwen2") -> Path:
    run_dir = tmp_path / "run-copy"
    shutil.copytree(tiny_run(arch), run_dir, ignore=shutil.ignore_patterns("export"))
    return run_dir


def _edit_record(run_dir: Path, **changes: object) -> None:
    record = json.loads((run_dir / "record.json").read_text())
    record.update(changes)
    (run_dir / "record.json").write_text(json.dumps(record))


def test_missing_run(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"no run 'run-404'.*shoptalk train"):
        find_run("run-404", tmp_path, tmp_path / "data")
    with pytest.raises(ExportError, match="does not exist"):
        export_run(tmp_path / "nowhere")


def test_unfinished_run(tmp_path: Path, tiny_run: TinyRun) -> None:
    run_dir = _copy_run(tiny_run, tmp_path)
    _edit_record(run_dir, status="running")
    with pytest.raises(ExportError, match="running, not complete"):
        export_run(run_dir, "f16")
    _edit_record(run_dir, status="complete")
    shutil.rmtree(run_dir / "adapter")
    with pytest.raises(ExportError, match="has no PEFT adapter"):
        export_run(run_dir, "f16")
    assert not (run_dir / "export").exists()


def test_adapter_for_another_base(tmp_path: Path, tiny_run: TinyRun, tiny_hf: TinyHf) -> None:
    run_dir = _copy_run(tiny_run, tmp_path, "llama")
    other = str(tiny_hf("llama", 96))
    record = json.loads((run_dir / "record.json").read_text())
    _edit_record(run_dir, base={**record["base"], "path": other})
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = other
    (run_dir / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    for adapter_only in (False, True):
        with pytest.raises(ExportError, match="trained for another base"):
            export_run(run_dir, "f16", adapter_only=adapter_only)
    assert not list((run_dir / "export").glob("*.gguf"))


def test_corrupt_adapter_weights(tmp_path: Path, tiny_run: TinyRun) -> None:
    run_dir = _copy_run(tiny_run, tmp_path)
    weights = run_dir / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(b"\x00" * 64 + weights.read_bytes()[64:])
    for adapter_only in (False, True):
        with pytest.raises(ExportError, match="damaged"):
            export_run(run_dir, "q8_0", adapter_only=adapter_only)
    assert not list((run_dir / "export").glob("*.gguf"))


@pytest.mark.parametrize("quant", ["q8_0"])
def test_disk_full_mid_write_leaves_nothing(tmp_path: Path, tiny_run: TinyRun, quant: str) -> None:
    """A real write failure: the export runs in a child process whose file
    size limit (RLIMIT_FSIZE) is far below the GGUF's size."""
    run_dir = _copy_run(tiny_run, tmp_path)
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        from pathlib import Path
        from shoptalk.models.errors import ShopTalkError
        from shoptalk.trainer.export import export_run
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            export_run(Path({str(run_dir)!r}), {quant!r}, threads=1)
        except ShopTalkError as exc:
            print(exc)
            sys.exit(2)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "disk filled up" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    assert sorted(p.name for p in (run_dir / "export").iterdir()) == []


def test_cli_export(tmp_path: Path, tiny_run: TinyRun) -> None:
    shoptalk = Path(sys.executable).with_name("shoptalk")
    run_dir = _copy_run(tiny_run, tmp_path, "gemma3")
    env = {**os.environ, "SHOPTALK_DATA_DIR": str(tmp_path / "data")}

    def export(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(shoptalk), "export", *args], capture_output=True, text=True, timeout=300, env=env
        )

    done = export(str(run_dir), "--quant", "f16")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "model-f16.gguf" in done.stdout
    assert verify_model_file(run_dir / "export" / "model-f16.gguf").quant == "f16"

    # --promote: the repository the run was trained on serves it from now on,
    # once the gate lets it (this run has no held-out measurement: --force).
    repo = tmp_path / "repo"
    repo.mkdir()
    _edit_record(run_dir, repo=str(repo))
    refused = export(str(run_dir), "--adapter-only", "--promote")
    assert refused.returncode == 2 and "drop --adapter-only" in refused.stderr
    from shoptalk.models.registry import promoted_choice
    from shoptalk.models.settings import Settings
    from shoptalk.models.store import RepoStore

    kept = export(str(run_dir), "--quant", "f16", "--promote")
    assert kept.returncode == 0, kept.stderr[-2000:]
    assert "model-f16.gguf" in kept.stdout and "not promoted:" in kept.stdout
    assert "no held-out measurement" in kept.stdout
    assert RepoStore.for_repo(tmp_path / "data", repo).current() is None
    promoted = export(str(run_dir), "--quant", "f16", "--promote", "--force")
    assert promoted.returncode == 0, promoted.stderr[-2000:]
    assert "promoted:" in promoted.stdout and "--force although" in promoted.stdout

    current = RepoStore.for_repo(tmp_path / "data", repo).current()
    assert current is not None
    assert current["model"] == str(run_dir / "export" / "model-f16.gguf")
    assert current["adapter_dir"] == str(run_dir / "adapter")
    choice = promoted_choice(current, Settings(data_dir=tmp_path / "data"), tmp_path / "data")
    assert choice.run_id == current["run_id"] and choice.source == "promoted"

    _edit_record(run_dir, status="failed")
    bad = export(str(run_dir))
    assert bad.returncode == 2
    assert "failed, not complete" in bad.stderr
    assert "Traceback" not in bad.stderr
