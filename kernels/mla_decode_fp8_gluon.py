"""Paged MLA decode over the FP8 latent cache for Hopper, in Triton's Gluon dialect: both GEMMs
on FP8 tensor cores (`mla_decode_fp8`'s math and contract; `mla_decode_fp8_ref` is the reference).

Shapes: the legend in docs/ARCHITECTURE.md (B, N, L, R, P, Sp). The cache is kernels/kv_fp8.py's
packed rows (e4m3 c_kv and k_pe, then float32 s_c, s_r). A program takes BLOCK_H = 64 heads of one
sequence and one context split, writes its normalized partial [BH, L] and log2-sum-exp, and
`mla_decode_merge_kernel` merges the splits.

Per 64-token tile j:

    scores_j = (q8 · c8_j^T) · q_s[n] · s_c[j] + (qpe8 · kpe8_j^T) · qpe_s[n] · s_r[j]   (log2 domain)
    p8_j     = e4m3(p_j · s_c[j] · 448 / max_j s_c)     (the tile's latent scales folded into p)
    o       += p8_j @ c8_j,  kept as out · l / g with g = the last tile's max_j s_c / 448

q is rounded to e4m3 per head (amax over L for q_nope, over R for q_pe) in the prologue; the
softmax scale rides on its scales.

Why a transpose: an e4m3 wgmma reads both operands K-major, and in p8 @ c8 the reduced dim is the
tokens, along which the cache's rows are not contiguous. So each tile's c_kv, once landed, is
copied through registers into a [L, BN] buffer (tokens contiguous) that the weighted sum reads;
the copy runs while the tensor cores work, and it zeroes the slots past the context (they may
hold any bits: NaN times a zero weight is NaN). The stage of the tile is free once its scores and
its copy are done, not after its weighted sum: it is refilled (tile j + STAGES) in the step
after, once the next products are issued, so the copy engine never waits on the path between
one weighted sum and the next, and each tile is asked for STAGES - 1 steps before its scores.

The step (FlashAttention-3's order within a warpgroup): issue the scores of tile j + 1, then
p8_j @ c8_j; copy tile j + 1's latent into its transposed buffer; wait for the scores (the weighted
sum still runs) and compute tile j + 1's softmax and p8 while it does; then wait for it, rescale
the accumulators, one CTA barrier. Double buffers for p8 and the transposed latent
let tile j + 1's be written while tile j's are read. No product is in flight across the loop's
back edge (ptxas would serialize the wgmma: PITFALLS.md).

The token scales take two dependent global reads (the page, then a float32 per row, 592 bytes
apart); read where the softmax needs them they cost 20% of the kernel (docs/PERF.md). So tile
j + 2's are loaded in step j, in a compact layout, and stored at the step's end into a
two-slot ring in shared memory, from which the softmax of step j + 1 reads them in its own layout;
the pages of tiles j + 2 and j + 3 (its refill) are read a step ahead too.

Layouts: eight warps as two warpgroups. The scores [BH, BN] split along the tokens (the row max
crosses warpgroups through shared memory), the weighted sum along the latent.

Shared memory (e4m3, L 512, R 64): q 36 KiB, STAGES = 3 stages of a tile 108 KiB, two transposed
latents 64 KiB, two p8 8 KiB, the scales' ring 1 KiB.

Needs Triton's Gluon with its Hopper API (written against 3.6, the GPU host's; compiles with 3.9
too). The wrapper in kernels/mla_decode_fp8.py calls it only where the backend chose it.
"""

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .mla_decode_gluon import _cta_barrier, _load_rows

BLOCK_H = 64  # heads a program: one wgmma M
BLOCK_N = 64  # tokens a tile: one page of DeepSeek's P = 64
STAGES = 3
NUM_WARPS = 8


