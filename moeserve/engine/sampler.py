"""Logits -> next tokens (+ logprobs), vectorised over the rows of one engine step.

Legend: B rows (sequences) in the step, R the random (non-greedy) subset of them, P the
subset with penalties, V vocab (every row of the model's lm_head), L longest
token list in a padded batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from moeserve.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1
# Exp(1) draws of exactly 0 would turn p/q into inf (or 0/0 = NaN for masked tokens).
_MIN_NOISE = 1e-20


class SampleRow(Protocol):
    """What the sampler reads from a sequence: its params and its tokens so far."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]


@dataclass
class GrammarMask:
    """The allowed tokens of a step's grammar rows: bit t of row g (word t // 32, bit t % 32)
    says whether token t may follow in row `rows[g]`. Tokens past the bitmask's width are not
    allowed (the model's vocabulary may be wider than the tokenizer's)."""

    rows: list[int]
    bits_GW: torch.Tensor  # int32, on the host


def apply_grammar(logits_BV: torch.Tensor, grammar: GrammarMask) -> torch.Tensor:
    """A copy of `logits_BV` with the grammar rows' disallowed tokens at -inf (one masked_fill
    over those rows, on the logits' device)."""
    device, (B, V) = logits_BV.device, logits_BV.shape
    bits_GW = grammar.bits_GW.to(device, non_blocking=True)
    G, W = bits_GW.shape
    # Byte j of the little-endian words holds tokens 8j..8j+7: one lookup per byte expands
    # the bitmask to a bool per token, in token order, without int32 temporaries per bit.
    bytes_GN = bits_GW.view(torch.uint8).view(-1).int()
    refused_GV = _refused_bits(device).index_select(0, bytes_GN).view(G, W * 32)[:, :V]
    if refused_GV.shape[1] < V:  # past the tokenizer's words: never allowed
        refused_GV = torch.nn.functional.pad(refused_GV, (0, V - W * 32), value=True)
    if G == B and grammar.rows == list(range(B)):
        return logits_BV.masked_fill(refused_GV, float("-inf"))
    idx = _index(grammar.rows, device)
    return logits_BV.index_copy(0, idx, logits_BV[idx].masked_fill(refused_GV, float("-inf")))


_REFUSED: dict[torch.device, torch.Tensor] = {}


def _refused_bits(device: torch.device) -> torch.Tensor:
    """[256, 8] bool: bit k of byte value b is 0."""
    table = _REFUSED.get(device)
    if table is None:
        bits_8 = torch.arange(8)
        table = ((torch.arange(256)[:, None] >> bits_8) & 1) == 0
        table = _REFUSED[device] = table.to(device)
    return table


@dataclass
class SamplerOutput:
    """One entry per row, in row order."""

    token_ids: list[int]
    logprobs: list[float | None]  # chosen token's logprob when params.logprobs is not None
    top_logprobs: list[list[tuple[int, float]] | None]  # top-N (token, logprob), best first


class PendingSample:
    """A step's sampled tokens (and logprobs) on their way to the host.

    The device->host copies start at once into page-locked memory, so the host can queue more
    work (the next step) before it reads them; `result()` waits for them alone.
    """

    def __init__(
        self,
        tokens_B: torch.Tensor,
        num_rows: int,
        logprobs_LC: torch.Tensor | None = None,
        wants: list[tuple[int, int]] | None = None,
        n_top: int = 0,
        host_tokens_B: torch.Tensor | None = None,
    ) -> None:
        """host_tokens_B: page-locked memory the sampling kernel writes the tokens to itself
        (no copy to queue)."""
        self.tokens_B = tokens_B  # on the device: the next step may read it there
        self._num_rows = num_rows
        self._wants = wants or []  # (row, top-N count) per logprobs row
        self._n_top = n_top
        self._event: torch.cuda.Event | None = None
        self._tokens = host_tokens_B if host_tokens_B is not None else to_host(tokens_B)
        self._lp = to_host(logprobs_LC) if logprobs_LC is not None else None
        if tokens_B.device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()
        self._result: SamplerOutput | None = None

    def result(self) -> SamplerOutput:
        if self._result is not None:
            return self._result
        if self._event is not None:
            self._event.synchronize()
        B = self._num_rows
        logprobs: list[float | None] = [None] * B
        top: list[list[tuple[int, float]] | None] = [None] * B
        if self._lp is not None:
            host, n_top = self._lp.tolist(), self._n_top
            for j, (i, n) in enumerate(self._wants):
                vals_j, ids_j = host[j][1 : 1 + n], host[j][1 + n_top : 1 + n_top + n]
                logprobs[i] = host[j][0]
                top[i] = [(int(t), v) for v, t in zip(vals_j, ids_j, strict=True)]
        self._result = SamplerOutput(self._tokens.tolist(), logprobs, top)
        return self._result


