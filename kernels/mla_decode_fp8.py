"""Paged MLA decode over the FP8 latent cache (kernels/kv_fp8.py): QK^T on FP8 tensor cores, PV
on FP8 or bf16; on Hopper with Gluon, kernels/mla_decode_fp8_gluon.py (`gluon=True`) runs both on
FP8 tensor cores.

Shapes: the legend in docs/ARCHITECTURE.md (B, N, L, R, P, Sp, NP, W).

The math of `mla_decode` (kernels/mla_decode.py) on a cache whose token rows are e4m3 with a
float32 scale for the latent (s_c[j]) and one for the rope key (s_r[j]):

    scores[b, n, j] = (q_nope[b, n] · c_kv[j] · s_c[j] + q_pe[b, n] · k_pe[j] · s_r[j]) * softmax_scale
    out[b, n]       = Σ_j softmax_j(scores[b, n]) · c_kv[j] · s_c[j]

The kernel (`mla_decode_fp8_kernel`, the paged kernel's structure: BLOCK_H heads as M, the latent
in two halves, split-K with `mla_decode_merge_kernel`) runs QK^T, and optionally PV, on e4m3
operands:

- QK^T: each program quantizes its heads' q_nope rows (per head, amax over L) and q_pe rows (per
  head, amax over R) to e4m3 with float32 scales q_s, then scores = fp8 dots × q_s[n] × s[j].
- PV: p (in [0, 1]) times s_c[j] / max_j s_c (over the tile) times 448 is rounded to e4m3 (the P
  quantization of FlashAttention-3's and FlashInfer's FP8 paths, with the token scales folded in);
  the tile's scalar max_j s_c / 448 is carried in a running factor g (acc holds out·l / g), so
  the accumulator chains through the dot: acc = dot(p8, c8, acc · alpha · g_old / g_new).
  FP8_PV = False (the default, faster on the H200: `default_config`) runs PV on bf16 instead
  (c8 and p converted).

`mla_decode_fp8_ref` is the model's torch path: the cache dequantized, then `mla_decode_ref`'s
float32 math (the kernel's q and p roundings are not part of it; emulate_q rounds q as the kernel
does, for tighter tests).

Only shapes the paged kernel takes (L / 2 and R powers of two in [16, 256]) with P a multiple of
32 (`fp8_shape_ok`); the backend uses the reference elsewhere. context_lens[b] >= 1 as for `mla_decode`.
"""

import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import INTERPRET, num_sms
from ._validate import check_tensor
from .kv_fp8 import FP8_DTYPE, FP8_MAX, KV_FP8_TAIL, dequantize_kv_rows_ref, fp8_scale
from .mla_decode import (
    MAX_SPLITS,
    MIN_TOKENS_PER_SPLIT,
    SHARED_BYTES,
    _paged_shape_ok,
    check_decode_args,
    gluon_config,
    mla_decode_merge_kernel,
    tma_rows_aligned,
)
from .mla_decode import gluon_available as bf16_gluon_available


@triton.jit
def _quantize_rows(x, amax, DTYPE: tl.constexpr):
    """x [M, K] float32 over per-row amax [M] → (x / s rounded to DTYPE, s = amax / 448 or 1)."""
    s = tl.where(amax > 0, amax / 448.0, 1.0)  # [M]
    return tl.clamp(x / s[:, None], -448.0, 448.0).to(DTYPE), s


