"""Expert offloading on a GPU: tokens/s, fraction of the floor, and transformers+accelerate.

    # Mixtral-8x7B cut to 4 layers, half of each layer's experts in host memory, batch 1:
    python benchmarks/offload_bench.py --synthetic mixtral-4l --slots 4 --batch 1 --peer
    # the full Mixtral-8x7B shape (93 GB bf16, dummy weights) on one 80 GB GPU:
    python benchmarks/offload_bench.py --dummy mixtral-8x7b --batch 1 64

Floor per run (from the routing actually seen): every step reads the dense weights and the
cache-resident experts it uses from HBM, and every missed expert once over the host link:
  floor = (steps * dense_bytes + hits * expert_bytes) / HBM_bw + misses * expert_bytes / copy_bw
with both bandwidths measured in this process. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from offline_throughput import SYNTHETIC, synthetic_checkpoint  # noqa: E402

from moeserve import LLM, SamplingParams  # noqa: E402

MIXTRAL_8X7B = dict(
    model_type="mixtral", architectures=["MixtralForCausalLM"], vocab_size=32000,
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
    max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5, torch_dtype="bfloat16",
    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, sliding_window=None,
)


def bandwidths() -> tuple[float, float]:
    """(HBM read+write bytes/s of a device copy, pinned host->device bytes/s)."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    h = torch.empty(n, dtype=torch.uint8, pin_memory=True)

    def rate(fn, nbytes: int) -> float:
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        return 5 * nbytes / (time.perf_counter() - t0)

    hbm = rate(lambda: b.copy_(a), 2 * n)
    h2d = rate(lambda: a.copy_(h, non_blocking=True), n)
    return hbm, h2d


def run(llm: LLM, batch: int, in_len: int, out_len: int, hbm: float, h2d: float) -> dict:
    eng = llm.engine
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(10, eng.vocab_size - 10, (batch, in_len), generator=g).tolist()
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    before = [dict(vars(s)) for s in eng.expert_cache_stats()]
    steps0 = _steps(eng)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    after = [dict(vars(s)) for s in eng.expert_cache_stats()]
    delta = {k: sum(a[k] - b[k] for a, b in zip(after, before))
             for k in ("hits", "misses", "bytes_copied", "copy_wait_seconds", "cpu_seconds",
                       "cpu_experts", "prefetches_issued", "prefetches_used")}
    steps = _steps(eng) - steps0
    model = eng.model
    expert_bytes = 3 * model.cfg.moe_intermediate_size * model.cfg.hidden_size * 2
    routed = sum(m.w_gate_up.numel() + m.w_down.numel() for _, m in model.moe_layers()) * 2
    dense = sum(p.numel() for p in model.parameters()) * 2 - routed - model.embed_tokens.numel() * 2
    # HBM bandwidth as the design notes state it: a device copy's read+write bytes per second.
    floor = (steps * dense + delta["hits"] * expert_bytes) / hbm
    floor += delta["misses"] * expert_bytes / h2d
    if not after:
        floor = float("nan")  # nothing offloaded: no cache counters to build the floor from
    looked = delta["hits"] + delta["misses"]
    return dict(
        batch=batch, tokens=tokens, seconds=dt, tokens_per_s=tokens / dt, steps=steps,
        floor_seconds=floor, fraction_of_floor=floor / dt,
        hit_rate=delta["hits"] / looked if looked else 1.0,
        bytes_moved_per_token=delta["bytes_copied"] / tokens,
        copy_wait_s=delta["copy_wait_seconds"], cpu_s=delta["cpu_seconds"],
        compute_s=dt - delta["copy_wait_seconds"] - delta["cpu_seconds"],
        cpu_experts=delta["cpu_experts"], prefetch_issued=delta["prefetches_issued"],
        prefetch_used=delta["prefetches_used"],
    )


def _steps(eng) -> int:
    return eng.num_steps


