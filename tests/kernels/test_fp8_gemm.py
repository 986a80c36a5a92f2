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


def _gluon_here() -> bool:
    if not torch.cuda.is_available():
        return False
    from nmoe_serve.kernels.fp8_gemm import gluon_available

    return gluon_available(torch.device("cuda"))[0]


@pytest.mark.gpu
@pytest.mark.skipif(not _gluon_here(), reason="needs a Hopper GPU and Triton's Gluon")
@pytest.mark.parametrize(
    "T, N, K, tiles, split",
    [
        (70, 130, 1040, (128, 128, 4, 8), 1),  # partial T, N and last K block; 9 blocks (odd)
        (70, 130, 1040, (64, 64, 3, 4), 2),  # splits of 5 and 4 blocks; more blocks than stages
        (200, 256, 128, (128, 128, 4, 8), 1),  # one block
        (130, 300, 256, (64, 128, 4, 4), 1),  # two blocks
        (256, 576, 7168, (128, 128, 4, 8), 4),  # kv_a_proj_with_mqa at 256 tokens, split-K
        (256, 7168, 16384, (128, 128, 4, 8), 1),  # o_proj at 256 tokens
    ],
)
def test_fp8_gemm_gluon_matches_reference(T, N, K, tiles, split):
    from nmoe_serve.kernels.fp8_gemm import fp8_gemm_with_config

    x_fp8, x_scales, w_fp8, w_scale_inv = _operands(T, K, N, "cuda")
    bt, bw, stages, warps = tiles
    cfg = dict(VARIANT="gluon", BLOCK_T=bt, BLOCK_W=bw, STAGES=stages, num_warps=warps, SPLIT_K=split)
    y = torch.full((T, N), float("nan"), dtype=torch.bfloat16, device="cuda")  # every element written
    fp8_gemm_with_config(x_fp8, x_scales, w_fp8, w_scale_inv, y, cfg)
    assert _rel_err(y, fp8_gemm_ref(x_fp8, x_scales, w_fp8, w_scale_inv, out_dtype=torch.float32)) <= 1e-2


@pytest.mark.gpu
@pytest.mark.skipif(not _gluon_here(), reason="needs a Hopper GPU and Triton's Gluon")
@pytest.mark.parametrize("T", [128, 256, 4096])
@pytest.mark.parametrize("N, K", [(2112, 7168), (7168, 16384), (576, 7168)])
def test_fp8_gemm_gluon_default_tiles_at_deepseek_shapes(T, N, K):
    x_fp8, x_scales, w_fp8, w_scale_inv = _operands(T, K, N, "cuda")
    y = fp8_gemm(x_fp8, x_scales, w_fp8, w_scale_inv, gluon=True)
    assert _rel_err(y, fp8_gemm_ref(x_fp8, x_scales, w_fp8, w_scale_inv, out_dtype=torch.float32)) <= 1e-2
