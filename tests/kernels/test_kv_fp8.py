"""The FP8 latent KV cache: its format (kernels/kv_fp8.py), the FP8 cache write and the FP8 MLA
decode kernel against their torch references.

Shapes: the legend in docs/ARCHITECTURE.md (T, B, N, L, R, C, P).

The kernels' tests are GPU-only: the interpreter rounds float32 to e4m3 wrongly (PITFALLS.md).
Tolerances of the decode kernel against `mla_decode_fp8_ref(emulate_q=True)`: the reference
rounds q as the kernel does but keeps p exact, the kernel rounds p·s/max(s)·448 to e4m3 (3 mantissa
bits: relative error up to 2^-4 per weight, about 2.7% RMS, random in sign), which moves the
output by about that fraction of its norm (a torch emulation of that rounding at these shapes:
2.0-2.2% relative L2, largest error 0.04-0.12): the relative L2 error is held under 6% and the largest
entry error under 0.3 (values ~ N(0, 1)); a wrong token, a token scale left out (scales vary
0.5-1.5x here) or a wrong split moves outputs by 30% or more. In the interpreter (whose e4m3
rounding is wrong) the kernel measured 3.5-5.9% at small shapes.
"""

import pytest
import torch

from nmoe_serve.kernels.kv_fp8 import (
    FP8_DTYPE,
    KV_FP8_TAIL,
    dequantize_kv_rows_ref,
    kv_scales,
    mla_kv_read_fp8,
    quantize_kv_rows_ref,
)
from nmoe_serve.kernels.mla_decode import mla_decode_ref
from nmoe_serve.kernels.mla_decode_fp8 import (
    VARIANTS,
    default_config,
    gluon_available,
    mla_decode_fp8,
    mla_decode_fp8_ref,
    mla_decode_fp8_with_config,
    variant_config,
)
from nmoe_serve.kernels.mla_kv_write import mla_kv_write_fp8, mla_kv_write_fp8_ref, mla_kv_write_ref
from tests.kernels.test_mla_decode import scattered_page_table


def _fp8_cache(context_lens: list[int], P: int, N: int, L: int, R: int, device, spare_pages: int = 3):
    """Random q (bf16) and an FP8 cache of random rows (the rope part 30x smaller than the latent,
    as in a model), each sequence's pages scattered in random order."""
    B = len(context_lens)
    page_table, num_pages = scattered_page_table(context_lens, P, spare_pages)  # [B, max_pages]
    rows = torch.randn(num_pages * P, L + R, device=device)  # [NP * P, C]
    rows[:, L:] /= 30
    rows *= torch.rand(num_pages * P, 1, device=device) + 0.5  # per-token magnitudes differ
    kv_cache = quantize_kv_rows_ref(rows, L).view(num_pages, P, L + R + KV_FP8_TAIL)
    return dict(
        q_nope=torch.randn(B, N, L, device=device).to(torch.bfloat16),  # [B, N, L]
        q_pe=torch.randn(B, N, R, device=device).to(torch.bfloat16),  # [B, N, R]
        kv_cache=kv_cache,  # [pages, P, C + 16]
        page_table=page_table.to(device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),  # [B]
    )


def test_quantized_rows_round_trip_within_e4m3_rounding() -> None:
    L, R = 64, 16
    rows = torch.randn(50, L + R) * torch.logspace(-3, 2, 50)[:, None]  # [T, C], magnitudes 1e-3 .. 1e2
    rows[:, L:] *= 0.01
    rows[7] = 0
    packed = quantize_kv_rows_ref(rows, L)
    assert packed.dtype == FP8_DTYPE and packed.shape == (50, L + R + KV_FP8_TAIL)
    s = kv_scales(packed)  # [T, 2]
    torch.testing.assert_close(
        s[:, 0], torch.where(rows[:, :L].abs().amax(1) > 0, rows[:, :L].abs().amax(1) / 448, 1.0)
    )
    back = dequantize_kv_rows_ref(packed, L, torch.float32)  # [T, C]
    step = torch.cat([s[:, :1].expand(-1, L), s[:, 1:].expand(-1, R)], dim=1) * 2**-9  # subnormal spacing
    assert ((back - rows).abs() <= rows.abs() * 2**-4 + step).all()
    assert (back[7] == 0).all()
    assert (back != rows).any()


