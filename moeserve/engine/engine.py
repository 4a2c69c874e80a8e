"""The synchronous engine: step() = schedule -> run -> sample -> update -> stop checks.

It owns the model, the KV cache (through the Runner), the scheduler and the sampler. The
async engine and the offline LLM API both drive it; neither touches its parts directly.
"""

from __future__ import annotations

import itertools
import logging
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from moeserve.config import CacheConfig, ConfigError, OffloadConfig, SchedulerConfig
from moeserve.engine.expert_store import ExpertCacheStats, ExpertStore
from moeserve.engine.kv_budget import offload_reserve_bytes, plan_expert_slots, plan_num_blocks
from moeserve.engine.outputs import (
    CompletionOutput,
    RequestMetrics,
    RequestOutput,
    StepStats,
    TokenLogprob,
)
from moeserve.engine.placement import resolve_device, resolve_kernels
from moeserve.engine.runner import Runner
from moeserve.engine.sampler import PendingSample, Sampler, SamplerOutput
from moeserve.engine.scheduler import RequestTooLarge, Scheduler, SchedulerOutput
from moeserve.engine.sequence import PENDING, Sequence
from moeserve.model.backend import ModelBackend
from moeserve.model.loader import inspect_checkpoint, load_model, resolve_dtype
from moeserve.sampling_params import SamplingParams
from moeserve.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)


class InvalidRequest(ValueError):
    """A request the engine refuses at admission; the message says what is wrong."""


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detoks: list[IncrementalDetokenizer | None]
    metrics: RequestMetrics
    last_token_time: list[float]

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


@dataclass
class StepResult:
    outputs: list[RequestOutput]
    stats: StepStats | None


@dataclass
class _Launched:
    """A step queued on the device whose sampled tokens the host has not read yet."""

    out: SchedulerOutput
    seqs: list[Sequence]  # the sampled rows' sequences, in row order
    slots: list[int]  # per row, the output index its token fills (appended as PENDING)
    rows: dict[int, int]  # seq_id -> row: where the next step finds the seq's input token
    sample: PendingSample
    t0: float


