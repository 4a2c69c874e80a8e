"""Arrival counters: a kernel whose last program to finish runs the reduction a small kernel
after it would otherwise run (the MoE's sum over k, the attention merge) counts its programs'
arrivals here. One zeroed int32 buffer per device; the kernels that use it run one after
another on the device's compute stream (each starts counting only after its PDL wait, when
the kernel before it is done), and each leaves its counters zero.
"""

from __future__ import annotations

import torch

_COUNTERS: dict[torch.device, torch.Tensor] = {}
SIZE = 4096


def counters(device: torch.device, n: int) -> torch.Tensor | None:
    """The device's counters (n of them are used), or None where they cannot be had: more
    than SIZE, or a first use under graph capture (the buffer would be the graph's; the
    engine's warm-up runs before it captures, so this only happens outside it)."""
    buf = _COUNTERS.get(device)
    if n > SIZE:
        return None
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = _COUNTERS[device] = torch.zeros(SIZE, dtype=torch.int32, device=device)
    return buf
