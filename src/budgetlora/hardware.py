"""Pick the device and the numeric precision the hardware runs fastest without losing accuracy."""

from __future__ import annotations

import contextlib

import torch


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cpu_supports_bf16() -> bool:
    # oneDNN reports native bf16 (AVX512-BF16 or AMX); emulated bf16 on older CPUs is slower than fp32.
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def resolve_precision(requested: str) -> str:
    """"auto": bf16 on Ampere-or-newer GPUs and bf16-capable CPUs, fp16 (with loss scaling) on older GPUs, else fp32."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "bf16" if cpu_supports_bf16() else "fp32"


def autocast(precision: str, on: torch.device) -> contextlib.AbstractContextManager:
    """Mixed-precision context for inference; the master weights stay fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=on.type, dtype=dtype)
