"""Uninitialised parameters for the loader to fill: on a device, or in page-locked host memory."""

from __future__ import annotations

import logging
import weakref

import torch
from torch import nn

log = logging.getLogger(__name__)

# Pinned tensors at least this large are page-locked in place (cudaHostRegister) instead of
# taken from torch's pinned allocator, which rounds every block up to a power of two (a
# Mixtral-8x7B layer's 1.88 GB of gate/up weights would hold 2.15 GB of locked memory).
_REGISTER_MIN_BYTES = 256 << 20


def empty_param(
    *shape: int, dtype: torch.dtype, device: torch.device, pin: bool = False
) -> nn.Parameter:
    """An uninitialised frozen parameter; `pin`: in page-locked host memory (see pinned_empty)."""
    if pin:
        return nn.Parameter(pinned_empty(shape, dtype), requires_grad=False)
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Page-locked host memory (fast, asynchronous copies to the GPU); pageable with a warning
    when the system refuses to lock more: slower, not fatal."""
    nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if nbytes < _REGISTER_MIN_BYTES:
        try:
            return torch.empty(*shape, dtype=dtype, pin_memory=True)
        except RuntimeError as e:
            log.warning("cannot pin %s of host memory (%s); copies will be slower", shape, e)
            return torch.empty(*shape, dtype=dtype)
    data = torch.empty(*shape, dtype=dtype)
    cudart = torch.cuda.cudart()
    # Mapped (cudaHostRegisterMapped): kernels may read it too (the expert cache's in-graph
    # fetch, kernels/expert_fetch.py); under unified addressing at the same address.
    err = cudart.cudaHostRegister(data.data_ptr(), nbytes, 2)
    if int(err) != 0:
        log.warning(
            "cannot lock %.2f GB of host memory (cudaHostRegister error %d); copies will be slower",
            nbytes / 1e9,
            int(err),
        )
        return data
    # Unlock when the tensor's memory is freed (a benchmark loads several models in turn).
    weakref.finalize(data.untyped_storage(), cudart.cudaHostUnregister, data.data_ptr())
    return data
