"""The HF safetensors checkpoint a base is trained from, converted once from
its packaged GGUF and verified by sha256 after that.

This is the training half of provisioning: it needs torch and transformers,
so it lives here, not in `shoptalk.models.provision` (which assembles and
verifies the GGUF, and reports `hf_status`, without the training stack).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from shoptalk.models.catalog import BaseModel
from shoptalk.models.files import atomic_dir, sha256_file, write_json_atomic
from shoptalk.models.progress import Report
from shoptalk.models.provision import (
    HF_MARKER,
    ProvisionError,
    base_paths,
    ensure_gguf,
    hf_status,
)

log = logging.getLogger(__name__)


def ensure_hf_checkpoint(data_dir: Path, base: BaseModel, report: Report = log.info) -> Path:
    """A HF safetensors checkpoint + tokenizer for training, converted once
    from the packaged GGUF (dequantized) and verified by sha256 after that."""
    if base.local_path is not None:
        return base.local_path
    if not base.package:
        if base.hf_id is None:
            raise ProvisionError(f"{base.key}: no source for a HF checkpoint")
        return Path(base.hf_id)  # transformers resolves an HF id itself (needs the hub)
    paths = base_paths(data_dir, base)
    status = hf_status(data_dir, base)
    if status == "verified":
        report(f"{base.key}: HF checkpoint cached and verified at {paths.hf}")
        return paths.hf
    if status == "corrupt":
        report(f"{base.key}: cached HF checkpoint at {paths.hf} is damaged; converting again")
    gguf = ensure_gguf(data_dir, base, lambda _msg: None)
    report(f"{base.key}: converting GGUF to a HF checkpoint for training (once; a minute or two)")
    with atomic_dir(paths.hf) as tmp:
        convert_gguf_to_hf(gguf, tmp)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        write_json_atomic(tmp / HF_MARKER, {"source": gguf.name, "files": files})
    report(f"{base.key}: HF checkpoint written to {paths.hf}")
    return paths.hf


def convert_gguf_to_hf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF through transformers' loader and save safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = out_dir / ".gguf-src"
    staging.mkdir(parents=True, exist_ok=True)
    link = staging / gguf.name
    try:
        link.symlink_to(gguf)
    except OSError:
        shutil.copy2(gguf, link)
    tokenizer = AutoTokenizer.from_pretrained(staging, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(staging, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a model that still carries the GGUF quantizer.
    setattr(model, "hf_quantizer", None)  # noqa: B010 (typed as a module attribute)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    shutil.rmtree(staging, ignore_errors=True)
