"""Every Triton kernel compiles for an H100/H200 (sm_90), on a machine without a GPU.

The CPU suite runs the kernels under Triton's interpreter, which executes their Python and
misses what only the compiler checks (a helper returning an int32 on one path and an int64 on
another compiled under the interpreter and failed on the H200). Here the kernel wrappers are
called on small bf16 inputs under the interpreter with every launch recorded (kernel, argument
types, constexprs, warps), and a subprocess without the interpreter compiles each distinct
launch to a cubin for sm_90 (triton.compile: its own ptxas, no driver needed).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_TYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.uint8: "u8",
    torch.bool: "i1",
    torch.float8_e4m3fn: "fp8e4nv",
}
_OPTIONS = ("num_warps", "num_stages")


def _describe(fn: Any, args: tuple, kwargs: dict) -> dict[str, Any]:
    """A launch as JSON: the kernel's module and name, its signature types and constexprs."""
    params = list(fn.arg_names)
    values = dict(zip(params, args)) | {k: v for k, v in kwargs.items() if k in params}
    annotations = {p.name: str(p.annotation) for p in inspect.signature(fn.fn).parameters.values()}
    signature, constexprs = {}, {}
    for name in params:
        value = values[name]
        if "constexpr" in annotations.get(name, ""):
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise AssertionError(f"{fn.fn.__name__}: argument {name} = {value!r}")
    options = {k: kwargs[k] for k in _OPTIONS if k in kwargs}
    return dict(
        module=fn.fn.__module__,
        name=fn.fn.__name__,
        signature=signature,
        constexprs=constexprs,
        options=options,
    )


