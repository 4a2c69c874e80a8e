"""Offline generation throughput: moeserve's engine vs transformers generate() on one checkpoint.

N prompts of --input-len random tokens each generate exactly --output-len tokens (greedy,
EOS ignored). moeserve gets all N at once (continuous batching); transformers gets them as
one padded batch (its fastest mode) and, with --hf-sequential, one by one as well. Prints a
table and writes JSON.

    python benchmarks/offline_throughput.py --synthetic small --num-prompts 16
    python benchmarks/offline_throughput.py --model /path/to/ckpt --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeserve import LLM, SamplingParams  # noqa: E402

SYNTHETIC = {
    # A small Mixtral-shaped model: overhead matters as much as FLOPs on a CPU.
    "small": dict(
        vocab_size=8192, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=2048,
    ),
    # Mixtral-8x7B cut to 4 layers (12.1 GB in bf16): the GPU reference shape.
    "mixtral-4l": dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4,
        num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=4096, rope_theta=1e6,
    ),
    "tiny": dict(
        vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=1024,
    ),
}


def synthetic_checkpoint(name: str, dtype: torch.dtype) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    path = Path(tempfile.mkdtemp(prefix=f"moeserve-bench-{name}-"))
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # initialising GBs of random weights is slow on a CPU
        model = MixtralForCausalLM(MixtralConfig(**SYNTHETIC[name])).to(dtype)
    model.save_pretrained(path)
    del model
    _free()
    return path


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def lengths(n: int, spec: str, seed: int) -> list[int]:
    """'64' -> all 64; '16:256' -> uniform in [16, 256] (seeded)."""
    lo, _, hi = spec.partition(":")
    if not hi:
        return [int(lo)] * n
    g = torch.Generator().manual_seed(seed)
    return torch.randint(int(lo), int(hi) + 1, (n,), generator=g).tolist()


def prompts(in_lens: list[int], vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, vocab - 1, (n,), generator=g).tolist() for n in in_lens]


def run_moeserve(path: Path, ps: list[list[int]], outs_len: list[int],
                 args: argparse.Namespace) -> dict:
    longest = max(len(p) + o for p, o in zip(ps, outs_len))
    llm = LLM(path, dtype=args.dtype, device=args.device, progress=False,
              max_num_seqs=args.concurrency, max_model_len=longest + 16)
    params = [SamplingParams(max_tokens=o, temperature=0.0, ignore_eos=True) for o in outs_len]
    llm.generate(ps[:2], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
    _sync(args.device)
    t0 = time.perf_counter()
    outs = llm.generate(ps, params)
    _sync(args.device)
    dt = time.perf_counter() - t0
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    del llm
    _free()
    return dict(seconds=dt, generated=generated, tokens_per_s=generated / dt,
                first_tokens=[o.outputs[0].token_ids[:8] for o in outs])


def run_transformers(path: Path, ps: list[list[int]], outs_len: list[int],
                     args: argparse.Namespace, batch: int) -> dict:
    """Static batches of `batch` prompts, left-padded; each batch runs until its longest
    output is done, and only the tokens each request asked for count."""
    from transformers import AutoModelForCausalLM

    dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[args.dtype]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()

    def generate(chunk: list[list[int]], new: int) -> torch.Tensor:
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(c)) + c for c in chunk], device=args.device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk],
                            device=args.device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=0)
        return out[:, width:]

    generate(ps[:1], 4)  # warm-up
    _sync(args.device)
    t0 = time.perf_counter()
    firsts = []
    for i in range(0, len(ps), batch):
        out = generate(ps[i : i + batch], max(outs_len[i : i + batch]))
        firsts += out[:, :8].tolist()
    _sync(args.device)
    dt = time.perf_counter() - t0
    generated = sum(outs_len)
    return dict(seconds=dt, generated=generated, tokens_per_s=generated / dt, first_tokens=firsts)


def _sync(device: str | None) -> None:
    if device and device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path)
    src.add_argument("--synthetic", choices=sorted(SYNTHETIC))
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--concurrency", type=int, default=16,
                    help="moeserve max_num_seqs and transformers' static batch size")
    ap.add_argument("--input-len", default="64", help="N, or LO:HI for uniform random lengths")
    ap.add_argument("--output-len", default="64", help="N, or LO:HI for uniform random lengths")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--hf-sequential", action="store_true",
                    help="also time transformers one prompt at a time")
    ap.add_argument("--json", type=Path, default=Path("bench_out/offline_throughput.json"))
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    path = args.model or synthetic_checkpoint(args.synthetic, dtype)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(path).vocab_size
    ps = prompts(lengths(args.num_prompts, args.input_len, 1), vocab)
    outs_len = lengths(args.num_prompts, args.output_len, 2)
    results = {"moeserve": run_moeserve(path, ps, outs_len, args)}
    _free()
    results["transformers (batched)"] = run_transformers(path, ps, outs_len, args,
                                                         args.concurrency)
    _free()
    if args.hf_sequential:
        results["transformers (sequential)"] = run_transformers(path, ps, outs_len, args, 1)
    base = results["transformers (batched)"]["tokens_per_s"]
    on_cuda = args.device.startswith("cuda")
    device = torch.cuda.get_device_name() if on_cuda else platform.processor() or "cpu"
    print(f"\n{args.num_prompts} prompts x {args.input_len} in -> {args.output_len} out, "
          f"concurrency {args.concurrency}, "
          f"{args.device} ({device}, {torch.get_num_threads()} threads), model {path}")
    print(f"{'engine':<28}{'seconds':>10}{'tokens/s':>12}{'vs HF batched':>15}")
    for name, r in results.items():
        print(f"{name:<28}{r['seconds']:>10.2f}{r['tokens_per_s']:>12.1f}"
              f"{r['tokens_per_s'] / base:>14.2f}x")
    # Random bf16 weights give near-tied logits, where the two can legitimately part ways.
    pairs = zip(results["moeserve"]["first_tokens"],
                results["transformers (batched)"]["first_tokens"])
    same = sum(a == b[: len(a)] for a, b in pairs)
    print(f"requests whose first 8 greedy tokens equal transformers': {same}/{len(ps)}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(dict(
        args={k: str(v) for k, v in vars(args).items()}, device=device, results=results,
        identical_first_tokens=same, date=time.strftime("%Y-%m-%d"),
    ), indent=2))


if __name__ == "__main__":
    main()
