"""The training half's checks for `shoptalk doctor`: torch, its device and
bf16 support. They import torch, so they live here; the CLI root adds them
to the core's checks (`shoptalk.models.doctor.run_checks`)."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

from shoptalk.models.doctor import Check, installed_version


def torch_checks() -> list[Check]:
    if installed_version("torch") is None:
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
