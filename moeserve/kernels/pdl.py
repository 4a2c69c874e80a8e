"""Programmatic dependent launch (Hopper and later) between this package's kernels.

A decode step is a chain of small dependent kernels (at batch 1 most take a few microseconds).
Launched plainly, each one's programs are scheduled only after the previous kernel has fully
retired. With PDL (`**LAUNCH`: Triton's `launch_pdl`) the next kernel is launched while the
previous one drains: its programs start, compute their indices and wait at `wait_prior()` for
the previous kernel's writes. On an H200, in a CUDA graph, that saved 0.6-1.0 us per kernel
boundary of a chain of GEMVs (benchmarks/pdl_probe.py; benchmarks/RESULTS.md).

Every kernel launched with PDL calls `wait_prior()` before any store, early return or load of
data a kernel writes (loads of weights may come first, to overlap the previous kernel): then a
kernel's completion implies its predecessor's, so the ordering of any later kernel (with PDL
or not) still holds transitively. With the early trigger (MOESERVE_PDL_EARLY=1) a kernel lets the
next one launch before its own wait, so launches run two or more kernels ahead of the one
computing; a kernel whose successor reads, before its wait, data from the kernel before it
(the MoE down GEMV reads the routing) triggers after its wait instead
(`wait_prior(LATE=True)`). Kernels of torch and cuBLAS in between are launched plainly and
wait as usual. MOESERVE_PDL=0 turns it off (for A/B measurements);
MOESERVE_PDL=force turns it on without a GPU to look at (the sm_90 compile check).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from moeserve.kernels import interpreting

try:  # Triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover
    gdc_launch_dependents = gdc_wait = None


def _supported() -> bool:
    setting = os.environ.get("MOESERVE_PDL", "1")
    if interpreting() or gdc_wait is None or setting == "0":
        return False
    if setting == "force":
        return True
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9


ON: bool = _supported()
# Every kernel launch of this package passes **LAUNCH: Triton's `launch_pdl` where PDL is on,
# nothing otherwise (a Triton without the option rejects the keyword).
LAUNCH: dict[str, bool] = {"launch_pdl": True} if ON else {}
_ON = tl.constexpr(ON)
# MOESERVE_PDL_EARLY=1: a kernel lets the next one launch before its own wait, so a chain of
# short kernels can be launched (and load their weights) two or more deep; 0: after it. Read
# from the environment only: a jit-time constant that gpu_speed.py's --set could not change.
EARLY: bool = os.environ.get("MOESERVE_PDL_EARLY", "0") == "1"
_EARLY = tl.constexpr(EARLY)


@triton.jit
def wait_prior(LATE: tl.constexpr = False):
    """Wait until the previous kernel on the stream has finished and its writes are visible,
    and let the next kernel launch (its programs will wait likewise). A no-op without PDL.
    LATE: the next kernel launches only after this wait, for a successor that reads, before
    its own wait, what the kernel before this one wrote."""
    if _ON:
        if _EARLY and not LATE:
            gdc_launch_dependents()
            gdc_wait()
        else:
            gdc_wait()
            gdc_launch_dependents()
