"""The FP8 e4m3 block format of DeepSeek-V3, in one place: its constants and its torch
quantization and dequantization, shared by the loader, the tiny-checkpoint writer, the kernels'
references and the tests.

Weights W [Dout, Din] are stored as `weight` (float8_e4m3fn, [Dout, Din]) and `weight_scale_inv`
(float32, [G_out, G_in]) with W ≈ weight · scale_inv per 128×128 block. Block counts
are ceil-divided, so the last row and column of blocks may be partial (DeepSeek-V3's
kv_a_proj_with_mqa is 576 × 7168: a 5 × 56 grid whose last row of blocks has 64 rows).
Activations are quantized per token and per group of 128 along the reduced dimension (`fp8_quant`).

One scale rule for both: scale = max(amax, AMAX_EPS) / FP8_MAX. The floor keeps an all-zero block
or group finite (its values quantize to 0; DeepSeek's own act_quant divides by zero there).

Shapes: the legend in docs/ARCHITECTURE.md (a weight is [Dout, Din] for y = x Wᵀ, with
G_out = ceil(Dout/128), G_in = ceil(Din/128) scale groups; T tokens).
"""

import math

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value
FP8_BLOCK = 128  # weight blocks are 128 × 128; activation groups are 1 × FP8_BLOCK
AMAX_EPS = 1e-10


def scale_grid(rows: int, cols: int) -> tuple[int, int]:
    """Shape (G_out, G_in) of the weight_scale_inv of a [rows, cols] weight."""
    return math.ceil(rows / FP8_BLOCK), math.ceil(cols / FP8_BLOCK)


def quantize_weight_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize w [..., Dout, Din] per 128×128 block, as DeepSeek's FP8 checkpoints are stored.

    Returns (w_fp8 [..., Dout, Din] float8_e4m3fn, scale_inv [..., G_out, G_in] float32); edge blocks are
    partial."""
    *lead, n, k = w.shape
    gn, gk = scale_grid(n, k)
    padded = F.pad(w.float(), (0, gk * FP8_BLOCK - k, 0, gn * FP8_BLOCK - n))
    blocks = padded.reshape(*lead, gn, FP8_BLOCK, gk, FP8_BLOCK)
    scale_inv = blocks.abs().amax(dim=(-3, -1)).clamp(min=AMAX_EPS) / FP8_MAX  # [..., G_out, G_in]
    y = (blocks / scale_inv[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    y = y.reshape(*lead, gn * FP8_BLOCK, gk * FP8_BLOCK)[..., :n, :k]
    return y.to(FP8_DTYPE), scale_inv.contiguous()


def dequantize_weight_blocks(
    w_fp8: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """w_fp8 [..., Dout, Din] with scale_inv [..., G_out, G_in] → [..., Dout, Din] in `dtype`, computed in float32.

    Raises ValueError when the scale grid does not fit the weight."""
    n, k = w_fp8.shape[-2:]
    if tuple(scale_inv.shape[-2:]) != scale_grid(n, k) or scale_inv.shape[:-2] != w_fp8.shape[:-2]:
        raise ValueError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)} but a weight of shape {tuple(w_fp8.shape)} "
            f"with {FP8_BLOCK}x{FP8_BLOCK} blocks needs {(*w_fp8.shape[:-2], *scale_grid(n, k))}"
        )
    s = scale_inv.float().repeat_interleave(FP8_BLOCK, dim=-2).repeat_interleave(FP8_BLOCK, dim=-1)
    return (w_fp8.float() * s[..., :n, :k]).to(dtype)


def dequantize_token_groups(x_fp8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x_fp8 [T, Din] with per-group scales [T, G_in] → float32 [T, Din]."""
    k = x_fp8.shape[-1]
    return x_fp8.float() * scales.repeat_interleave(FP8_BLOCK, dim=-1)[..., :k]
