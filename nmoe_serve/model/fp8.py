"""FP8 e4m3 weights with block scales, as DeepSeek-V3 checkpoints store them.

A quantized weight W [N, K] is stored as `weight` (float8_e4m3fn, [N, K]) and `weight_scale_inv`
(float32, [ceil(N/bn), ceil(K/bk)]): W ≈ weight * scale_inv, one scale per bn×bk block. Block
counts are ceil-divided, so the last row and column of blocks may be partial (DeepSeek-V3's
kv_a_proj_with_mqa is 576 × 7168: a 5 × 56 grid whose last row of blocks has 64 rows).
"""

from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)


def scale_grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """Shape of the weight_scale_inv tensor of a weight of `shape`."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def _expand_scales(scale_inv: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    rows = scale_inv.repeat_interleave(block[0], dim=0)[: shape[0]]
    return rows.repeat_interleave(block[1], dim=1)[:, : shape[1]]


def dequantize_blocks(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """W = weight * scale_inv per block, computed in float32, returned in `dtype`."""
    shape = (weight.shape[0], weight.shape[1])
    if tuple(scale_inv.shape) != scale_grid(shape, block):
        raise ValueError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)} but a {shape[0]}x{shape[1]} weight with "
            f"{block[0]}x{block[1]} blocks needs {scale_grid(shape, block)}"
        )
    full = weight.to(torch.float32) * _expand_scales(scale_inv.to(torch.float32), shape, block)
    return full.to(dtype)


def quantize_blocks(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantize W [N, K] to (float8 weight, float32 scale_inv) with amax/448 scales."""
    n, k = weight.shape
    gn, gk = scale_grid((n, k), block)
    padded = torch.zeros(gn * block[0], gk * block[1], dtype=torch.float32, device=weight.device)
    padded[:n, :k] = weight.to(torch.float32)
    tiles = padded.view(gn, block[0], gk, block[1])
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # [gn, gk]
    scale_inv = amax / FP8_MAX
    q = (weight.to(torch.float32) / _expand_scales(scale_inv, (n, k), block)).clamp(-FP8_MAX, FP8_MAX)
    return q.to(FP8_DTYPE), scale_inv.contiguous()