def _drive() -> None:
    """Each wrapper on small bf16 inputs, in the variants the model takes."""
    from moeserve.kernels import fused_moe as fm
    from moeserve.kernels import (
        linear,
        mla_attention,
        mla_rows,
        moe_gemv_plan,
        moe_routing,
        norm_rope,
        tokens,
    )
    from moeserve.kernels import paged_attention as pa
    from moeserve.kernels.moe_gemv_plan import SharedExpert

    g = torch.Generator().manual_seed(0)
    bf = torch.bfloat16

    def rand(*shape: int, dtype: torch.dtype = bf) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    T, E, K, D, F = 3, 4, 2, 32, 48
    x, w1, w2 = rand(T, D), rand(E, 2 * F, D), rand(E, D, F)
    weights, experts = torch.rand(T, K, generator=g), torch.randint(0, E, (T, K), generator=g)
    b1, b2, slots = rand(E, 2 * F), rand(E, D), torch.arange(E, dtype=torch.int32)
    clamped = ("clamped_swiglu", 1.702, 7.0)
    for gemv in (True, False):
        for split in (None, 2):
            fm.fused_moe(
                x, w1, w2, weights, experts, gemv=gemv, split_k=split if not gemv else None
            )
        fm.fused_moe(
            x, w1, w2, weights, experts, gemv=gemv, expert_slot_E=slots, b_gate_up_EF=b1,
            b_down_ED=b2, activation=clamped, residual_TD=rand(T, D),
        )  # fmt: skip
    # One token with a shared expert twice as wide as a routed one (DeepSeek), in slots;
    # then with the sum over k in the down GEMV, and also with biases and the residual.
    shared = SharedExpert(rand(4 * F, D), rand(D, 2 * F))
    for in_down in (0, 4):
        moe_gemv_plan.SUM_IN_DOWN_MAX_TOKENS, was = in_down, moe_gemv_plan.SUM_IN_DOWN_MAX_TOKENS
        try:
            fm.fused_moe(
                x[:1], w1, w2, weights[:1], experts[:1], gemv=True, expert_slot_E=slots,
                residual_TD=rand(1, D), shared=shared,
            )  # fmt: skip
            if in_down:
                fm.fused_moe(x, w1, w2, weights, experts, gemv=True)
                _drive_quantized(rand)  # fp8 and mxfp4 down GEMVs with the sum in them
                fm.fused_moe(
                    x, w1, w2, weights, experts, gemv=True, expert_slot_E=slots,
                    b_gate_up_EF=b1, b_down_ED=b2, activation=clamped, residual_TD=rand(T, D),
                    extra_TD=rand(T, D),
                )  # fmt: skip
        finally:
            moe_gemv_plan.SUM_IN_DOWN_MAX_TOKENS = was
    _drive_quantized(rand)
    moe_routing.route_and_align(rand(T, E, dtype=torch.float32), K, True, 16)
    moe_routing.route_and_align(
        rand(T, E, dtype=torch.float32), K, True, 16, sigmoid=True,
        bias_E=torch.zeros(E), groups=(2, 1, True), scale=2.5,
        counts_E=torch.zeros(E, dtype=torch.int64),
    )  # fmt: skip
    linear.linear_partials(rand(T, D), rand(40, D), rand(40))
    # One row: the GEMV, on the model dtype and on a float32 router.
    linear.linear_partials(rand(1, D), rand(40, D), rand(40))
    linear.linear_partials(rand(1, D), rand(8, D, dtype=torch.float32))
    # One row with the input RMSNorm inside the GEMV (bf16 and FP8 weights).
    linear.linear_partials(rand(1, D), rand(40, D), norm=(rand(D), 1e-6))
    # The partials' sum in one kernel (reduce_partials takes it on the GPU), to bf16.
    linear.sum_partials(linear.linear_partials(rand(1, D), rand(40, D)), torch.bfloat16)
    from moeserve.kernels.quant import quantize_fp8_rows

    w8, s8 = quantize_fp8_rows(rand(40, 160))
    for rows in (1, T):  # one row: the FP8 GEMV; more: the dequantizing dot
        linear.linear_partials(rand(rows, 160), w8, rand(40), w_scale=s8)
    linear.linear_partials(rand(1, 160), w8, w_scale=s8, norm=(rand(160), 1e-6))
    norm_rope.rms_norm(rand(T, D), rand(D), 1e-6)
    norm_rope.add_rms_norm(
        rand(T, D), linear.linear_partials(rand(T, D), rand(D, D)), rand(D), 1e-6
    )
    # With the MoE router's logits, bf16 and float32 routers (one with a bias).
    for router in ((rand(40, D), rand(40)), (rand(8, D, dtype=torch.float32), None)):
        norm_rope.add_rms_norm(
            rand(1, D), linear.linear_partials(rand(1, D), rand(D, D)), rand(D), 1e-6, router
        )
    H, G, X, S, N = 4, 2, 16, 4, 144
    cos, sin = rand(T, X), rand(T, X)
    norm_rope.apply_rotary_(rand(T, H, X), rand(T, G, X), cos, sin)
    kc, vc = rand(N, S, G, X), rand(N, S, G, X)
    slots_T = torch.arange(T)
    norm_rope.apply_rotary_(
        rand(T, H, X), rand(T, G, X), cos[:, :8], sin[:, :8], (rand(T, G, X), kc, vc, slots_T)
    )
    qkv = torch.randn(2, T, (H + 2 * G) * X, generator=g)
    norm_rope.rotary_from_partials(qkv, H, G, cos, sin, (kc, vc, slots_T), bf)
    # Per-head q/k norms first (Qwen3), on the full and on a partial rotary.
    norm = (rand(X), rand(X), 1e-6)
    norm_rope.rotary_from_partials(qkv, H, G, cos, sin, (kc, vc, slots_T), bf, None, norm)
    norm_rope.apply_rotary_(
        rand(T, H, X), rand(T, G, X), cos[:, :8], sin[:, :8], (rand(T, G, X), kc, vc, slots_T),
        None, norm,
    )  # fmt: skip
    # 270 positions: more than one partition, so the merge kernel runs too.
    tables, lens = torch.randperm(N).view(2, 72), torch.tensor([5, 270])
    for merge in (0, 1):  # the merge kernel, then the merge in the last program
        pa.MERGE_IN_LAST, was = merge, pa.MERGE_IN_LAST
        try:
            for kw in ({}, {"window": 4}, {"chunk": 8}, {"sinks_H": rand(H, dtype=torch.float32)}):
                pa.paged_decode_attention(rand(2, H, X), kc, vc, tables, lens, 0.25, **kw)
        finally:
            pa.MERGE_IN_LAST = was
    # The queries rotated in the partition programs from qkv partials (two splits), with and
    # without per-head q/k norms, cos/sin from a table by position and as rows.
    qkv2 = torch.randn(2, 2, (H + 2 * G) * X, generator=g)
    pos2, slots2 = lens - 1, torch.tensor([3, 200])
    for qk in (None, norm):
        for cs in ((cos, sin, None), (rand(300, X), rand(300, X), pos2)):
            rope = pa.RopeFromQKV(qkv2, cs[0][:2], cs[1][:2], cs[2], slots2, qk)
            if cs[2] is not None:
                rope = rope._replace(cos=cs[0], sin=cs[1])
            out = rand(2, H, X)
            pa.paged_decode_attention(out, kc, vc, tables, lens, 0.25, out_BHX=out, rope=rope)
    latent = rand(N, S, 1, 24 + 8)
    mla_attention.mla_decode_attention(rand(2, 16, 24 + 8), latent, tables, lens, 0.2, 24)
    mla_rows.write_latent_rows(rand(T, 24 + 8), rand(24), 1e-6, latent, slots_T)
    w_k = rand(4, 16 + 12, 24)[:, :16]  # kv_b's key half as the layer views it
    qkv_a = torch.randn(2, T, 4 * (16 + 8) + 24 + 8, generator=g)
    mla_rows.decode_inputs(qkv_a, w_k, rand(24), 1e-6, cos[:, :8], sin[:, :8], slots_T,
                                latent, slots_T)  # fmt: skip
    mla_rows.decode_inputs(qkv_a, w_k, rand(24), 1e-6, cos[:, :8], sin[:, :8], None, latent,
                                slots_T)  # fmt: skip
    # A latent wider than one block of columns: the branches' tiles differ in shape.
    wide = rand(N, S, 1, 96 + 8)
    qkv_a = torch.randn(2, T, 4 * (16 + 8) + 96 + 8, generator=g)
    mla_rows.decode_inputs(qkv_a, rand(4, 16, 96), rand(96), 1e-6, cos[:, :8], sin[:, :8],
                           None, wide, slots_T)  # fmt: skip
    mla_rows.value_heads(rand(T, 4, 24), rand(4, 16 + 12, 24)[:, 16:])
    tokens.argmax_rows(rand(2, 50, dtype=torch.float32))
    tokens.feed_ids(torch.arange(4), torch.tensor([-1, 0, -1, 1]), torch.tensor([7, 9]))
    _drive_expert_fetch(rand)


