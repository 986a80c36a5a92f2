"""Write a step's new tokens into MLA's paged latent cache: normalize, rotate, scatter, in one launch.

Shapes: the legend in docs/ARCHITECTURE.md (T, L, R, C = L + R, NP, P).

From the kv_a projection's output kv_a [T, C] (latent, then the shared rope key):

    kv_cache.view(-1, C)[slot_mapping[t]] = [rms_norm(kv_a[t, :L], w, eps), rope(kv_a[t, L:], cos[t], sin[t])]

with the roundings of the model's torch path (kv_a_layernorm, apply_rope, concatenation). The
torch path takes about 17 launches for the same (norm, rope, cat, index_put).
"""

import torch
import triton
import triton.language as tl

from ._validate import FLOAT_DTYPES, check_tensor
from .kv_fp8 import FP8_DTYPE, KV_FP8_TAIL, quantize_kv_rows_ref
from .rms_norm import rms_norm_ref, rms_norm_row
from .rope import rope_ref_, rope_rows


@triton.jit
def mla_kv_write_kernel(
    kv_a_ptr,  # [T, C], row stride stride_a
    w_ptr,  # [L]
    cos_ptr,  # [T, R/2] float32
    sin_ptr,  # [T, R/2] float32
    cache_ptr,  # [NP * P, C] contiguous rows
    slots_ptr,  # [T] int64
    L,
    stride_a,
    eps,
    BLOCK_L: tl.constexpr,
    R: tl.constexpr,  # a power of two
):
    t = tl.program_id(0).to(tl.int64)
    C = L + R
    slot = tl.load(slots_ptr + t)
    src = kv_a_ptr + t * stride_a
    dst = cache_ptr + slot * C
    cols = tl.arange(0, BLOCK_L)
    l_mask = cols < L
    latent = tl.load(src + cols, mask=l_mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=l_mask, other=0.0).to(tl.float32)
    tl.store(dst + cols, rms_norm_row(latent, w, L, eps, cache_ptr.dtype.element_ty), mask=l_mask)
    freqs = tl.arange(0, R // 2)
    cos = tl.load(cos_ptr + t * (R // 2) + freqs)[None, :]  # [1, R/2]
    sin = tl.load(sin_ptr + t * (R // 2) + freqs)[None, :]
    rope_cols = L + tl.arange(0, R)[None, :]  # [1, R]
    k_pe = tl.load(src + rope_cols).to(tl.float32)
    tl.store(dst + rope_cols, rope_rows(k_pe, cos, sin, 1, R).to(cache_ptr.dtype.element_ty))


@triton.jit
def mla_kv_write_fp8_kernel(
    kv_a_ptr,  # [T, C], row stride stride_a
    w_ptr,  # [L]
    cos_ptr,  # [T, R/2] float32
    sin_ptr,  # [T, R/2] float32
    cache_ptr,  # [NP * P, C + 16] float8_e4m3fn contiguous rows
    scale_ptr,  # the same memory as float32 [NP * P, (C + 16) / 4]
    slots_ptr,  # [T] int64
    L,
    stride_a,
    eps,
    BLOCK_L: tl.constexpr,
    R: tl.constexpr,  # a power of two
    TAIL: tl.constexpr,  # KV_FP8_TAIL bytes
):
    t = tl.program_id(0).to(tl.int64)
    C = L + R
    slot = tl.load(slots_ptr + t)
    src = kv_a_ptr + t * stride_a
    dst = cache_ptr + slot * (C + TAIL)
    cols = tl.arange(0, BLOCK_L)
    l_mask = cols < L
    latent = tl.load(src + cols, mask=l_mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=l_mask, other=0.0).to(tl.float32)
    latent = rms_norm_row(latent, w, L, eps, kv_a_ptr.dtype.element_ty).to(tl.float32)  # [BL]
    amax = tl.max(tl.abs(latent), axis=0)
    s_latent = tl.where(amax > 0, amax / 448.0, 1.0)
    q_latent = tl.clamp(latent / s_latent, -448.0, 448.0)
    tl.store(dst + cols, q_latent.to(cache_ptr.dtype.element_ty), mask=l_mask)
    freqs = tl.arange(0, R // 2)
    cos = tl.load(cos_ptr + t * (R // 2) + freqs)[None, :]  # [1, R/2]
    sin = tl.load(sin_ptr + t * (R // 2) + freqs)[None, :]
    rope_cols = tl.arange(0, R)[None, :]  # [1, R]
    k_pe = tl.load(src + L + rope_cols).to(tl.float32)
    k_pe = rope_rows(k_pe, cos, sin, 1, R).to(kv_a_ptr.dtype.element_ty).to(tl.float32)  # [1, R]
    amax_pe = tl.max(tl.max(tl.abs(k_pe), axis=1), axis=0)
    s_rope = tl.where(amax_pe > 0, amax_pe / 448.0, 1.0)
    q_pe = tl.clamp(k_pe / s_rope, -448.0, 448.0)
    tl.store(dst + L + rope_cols, q_pe.to(cache_ptr.dtype.element_ty))
    scale_row = scale_ptr + slot * ((C + TAIL) // 4) + C // 4
    tl.store(scale_row, s_latent)
    tl.store(scale_row + 1, s_rope)


def _check_args(op, kv_a, weight, eps, cos, sin, kv_cache, slot_mapping, fp8: bool = False) -> None:
    check_tensor(op, "kv_a", kv_a, ndim=2, dims="[T, L + R]", dtypes=FLOAT_DTYPES, contiguous="last")
    device = kv_a.device
    T = kv_a.shape[0]
    if fp8:
        check_tensor(
            op,
            "kv_cache",
            kv_cache,
            ndim=3,
            dims="[num_pages, P, L + R + 16]",
            dtypes=(FP8_DTYPE,),
            device=device,
        )
        C = kv_cache.shape[2] - KV_FP8_TAIL
        if C % 4:
            raise ValueError(
                f"{op}: the FP8 cache's L + R = {C} must be a multiple of 4 (float32 scales follow)"
            )
    else:
        check_tensor(
            op,
            "kv_cache",
            kv_cache,
            ndim=3,
            dims="[num_pages, P, L + R]",
            dtypes=(kv_a.dtype,),
            device=device,
        )
        C = kv_cache.shape[2]
    L = weight.shape[0] if isinstance(weight, torch.Tensor) else -1
    R = C - L
    if kv_a.shape[1] != C or not 0 < L < C or R < 2 or R & (R - 1):
        raise ValueError(
            f"{op}: kv_a [T, L + R] = {tuple(kv_a.shape)}, kv_cache {tuple(kv_cache.shape)} and weight [L] "
            f"{tuple(getattr(weight, 'shape', ()))} disagree: need kv_a.shape[1] == kv_cache.shape[2] = L + R, "
            "R a power of two (DeepSeek: 64)"
        )
    check_tensor(op, "weight", weight, shape=(L,), dims="[L]", dtypes=FLOAT_DTYPES, device=device)
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(
            op, name, t, shape=(T, (C - L) // 2), dims="[T, R/2]", dtypes=(torch.float32,), device=device
        )
    check_tensor(
        op, "slot_mapping", slot_mapping, shape=(T,), dims="[T]", dtypes=(torch.int64,), device=device
    )
    if not (isinstance(eps, float) and eps > 0):
        raise ValueError(f"{op}: eps is {eps!r}, expected a positive float")


def mla_kv_write(
    kv_a: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write the normalized latents and roped keys of kv_a [T, L + R] to kv_cache [pages, P, L + R]
    at slot_mapping [T] int64 (flat slot = page * P + offset; slots are not range-checked on the
    device). weight [L] is kv_a_layernorm's; cos/sin [T, R/2] float32."""
    _check_args("mla_kv_write", kv_a, weight, eps, cos, sin, kv_cache, slot_mapping)
    T, C = kv_a.shape
    L = weight.shape[0]
    if T:
        mla_kv_write_kernel[(T,)](
            kv_a, weight, cos, sin, kv_cache, slot_mapping, L, kv_a.stride(0), eps,
            BLOCK_L=triton.next_power_of_2(L), R=C - L, num_warps=4,
        )  # fmt: skip


def mla_kv_write_ref(
    kv_a: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Torch reference of `mla_kv_write`."""
    _check_args("mla_kv_write_ref", kv_a, weight, eps, cos, sin, kv_cache, slot_mapping)
    kv_cache.view(-1, kv_cache.shape[2])[slot_mapping] = _rows_ref(kv_a, weight, eps, cos, sin)


def _rows_ref(
    kv_a: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """[T, L + R]: each token's normalized latent, then its roped key (what the cache holds)."""
    L = weight.shape[0]
    latent = rms_norm_ref(kv_a[:, :L], weight, eps)  # [T, L]
    k_pe = rope_ref_(kv_a[:, None, L:].clone(), cos, sin)[:, 0]  # [T, R]
    return torch.cat([latent, k_pe], dim=-1)


def mla_kv_write_fp8(
    kv_a: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """`mla_kv_write` into an FP8 cache [pages, P, L + R + 16] float8_e4m3fn (kernels/kv_fp8.py):
    the rows as `mla_kv_write` computes them, quantized per token, latent and rope part each with
    its float32 scale in the row's tail."""
    _check_args("mla_kv_write_fp8", kv_a, weight, eps, cos, sin, kv_cache, slot_mapping, fp8=True)
    T, C = kv_a.shape
    L = weight.shape[0]
    if T:
        rows = kv_cache.view(-1, kv_cache.shape[2])  # [NP * P, C + 16]
        mla_kv_write_fp8_kernel[(T,)](
            kv_a, weight, cos, sin, rows, rows.view(torch.float32), slot_mapping, L, kv_a.stride(0), eps,
            BLOCK_L=triton.next_power_of_2(L), R=C - L, TAIL=KV_FP8_TAIL, num_warps=4,
        )  # fmt: skip


def mla_kv_write_fp8_ref(
    kv_a: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Torch reference of `mla_kv_write_fp8`: `mla_kv_write_ref`'s rows, then `quantize_kv_rows_ref`."""
    _check_args("mla_kv_write_fp8_ref", kv_a, weight, eps, cos, sin, kv_cache, slot_mapping, fp8=True)
    rows = quantize_kv_rows_ref(_rows_ref(kv_a, weight, eps, cos, sin), weight.shape[0])  # [T, C + 16]
    kv_cache.view(-1, kv_cache.shape[2])[slot_mapping] = rows