def encode_prompt(
    tokenizer: Tokenizer | None, vocab_size: int, prompt: str | list[int]
) -> list[int]:
    """Token ids of a prompt (text, or ids checked against the vocabulary); InvalidRequest
    says what is wrong."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequest("prompt is empty")
        if tokenizer is None:
            raise InvalidRequest("this model has no tokenizer.json: send token ids")
        return tokenizer.encode(prompt)
    ids = list(prompt)
    if not ids:
        raise InvalidRequest("prompt is empty")
    bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool)]
    if bad:
        raise InvalidRequest(f"prompt token ids must be integers, got {bad[0]!r}")
    out = [t for t in ids if not 0 <= t < vocab_size]
    if out:
        raise InvalidRequest(
            f"prompt token id {out[0]} is outside the vocabulary (0..{vocab_size - 1})"
        )
    return ids


class Engine:
    """Continuous-batching engine over one model directory."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str | None = None,
        device: str | None = None,
        cache: CacheConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        offload: OffloadConfig | None = None,
        load_format: str = "safetensors",
        seed: int | None = None,
        progress: bool = True,
        kernels: str = "auto",
        enforce_eager: bool = False,
        async_scheduling: bool | None = None,
    ) -> None:
        """kernels: "auto" (Triton on CUDA when importable), "triton" or "torch" (the readable
        path). enforce_eager: no CUDA graphs for decode steps. async_scheduling (default: on
        for CUDA): queue each step before reading the last one's tokens, so the host's work
        (scheduling, detokenizing, stop checks) overlaps the device's; outputs then come one
        step() later."""
        cache = cache or CacheConfig()
        sched = scheduler or SchedulerConfig()
        offload = offload or OffloadConfig()
        dev = resolve_device(device)
        self._cuda_index = dev.index if dev.type == "cuda" else None
        with self._on_device():
            self._build(model_dir, dtype, str(dev), cache, sched, offload, load_format, seed,
                        progress, kernels, enforce_eager, async_scheduling)  # fmt: skip

    def _on_device(self) -> AbstractContextManager[object]:
        """The engine's CUDA device as the current one, then the caller's again: Triton
        launches, streams, graph capture and the memory probe use the current device (per
        thread), not the tensors'."""
        return nullcontext() if self._cuda_index is None else torch.cuda.device(self._cuda_index)

    def _build(
        self, model_dir: str | Path, dtype: str | None, device: str, cache: CacheConfig,
        sched: SchedulerConfig, offload: OffloadConfig, load_format: str, seed: int | None,
        progress: bool, kernels: str, enforce_eager: bool, async_scheduling: bool | None,
    ) -> None:  # fmt: skip
        ckpt = inspect_checkpoint(model_dir, need_weights=load_format != "dummy")
        model_dtype = resolve_dtype(ckpt.config, dtype)
        max_positions = ckpt.config.max_position_embeddings
        self.max_model_len = sched.max_model_len or max_positions
        if self.max_model_len > max_positions:  # before any weight is read
            raise ConfigError(
                f"max_model_len {self.max_model_len} exceeds the model's "
                f"max_position_embeddings {max_positions}"
            )
        reserve = offload_reserve_bytes(ckpt.config, model_dtype, sched, self.max_model_len)
        slots = plan_expert_slots(
            ckpt.config, model_dtype, torch.device(device), offload, cache.gpu_memory_utilization,
            reserve_bytes=reserve,
        )  # fmt: skip
        self.kernels = resolve_kernels(kernels, torch.device(device))
        self.checkpoint, self.model = load_model(
            model_dir, dtype=dtype, device=device, progress=progress, load_format=load_format,
            expert_device="cpu" if slots is not None else None,
            backend=ModelBackend(triton=self.kernels == "triton"),
        )
        # Experts in host memory run through a per-layer device cache.
        self.expert_store = ExpertStore(self.model, offload, slots) if slots is not None else None
        experts = self.expert_store.providers() if self.expert_store is not None else None
        cfg = self.model.cfg
        self.model_config = cfg
        path = Path(model_dir)
        self.tokenizer = Tokenizer.from_dir(path) if (path / "tokenizer.json").exists() else None
        num_blocks = plan_num_blocks(self.model, cache, sched, self.max_model_len, experts)
        graphs = self.kernels == "triton" and self.model.device.type == "cuda" and not enforce_eager
        self.runner = Runner(
            self.model, num_blocks, cache.block_size,
            decode_graphs_up_to=sched.max_num_seqs if graphs else 0,
            max_model_len=self.max_model_len, max_num_seqs=sched.max_num_seqs, experts=experts,
        )  # fmt: skip
        if async_scheduling is None:
            async_scheduling = self.model.device.type == "cuda"
        self.async_scheduling = async_scheduling
        if self.kernels == "triton" and self.model.device.type == "cuda":
            secs = self.runner.warm_up(sched.max_num_batched_tokens)
            log.info("Triton kernels compiled for every step size in %.1f s", secs)
            from moeserve.kernels import log_later_compiles

            log_later_compiles()
        if self.expert_store is not None:
            # The KV probe's and the warm-up's expert fetches are not traffic.
            self.expert_store.reset_stats()
        self.scheduler = Scheduler(
            num_blocks=num_blocks,
            block_size=cache.block_size,
            max_num_seqs=sched.max_num_seqs,
            max_num_batched_tokens=sched.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_chunked_prefill=sched.enable_chunked_prefill,
            admission_wait_steps=sched.admission_wait_steps,
        )
        # Every row of the lm_head, as transformers and vLLM do: checkpoints pad the vocabulary
        # past the tokenizer's ids (Qwen: 151,936 rows for 151,665 tokens), and log-probs are
        # normalised over all of them. An id the tokenizer lacks decodes to "".
        self.vocab_size = cfg.vocab_size
        self.sampler = Sampler(self.vocab_size, seed=seed)
        self.eos_token_ids = set(cfg.eos_token_ids)
        if not self.eos_token_ids and self.tokenizer and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids = {self.tokenizer.eos_token_id}
        self.num_blocks = num_blocks
        self._requests: dict[str, _Request] = {}
        self._aborted: list[RequestMetrics] = []
        self._launched: _Launched | None = None
        self._last_resolved = 0.0
        # Requests whose sampling reads their earlier tokens (penalties): a step with one of
        # them running waits for the last step's tokens before it is scheduled.
        self._penalised: set[str] = set()
        self._seq_ids = itertools.count()
        self.num_steps = 0  # steps that ran the model
        log.info(
            "engine ready: %s on %s, %d KV blocks of %d tokens, max_model_len %d, "
            "%s kernels, decode CUDA graphs %s, async scheduling %s",
            cfg.model_type, device, num_blocks, cache.block_size, self.max_model_len,
            self.kernels, "on" if graphs else "off", "on" if async_scheduling else "off",
        )  # fmt: skip

    # ----------------------------------------------------------------- requests
    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        return encode_prompt(self.tokenizer, self.model_config.vocab_size, prompt)

    @property
    def offloads_experts(self) -> bool:
        return self.expert_store is not None

    def warm_up(self) -> None:
        """One real generation step before serving (first-call costs are paid here, not by a
        user); its expert counts are then cleared so the counters describe traffic only."""
        token = self.model_config.bos_token_id
        token = token if token is not None and 0 <= token < self.vocab_size else 0
        self.add_request("warmup", [token], SamplingParams(max_tokens=1, temperature=0.0))
        while self.has_unfinished():
            self.step()
        self.reset_expert_counts()

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        prompt_ids: list[int] | None = None,
        arrival_time: float | None = None,
    ) -> list[int]:
        """Queue a request (n sequences); returns its prompt token ids. Raises ValueError."""
        if request_id in self._requests:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        ids = prompt_ids if prompt_ids is not None else self.encode_prompt(prompt)
        total = len(ids) + params.max_tokens
        if total > self.max_model_len:
            raise RequestTooLarge(
                f"this model's maximum context length is {self.max_model_len} tokens, but the "
                f"request needs {total} ({len(ids)} in the prompt + {params.max_tokens} "
                "max_tokens)"
            )
        bad = [t for t in params.stop_token_ids if not 0 <= t < self.model_config.vocab_size]
        if bad:
            raise InvalidRequest(f"stop_token_ids: {bad[0]} is outside the vocabulary")
        now = arrival_time if arrival_time is not None else time.monotonic()
        seqs, detoks = [], []
        for i in range(params.n):
            # Seeded n>1 samples must differ from each other, yet stay reproducible.
            p = params if params.seed is None or i == 0 else replace(params, seed=params.seed + i)
            seqs.append(
                Sequence(
                    seq_id=next(self._seq_ids),
                    request_id=request_id,
                    prompt_ids=ids,
                    max_tokens=params.max_tokens,
                    params=p,
                    arrival_time=now,
                )
            )
            detoks.append(
                IncrementalDetokenizer(
                    self.tokenizer,
                    ids,
                    skip_special_tokens=params.skip_special_tokens,
                    stop=params.stop,
                    include_stop_str_in_output=params.include_stop_str_in_output,
                )
                if self.tokenizer is not None
                else None
            )
        for seq in seqs:
            self.scheduler.add(seq)
        if params.has_penalties:
            self._penalised.add(request_id)
        prompt_text = prompt if isinstance(prompt, str) else None
        self._requests[request_id] = _Request(
            request_id,
            prompt_text,
            ids,
            params,
            seqs,
            detoks,
            RequestMetrics(arrival_time=now, num_prompt_tokens=len(ids)),
            [0.0] * params.n,
        )
        return ids

    def abort_request(self, request_id: str) -> bool:
        """Drop a request and free its KV blocks now; False if it is unknown or finished."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        self._penalised.discard(request_id)
        self.scheduler.abort_request(request_id)
        req.metrics.finish_time = time.monotonic()
        self._aborted.append(req.metrics)  # reported with the next step's stats
        return True

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def has_work(self) -> bool:
        """Whether step() has something to do: requests to run, a launched step to resolve, or
        aborts to report. A loop that sleeps only when this is False reports an abort at once,
        even when nothing else runs (the gauges must not keep showing the aborted requests)."""
        return bool(self._requests) or self._launched is not None or bool(self._aborted)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    # --------------------------------------------------------------------- step
    def step(self) -> StepResult:
        """Run one iteration; returns the deltas of every request that progressed.

        With async scheduling the step launched here is resolved (its tokens read, stop checks
        run) by the next call, which first queues the step after it; this call returns the
        deltas of the step before.
        """
        with self._on_device():
            return self._step()

    def _step(self) -> StepResult:
        prev, self._launched = self._launched, None
        if prev is not None and (not self.async_scheduling or self._penalised):
            return self._resolve(prev)
        launched = self._launch(prev)
        if prev is not None:
            self._launched = launched
            return self._resolve(prev)
        if launched is None:
            return StepResult([], self._idle_stats() if self._aborted else None)
        if self.async_scheduling:
            self._launched = launched
            return StepResult([], None)
        return self._resolve(launched)

    def _launch(self, prev: _Launched | None) -> _Launched | None:
        """Schedule a step and queue it (model and sampler) on the device; reads nothing back.
        Decodes of tokens `prev` sampled read them on the device."""
        t0 = time.monotonic()
        out = self.scheduler.schedule()
        if not out.scheduled:
            return None
        feed = None
        if prev is not None:
            feed = [
                prev.rows[w.seq.seq_id] if w.seq.token_ids[w.start] == PENDING else -1
                for w in out.scheduled
            ]
        for w in out.scheduled:
            req = self._requests[w.seq.request_id]
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = t0
        self.num_steps += 1
        logits, rows = self.runner.execute(out.scheduled, feed)
        seqs = [out.scheduled[i].seq for i in rows]
        if self.async_scheduling:  # the greedy kernel writes straight into the feed buffer
            sample = self.sampler.launch(logits, seqs, self.runner.fed_R[: len(seqs)])
            self.runner.keep_sampled(sample.tokens_B)
        else:
            sample = self.sampler.launch(logits, seqs)
        self.scheduler.update(out, dict.fromkeys((s.seq_id for s in seqs), PENDING))
        slots = [s.num_output_tokens - 1 for s in seqs]
        rows_of = {s.seq_id: r for r, s in enumerate(seqs)}
        return _Launched(out, seqs, slots, rows_of, sample, t0)

    def _idle_stats(self) -> StepStats:
        """A record of no step: the scheduler's state and the aborts since the last step."""
        stats = StepStats(
            timestamp=time.monotonic(), step_seconds=0.0, num_running=0, num_waiting=0,
            num_seqs=0, num_prefill_tokens=0, num_decode_tokens=0, num_generated_tokens=0,
            kv_usage=0.0, num_preempted=0,
        )  # fmt: skip
        return self._finish_stats(stats)

    def _finish_stats(self, stats: StepStats) -> StepStats:
        stats.finished.extend(("abort", m) for m in self._aborted)
        self._aborted.clear()
        s = self.scheduler.stats()
        stats.num_running, stats.num_waiting, stats.kv_usage = (
            s.num_running,
            s.num_waiting,
            s.kv_usage,
        )
        return stats

    def _resolve(self, step: _Launched) -> StepResult:
        """Read a launched step's tokens; stop checks, detokenisation, deltas."""
        sampled = step.sample.result()
        now = time.monotonic()
        out = step.out
        stats = StepStats(
            timestamp=now,
            step_seconds=now - max(step.t0, self._last_resolved),
            num_running=0,
            num_waiting=0,
            num_seqs=len(out.scheduled),
            num_prefill_tokens=out.num_prefill_tokens,
            num_decode_tokens=out.num_decode_tokens,
            num_generated_tokens=0,
            kv_usage=0.0,
            num_preempted=len(out.preempted),
        )
        self._last_resolved = now
        deltas: dict[str, RequestOutput] = {}
        for row, (seq, slot) in enumerate(zip(step.seqs, step.slots)):
            if seq.is_finished:  # aborted, or it stopped at the step before (async)
                continue
            seq.set_output(slot, sampled.token_ids[row])
            req = self._requests[seq.request_id]
            delta = self._process(req, seq, row, slot + 1, sampled, now, stats)
            stats.num_generated_tokens += 1
            ro = deltas.setdefault(
                req.request_id, RequestOutput(req.request_id, req.prompt_ids, [], prompt=req.prompt)
            )
            ro.outputs.append(delta)
        for ro in deltas.values():
            req = self._requests[ro.request_id]
            if req.finished:
                req.metrics.finish_time = now
                ro.finished, ro.metrics = True, req.metrics
                reason = next((o.finish_reason for o in ro.outputs if o.finish_reason), "stop")
                stats.finished.append((reason, req.metrics))
                del self._requests[ro.request_id]
                self._penalised.discard(ro.request_id)
        return StepResult(list(deltas.values()), self._finish_stats(stats))

    def _process(
        self,
        req: _Request,
        seq: Sequence,
        row: int,
        num_outputs: int,
        sampled: SamplerOutput,
        now: float,
        stats: StepStats,
    ) -> CompletionOutput:
        """Stop checks and detokenisation for output number `num_outputs` (1-based) of `seq`,
        just sampled (under async scheduling the seq may hold one more, still pending)."""
        index = req.seqs.index(seq)
        token = sampled.token_ids[row]
        params: SamplingParams = seq.params
        delta = CompletionOutput(index=index, token_ids=[token])
        if params.logprobs is not None:
            lp = TokenLogprob(token, sampled.logprobs[row], sampled.top_logprobs[row] or [])
            delta.logprobs = [lp]
        if num_outputs == 1:
            req.metrics.first_token_time = req.metrics.first_token_time or now
        else:
            stats.itl.append(now - req.last_token_time[index])
        req.last_token_time[index] = now
        req.metrics.num_generated_tokens += 1
        detok = req.detoks[index]
        reason: str | None = None
        stop_reason: str | int | None = None
        if token in params.stop_token_ids or (
            token in self.eos_token_ids and not params.ignore_eos
        ):
            reason, stop_reason = "stop", token
        elif detok is not None:
            text, hit = detok.step([token])
            delta.text = text
            if hit:
                reason, stop_reason = "stop", detok.stop_str
        if reason is None and (
            num_outputs >= params.max_tokens
            or seq.num_prompt_tokens + num_outputs >= self.max_model_len
        ):
            reason = "length"
        if reason is not None:
            if detok is not None:
                delta.text += detok.flush()
            delta.finish_reason, delta.stop_reason = reason, stop_reason
            self.scheduler.finish(seq, reason)
        return delta

    def expert_token_counts(self) -> torch.Tensor:
        """[sparse layers, E] tokens routed to each expert since start (one host copy)."""
        return self.model.tokens_per_expert().cpu()

    def expert_cache_stats(self) -> list[ExpertCacheStats]:
        """Per sparse layer cache counters; empty when every expert is resident."""
        return self.expert_store.stats() if self.expert_store is not None else []

    def reset_expert_counts(self) -> None:
        """Zero the per-expert counters (after a warm-up, whose tokens are not traffic)."""
        self.model.reset_expert_counts()
