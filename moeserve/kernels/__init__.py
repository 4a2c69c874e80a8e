"""Triton kernels for the CUDA fast path (fused MoE GEMMs, paged decode attention, SiLU-and-mul).

Every kernel here has a readable torch twin in moeserve.model; gpu-marked tests compare the two
against a float64 reference. On a machine without CUDA the kernels still run under Triton's
interpreter (TRITON_INTERPRET=1, which tests/conftest.py sets), so CI checks their logic.
"""

from __future__ import annotations

import functools
import importlib.util
import os


@functools.cache
def triton_available() -> bool:
    """Triton is installed (for a CUDA device or interpreter mode). Found, not imported: a
    process that imports Triton without running its kernels (a CPU host choosing the torch
    path) only pays for it, and at exit prints ~30 lines of nanobind leak reports for it."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _sm_count(device: int) -> int:
    import torch

    return torch.cuda.get_device_properties(device).multi_processor_count


def num_sms() -> int:
    """Streaming multiprocessors of the current CUDA device (an H100's 132 without one)."""
    import torch

    return _sm_count(torch.cuda.current_device()) if torch.cuda.is_available() else 132


# Programs per SM a split-K decode GEMM aims for.
PROGRAMS_PER_SM = 4


def k_splits(
    programs: int, k_blocks: int, min_k_blocks: int, most: int, per_sm: int = PROGRAMS_PER_SM
) -> int:
    """Splits of K for a GEMM with `programs` output tiles: enough programs to fill the SMs
    (`per_sm` each), each split at least `min_k_blocks` K blocks long (so it streams), at most
    `most`."""
    want = -(-per_sm * num_sms() // programs)
    return max(1, min(want, k_blocks // min_k_blocks, most))


@functools.cache
def log_later_compiles() -> None:
    """From now on, log every Triton compile of this process: after the startup warm-up one
    means a step waited for the compiler (seconds), i.e. a specialisation the warm-up missed."""
    import logging

    import triton

    log = logging.getLogger("moeserve.kernels")

    def hook(**kwargs: object) -> None:
        log.info(
            "Triton compiles a kernel after the warm-up (the step waits): %s", kwargs.get("repr")
        )

    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs.runtime, "jit_cache_hook"):
        knobs.runtime.jit_cache_hook = hook
    else:  # older Triton
        from triton.runtime.jit import JITFunction

        JITFunction.cache_hook = hook
