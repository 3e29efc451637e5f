"""Which accelerator this process trains on, and what runs natively there.

accelerate chooses the device itself (CUDA and ROCm, Intel XPU, Apple MPS, else the CPU); `Accelerator(cpu=True)`
is passed only where none is present, or multi-process CPU launches come up as independent single processes.
"""

from __future__ import annotations

import torch

NO_COLLECTIVES = ("mps",)  # no torch.distributed backend: one process only


def accelerator_type() -> str:
    """"cuda" (NVIDIA or ROCm), "xpu", "mps" or "cpu": what accelerate will train on in this process."""
    if torch.cuda.is_available():
        return "cuda"
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return "xpu"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def native_bf16(device: str) -> bool:
    """Whether bf16 runs faster than fp32 in hardware on `device`: a CUDA GPU with bf16 units (Ampere and later),
    an XPU, or a CPU with AMX (bf16 steps 1.7-3x fp32's speed, docs/PERFORMANCE.md). Not a CPU with AVX512-BF16
    alone: there oneDNN's bf16 convolutions ran these models at 0.8x fp32's images/s; emulated bf16 is slower
    still. MPS: no (bf16 there needs macOS 14 and is not faster than fp16/fp32 for these convolutions)."""
    if device == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device == "xpu":
        return torch.xpu.is_bf16_supported()
    if device == "mps":
        return False
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # a private probe: absent -> no
    return probe is not None and bool(probe())


def fused_adam(device: str) -> bool:
    """Whether torch has the fused Adam kernel for `device` (the trainer's non-finite skip relies on it)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return device in _get_fused_kernels_supported_devices()
