"""Triton kernels for the CUDA fast path (fused MoE GEMMs, paged decode attention, SiLU-and-mul).

Every kernel here has a readable torch twin in moeserve.model; gpu-marked tests compare the two
against a float64 reference. On a machine without CUDA the kernels still run under Triton's
interpreter (TRITON_INTERPRET=1, which tests/conftest.py sets), so CI checks their logic.
"""

from __future__ import annotations

import functools
import os


@functools.cache
def triton_available() -> bool:
    """Triton is importable (CUDA device or interpreter mode)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
