"""Quantized expert weights (fp8 rows, mxfp4) in the fused MoE kernels and their torch reference.

CPU tests run the kernels under Triton's interpreter with float32 activations against a float32
torch MoE on the dequantized weights: the kernels dequantize to the same float32 values, so
only the summation order differs (tolerance 1e-5, as tests/test_kernel_fused_moe.py). The FP8
tensor-core path quantizes the activations too; it is checked against the same reference with
the activations fake-quantized in torch. gpu-marked tests bound the bf16 error on an H200.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from moeserve.kernels import fused_moe as fused_module  # noqa: E402
from moeserve.kernels import moe_gemv  # noqa: E402
from moeserve.kernels.fused_moe import fused_moe  # noqa: E402
from moeserve.kernels.quant import (  # noqa: E402
    E2M1_VALUES,
    dequantize,
    quantize_fp8_rows,
    quantize_mxfp4,
)

CLAMPED = ("clamped_swiglu", 1.702, 7.0)
SILU = ("silu", 1.702, 7.0)
# (D, F) per format: fp8's K need not be a multiple of its 128-wide groups (partial last one)
SHAPES = {"fp8": (160, 96), "mxfp4": (64, 96)}


def quantize(w: torch.Tensor, quant: str) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_fp8_rows(w) if quant == "fp8" else quantize_mxfp4(w)


def fake_quant_fp8(a: torch.Tensor) -> torch.Tensor:
    """Activations as the FP8 tensor-core path sees them: per row and group of 128."""
    return dequantize(*quantize_fp8_rows(a), "fp8", torch.float32)


def reference(
    x_TD: torch.Tensor,
    wgu: torch.Tensor,
    wd: torch.Tensor,
    weights_TK: torch.Tensor,
    experts_TK: torch.Tensor,
    b_gu: torch.Tensor | None = None,
    b_d: torch.Tensor | None = None,
    activation: tuple[str, float, float] = SILU,
    fp8_act: bool = False,
) -> torch.Tensor:
    """The MoE in float32 torch on real-valued weights [E, 2F, D], [E, D, F], expert by
    expert (no [T, K, F, D] gather: it would not fit at prefill sizes)."""
    fq = fake_quant_fp8 if fp8_act else (lambda a: a)
    x, Fi = fq(x_TD.float()), wd.shape[2]
    kind, alpha, limit = activation
    out = torch.zeros_like(x)
    for e in experts_TK.unique().tolist():
        t, k = (experts_TK == e).nonzero(as_tuple=True)
        gu = x[t] @ wgu[e].float().T
        if b_gu is not None:
            gu = gu + b_gu[e].float()
        gate, up = gu[:, :Fi], gu[:, Fi:]
        if kind == "silu":
            h = F.silu(gate) * up
        else:
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
            h = (up + 1) * (gate * torch.sigmoid(gate * alpha))
        y = fq(h) @ wd[e].float().T
        if b_d is not None:
            y = y + b_d[e].float()
        out.index_add_(0, t, y * weights_TK[t, k, None])
    return out


def make_case(
    quant: str, T: int, E: int, K: int, seed: int, device: str = "cpu", shape: tuple = ()
) -> dict:
    """Random quantized experts, their real values, activations and routing; shape: (D, F)."""
    D, Fi = shape or SHAPES[quant]
    g = torch.Generator().manual_seed(seed)
    wgu_q, sgu = quantize(torch.randn(E, 2 * Fi, D, generator=g) / D**0.5, quant)
    wd_q, sd = quantize(torch.randn(E, D, Fi, generator=g) / Fi**0.5, quant)
    probs = torch.softmax(torch.randn(T, E, generator=g), dim=-1)
    weights, experts = torch.topk(probs, K, dim=-1)
    case = dict(
        x=torch.randn(T, D, generator=g),
        wgu_q=wgu_q,
        sgu=sgu,
        wd_q=wd_q,
        sd=sd,
        weights=weights,
        experts=experts,
        b_gu=torch.randn(E, 2 * Fi, generator=g) * 0.1,
        b_d=torch.randn(E, D, generator=g) * 0.1,
    )
    case = {k: v.to(device) for k, v in case.items()}
    case["wgu"] = dequantize(case["wgu_q"], case["sgu"], quant, torch.float32)
    case["wd"] = dequantize(case["wd_q"], case["sd"], quant, torch.float32)
    return case


def in_slots(w: torch.Tensor, slot_E: torch.Tensor, slots: int) -> torch.Tensor:
    """An expert cache of `slots` entries holding w's experts at slot_E, junk elsewhere."""
    junk = 255 if w.dtype == torch.uint8 else float("nan")  # an E8M0 255 is NaN too
    cache = torch.full((slots, *w.shape[1:]), junk, dtype=torch.float32).to(w.dtype)
    cache[slot_E] = w
    return cache


