"""The typed messages between an engine client and its engine loop.

The same records travel in memory (the loop in a thread of the client's process) and pickled
over a pipe (the loop in a process of its own), so a transport only moves them.

client -> loop: EngineRequest, Abort, Call (a metrics read), Shutdown
loop -> client: Ready (once loaded) or Failed, Outputs (per send), Reply, Dead
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moeserve.config import ModelConfig
from moeserve.engine.outputs import RequestOutput, StepStats
from moeserve.sampling_params import SamplingParams


@dataclass(frozen=True)
class EngineRequest:
    """One prompt to generate for: its ids (what the engine runs) and, when it came as text,
    the text (for the outputs' record)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    arrival_time: float | None = None
    # Split the output's text into reasoning and content by the model's reasoning format
    # (moeserve/reasoning.py); no effect for a model without one.
    split_reasoning: bool = False
    # The prefix cache's salt: a request shares cached blocks only with requests of the same
    # salt (vLLM's cache_salt: one tenant cannot time another's prompts by their cache hits).
    cache_salt: str | None = None
    # Under the scheduler's priority policy (--scheduling-policy priority): a lower value is
    # admitted first and preempted last. Must be 0 under "fcfs".
    priority: int = 0


@dataclass(frozen=True)
class Abort:
    request_id: str


@dataclass(frozen=True)
class Call:
    """Ask the engine a question between (or during) steps; see loop.CALLS."""

    call_id: int
    name: str


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class EngineInfo:
    """What a client needs to know of the loaded engine."""

    model_config: ModelConfig
    max_model_len: int
    vocab_size: int
    offloads_experts: bool
    # Bytes of the weights as stored, by (part, format, location): MoEForCausalLM.weight_bytes.
    weight_bytes: dict[tuple[str, str, str], int] = field(default_factory=dict)
    by_priority: bool = False  # the scheduler orders requests by priority


@dataclass(frozen=True)
class Ready:
    info: EngineInfo


@dataclass(frozen=True)
class Failed:
    error: BaseException


@dataclass
class Outputs:
    """What the loop produced since its last send: each added request's admission (None, or
    the ValueError that refused it), per-request deltas (merged when they piled up) and the
    steps' statistics."""

    admitted: list[tuple[str, BaseException | None]] = field(default_factory=list)
    outputs: list[RequestOutput] = field(default_factory=list)
    stats: list[StepStats] = field(default_factory=list)


@dataclass(frozen=True)
class Reply:
    call_id: int
    result: Any  # the answer, or the exception the call raised


@dataclass(frozen=True)
class Dead:
    """The step loop crashed; every open request fails with this message."""

    message: str
