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


def _check_args(op, kv_a, weight, eps, cos, sin, kv_cache, slot_mapping) -> None:
    check_tensor(op, "kv_a", kv_a, ndim=2, dims="[T, L + R]", dtypes=FLOAT_DTYPES, contiguous="last")
    device = kv_a.device
    T = kv_a.shape[0]
    check_tensor(
        op, "kv_cache", kv_cache, ndim=3, dims="[num_pages, P, L + R]", dtypes=(kv_a.dtype,), device=device
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
    L = weight.shape[0]
    latent = rms_norm_ref(kv_a[:, :L], weight, eps)  # [T, L]
    k_pe = rope_ref_(kv_a[:, None, L:].clone(), cos, sin)[:, 0]  # [T, R]
    kv_cache.view(-1, kv_cache.shape[2])[slot_mapping] = torch.cat([latent, k_pe], dim=-1)