# --- the reference functions ------------------------------------------------------------------


def test_fp8_rows_roundtrip_error() -> None:
    w = torch.randn(3, 40, 300) * torch.logspace(-3, 2, 300)  # K = 300: a partial last group
    w[0, 0, :128] = 0  # an all-zero group: scale 1, no division by zero
    q, s = quantize_fp8_rows(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (3, 40, 3)
    assert s[0, 0, 0] == 1 and (q[0, 0, :128].float() == 0).all()
    back = dequantize(q, s, "fp8", torch.float32)
    # e4m3: 3 mantissa bits, so normal values round within 2**-4 relative; below its smallest
    # normal (2**-6 of the scale) the spacing is 2**-9 of the scale.
    scale = s.repeat_interleave(128, dim=-1)[..., :300]
    assert ((back - w).abs() <= 2**-4 * w.abs() + 2**-10 * scale).all()
    amax = w.view(-1, 300)[:, 256:].abs().amax(dim=-1)
    torch.testing.assert_close(s.view(-1, 3)[:, 2], amax / 448)  # the partial group's own amax


def test_mxfp4_roundtrip_is_exact_on_representable_values() -> None:
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (2, 8, 64), generator=g)
    codes[codes == 8] = 0  # -0 comes back as +0
    codes[..., ::32] = 7 + 8 * torch.randint(0, 2, (2, 8, 2), generator=g)  # a +-6 per group
    s = torch.randint(100, 150, (2, 8, 2), generator=g).to(torch.uint8)
    real = torch.tensor(E2M1_VALUES)[codes] * torch.exp2(s.float() - 127).repeat_interleave(32, -1)
    w, s2 = quantize_mxfp4(real)
    assert w.shape == (2, 8, 32) and w.dtype == torch.uint8 and torch.equal(s2, s)
    assert torch.equal(w & 0xF, codes[..., 0::2].to(torch.uint8))  # even k: low nibble
    assert torch.equal(w >> 4, codes[..., 1::2].to(torch.uint8))
    assert torch.equal(dequantize(w, s2, "mxfp4", torch.float32), real)


def test_mxfp4_rounds_to_nearest() -> None:
    x = torch.randn(4, 16, 96, generator=torch.Generator().manual_seed(1)) * 3
    x[0, 0, :32] = 0  # an all-zero group
    w, s = quantize_mxfp4(x)
    back = dequantize(w, s, "mxfp4", torch.float32)
    assert (back[0, 0, :32] == 0).all()
    groups = x.view(4, 16, 3, 32)
    amax = groups.abs().amax(-1)
    exp = torch.floor(torch.log2(amax.clamp(min=1e-30))) - 2  # the OCP MX shared exponent
    assert torch.equal(s[amax > 0].float() - 127, exp[amax > 0])
    scale = torch.exp2(s.float() - 127)[..., None]
    grid = torch.tensor(E2M1_VALUES).unique() * scale[..., None]  # [.., G, 1, 15]
    nearest = (groups[..., None] - grid).abs().amin(-1)
    err = (back.view_as(groups) - groups).abs()
    assert (err <= nearest + 1e-6 * scale).all()