def _drive_expert_fetch(rand: Any) -> None:
    """The in-graph expert cache: two resident experts of four, a call that misses two."""
    from moeserve.kernels import expert_fetch as ef

    E, M = 4, 2
    host = [ef.byte_rows(rand(E, 64)), ef.byte_rows(rand(E, 8, dtype=torch.float32))]
    pool = [ef.byte_rows(torch.zeros(4, 64, dtype=torch.bfloat16)), ef.byte_rows(torch.zeros(4, 8))]
    slot = torch.tensor([0, 1, -1, -1], dtype=torch.int32)
    staging = torch.tensor([2, 3], dtype=torch.int32)
    i32 = dict(dtype=torch.int32)
    out = (torch.zeros(E, **i32), torch.zeros(M, **i32), torch.zeros(E, **i32))
    ef.resolve(torch.tensor([0, 2, 3, 4]), slot, staging, list(zip(host, pool)), out)
    state = (slot, torch.zeros(E, **i32), torch.zeros(1, **i32), torch.zeros(3, dtype=torch.int64))
    ef.adopt(out[2], out[1], state, staging)


def _drive_quantized(rand: Any) -> None:
    """fused_moe on fp8 and mxfp4 expert weights: GEMVs, grouped GEMMs (split or not, slots,
    biases) and, for fp8, the FP8 tensor-core GEMMs (BLOCK_K 128, as on the GPU)."""
    from moeserve.kernels import fused_moe as fm
    from moeserve.kernels import moe_gemm
    from moeserve.kernels.moe_gemv_plan import SharedExpert
    from moeserve.kernels.quant import quantize_fp8_rows, quantize_mxfp4

    T, E, K, D, F = 3, 4, 2, 160, 96
    x, weights = rand(T, D), torch.rand(T, K)
    experts = torch.randint(0, E, (T, K))
    slots, b1, b2 = torch.arange(E, dtype=torch.int32), rand(E, 2 * F), rand(E, D)
    for quant, fn in (("fp8", quantize_fp8_rows), ("mxfp4", quantize_mxfp4)):
        (w1, s1), (w2, s2) = fn(rand(E, 2 * F, D)), fn(rand(E, D, F))
        q = dict(w_gate_up_scale=s1, w_down_scale=s2, quant=quant)
        for gemv in (True, False):
            fm.fused_moe(x, w1, w2, weights, experts, gemv=gemv, **q)
            fm.fused_moe(
                x, w1, w2, weights, experts, gemv=gemv, expert_slot_E=slots, b_gate_up_EF=b1,
                b_down_ED=b2, residual_TD=rand(T, D), **q,
            )  # fmt: skip
        fm.fused_moe(x, w1, w2, weights, experts, split_k=2, **q)
        if quant == "fp8":  # an FP8 shared expert beside FP8 experts
            (sw1, ss1), (sw2, ss2) = fn(rand(2 * F, D)), fn(rand(D, F))
            shared = SharedExpert(sw1, sw2, ss1, ss2)
            fm.fused_moe(x[:1], w1, w2, weights[:1], experts[:1], gemv=True, shared=shared, **q)
        # GPU tile sizes: fp8 K tiles wider than a scale group (one scale per element);
        # mxfp4's are one group (two dots on the nibble halves)
        cfg = moe_gemm.gemm_config(T, E, K, D, F, torch.bfloat16)
        cfg |= dict(BLOCK_K=64 if quant == "fp8" else 32)
        align = fm.moe_align(experts, E, cfg["BLOCK_M"])
        out = torch.zeros(T * K, D, dtype=torch.bfloat16)
        moe_gemm.moe_gemm(rand(T * K, F), w2, out, None, *align, None, 1, cfg, b_scale=s2,
                          quant=quant)  # fmt: skip
        if quant == "fp8":
            fm.fused_moe(x, w1, w2, weights, experts, gemv=False, fp8_dot=True, **q)
            cfg |= dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=3)
            align = fm.moe_align(experts, E, 64)
            a, a_scale = fm.quantize_fp8_act(rand(T * K, F))
            moe_gemm.moe_gemm(a, w2, out, None, *align, None, 1, cfg, b_scale=s2, quant=quant,
                              a_scale=a_scale)  # fmt: skip


