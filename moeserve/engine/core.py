"""EngineCore.step(): schedule -> execute -> sample -> update, returning per-request deltas.

The core knows token ids only: text, stop strings and logprob formatting are the output
processor's (engine/output.py). Stop conditions on tokens (max_tokens, the context length,
EOS, stop token ids) are the scheduler's, decided when a sampled token is recorded.

With async scheduling the step launched in one call is resolved (its tokens read and
recorded) by the next call, which first queues the step after it: the host's work overlaps
the device's, and outputs come one step() later.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, replace

import torch

from moeserve.config import EngineConfig
from moeserve.engine.executor import Executor
from moeserve.engine.expert_store import ExpertCacheStats
from moeserve.engine.messages import EngineInfo, EngineRequest
from moeserve.engine.outputs import (
    CompletionOutput,
    RequestMetrics,
    RequestOutput,
    StepStats,
    TokenLogprob,
)
from moeserve.engine.prompt_logprobs import PromptRows
from moeserve.engine.sampler import GrammarMask, PendingSample, Sampler
from moeserve.engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from moeserve.engine.sequence import PENDING, Sequence
from moeserve.engine.structured import Grammars, SeqGrammar
from moeserve.sampling_params import SamplingParams
from moeserve.tokenizer import Tokenizer


class InvalidRequest(ValueError):
    """A request the engine refuses at admission; the message says what is wrong."""


@dataclass
class _Request:
    params: SamplingParams
    seqs: list[Sequence]
    metrics: RequestMetrics
    last_token_time: list[float]
    # With params.prompt_logprobs: the next prompt token whose entry is due (0: the first's
    # None). Kept across preemption, so a recomputed prompt emits nothing twice.
    prompt_next: int = 0
    # With params.structured: each sequence's matcher, by seq_id.
    grammars: dict[int, SeqGrammar] | None = None

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


@dataclass
class CoreStep:
    """One step's per-request deltas (token ids and logprobs; text empty) and statistics."""

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
    prompt: PromptRows | None = None
    # Per request with prompt entries this step: (request id, whether the first token's
    # None leads them, its span in `prompt` or -1)
    prompt_of: list[tuple[str, bool, int]] | None = None


def _stats(now: float, step_seconds: float, out: SchedulerOutput | None) -> StepStats:
    return StepStats(
        timestamp=now,
        step_seconds=step_seconds,
        num_running=0,
        num_waiting=0,
        num_seqs=len(out.scheduled) if out else 0,
        num_prefill_tokens=out.num_prefill_tokens if out else 0,
        num_decode_tokens=out.num_decode_tokens if out else 0,
        num_generated_tokens=0,
        kv_usage=0.0,
        num_preempted=len(out.preempted) if out else 0,
        num_prefix_queries=out.prefix_queries if out else 0,
        num_prefix_hits=out.prefix_hits if out else 0,
    )


