"""Test-wide setup that must run before any module imports Triton."""

import gc
import os
import sys
from collections.abc import Generator, Iterator

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


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Let a failed test's locals go once its report is written. pytest keeps the failure
    (sys.last_traceback, for post-mortem debugging) until the next test's body starts, so
    _release_gpu_memory could not free the engines its frames hold, and the next test's
    engine would size its KV cache with their memory still taken."""
    report = yield
    if call.excinfo is not None and not item.config.getoption("usepdb", False):
        for name in ("last_type", "last_value", "last_traceback", "last_exc"):
            if hasattr(sys, name):
                delattr(sys, name)
    return report


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a CUDA machine Triton compiles for the GPU and cannot run the CPU-tensor checks."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    skip = pytest.mark.skip(reason="Triton on CPU tensors needs TRITON_INTERPRET=1 (no CUDA)")
    for item in items:
        if "gpu" in item.keywords:
            continue
        if item.path.name.startswith("test_kernel_") or "interpreted" in item.name:
            item.add_marker(skip)