@triton.jit
def _fp8_softmax(scores, s_c, m_i, l_i, g_i, valid):
    """Online-softmax step on scaled, masked scores [BH, BN] (log2 domain) with the tile's latent
    scales s_c [BN] folded into p: (p in [0, 448] float32, acc's rescale [BH], m, l, g)."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # [BH]
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])  # [BH, BN] in [0, 1]
    l_new = l_i * alpha + tl.sum(p, axis=1)
    s_max = tl.max(tl.where(valid, s_c, 0.0), axis=0)  # > 0: every tile holds a valid token
    g_new = s_max / 448.0
    pv = p * (s_c * (448.0 / s_max))[None, :]  # [BH, BN] in [0, 448]
    return pv, alpha * (g_i / g_new), m_new, l_new, g_new


@triton.jit
def _fp8_tile_step(
    q0, q1, q_pe, q_s, qpe_s, c0, c1, k_pe, s_c, s_r, m_i, l_i, g_i, acc0, acc1, valid,
    FP8_PV: tl.constexpr, SPLIT_SCORES: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """One [BN]-token tile: scores (log2 domain, q's scales carry softmax_scale·log2 e), the online
    softmax, P rounded to e4m3 with the token scales folded in, PV into acc0/acc1. Each dot is
    scaled before the sum, so that Triton does not chain them through one accumulator."""
    scores = (tl.dot(q0, tl.trans(c0)) * s_c[None, :] + tl.dot(q1, tl.trans(c1)) * s_c[None, :]) * q_s[
        :, None
    ] + tl.dot(q_pe, tl.trans(k_pe)) * s_r[None, :] * qpe_s[:, None]  # [BH, BN]
    if MASKED:
        scores = tl.where(valid[None, :], scores, float("-inf"))
    if SPLIT_SCORES:
        # As in mla_decode_paged_kernel: both sides compute the same; the branch hides from
        # Triton that the scores feed a dot, so their dots are split across the warpgroups.
        if g_i > 0:
            p, rescale, m_new, l_new, g_new = _fp8_softmax(scores, s_c, m_i, l_i, g_i, valid)
        else:
            p, rescale, m_new, l_new, g_new = _fp8_softmax(scores, s_c, m_i, l_i, g_i, valid)
    else:
        p, rescale, m_new, l_new, g_new = _fp8_softmax(scores, s_c, m_i, l_i, g_i, valid)
    if FP8_PV:
        p8 = p.to(c0.dtype)
        acc0 = tl.dot(p8, c0, acc0 * rescale[:, None])  # [BH, L/2]
        acc1 = tl.dot(p8, c1, acc1 * rescale[:, None])
    else:
        pb = p.to(tl.bfloat16)
        acc0 = tl.dot(pb, c0.to(tl.bfloat16), acc0 * rescale[:, None])
        acc1 = tl.dot(pb, c1.to(tl.bfloat16), acc1 * rescale[:, None])
    return m_new, l_new, g_new, acc0, acc1


@triton.jit
def mla_decode_fp8_kernel(
    q_nope_ptr,  # [B, N, L] bf16/fp16/fp32
    q_pe_ptr,  # [B, N, R]
    kv_ptr,  # [NP * P, C + TAIL] float8_e4m3fn
    scale_ptr,  # the same memory as float32 [NP * P, (C + TAIL) / 4]
    ckv_desc,  # TMA descriptor of c_kv ([NP * P, L] view, block [BN, L / 2]); None: pointer loads
    kpe_desc,  # TMA descriptor of k_pe ([NP * P, R] view, block [BN, R]); None: pointer loads
    page_table_ptr,  # [B, W] int32
    context_lens_ptr,  # [B] int32
    o_ptr,  # [B, N, Sp, L] float32 partials, or the [B, N, L] output when Sp == 1
    lse_ptr,  # [B, N, Sp] float32 (unused when Sp == 1)
    scale_log2,  # softmax_scale * log2(e)
    N,
    L,
    P,
    stride_qb,
    stride_qh,
    stride_peb,
    stride_peh,
    stride_pt,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    NUM_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HALF_L: tl.constexpr,
    R: tl.constexpr,
    TAIL: tl.constexpr,
    FP8_PV: tl.constexpr,
    SPLIT_SCORES: tl.constexpr,
):
    heads = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    head_mask = heads < N
    offs_l = tl.arange(0, HALF_L)  # [L/2]
    offs_r = tl.arange(0, R)  # [R]
    slots = tl.arange(0, BLOCK_N)  # [BN]
    C = L + R
    ROW = C + TAIL  # bytes of a token row
    SROW = ROW // 4  # float32 entries of a token row
    FP8 = kv_ptr.dtype.element_ty

    context_len = tl.load(context_lens_ptr + b)
    split_len = tl.cdiv(tl.cdiv(context_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, context_len)
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N

    # q rows quantized per head; the softmax scale (log2 domain) rides on their scales.
    q_row = q_nope_ptr + b * stride_qb + heads[:, None] * stride_qh  # [BH, 1]
    q0 = tl.load(q_row + offs_l[None, :], mask=head_mask[:, None], other=0.0).to(tl.float32)  # [BH, L/2]
    q1 = tl.load(q_row + HALF_L + offs_l[None, :], mask=head_mask[:, None], other=0.0).to(tl.float32)
    q_pe = tl.load(
        q_pe_ptr + b * stride_peb + heads[:, None] * stride_peh + offs_r[None, :],
        mask=head_mask[:, None],
        other=0.0,
    ).to(tl.float32)  # [BH, R]
    amax = tl.maximum(tl.max(tl.abs(q0), axis=1), tl.max(tl.abs(q1), axis=1))  # [BH]
    s = tl.where(amax > 0, amax / 448.0, 1.0)
    q0 = tl.clamp(q0 / s[:, None], -448.0, 448.0).to(FP8)
    q1 = tl.clamp(q1 / s[:, None], -448.0, 448.0).to(FP8)
    q_s = s * scale_log2
    q_pe, qpe_s = _quantize_rows(q_pe, tl.max(tl.abs(q_pe), axis=1), FP8)
    qpe_s = qpe_s * scale_log2

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    g_i = tl.max(tl.full((BLOCK_H,), 1.0, tl.float32), axis=0)  # acc holds (Σ p · s_c · c) / g_i
    acc0 = tl.zeros((BLOCK_H, HALF_L), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_H, HALF_L), dtype=tl.float32)
    all_valid = slots >= 0
    page_row = page_table_ptr + b * stride_pt
    next_page = tl.load(page_row + start // P, mask=start < full_end, other=0)
    for block_start in range(start, full_end, BLOCK_N):
        page = next_page
        next_page = tl.load(
            page_row + (block_start + BLOCK_N) // P, mask=block_start + BLOCK_N < full_end, other=0
        )
        row0 = page.to(tl.int64) * P + block_start % P  # first row of the tile in [NP * P, ROW]
        if ckv_desc is not None:
            c0 = ckv_desc.load([row0.to(tl.int32), 0])  # [BN, L/2]
            c1 = ckv_desc.load([row0.to(tl.int32), HALF_L])
            k_pe = kpe_desc.load([row0.to(tl.int32), 0])  # [BN, R]
        else:
            rows = kv_ptr + (row0 + slots) * ROW  # [BN]
            c0 = tl.load(rows[:, None] + offs_l[None, :])  # [BN, L/2]
            c1 = tl.load(rows[:, None] + HALF_L + offs_l[None, :])
            k_pe = tl.load(rows[:, None] + L + offs_r[None, :])  # [BN, R]
        srows = scale_ptr + (row0 + slots) * SROW + C // 4  # [BN]
        s_c = tl.load(srows)
        s_r = tl.load(srows + 1)
        m_i, l_i, g_i, acc0, acc1 = _fp8_tile_step(
            q0, q1, q_pe, q_s, qpe_s, c0, c1, k_pe, s_c, s_r, m_i, l_i, g_i, acc0, acc1, all_valid,
            FP8_PV, SPLIT_SCORES, False,
        )  # fmt: skip

    if full_end < end:
        valid = full_end + slots < end  # [BN]
        page = tl.load(page_row + full_end // P).to(tl.int64)
        row_idx = page * P + full_end % P + slots  # [BN]
        rows = kv_ptr + row_idx * ROW
        c0 = tl.load(rows[:, None] + offs_l[None, :], mask=valid[:, None], other=0.0)
        c1 = tl.load(rows[:, None] + HALF_L + offs_l[None, :], mask=valid[:, None], other=0.0)
        k_pe = tl.load(rows[:, None] + L + offs_r[None, :], mask=valid[:, None], other=0.0)
        srows = scale_ptr + row_idx * SROW + C // 4
        s_c = tl.load(srows, mask=valid, other=0.0)
        s_r = tl.load(srows + 1, mask=valid, other=0.0)
        m_i, l_i, g_i, acc0, acc1 = _fp8_tile_step(
            q0, q1, q_pe, q_s, qpe_s, c0, c1, k_pe, s_c, s_r, m_i, l_i, g_i, acc0, acc1, valid,
            FP8_PV, False, True,
        )  # fmt: skip

    nonempty = l_i > 0
    inv_l = g_i / tl.where(nonempty, l_i, 1.0)
    o_ptrs = o_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_l[None, :]
    tl.store(o_ptrs, (acc0 * inv_l[:, None]).to(o_ptr.dtype.element_ty), mask=head_mask[:, None])
    tl.store(o_ptrs + HALF_L, (acc1 * inv_l[:, None]).to(o_ptr.dtype.element_ty), mask=head_mask[:, None])
    if NUM_SPLITS > 1:
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=head_mask)


def fp8_shape_ok(L: int, R: int, P: int) -> bool:
    """Whether `mla_decode_fp8` takes these dims: the paged kernel's (L / 2 and R powers of two in
    [16, 256]) with P a multiple of 32 (an e4m3 dot's K is at least 32; DeepSeek's 512, 64, 64 do)."""
    return P % 32 == 0 and _paged_shape_ok(L, R, P, 32)


def default_config(B: int, N: int, L: int, R: int, P: int, max_context: int, num_sms: int) -> dict:
    """Tiles and splits for a launch (bench/kernels.py times the VARIANTS beside it).

    PV on bf16 (FP8_PV = False): measured on the H200 (2026-12-02, 256 x 2000) 778 us against
    1907 us with PV on FP8 tensor cores, whose B operand (the latent tile, MN-major) wgmma cannot
    take in e4m3 without a transpose; QK^T stays on FP8. Both are slower than the bf16 kernel
    (451 us): docs/PERF.md, "FP8 KV cache".

    As `mla_decode.default_config`'s paged choice: 64 heads as two warpgroups (8 warps), splits
    filling one wave, but 32-token tiles in 4 stages: compiled for sm_90 with Triton 3.9, the
    64-token tile spills (~30 spill loads at 255 registers) and the 32-token one does not (254
    registers, 79 KB of shared memory). Pointer loads (cp.async); TMA is a variant."""
    block_h = min(64, max(16, triton.next_power_of_2(N)))
    programs = max(B, 1) * triton.cdiv(N, block_h)  # B = 0 (an idle rank): no launch, any splits
    splits = max(1, min(num_sms // programs, triton.cdiv(max_context, MIN_TOKENS_PER_SPLIT), MAX_SPLITS))
    block_n = 32
    cfg = dict(
        BLOCK_H=block_h, BLOCK_N=block_n, NUM_SPLITS=splits, TMA=False, FP8_PV=False, SPLIT_SCORES=True,
        num_warps=8, num_stages=4,
    )  # fmt: skip
    while cfg["num_stages"] > 1 and (
        block_h * (L + R) + cfg["num_stages"] * block_n * (L + R) + 2 * block_h * block_n > SHARED_BYTES
    ):
        cfg["num_stages"] -= 1
    return cfg


# Alternatives to `default_config`'s choice ("ptr-bf16pv-32x4") that bench/kernels.py times beside it.
VARIANTS: dict[str, dict] = {
    "ptr-fp8pv-32x4": dict(TMA=False, FP8_PV=True, SPLIT_SCORES=True, BLOCK_N=32, num_stages=4),
    "ptr-fp8pv-32x3": dict(TMA=False, FP8_PV=True, SPLIT_SCORES=True, BLOCK_N=32, num_stages=3),
    "tma-fp8pv-32x4": dict(TMA=True, FP8_PV=True, SPLIT_SCORES=True, BLOCK_N=32, num_stages=4),
    "ptr-fp8pv-64x3": dict(TMA=False, FP8_PV=True, SPLIT_SCORES=True, BLOCK_N=64, num_stages=3),
    "tma-fp8pv-64x3": dict(TMA=True, FP8_PV=True, SPLIT_SCORES=True, BLOCK_N=64, num_stages=3),
    "ptr-bf16pv-32x4": dict(TMA=False, FP8_PV=False, SPLIT_SCORES=True, BLOCK_N=32, num_stages=4),
    "ptr-fp8pv-nosplit-32x4": dict(TMA=False, FP8_PV=True, SPLIT_SCORES=False, BLOCK_N=32, num_stages=4),
}


def _check_fp8_cache(op, kv_cache, q_nope, L, R) -> None:
    check_tensor(
        op,
        "kv_cache",
        kv_cache,
        ndim=3,
        dims="[num_pages, P, L + R + 16]",
        dtypes=(FP8_DTYPE,),
        device=q_nope.device,
    )
    if kv_cache.shape[2] != L + R + KV_FP8_TAIL or (L + R) % 4:
        raise ValueError(
            f"{op}: kv_cache has shape {tuple(kv_cache.shape)}, expected [num_pages, P, L + R + {KV_FP8_TAIL}] "
            f"with L + R = {L + R} a multiple of 4 (an FP8 cache: kernels/kv_fp8.py)"
        )


def _check_args(op, q_nope, q_pe, kv_cache, page_table, context_lens, softmax_scale, num_splits) -> None:
    check_decode_args(
        op, q_nope, q_pe, kv_cache, page_table, context_lens, softmax_scale, num_splits, _check_fp8_cache
    )


def mla_decode_fp8(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: torch.Tensor,
    context_lens: torch.Tensor,
    softmax_scale: float,
    num_splits: int | None = None,
    gluon: bool = False,
) -> torch.Tensor:
    """`mla_decode` over an FP8 cache [num_pages, P, L + R + 16] float8_e4m3fn (kernels/kv_fp8.py);
    returns [B, N, L] in q's dtype. q_nope [B, N, L], q_pe [B, N, R] bf16/fp16/fp32 (quantized
    to e4m3 per head inside the kernel); page_table, context_lens as for `mla_decode`. Only the
    dims `fp8_shape_ok` accepts (ValueError otherwise: use `mla_decode_fp8_ref`).
    gluon: run kernels/mla_decode_fp8_gluon.py's kernel (both GEMMs on FP8 tensor cores) where it
    takes the dims (the backend passes True on a Hopper GPU whose Triton has Gluon: `gluon_available`)."""
    _check_args("mla_decode_fp8", q_nope, q_pe, kv_cache, page_table, context_lens, softmax_scale, num_splits)
    B, N, L = q_nope.shape
    R, P = q_pe.shape[2], kv_cache.shape[1]
    cfg = default_config(B, N, L, R, P, page_table.shape[1] * P, num_sms(q_nope.device))
    if num_splits is not None:
        cfg["NUM_SPLITS"] = num_splits
    if gluon and q_nope.is_cuda and not INTERPRET and _gluon_takes(kv_cache, L, R, P):
        cfg = gluon_config(cfg)
    return mla_decode_fp8_with_config(q_nope, q_pe, kv_cache, page_table, context_lens, softmax_scale, cfg)


def mla_decode_fp8_gluon(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: torch.Tensor,
    context_lens: torch.Tensor,
    softmax_scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """`mla_decode_fp8` with gluon=True, under its own name (the backend's choice on a Hopper GPU
    whose Triton has Gluon, logged by that name)."""
    return mla_decode_fp8(
        q_nope, q_pe, kv_cache, page_table, context_lens, softmax_scale, num_splits, gluon=True
    )


def gluon_available(device: torch.device) -> tuple[bool, str]:
    """Whether the Gluon FP8 kernel can run on `device` (a Hopper GPU, this Triton's Gluon), and why not."""
    return bf16_gluon_available(device, "mla_decode_fp8_gluon")


def _gluon_takes(kv_cache: torch.Tensor, L: int, R: int, P: int) -> bool:
    """The Gluon kernel's dims (kernels/mla_decode_fp8_gluon.py `shapes_ok`) and TMA's alignment."""
    from . import mla_decode_fp8_gluon

    return tma_rows_aligned(kv_cache) and mla_decode_fp8_gluon.shapes_ok(L, R, P)


def variant_config(cfg: dict, name: str) -> dict:
    """`cfg` (from `default_config`) with the tiles and options of `VARIANTS[name]`, splits kept."""
    return cfg | VARIANTS[name]


def mla_decode_fp8_with_config(
    q_nope, q_pe, kv_cache, page_table, context_lens, softmax_scale, cfg
) -> torch.Tensor:
    """`mla_decode_fp8` on checked arguments with the tiles `cfg` (as `default_config` returns;
    cfg["VARIANT"] "gluon": kernels/mla_decode_fp8_gluon.py's kernel, cfg["NUM_SPLITS"] only)."""
    B, N, L = q_nope.shape
    R, P = q_pe.shape[2], kv_cache.shape[1]
    gluon = cfg.get("VARIANT") == "gluon"
    if gluon and not _gluon_takes(kv_cache, L, R, P):
        raise ValueError(
            f"mla_decode_fp8: the Gluon kernel needs L / 2 in (64, 128, 256), R in (32, 64, 128), P a multiple "
            f"of 64 and a 16-byte aligned cache, got L {L}, R {R}, P {P}; use the Triton kernel (gluon=False)"
        )
    if not gluon and not _paged_shape_ok(L, R, P, cfg["BLOCK_N"]):
        raise ValueError(
            f"mla_decode_fp8: needs L / 2 and R powers of two in [16, 256] and P a multiple of BLOCK_N, got "
            f"L {L}, R {R}, P {P}, BLOCK_N {cfg['BLOCK_N']}; use mla_decode_fp8_ref"
        )
    out = torch.empty(B, N, L, dtype=q_nope.dtype, device=q_nope.device)  # [B, N, L]
    if B == 0:
        return out
    S = cfg["NUM_SPLITS"]
    if S == 1:
        o, lse = out, out
        o_strides, lse_strides = (out.stride(0), out.stride(1), 0), (0, 0)
    else:
        o = torch.empty(B, N, S, L, dtype=torch.float32, device=q_nope.device)  # [B, N, Sp, L]
        lse = torch.empty(B, N, S, dtype=torch.float32, device=q_nope.device)  # [B, N, Sp]
        o_strides, lse_strides = (o.stride(0), o.stride(1), o.stride(2)), (lse.stride(0), lse.stride(1))
    if gluon:
        from . import mla_decode_fp8_gluon

        scale_log2 = softmax_scale * math.log2(math.e)
        mla_decode_fp8_gluon.launch(
            q_nope, q_pe, kv_cache, page_table, context_lens, scale_log2, o, lse, o_strides, lse_strides, S
        )
    else:
        _launch_triton(
            q_nope,
            q_pe,
            kv_cache,
            page_table,
            context_lens,
            softmax_scale,
            cfg,
            o,
            lse,
            o_strides,
            lse_strides,
        )
    if S > 1:
        mla_decode_merge_kernel[(B, N)](
            o, lse, out, L, o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
            out.stride(0), out.stride(1),
            NUM_SPLITS=S, BLOCK_S=triton.next_power_of_2(S), BLOCK_L=max(16, triton.next_power_of_2(L)), num_warps=4,
        )  # fmt: skip
    return out


def _launch_triton(
    q_nope, q_pe, kv_cache, page_table, context_lens, softmax_scale, cfg, o, lse, o_strides, lse_strides
):
    """`mla_decode_fp8_kernel` over checked arguments into `o` and `lse` (as the Gluon launch)."""
    B, N, L = q_nope.shape
    R, P = q_pe.shape[2], kv_cache.shape[1]
    S = cfg["NUM_SPLITS"]
    rows = kv_cache.view(-1, kv_cache.shape[2])  # [NP * P, C + 16]
    ckv_desc = kpe_desc = None
    if cfg["TMA"] and rows.data_ptr() % 16 == 0 and rows.shape[1] % 16 == 0:
        ckv_desc = TensorDescriptor(rows, [rows.shape[0], L], [rows.shape[1], 1], [cfg["BLOCK_N"], L // 2])
        kpe_desc = TensorDescriptor(rows[:, L:], [rows.shape[0], R], [rows.shape[1], 1], [cfg["BLOCK_N"], R])
    tiles = {k: v for k, v in cfg.items() if k != "TMA"}
    grid = (triton.cdiv(N, cfg["BLOCK_H"]), S, B)
    mla_decode_fp8_kernel[grid](
        q_nope, q_pe, rows, rows.view(torch.float32), ckv_desc, kpe_desc, page_table, context_lens, o, lse,
        softmax_scale * math.log2(math.e), N, L, P,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1), page_table.stride(0),
        *o_strides, *lse_strides,
        HALF_L=L // 2, R=R, TAIL=KV_FP8_TAIL, **tiles,
    )  # fmt: skip


def quantize_q_ref(q: torch.Tensor) -> torch.Tensor:
    """q [..., K] rounded as the kernel rounds it (per row: amax / 448 scale, e4m3), in float32."""
    s = fp8_scale(q.float().abs().amax(dim=-1, keepdim=True))  # [..., 1]
    return (q.float() / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * s


def mla_decode_fp8_ref(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: torch.Tensor,
    context_lens: torch.Tensor,
    softmax_scale: float,
    emulate_q: bool = False,
) -> torch.Tensor:
    """Torch reference of `mla_decode_fp8`: each sequence's context rows gathered and dequantized,
    softmax in float32 (emulate_q: q_nope and q_pe first rounded per head as the kernel does).

    Raises ValueError if a context length is < 1 or beyond the page table (one host sync)."""
    _check_args("mla_decode_fp8_ref", q_nope, q_pe, kv_cache, page_table, context_lens, softmax_scale, None)
    B, N, L = q_nope.shape
    P = kv_cache.shape[1]
    out = torch.empty(B, N, L, dtype=q_nope.dtype, device=q_nope.device)  # [B, N, L]
    if B == 0:
        return out
    lo, hi = int(context_lens.min()), int(context_lens.max())
    if lo < 1 or hi > page_table.shape[1] * P:
        raise ValueError(
            f"mla_decode_fp8_ref: context_lens must lie in [1, max_pages * P = {page_table.shape[1] * P}], "
            f"got min {lo}, max {hi}"
        )
    qn = quantize_q_ref(q_nope) if emulate_q else q_nope.float()  # [B, N, L]
    qp = quantize_q_ref(q_pe) if emulate_q else q_pe.float()  # [B, N, R]
    for b, n in enumerate(context_lens.tolist()):
        # Only the context's rows: slots past it may hold any bits (NaN times a zero weight is NaN).
        pages = page_table[b, : triton.cdiv(n, P)].long()
        rows = kv_cache[pages].reshape(-1, kv_cache.shape[2])[:n]  # [n, C + 16]
        kv = dequantize_kv_rows_ref(rows, L, torch.float32)  # [n, C]
        c_kv, k_pe = kv[:, :L], kv[:, L:]
        scores = (qn[b] @ c_kv.T + qp[b] @ k_pe.T) * softmax_scale  # [N, n]
        out[b] = (torch.softmax(scores, dim=-1) @ c_kv).to(q_nope.dtype)
    return out