def _greedy(logits_BV: torch.Tensor, out_B: torch.Tensor | None) -> PendingSample:
    """Every row greedy, no logprobs. On CUDA the Triton argmax (torch's one-block reduction
    took 10 us for one 32k row on an H200) writes the tokens into out_B (when given) and
    straight into page-locked host memory: no copies to queue after it."""
    B = logits_BV.shape[0]
    if logits_BV.is_cuda and logits_BV.stride(1) == 1 and B:
        from moeserve.kernels import triton_available

        if triton_available():
            from moeserve.kernels.tokens import argmax_rows

            host = torch.empty(B, dtype=torch.int64, pin_memory=True)
            return PendingSample(argmax_rows(logits_BV, out_B, host), B, host_tokens_B=host)
    return PendingSample(logits_BV.argmax(dim=-1), B)


def to_host(t: torch.Tensor) -> torch.Tensor:
    if t.device.type != "cuda":
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


class Sampler:
    """Turns a step's logits into one token per row.

    Order of operations per row: allowed tokens only, the logit bias, the ban on ending
    before min_tokens (stop tokens and EOS at -inf), the bad words' next tokens (-inf),
    repetition/presence/frequency
    penalties, then (random rows only) temperature, top-k, top-p, min-p, then an exponential
    race ``argmax(p / q)`` with ``q ~ Exp(1)``. Greedy rows take the argmax of the logits so
    changed. A row with ``params.seed`` draws its noise from a generator seeded by
    ``(seed, len(output_ids))``, so its tokens do not depend on the other rows in the batch
    and are reproduced when the sequence is recomputed after preemption. Columns
    ``>= vocab_size`` are dropped (the engine passes the model's whole vocabulary, so none
    are).

    A grammar mask (structured outputs) sets its rows' disallowed tokens to -inf first.
    Logprobs are ``log_softmax`` of the RAW logits (before the grammar, bias, penalties,
    temperature and filtering) in float32 over the first ``vocab_size`` columns, as vLLM and
    OpenAI report.
    """

    def __init__(self, vocab_size: int, seed: int | None = None) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = vocab_size
        self._seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def sample(
        self,
        logits_BV: torch.Tensor,
        rows: Sequence[SampleRow],
        grammar: GrammarMask | None = None,
        eos_token_ids: frozenset[int] = frozenset(),
    ) -> SamplerOutput:
        """Sample one token per row; ``logits_BV`` (any float dtype/device) is not modified."""
        return self.launch(logits_BV, rows, grammar=grammar, eos_token_ids=eos_token_ids).result()

    def launch(
        self,
        logits_BV: torch.Tensor,
        rows: Sequence[SampleRow],
        out_B: torch.Tensor | None = None,
        grammar: GrammarMask | None = None,
        eos_token_ids: frozenset[int] = frozenset(),
    ) -> PendingSample:
        """Queue the sampling of one token per row on the logits' device; nothing waits for
        the device until the result's `result()`. out_B: where the greedy path may write the
        tokens (the result's tokens_B is then out_B). grammar: the rows whose tokens a
        grammar restricts, applied before everything else but the raw logprobs.
        eos_token_ids: what a row short of its min_tokens may not end with (unless
        ignore_eos), besides its stop_token_ids."""
        if logits_BV.dim() != 2 or logits_BV.shape[0] != len(rows):
            raise ValueError(
                f"logits must be [rows, vocab] with {len(rows)} rows, got {tuple(logits_BV.shape)}"
            )
        B = len(rows)
        logits_BV = logits_BV[:, : self.vocab_size]
        params = [row.params for row in rows]
        lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        short = [i for i, r in enumerate(rows) if len(r.output_ids) < r.params.min_tokens]
        if not lp_rows and not short and all(p.greedy and not p.changes_logits for p in params):
            if grammar is not None:
                logits_BV = apply_grammar(logits_BV, grammar)
            return _greedy(logits_BV, out_B)

        device = logits_BV.device
        logits_BV = logits_BV.float()  # every step below is out of place: input untouched
        raw_lp = None
        if lp_rows:
            raw_lp = torch.log_softmax(logits_BV[_index(lp_rows, device)], dim=-1)
        if grammar is not None:
            logits_BV = apply_grammar(logits_BV, grammar)
        allowed = [(i, p.allowed_token_ids) for i, p in enumerate(params) if p.allowed_token_ids]
        if allowed:
            logits_BV = allow_only(logits_BV, allowed)
        if any(p.logit_bias for p in params):
            logits_BV = apply_logit_bias(logits_BV, params)
        if short:
            logits_BV = ban_endings(logits_BV, [(i, params[i]) for i in short], eos_token_ids)
        if any(p.bad_words_token_ids for p in params):
            logits_BV = ban_bad_words(logits_BV, rows)

        pen_rows = [i for i, p in enumerate(params) if p.has_penalties]
        if pen_rows:
            idx = _index(pen_rows, device)
            penalised = apply_penalties(logits_BV[idx], [rows[i] for i in pen_rows])
            logits_BV = logits_BV.index_copy(0, idx, penalised)

        rand_rows = [i for i, p in enumerate(params) if not p.greedy]
        if len(rand_rows) < B:
            tokens_B = logits_BV.argmax(dim=-1)  # the answer for greedy rows
        if rand_rows:
            idx = _index(rand_rows, device)
            rand = [rows[i] for i in rand_rows]
            temps_R1 = _on(device, [r.params.temperature for r in rand])[:, None]
            logits_RV = logits_BV if len(rand_rows) == B else logits_BV[idx]
            logits_RV = _filtered(logits_RV / temps_R1, [r.params for r in rand])
            probs_RV = torch.softmax(logits_RV, dim=-1)
            noise_RV = self._exponential(rand, logits_RV.shape[1], device)
            sampled_R = (probs_RV / noise_RV).argmax(dim=-1)
            if len(rand_rows) == B:
                tokens_B = sampled_R
            else:
                tokens_B[idx] = sampled_R

        if raw_lp is None:
            return PendingSample(tokens_B, B)
        chosen = raw_lp.gather(1, tokens_B[_index(lp_rows, device)][:, None])
        n_top = min(max(params[i].logprobs or 0 for i in lp_rows), raw_lp.shape[1])
        vals, ids = raw_lp.topk(n_top, dim=-1) if n_top else (chosen[:, :0], chosen[:, :0])
        # float64 holds token ids exactly, so all of it comes back in one transfer.
        lp = torch.cat([chosen.double(), vals.double(), ids.double()], dim=1)
        wants = [(i, min(params[i].logprobs or 0, n_top)) for i in lp_rows]
        return PendingSample(tokens_B, B, lp, wants, n_top)

    def _exponential(self, rows: Sequence[SampleRow], V: int, device: torch.device) -> torch.Tensor:
        """Exp(1) noise [R, V]: seeded rows from their own generator, the rest from ours."""
        noise_RV = torch.empty(len(rows), V, device=device)
        unseeded = [j for j, r in enumerate(rows) if r.params.seed is None]
        if len(unseeded) == len(rows):
            noise_RV.exponential_(generator=self._generator(device))
        elif unseeded:
            draw = torch.empty(len(unseeded), V, device=device)
            draw.exponential_(generator=self._generator(device))
            noise_RV[_index(unseeded, device)] = draw
        for j, r in enumerate(rows):
            if r.params.seed is not None:
                gen = torch.Generator(device=device)
                gen.manual_seed(_row_seed(r.params.seed, len(r.output_ids)))
                noise_RV[j].exponential_(generator=gen)
        return noise_RV.clamp_min_(_MIN_NOISE)

    def _generator(self, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self._seed is None:
                gen.seed()  # non-deterministic, and leaves torch's global RNG alone
            else:
                gen.manual_seed(self._seed)
            self._generators[device] = gen
        return gen


def _on(
    device: torch.device, values: list[Any], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A small host list on ``device``. non_blocking: a pageable host->device copy is staged
    at once and, unlike a blocking one, does not wait for the model's queued kernels."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return _on(device, rows, torch.long)


def _padded_ids(lists: list[list[int]], V: int, device: torch.device) -> torch.Tensor:
    """[P, L] ids padded with V (a spare column that is dropped); ids >= V map there too."""
    width = max(1, max(len(ids) for ids in lists))
    ids_PL = torch.tensor([ids + [V] * (width - len(ids)) for ids in lists], dtype=torch.long)
    return ids_PL.clamp_(0, V).to(device, non_blocking=True)


def allow_only(logits_BV: torch.Tensor, rows: list[tuple[int, list[int]]]) -> torch.Tensor:
    """A copy of ``logits_BV`` where each listed row keeps only its allowed tokens' logits
    (the rest at -inf; ids past the logits' width are the engine's to refuse)."""
    V, device = logits_BV.shape[1], logits_BV.device
    keep = torch.zeros(len(rows), V + 1, dtype=torch.bool)  # column V: the ids past it
    for j, (_, ids) in enumerate(rows):  # one tensor per row, not a Python loop over ids
        keep[j, torch.tensor(ids).clamp_(max=V)] = True
    keep = keep[:, :V].to(device, non_blocking=True)
    idx = _index([i for i, _ in rows], device)
    return logits_BV.index_copy(0, idx, logits_BV[idx].masked_fill(~keep, float("-inf")))


def apply_logit_bias(logits_BV: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """A copy of ``logits_BV`` with each row's ``logit_bias`` added (one scatter-add of every
    biased (row, token) pair). A -inf (grammar-masked) logit stays -inf. The engine refuses
    tokens past the vocabulary; any that reach here are skipped rather than indexed (on CUDA
    an index out of range is a device assert that ends the process)."""
    rows, toks, vals = [], [], []
    V = logits_BV.shape[1]
    for i, p in enumerate(params):
        for tok, bias in (p.logit_bias or {}).items():
            if tok < V:
                rows.append(i)
                toks.append(tok)
                vals.append(bias)
    device = logits_BV.device
    index = (_index(rows, device), _index(toks, device))
    return logits_BV.index_put(index, _on(device, vals, logits_BV.dtype), accumulate=True)


def _banned(logits_BV: torch.Tensor, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """A copy of ``logits_BV`` with each (row, token) of `pairs` at -inf (itself if none)."""
    if not pairs:
        return logits_BV
    device = logits_BV.device
    index = (_index([i for i, _ in pairs], device), _index([t for _, t in pairs], device))
    return logits_BV.index_put(index, torch.tensor(float("-inf"), device=device))


def ban_endings(
    logits_BV: torch.Tensor, rows: list[tuple[int, SamplingParams]], eos_token_ids: frozenset[int]
) -> torch.Tensor:
    """A copy of ``logits_BV`` where each listed row (short of its min_tokens) cannot pick a
    token that would end it: its stop_token_ids and, unless ignore_eos, EOS, at -inf."""
    V = logits_BV.shape[1]
    pairs = [
        (i, t)
        for i, p in rows
        for t in {*p.stop_token_ids, *(() if p.ignore_eos else eos_token_ids)}
        if t < V
    ]
    return _banned(logits_BV, pairs)


def ban_bad_words(logits_BV: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """A copy of ``logits_BV`` where each row's bad words cannot be completed: the last token
    of every bad-word sequence whose other tokens end the row's output (a one-token word:
    always), at -inf. The output must be up to date (the engine waits for it)."""
    V = logits_BV.shape[1]
    pairs: list[tuple[int, int]] = []
    for i, row in enumerate(rows):
        out = row.output_ids
        for word in row.params.bad_words_token_ids or ():
            *head, last = word
            if last < V and (not head or out[len(out) - len(head) :] == head):
                pairs.append((i, last))
    return _banned(logits_BV, pairs)


def apply_penalties(logits_PV: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """Penalised copy of ``logits_PV`` (row p belongs to ``rows[p]``).

    HF repetition penalty over prompt + output tokens (``l > 0 ? l / r : l * r``), then
    OpenAI's ``l -= frequency * count + presence * (count > 0)`` over output tokens.
    """
    P, V = logits_PV.shape
    device = logits_PV.device
    out_PL = _padded_ids([r.output_ids for r in rows], V, device)
    counts_PV = torch.zeros(P, V + 1, device=device)
    counts_PV.scatter_add_(1, out_PL, torch.ones(out_PL.shape, device=device))
    counts_PV = counts_PV[:, :V]
    rep = [r.params.repetition_penalty for r in rows]
    if any(p != 1.0 for p in rep):
        prompt_PL = _padded_ids([r.prompt_ids for r in rows], V, device)
        seen_PV = torch.zeros(P, V + 1, dtype=torch.bool, device=device)
        seen_PV.scatter_(1, prompt_PL, True)
        seen_PV = seen_PV[:, :V] | (counts_PV > 0)
        rep_P1 = _on(device, rep)[:, None]
        scaled = torch.where(logits_PV > 0, logits_PV / rep_P1, logits_PV * rep_P1)
        logits_PV = torch.where(seen_PV, scaled, logits_PV)
    freq_P1 = _on(device, [r.params.frequency_penalty for r in rows])[:, None]
    pres_P1 = _on(device, [r.params.presence_penalty for r in rows])[:, None]
    return logits_PV - freq_P1 * counts_PV - pres_P1 * (counts_PV > 0).float()


def _filtered(logits_RV: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """top-k, then top-p on the renormalised survivors, then min-p; removed -> -inf."""
    R, V = logits_RV.shape
    device = logits_RV.device
    use_k = any(1 <= p.top_k < V for p in params)
    use_p = any(p.top_p < 1.0 for p in params)
    if use_k or use_p:
        sorted_RV, order_RV = logits_RV.sort(dim=-1, descending=True)
        if use_k:
            k_R = _on(device, [min(p.top_k, V) if p.top_k >= 1 else V for p in params], torch.long)
            rank_V = torch.arange(V, device=device)
            # By rank, not by value threshold, so ties at the k-th value keep exactly k.
            sorted_RV.masked_fill_(rank_V[None, :] >= k_R[:, None], float("-inf"))
        if use_p:
            probs_RV = torch.softmax(sorted_RV, dim=-1)
            before_RV = probs_RV.cumsum(dim=-1) - probs_RV  # mass strictly above each token
            # top_p == 1 rows get +inf: float error in the cumsum must not trim their tail.
            p_R = _on(device, [p.top_p if p.top_p < 1.0 else float("inf") for p in params])
            cut_RV = before_RV >= p_R[:, None]
            cut_RV[:, 0] = False  # the best token always survives (a tiny top_p underflows)
            sorted_RV.masked_fill_(cut_RV, float("-inf"))
        logits_RV = torch.empty_like(logits_RV).scatter_(1, order_RV, sorted_RV)
    if any(p.min_p > 0.0 for p in params):
        probs_RV = torch.softmax(logits_RV, dim=-1)
        min_p_R = _on(device, [p.min_p for p in params])
        floor_R1 = probs_RV.max(dim=-1, keepdim=True).values * min_p_R[:, None]
        logits_RV = logits_RV.masked_fill(probs_RV < floor_R1, float("-inf"))
    return logits_RV


def _row_seed(seed: int, step: int) -> int:
    """A well-mixed 64-bit seed from (request seed, output position) (splitmix64)."""
    x = (seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)
