"""GPU speed of the decode and prefill paths, against the physical floors and transformers.

One run on a CUDA machine measures, on a Mixtral-8x7B shape cut to --layers layers (bf16,
random weights: moeserve's --load-format dummy, transformers' random init):
- the floors: device copy bandwidth (read + write) and the bf16 matmul rate;
- transformers generate() decode rate at batch 1 and --batch;
- moeserve's decode rate at batch 1 and --batch (steady decode steps, wall clock between
  steps, host work included) in the modes --modes names: graphs (Triton kernels + CUDA graphs
  + async scheduling: the default), graphs-sync (the same, each step's tokens read before the
  next is queued), eager (Triton kernels, no graphs) and torch (the readable path);
- prefill of --prefill-len-token prompts (one per step) as a fraction of the matmul rate.
Prints a table (tokens/s, fraction of floor, ratio to transformers) and writes JSON.

    python benchmarks/gpu_speed.py --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeserve import LLM, SamplingParams  # noqa: E402

MIXTRAL = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
    max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5,
)  # fmt: skip


def config_dir(layers: int) -> Path:
    from transformers import MixtralConfig

    path = Path(tempfile.mkdtemp(prefix="moeserve-gpu-speed-"))
    MixtralConfig(num_hidden_layers=layers, **MIXTRAL).save_pretrained(path)
    return path


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def _time_cuda(fn: Any, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def _copy_s() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return _time_cuda(lambda: dst.copy_(src), 20)


def _matmul_s() -> float:
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    return _time_cuda(lambda: a @ b, 20)


def floors() -> dict[str, float]:
    copy_s, mm_s = _copy_s(), _matmul_s()
    _free()
    return {"hbm_bytes_per_s": 2 * 2**30 / copy_s, "matmul_flops_per_s": 2 * 8192**3 / mm_s}


def model_bytes(layers: int) -> dict[str, float]:
    c = MIXTRAL
    d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    x = d // c["num_attention_heads"]
    attn = d * (c["num_attention_heads"] * x + 2 * c["num_key_value_heads"] * x) + d * d
    router = c["num_local_experts"] * d
    expert = 3 * d * f
    return {
        "dense_params": layers * (attn + router + 2 * d) + v * d + d,  # lm_head; embed: 1 row
        "expert_params": expert,
        "attn_params": attn,
        "router_params": router,
    }


def decode_floor_s(layers: int, batch: int, ctx: int, bw: float) -> float:
    """Seconds per decode step: weights read (experts touched under uniform routing) + KV."""
    p = model_bytes(layers)
    e, k = MIXTRAL["num_local_experts"], MIXTRAL["num_experts_per_tok"]
    touched = e * (1 - (1 - k / e) ** batch)
    kv = 2 * layers * MIXTRAL["num_key_value_heads"] * 128 * ctx * batch
    return (2 * (p["dense_params"] + layers * touched * p["expert_params"]) + 2 * kv) / bw


def prefill_flops(layers: int, tokens: int) -> float:
    p = model_bytes(layers)
    k = MIXTRAL["num_experts_per_tok"]
    linear = 2 * tokens * layers * (p["attn_params"] + p["router_params"] + k * p["expert_params"])
    attn = layers * 2 * MIXTRAL["num_attention_heads"] * 128 * tokens * tokens  # causal half
    return linear + attn


# ------------------------------------------------------------------------------- transformers
def hf_decode(path: Path, batch: int, new: int) -> float:
    """generate() decode tokens/s: the difference between `new` and 2 new tokens."""
    from transformers import AutoConfig, MixtralForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = MixtralForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    ids = torch.randint(0, 32000, (batch, 128), device="cuda")

    def gen(n: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)  # fmt: skip
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    gen(2)
    return batch * (new - 2) / (gen(new) - gen(2))


# ---------------------------------------------------------------------------------- moeserve
def make_llm(path: Path, max_seqs: int, **kw: Any) -> LLM:
    return LLM(
        str(path), dtype="bfloat16", load_format="dummy", kv_cache_memory=16 * 2**30,
        max_num_seqs=max_seqs, max_model_len=8192, max_num_batched_tokens=4096,
        progress=False, **kw,
    )  # fmt: skip


def ms_decode(llm: LLM, batch: int, in_len: int, out_len: int) -> dict[str, float]:
    """Steady decode: wall time between consecutive steps in which all `batch` seqs decode."""
    eng = llm.engine
    g = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        prompt = torch.randint(0, 32000, (in_len,), generator=g).tolist()
        eng.add_request(f"d{batch}-{i}", prompt, params)
    last = None
    tokens, seconds, steps = 0, 0.0, 0
    while eng.has_unfinished():
        res = eng.step()
        now = time.perf_counter()
        st = res.stats
        steady = st is not None and st.num_prefill_tokens == 0 and st.num_seqs == batch
        if steady and last is not None:
            tokens += st.num_decode_tokens
            seconds += now - last
            steps += 1
        last = now
    return {"tokens_per_s": tokens / seconds, "step_ms": 1e3 * seconds / steps, "steps": steps}


def ms_prefill(llm: LLM, prompt_len: int, n: int) -> dict[str, float]:
    eng = llm.engine
    g = torch.Generator().manual_seed(7)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for i in range(n):
        prompt = torch.randint(0, 32000, (prompt_len,), generator=g).tolist()
        eng.add_request(f"p{i}", prompt, params)
    # One prompt per step: the time between consecutive steps' results is one prefill (with
    # async scheduling a step's result comes one step() later, so no single call is timed).
    done = []
    torch.cuda.synchronize()
    while eng.has_unfinished():
        res = eng.step()
        if res.stats is not None and res.stats.num_prefill_tokens == prompt_len:
            done.append(time.perf_counter())
    times = [b - a for a, b in zip(done, done[1:])]
    times = times[1:] or times  # the first pays one-off allocations
    return {"seconds": sum(times) / len(times), "steps": len(times)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--prefill-len", type=int, default=4096)
    ap.add_argument("--modes", default="graphs,eager,torch")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    L = args.layers
    path = config_dir(L)
    fl = floors()
    bw, mm = fl["hbm_bytes_per_s"], fl["matmul_flops_per_s"]
    print(f"device {torch.cuda.get_device_name()}: copy {bw / 1e12:.2f} TB/s, "
          f"bf16 matmul {mm / 1e12:.0f} TFLOP/s")  # fmt: skip
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "floors": fl,
        "args": vars(args) | {"json": str(args.json)},
    }  # fmt: skip
    hf: dict[int, float] = {}
    if not args.no_hf:
        for b, new in ((1, 34), (args.batch, 18)):
            hf[b] = hf_decode(path, b, new)
            _free()  # the model died with hf_decode's frame
            print(f"transformers b{b}: {hf[b]:.1f} tok/s")
    result["transformers"] = hf
    modes = {"graphs": {}, "graphs-sync": {"async_scheduling": False},
             "eager": {"enforce_eager": True}, "torch": {"kernels": "torch"}}  # fmt: skip
    rows = []
    for mode in args.modes.split(","):
        llm = make_llm(path, args.batch, **modes[mode])
        for b in (1, args.batch):
            r = ms_decode(llm, b, args.input_len, args.output_len)
            ctx = args.input_len + args.output_len // 2
            floor = 1.0 / decode_floor_s(L, b, ctx, bw) * b
            r |= {"mode": mode, "batch": b, "floor_tokens_per_s": floor,
                  "fraction_of_floor": r["tokens_per_s"] / floor,
                  "vs_transformers": r["tokens_per_s"] / hf[b] if b in hf else None}  # fmt: skip
            rows.append(r)
            print(f"{mode:11s} b{b:<3d} {r['tokens_per_s']:9.1f} tok/s  {r['step_ms']:7.2f} ms/step"
                  f"  {r['fraction_of_floor']:.2f} of floor {floor:.0f}"
                  + (f"  {r['vs_transformers']:.1f}x transformers" if b in hf else ""))
        if mode == args.modes.split(",")[0] and args.prefill_len:
            p = ms_prefill(llm, args.prefill_len, 5)
            flops = prefill_flops(L, args.prefill_len)
            p |= {"tokens": args.prefill_len, "flops_per_s": flops / p["seconds"],
                  "fraction_of_matmul": flops / p["seconds"] / mm, "mode": mode}  # fmt: skip
            result["prefill"] = p
            print(f"prefill {args.prefill_len} tokens: {1e3 * p['seconds']:.1f} ms, "
                  f"{p['flops_per_s'] / 1e12:.0f} TFLOP/s = "
                  f"{p['fraction_of_matmul']:.2f} of matmul")  # fmt: skip
        del llm
        _free()
    result["decode"] = rows
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