def accelerate_peer(path: Path, offload_layers: list[int], out_len: int) -> dict:
    """transformers + accelerate, the experts of `offload_layers` on the CPU, batch 1."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    with torch.device("meta"):  # module names differ across transformers versions: ask
        names = {n for n, _ in AutoModelForCausalLM.from_config(cfg).named_modules()}
    moe = "mlp" if "model.layers.0.mlp.experts" in names else "block_sparse_moe"
    device_map: dict[str, int | str] = {"model.embed_tokens": 0, "model.norm": 0, "lm_head": 0}
    if "model.rotary_emb" in names:
        device_map["model.rotary_emb"] = 0
    for i in range(cfg.num_hidden_layers):
        if i in offload_layers:
            for part in ("self_attn", "input_layernorm", "post_attention_layernorm", f"{moe}.gate"):
                device_map[f"model.layers.{i}.{part}"] = 0
            device_map[f"model.layers.{i}.{moe}.experts"] = "cpu"
        else:
            device_map[f"model.layers.{i}"] = 0
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=device_map)
    ids = torch.randint(10, cfg.vocab_size - 10, (1, 16), device="cuda")
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=out_len, min_new_tokens=out_len, **kw)
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return dict(batch=1, tokens=out_len, seconds=dt, tokens_per_s=out_len / dt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", choices=sorted(SYNTHETIC))
    src.add_argument("--dummy", choices=["mixtral-8x7b"])
    ap.add_argument("--slots", type=int, default=None, help="expert cache slots per layer")
    ap.add_argument("--modes", default="auto,fetch,cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--input-len", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--peer", action="store_true", help="also run transformers+accelerate")
    ap.add_argument("--prefetch", action="store_true", help="turn on next-layer prefetch")
    ap.add_argument("--json", type=Path, default=Path("bench_out/offload.json"))
    args = ap.parse_args()
    hbm, h2d = bandwidths()
    if args.synthetic:
        path, fmt = synthetic_checkpoint(args.synthetic, torch.bfloat16), "safetensors"
    else:
        path, fmt = Path(tempfile.mkdtemp(prefix="moeserve-dummy-")), "dummy"
        (path / "config.json").write_text(json.dumps(MIXTRAL_8X7B))
    max_len = args.input_len + args.output_len + 16
    results: list[dict] = []
    for mode in args.modes.split(","):
        t0 = time.perf_counter()
        llm = LLM(path, dtype="bfloat16", device="cuda", load_format=fmt, offload_mode=mode,
                  expert_cache_slots=args.slots, max_model_len=max_len,
                  max_num_seqs=max(args.batch), prefetch=args.prefetch, progress=False)
        load_s = time.perf_counter() - t0
        store = llm.engine.expert_store
        slots = store.slots if store else "all"
        cost = store.cost if store else None
        print(f"[{mode}] loaded in {load_s:.0f}s, cache slots per layer: {slots}, "
              f"cost model: {cost}", flush=True)
        for batch in args.batch:
            r = run(llm, batch, args.input_len, args.output_len, hbm, h2d)
            r.update(engine="moeserve", mode=mode, slots=slots, load_seconds=load_s,
                     prefetch=args.prefetch)
            results.append(r)
            print(json.dumps(r), flush=True)
        del llm, store
        gc.collect()
        torch.cuda.empty_cache()
    if args.peer and args.synthetic:
        n_layers = SYNTHETIC[args.synthetic]["num_hidden_layers"]
        peer = accelerate_peer(path, list(range(n_layers // 2, n_layers)), min(args.output_len, 8))
        peer.update(engine="transformers+accelerate", mode=f"experts of layers "
                    f"{n_layers // 2}..{n_layers - 1} on CPU")
        results.append(peer)
        print(json.dumps(peer), flush=True)
    print(f"\nHBM copy {hbm / 1e12:.2f} TB/s (r+w), pinned host->device {h2d / 1e9:.1f} GB/s, "
          f"{torch.cuda.get_device_name()}")
    print(f"{'engine':<26}{'mode':<12}{'batch':>6}{'tok/s':>9}{'floor':>8}{'hit':>7}"
          f"{'MB/tok':>9}{'wait s':>8}{'cpu s':>7}")
    base = next((r for r in results if r["engine"] != "moeserve"), None)
    for r in results:
        nan = float("nan")
        ratio = ""
        if base is not None and r is not base and r["batch"] == 1:
            ratio = f"   {r['tokens_per_s'] / base['tokens_per_s']:.1f}x peer"
        print(f"{r['engine']:<26}{str(r['mode'])[:11]:<12}{r['batch']:>6}"
              f"{r['tokens_per_s']:>9.2f}{r.get('fraction_of_floor', nan):>8.2f}"
              f"{r.get('hit_rate', nan):>7.2f}{r.get('bytes_moved_per_token', 0) / 1e6:>9.1f}"
              f"{r.get('copy_wait_s', 0):>8.2f}{r.get('cpu_s', 0):>7.2f}{ratio}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(hbm=hbm, h2d=h2d, results=results,
                                         device=torch.cuda.get_device_name(),
                                         date=time.strftime("%Y-%m-%d")), indent=2))


if __name__ == "__main__":
    main()