def _kernel_modules() -> list[Any]:
    import importlib
    import pkgutil

    import moeserve.kernels as package

    return [
        importlib.import_module(f"moeserve.kernels.{m.name}")
        for m in pkgutil.iter_modules(package.__path__)
    ]


_COMPILE = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
failed = []
for launch in json.load(sys.stdin):
    fn = getattr(importlib.import_module(launch["module"]), launch["name"])
    src = ASTSource(fn=fn, signature=launch["signature"], constexprs=launch["constexprs"])
    try:
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options=launch["options"])
    except Exception as e:
        failed.append(f"{launch['name']} {launch['constexprs']}: {type(e).__name__}: {e}"[:2000])
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90(monkeypatch: pytest.MonkeyPatch) -> None:
    launches: dict[str, dict[str, Any]] = {}
    run = InterpretedFunction.run

    def record(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> Any:
        launch = _describe(self, args, kwargs)
        launches[json.dumps(launch, sort_keys=True, default=str)] = launch
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", record)
    _drive()
    # Every kernel of the package launched at least once (a new one needs a call above).
    kernels = {
        f"{obj.fn.__module__}.{name}"
        for module in _kernel_modules()
        for name, obj in vars(module).items()
        if isinstance(obj, InterpretedFunction) and name.endswith("_kernel")
    }
    launched = {f"{launch['module']}.{launch['name']}" for launch in launches.values()}
    assert kernels <= launched, sorted(kernels - launched)
    # The interpreter runs the portable mxfp4 decode; the GPU takes the PTX one (PACKED).
    packed = [
        launch | dict(constexprs=launch["constexprs"] | dict(PACKED=True))
        for launch in launches.values()
        if launch["constexprs"].get("PACKED") is False and launch["constexprs"]["QUANT"] == 2
    ]
    assert packed, "no mxfp4 launch recorded"
    launches |= {json.dumps(launch, sort_keys=True, default=str): launch for launch in packed}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    env["MOESERVE_PDL"] = "force"  # compile the kernels' grid-dependency waits too
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE],
        input=json.dumps(list(launches.values()), default=str),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]