def test_mxfp4_matches_transformers() -> None:
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    if not hasattr(mx, "convert_moe_packed_tensors"):
        pytest.skip("this transformers has no convert_moe_packed_tensors")
    x = torch.randn(3, 40, 128, generator=torch.Generator().manual_seed(2))
    w, s = quantize_mxfp4(x)
    # transformers' layout: blocks [E, N, K/32, 16] bytes, scales [E, N, K/32]; it returns the
    # weight transposed, [E, K, N]
    theirs = mx.convert_moe_packed_tensors(w.view(3, 40, 4, 16), s, dtype=torch.float32)
    assert torch.equal(theirs.transpose(1, 2), dequantize(w, s, "mxfp4", torch.float32))


# --- fused_moe with quantized weights (interpreter) ----------------------------------------


@pytest.mark.parametrize("quant", ["fp8", "mxfp4"])
@pytest.mark.parametrize(("T", "slots"), [(1, False), (1, True), (7, False), (9, True)])
def test_fused_quantized_matches_reference(quant: str, T: int, slots: bool) -> None:
    """T = 1 takes the GEMV kernels, T = 7, 9 the grouped GEMMs; slots: an expert cache."""
    E, K = 5, 2
    c = make_case(quant, T, E, K, seed=T + 10 * slots)
    wgu_q, sgu, wd_q, sd, slot_E = c["wgu_q"], c["sgu"], c["wd_q"], c["sd"], None
    if slots:
        slot_E = torch.tensor([3, 0, 6, 2, 5])
        wgu_q, sgu = in_slots(wgu_q, slot_E, 7), in_slots(sgu, slot_E, 7)
        wd_q, sd = in_slots(wd_q, slot_E, 7), in_slots(sd, slot_E, 7)
    got = fused_moe(
        c["x"], wgu_q, wd_q, c["weights"], c["experts"], expert_slot_E=slot_E,
        w_gate_up_scale=sgu, w_down_scale=sd, quant=quant,
    )  # fmt: skip
    want = reference(c["x"], c["wgu"], c["wd"], c["weights"], c["experts"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant", ["fp8", "mxfp4"])
@pytest.mark.parametrize("gemv", [True, False])
def test_fused_quantized_bias_clamped_residual(quant: str, gemv: bool) -> None:
    E, K, T = 4, 2, 5
    c = make_case(quant, T, E, K, seed=3)
    res = torch.randn_like(c["x"])
    got = fused_moe(
        c["x"], c["wgu_q"], c["wd_q"], c["weights"], c["experts"], gemv=gemv,
        b_gate_up_EF=c["b_gu"], b_down_ED=c["b_d"], activation=CLAMPED, residual_TD=res,
        w_gate_up_scale=c["sgu"], w_down_scale=c["sd"], quant=quant,
    )  # fmt: skip
    want = reference(
        c["x"], c["wgu"], c["wd"], c["weights"], c["experts"], c["b_gu"], c["b_d"], CLAMPED
    )
    torch.testing.assert_close(got, res + want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant", ["fp8", "mxfp4"])
def test_fused_quantized_split_k(quant: str) -> None:
    c = make_case(quant, 6, 4, 2, seed=4)
    got = fused_moe(
        c["x"], c["wgu_q"], c["wd_q"], c["weights"], c["experts"], split_k=3,
        w_gate_up_scale=c["sgu"], w_down_scale=c["sd"], quant=quant,
    )  # fmt: skip
    want = reference(c["x"], c["wgu"], c["wd"], c["weights"], c["experts"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quant", ["fp8", "mxfp4"])
def test_k_tiles_wider_than_a_scale_group(quant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """K tiles of 256 (GPU sizes): the GEMVs' tiles hold several scale groups (2 of fp8, 8 of
    mxfp4), and the down GEMV splits K in two; fp8 grouped-GEMM tiles straddle groups,
    loading a scale per element (mxfp4's grouped GEMM always takes one group a tile:
    moe_gemm asserts it)."""
    gemm_config, gemv_config = fused_module.gemm_config, moe_gemv.gemv_config

    def wide_gemm(*args: object) -> dict[str, int]:
        return gemm_config(*args) | dict(BLOCK_K=256)  # type: ignore[arg-type]

    if quant == "fp8":
        monkeypatch.setattr(fused_module, "gemm_config", wide_gemm)

    def wide_gemv(*args: object, **kw: object) -> dict[str, int]:
        # the down projection's K in two splits as well (moe_gemv's split-K partials)
        return gemv_config(*args, **kw) | dict(BLOCK_K=256, SPLIT_K=2 if kw.get("rows") else 1)  # type: ignore[arg-type]

    monkeypatch.setattr(moe_gemv, "gemv_config", wide_gemv)
    monkeypatch.setattr(fused_module, "gemv_config", wide_gemv)
    c = make_case(quant, 3, 4, 2, seed=5)
    want = reference(c["x"], c["wgu"], c["wd"], c["weights"], c["experts"])
    for gemv in (True, False):
        got = fused_moe(
            c["x"], c["wgu_q"], c["wd_q"], c["weights"], c["experts"], gemv=gemv,
            w_gate_up_scale=c["sgu"], w_down_scale=c["sd"], quant=quant,
        )  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mxfp4_gemvs_mask_a_partial_row_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 64 rows over 96 (gate/up's F and down's D): the MXFP4 GEMVs mask rows only
    when BLOCK_N does not divide them (EVEN_N false), a path the shipped tiles of real shapes
    never take; every row inside the projection still counts (on a GPU the mask also keeps
    the last block from reading past the weights)."""
    gemv_config = moe_gemv.gemv_config

    def wide_rows(*args: object, **kw: object) -> dict[str, int]:
        return gemv_config(*args, **kw) | dict(BLOCK_N=64)  # type: ignore[arg-type]

    monkeypatch.setattr(moe_gemv, "gemv_config", wide_rows)
    monkeypatch.setattr(fused_module, "gemv_config", wide_rows)
    c = make_case("mxfp4", 1, 5, 2, seed=8, shape=(96, 96))
    got = fused_moe(
        c["x"], c["wgu_q"], c["wd_q"], c["weights"], c["experts"], gemv=True,
        w_gate_up_scale=c["sgu"], w_down_scale=c["sd"], quant="mxfp4",
    )  # fmt: skip
    want = reference(c["x"], c["wgu"], c["wd"], c["weights"], c["experts"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_k", [0, 256])
def test_mxfp4_gemvs_on_bf16_activations(block_k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 activations reach the MXFP4 GEMVs as int32 pairs (mxfp4.x_pairs: no
    conversion), a path float32 activations do not take. At one token, with the interpreter's
    one-group tiles and with 256-wide ones (D = 64, F = 96: a tile's last words masked), the
    bf16 GEMVs stay within bf16's roundings of the intermediates (1.9% here, as before the
    pairs) of the float32 MoE on the dequantized weights and of the same GEMVs on float32
    activations; an even/odd mix-up costs 100%."""
    if block_k:
        gemv_config = moe_gemv.gemv_config

        def wide(*args: object, **kw: object) -> dict[str, int]:
            return gemv_config(*args, **kw) | dict(BLOCK_K=block_k)  # type: ignore[arg-type]

        monkeypatch.setattr(moe_gemv, "gemv_config", wide)
        monkeypatch.setattr(fused_module, "gemv_config", wide)
    c = make_case("mxfp4", 1, 6, 2, seed=21)
    x = c["x"].to(torch.bfloat16)
    q = dict(w_gate_up_scale=c["sgu"], w_down_scale=c["sd"], quant="mxfp4")
    rest = (c["wgu_q"], c["wd_q"], c["weights"], c["experts"])
    got = fused_moe(x, *rest, gemv=True, **q)
    assert got.dtype == torch.bfloat16
    on_float32 = fused_moe(x.float(), *rest, gemv=True, **q)
    ref = reference(x, c["wgu"], c["wd"], c["weights"], c["experts"])
    assert _rel_err(on_float32, ref) < 1e-6
    assert _rel_err(got, ref) < 0.03, _rel_err(got, ref)
    assert _rel_err(got, on_float32) < 0.03, _rel_err(got, on_float32)


@pytest.mark.parametrize(("T", "residual"), [(8, False), (70, True)])
def test_fp8_tensor_core_path(T: int, residual: bool) -> None:
    """fp8 x fp8 dots with per-token-group activation scales (the interpreter runs float8
    dots too). Against the reference with the activations fake-quantized alike: equal up to
    float32 summation order, which may flip an activation's fp8 rounding here and there (one
    fp8 step, 2**-4 relative, of one element of a sum), hence 1e-3 rather than 1e-5. T = 70
    takes the unsplit GEMM 2 that weighs rows in its epilogue."""
    c = make_case("fp8", T, 4, 2, seed=6)
    res = torch.randn_like(c["x"]) if residual else None
    got = fused_moe(
        c["x"], c["wgu_q"], c["wd_q"], c["weights"], c["experts"], gemv=False, fp8_dot=True,
        w_gate_up_scale=c["sgu"], w_down_scale=c["sd"], quant="fp8", residual_TD=res,
    )  # fmt: skip
    want = reference(c["x"], c["wgu"], c["wd"], c["weights"], c["experts"], fp8_act=True)
    torch.testing.assert_close(got - (res if residual else 0), want, rtol=1e-3, atol=1e-3)
    exact = reference(c["x"], c["wgu"], c["wd"], c["weights"], c["experts"])
    assert (got - (res if residual else 0) - exact).norm() / exact.norm() < 0.1


def test_fp8_activation_quantizer_matches_torch() -> None:
    from moeserve.kernels.moe_quant import quantize_fp8_act

    x = torch.randn(5, 300) * torch.logspace(-2, 2, 300)
    x[1, 128:256] = 0
    q, s = quantize_fp8_act(x)
    q_ref, s_ref = quantize_fp8_rows(x)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    assert torch.equal(q.float(), q_ref.float())


def test_bad_format_is_rejected() -> None:
    c = make_case("fp8", 2, 4, 2, seed=7)
    with pytest.raises(ValueError, match="int4"):
        fused_moe(
            c["x"], c["wgu_q"], c["wd_q"], c["weights"], c["experts"],
            w_gate_up_scale=c["sgu"], w_down_scale=c["sd"], quant="int4",
        )  # fmt: skip


# --- GPU ---------------------------------------------------------------------------------------


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref).norm() / ref.norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("quant", ["fp8", "mxfp4"])
@pytest.mark.parametrize("T", [1, 4, 64, 512, 4096])
def test_gpu_quantized_bf16_accuracy(quant: str, T: int) -> None:
    """bf16 activations, quantized weights, against the float32 MoE on the dequantized weights
    (so the weights' own quantization error is not counted). F = 1440: fp8's last scale group
    is partial. Bounds (relative Frobenius error):
    - weight-only dequantization (GEMVs at T <= 1, grouped GEMMs below T = 64, and fp8_dot=False
      at any T): 1%. The bf16 path rounds where the plain bf16 kernels do (0.44-0.49% measured,
      tests/test_kernel_fused_moe.py), and the weights dequantized to bf16 add ~0.3%
      (measured in float32 on the CPU at these shapes).
    - the FP8 tensor-core path (fp8 weights, T >= 64: row blocks of 32 and more): the activations'
      fp8 quantization alone costs 4.3% (3 mantissa bits; the float32 reference with the
      activations fake-quantized the same way, measured on the CPU at these shapes): bound 6%, and
      within 3% of that fake-quantized reference (bf16 roundings, and the fp8 roundings they flip:
      1.65% when the CPU emulates the kernel's bf16 roundings at these shapes).
    """
    from moeserve.kernels.moe_gemm import moe_block_m
    from moeserve.kernels.moe_quant import takes_fp8_dot

    E, K, D, Fi = 8, 2, 1024, 1440
    c = make_case(quant, T, E, K, seed=T, device="cuda", shape=(D, Fi))
    x = c["x"].to(torch.bfloat16)
    args = (x, c["wgu_q"], c["wd_q"], c["weights"], c["experts"])
    q = dict(w_gate_up_scale=c["sgu"], w_down_scale=c["sd"], quant=quant)
    ref = reference(x, c["wgu"], c["wd"], c["weights"], c["experts"])
    fp8_dot = takes_fp8_dot(quant, moe_block_m(T, E, K, Fi, D, torch.bfloat16))
    assert fp8_dot == (quant == "fp8" and T >= 64)
    got = fused_moe(*args, **q)
    assert got.dtype == torch.bfloat16 and got.isfinite().all()
    if fp8_dot:
        assert _rel_err(got, ref) < 0.06, _rel_err(got, ref)
        fq = reference(x, c["wgu"], c["wd"], c["weights"], c["experts"], fp8_act=True)
        assert _rel_err(got, fq) < 0.03, _rel_err(got, fq)
        got = fused_moe(*args, fp8_dot=False, **q)  # weight-only at prefill sizes too
    assert _rel_err(got, ref) < 0.01, _rel_err(got, ref)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64])
def test_gpu_mxfp4_decodes_agree(T: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The PTX MXFP4 decode (e4m3 conversions) and the portable one give the same values at
    different powers of two that each group's scale factor takes back, so the MoE's output
    is the same bits whichever the kernels take: the GEMVs at T = 1, the grouped GEMMs at
    T = 64."""
    from moeserve.kernels import moe_gemm

    c = make_case("mxfp4", T, 8, 2, seed=T, device="cuda", shape=(1024, 1440))
    x = c["x"].to(torch.bfloat16)
    q = dict(w_gate_up_scale=c["sgu"], w_down_scale=c["sd"], quant="mxfp4")
    packed = fused_moe(x, c["wgu_q"], c["wd_q"], c["weights"], c["experts"], **q)
    ref = reference(x, c["wgu"], c["wd"], c["weights"], c["experts"])
    assert _rel_err(packed, ref) < 0.01
    # activations one element into their storage: rows off the 4-byte grid the GEMVs load
    # bf16 pairs on (mxfp4.pairs_aligned copies such a view; an int32 load there faults)
    wider = torch.zeros(T, x.shape[1] + 1, dtype=torch.bfloat16, device="cuda")
    wider[:, 1:] = x
    got = fused_moe(wider[:, 1:], c["wgu_q"], c["wd_q"], c["weights"], c["experts"], **q)
    assert torch.equal(got, packed)
    # the GEMVs' float16 products (T = 1, with an x_bound) are test_gpu_mxfp4_half_products'
    monkeypatch.setenv("MOESERVE_MXFP4_F16", "0")
    packed = fused_moe(x, c["wgu_q"], c["wd_q"], c["weights"], c["experts"], **q)
    for module in (moe_gemv, moe_gemm):
        monkeypatch.setattr(module, "packed_decode", lambda: False)
    portable = fused_moe(x, c["wgu_q"], c["wd_q"], c["weights"], c["experts"], **q)
    assert torch.equal(portable, packed)


GPT_OSS_ACT = ("clamped_swiglu", 1.702, 7.0)


@pytest.mark.gpu
@pytest.mark.parametrize("scale", [1e-3, 1.0, 100.0])
def test_gpu_mxfp4_half_products(scale: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """The MXFP4 GEMVs' float16 products (a scale group a thread), activations scaled by the
    power of two their bound allows (gate/up: the caller's x_bound; down: the clamped
    SwiGLU's), inputs of 1e-3 to hundreds: within 5e-3 relative of the same kernels' float32
    products (about one bf16 rounding of the outputs) and no more than 2e-3 further from the
    float32 reference than those are. Without a bound (silu into down, no x_bound) the
    products are float32's, bit for bit."""
    c = make_case("mxfp4", 1, 8, 4, seed=5, device="cuda", shape=(2880, 2880))
    x = (c["x"] * scale).to(torch.bfloat16)
    q = dict(w_gate_up_scale=c["sgu"], w_down_scale=c["sd"], quant="mxfp4")
    args = (x, c["wgu_q"], c["wd_q"], c["weights"], c["experts"])
    bounded = dict(q, activation=GPT_OSS_ACT, x_bound=float(x.abs().max()))
    monkeypatch.setenv("MOESERVE_MXFP4_F16", "1")
    half, unbounded = fused_moe(*args, **bounded), fused_moe(*args, **q)
    monkeypatch.setenv("MOESERVE_MXFP4_F16", "0")
    single, single_silu = fused_moe(*args, **bounded), fused_moe(*args, **q)
    assert torch.equal(unbounded, single_silu)
    ref = reference(x, c["wgu"], c["wd"], c["weights"], c["experts"], activation=GPT_OSS_ACT)
    assert half.isfinite().all()
    assert _rel_err(half, single.float()) < 5e-3, _rel_err(half, single.float())
    assert _rel_err(half, ref) < _rel_err(single, ref) + 2e-3, (
        _rel_err(half, ref),
        _rel_err(single, ref),
    )


def test_mxfp4_half_products_need_a_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """Float16 products only for activations with a bound, scaled by the largest power of two
    that keeps the bound within float16's 2**15; MOESERVE_MXFP4_F16=0 keeps float32."""
    from moeserve.kernels import mxfp4

    monkeypatch.setattr(mxfp4, "packed_decode", lambda: True)
    monkeypatch.delenv("MOESERVE_MXFP4_F16", raising=False)
    assert not mxfp4.half_products(None)
    assert not mxfp4.half_products(float("inf"))
    assert mxfp4.half_products(57.1)
    monkeypatch.setenv("MOESERVE_MXFP4_F16", "0")
    assert not mxfp4.half_products(57.1)
    monkeypatch.setenv("MOESERVE_MXFP4_F16", "2")
    with pytest.raises(ValueError, match="MOESERVE_MXFP4_F16"):
        mxfp4.half_products(57.1)
    monkeypatch.setenv("MOESERVE_MXFP4_F16", "1")
    monkeypatch.setattr(mxfp4, "packed_decode", lambda: False)  # the interpreter's: float32
    assert not mxfp4.half_products(57.1)
    for bound in (1e-3, 0.7, 1.0, 57.1, 32768.0, 3e4, 1e6):
        s = mxfp4.x_scale(bound)
        assert s == 2.0 ** round(torch.tensor(s).log2().item())
        assert bound * s <= mxfp4.X16_LIMIT < bound * s * 2, (bound, s)
    assert mxfp4.x_scale(None) == mxfp4.x_scale(0.0) == 1.0


def test_activation_bound_holds() -> None:
    """activation_bound bounds the clamped SwiGLU's outputs over gate and up far past its
    limit, within a few percent of the largest reached; silu's products have none."""
    from moeserve.kernels.fused_moe import SILU, activation_bound

    _, alpha, limit = GPT_OSS_ACT
    grid = torch.linspace(-50, 50, 20001, dtype=torch.float64)
    gate, up = grid.clamp(max=limit), grid.clamp(-limit, limit)
    glu = gate * torch.sigmoid(gate * alpha)
    reached = glu.abs().max() * (up.abs().max() + 1)
    bound = activation_bound(GPT_OSS_ACT)
    assert bound is not None and reached <= bound <= reached * 1.05
    assert activation_bound(SILU) is None
    assert activation_bound(("clamped_swiglu", -1.0, limit)) is None
