"""Plain records the engine hands out: per-step request deltas and per-step statistics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """Log-probability of a generated token (raw model distribution) and the top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # best first
    rank: int | None = None  # 1 + the tokens more likely than it (prompt log-probs)


@dataclass
class CompletionOutput:
    """One of a request's n sequences: in a step delta, only what is new; merged, all of it."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    # With the reasoning split on (EngineRequest.split_reasoning), `text` is the content and
    # this the reasoning (moeserve/reasoning.py).
    reasoning_text: str = ""

    def merge(self, delta: CompletionOutput) -> None:
        self.text += delta.text
        self.reasoning_text += delta.reasoning_text
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            self.logprobs = (self.logprobs or []) + delta.logprobs
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


@dataclass
class RequestMetrics:
    """Monotonic timestamps (time.monotonic) of one request's life."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first schedule

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def queue_time(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def e2e(self) -> float | None:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


@dataclass
class RequestOutput:
    """What one step (or, merged, the whole run) produced for one request."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    metrics: RequestMetrics | None = None
    prompt: str | None = None
    # With SamplingParams.prompt_logprobs: one entry per prompt token, None for the first
    # (nothing precedes it); a delta holds the entries of the prompt chunks it computed.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # Prompt tokens the prefix cache held when the request started (OpenAI's cached_tokens).
    num_cached_tokens: int | None = None

    def absorb(self, later: RequestOutput) -> None:
        """Append a later delta of the same request (coalescing deltas a stream fell behind on)."""
        if later.prompt_logprobs is not None:
            self.prompt_logprobs = (self.prompt_logprobs or []) + later.prompt_logprobs
        mine = {o.index: o for o in self.outputs}
        for o in later.outputs:
            if o.index in mine:
                mine[o.index].merge(o)
            else:
                self.outputs.append(o)
        self.finished = later.finished
        self.metrics = later.metrics or self.metrics
        if later.num_cached_tokens is not None:
            self.num_cached_tokens = later.num_cached_tokens


@dataclass
class StepStats:
    """One engine step, for the metrics layer. Expert counts stay on the device (see Engine)."""

    timestamp: float
    step_seconds: float
    num_running: int
    num_waiting: int
    num_seqs: int
    num_prefill_tokens: int
    num_decode_tokens: int
    num_generated_tokens: int
    kv_usage: float
    num_preempted: int
    finished: list[tuple[str, RequestMetrics]] = field(default_factory=list)  # (reason, metrics)
    itl: list[float] = field(default_factory=list)  # inter-token gaps of decode tokens this step
    num_prefix_queries: int = 0  # prompt tokens looked up in the prefix cache this step
    num_prefix_hits: int = 0  # ... and found there
