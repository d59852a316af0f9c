"""`shoptalk export`: a finished training run → GGUF files the server loads.

Two outputs, each with a manifest beside it (`shoptalk.models.manifest`):

- `runs/<id>/export/model-<quant>.gguf`: the LoRA merged into the base (peft
  `merge_and_unload` in fp32), written by our GGUF writer, then quantized in
  process by `llama_cpp.llama_model_quantize` (1-D/norm tensors stay F32);
- `runs/<id>/export/adapter-<f16|f32>.gguf` (`--adapter-only`): the LoRA alone
  as a GGUF adapter that llama.cpp applies on top of the base at run time
  (`shoptalk.models.lora`);
- `runs/<id>/export/measured-adapter-<f16|f32>.gguf`, beside either, for a run
  whose served `adapter/` came from a final pass over the held-out windows:
  the measured checkpoint (`measured-adapter/`) as a GGUF LoRA, the model
  `shoptalk eval` judges on the test window (the served one has trained on it).

A run is exportable when its `record.json` says `complete` and `adapter/` is a
PEFT LoRA folder for the base the record names. Every file appears under its
final name only once it is whole.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoptalk.models.cli_logging import route_llama_logs
from shoptalk.models.errors import ShopTalkError
from shoptalk.models.files import (
    fault_point,
    free_bytes,
    partial_name,
    remove_stale_partials,
    sha256_file,
)
from shoptalk.models.manifest import ModelManifest, write_manifest
from shoptalk.models.progress import Report, quiet
from shoptalk.models.store import RepoStore
from shoptalk.trainer.run_record import RunFolder, RunRecordError

if TYPE_CHECKING:
    import torch

    from shoptalk.trainer.gguf_writer import LoraWeights

log = logging.getLogger(__name__)

QUANTS = ("q8_0", "q4_k_m", "q5_k_m", "f16", "f32")
FLOAT_QUANTS = ("f16", "f32")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The measured checkpoint's adapter GGUF of a run with a final pass:
# export/measured-adapter-<f16|f32>.gguf (`RunFolder.exported_measured_adapters`).
MEASURED_PREFIX = "measured-"
HF_MARKER = "shoptalk-checkpoint.json"  # written by models.provision beside a converted base


class ExportError(ShopTalkError):
    pass


# --- the run -------------------------------------------------------------------


@dataclass(frozen=True)
class ExportableRun:
    """What export needs from a finished run, checked."""

    root: Path
    record: dict[str, Any]
    adapter_dir: Path
    adapter_config: dict[str, Any]
    base_path: Path  # HF checkpoint the adapter was trained on
    base_key: str

    @property
    def run_id(self) -> str:
        return str(self.record.get("run_id") or self.root.name)

    @property
    def export_dir(self) -> Path:
        return RunFolder(self.root).export_dir

    @property
    def source_gguf(self) -> Path | None:
        """The GGUF the base checkpoint was converted from, if any: its
        tokenizer and metadata are carried over unchanged."""
        marker = self.base_path / HF_MARKER
        try:
            source = json.loads(marker.read_text())["source"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        path = self.base_path.parent / str(source)
        return path if path.is_file() else None


def find_run(run: str, repo: Path | None, data_dir: Path) -> Path:
    """A run folder from a path, or from a run id (or `latest`) in the repository's store."""
    from shoptalk.trainer.runs import resolve_run_id

    as_path = Path(run).expanduser()
    if as_path.is_dir():
        return as_path.resolve()
    store = RepoStore.for_repo(data_dir, (repo or Path.cwd()))
    candidate = store.run_dir(resolve_run_id(store, run))
    if candidate.is_dir():
        return candidate
    known = sorted(p.name for p in store.runs_dir.iterdir()) if store.runs_dir.is_dir() else []
    hint = (
        f"runs of this repository: {', '.join(known[-5:])}"
        if known
        else "train one with `shoptalk train`"
    )
    raise ExportError(
        f"no run {run!r}: not a folder and not a run id under {store.runs_dir} ({hint})"
    )


