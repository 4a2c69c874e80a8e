"""moeserve: an inference server for Mixture-of-Experts language models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moeserve.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from moeserve.engine.llm import LLM


def __getattr__(name: str) -> Any:
    # LLM pulls in torch; importing moeserve for SamplingParams or the CLI's --help should not.
    if name == "LLM":
        from moeserve.engine.llm import LLM

        return LLM
    raise AttributeError(f"module 'moeserve' has no attribute {name!r}")