@gluon.jit
def _scores_fp8(
    q0_s,
    q1_s,
    qpe_s,
    c0,
    c1,
    kpe,
    ready,
    stage,
    phase,
    BLOCK_H: gl.constexpr,
    BLOCK_N: gl.constexpr,
    s_layout: gl.constexpr,
):
    """Issue one tile's two score products as async dots, each once its piece has landed: the rope
    part [BH, BN] (one dot) and the latent part (two chained dots over L's halves); unscaled."""
    zero = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(ready.index(3 * stage), phase)
    s_pe = warpgroup_mma(qpe_s, kpe.permute((1, 0)), zero, use_acc=False, is_async=True)
    mbarrier.wait(ready.index(3 * stage + 1), phase)
    s_nope = warpgroup_mma(q0_s, c0.permute((1, 0)), zero, use_acc=False, is_async=True)
    mbarrier.wait(ready.index(3 * stage + 2), phase)
    s_nope = warpgroup_mma(q1_s, c1.permute((1, 0)), s_nope, is_async=True)
    return s_pe, s_nope


@gluon.jit
def _transpose_latent(c_s, vt_s, tok, end, BLOCK_N: gl.constexpr, t_layout: gl.constexpr):
    """c_s [BN, L / 2] (a landed tile's latent half) into vt_s [L / 2, BN], tokens contiguous;
    the rows of tokens at or past `end` as zeros."""
    c = c_s.load(t_layout)  # [BN, L/2]
    if tok + BLOCK_N > end:
        slots = tok + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, t_layout))  # [BN]
        c = gl.where((slots < end)[:, None], c, gl.zeros_like(c))
    vt_s.store(c.permute((1, 0)))