def read_run(run_dir: Path) -> ExportableRun:
    """Check that `run_dir` holds a complete run with a usable adapter."""
    if not run_dir.is_dir():
        raise ExportError(f"run folder {run_dir} does not exist")
    folder = RunFolder(run_dir)
    try:
        record = folder.load_record().data
    except RunRecordError as exc:
        raise ExportError(str(exc)) from None
    status = record.get("status")
    if status != "complete":
        raise ExportError(
            f"run {run_dir.name} is {status or 'of unknown status'}, not complete: "
            "wait for training to finish (or `shoptalk train --resume`) before exporting"
        )
    adapter_dir = folder.adapter_dir
    adapter_config = _adapter_config(run_dir.name, adapter_dir)
    base = record.get("base") or {}
    base_path = Path(str(base.get("path") or adapter_config.get("base_model_name_or_path") or ""))
    named = adapter_config.get("base_model_name_or_path")
    if named and base.get("path") and Path(str(named)) != Path(str(base["path"])):
        raise ExportError(
            f"the adapter in {adapter_dir} names base {named} but the run record says {base['path']}; "
            "the run folder is inconsistent — train again"
        )
    if not (base_path / "config.json").is_file():
        raise ExportError(
            f"the base checkpoint {base_path} of run {run_dir.name} is missing; "
            "provision it again (`shoptalk models pull`) and rerun export"
        )
    return ExportableRun(
        root=run_dir,
        record=record,
        adapter_dir=adapter_dir,
        adapter_config=adapter_config,
        base_path=base_path,
        base_key=str(base.get("key") or base_path.name),
    )


def _adapter_config(run_name: str, adapter_dir: Path) -> dict[str, Any]:
    """The config of a run's PEFT LoRA folder, checked to be exportable."""
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file() or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise ExportError(
            f"run {run_name} says complete but {adapter_dir} has no PEFT adapter "
            f"(adapter_config.json + {ADAPTER_WEIGHTS}); train again"
        )
    try:
        adapter_config: dict[str, Any] = json.loads(config_file.read_text())
    except ValueError as exc:
        raise ExportError(f"{config_file} is not valid JSON ({exc}); train again") from None
    if str(adapter_config.get("peft_type", "LORA")).upper() != "LORA":
        raise ExportError(
            f"{adapter_dir} is a {adapter_config.get('peft_type')} adapter; only LoRA exports"
        )
    if adapter_config.get("use_dora"):
        raise ExportError("DoRA adapters cannot be exported to GGUF; train with plain LoRA")
    return adapter_config


def has_final_pass(root: Path, record: dict[str, Any]) -> bool:
    """Whether a final pass over the held-out windows made the run's served
    `adapter/` from the measured checkpoint (kept in `measured-adapter/`):
    then the served adapter has trained on the test window, and only the
    measured one can be evaluated on it."""
    served = record.get("served") or {}
    return bool(served.get("final_pass")) or RunFolder(root).measured_adapter_dir.is_dir()


def measured_run(run: ExportableRun) -> ExportableRun | None:
    """The run with its measured checkpoint as the adapter, when a final pass
    made the served one from it; None when the served adapter is the measured
    one (or the measured checkpoint is gone: `has_final_pass` tells)."""
    if not has_final_pass(run.root, run.record):
        return None
    adapter_dir = RunFolder(run.root).measured_adapter_dir
    if not adapter_dir.is_dir():
        return None
    return replace(
        run, adapter_dir=adapter_dir, adapter_config=_adapter_config(run.run_id, adapter_dir)
    )


# --- the adapter -----------------------------------------------------------------


