"""Mixed precision and seeding, shared by the SFT loop and the reward model."""
from __future__ import annotations

import contextlib
import random
from pathlib import Path

import numpy as np
import torch


def cpu_supports_bf16() -> bool:
    """True when this CPU has NATIVE bf16 arithmetic (x86 AVX512-BF16 / AMX-BF16, Arm BF16), where autocast pays off.

    Not ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``: it is also true on plain AVX-512, where oneDNN emulates
    bf16 and autocast is no faster. Measured here (AMD EPYC with avx512_bf16, 2 cores): one training step of the
    MiniLM decoder at batch 16 x 64 tokens is ~2.1x faster under bf16 autocast than in fp32.
    """
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:  # not Linux: stay on the safe side
        return False
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[-1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` -> ``"bf16"`` where the device computes bf16 natively, else ``"fp32"``."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return "fp32"


def autocast_context(precision: str, device: torch.device):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