def test_fp8_write_ref_quantizes_the_bf16_write_rows() -> None:
    T, L, R = 6, 64, 16
    kv_a = torch.randn(T, L + R)
    w, cos, sin = torch.rand(L) + 0.5, torch.randn(T, R // 2), torch.randn(T, R // 2)
    slots = torch.tensor([3, 0, 17, 9, 30, 12])
    plain = torch.zeros(4, 8, L + R)
    mla_kv_write_ref(kv_a, w, 1e-6, cos, sin, plain, slots)
    packed = torch.zeros(4, 8, L + R + KV_FP8_TAIL, dtype=FP8_DTYPE)
    mla_kv_write_fp8_ref(kv_a, w, 1e-6, cos, sin, packed, slots)
    expected = quantize_kv_rows_ref(plain.view(-1, L + R)[slots], L)
    assert torch.equal(
        packed.view(-1, L + R + KV_FP8_TAIL)[slots].view(torch.uint8), expected.view(torch.uint8)
    )
    untouched = torch.ones(32, dtype=torch.bool)
    untouched[slots] = False
    assert (packed.view(-1, L + R + KV_FP8_TAIL)[untouched].view(torch.uint8) == 0).all()
    torch.testing.assert_close(
        mla_kv_read_fp8(packed, slots, L, torch.float32), dequantize_kv_rows_ref(expected, L, torch.float32)
    )


def test_fp8_decode_ref_is_the_decode_ref_over_the_dequantized_cache() -> None:
    inputs = _fp8_cache([5, 70, 33], P=16, N=4, L=64, R=16, device="cpu")
    cache = inputs["kv_cache"]
    dequantized = dequantize_kv_rows_ref(cache, 64, torch.float32)  # [pages, P, C]
    q_nope, q_pe = inputs["q_nope"].float(), inputs["q_pe"].float()
    args = (inputs["page_table"], inputs["context_lens"], 0.125)
    out = mla_decode_fp8_ref(q_nope, q_pe, cache, *args)
    torch.testing.assert_close(out, mla_decode_ref(q_nope, q_pe, dequantized, *args))
    with pytest.raises(ValueError, match="kv_cache"):
        mla_decode_fp8_ref(q_nope, q_pe, dequantized, *args)


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    out, ref = out.float(), ref.float()
    rel = ((out - ref).norm() / ref.norm()).item()
    worst = (out - ref).abs().max().item()
    assert rel < 0.06 and worst < 0.3, f"relative L2 error {rel:.4f}, largest error {worst:.4f}"


@pytest.mark.gpu
@pytest.mark.parametrize(
    "context_lens",
    [[1], [64], [65, 3, 200], [2000] * 4 + [1, 17, 4097], list(range(1, 300, 37))],
    ids=["one", "page", "mixed", "long", "ramp"],
)
@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_mla_decode_fp8_matches_ref(context_lens, num_splits, device) -> None:
    inputs = _fp8_cache(context_lens, P=64, N=128, L=512, R=64, device=device)
    scale = 192**-0.5
    out = mla_decode_fp8(**inputs, softmax_scale=scale, num_splits=num_splits)
    assert out.dtype == torch.bfloat16 and out.shape == (len(context_lens), 128, 512)
    _close(out, mla_decode_fp8_ref(**inputs, softmax_scale=scale, emulate_q=True))


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_mla_decode_fp8_variants_match_ref(name, device) -> None:
    inputs = _fp8_cache([2000, 1, 130, 64], P=64, N=128, L=512, R=64, device=device)
    B, W = 4, inputs["page_table"].shape[1]
    cfg = variant_config(default_config(B, 128, 512, 64, 64, W * 64, 132), name)
    out = mla_decode_fp8_with_config(**inputs, softmax_scale=0.07, cfg=cfg)
    _close(out, mla_decode_fp8_ref(**inputs, softmax_scale=0.07, emulate_q=True))


@pytest.mark.gpu
def test_mla_decode_fp8_is_close_to_bf16_decode_over_the_same_rows(device) -> None:
    """Against the bf16 kernel's reference on the dequantized rows (the FP8 path's whole error
    beyond the cache's rounding: q and p rounded to e4m3)."""
    inputs = _fp8_cache([2000, 500, 64], P=64, N=16, L=512, R=64, device=device)
    dequantized = dequantize_kv_rows_ref(inputs["kv_cache"], 512, torch.bfloat16)
    out = mla_decode_fp8(**inputs, softmax_scale=0.07)
    ref = mla_decode_ref(
        inputs["q_nope"], inputs["q_pe"], dequantized, inputs["page_table"], inputs["context_lens"], 0.07
    )
    _close(out, ref)


@pytest.mark.gpu
def test_mla_kv_write_fp8_matches_ref(device) -> None:
    T, L, R, P = 300, 512, 64, 64
    kv_a = (torch.randn(T, L + R, device=device) * 3).to(torch.bfloat16)
    w = (torch.rand(L, device=device) + 0.5).to(torch.bfloat16)
    angles = torch.rand(T, R // 2, device=device) * 6.28
    cos, sin = angles.cos(), angles.sin()
    slots = torch.randperm(8 * P, device=device)[:T]
    caches = [torch.zeros(8, P, L + R + KV_FP8_TAIL, dtype=FP8_DTYPE, device=device) for _ in range(2)]
    mla_kv_write_fp8(kv_a, w, 1e-6, cos, sin, caches[0], slots)
    mla_kv_write_fp8_ref(kv_a, w, 1e-6, cos, sin, caches[1], slots)
    torch.testing.assert_close(kv_scales(caches[0]), kv_scales(caches[1]), rtol=1e-6, atol=0)
    a, b = (dequantize_kv_rows_ref(c, L, torch.float32) for c in caches)
    # The kernel's norm and rope may round a bf16 ulp differently: at most one e4m3 step apart.
    assert ((a - b).abs() <= b.abs() * 2**-3 + 1e-6).all()
    assert (caches[0].view(torch.uint8) == caches[1].view(torch.uint8)).float().mean() > 0.99
    assert torch.equal(caches[0].view(torch.uint8)[..., -8:], caches[1].view(torch.uint8)[..., -8:])


@pytest.mark.gpu
def test_mla_decode_fp8_takes_a_pass_of_no_rows(device) -> None:
    """A rank's T = 0 pass (an idle eager decode): no rows in, none out, no launch."""
    inputs = _fp8_cache([5], P=64, N=128, L=512, R=64, device=device)
    empty = {
        k: v[:0] if k in ("q_nope", "q_pe", "page_table", "context_lens") else v for k, v in inputs.items()
    }
    out = mla_decode_fp8(**empty, softmax_scale=0.1)
    assert out.shape == (0, 128, 512)


def _poison_past_contexts(inputs: dict, context_lens: list[int], P: int) -> None:
    """NaN bytes (0xFF: NaN in e4m3 and in the float32 scales) in every slot of each sequence's
    last page past its context: slots there may hold any bits, which no kernel may let through."""
    raw = inputs["kv_cache"].view(torch.uint8)
    for b, n in enumerate(context_lens):
        raw[inputs["page_table"][b, (n - 1) // P].long(), (n - 1) % P + 1 :] = 0xFF


def test_mla_decode_fp8_reference_never_reads_slots_past_the_context() -> None:
    lens = [1, 70, 128]
    inputs = _fp8_cache(lens, P=64, N=4, L=32, R=16, device="cpu")
    clean = mla_decode_fp8_ref(**inputs, softmax_scale=0.1)
    _poison_past_contexts(inputs, lens, 64)
    assert torch.equal(mla_decode_fp8_ref(**inputs, softmax_scale=0.1), clean)


def test_mla_decode_fp8_gluon_config_refuses_dims_it_does_not_take() -> None:
    """L / 2 = 16 is no TMA box of the Gluon kernel: a clear error, before any launch."""
    inputs = _fp8_cache([5], P=64, N=4, L=32, R=16, device="cpu")
    with pytest.raises(ValueError, match="Gluon kernel needs L / 2 in"):
        mla_decode_fp8_with_config(**inputs, softmax_scale=0.1, cfg=dict(VARIANT="gluon", NUM_SPLITS=1))


def _gluon_or_skip() -> None:
    ok, why = gluon_available(torch.device("cuda"))
    if not ok:
        pytest.skip(f"the Gluon FP8 MLA kernel cannot run here: {why}")


@pytest.mark.gpu
@pytest.mark.parametrize(
    "context_lens",
    [[1], [64], [65, 3, 200], [2000] * 4 + [1, 17, 4097], list(range(1, 300, 37)), [16000, 129]],
    ids=["one", "page", "mixed", "long", "ramp", "16k"],
)
@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_mla_decode_fp8_gluon_matches_ref(context_lens, num_splits, device) -> None:
    """kernels/mla_decode_fp8_gluon.py at DeepSeek-V3 dims (N 128, L 512, R 64, P 64), NaN bytes
    past every context, against the reference (q rounded as the kernel rounds it)."""
    _gluon_or_skip()
    inputs = _fp8_cache(context_lens, P=64, N=128, L=512, R=64, device=device)
    _poison_past_contexts(inputs, context_lens, 64)
    scale = 192**-0.5
    out = mla_decode_fp8(**inputs, softmax_scale=scale, num_splits=num_splits, gluon=True)
    assert out.dtype == torch.bfloat16 and out.shape == (len(context_lens), 128, 512)
    assert torch.isfinite(out).all()
    _close(out, mla_decode_fp8_ref(**inputs, softmax_scale=scale, emulate_q=True))


@pytest.mark.gpu
@pytest.mark.parametrize(("N", "L", "R"), [(16, 512, 64), (100, 512, 64), (128, 256, 32), (64, 128, 128)])
def test_mla_decode_fp8_gluon_other_dims(N, L, R, device) -> None:
    """Heads that are not a multiple of 64 (rows past N masked) and the other latent and rope widths
    the kernel takes; empty splits (9 splits of 130 tokens)."""
    _gluon_or_skip()
    lens = [130, 1, 64, 700]
    inputs = _fp8_cache(lens, P=64, N=N, L=L, R=R, device=device)
    _poison_past_contexts(inputs, lens, 64)
    out = mla_decode_fp8(**inputs, softmax_scale=0.07, num_splits=9, gluon=True)
    _close(out, mla_decode_fp8_ref(**inputs, softmax_scale=0.07, emulate_q=True))


@pytest.mark.gpu
def test_mla_decode_fp8_gluon_takes_strided_queries_and_no_rows(device) -> None:
    """q_nope and q_pe as views of one [B, N, L + R] tensor (as the model's absorbed product gives
    them), and a T = 0 pass."""
    _gluon_or_skip()
    inputs = _fp8_cache([300, 2], P=64, N=128, L=512, R=64, device=device)
    wide = torch.randn(2, 128, 576, device=device).to(torch.bfloat16)
    args = inputs | dict(q_nope=wide[..., :512], q_pe=wide[..., 512:])
    out = mla_decode_fp8(**args, softmax_scale=0.07, gluon=True)
    _close(out, mla_decode_fp8_ref(**args, softmax_scale=0.07, emulate_q=True))
    empty = {
        k: v[:0] if k in ("q_nope", "q_pe", "page_table", "context_lens") else v for k, v in inputs.items()
    }
    assert mla_decode_fp8(**empty, softmax_scale=0.1, gluon=True).shape == (0, 128, 512)
