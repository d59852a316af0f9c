"""`shoptalk doctor`: what this machine can do, and what is missing.

The torch checks belong to the training half (`shoptalk.trainer.doctor`):
nothing in the shared core imports torch."""

from __future__ import annotations

import importlib.metadata
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from shoptalk.models.catalog import CATALOG, DEFAULT_BASE
from shoptalk.models.files import free_bytes
from shoptalk.models.provision import base_paths, gguf_status, hf_status


@dataclass(frozen=True)
class Check:
    name: str
    value: str
    ok: bool = True


def installed_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def llama_checks() -> list[Check]:
    version = installed_version("llama_cpp_python")
    if version is None:
        return [
            Check(
                "llama-cpp-python",
                "not installed (serving needs: pip install 'shoptalk[serve]')",
                False,
            )
        ]
    import llama_cpp

    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    return [
        Check("llama-cpp-python", version),
        Check("GPU offload", "built with GPU offload" if gpu else "CPU only"),
    ]


def model_checks(data_dir: Path) -> list[Check]:
    base = CATALOG[DEFAULT_BASE]
    paths = base_paths(data_dir, base)
    status = gguf_status(data_dir, base)
    checks = [Check(f"{base.key} GGUF", f"{status} ({paths.gguf})", status == "verified")]
    hf = hf_status(data_dir, base)
    checks.append(Check(f"{base.key} HF checkpoint", f"{hf} ({paths.hf})", hf != "corrupt"))
    if status != "verified":
        checks.append(Check("fix", "run: shoptalk models pull", False))
    return checks


def run_checks(data_dir: Path, training: Sequence[Check] = ()) -> list[Check]:
    """The machine's checks; `training` are the training half's (torch, device,
    bf16: `shoptalk.trainer.doctor.torch_checks`), listed after Python's."""
    checks = [
        Check(
            "python", f"{platform.python_version()} ({sys.executable})", sys.version_info >= (3, 11)
        )
    ]
    checks += training
    checks += llama_checks()
    checks += model_checks(data_dir)
    free = free_bytes(data_dir)
    checks.append(Check("data dir", str(data_dir)))
    checks.append(Check("free disk", f"{free / 1e9:.1f} GB", free > 2e9))
    return checks