@gluon.jit
def _tile_page(page_row, start, tile, n_tiles, P: gl.constexpr, BLOCK_N: gl.constexpr):
    """The page holding a split's `tile` (0 for tiles past the split: nothing is read there)."""
    return gl.load(page_row + (start + tile * BLOCK_N) // P, mask=tile < n_tiles, other=0).to(gl.int64)


@gluon.jit
def _fetch_scales(
    scale_ptr, page, tok, end, ROW4: gl.constexpr, C4: gl.constexpr, P: gl.constexpr, sl_layout: gl.constexpr
):
    """Start loading a tile's token scales s_c, s_r [BN] (0 at and past `end`) in a compact
    layout: a step later they go to shared memory, from where the softmax reads them in its own
    layout (the loads' latency, two dependent global reads with the page's, off its path)."""
    BN: gl.constexpr = 64
    slots = gl.arange(0, BN, layout=sl_layout)  # [BN]
    ptrs = scale_ptr + (page * P + (tok % P) + slots) * ROW4 + C4  # [BN] the rows' s_c
    valid = tok + slots < end
    return gl.load(ptrs, mask=valid, other=0.0), gl.load(ptrs + 1, mask=valid, other=0.0)


@gluon.jit
def _store_scales(sc_s, slot, scales):
    """A tile's (s_c, s_r) into rows 2 slot, 2 slot + 1 of the scales' ring [4, BN]."""
    sc_s.index(2 * slot).store(scales[0])
    sc_s.index(2 * slot + 1).store(scales[1])


@gluon.jit
def _tile_scales(sc_s, slot, tok, end, col_layout: gl.constexpr):
    """A tile's s_c, s_r [BN] from its slot of the scales' ring, and its validity mask."""
    valid = tok + gl.arange(0, 64, layout=col_layout) < end
    return sc_s.index(2 * slot).load(col_layout), sc_s.index(2 * slot + 1).load(col_layout), valid


@gluon.jit
def _softmax_fp8(s_pe, s_nope, q_s, qpe_s, s_c, s_r, valid, m_i, l_i, g_i):
    """Online softmax over one tile (log2 domain) with its latent scales folded into p: returns
    p8's values (in [0, 448], float32), the accumulators' rescale [BH], the new max, the running
    sums [BH, BN] and g."""
    s = s_nope * (q_s[:, None] * s_c[None, :]) + s_pe * (qpe_s[:, None] * s_r[None, :])
    s = gl.where(valid[None, :], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s - m_new[:, None])
    s_max = gl.max(s_c, axis=0)  # > 0: a tile holds a valid token, whose scale is > 0
    g_new = s_max / 448.0
    pv = p * (s_c * (448.0 / s_max))[None, :]
    return pv, alpha * (g_i / g_new), m_new, l_i * alpha + gl.sum(p, axis=1), g_new


@gluon.jit
def mla_decode_fp8_gluon_kernel(
    q_nope_ptr,  # [B, N, L] bf16/fp16/fp32
    q_pe_ptr,  # [B, N, R]
    ckv_desc,  # TMA descriptor of the cache's c_kv as [NP * P, L] e4m3 (row stride C + 16), block [BN, L / 2]
    kpe_desc,  # TMA descriptor of the cache's k_pe as [NP * P, R], block [BN, R]
    scale_ptr,  # the cache as float32 [NP * P, (C + 16) / 4]
    page_table_ptr,  # [B, W] int32
    context_lens_ptr,  # [B] int32
    o_ptr,  # [B, N, Sp, L] float32 partials, or the [B, N, L] output when Sp == 1
    lse_ptr,  # [B, N, Sp] float32 log2-sum-exp of the scaled scores (unused when Sp == 1)
    scale_log2,  # softmax_scale * log2(e)
    N,
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
    P: gl.constexpr,
    HALF_L: gl.constexpr,
    R: gl.constexpr,
    ROW4: gl.constexpr,  # float32 entries of a cache row: (C + 16) / 4
    NUM_SPLITS: gl.constexpr,
    BLOCK_H: gl.constexpr,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
    q_layout: gl.constexpr,  # shared layouts: q's [BH, L / 2] halves, q_pe [BH, R], p8 [BH, BN], vt [L / 2, BN]
    qpe_layout: gl.constexpr,
    p_layout: gl.constexpr,
    vt_layout: gl.constexpr,
    sc_layout: gl.constexpr,  # shared layout of the scales' [4, BN] ring
    num_warps: gl.constexpr,
):
    gl.static_assert(num_warps == 8, "two warpgroups: the layouts below split over [4, 2] warps")
    gl.static_assert(BLOCK_N == 64, "_fetch_scales loads 64-token tiles")
    gl.static_assert(STAGES == 3, "the pages are fetched ahead for tiles j + 2 (scales) and j + 3 (refill)")
    fp8: gl.constexpr = ckv_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, BLOCK_N // 2, 32]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, HALF_L // 2, 32]
    )
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    # The transpose: each thread 4 tokens x 16 latent bytes, so that it stores 4 contiguous tokens.
    t_layout: gl.constexpr = gl.BlockedLayout([4, 16], [8, 4], [2, 4], [1, 0])
    col_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    sl_layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])  # a tile's [BN] scales
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    C4: gl.constexpr = (2 * HALF_L + R) // 4

    # Head blocks vary fastest in launch order: the programs that read the same tiles run together.
    pid_h = gl.program_id(0)
    split = gl.program_id(1)
    b = gl.program_id(2).to(gl.int64)
    context_len = gl.load(context_lens_ptr + b)
    split_len = gl.cdiv(gl.cdiv(context_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = gl.minimum(start + split_len, context_len)
    n_tiles = gl.cdiv(gl.maximum(end - start, 0), BLOCK_N)  # the last one may be partial
    page_row = page_table_ptr + b * stride_pt

    q0_s = gl.allocate_shared_memory(fp8, [BLOCK_H, HALF_L], q_layout)
    q1_s = gl.allocate_shared_memory(fp8, [BLOCK_H, HALF_L], q_layout)
    qpe_s = gl.allocate_shared_memory(fp8, [BLOCK_H, R], qpe_layout)
    c0_s = gl.allocate_shared_memory(fp8, [STAGES, BLOCK_N, HALF_L], ckv_desc.layout)
    c1_s = gl.allocate_shared_memory(fp8, [STAGES, BLOCK_N, HALF_L], ckv_desc.layout)
    kpe_s = gl.allocate_shared_memory(fp8, [STAGES, BLOCK_N, R], kpe_desc.layout)
    vt0_s = gl.allocate_shared_memory(fp8, [2, HALF_L, BLOCK_N], vt_layout)
    vt1_s = gl.allocate_shared_memory(fp8, [2, HALF_L, BLOCK_N], vt_layout)
    p_s = gl.allocate_shared_memory(fp8, [2, BLOCK_H, BLOCK_N], p_layout)
    sc_s = gl.allocate_shared_memory(gl.float32, [4, BLOCK_N], sc_layout)  # tile t's s_c, s_r: slot t % 2
    ready = gl.allocate_shared_memory(gl.int64, [3 * STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(3 * STAGES):
        mbarrier.init(ready.index(i), count=1)
    fence_async_shared()  # the barriers' init before the copy engine uses them
    for i in gl.static_range(STAGES):
        if i < n_tiles:
            row = _tile_page(page_row, start, i, n_tiles, P, BLOCK_N) * P + (start + i * BLOCK_N) % P
            _load_rows(ckv_desc, kpe_desc, c0_s, c1_s, kpe_s, ready, i, row.to(gl.int32))
    for i in gl.static_range(2):
        page = _tile_page(page_row, start, i, n_tiles, P, BLOCK_N)
        _store_scales(
            sc_s, i, _fetch_scales(scale_ptr, page, start + i * BLOCK_N, end, ROW4, C4, P, sl_layout)
        )
    page_2 = _tile_page(page_row, start, 2, n_tiles, P, BLOCK_N)  # the pages of tiles j + 2, j + 3 at step j
    page_3 = _tile_page(page_row, start, 3, n_tiles, P, BLOCK_N)

    # q of this program's heads rounded to e4m3 per head into shared memory (rows past N as zeros),
    # while the tiles load; the softmax scale (log2 domain) rides on the scales.
    heads = pid_h * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, ld_layout))  # [BH]
    head_mask = (heads < N)[:, None]
    offs_l = gl.arange(0, HALF_L, layout=gl.SliceLayout(0, ld_layout))  # [L/2]
    offs_r = gl.arange(0, R, layout=gl.SliceLayout(0, ld_layout))  # [R]
    q_row = q_nope_ptr + b * stride_qb + heads[:, None] * stride_qh  # [BH, 1]
    q0 = gl.load(q_row + offs_l[None, :], mask=head_mask, other=0.0).to(gl.float32)  # [BH, L/2]
    q1 = gl.load(q_row + HALF_L + offs_l[None, :], mask=head_mask, other=0.0).to(gl.float32)
    amax = gl.maximum(gl.max(gl.abs(q0), axis=1), gl.max(gl.abs(q1), axis=1))  # [BH]
    qs = gl.where(amax > 0, amax / 448.0, 1.0)
    q0_s.store(gl.minimum(gl.maximum(q0 / qs[:, None], -448.0), 448.0).to(fp8))
    q1_s.store(gl.minimum(gl.maximum(q1 / qs[:, None], -448.0), 448.0).to(fp8))
    pe_row = q_pe_ptr + b * stride_peb + heads[:, None] * stride_peh  # [BH, 1]
    qpe = gl.load(pe_row + offs_r[None, :], mask=head_mask, other=0.0).to(gl.float32)  # [BH, R]
    amax_pe = gl.max(gl.abs(qpe), axis=1)
    qpes = gl.where(amax_pe > 0, amax_pe / 448.0, 1.0)
    qpe_s.store(gl.minimum(gl.maximum(qpe / qpes[:, None], -448.0), 448.0).to(fp8))
    q_s = gl.convert_layout(qs * scale_log2, row_layout)  # [BH]
    qpe_s_scale = gl.convert_layout(qpes * scale_log2, row_layout)
    fence_async_shared()
    _cta_barrier()

    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=row_layout)
    l_i = gl.zeros([BLOCK_H], gl.float32, row_layout)
    g_i = scale_log2 * 0.0 + 1.0  # o holds (out · l) / g_i
    o0 = gl.zeros([BLOCK_H, HALF_L], gl.float32, o_layout)  # latent [0, L/2)
    o1 = gl.zeros([BLOCK_H, HALF_L], gl.float32, o_layout)  # latent [L/2, L)
    if n_tiles > 0:
        # Tile 0: its scores, its transposed latent and p8 into buffers 0, its stage refilled.
        s_c, s_r, valid = _tile_scales(sc_s, 0, start, end, col_layout)
        s_pe, s_nope = _scores_fp8(
            q0_s,
            q1_s,
            qpe_s,
            c0_s.index(0),
            c1_s.index(0),
            kpe_s.index(0),
            ready,
            0,
            0,
            BLOCK_H,
            BLOCK_N,
            s_layout,
        )
        _transpose_latent(c0_s.index(0), vt0_s.index(0), start, end, BLOCK_N, t_layout)
        _transpose_latent(c1_s.index(0), vt1_s.index(0), start, end, BLOCK_N, t_layout)
        s_pe, s_nope = warpgroup_mma_wait(num_outstanding=0, deps=(s_pe, s_nope))
        pv, rescale, m_i, l_i, g_i = _softmax_fp8(
            s_pe, s_nope, q_s, qpe_s_scale, s_c, s_r, valid, m_i, l_i, g_i
        )
        p_s.index(0).store(pv.to(fp8))
        fence_async_shared()
        _cta_barrier()  # stage 0 read by both warpgroups; vt and p8 of tile 0 written
        for j in range(0, n_tiles - 1):
            nxt = j + 1
            st = nxt % STAGES
            buf = j % 2
            tok = start + nxt * BLOCK_N
            s_pe, s_nope = _scores_fp8(
                q0_s,
                q1_s,
                qpe_s,
                c0_s.index(st),
                c1_s.index(st),
                kpe_s.index(st),
                ready,
                st,
                (nxt // STAGES) & 1,
                BLOCK_H,
                BLOCK_N,
                s_layout,
            )
            o0 = warpgroup_mma(p_s.index(buf), vt0_s.index(buf).permute((1, 0)), o0, is_async=True)
            o1 = warpgroup_mma(p_s.index(buf), vt1_s.index(buf).permute((1, 0)), o1, is_async=True)
            # Tile j's stage (its scores and its copy done before the last barrier) gets tile j + STAGES
            # while the tensor cores work: off the path between one weighted sum and the next.
            if j + STAGES < n_tiles:
                row = page_3 * P + (tok + (STAGES - 1) * BLOCK_N) % P
                _load_rows(ckv_desc, kpe_desc, c0_s, c1_s, kpe_s, ready, j % STAGES, row.to(gl.int32))
            scales_2 = _fetch_scales(scale_ptr, page_2, tok + BLOCK_N, end, ROW4, C4, P, sl_layout)
            page_2 = page_3
            page_3 = _tile_page(page_row, start, j + 4, n_tiles, P, BLOCK_N)
            _transpose_latent(c0_s.index(st), vt0_s.index(1 - buf), tok, end, BLOCK_N, t_layout)
            _transpose_latent(c1_s.index(st), vt1_s.index(1 - buf), tok, end, BLOCK_N, t_layout)
            s_c, s_r, valid = _tile_scales(sc_s, nxt % 2, tok, end, col_layout)
            s_pe, s_nope = warpgroup_mma_wait(num_outstanding=2, deps=(s_pe, s_nope))
            pv, rescale, m_i, l_i, g_i = _softmax_fp8(
                s_pe, s_nope, q_s, qpe_s_scale, s_c, s_r, valid, m_i, l_i, g_i
            )
            p_s.index(1 - buf).store(pv.to(fp8))
            o0, o1 = warpgroup_mma_wait(num_outstanding=0, deps=(o0, o1))
            rescale_o = gl.convert_layout(rescale, gl.SliceLayout(1, o_layout))[:, None]
            o0 = o0 * rescale_o
            o1 = o1 * rescale_o
            _store_scales(sc_s, j % 2, scales_2)  # tile j's slot, last read a step ago
            fence_async_shared()
            _cta_barrier()  # tile j's p8 and vt read; tile j + 1's written; its stage read
        last = (n_tiles - 1) % 2
        o0 = warpgroup_mma(p_s.index(last), vt0_s.index(last).permute((1, 0)), o0, is_async=True)
        o1 = warpgroup_mma(p_s.index(last), vt1_s.index(last).permute((1, 0)), o1, is_async=True)
        o0, o1 = warpgroup_mma_wait(num_outstanding=0, deps=(o0, o1))
    for i in gl.static_range(3 * STAGES):
        mbarrier.invalidate(ready.index(i))

    nonempty = l_i > 0
    inv_l = gl.convert_layout(g_i / gl.where(nonempty, l_i, 1.0), gl.SliceLayout(1, o_layout))[:, None]
    rows_o = pid_h * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, o_layout))  # [BH]
    cols_o = gl.arange(0, HALF_L, layout=gl.SliceLayout(0, o_layout))  # [L/2]
    o_ptrs = o_ptr + b * stride_ob + rows_o[:, None] * stride_oh + split * stride_os + cols_o[None, :]
    o_mask = (rows_o < N)[:, None] & (cols_o < HALF_L)[None, :]
    gl.store(o_ptrs, (o0 * inv_l).to(o_ptr.dtype.element_ty), mask=o_mask)
    gl.store(o_ptrs + HALF_L, (o1 * inv_l).to(o_ptr.dtype.element_ty), mask=o_mask)
    if NUM_SPLITS > 1:
        lse = gl.where(nonempty, m_i + gl.log2(gl.where(nonempty, l_i, 1.0)), float("-inf"))
        heads_s = pid_h * BLOCK_H + gl.arange(0, BLOCK_H, layout=row_layout)  # [BH]
        gl.store(lse_ptr + b * stride_lb + heads_s * stride_lh + split, lse, mask=heads_s < N)