def _pattern_value(patterns: dict[str, Any], module: str, default: float) -> float:
    """PEFT's rank/alpha patterns: a key matches a module name suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return default


def lora_layers(
    run: ExportableRun, state: dict[str, torch.Tensor] | None = None
) -> list[LoraWeights]:
    """The adapter's (A, B, scale) per adapted weight, checked against the base's shapes."""
    import math

    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    from shoptalk.trainer.gguf_writer import LoraWeights

    weights_file = run.adapter_dir / ADAPTER_WEIGHTS
    if state is None:
        try:
            state = load_file(weights_file)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ExportError(f"{weights_file} is damaged ({exc}); train again") from None
    cfg = run.adapter_config
    rank = int(cfg.get("r", 8))
    alpha = float(cfg.get("lora_alpha", rank))
    rank_pattern = dict(cfg.get("rank_pattern") or {})
    alpha_pattern = dict(cfg.get("alpha_pattern") or {})
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = re.fullmatch(
            r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", key
        )
        if match is None:
            raise ExportError(
                f"{weights_file} holds {key}, which is not a LoRA A/B matrix of a linear layer; "
                "adapters with embeddings, modules_to_save or DoRA cannot be exported to GGUF"
            )
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    base_shapes = _base_shapes(run.base_path, safe_open)
    layers = []
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            raise ExportError(f"{weights_file}: {module} lacks its LoRA A or B matrix; train again")
        a, b = pair["A"], pair["B"]
        weight_name = module + ".weight"
        expected = base_shapes.get(weight_name)
        if expected is None or tuple(expected) != (b.shape[0], a.shape[1]):
            raise ExportError(
                f"the adapter of run {run.root.name} was trained for another base: {module} "
                f"is {b.shape[0]}×{a.shape[1]} in the adapter but "
                f"{'absent' if expected is None else '×'.join(map(str, expected))} in {run.base_path}"
            )
        r = _pattern_value(rank_pattern, module, rank)
        layer_alpha = _pattern_value(alpha_pattern, module, alpha)
        scale = layer_alpha / math.sqrt(r) if cfg.get("use_rslora") else layer_alpha / r
        layers.append(LoraWeights(weight_name=weight_name, a=a, b=b, scale=scale))
    if not layers:
        raise ExportError(f"{weights_file} holds no LoRA weights; train again")
    return layers


def _base_shapes(base_path: Path, safe_open: Any) -> dict[str, list[int]]:
    from safetensors import SafetensorError

    shapes: dict[str, list[int]] = {}
    files = sorted(base_path.glob("*.safetensors"))
    if not files:
        raise ExportError(
            f"the base checkpoint {base_path} has no .safetensors weights; provision it again"
        )
    for file in files:
        try:
            with safe_open(str(file), "pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    shapes[name] = list(handle.get_slice(name).get_shape())
        except (SafetensorError, OSError, ValueError) as exc:
            raise ExportError(
                f"the base weights {file} are damaged ({exc}); provision the base again"
            ) from None
    return shapes


def merged_model(run: ExportableRun) -> Any:
    """The base with the LoRA merged in, fp32 on CPU (peft `merge_and_unload`)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lora_layers(run)  # clear messages for a damaged or foreign adapter before peft's
    try:
        base = AutoModelForCausalLM.from_pretrained(run.base_path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ExportError(
            f"cannot load the base {run.base_path} ({exc}); provision it again"
        ) from None
    try:
        model = PeftModel.from_pretrained(base, run.adapter_dir, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ExportError(
            f"the adapter of run {run.root.name} does not fit the base {run.base_path} ({exc}); "
            "it was trained for another base"
        ) from None
    return model.merge_and_unload()


# --- quantizing ------------------------------------------------------------------


def quantize(source: Path, target: Path, quant: str, threads: int | None = None) -> Path:
    """llama.cpp's quantizer, in process; `target` appears only when whole."""
    import llama_cpp

    ftypes = {
        "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
        "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
        "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
        "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    }
    if quant not in ftypes:
        raise ExportError(f"unknown quantization {quant!r}; use one of {', '.join(QUANTS)}")
    needed = source.stat().st_size + (1 << 20)
    if free_bytes(target.parent) < needed:
        raise ExportError(
            f"not enough disk space to quantize into {target.parent}: "
            f"about {needed / 1e6:.0f} MB needed; free some space and run again"
        )
    route_llama_logs()  # its ~360 lines go to the log file (-v shows them)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftypes[quant]
    params.nthread = threads or max(1, (os.cpu_count() or 1))
    fault_point(target, "begin")
    tmp = partial_name(target)
    try:
        status = llama_cpp.llama_model_quantize(
            str(source).encode("utf-8"), str(tmp).encode("utf-8"), params
        )
        if status != 0 or not tmp.is_file():
            raise ExportError(
                f"llama.cpp could not quantize {target.name} to {quant} (status {status}); "
                "check free disk space, or export --quant f16"
            )
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        fault_point(target, "commit")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


# --- the export ------------------------------------------------------------------


@dataclass
class ExportResult:
    """The files written, the asked-for one first (then the measured
    checkpoint's adapter, for a run with a final pass)."""

    run_id: str
    files: list[Path] = field(default_factory=list)
    manifests: list[ModelManifest] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def _manifest_fields(
    run: ExportableRun, kind: str, quant: str, adapter_sha: str, checkpoint: str
) -> dict[str, Any]:
    record = run.record
    base = record.get("base") or {}
    dataset = record.get("dataset") or {}
    evaluation = {
        key: record[key] for key in ("best_val_loss", "base_val_loss", "best_step") if key in record
    }
    return {
        "kind": kind,
        "base": run.base_key,
        "base_sha256": base.get("sha256"),
        "quant": quant,
        "run_id": run.run_id,
        "repo": record.get("repo"),
        "dataset_sha256": dataset.get("manifest_sha256"),
        "tokenizer_sha256": base.get("tokenizer_sha256"),
        "architecture": base.get("architecture"),
        "eval": evaluation,
        "extra": {
            "adapter_sha256": adapter_sha,
            "base_path": str(run.base_path),
            "purpose": record.get("purpose"),
            "developer": record.get("developer"),
            "prompt_format": record.get("prompt_format") or "fim",
            # "measured": the checkpoint measured on the test window; "final
            # pass": the served one, which has trained on it since.
            "checkpoint": checkpoint,
        },
    }


def _disk_errors(target: Path) -> Callable[[OSError], ExportError | None]:
    def translate(exc: OSError) -> ExportError | None:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return ExportError(
                f"the disk filled up while writing {target.name} ({exc.strerror}); nothing was kept. "
                "Free some space and run export again"
            )
        return None

    return translate


def export_run(
    run_dir: Path,
    quant: str = "q8_0",
    *,
    adapter_only: bool = False,
    report: Report = quiet,
    threads: int | None = None,
) -> ExportResult:
    """Export one finished run; returns the files written (with manifests).
    A run whose served adapter came from a final pass over the held-out
    windows also gets its measured checkpoint as a GGUF LoRA
    (`measured-adapter-<type>.gguf`): evaluation on the test window loads
    that one (`shoptalk.trainer.evaluate`)."""
    if quant not in QUANTS:
        raise ExportError(f"unknown quantization {quant!r}; use one of {', '.join(QUANTS)}")
    started = time.monotonic()
    run = read_run(run_dir)
    out_dir = run.export_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    # Temp files of exports that were killed (`kill -9`, power loss): as big
    # as the model, and nothing else removes them.
    stale = remove_stale_partials(out_dir)
    if stale:
        report(f"removed {len(stale)} unfinished file(s) of an interrupted export")
    result = ExportResult(run_id=run.run_id)
    config = json.loads((run.base_path / "config.json").read_text())
    adapter_dtype = "f32" if quant == "f32" else "f16"
    final_pass = has_final_pass(run.root, run.record)
    served = "final pass" if final_pass else "measured"
    if adapter_only:
        target = out_dir / f"adapter-{adapter_dtype}.gguf"
        _write_adapter_gguf(run, target, adapter_dtype, config, report)
        _add_file(result, run, target, "adapter", adapter_dtype, served)
    else:
        target = out_dir / f"model-{quant}.gguf"
        _write_merged_gguf(run, target, quant, threads, report)
        _add_file(result, run, target, "model", quant, served)
    measured = measured_run(run)
    if measured is not None:
        target = out_dir / f"{MEASURED_PREFIX}adapter-{adapter_dtype}.gguf"
        report(f"writing the measured checkpoint as {target.name}")
        _write_adapter_gguf(measured, target, adapter_dtype, config, report)
        _add_file(result, measured, target, "adapter", adapter_dtype, "measured")
    elif final_pass:
        result.warnings.append(
            f"run {run.run_id}'s served adapter has trained on the test window (final pass) and "
            f"its measured checkpoint ({RunFolder(run.root).measured_adapter_dir}) is missing: "
            "`shoptalk eval` can only evaluate the served model, whose figures on the test "
            "window are not held out"
        )
    result.seconds = time.monotonic() - started
    report(f"{result.files[0]} ({result.manifests[0].size / 1e6:.1f} MB) in {result.seconds:.1f}s")
    return result


def _write_adapter_gguf(
    run: ExportableRun, target: Path, dtype: str, config: dict[str, Any], report: Report
) -> None:
    """The run's LoRA alone, as a GGUF adapter llama.cpp applies on the base."""
    from shoptalk.trainer.gguf_writer import GGUFWriteError, write_lora_gguf

    report(f"reading the LoRA adapter of run {run.run_id}")
    layers = lora_layers(run)
    report(f"writing {target.name} ({len(layers)} adapted layers)")
    try:
        write_lora_gguf(
            target, config=config, layers=layers, dtype=dtype, name=f"shoptalk {run.run_id}"
        )
    except OSError as exc:
        raise _disk_errors(target)(exc) or exc from None
    except GGUFWriteError as exc:
        raise ExportError(str(exc)) from None


def _write_merged_gguf(
    run: ExportableRun, target: Path, quant: str, threads: int | None, report: Report
) -> None:
    """The LoRA merged into the base, written as GGUF and quantized."""
    from shoptalk.trainer.gguf_writer import GGUFWriteError, write_gguf

    report(f"merging the LoRA of run {run.run_id} into {run.base_key} (fp32)")
    model = merged_model(run)
    float_type = quant if quant in FLOAT_QUANTS else "f32"
    staging = target if quant in FLOAT_QUANTS else partial_name(target, "f32")
    try:
        write_gguf(
            staging,
            config=model.config.to_dict(),
            state_dict=model.state_dict(),
            tokenizer_dir=run.base_path,
            dtype=float_type,
            source_gguf=run.source_gguf,
            name=f"shoptalk {run.run_id}",
            progress=report,
        )
        del model
        if staging != target:
            report(f"quantizing to {quant} with llama.cpp")
            quantize(staging, target, quant, threads)
    except OSError as exc:
        raise _disk_errors(target)(exc) or exc from None
    except GGUFWriteError as exc:
        raise ExportError(str(exc)) from None
    finally:
        if staging != target:
            staging.unlink(missing_ok=True)


def _add_file(
    result: ExportResult,
    run: ExportableRun,
    target: Path,
    kind: str,
    quant: str,
    checkpoint: str,
) -> None:
    """The manifest beside a written file, and both into the result."""
    adapter_sha = sha256_file(run.adapter_dir / ADAPTER_WEIGHTS)
    fields = _manifest_fields(run, kind, quant, adapter_sha, checkpoint)
    try:
        manifest = write_manifest(target, **fields)
    except OSError as exc:
        # A model without its manifest is refused by the server anyway.
        target.unlink(missing_ok=True)
        raise _disk_errors(target)(exc) or exc from None
    result.files.append(target)
    result.manifests.append(manifest)


def run_repository(run_dir: Path) -> Path:
    """The repository a finished run was trained on (where it is served)."""
    return _repository(read_run(run_dir))


def _repository(run: ExportableRun) -> Path:
    recorded = str(run.record.get("repo") or "")
    if not recorded or not Path(recorded).is_dir():
        raise ExportError(
            f"run {run.run_id} names no existing repository ({recorded}); it cannot be promoted"
        )
    return Path(recorded)


def promote_export(run_dir: Path, model_file: Path, data_dir: Path) -> Path:
    """Make a run's exported merged model the served model of the repository
    it was trained on; returns that repository."""
    from shoptalk.trainer.promotion import promote_run

    run = read_run(run_dir)
    repo = _repository(run)
    promote_run(RepoStore.for_repo(data_dir, repo), run.run_id, model_file, run.adapter_dir)
    return repo
