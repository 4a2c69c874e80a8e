"""Test-wide setup that must run before any module imports Triton."""

import gc
import os
from collections.abc import Iterator

import pytest
import torch

# Without CUDA, Triton kernels run under the interpreter (numpy on the CPU): slow but exact
# enough to check their indexing and masking in CI. It must be set before triton.jit runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _release_gpu_memory() -> Iterator[None]:
    """Engines hold large KV caches: free each test's before the next sizes its own."""
    yield
    if torch.cuda.is_available():
        gc.collect()
        torch.cuda.empty_cache()
