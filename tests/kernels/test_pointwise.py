"""The small fused kernels of a layer against their torch references: rms_norm, add_rms_norm,
rope_, mla_kv_write, grouped_topk, silu_mul.

On the CPU the kernels run in Triton's interpreter, whose bf16 stores truncate instead of
rounding (PITFALLS.md): float32 cases are compared tightly there and bf16 cases within a few
bf16 ulps; on the GPU (`gpu` tests) bf16 is compared at DeepSeek-V3 shapes.
"""

import math

import pytest
import torch

from nmoe_serve.kernels.mla_kv_write import mla_kv_write, mla_kv_write_ref
from nmoe_serve.kernels.rms_norm import add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from nmoe_serve.kernels.rope import rope_, rope_ref_
from nmoe_serve.kernels.router import grouped_topk, grouped_topk_ref, router_logits, router_logits_ref
from nmoe_serve.kernels.silu_mul import silu_mul, silu_mul_ref

BF16_ULPS = dict(rtol=2e-2, atol=2e-2)  # a few bf16 ulps at magnitudes ~1


def _tol(dtype: torch.dtype) -> dict:
    return dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else BF16_ULPS


def _cos_sin(T: int, half: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.rand(T, half, device=device) * 2 * math.pi  # [T, R/2]
    factor = 1.3  # YaRN's attention factor scales both
    return angles.cos() * factor, angles.sin() * factor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, H", [(3, 64), (1, 200), (4, 1000)])
def test_rms_norm_matches_reference(T, H, dtype, device):
    x = (torch.randn(T, H, device=device) * 3).to(dtype)
    w = (torch.rand(H, device=device) + 0.5).to(dtype)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_reads_strided_rows(dtype, device):
    """A slice of a wider projection output (row stride 96, 64 columns) needs no copy."""
    wide = torch.randn(5, 96, device=device).to(dtype)  # [T, 96]
    x = wide[:, 16:80]  # [T, 64], strides (96, 1)
    w = torch.rand(64, device=device).to(dtype)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_matches_reference(dtype, device):
    x, r = (torch.randn(6, 300, device=device).to(dtype) for _ in range(2))
    w = torch.rand(300, device=device).to(dtype)
    out, total = add_rms_norm(x, r, w, 1e-6)
    out_ref, total_ref = add_rms_norm_ref(x, r, w, 1e-6)
    torch.testing.assert_close(total, total_ref, **_tol(dtype))
    torch.testing.assert_close(out, out_ref, **_tol(dtype))


def test_rms_norm_zero_tokens(device):
    w = torch.ones(64, device=device)
    assert rms_norm(torch.empty(0, 64, device=device), w, 1e-6).shape == (0, 64)
    out, total = add_rms_norm(torch.empty(0, 64, device=device), torch.empty(0, 64, device=device), w, 1e-6)
    assert out.shape == total.shape == (0, 64)


def test_rms_norm_refuses_bad_arguments(device):
    x = torch.randn(2, 64, device=device)
    with pytest.raises(ValueError, match=r"rms_norm: weight has shape \(32,\), expected \(64,\)"):
        rms_norm(x, torch.ones(32, device=device), 1e-6)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        rms_norm(torch.randn(64, 2, device=device).T, torch.ones(64, device=device), 1e-6)
    with pytest.raises(ValueError, match="eps is 0, expected a positive float"):
        rms_norm(x, torch.ones(64, device=device), 0)
    with pytest.raises(ValueError, match=r"add_rms_norm: residual is \(3, 64\)"):
        add_rms_norm(x, torch.randn(3, 64, device=device), torch.ones(64, device=device), 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_rotates_a_strided_view_in_place(dtype, device):
    """The rope columns of a [T, N, D + R] query, rotated in place; the nope columns untouched."""
    T, N, D, R = 5, 3, 16, 8
    q = torch.randn(T, N, D + R, device=device).to(dtype)
    cos, sin = _cos_sin(T, R // 2, device)
    want = q.clone()
    rope_ref_(want[..., D:], cos, sin)
    got = q.clone()
    assert rope_(got[..., D:], cos, sin).data_ptr() == got[..., D:].data_ptr()
    torch.testing.assert_close(got, want, **_tol(dtype))
    assert torch.equal(got[..., :D], q[..., :D])


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved pairs (x0, x1) as complex numbers x0 + i·x1 times e^(iθ): an independent rope."""
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())  # [T, ..., R/2]
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
    rot = torch.complex(cos.double(), sin.double()).view(shape)
    return torch.view_as_real(z * rot).flatten(-2).to(x.dtype)


def test_rope_ref_rotates_interleaved_pairs(device):
    x = torch.randn(4, 2, 8, device=device)
    cos, sin = _cos_sin(4, 4, device)
    torch.testing.assert_close(rope_ref_(x.clone(), cos, sin), _rotate_pairs(x, cos, sin))


def test_rope_refuses_bad_arguments(device):
    x = torch.randn(2, 3, 8, device=device)
    cos, sin = _cos_sin(2, 4, device)
    with pytest.raises(ValueError, match=r"rope_: cos has shape \(2, 3\), expected \(2, 4\)"):
        rope_(x, cos[:, :3], sin)
    with pytest.raises(ValueError, match="R must be even"):
        rope_(torch.randn(2, 3, 7, device=device), cos, sin)


def _kv_case(T, L, R, P, pages, dtype, device):
    kv_a = torch.randn(T, L + R, device=device).to(dtype)
    weight = (torch.rand(L, device=device) + 0.5).to(dtype)
    cos, sin = _cos_sin(T, R // 2, device)
    cache = torch.randn(pages, P, L + R, device=device).to(dtype)
    slots = torch.randperm(pages * P, device=device)[:T]
    return kv_a, weight, cos, sin, cache, slots


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, L, R, P", [(5, 32, 16, 16), (3, 48, 8, 4)])
def test_mla_kv_write_matches_reference(T, L, R, P, dtype, device):
    kv_a, weight, cos, sin, cache, slots = _kv_case(T, L, R, P, 4, dtype, device)
    want = cache.clone()
    mla_kv_write_ref(kv_a, weight, 1e-6, cos, sin, want, slots)
    got = cache.clone()
    mla_kv_write(kv_a, weight, 1e-6, cos, sin, got, slots)
    torch.testing.assert_close(got, want, **_tol(dtype))
    untouched = torch.ones(cache.shape[0] * cache.shape[1], dtype=torch.bool, device=device)
    untouched[slots] = False
    assert torch.equal(got.view(-1, L + R)[untouched], cache.view(-1, L + R)[untouched])


def test_mla_kv_write_ref_normalises_ropes_and_scatters(device):
    """The same as RMSNorm of the latent, rope of the key part, then a scatter to the slots."""
    T, L, R, P = 4, 32, 16, 8
    kv_a, weight, cos, sin, cache, slots = _kv_case(T, L, R, P, 2, torch.float32, device)
    latent = kv_a[:, :L]
    xf = latent.float()
    normed = weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6))
    want = cache.clone()
    want.view(-1, L + R)[slots] = torch.cat([normed, _rotate_pairs(kv_a[:, L:], cos, sin)], dim=-1)
    got = cache.clone()
    mla_kv_write_ref(kv_a, weight, 1e-6, cos, sin, got, slots)
    torch.testing.assert_close(got, want)


def test_mla_kv_write_refuses_mismatched_shapes(device):
    kv_a, weight, cos, sin, cache, slots = _kv_case(3, 32, 16, 8, 2, torch.float32, device)
    with pytest.raises(ValueError, match="disagree"):
        mla_kv_write(kv_a[:, :40], weight, 1e-6, cos, sin, cache, slots)
    with pytest.raises(ValueError, match=r"slot_mapping has dtype torch.int32"):
        mla_kv_write(kv_a, weight, 1e-6, cos, sin, cache, slots.int())
    kv_a, weight, cos, sin, cache, slots = _kv_case(3, 32, 12, 8, 2, torch.float32, device)  # R = 12
    with pytest.raises(ValueError, match="R a power of two"):
        mla_kv_write(kv_a, weight, 1e-6, cos, sin, cache, slots)


def _router_logits(T: int, E: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(T, E, device=device) * 2, torch.randn(E, device=device) * 0.3


@pytest.mark.parametrize(
    "E, groups, topk_groups, top_k, normalize",
    [(256, 8, 4, 8, True), (16, 4, 2, 3, False), (12, 3, 3, 5, True), (8, 1, 1, 2, True)],
)
def test_grouped_topk_matches_reference(E, groups, topk_groups, top_k, normalize, device):
    """Same experts in the same order (largest biased score first) and the same weights; 12
    experts in 3 groups of 4 exercise masked (non power of two) tiles."""
    logits, bias = _router_logits(33, E, device)
    weights, ids = grouped_topk(logits, bias, groups, topk_groups, top_k, normalize, 2.5)
    weights_ref, ids_ref = grouped_topk_ref(logits, bias, groups, topk_groups, top_k, normalize, 2.5)
    assert ids.dtype == torch.int64 and torch.equal(ids, ids_ref)
    torch.testing.assert_close(weights, weights_ref, rtol=1e-5, atol=1e-6)


def test_grouped_topk_picks_only_kept_groups(device):
    """The best single expert lies in a group whose second best is poor: the group is dropped."""
    logits = torch.full((1, 8), -4.0, device=device)
    logits[0, 0] = 4.0  # group 0: one strong, one weak expert → group score ~1.02
    logits[0, 4:8] = 1.0  # groups 2, 3: two good experts each → ~1.46
    weights, ids = grouped_topk(logits, torch.zeros(8, device=device), 4, 2, 2, True, 1.0)
    assert set(ids[0].tolist()) <= {4, 5, 6, 7}
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, device=device))


def test_grouped_topk_refuses_impossible_configurations(device):
    logits, bias = _router_logits(2, 16, device)
    with pytest.raises(ValueError, match="do not fit E=16"):
        grouped_topk(logits, bias, 3, 1, 2, True, 1.0)
    with pytest.raises(ValueError, match="do not fit E=16"):
        grouped_topk(logits, bias, 4, 1, 5, True, 1.0)
    with pytest.raises(ValueError, match=r"logits has dtype torch\.bfloat16"):
        grouped_topk(logits.bfloat16(), bias, 4, 2, 2, True, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_router_logits_match_the_float32_gemm(dtype):
    """bf16/fp16 operands with float32 accumulation (torch's mm with out_dtype, CUDA only): the
    same products as the float32 GEMM, summed in another order (DeepSeek-V3's gate is bf16)."""
    device = torch.device("cuda")
    x, w = torch.randn(9, 7168, device=device).to(dtype), torch.randn(256, 7168, device=device).to(dtype)
    got = router_logits(x, w)
    assert got.dtype == torch.float32 and got.shape == (9, 256)
    torch.testing.assert_close(got, router_logits_ref(x, w), rtol=1e-4, atol=1e-3)


def test_router_logits_refuse_mismatched_weights(device):
    with pytest.raises(ValueError, match=r"weight is \(16, 128\) \[E, H\] but x has H = 256"):
        router_logits(torch.randn(2, 256, device=device), torch.randn(16, 128, device=device))
    with pytest.raises(ValueError, match="dtype"):
        router_logits(torch.randn(2, 256, device=device), torch.randn(16, 256, device=device).bfloat16())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T, inter", [(3, 64), (2, 1500)])
def test_silu_mul_matches_reference(T, inter, dtype, device):
    gate_up = (torch.randn(T, 2 * inter, device=device) * 3).to(dtype)
    torch.testing.assert_close(silu_mul(gate_up), silu_mul_ref(gate_up), **_tol(dtype))


def test_silu_mul_refuses_odd_width(device):
    with pytest.raises(ValueError, match="even width"):
        silu_mul(torch.randn(2, 7, device=device))


@pytest.mark.gpu
def test_pointwise_kernels_gpu_deepseek_shapes():
    """bf16 at DeepSeek-V3 sizes on the GPU: hidden 7168, 128 heads x rope 64, latent 512 + 64,
    256 experts in 8 groups (top-4 groups, top-8), shared-expert intermediate 2048."""
    device = torch.device("cuda")
    T = 256
    x, r = (torch.randn(T, 7168, device=device, dtype=torch.bfloat16) for _ in range(2))
    w = torch.rand(7168, device=device, dtype=torch.bfloat16) + 0.5
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6), **BF16_ULPS)
    for got, want in zip(add_rms_norm(x, r, w, 1e-6), add_rms_norm_ref(x, r, w, 1e-6), strict=True):
        torch.testing.assert_close(got, want, **BF16_ULPS)
    q = torch.randn(T, 128, 192, device=device, dtype=torch.bfloat16)
    cos, sin = _cos_sin(T, 32, device)
    want = q.clone()
    rope_ref_(want[..., 128:], cos, sin)
    rope_(q[..., 128:], cos, sin)
    torch.testing.assert_close(q, want, rtol=1e-2, atol=1e-2)
    kv_a, weight, cos, sin, cache, slots = _kv_case(T, 512, 64, 64, 8, torch.bfloat16, device)
    want_cache = cache.clone()
    mla_kv_write_ref(kv_a, weight, 1e-6, cos, sin, want_cache, slots)
    mla_kv_write(kv_a, weight, 1e-6, cos, sin, cache, slots)
    torch.testing.assert_close(cache, want_cache, **BF16_ULPS)
    logits, bias = _router_logits(T, 256, device)
    weights, ids = grouped_topk(logits, bias, 8, 4, 8, True, 2.5)
    weights_ref, ids_ref = grouped_topk_ref(logits, bias, 8, 4, 8, True, 2.5)
    assert torch.equal(ids, ids_ref)
    torch.testing.assert_close(weights, weights_ref, rtol=1e-5, atol=1e-6)
    gate_up = torch.randn(T, 4096, device=device, dtype=torch.bfloat16) * 3
    torch.testing.assert_close(silu_mul(gate_up), silu_mul_ref(gate_up), **BF16_ULPS)
