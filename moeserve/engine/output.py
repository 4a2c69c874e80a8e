"""The output side of a step: token ids -> text, stop strings, finished requests' records.

One OutputProcessor serves the offline API and the server alike; it runs right after each
core step, in the thread or process that steps the core, so a stop string ends its sequence
before the next step is scheduled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from moeserve.detokenizer import IncrementalDetokenizer
from moeserve.engine.messages import EngineRequest
from moeserve.engine.outputs import RequestMetrics, RequestOutput, StepStats
from moeserve.reasoning import SplitDetokenizer, reasoning_format
from moeserve.tokenizer import Tokenizer


class Finisher(Protocol):
    """What the processor asks of the core (EngineCore satisfies it)."""

    def finish_seq(self, request_id: str, index: int, reason: str) -> RequestMetrics | None: ...


@dataclass
class _Texts:
    detoks: list[IncrementalDetokenizer] | list[SplitDetokenizer]
    stopped: list[bool]
    min_tokens: int
    counts: list[int]  # output tokens seen per sequence


class OutputProcessor:
    """Detokenizes each sequence incrementally and cuts it at its stop strings."""

    def __init__(self, tokenizer: Tokenizer | None, core: Finisher) -> None:
        self.tokenizer = tokenizer
        self._core = core
        self._requests: dict[str, _Texts] = {}
        self.reasoning = reasoning_format(tokenizer)

    def add(self, req: EngineRequest) -> None:
        if self.tokenizer is None:
            return  # token ids only: nothing to decode, no stop strings
        p = req.params
        detoks: list[IncrementalDetokenizer] | list[SplitDetokenizer]
        if req.split_reasoning and self.reasoning is not None:
            detoks = [
                SplitDetokenizer(
                    self.reasoning,
                    self.tokenizer,
                    req.prompt_ids,
                    stop=p.stop,
                    include_stop_str_in_output=p.include_stop_str_in_output,
                    skip_special_tokens=p.skip_special_tokens,
                )
                for _ in range(p.n)
            ]
        else:
            detoks = [
                IncrementalDetokenizer(
                    self.tokenizer,
                    req.prompt_ids,
                    skip_special_tokens=p.skip_special_tokens,
                    stop=p.stop,
                    include_stop_str_in_output=p.include_stop_str_in_output,
                )
                for _ in range(p.n)
            ]
        self._requests[req.request_id] = _Texts(detoks, [False] * p.n, p.min_tokens, [0] * p.n)

    def abort(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def process(self, outputs: list[RequestOutput], stats: StepStats | None) -> None:
        """Fill in the deltas' text (in place), end sequences at stop strings, and add each
        finished request to `stats` with its finish reason."""
        for ro in outputs:
            texts = self._requests.get(ro.request_id)
            if texts is not None:
                for o in ro.outputs:
                    if texts.stopped[o.index]:
                        continue
                    detok = texts.detoks[o.index]
                    texts.counts[o.index] += len(o.token_ids)
                    if not (o.finish_reason == "stop" and isinstance(o.stop_reason, int)):
                        # A stop token adds no text; no stop string counts before min_tokens.
                        check = texts.counts[o.index] >= texts.min_tokens
                        o.text, hit = detok.step(o.token_ids, check)
                        if hit:
                            o.finish_reason, o.stop_reason = "stop", detok.stop_str
                            metrics = self._core.finish_seq(ro.request_id, o.index, "stop")
                            if metrics is not None:
                                ro.finished, ro.metrics = True, metrics
                    if o.finish_reason is not None:
                        o.text += detok.flush()
                        texts.stopped[o.index] = True
                    if isinstance(detok, SplitDetokenizer):
                        o.reasoning_text = detok.take_reasoning()
            if ro.finished:
                self._requests.pop(ro.request_id, None)
                if stats is not None and ro.metrics is not None:
                    reason = next((o.finish_reason for o in ro.outputs if o.finish_reason), "stop")
                    stats.finished.append((reason, ro.metrics))


def token_text(tokenizer: Tokenizer | None, token_id: int) -> str:
    """The text of one token alone, for logprobs (special tokens included). A token that is
    not valid text alone (part of a UTF-8 character) or that the tokenizer lacks (a padded
    vocabulary row) is `token_id:N`, vLLM's spelling: U+FFFD for all of them would merge
    distinct alternatives into one key."""
    text = tokenizer.decode([token_id], skip_special_tokens=False) if tokenizer else ""
    if not text or "\ufffd" in text:
        text = f"token_id:{token_id}"
    return text