def available() -> bool:
    """Whether this Triton's Gluon has the Hopper API the kernel uses."""
    return hasattr(gl, "NVMMADistributedLayout") and hasattr(mbarrier, "expect")


def shapes_ok(L: int, R: int, P: int) -> bool:
    """The dims this kernel takes: L / 2 in {64, 128, 256} (a TMA box and a wgmma N per
    warpgroup), R in {32, 64, 128} (an e4m3 wgmma's K is 32), pages of whole 64-token tiles."""
    return L % 2 == 0 and L // 2 in (64, 128, 256) and R in (32, 64, 128) and P % BLOCK_N == 0


def launch(
    q_nope, q_pe, kv_cache, page_table, context_lens, scale_log2, o, lse, o_strides, lse_strides, num_splits
) -> None:
    """Launch over checked arguments (an FP8 cache [NP, P, L + R + 16]) into `o` (the output, or
    [B, N, Sp, L] float32 partials) and `lse` ([B, N, Sp]; untouched with one split)."""
    B, N, L = q_nope.shape
    R = q_pe.shape[2]
    P, width = kv_cache.shape[1], kv_cache.shape[2]
    dt = gl.float8e4nv
    rows = kv_cache.view(-1, width)  # [NP * P, C + 16]: a tile is BN contiguous rows of one page
    ckv_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, L // 2], dt)
    kpe_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, R], dt)
    ckv_desc = TensorDescriptor(rows, [rows.shape[0], L], [width, 1], [BLOCK_N, L // 2], ckv_layout)
    kpe_desc = TensorDescriptor(rows[:, L:], [rows.shape[0], R], [width, 1], [BLOCK_N, R], kpe_layout)
    grid = (triton.cdiv(N, BLOCK_H), num_splits, B)
    mla_decode_fp8_gluon_kernel[grid](
        q_nope,
        q_pe,
        ckv_desc,
        kpe_desc,
        rows.view(torch.float32),
        page_table,
        context_lens,
        o,
        lse,
        scale_log2,
        N,
        q_nope.stride(0),
        q_nope.stride(1),
        q_pe.stride(0),
        q_pe.stride(1),
        page_table.stride(0),
        *o_strides,
        *lse_strides,
        P=P,
        HALF_L=L // 2,
        R=R,
        ROW4=width // 4,
        NUM_SPLITS=num_splits,
        BLOCK_H=BLOCK_H,
        BLOCK_N=BLOCK_N,
        STAGES=STAGES,
        q_layout=gl.NVMMASharedLayout.get_default_for([BLOCK_H, L // 2], dt),
        qpe_layout=gl.NVMMASharedLayout.get_default_for([BLOCK_H, R], dt),
        p_layout=gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_N], dt),
        vt_layout=gl.NVMMASharedLayout.get_default_for([L // 2, BLOCK_N], dt),
        sc_layout=gl.SwizzledSharedLayout(1, 1, 1, [0]),
        num_warps=NUM_WARPS,
    )
