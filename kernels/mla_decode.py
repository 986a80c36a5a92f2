"""Paged MLA decode in the absorbed form, over the latent KV cache (split-K / flash-decoding).

Shapes: the legend in docs/ARCHITECTURE.md (B decode sequences of one query token each, N, L, R,
P, Sp context splits, NP, W).

    scores[b, n, j] = (q_nope[b, n] · c_kv[b, j] + q_pe[b, n] · k_pe[b, j]) * softmax_scale
    out[b, n]       = Σ_j softmax_j(scores[b, n]) · c_kv[b, j]           for j < context_lens[b]

Token j of sequence b lives at kv_cache[page_table[b, j // P], j % P]: c_kv in the first L
entries, k_pe in the last R. The caller has multiplied q_nope by W_UK and multiplies out by W_UV.

All heads attend to the same latent K (= V) per token, so a program takes BLOCK_H heads (64) as
the M dimension of its dots: each [BLOCK_N, L] tile of c_kv is loaded once per program and
serves both the scores and the weighted sum. The two head blocks of N = 128 read the same tiles
(the second mostly from L2: head blocks vary fastest in launch order); all 128 heads in one
program would need a [128, 512] fp32 accumulator, 256 registers a thread with 8 warps.

Two kernels: `mla_decode_paged_kernel` for caches whose pages hold whole tiles (DeepSeek's
P = 64; TMA tiles, pipelined, the scores dot split across warpgroups), and `mla_decode_kernel`
for any shape (masked loads, one page-table entry per token unless PAGE_ALIGNED). `default_config`
chooses; `VARIANTS` names the alternatives that bench/sweep_mla.py times.

Programs also split each sequence's context into Sp equal parts (Sp chosen from the shapes so
that head blocks x Sp x B fills the SMs); each writes its normalized partial output and
log-sum-exp (equivalent to the running max, sum and accumulator) in float32, and a second
kernel merges them. With Sp = 1 the first kernel writes the output directly.

context_lens[b] must be >= 1 (the engine never sends an empty sequence): a row with 0 tokens
has no softmax; the kernel leaves NaN there and the reference raises.
"""

import math

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import INTERPRET, num_sms
from ._validate import FLOAT_DTYPES, check_tensor

MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 64


@triton.jit
def mla_decode_kernel(
    q_nope_ptr,  # [B, N, L]
    q_pe_ptr,  # [B, N, R]
    kv_ptr,  # [NP, P, L + R]
    page_table_ptr,  # [B, W] int32
    context_lens_ptr,  # [B] int32
    o_ptr,  # [B, N, Sp, L] float32 partials, or the [B, N, L] output when Sp == 1
    lse_ptr,  # [B, N, Sp] float32 log2-sum-exp of the scaled scores (unused when Sp == 1)
    scale_log2,  # softmax_scale * log2(e)
    N,
    L,
    R,
    P,
    stride_qb,
    stride_qh,
    stride_peb,
    stride_peh,
    stride_kv_page,
    stride_kv_slot,
    stride_pt,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    NUM_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PAGE_ALIGNED: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    # Head blocks vary fastest in launch order, so the programs that read the same c_kv tiles run
    # together and all but the first find them in L2.
    heads = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    head_mask = heads < N
    offs_l = tl.arange(0, BLOCK_L)  # [BL]
    offs_r = tl.arange(0, BLOCK_R)  # [BR]
    l_mask = offs_l < L
    r_mask = offs_r < R

    context_len = tl.load(context_lens_ptr + b)
    split_len = tl.cdiv(tl.cdiv(context_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, context_len)

    q = tl.load(
        q_nope_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_l[None, :],
        mask=head_mask[:, None] & l_mask[None, :],
        other=0.0,
    )  # [BH, BL]
    q_pe = tl.load(
        q_pe_ptr + b * stride_peb + heads[:, None] * stride_peh + offs_r[None, :],
        mask=head_mask[:, None] & r_mask[None, :],
        other=0.0,
    )  # [BH, BR]
    if DOT_FP32:
        q = q.to(tl.float32)
        q_pe = q_pe.to(tl.float32)

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)  # running max, log2 domain
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)  # running sum of exp2
    acc = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
    slots = tl.arange(0, BLOCK_N)  # [BN]
    for block_start in range(start, end, BLOCK_N):
        pos = block_start + slots  # [BN]
        pos_mask = pos < end
        if PAGE_ALIGNED:
            # P % BLOCK_N == 0 and blocks start at multiples of BLOCK_N: the block lies in one page,
            # so one page-table entry and one base address serve the whole [BN, L + R] tile.
            page = tl.load(page_table_ptr + b * stride_pt + block_start // P).to(tl.int64)
            kv_block = kv_ptr + page * stride_kv_page + (block_start % P) * stride_kv_slot
            row_ptrs = kv_block + slots * stride_kv_slot  # [BN]
        else:
            page = tl.load(page_table_ptr + b * stride_pt + pos // P, mask=pos_mask, other=0)  # [BN]
            row_ptrs = kv_ptr + page.to(tl.int64) * stride_kv_page + (pos % P) * stride_kv_slot  # [BN]
        c_kv = tl.load(
            row_ptrs[:, None] + offs_l[None, :], mask=pos_mask[:, None] & l_mask[None, :], other=0.0
        )  # [BN, BL]
        k_pe = tl.load(
            row_ptrs[:, None] + L + offs_r[None, :], mask=pos_mask[:, None] & r_mask[None, :], other=0.0
        )  # [BN, BR]
        if DOT_FP32:
            c_kv = c_kv.to(tl.float32)
            k_pe = k_pe.to(tl.float32)
        scores = tl.dot(q, tl.trans(c_kv))  # [BH, BN]
        scores = tl.dot(q_pe, tl.trans(k_pe), scores)
        scores = tl.where(pos_mask[None, :], scores * scale_log2, float("-inf"))
        # Every block holds at least one valid position, so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # [BH]
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])  # [BH, BN]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(c_kv.dtype), c_kv, acc * alpha[:, None])  # [BH, BL]
        m_i = m_new

    # An empty split (short sequence) stores lse = -inf and zeros, which the merge weighs by 0.
    nonempty = l_i > 0
    out = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    o_ptrs = o_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_l[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=head_mask[:, None] & l_mask[None, :])
    if NUM_SPLITS > 1:
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=head_mask)


