"""fp8_gemm (block-scaled FP8 GEMM) against its torch reference.

Shapes: the legend in docs/ARCHITECTURE.md (T, Din, Dout).
"""

import pytest
import torch

from nmoe_serve.kernels import INTERPRET
from nmoe_serve.kernels.fp8_format import quantize_weight_blocks
from nmoe_serve.kernels.fp8_gemm import fp8_gemm, fp8_gemm_ref
from nmoe_serve.kernels.fp8_quant import fp8_quant


def _operands(T: int, K: int, N: int, device):
    x = torch.randn(T, K, device=device)  # [T, Din]
    w = torch.randn(N, K, device=device) * torch.logspace(-2, 1, N, device=device)[:, None]  # [Dout, Din]
    return (*fp8_quant(x), *quantize_weight_blocks(w))


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "T, K, N",
    [
        (5, 200, 150),  # partial K block (72) and partial N block (22)
        (1, 128, 64),
        (70, 300, 130),  # the large-T tiles (BLOCK_T = 128)
        (3, 1100, 100),  # split-K: 9 K blocks in 2 splits, the last block partial
    ],
)
def test_fp8_gemm_matches_reference(T, K, N, out_dtype, device):
    x_fp8, x_scales, w_fp8, w_scale_inv = _operands(T, K, N, device)
    y = fp8_gemm(x_fp8, x_scales, w_fp8, w_scale_inv, out_dtype=out_dtype)  # [T, Dout]
    want = fp8_gemm_ref(x_fp8, x_scales, w_fp8, w_scale_inv, out_dtype=torch.float32)
    assert y.shape == (T, N) and y.dtype == out_dtype
    # Same products, different summation order. fp16 output adds its own rounding (2^-11), and
    # Hopper's FP8 tensor cores accumulate with fewer than fp32's bits (DeepSeek-V3 §3.3.2).
    exact = INTERPRET and out_dtype == torch.float32
    assert _rel_err(y, want) <= (1e-5 if exact else 1e-3)


def test_fp8_gemm_empty_batch(device):
    x_fp8, x_scales, w_fp8, w_scale_inv = _operands(0, 256, 96, device)
    y = fp8_gemm(x_fp8, x_scales, w_fp8, w_scale_inv)
    assert y.shape == (0, 96) and y.dtype == torch.bfloat16


def test_fp8_gemm_rejects_bad_input():
    x_fp8, x_scales, w_fp8, w_scale_inv = _operands(3, 200, 150, "cpu")
    cases = [
        ((x_fp8.float(), x_scales, w_fp8, w_scale_inv), r"fp8_gemm: x_fp8 has dtype torch.float32"),
        (
            (x_fp8, x_scales, w_fp8[:, :128].contiguous(), w_scale_inv),
            r"w_fp8 has shape \(150, 128\), expected",
        ),
        (
            (x_fp8, x_scales[:, :1].contiguous(), w_fp8, w_scale_inv),
            r"x_scales has shape \(3, 1\), expected \(3, 2\)",
        ),
        ((x_fp8, x_scales, w_fp8, w_scale_inv.T), r"w_scale_inv must be contiguous"),
        (
            (x_fp8, x_scales, w_fp8, w_scale_inv[:1].contiguous()),
            r"w_scale_inv has shape \(1, 2\), expected \(2, 2\)",
        ),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            fp8_gemm(*args)
    with pytest.raises(ValueError, match=r"fp8_gemm: out_dtype is torch.int8, expected one of"):
        fp8_gemm(x_fp8, x_scales, w_fp8, w_scale_inv, out_dtype=torch.int8)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 32, 4096])
@pytest.mark.parametrize(
    "N, K",
    [
        (576, 7168),  # kv_a_proj_with_mqa: 4.5 row blocks
        (1536, 7168),  # q_a_proj
        (7168, 16384),  # o_proj
        (4096, 7168),  # shared expert gate+up
    ],
)
def test_fp8_gemm_gpu_deepseek_shapes(T, N, K):
    """bf16 output vs the float32 reference: bf16 rounding is 2^-9 relative, fp32 accumulation
    order adds far less, so 1e-2 of the output's range leaves a wide margin."""
    x_fp8, x_scales, w_fp8, w_scale_inv = _operands(T, K, N, "cuda")
    y = fp8_gemm(x_fp8, x_scales, w_fp8, w_scale_inv)
    assert _rel_err(y, fp8_gemm_ref(x_fp8, x_scales, w_fp8, w_scale_inv, out_dtype=torch.float32)) <= 1e-2
