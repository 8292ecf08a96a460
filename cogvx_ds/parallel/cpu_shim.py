"""CPU-only shim for Megatron-core's `torch.cuda.current_device()` allocations.

Megatron-core's sequence-parallel gathers / reduce-scatters and its global memory buffer allocate with
`device=torch.cuda.current_device()`, which raises on a machine without CUDA. For the gloo CPU tests and the
CPU demo we make `torch.cuda.current_device()` return the string "cpu" (a valid `device=` argument), only when
CUDA is not available. It is never installed on a GPU machine, where NCCL and the real device are used.
"""

from __future__ import annotations

import torch

_installed = False


def install_cpu_shim() -> bool:
    """Patch torch.cuda.current_device on CUDA-less machines; returns True if the shim is active."""
    global _installed
    if torch.cuda.is_available():
        return False
    if not _installed:
        torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
        _installed = True
    return True
