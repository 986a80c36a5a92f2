"""fp8_quant (per-token-group FP8 quantization) against its torch reference.

Shapes: the legend in docs/ARCHITECTURE.md (T, H, G_H).
"""

import pytest
import torch

from nmoe_serve.kernels.fp8_format import (
    AMAX_EPS,
    FP8_DTYPE,
    FP8_MAX,
    dequantize_token_groups,
)
from nmoe_serve.kernels.fp8_quant import fp8_quant, fp8_quant_ref


def _activations(T: int, H: int, dtype: torch.dtype, device) -> torch.Tensor:
    # Rows of very different magnitudes, so the groups get different scales.
    x = torch.randn(T, H, device=device) * torch.logspace(-3, 3, T, device=device)[:, None]  # [T, H]
    return x.to(dtype)


def _assert_same_quantization(got, want):
    q, s = got
    q_ref, s_ref = want
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32
    assert q.shape == q_ref.shape and s.shape == s_ref.shape
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)), "fp8 bytes differ from the reference"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T, H", [(5, 200), (1, 128), (3, 37), (2, 1100)])
def test_fp8_quant_matches_reference(T, H, dtype, device):
    """Bit-exact against the reference, partial last group included (200 = 128 + 72, 37 < 128)."""
    x = _activations(T, H, dtype, device)
    _assert_same_quantization(fp8_quant(x), fp8_quant_ref(x))


def test_fp8_quant_all_zero_group_has_tiny_scale_and_zero_values(device):
    x = torch.randn(3, 300, device=device)  # [T, H]
    x[1, 128:256] = 0
    q, s = fp8_quant(x)
    assert s[1, 1].item() == pytest.approx(AMAX_EPS / FP8_MAX)
    assert torch.all(q[1, 128:256].float() == 0)
    assert torch.isfinite(dequantize_token_groups(q, s)).all()
    _assert_same_quantization((q, s), fp8_quant_ref(x))


def test_fp8_quant_scale_maps_group_amax_to_fp8_max(device):
    x = _activations(4, 256, torch.float32, device)
    q, s = fp8_quant(x)
    amax = x.view(4, 2, 128).abs().amax(-1)  # [T, G_H]
    torch.testing.assert_close(s, amax / FP8_MAX)
    assert torch.all(q.float().view(4, 2, 128).abs().amax(-1) == FP8_MAX)


def test_fp8_quant_round_trip_error_is_within_e4m3_precision(device):
    x = _activations(6, 384, torch.float32, device)
    q, s = fp8_quant(x)
    err = (dequantize_token_groups(q, s) - x).abs()  # [T, H]
    # e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 of the value (normals) and the smallest
    # subnormal step is 2^-9 of the scale.
    bound = torch.maximum(x.abs() * 2**-4, s.repeat_interleave(128, dim=1) * 2**-10)
    assert torch.all(err <= bound * 1.0001)


def test_fp8_quant_empty_batch(device):
    q, s = fp8_quant(torch.randn(0, 300, device=device))
    assert q.shape == (0, 300) and q.dtype == FP8_DTYPE
    assert s.shape == (0, 3)


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.randn(4), r"fp8_quant: x must be 2-D \[T, H\], got shape \(4,\)"),
        (torch.ones(2, 8, dtype=torch.int32), r"fp8_quant: x has dtype torch.int32, expected one of"),
        (torch.randn(8, 2).T, r"fp8_quant: x must be contiguous .*call .contiguous\(\)"),
        ([[1.0]], r"fp8_quant: x must be a torch.Tensor \[T, H\], got list"),
    ],
)
def test_fp8_quant_rejects_bad_input(x, message):
    with pytest.raises(ValueError, match=message):
        fp8_quant(x)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 4096])
@pytest.mark.parametrize("H", [7168, 2048, 576])
def test_fp8_quant_gpu_deepseek_shapes(T, H):
    """In-kernel fp32 -> e4m3 cast (the interpreter cannot run it, PITFALLS.md): still bit-exact,
    since both sides divide with round-to-nearest and cast with round-to-nearest-even."""
    x = _activations(T, H, torch.bfloat16, "cuda")
    _assert_same_quantization(fp8_quant(x), fp8_quant_ref(x))
