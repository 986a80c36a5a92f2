"""The FP8 128x128 block format (nmoe_serve.kernels.fp8_format): the quantization's error bound,
partial edge blocks, and the refusal of a scale grid that does not fit."""

import math

import pytest
import torch

from nmoe_serve.kernels.fp8_format import FP8_DTYPE, FP8_MAX, dequantize_weight_blocks, quantize_weight_blocks

BLOCK = 128


def test_weight_blocks_round_trip_with_partial_edge_blocks(device):
    w = torch.randn(2, 200, 150, device=device)  # [E, Dout, Din]: edge blocks of 72 rows and 22 columns
    w_fp8, scale_inv = quantize_weight_blocks(w)
    assert w_fp8.shape == w.shape and w_fp8.dtype == FP8_DTYPE
    assert scale_inv.shape == (2, 2, 2)
    torch.testing.assert_close(scale_inv[1, 1, 1], w[1, 128:, 128:].abs().max() / FP8_MAX)
    err = (dequantize_weight_blocks(w_fp8, scale_inv) - w).abs()
    assert torch.all(err <= w.abs() * 2**-4 + scale_inv.max() * 2**-10)


def test_quantize_then_dequantize_is_within_e4m3_precision():
    """Bound per element: |W' - W| <= 2**-4 |W| + 2**-10 s (+ float32 rounding), s = block amax / 448.

    quantize_weight_blocks divides each block by s, mapping its largest magnitude onto 448 (e4m3's largest
    finite value); rounding to e4m3 (3 mantissa bits) errs by at most half an ulp: 2**-4 relative for
    normal values, and 2**-10 absolute below 2**-6 where e4m3 is subnormal (spacing 2**-9). Scaling
    back by s gives the bound; it implies the looser |W' - W| <= 2**-4 * block amax (+ 2**-10 s)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(300, 200, generator=generator, dtype=torch.float64)
    # Blocks of very different magnitudes, a zero block, and values deep in e4m3's subnormal range.
    weight[:128, :128] *= 1e-3
    weight[128:256, :128] *= 1e3
    weight[256:, 128:] = 0.0
    weight[:128, 128:] *= torch.logspace(-6, 0, 72, dtype=torch.float64)
    weight = weight.to(torch.float32)
    q, scale_inv = quantize_weight_blocks(weight)
    assert q.dtype == torch.float8_e4m3fn and tuple(scale_inv.shape) == (3, 2)
    back = dequantize_weight_blocks(q, scale_inv, torch.float32).to(torch.float64)
    w = weight.to(torch.float64)
    s = torch.tensor(
        [
            [
                w[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK].abs().max().item() / FP8_MAX
                for j in range(2)
            ]
            for i in range(3)
        ],
        dtype=torch.float64,
    )
    s_full = s.repeat_interleave(BLOCK, 0)[:300].repeat_interleave(BLOCK, 1)[:, :200]
    err = (back - w).abs()
    bound = 2**-4 * w.abs() + 2**-10 * s_full + 2**-20 * (w.abs() + s_full)
    assert bool((err <= bound).all()), float((err - bound).max())
    assert bool((err <= 2**-4 * FP8_MAX * s_full * (1 + 2**-20) + 2**-10 * s_full).all())
    assert float(err.max()) > 0  # it really went through 8 bits
    assert torch.equal(back[256:, 128:], torch.zeros(44, 72, dtype=torch.float64))
    # Each block's largest magnitude maps onto 448 exactly and comes back to float32 rounding.
    for i in range(3):
        for j in range(2):
            block = w[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK]
            if block.abs().max() == 0:
                continue
            r, c = divmod(int(block.abs().argmax()), block.shape[1])
            assert math.isclose(back[i * BLOCK + r, j * BLOCK + c], block[r, c], rel_tol=2**-22)


def test_dequantize_refuses_a_scale_grid_of_the_wrong_shape():
    q, _ = quantize_weight_blocks(torch.ones(300, 200))
    with pytest.raises(
        ValueError,
        match=r"weight_scale_inv has shape \(2, 2\) but a weight of shape \(300, 200\) with 128x128 blocks needs \(3, 2\)",
    ):
        dequantize_weight_blocks(q, torch.ones(2, 2), torch.float32)