_SASS = """
import inspect, json, os, re, subprocess, sys, tempfile
import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moeserve.kernels import moe_gemm as mg
from moeserve.kernels import moe_gemv as mv

# gpt-oss-120b's experts (K = 2880: 90 groups) as the JIT specializes them: pointers and the
# integers that are multiples of 16 marked divisible by 16, the unit strides constants.
D = F = 2880
_PTR_TYPES = {"w_ptr": "*u8", "s_ptr": "*u8", "sw_ptr": "*u8", "ss_ptr": "*u8", "b_ptr": "*u8",
              "b_scale_ptr": "*u8", "experts_ptr": "*i32", "slot_ptr": "*i32",
              "sorted_ids_ptr": "*i32", "block_expert_ptr": "*i32", "num_post_pad_ptr": "*i32",
              "expert_slot_ptr": "*i32", "out_ptr": "*fp32", "a_scale_ptr": "*fp32"}
_UNIT = {"stride_sk": 1, "stride_ak": 1, "stride_bk": 1, "stride_cn": 1, "stride_bsk": 1}
_ODD = ("R", "S", "PIECE", "P", "num_assignments", "num_experts", "stride_sn", "stride_ssn",
        "stride_bsn")
gemv = dict(QUANT=2, GROUP=32, PACKED=True, HALF=True, SHARED=0, HAS_SLOT=False, ROWS_PER_X=4,
            HAS_BIAS=True, CLAMPED=True, EVEN_N=True, stride_wn=D // 2, stride_sn=D // 32)
gemm = mg.gemm_config(64, 128, 4, 2 * F, D, torch.bfloat16, "mxfp4") | dict(BLOCK_K=32)


def loop_body(sass):
    # the longest backward branch's body: the K loop
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines)
              if (m := re.match(r"^[.](L_x_[0-9]+):", line))}
    spans = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"BRA `[(][.](L_x_[0-9]+)[)]", line))
             and labels.get(m.group(1), i) < i]
    first, last = max(spans, key=lambda s: s[1] - s[0])
    return "\\n".join(lines[first:last + 1])


report = {}
up_cfg = mv.gemv_config(F, D, "mxfp4", half=True)
down_cfg = mv.gemv_config(D, F, "mxfp4", rows=4, half=True)
for name, fn, consts, warps in (
    ("gemv gate_up", mv._gate_up_act_kernel, gemv | up_cfg, up_cfg),
    ("gemv down", mv._down_kernel, gemv | down_cfg, down_cfg),
    ("gemm", mg._moe_gemm_kernel, dict(QUANT=2, GROUP=32, PACKED=True,
     FP8_DOT=False, ROWS_PER_A=4, MUL_ROUTED_WEIGHT=False, HAS_EXPERT_SLOT=False,
     HAS_BIAS=False, DOT_PRECISION="ieee") | gemm, gemm),
):
    consts = dict(consts, LOOP_STAGES=consts.get("loop_stages", 1), **_UNIT)
    block_n = consts.get("BLOCK_N")
    warps = warps["num_warps"]
    params = list(inspect.signature(fn.fn).parameters.values())
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    sig, attrs = {}, {}
    for i, p in enumerate(params):
        if p.name in consts:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            sig[p.name] = _PTR_TYPES.get(p.name, "*bf16")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[p.name] = "fp32" if p.name in ("alpha", "limit", "x_scale") else "i32"
            if p.name not in _ODD:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    options = dict(num_warps=warps, num_stages=consts.get("num_stages", 3))
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    path = os.path.join(tempfile.mkdtemp(), "k.cubin")
    with open(path, "wb") as f:
        f.write(kernel.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/nvdisasm")
    sass = subprocess.run([tool, "-c", path], capture_output=True, text=True, check=True).stdout
    body = loop_body(sass)
    report[name] = dict(block_n=block_n,
                        bytes=len(re.findall(r"LDG(?:STS)?[.]E[.]U8", sass)),
                        async_=len(re.findall(r"LDGSTS[.]E", sass)),
                        loop_stores=len(re.findall(r"\\bSTS", body)))
print(json.dumps(report))
"""


@pytest.mark.slow
def test_mxfp4_kernels_load_words_and_keep_activations_in_registers() -> None:
    """The MXFP4 expert kernels' weight bytes load as vectors, not one byte per load: a
    per-byte mask (K as a stride-2 comparison) once compiled each thread's weight bytes into
    a load each, and the decode, ALU-bound already, waited on them. The GEMVs' byte loads left
    are the E8M0 scales (a row's word takes its group's: one load per row, gate and up rows
    apart), and their K loops store nothing to shared memory: the activations load in the
    weights' own register layout (mxfp4.x_pairs), where they once went through shared
    memory and a barrier every K tile. The grouped GEMM's weight and activation tiles go
    through cp.async (none did before)."""
    nvdisasm = Path(triton.__file__).parent / "backends/nvidia/bin/nvdisasm"
    if not nvdisasm.exists():
        pytest.skip("this Triton ships no nvdisasm")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", _SASS], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    up, down = got["gemv gate_up"], got["gemv down"]
    assert up["bytes"] == 2 * up["block_n"] and down["bytes"] == down["block_n"], got
    assert up["loop_stores"] == 0 and down["loop_stores"] == 0, got
    assert got["gemm"]["async_"] >= 2, got
