"""The offline API: `LLM(model_dir).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from moeserve.config import EngineConfig
from moeserve.engine.core import EngineCore
from moeserve.engine.loop import EngineLoop
from moeserve.engine.messages import EngineRequest
from moeserve.engine.outputs import CompletionOutput, RequestOutput
from moeserve.sampling_params import SamplingParams
from moeserve.tokenizer import Tokenizer, encode_prompt

Prompt = str | list[int]


class LLM:
    """Runs batches of prompts to completion through the continuous-batching engine, in the
    calling thread: the same engine loop (core and output processor) a server runs.

    Keyword arguments are the engine options, named as the CLI flags (config.OPTION_NAMES):
    dtype, device, block_size, kv_cache_memory, gpu_memory_utilization, max_num_seqs,
    max_num_batched_tokens, max_model_len, enable_chunked_prefill, admission_wait_steps,
    scheduling_policy,
    expert_cache_slots, expert_cache_gb, offload_mode, expert_cache_policy, prefetch,
    expert_cache_kernels, expert_cache_graph_batch, load_format, quantization, kernels,
    enforce_eager, async_scheduling, seed, enable_prefix_caching; or
    a whole `config`.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        config: EngineConfig | None = None,
        progress: bool = True,
        **options: Any,
    ) -> None:
        if config is None:
            if model is None:
                raise TypeError("LLM() needs a model directory or a config")
            try:
                config = EngineConfig.from_options(model, **options)
            except TypeError as e:
                raise TypeError(f"LLM() got {e}") from None
        elif options or model is not None:
            raise TypeError("LLM(): give a config or a model with options, not both")
        self.config = config
        path = Path(config.model.path)
        self.tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
        self.engine = EngineCore(config, progress=progress)
        self.loop = EngineLoop(self.engine, self.tokenizer)
        self._ids = itertools.count()

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        return encode_prompt(self.tokenizer, self.engine.vocab_size, prompt)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (a string or a list of token ids); outputs in input order.
        priority: one per prompt, lower first (needs scheduling_policy="priority").

        A bad prompt raises ValueError before anything runs.
        """
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params)} SamplingParams")
        priorities = list(priority) if priority is not None else [0] * len(prompts)
        if len(priorities) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(priorities)} priorities")
        encoded = [self.encode_prompt(p) for p in prompts]
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        results: dict[str, RequestOutput] = {}
        try:
            for rid, prompt, toks, p, prio in zip(ids, prompts, encoded, params, priorities):
                text = prompt if isinstance(prompt, str) else None
                self.loop.admit(EngineRequest(rid, toks, p, prompt=text, priority=prio))
                outs = [CompletionOutput(index=i) for i in range(p.n)]
                results[rid] = RequestOutput(rid, toks, outs, prompt=text)
            bar = tqdm(total=len(ids), disable=not use_tqdm, desc="generating")
            while self.engine.has_unfinished():
                deltas, _ = self.loop.step()
                for delta in deltas:
                    merged = results.get(delta.request_id)
                    if merged is None:
                        continue
                    for out in delta.outputs:
                        merged.outputs[out.index].merge(out)
                    if delta.prompt_logprobs is not None:
                        merged.prompt_logprobs = (merged.prompt_logprobs or []) + (
                            delta.prompt_logprobs
                        )
                    if delta.num_cached_tokens is not None:
                        merged.num_cached_tokens = delta.num_cached_tokens
                    if delta.finished:
                        merged.finished, merged.metrics = True, delta.metrics
                        bar.update(1)
            bar.close()
        finally:
            for rid in ids:
                self.engine.abort_request(rid)
                self.loop.processor.abort(rid)
        return [results[rid] for rid in ids]
