"""The offline API: `LLM(model_dir).generate(prompts, params)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from moeserve.config import CacheConfig, OffloadConfig, SchedulerConfig
from moeserve.engine.engine import Engine
from moeserve.engine.outputs import CompletionOutput, RequestOutput
from moeserve.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Runs batches of prompts to completion through the continuous-batching engine.

    Keyword arguments mirror the CLI: dtype, device, block_size, kv_cache_memory,
    gpu_memory_utilization, max_num_seqs, max_num_batched_tokens, max_model_len,
    enable_chunked_prefill, admission_wait_steps, expert_cache_slots, expert_cache_gb, offload_mode,
    expert_cache_policy, prefetch, load_format, kernels, enforce_eager, async_scheduling, seed.
    """

    def __init__(self, model: str | Path, **kwargs: Any) -> None:
        cache_keys = {"block_size", "kv_cache_memory", "gpu_memory_utilization"}
        sched_keys = {
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_model_len",
            "enable_chunked_prefill",
            "admission_wait_steps",
        }
        offload_keys = {
            "expert_cache_slots": "cache_slots", "expert_cache_gb": "cache_bytes",
            "offload_mode": "mode", "expert_cache_policy": "policy", "prefetch": "prefetch",
        }
        other = {"dtype", "device", "seed", "progress", "load_format", "kernels", "enforce_eager",
                 "async_scheduling"}  # fmt: skip
        unknown = set(kwargs) - cache_keys - sched_keys - set(offload_keys) - other
        if unknown:
            raise TypeError(f"LLM() got unknown options: {', '.join(sorted(unknown))}")
        self.engine = Engine(
            model,
            dtype=kwargs.get("dtype"),
            device=kwargs.get("device"),
            cache=CacheConfig(**{k: v for k, v in kwargs.items() if k in cache_keys}),
            scheduler=SchedulerConfig(**{k: v for k, v in kwargs.items() if k in sched_keys}),
            offload=OffloadConfig(**{
                offload_keys[k]: (int(v * 2**30) if k == "expert_cache_gb" else v)
                for k, v in kwargs.items() if k in offload_keys and v is not None
            }),
            load_format=kwargs.get("load_format", "safetensors"),
            seed=kwargs.get("seed"),
            progress=kwargs.get("progress", True),
            kernels=kwargs.get("kernels") or "auto",
            enforce_eager=bool(kwargs.get("enforce_eager", False)),
            async_scheduling=kwargs.get("async_scheduling"),
        )
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for every prompt (a string or a list of token ids); outputs in input order.

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
        encoded = [self.engine.encode_prompt(p) for p in prompts]
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        results: dict[str, RequestOutput] = {}
        try:
            for rid, prompt, toks, p in zip(ids, prompts, encoded, params):
                self.engine.add_request(rid, prompt, p, prompt_ids=toks)
                results[rid] = RequestOutput(
                    rid,
                    toks,
                    [CompletionOutput(index=i) for i in range(p.n)],
                    prompt=prompt if isinstance(prompt, str) else None,
                )
            bar = tqdm(total=len(ids), disable=not use_tqdm, desc="generating")
            while self.engine.has_unfinished():
                for delta in self.engine.step().outputs:
                    merged = results.get(delta.request_id)
                    if merged is None:
                        continue
                    for out in delta.outputs:
                        merged.outputs[out.index].merge(out)
                    if delta.finished:
                        merged.finished, merged.metrics = True, delta.metrics
                        bar.update(1)
            bar.close()
        finally:
            for rid in ids:
                self.engine.abort_request(rid)
        return [results[rid] for rid in ids]
