"""The FP8 latent KV cache format: one packed row per token, float8 e4m3 with per-token scales.

Shapes: the legend in docs/ARCHITECTURE.md (C = L + R, NP, P, S, T).

A token's row of an FP8 cache is C + KV_FP8_TAIL bytes, stored as float8_e4m3fn:

    bytes [0, L)        c_kv / s_latent   rounded to e4m3 (the normalized latent)
    bytes [L, C)        k_pe / s_rope     rounded to e4m3 (the roped shared key)
    bytes [C, C + 16)   float32 s_latent, float32 s_rope, 8 bytes of zeros

with s_x = amax(|x|) / 448 over that part of the row (1 for an all-zero part). The latent and the
rope key get a scale each: the latent is RMS-normalized (entries of order 1 times the norm's
weight) while the rope key is a raw projection whose magnitude differs from it per token and per
layer, and a row-wide scale would push the smaller part toward e4m3's subnormals (below 2^-6 of
the scale's 448, where the relative error grows past e4m3's 2^-4). Both scales fit in the 16-byte
tail that keeps DeepSeek's rows 16-byte aligned (592 bytes for C = 576, TMA-able), so the second
one is free: 592 bytes a token against 1152 in bf16, 1.95x the tokens per GiB.

One tensor per layer keeps the cache's interface (a list of [NP + 1, P, row] tensors): the scales
of a layer are `kv_cache.view(torch.float32)[..., C // 4 : C // 4 + 2]`.
"""

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
KV_FP8_TAIL = 16  # bytes after the C fp8 entries: two float32 scales and padding


def kv_row_width(kv_cache_dim: int, dtype: torch.dtype) -> int:
    """Entries of one token's row in a cache of `dtype`: C, or C + KV_FP8_TAIL for the FP8 format."""
    if dtype == FP8_DTYPE:
        if kv_cache_dim % 4:
            raise ValueError(
                f"the FP8 KV cache needs L + R a multiple of 4 (its float32 scales follow the row), got {kv_cache_dim}"
            )
        return kv_cache_dim + KV_FP8_TAIL
    return kv_cache_dim


def fp8_kv_dims(kv_cache: torch.Tensor) -> int:
    """C of an FP8 cache [..., C + KV_FP8_TAIL]."""
    return kv_cache.shape[-1] - KV_FP8_TAIL


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """The e4m3 scale of parts whose largest magnitude is amax (float32): amax / 448, 1 for 0.

    Divides by a float32 tensor: CUDA torch's `x / 448.0` multiplies by the reciprocal
    (PITFALLS.md), the kernels divide."""
    amax = amax.float()
    return torch.where(amax > 0, amax / torch.tensor(FP8_MAX, device=amax.device), torch.ones_like(amax))


def quantize_kv_rows_ref(rows: torch.Tensor, latent: int) -> torch.Tensor:
    """Rows [T, C] (any float dtype) → packed FP8 rows [T, C + KV_FP8_TAIL] float8_e4m3fn."""
    T, C = rows.shape
    x = rows.float()
    out = torch.zeros(T, C + KV_FP8_TAIL, dtype=FP8_DTYPE, device=rows.device)  # [T, C + 16]
    scales = torch.zeros(T, KV_FP8_TAIL // 4, dtype=torch.float32, device=rows.device)  # [T, 4]
    for i, (lo, hi) in enumerate(((0, latent), (latent, C))):
        s = fp8_scale(x[:, lo:hi].abs().amax(dim=1))  # [T]
        out[:, lo:hi] = (x[:, lo:hi] / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        scales[:, i] = s
    out[:, C:] = scales.view(FP8_DTYPE)
    return out


def kv_scales(kv_cache: torch.Tensor) -> torch.Tensor:
    """The (s_latent, s_rope) float32 pairs [..., 2] of an FP8 cache [..., C + KV_FP8_TAIL] (a view)."""
    C = fp8_kv_dims(kv_cache)
    return kv_cache.view(torch.float32)[..., C // 4 : C // 4 + 2]


def dequantize_kv_rows_ref(rows: torch.Tensor, latent: int, dtype: torch.dtype) -> torch.Tensor:
    """Packed FP8 rows [..., C + KV_FP8_TAIL] → [..., C] in `dtype` (float32 products, rounded once)."""
    C = fp8_kv_dims(rows)
    s = kv_scales(rows)  # [..., 2]
    values = rows[..., :C].float()  # [..., C]
    latent_part = values[..., :latent] * s[..., :1]
    rope_part = values[..., latent:] * s[..., 1:2]
    return torch.cat([latent_part, rope_part], dim=-1).to(dtype)


def mla_kv_read_fp8(
    kv_cache: torch.Tensor, slots: torch.Tensor, latent: int, dtype: torch.dtype
) -> torch.Tensor:
    """An FP8 cache's rows at flat slots [S] int64, dequantized → [S, C] in `dtype` (prefill's
    cached context: gathered first, so only the S rows are converted)."""
    rows = kv_cache.view(-1, kv_cache.shape[-1])[slots]  # [S, C + 16]
    return dequantize_kv_rows_ref(rows, latent, dtype)
