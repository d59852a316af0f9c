"""`shoptalk doctor`: what this machine can do, and what is missing."""

from __future__ import annotations

import importlib.metadata
import platform
import sys
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


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_checks() -> list[Check]:
    if _version("torch") is None:
        return [
            Check("torch", "not installed (training needs: pip install 'shoptalk[train]')", False)
        ]
    import torch

    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
        bf16 = torch.cuda.is_bf16_supported()
    elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        device, bf16 = "mps", True
    else:
        device = f"cpu ({torch.get_num_threads()} threads)"
        bf16 = cpu_has_bf16()
    return [
        Check("torch", torch.__version__),
        Check("torch device", device),
        Check("bf16", "supported" if bf16 else "not supported (fp32 is used)"),
    ]


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16/AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine() == "arm64" and sys.platform == "darwin"
    return any(f in flags for f in ("avx512_bf16", "amx_bf16"))


def llama_checks() -> list[Check]:
    version = _version("llama_cpp_python")
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


def run_checks(data_dir: Path) -> list[Check]:
    checks = [
        Check(
            "python", f"{platform.python_version()} ({sys.executable})", sys.version_info >= (3, 11)
        )
    ]
    checks += torch_checks()
    checks += llama_checks()
    checks += model_checks(data_dir)
    free = free_bytes(data_dir)
    checks.append(Check("data dir", str(data_dir)))
    checks.append(Check("free disk", f"{free / 1e9:.1f} GB", free > 2e9))
    return checks