@triton.jit
def _softmax_update(scores, m_i, l_i, P_DTYPE: tl.constexpr):
    """Online-softmax step on scaled, masked scores [BH, BN] (log2 domain): (p, alpha, m, l)."""
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))  # [BH]
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])  # [BH, BN]
    return p.to(P_DTYPE), alpha, m_new, l_i * alpha + tl.sum(p, axis=1)


@triton.jit
def mla_decode_paged_kernel(
    q_nope_ptr,  # [B, N, L]
    q_pe_ptr,  # [B, N, R]
    kv_ptr,  # [NP, P, L + R]
    ckv_desc,  # TMA descriptor of c_kv, kv_cache viewed as [NP * P, L], block [BN, L / 2]; None: pointers
    kpe_desc,  # TMA descriptor of k_pe, kv_cache viewed as [NP * P, R], block [BN, R]; None: pointers
    page_table_ptr,  # [B, W] int32
    context_lens_ptr,  # [B] int32
    o_ptr,  # [B, N, Sp, L] float32 partials, or the [B, N, L] output when Sp == 1
    lse_ptr,  # [B, N, Sp] float32 log2-sum-exp of the scaled scores (unused when Sp == 1)
    scale_log2,  # softmax_scale * log2(e)
    N,
    L,
    P,
    stride_qb,
    stride_qh,
    stride_peb,
    stride_peh,
    stride_kv_page,
    stride_kv_slot,
    stride_pt,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    NUM_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HALF_L: tl.constexpr,  # L / 2, a power of two <= 256 (a TMA box)
    R: tl.constexpr,  # a power of two <= 256
    SPLIT_SCORES: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """`mla_decode_kernel` for P % BLOCK_N == 0: full tiles stream without masks (TMA when the
    descriptors are given, else plain loads that the pipeliner turns into cp.async), the latent
    in two halves of L / 2 (two [BH, L / 2] accumulators, each c_kv half one TMA box), and the one
    partial tile of a split (the context's end) loaded with masks after the loop, so that slots
    past the context (stale or garbage, even inf) never reach a dot.

    SPLIT_SCORES puts the softmax of a full tile inside a branch whose two sides compute the
    same. Triton lays out a dot whose result feeds another dot (found by following uses) with
    all warps along M; with 64 heads and 8 warps, both warpgroups then compute the same
    [BH, BN] scores (q @ c_kv^T is 53% of the FLOPs). Uses inside a branch's region do not lead
    to the branch's results, so the scores dots get the plain layout, split along BN (each
    warpgroup BN / 2 tokens), and p goes to the other dot's layout through 8 KB of shared memory.

    Pipelining, as compiled by Triton 3.6 for sm_90: the tile loads run num_stages - 1 tiles
    ahead (64-token tiles: 2 stages fit; 32-token tiles: 3), issued after the step's last dot.
    """
    heads = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    head_mask = heads < N
    offs_l = tl.arange(0, HALF_L)  # [L/2]
    offs_r = tl.arange(0, R)  # [R]
    slots = tl.arange(0, BLOCK_N)  # [BN]

    context_len = tl.load(context_lens_ptr + b)
    split_len = tl.cdiv(tl.cdiv(context_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, context_len)
    full_end = start + tl.maximum(end - start, 0) // BLOCK_N * BLOCK_N  # tiles before lie within the context

    q_row = q_nope_ptr + b * stride_qb + heads[:, None] * stride_qh  # [BH, 1]
    q0 = tl.load(q_row + offs_l[None, :], mask=head_mask[:, None], other=0.0)  # [BH, L/2]
    q1 = tl.load(q_row + HALF_L + offs_l[None, :], mask=head_mask[:, None], other=0.0)  # [BH, L/2]
    q_pe = tl.load(
        q_pe_ptr + b * stride_peb + heads[:, None] * stride_peh + offs_r[None, :],
        mask=head_mask[:, None],
        other=0.0,
    )  # [BH, R]
    if DOT_FP32:
        q0, q1, q_pe = q0.to(tl.float32), q1.to(tl.float32), q_pe.to(tl.float32)

    m_i = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)  # running max, log2 domain
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)  # running sum of exp2
    acc0 = tl.zeros((BLOCK_H, HALF_L), dtype=tl.float32)  # latent [0, L/2)
    acc1 = tl.zeros((BLOCK_H, HALF_L), dtype=tl.float32)  # latent [L/2, L)
    # The page of the next tile is loaded a step ahead, so that no load feeds this step's tile
    # load (the pipeliner would split its stages between the two loads).
    page_row = page_table_ptr + b * stride_pt  # [W] int32
    next_page = tl.load(page_row + start // P, mask=start < full_end, other=0)
    for block_start in range(start, full_end, BLOCK_N):
        # The tile lies in one page: one page-table entry, BN contiguous rows of the cache.
        page = next_page
        next_page = tl.load(
            page_row + (block_start + BLOCK_N) // P, mask=block_start + BLOCK_N < full_end, other=0
        )
        if ckv_desc is not None:
            row = page * P + block_start % P  # row of kv_cache viewed as [NP * P, L + R]
            c0 = ckv_desc.load([row, 0])  # [BN, L/2]
            c1 = ckv_desc.load([row, HALF_L])  # [BN, L/2]
            k_pe = kpe_desc.load([row, 0])  # [BN, R]
        else:
            rows = kv_ptr + page.to(tl.int64) * stride_kv_page + (block_start % P + slots) * stride_kv_slot
            c0 = tl.load(rows[:, None] + offs_l[None, :])  # [BN, L/2]
            c1 = tl.load(rows[:, None] + HALF_L + offs_l[None, :])  # [BN, L/2]
            k_pe = tl.load(rows[:, None] + L + offs_r[None, :])  # [BN, R]
        if DOT_FP32:
            c0, c1, k_pe = c0.to(tl.float32), c1.to(tl.float32), k_pe.to(tl.float32)
        if SPLIT_SCORES:
            # Three dots each scaled, then summed: Triton folds `dot + x` into a dot chained through
            # its accumulator, which would count as dot-feeds-dot (see the docstring).
            scores = (
                tl.dot(q0, tl.trans(c0)) * scale_log2
                + tl.dot(q1, tl.trans(c1)) * scale_log2
                + tl.dot(q_pe, tl.trans(k_pe)) * scale_log2
            )  # [BH, BN]
        else:
            scores = tl.dot(q0, tl.trans(c0))  # [BH, BN]
            scores = tl.dot(q1, tl.trans(c1), scores)
            scores = tl.dot(q_pe, tl.trans(k_pe), scores) * scale_log2
        if SPLIT_SCORES:
            # Both branches compute the same: the branch only hides the chain (see the docstring).
            if context_len > 0:
                p, alpha, m_new, l_new = _softmax_update(scores, m_i, l_i, c0.dtype)
            else:
                p, alpha, m_new, l_new = _softmax_update(scores, m_i, l_i, c0.dtype)
        else:
            p, alpha, m_new, l_new = _softmax_update(scores, m_i, l_i, c0.dtype)
        acc0 = tl.dot(p, c0, acc0 * alpha[:, None])  # [BH, L/2]
        acc1 = tl.dot(p, c1, acc1 * alpha[:, None])
        m_i, l_i = m_new, l_new

    if full_end < end:
        pos_mask = full_end + slots < end  # [BN]
        page = tl.load(page_table_ptr + b * stride_pt + full_end // P).to(tl.int64)
        rows = kv_ptr + page * stride_kv_page + (full_end % P + slots) * stride_kv_slot  # [BN]
        c0 = tl.load(rows[:, None] + offs_l[None, :], mask=pos_mask[:, None], other=0.0)  # [BN, L/2]
        c1 = tl.load(rows[:, None] + HALF_L + offs_l[None, :], mask=pos_mask[:, None], other=0.0)
        k_pe = tl.load(rows[:, None] + L + offs_r[None, :], mask=pos_mask[:, None], other=0.0)  # [BN, R]
        if DOT_FP32:
            c0, c1, k_pe = c0.to(tl.float32), c1.to(tl.float32), k_pe.to(tl.float32)
        scores = tl.dot(q0, tl.trans(c0))  # [BH, BN]
        scores = tl.dot(q1, tl.trans(c1), scores)
        scores = tl.dot(q_pe, tl.trans(k_pe), scores)
        scores = tl.where(pos_mask[None, :], scores * scale_log2, float("-inf"))
        p, alpha, m_i, l_i = _softmax_update(scores, m_i, l_i, c0.dtype)
        acc0 = tl.dot(p, c0, acc0 * alpha[:, None])
        acc1 = tl.dot(p, c1, acc1 * alpha[:, None])

    nonempty = l_i > 0
    inv_l = 1.0 / tl.where(nonempty, l_i, 1.0)
    o_ptrs = o_ptr + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_l[None, :]
    tl.store(o_ptrs, (acc0 * inv_l[:, None]).to(o_ptr.dtype.element_ty), mask=head_mask[:, None])
    tl.store(o_ptrs + HALF_L, (acc1 * inv_l[:, None]).to(o_ptr.dtype.element_ty), mask=head_mask[:, None])
    if NUM_SPLITS > 1:
        lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + split, lse, mask=head_mask)


@triton.jit
def mla_decode_merge_kernel(
    o_part_ptr,  # [B, N, Sp, L] float32
    lse_ptr,  # [B, N, Sp] float32, log2 domain
    out_ptr,  # [B, N, L]
    L,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    splits = tl.arange(0, BLOCK_S)  # [BS]
    offs_l = tl.arange(0, BLOCK_L)  # [BL]
    l_mask = offs_l < L
    lse_row = lse_ptr + b * stride_lb + h * stride_lh
    lse = tl.load(lse_row + splits, mask=splits < NUM_SPLITS, other=float("-inf"))  # [BS]
    lse_max = tl.max(lse, axis=0)
    denom = tl.sum(tl.exp2(lse - lse_max), axis=0)  # empty splits weigh exp2(-inf) = 0
    # One [BL] row per split, not an [Sp, L] tile: 64 x 512 floats would not fit in registers.
    acc = tl.zeros((BLOCK_L,), dtype=tl.float32)
    o_row = o_part_ptr + b * stride_pb + h * stride_ph + offs_l
    for split in range(NUM_SPLITS):
        weight = tl.exp2(tl.load(lse_row + split) - lse_max)
        acc += weight * tl.load(o_row + split * stride_ps, mask=l_mask, other=0.0)
    out = acc / denom  # [BL]
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_l, out.to(out_ptr.dtype.element_ty), mask=l_mask)


def default_config(
    B: int, N: int, L: int, R: int, P: int, itemsize: int, max_context: int, num_sms: int
) -> dict:
    """Tiles and kernel for a launch; the sweep (bench/sweep_mla.py) times the alternatives.

    Measured on an H100 (docs/PERF.md) for the generic kernel: BLOCK_H = 64 heads (two head
    blocks for N = 128; 16 is the smallest dot M) as two warpgroups, BLOCK_N = 64 tokens (one
    page of DeepSeek's P = 64), 8 warps, one stage: 739 us at B = 256 x 2000, 30% of the
    roofline (16 tokens a step spent more time on the softmax than 64 do on spills).

    Guessed, from compiling for sm_90 only (not yet timed): the paged kernel with TMA tiles,
    SPLIT_SCORES and 2 stages. Its 64-token step uses 229 KB of the 227 KiB of shared memory
    (q 72 KB, two 72 KB tiles, p 8 KB), 255 registers and no spills, where the generic kernel
    spills ~75 loads and loads each tile through registers with nothing in flight. Shapes that
    do not suit the paged kernel (L / 2 or R not a power of two in [16, 256], P not a
    multiple of the tile) take the generic one.

    Splits: one program per SM fits, so they make at most one wave: Sp = num_sms // (B x head
    blocks), at least 1, each split at least MIN_TOKENS_PER_SPLIT tokens of the longest possible
    context (page-table width x P, a shape, so no host sync), at most MAX_SPLITS.
    """
    block_h = min(64, max(16, triton.next_power_of_2(N)))
    programs = max(B, 1) * triton.cdiv(N, block_h)  # B = 0 (an idle rank): no launch, any splits
    splits = max(1, min(num_sms // programs, triton.cdiv(max_context, MIN_TOKENS_PER_SPLIT), MAX_SPLITS))
    cfg = dict(VARIANT="generic", BLOCK_H=block_h, BLOCK_N=64, NUM_SPLITS=splits, num_warps=8, num_stages=1)
    block_n = min(64, P & -P)  # the largest power of two dividing P, up to 64
    if _paged_shape_ok(L, R, P, block_n):
        cfg.update(VARIANT="paged", BLOCK_N=block_n, TMA=True, SPLIT_SCORES=True, num_stages=2)
        if _paged_shared_bytes(block_h, L, R, itemsize, cfg) > SHARED_BYTES:
            cfg["num_stages"] = 1
    return cfg


# Named alternatives to `default_config`'s choice, applied over it by `variant_config`: bench/sweep_mla.py
# times each at DeepSeek-V3 shapes and tests/kernels/test_compiles_for_hopper.py compiles each for
# sm_90. "generic-64x1" is the measured baseline; "tma-split-64x2" is `default_config`'s guess.
VARIANTS: dict[str, dict] = {
    "generic-64x1": dict(VARIANT="generic", BLOCK_N=64, num_stages=1),
    "ptr-split-64x2": dict(VARIANT="paged", TMA=False, SPLIT_SCORES=True, BLOCK_N=64, num_stages=2),
    "ptr-split-32x3": dict(VARIANT="paged", TMA=False, SPLIT_SCORES=True, BLOCK_N=32, num_stages=3),
    "tma-64x2": dict(VARIANT="paged", TMA=True, SPLIT_SCORES=False, BLOCK_N=64, num_stages=2),
    "tma-split-64x1": dict(VARIANT="paged", TMA=True, SPLIT_SCORES=True, BLOCK_N=64, num_stages=1),
    "tma-split-64x2": dict(VARIANT="paged", TMA=True, SPLIT_SCORES=True, BLOCK_N=64, num_stages=2),
    "tma-split-32x2": dict(VARIANT="paged", TMA=True, SPLIT_SCORES=True, BLOCK_N=32, num_stages=2),
    "tma-split-32x3": dict(VARIANT="paged", TMA=True, SPLIT_SCORES=True, BLOCK_N=32, num_stages=3),
}


def gluon_config(cfg: dict) -> dict:
    """`cfg` (from `default_config`) for the Gluon kernel: its splits kept (it takes BLOCK_H 64,
    as the Triton kernels at DeepSeek's 128 heads, so the same programs fill the SMs)."""
    return dict(VARIANT="gluon", NUM_SPLITS=cfg["NUM_SPLITS"])


def gluon_available(device: torch.device, module: str = "mla_decode_gluon") -> tuple[bool, str]:
    """Whether the Gluon kernel of kernels/`module`.py can run on `device` (a Hopper GPU, this
    Triton's Gluon), and why not."""
    import importlib

    from .fp8_gemm import gluon_available as gemm_gluon_available

    ok, why = gemm_gluon_available(device)
    if not ok:
        return ok, why
    try:
        importlib.import_module(f"{__package__}.{module}")
    except Exception as e:  # a Triton whose Gluon lacks what the kernel uses
        return False, f"the Gluon kernel of {module} does not import ({type(e).__name__}: {e})"
    return True, why


def tma_rows_aligned(kv_cache: torch.Tensor) -> bool:
    """Whether a cache [NP, P, row] can be TMA-tiled by rows: a 16-byte aligned base and row stride."""
    return kv_cache.data_ptr() % 16 == 0 and kv_cache.shape[2] * kv_cache.element_size() % 16 == 0


def _gluon_takes(kv_cache: torch.Tensor, L: int, R: int, P: int) -> bool:
    """The Gluon kernel's dims (kernels/mla_decode_gluon.py `shapes_ok`) and TMA's alignment."""
    from . import mla_decode_gluon

    return tma_rows_aligned(kv_cache) and mla_decode_gluon.shapes_ok(L, R, P, kv_cache.dtype)


def variant_config(cfg: dict, name: str) -> dict:
    """`cfg` (from `default_config`) with the kernel and tiles of `VARIANTS[name]`, splits kept."""
    return {k: v for k, v in cfg.items() if k not in ("TMA", "SPLIT_SCORES")} | VARIANTS[name]


# Shared memory a program may use on sm_90 (227 KiB), less room for barriers and reductions.
SHARED_BYTES = 227 * 1024 - 2048


def _paged_shape_ok(L: int, R: int, P: int, block_n: int) -> bool:
    """Whether `mla_decode_paged_kernel` takes these dims: halves of L and R are dot/TMA tiles."""
    half_l = L // 2

    def pow2_tile(n: int) -> bool:
        return 16 <= n <= 256 and n & (n - 1) == 0

    return L % 2 == 0 and pow2_tile(half_l) and pow2_tile(R) and block_n >= 16 and P % block_n == 0


def _paged_shared_bytes(block_h: int, L: int, R: int, itemsize: int, cfg: dict) -> int:
    """Estimated shared memory of the paged kernel: q, the pipelined tiles and p."""
    tile = cfg["BLOCK_N"] * (L + R) * itemsize
    return (
        block_h * (L + R) * itemsize + max(1, cfg["num_stages"]) * tile + block_h * cfg["BLOCK_N"] * itemsize
    )


def check_decode_args(
    op, q_nope, q_pe, kv_cache, page_table, context_lens, softmax_scale, num_splits, check_cache
) -> None:
    """The arguments of a paged MLA decode `op`; check_cache(op, kv_cache, q_nope, L, R) checks
    the cache's own layout (this file's, or the FP8 rows of kernels/mla_decode_fp8.py)."""
    check_tensor(op, "q_nope", q_nope, ndim=3, dims="[B, N, L]", dtypes=FLOAT_DTYPES, contiguous="last")
    device = q_nope.device
    B, N, L = q_nope.shape
    check_tensor(
        op, "q_pe", q_pe, ndim=3, dims="[B, N, R]", dtypes=(q_nope.dtype,), device=device, contiguous="last"
    )
    if q_pe.shape[:2] != (B, N):
        raise ValueError(f"{op}: q_pe has shape {tuple(q_pe.shape)}, expected [B, N, R] with B, N = {B}, {N}")
    check_cache(op, kv_cache, q_nope, L, q_pe.shape[2])
    check_tensor(
        op, "page_table", page_table, ndim=2, dims="[B, max_pages]", dtypes=(torch.int32,), device=device
    )
    if page_table.shape[0] != B:
        raise ValueError(
            f"{op}: page_table has shape {tuple(page_table.shape)}, expected [B, max_pages] with B = {B}"
        )
    check_tensor(
        op, "context_lens", context_lens, shape=(B,), dims="[B]", dtypes=(torch.int32,), device=device
    )
    if not (isinstance(softmax_scale, float | int) and softmax_scale > 0):
        raise ValueError(f"{op}: softmax_scale is {softmax_scale!r}, expected a positive float")
    if num_splits is not None and not (isinstance(num_splits, int) and num_splits >= 1):
        raise ValueError(
            f"{op}: num_splits is {num_splits!r}, expected None (choose from the shapes) or an int >= 1"
        )


def _check_cache(op, kv_cache, q_nope, L, R) -> None:
    check_tensor(
        op,
        "kv_cache",
        kv_cache,
        ndim=3,
        dims="[num_pages, P, L + R]",
        dtypes=(q_nope.dtype,),
        device=q_nope.device,
    )
    if kv_cache.shape[2] != L + R:
        raise ValueError(
            f"{op}: kv_cache has shape {tuple(kv_cache.shape)}, expected [num_pages, P, L + R] with L + R = {L + R}"
        )


def mla_decode(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: torch.Tensor,
    context_lens: torch.Tensor,
    softmax_scale: float,
    num_splits: int | None = None,
    gluon: bool = False,
) -> torch.Tensor:
    """Absorbed MLA decode attention over a paged latent cache; returns [B, N, L] in q's dtype.

    q_nope: [B, N, L] (already multiplied by W_UK), q_pe: [B, N, R], kv_cache: [num_pages, P,
    L + R] (c_kv, then k_pe), all one dtype (bf16/fp16/fp32). page_table: [B, max_pages] int32
    (-1 padding past a sequence's pages; pages in any order). context_lens: [B] int32, each >= 1
    and <= max_pages * P (not checked on the device: an empty row gives NaN). q_nope and q_pe
    may be strided views with a contiguous last dimension (e.g. a [N, B, L] product seen as
    [B, N, L]); the rest contiguous, all on one device. num_splits: context splits per sequence, None to choose from the shapes.
    gluon: run kernels/mla_decode_gluon.py's kernel where it takes the dims and the cache is
    16-byte aligned (the backend passes True on a Hopper GPU whose Triton has Gluon: `gluon_available`).
    """
    check_decode_args(
        "mla_decode",
        q_nope,
        q_pe,
        kv_cache,
        page_table,
        context_lens,
        softmax_scale,
        num_splits,
        _check_cache,
    )
    B, N, _ = q_nope.shape
    L, R, P = q_nope.shape[2], q_pe.shape[2], kv_cache.shape[1]
    cfg = default_config(
        B, N, L, R, P, q_nope.element_size(), page_table.shape[1] * P, num_sms(q_nope.device)
    )
    if num_splits is not None:
        cfg["NUM_SPLITS"] = num_splits
    if gluon and q_nope.is_cuda and not INTERPRET and _gluon_takes(kv_cache, L, R, P):
        cfg = gluon_config(cfg)
    return mla_decode_with_config(q_nope, q_pe, kv_cache, page_table, context_lens, softmax_scale, cfg)


def mla_decode_with_config(
    q_nope, q_pe, kv_cache, page_table, context_lens, softmax_scale, cfg
) -> torch.Tensor:
    """`mla_decode` on checked arguments with the kernel and tiles `cfg` (as `default_config` returns).

    cfg["VARIANT"]: "generic" (`mla_decode_kernel`), "paged" (`mla_decode_paged_kernel`, with
    cfg["TMA"] and cfg["SPLIT_SCORES"]) or "gluon" (kernels/mla_decode_gluon.py, its own tiles;
    cfg["NUM_SPLITS"] only); a cfg for dims its kernel does not take raises ValueError.
    TMA falls back to plain loads where the cache's address or row stride is not 16-byte aligned.
    """
    B, N, L = q_nope.shape
    R = q_pe.shape[2]
    P = kv_cache.shape[1]
    out = torch.empty(B, N, L, dtype=q_nope.dtype, device=q_nope.device)  # [B, N, L]
    if B == 0:
        return out
    S = cfg["NUM_SPLITS"]
    if S == 1:
        o, lse = out, out  # lse is not touched with one split
        o_strides = (out.stride(0), out.stride(1), 0)
        lse_strides = (0, 0)
    else:
        o = torch.empty(B, N, S, L, dtype=torch.float32, device=q_nope.device)  # [B, N, Sp, L]
        lse = torch.empty(B, N, S, dtype=torch.float32, device=q_nope.device)  # [B, N, Sp]
        o_strides = (o.stride(0), o.stride(1), o.stride(2))
        lse_strides = (lse.stride(0), lse.stride(1))
    # tl.dot wants K >= 16: a narrower latent or rope part (tiny test models) loads masked tiles.
    block_l = max(16, triton.next_power_of_2(L))
    grid = (triton.cdiv(N, cfg.get("BLOCK_H", 64)), S, B)  # the Triton kernels'
    tiles = {k: v for k, v in cfg.items() if k not in ("VARIANT", "TMA")}
    if cfg["VARIANT"] == "gluon":
        if not _gluon_takes(kv_cache, L, R, P):
            raise ValueError(
                f"mla_decode: the Gluon kernel needs bf16/fp16, L / 2 in (64, 128, 256), R in (32, 64, "
                f"128), P a multiple of 64 and a 16-byte aligned cache, got {kv_cache.dtype}, L {L}, R {R}, "
                f"P {P}; use the Triton kernels (gluon=False)"
            )
        from . import mla_decode_gluon

        scale_log2 = softmax_scale * math.log2(math.e)
        mla_decode_gluon.launch(
            q_nope, q_pe, kv_cache, page_table, context_lens, scale_log2, o, lse, o_strides, lse_strides, S
        )
    elif cfg["VARIANT"] == "generic":
        mla_decode_kernel[grid](
            q_nope,
            q_pe,
            kv_cache,
            page_table,
            context_lens,
            o,
            lse,
            softmax_scale * math.log2(math.e),
            N,
            L,
            R,
            P,
            q_nope.stride(0),
            q_nope.stride(1),
            q_pe.stride(0),
            q_pe.stride(1),
            kv_cache.stride(0),
            kv_cache.stride(1),
            page_table.stride(0),
            *o_strides,
            *lse_strides,
            BLOCK_L=block_l,
            BLOCK_R=max(16, triton.next_power_of_2(R)),
            PAGE_ALIGNED=P % cfg["BLOCK_N"] == 0,
            DOT_FP32=INTERPRET,
            **tiles,
        )
    elif cfg["VARIANT"] == "paged":
        if not _paged_shape_ok(L, R, P, cfg["BLOCK_N"]):
            raise ValueError(
                f"mla_decode: the paged kernel needs L / 2 and R powers of two in [16, 256] and P a "
                f"multiple of BLOCK_N, got L {L}, R {R}, P {P}, BLOCK_N {cfg['BLOCK_N']}; use the generic one"
            )
        ckv_desc = kpe_desc = None
        item = kv_cache.element_size()
        if cfg["TMA"] and kv_cache.data_ptr() % 16 == 0 and (L + R) * item % 16 == 0 and L * item % 16 == 0:
            rows = kv_cache.view(-1, L + R)  # [NP * P, L + R]: a page-aligned tile is BN contiguous rows
            ckv_desc = TensorDescriptor(rows, [rows.shape[0], L], [L + R, 1], [cfg["BLOCK_N"], L // 2])
            kpe_desc = TensorDescriptor(rows[:, L:], [rows.shape[0], R], [L + R, 1], [cfg["BLOCK_N"], R])
        mla_decode_paged_kernel[grid](
            q_nope,
            q_pe,
            kv_cache,
            ckv_desc,
            kpe_desc,
            page_table,
            context_lens,
            o,
            lse,
            softmax_scale * math.log2(math.e),
            N,
            L,
            P,
            q_nope.stride(0),
            q_nope.stride(1),
            q_pe.stride(0),
            q_pe.stride(1),
            kv_cache.stride(0),
            kv_cache.stride(1),
            page_table.stride(0),
            *o_strides,
            *lse_strides,
            HALF_L=L // 2,
            R=R,
            DOT_FP32=INTERPRET,
            **tiles,
        )
    else:
        raise ValueError(
            f"mla_decode: cfg VARIANT is {cfg['VARIANT']!r}, expected 'generic', 'paged' or 'gluon'"
        )
    if S > 1:
        mla_decode_merge_kernel[(B, N)](
            o,
            lse,
            out,
            L,
            o.stride(0),
            o.stride(1),
            o.stride(2),
            lse.stride(0),
            lse.stride(1),
            out.stride(0),
            out.stride(1),
            NUM_SPLITS=S,
            BLOCK_S=triton.next_power_of_2(S),
            BLOCK_L=block_l,
            num_warps=4,
        )
    return out


def mla_decode_ref(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: torch.Tensor,
    context_lens: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """Torch reference of `mla_decode`: gather each sequence's context rows, softmax in float32.
    Slots past a context are never read (they may hold any bits, inf and NaN included).

    Raises ValueError if a context length is < 1 or beyond the page table (one host sync).
    """
    B, N, L = q_nope.shape
    P = kv_cache.shape[1]
    out = torch.empty(B, N, L, dtype=q_nope.dtype, device=q_nope.device)  # [B, N, L]
    if B == 0:
        return out
    lens = context_lens.tolist()
    if min(lens) < 1 or max(lens) > page_table.shape[1] * P:
        raise ValueError(
            f"mla_decode_ref: context_lens must lie in [1, max_pages * P = {page_table.shape[1] * P}], "
            f"got min {min(lens)}, max {max(lens)}"
        )
    for b, n in enumerate(lens):
        pages = page_table[b, : triton.cdiv(n, P)].clamp(min=0).long()
        kv = kv_cache[pages].reshape(-1, kv_cache.shape[2])[:n].float()  # [n, L + R]
        c_kv, k_pe = kv[:, :L], kv[:, L:]  # [n, L], [n, R]
        scores = (q_nope[b].float() @ c_kv.T + q_pe[b].float() @ k_pe.T) * softmax_scale  # [N, n]
        out[b] = (torch.softmax(scores, dim=-1) @ c_kv).to(q_nope.dtype)
    return out