class EngineCore:
    """Continuous batching over one loaded model; see the module docstring."""

    def __init__(self, config: EngineConfig, *, progress: bool = True) -> None:
        self.config = config
        self.executor = ex = Executor(config, progress=progress)
        self.model_config = ex.model_config
        self.max_model_len = ex.max_model_len
        self.async_scheduling = ex.async_scheduling
        # Every row of the lm_head, as transformers and vLLM do: checkpoints pad the vocabulary
        # past the tokenizer's ids (Qwen: 151,936 rows for 151,665 tokens), and log-probs are
        # normalised over all of them.
        self.vocab_size = ex.model_config.vocab_size
        self.eos_token_ids = frozenset(ex.model_config.eos_token_ids)
        sched = config.scheduler
        self.scheduler = Scheduler(
            num_blocks=ex.num_blocks,
            block_size=ex.block_size,
            max_num_seqs=sched.max_num_seqs,
            max_num_batched_tokens=sched.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            enable_chunked_prefill=sched.enable_chunked_prefill,
            admission_wait_steps=sched.admission_wait_steps,
            kv_groups=ex.kv_groups,
            enable_prefix_caching=config.cache.enable_prefix_caching,
            share_prompts=True,
            policy=sched.scheduling_policy,
        )
        self.sampler = Sampler(self.vocab_size, seed=config.seed)
        self._requests: dict[str, _Request] = {}
        self._aborted: list[RequestMetrics] = []
        self._launched: _Launched | None = None
        self._last_resolved = 0.0
        # Requests whose sampling reads their earlier tokens (penalties, a grammar's mask): a
        # step with one of them running waits for the last step's tokens before it is scheduled.
        self._penalised: set[str] = set()
        self.grammars: Grammars | None = None  # set_tokenizer
        self.tokenizer: Tokenizer | None = None  # set_tokenizer (bad_words)
        self._seq_ids = itertools.count()
        self.num_steps = 0  # steps that ran the model

    def set_eos(self, token_ids: set[int]) -> None:
        """EOS ids when config.json and generation_config.json name none (the tokenizer's)."""
        if not self.eos_token_ids:
            self.eos_token_ids = frozenset(token_ids)

    def set_tokenizer(self, tokenizer: Tokenizer) -> None:
        """The model's tokenizer, which structured outputs compile their grammars against (call
        after set_eos: EOS is what a grammar allows where it may end)."""
        self.grammars = Grammars(tokenizer, self.vocab_size, self.eos_token_ids)
        self.tokenizer = tokenizer

    @property
    def offloads_experts(self) -> bool:
        return self.executor.offloads_experts

    def info(self) -> EngineInfo:
        """What a client needs to know of this engine (sent once it is ready)."""
        return EngineInfo(
            self.model_config,
            self.max_model_len,
            self.vocab_size,
            self.offloads_experts,
            self.executor.weight_bytes,
            self.scheduler.by_priority,
        )

    # ----------------------------------------------------------------- requests
    def add_request(self, req: EngineRequest) -> None:
        """Queue a request (n sequences). Raises ValueError (InvalidRequest, RequestTooLarge)."""
        rid, ids, params = req.request_id, req.prompt_ids, req.params
        if rid in self._requests:
            raise InvalidRequest(f"request id {rid!r} is already in use")
        if req.priority and not self.scheduler.by_priority:
            raise InvalidRequest(
                "priority needs the priority scheduling policy (--scheduling-policy priority)"
            )
        if not ids:
            raise InvalidRequest("prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequest(
                f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})"
            )
        bad = [t for t in params.stop_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequest(f"stop_token_ids: {bad[0]} is outside the vocabulary")
        for name in ("logit_bias", "allowed_token_ids"):
            bad = [t for t in getattr(params, name) or () if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequest(f"{name}: token {bad[0]} is outside the vocabulary")
        endings = {*params.stop_token_ids, *(() if params.ignore_eos else self.eos_token_ids)}
        allowed = set(params.allowed_token_ids or ())
        if params.min_tokens and allowed and allowed <= endings:
            raise InvalidRequest(
                "allowed_token_ids: every allowed token ends the output, so min_tokens cannot "
                "be met"
            )
        if params.bad_words:
            if self.tokenizer is None:
                raise InvalidRequest("bad_words need the model's tokenizer.json")
            words = self.tokenizer.bad_word_ids(params.bad_words)  # ValueError: a 400
            params = replace(params, bad_words_token_ids=words)
        grammars = None
        if params.structured is not None:
            if self.grammars is None:
                raise InvalidRequest("structured outputs need the model's tokenizer.json")
            try:
                grammars = [self.grammars.matcher(params.structured) for _ in range(params.n)]
            except ValueError as e:
                raise InvalidRequest(str(e)) from None
        now = req.arrival_time if req.arrival_time is not None else time.monotonic()
        seqs = []
        for i in range(params.n):
            # Seeded n>1 samples must differ from each other, yet stay reproducible.
            p = params if params.seed is None or i == 0 else replace(params, seed=params.seed + i)
            seqs.append(
                Sequence(
                    seq_id=next(self._seq_ids),
                    request_id=rid,
                    prompt_ids=ids,
                    max_tokens=params.max_tokens,
                    params=p,
                    arrival_time=now,
                    cache_salt=req.cache_salt,
                    priority=req.priority,
                )
            )
        for seq in seqs:  # the scheduler refuses what could never fit (RequestTooLarge)
            self.scheduler.add(seq)
        # Penalties, grammars and bad words read the output so far: their steps wait for it.
        if params.has_penalties or grammars is not None or params.bad_words_token_ids:
            self._penalised.add(rid)
        metrics = RequestMetrics(arrival_time=now, num_prompt_tokens=len(ids))
        self._requests[rid] = _Request(params, seqs, metrics, [0.0] * params.n)
        if grammars is not None:
            self._requests[rid].grammars = {s.seq_id: g for s, g in zip(seqs, grammars)}

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

    def finish_seq(self, request_id: str, index: int, reason: str) -> RequestMetrics | None:
        """End sequence `index` of a request early (the output processor found a stop
        string); returns the request's metrics when that was its last running sequence."""
        req = self._requests.get(request_id)
        if req is None:
            return None
        self.scheduler.finish(req.seqs[index], reason)
        if not req.finished:
            return None
        req.metrics.finish_time = time.monotonic()
        del self._requests[request_id]
        self._penalised.discard(request_id)
        return req.metrics

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

    def warm_up(self) -> None:
        """One real generation step before serving (first-call costs are paid here, not by a
        user); its expert counts are then cleared so the counters describe traffic only."""
        token = self.model_config.bos_token_id
        token = token if token is not None and 0 <= token < self.vocab_size else 0
        params = SamplingParams(max_tokens=1, temperature=0.0)
        self.add_request(EngineRequest("warmup", [token], params))
        while self.has_work():
            self.step()
        self.executor.reset_expert_counts()

    # --------------------------------------------------------------------- step
    def step(self) -> CoreStep:
        """Run one iteration; returns the deltas of every request that progressed."""
        with self.executor.on_device():
            return self._step()

    def _step(self) -> CoreStep:
        prev, self._launched = self._launched, None
        if prev is not None and (not self.async_scheduling or self._penalised):
            return self._resolve(prev)
        launched = self._launch(prev)
        if prev is not None:
            self._launched = launched
            return self._resolve(prev)
        if launched is None:
            return CoreStep(
                [],
                self._finish_stats(_stats(time.monotonic(), 0.0, None)) if self._aborted else None,
            )
        if self.async_scheduling:
            self._launched = launched
            return CoreStep([], None)
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
                req.metrics.num_cached_tokens = w.seq.num_cached_tokens or 0
        self.num_steps += 1
        ex = self.executor
        prompt, prompt_of = self._prompt_rows(out.scheduled)
        logits, rows = ex.execute(out.scheduled, feed, prompt)
        seqs = [out.scheduled[i].seq for i in rows]
        grammar = self._grammar_mask(seqs, logits.is_cuda) if self._penalised else None
        if self.async_scheduling:  # the greedy kernel writes straight into the feed buffer
            sample = self.sampler.launch(
                logits, seqs, ex.fed_R[: len(seqs)], grammar, self.eos_token_ids
            )
            ex.keep_sampled(sample.tokens_B)
        else:
            sample = self.sampler.launch(
                logits, seqs, grammar=grammar, eos_token_ids=self.eos_token_ids
            )
        self.scheduler.update(out, dict.fromkeys((s.seq_id for s in seqs), PENDING))
        slots = [s.num_output_tokens - 1 for s in seqs]
        rows_of = {s.seq_id: r for r, s in enumerate(seqs)}
        return _Launched(out, seqs, slots, rows_of, sample, t0, prompt, prompt_of)

    def _grammar_mask(self, seqs: list[Sequence], pin: bool) -> GrammarMask | None:
        """The token mask of the rows with a grammar (None when no row has one). Computed while
        the device runs the model; each matcher has consumed every earlier token (grammar
        requests are never scheduled ahead of their last step's tokens)."""
        rows = []
        for r, seq in enumerate(seqs):
            grammars = self._requests[seq.request_id].grammars
            if grammars is not None:
                g = grammars[seq.seq_id]
                assert g.consumed == seq.num_output_tokens, f"seq {seq.seq_id}'s grammar lags"
                rows.append((r, g))
        if not rows:
            return None
        assert self.grammars is not None
        return self.grammars.mask(rows, pin)

    def _prompt_rows(
        self, scheduled: list[ScheduledSeq]
    ) -> tuple[PromptRows | None, list[tuple[str, bool, int]] | None]:
        """The prompt positions this step computes log-probs for: the scheduled chunk of a
        request's first sequence, less the positions an earlier (preempted) run emitted."""
        rows, owners = PromptRows(), []
        for i, w in enumerate(scheduled):
            req = self._requests[w.seq.request_id]
            n = req.params.prompt_logprobs
            if n is None or w.seq is not req.seqs[0]:
                continue
            first = max(w.start, req.prompt_next - 1)
            end = min(w.start + w.num_tokens, w.seq.num_prompt_tokens - 1)
            lead = req.prompt_next == 0
            span = -1
            if first < end:
                span = len(rows.spans)
                rows.add(i, first, end, w.seq.prompt_ids, n)
            if lead or span >= 0:
                owners.append((w.seq.request_id, lead, span))
                req.prompt_next = max(req.prompt_next, 1, end + 1)
        return (rows, owners) if owners else (None, None)

    def _resolve(self, step: _Launched) -> CoreStep:
        """Read a launched step's tokens and record them (the scheduler decides stops)."""
        sampled = step.sample.result()
        now = time.monotonic()
        stats = _stats(now, now - max(step.t0, self._last_resolved), step.out)
        self._last_resolved = now
        deltas: dict[str, RequestOutput] = {}
        for rid, lead, span in step.prompt_of or []:
            req = self._requests.get(rid)
            if req is None:  # aborted meanwhile
                continue
            entries: list[TokenLogprob | None] = [None] if lead else []
            if span >= 0:
                assert step.prompt is not None and req.params.prompt_logprobs is not None
                entries.extend(step.prompt.entries(span, req.params.prompt_logprobs))
            deltas[rid] = RequestOutput(rid, [], [], prompt_logprobs=entries)
        for row, (seq, slot) in enumerate(zip(step.seqs, step.slots)):
            if seq.is_finished:  # aborted, or it stopped at the step before (async)
                continue
            token = sampled.token_ids[row]
            reason, stop_reason = self.scheduler.record(seq, slot, token, self.eos_token_ids)
            req = self._requests[seq.request_id]
            grammar = req.grammars[seq.seq_id] if req.grammars is not None else None
            if grammar is not None and reason is None and grammar.ends_after(token):
                self.scheduler.finish(seq, "stop")  # complete: no need to wait a step for EOS
                reason = "stop"
            index = req.seqs.index(seq)
            delta = CompletionOutput(
                index=index, token_ids=[token], finish_reason=reason, stop_reason=stop_reason
            )
            if seq.params.logprobs is not None:
                top = sampled.top_logprobs[row] or []
                delta.logprobs = [TokenLogprob(token, sampled.logprobs[row], top)]
            if slot == 0:
                req.metrics.first_token_time = req.metrics.first_token_time or now
            else:
                stats.itl.append(now - req.last_token_time[index])
            req.last_token_time[index] = now
            req.metrics.num_generated_tokens += 1
            stats.num_generated_tokens += 1
            ro = deltas.get(seq.request_id)
            if ro is None:
                ro = deltas[seq.request_id] = RequestOutput(seq.request_id, [], [])
            ro.outputs.append(delta)
        for ro in deltas.values():
            req = self._requests[ro.request_id]
            ro.num_cached_tokens = req.metrics.num_cached_tokens
            if req.finished:
                req.metrics.finish_time = now
                ro.finished, ro.metrics = True, req.metrics
                del self._requests[ro.request_id]
                self._penalised.discard(ro.request_id)
        return CoreStep(list(deltas.values()), self._finish_stats(stats))

    def _finish_stats(self, stats: StepStats) -> StepStats:
        """The scheduler's state and the aborts since the last report. Finished requests are
        added by the output processor, which may still end one at a stop string."""
        stats.finished.extend(("abort", m) for m in self._aborted)
        self._aborted.clear()
        s = self.scheduler.stats()
        stats.num_running, stats.num_waiting, stats.kv_usage = (
            s.num_running,
            s.num_waiting,
            s.kv_usage,
        )
        return stats

    # ----------------------------------------------------------------- experts
    def expert_token_counts(self) -> torch.Tensor:
        """[sparse layers, E] tokens routed to each expert since start (one host copy)."""
        return self.executor.expert_token_counts()

    def expert_cache_stats(self) -> list[ExpertCacheStats]:
        """Per sparse layer cache counters; empty when every expert is resident."""
        return self.executor.expert_cache_stats()
