"""Paged MLA decode for Hopper in Triton's Gluon dialect: `mla_decode` with its wgmma issued
asynchronously, two GEMMs queued on the tensor cores at a time.

Shapes: the legend in docs/ARCHITECTURE.md (B, N, L, R, P, Sp). Same semantics, arguments and
outputs as the paged Triton kernel of kernels/mla_decode.py (whose `mla_decode_ref` is the
reference): a program takes BLOCK_H = 64 heads of one sequence and one context split, writes its
normalized partial [BH, L] and log2-sum-exp, and `mla_decode_merge_kernel` merges the splits.

Why Gluon: Triton 3.6 compiles the paged kernel with a `wgmma.wait_group 0` after each of its
dots. Here a step of tile j issues P_j @ c_j (the weighted sum, two [BH, L / 2] accumulators)
and the scores of tile j + 1 (three chained dots: q_nope halves against c_kv halves, q_pe
against k_pe) back to back, so the tensor cores run both without a gap; waits for the first
two only and gives tile j's stage back to the copy engine at once (tile j + STAGES is then in
flight while the scores finish and for the whole next step: issuing it after the softmax
instead, one CTA barrier fewer, measured 12-20% slower); then the softmax of tile j + 1. No
product is in flight across the loop's back edge (ptxas would serialize the wgmma:
PITFALLS.md). The softmax does not overlap a dot: that needs a third stage (no room: below) or
warpgroups in different roles (warp specialization: tried, slower with two stages: docs/PERF.md).

Layouts: eight warps as two warpgroups. The scores [BH, BN] split along the tokens (each
warpgroup BN / 2 of them: the row max crosses warpgroups through shared memory), the weighted
sum along the latent (each warpgroup a quarter of L in each accumulator). p goes to the second
GEMM through shared memory; the running sum stays a [BH, BN] tile reduced once at the end.

Each tile lands as three TMA pieces (k_pe, then c_kv's halves), each on its own mbarrier, and
the scores issue each of their three dots as soon as its piece is in: the first dot no longer
waits for the whole 72 KiB (1-4% at 2k contexts on an H200, docs/PERF.md).

Shared memory (bf16, L 512, R 64): q 72 KiB, two stages of a 64-token tile 144 KiB, p 8 KiB.
The split's last, partial tile (the context's end) is loaded with masks through registers so
that slots past the context (stale, or never written: any bits) never reach a dot.

Needs Triton's Gluon with its Hopper API (written against 3.6, the GPU host's; compiles with 3.9
too). The wrapper in kernels/mla_decode.py calls it only where the backend chose it at start-up.
"""

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

BLOCK_H = 64  # heads a program: one wgmma M
BLOCK_N = 64  # tokens a tile: one page of DeepSeek's P = 64
STAGES = 2
NUM_WARPS = 8

# Triton 3.6 (the GPU host's) against later releases (3.9 on the dev machines): see fp8_gemm_gluon.py.
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
_cta_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier


@gluon.jit
def _load_rows(ckv_desc, kpe_desc, c0_s, c1_s, kpe_s, ready, stage, row):
    """Start the copy of the cache's rows [row, row + BN) (viewed as [NP * P, L + R]) into
    `stage`: k_pe, then c_kv's halves, each onto its own barrier (ready[3 stage + piece]) so the
    scores start on the first."""
    bar = ready.index(3 * stage)
    mbarrier.expect(bar, kpe_desc.block_type.nbytes)
    _tma_load(kpe_desc, [row, 0], bar, kpe_s.index(stage))
    bar = ready.index(3 * stage + 1)
    mbarrier.expect(bar, ckv_desc.block_type.nbytes)
    _tma_load(ckv_desc, [row, 0], bar, c0_s.index(stage))
    bar = ready.index(3 * stage + 2)
    mbarrier.expect(bar, ckv_desc.block_type.nbytes)
    _tma_load(ckv_desc, [row, ckv_desc.block_type.shape[1]], bar, c1_s.index(stage))


@gluon.jit
def _load_tile(ckv_desc, kpe_desc, c0_s, c1_s, kpe_s, ready, stage, page_row, tok, P: gl.constexpr):
    """Start the copy of tokens [tok, tok + BN) (one page's rows) into `stage` (`_load_rows`)."""
    page = gl.load(page_row + tok // P)
    _load_rows(ckv_desc, kpe_desc, c0_s, c1_s, kpe_s, ready, stage, page * P + tok % P)


@gluon.jit
def _scores(
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
    """Issue q @ [c_kv, k_pe]^T for one tile ([BH, BN], unscaled) as three chained async dots,
    each once its piece of the tile has landed (ready[3 stage + piece] at `phase`; a tile written
    through registers passes pred-false waits: phase < 0)."""
    zero = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, s_layout)
    mbarrier.wait(ready.index(3 * stage), phase, pred=phase >= 0)
    s = warpgroup_mma(qpe_s, kpe.permute((1, 0)), zero, use_acc=False, is_async=True)
    mbarrier.wait(ready.index(3 * stage + 1), phase, pred=phase >= 0)
    s = warpgroup_mma(q0_s, c0.permute((1, 0)), s, is_async=True)
    mbarrier.wait(ready.index(3 * stage + 2), phase, pred=phase >= 0)
    return warpgroup_mma(q1_s, c1.permute((1, 0)), s, is_async=True)


@gluon.jit
def _softmax_into_p(s, m_i, l_tile, o0, o1, p_s, scale_log2, o_layout: gl.constexpr):
    """Online softmax over one tile's scores (log2 domain): p into shared memory for the next
    weighted sum (visible to the copy engine's proxy and to both warpgroups on return), the
    accumulators rescaled to the new row max; returns the max, the running sums and them."""
    s = s * scale_log2
    m_new = gl.maximum(m_i, gl.max(s, axis=1))
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s - m_new[:, None])
    alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    p_s.store(p.to(p_s.dtype))
    fence_async_shared()
    _cta_barrier()
    return m_new, l_tile * alpha[:, None] + p, o0 * alpha_o, o1 * alpha_o


@gluon.jit
def mla_decode_gluon_kernel(
    q_nope_ptr,  # [B, N, L]
    q_pe_ptr,  # [B, N, R]
    ckv_desc,  # TMA descriptor of the cache's c_kv as [NP * P, L], block [BN, L / 2]
    kpe_desc,  # TMA descriptor of the cache's k_pe as [NP * P, R], block [BN, R]
    kv_ptr,  # [NP, P, L + R] (the partial tile's masked loads)
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
    stride_kv_page,
    stride_kv_slot,
    stride_pt,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    P: gl.constexpr,
    HALF_L: gl.constexpr,
    R: gl.constexpr,
    NUM_SPLITS: gl.constexpr,
    BLOCK_H: gl.constexpr,
    BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
    q_layout: gl.constexpr,  # shared layouts of q's [BH, L / 2] halves, q_pe [BH, R], p [BH, BN]
    qpe_layout: gl.constexpr,
    p_layout: gl.constexpr,
    num_warps: gl.constexpr,
):
    gl.static_assert(num_warps == 8, "two warpgroups: the layouts below split over [4, 2] warps")
    dtype: gl.constexpr = ckv_desc.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, BLOCK_N // 2, 16]
    )
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 2], instr_shape=[16, HALF_L // 2, 16]
    )
    ld_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])

    # Head blocks vary fastest in launch order: the programs that read the same tiles run together.
    pid_h = gl.program_id(0)
    split = gl.program_id(1)
    b = gl.program_id(2).to(gl.int64)
    context_len = gl.load(context_lens_ptr + b)
    split_len = gl.cdiv(gl.cdiv(context_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = gl.minimum(start + split_len, context_len)
    n_full = gl.maximum(end - start, 0) // BLOCK_N  # tiles wholly inside the context
    full_end = start + n_full * BLOCK_N
    page_row = page_table_ptr + b * stride_pt

    q0_s = gl.allocate_shared_memory(dtype, [BLOCK_H, HALF_L], q_layout)
    q1_s = gl.allocate_shared_memory(dtype, [BLOCK_H, HALF_L], q_layout)
    qpe_s = gl.allocate_shared_memory(dtype, [BLOCK_H, R], qpe_layout)
    c0_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HALF_L], ckv_desc.layout)
    c1_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HALF_L], ckv_desc.layout)
    kpe_s = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, R], kpe_desc.layout)
    p_s = gl.allocate_shared_memory(dtype, [BLOCK_H, BLOCK_N], p_layout)
    ready = gl.allocate_shared_memory(gl.int64, [3 * STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(3 * STAGES):
        mbarrier.init(ready.index(i), count=1)
    fence_async_shared()  # the barriers' init before the copy engine uses them
    for st in gl.static_range(STAGES):
        if st < n_full:
            _load_tile(ckv_desc, kpe_desc, c0_s, c1_s, kpe_s, ready, st, page_row, start + st * BLOCK_N, P)

    # q of this program's heads into shared memory (rows past N as zeros), while the tiles load.
    heads = pid_h * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, ld_layout))  # [BH]
    head_mask = (heads < N)[:, None]
    offs_l = gl.arange(0, HALF_L, layout=gl.SliceLayout(0, ld_layout))  # [L/2]
    offs_r = gl.arange(0, R, layout=gl.SliceLayout(0, ld_layout))  # [R]
    q_row = q_nope_ptr + b * stride_qb + heads[:, None] * stride_qh  # [BH, 1]
    q0_s.store(gl.load(q_row + offs_l[None, :], mask=head_mask, other=0.0))
    q1_s.store(gl.load(q_row + HALF_L + offs_l[None, :], mask=head_mask, other=0.0))
    pe_row = q_pe_ptr + b * stride_peb + heads[:, None] * stride_peh  # [BH, 1]
    qpe_s.store(gl.load(pe_row + offs_r[None, :], mask=head_mask, other=0.0))
    fence_async_shared()
    _cta_barrier()

    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
    l_tile = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, s_layout)  # running sums, reduced at the end
    o0 = gl.zeros([BLOCK_H, HALF_L], gl.float32, o_layout)  # latent [0, L/2)
    o1 = gl.zeros([BLOCK_H, HALF_L], gl.float32, o_layout)  # latent [L/2, L)
    if n_full > 0:
        s = _scores(
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
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        m_i, l_tile, o0, o1 = _softmax_into_p(s, m_i, l_tile, o0, o1, p_s, scale_log2, o_layout)
        for j in range(0, n_full - 1):
            stage = j % STAGES
            nxt = j + 1
            o0 = warpgroup_mma(p_s, c0_s.index(stage), o0, is_async=True)
            o1 = warpgroup_mma(p_s, c1_s.index(stage), o1, is_async=True)
            s = _scores(
                q0_s,
                q1_s,
                qpe_s,
                c0_s.index(nxt % STAGES),
                c1_s.index(nxt % STAGES),
                kpe_s.index(nxt % STAGES),
                ready,
                nxt % STAGES,
                (nxt // STAGES) & 1,
                BLOCK_H,
                BLOCK_N,
                s_layout,
            )
            o0, o1 = warpgroup_mma_wait(num_outstanding=3, deps=(o0, o1))
            _cta_barrier()  # both warpgroups are done with tile j's stage and with p
            if j + STAGES < n_full:
                _load_tile(
                    ckv_desc,
                    kpe_desc,
                    c0_s,
                    c1_s,
                    kpe_s,
                    ready,
                    stage,
                    page_row,
                    start + (j + STAGES) * BLOCK_N,
                    P,
                )
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
            m_i, l_tile, o0, o1 = _softmax_into_p(s, m_i, l_tile, o0, o1, p_s, scale_log2, o_layout)
        last = (n_full - 1) % STAGES
        o0 = warpgroup_mma(p_s, c0_s.index(last), o0, is_async=True)
        o1 = warpgroup_mma(p_s, c1_s.index(last), o1, is_async=True)
        o0, o1 = warpgroup_mma_wait(num_outstanding=0, deps=(o0, o1))
        _cta_barrier()  # stage 0 and p are free for the partial tile
    for i in gl.static_range(3 * STAGES):
        mbarrier.invalidate(ready.index(i))

    if full_end < end:
        # The split's partial tile, through registers with masks, into stage 0 (no copy pending).
        slots = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, ld_layout))  # [BN]
        valid = (full_end + slots < end)[:, None]
        page = gl.load(page_row + full_end // P).to(gl.int64)
        rows = kv_ptr + page * stride_kv_page + (full_end % P + slots[:, None]) * stride_kv_slot  # [BN, 1]
        c0_s.index(0).store(gl.load(rows + offs_l[None, :], mask=valid, other=0.0))
        c1_s.index(0).store(gl.load(rows + HALF_L + offs_l[None, :], mask=valid, other=0.0))
        kpe_s.index(0).store(gl.load(rows + 2 * HALF_L + offs_r[None, :], mask=valid, other=0.0))
        fence_async_shared()
        _cta_barrier()
        s = _scores(
            q0_s,
            q1_s,
            qpe_s,
            c0_s.index(0),
            c1_s.index(0),
            kpe_s.index(0),
            ready,
            0,
            -1,
            BLOCK_H,
            BLOCK_N,
            s_layout,
        )
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        cols = full_end + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))  # [BN]
        s = gl.where((cols < end)[None, :], s, float("-inf"))
        m_i, l_tile, o0, o1 = _softmax_into_p(s, m_i, l_tile, o0, o1, p_s, scale_log2, o_layout)
        o0 = warpgroup_mma(p_s, c0_s.index(0), o0, is_async=True)
        o1 = warpgroup_mma(p_s, c1_s.index(0), o1, is_async=True)
        o0, o1 = warpgroup_mma_wait(num_outstanding=0, deps=(o0, o1))

    l_i = gl.sum(l_tile, axis=1)  # [BH]
    nonempty = l_i > 0
    inv_l = gl.convert_layout(1.0 / gl.where(nonempty, l_i, 1.0), gl.SliceLayout(1, o_layout))[:, None]
    rows_o = pid_h * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, o_layout))  # [BH]
    cols_o = gl.arange(0, HALF_L, layout=gl.SliceLayout(0, o_layout))  # [L/2]
    o_ptrs = o_ptr + b * stride_ob + rows_o[:, None] * stride_oh + split * stride_os + cols_o[None, :]
    o_mask = (rows_o < N)[:, None] & (cols_o < HALF_L)[None, :]
    gl.store(o_ptrs, (o0 * inv_l).to(o_ptr.dtype.element_ty), mask=o_mask)
    gl.store(o_ptrs + HALF_L, (o1 * inv_l).to(o_ptr.dtype.element_ty), mask=o_mask)
    if NUM_SPLITS > 1:
        lse = gl.where(nonempty, m_i + gl.log2(gl.where(nonempty, l_i, 1.0)), float("-inf"))
        heads_s = pid_h * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, s_layout))  # [BH]
        gl.store(lse_ptr + b * stride_lb + heads_s * stride_lh + split, lse, mask=heads_s < N)


def available() -> bool:
    """Whether this Triton's Gluon has the Hopper API the kernel uses."""
    return hasattr(gl, "NVMMADistributedLayout") and hasattr(mbarrier, "expect")


_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def shapes_ok(L: int, R: int, P: int, dtype: torch.dtype) -> bool:
    """The dims this kernel takes: bf16/fp16, L / 2 in {64, 128, 256} (a TMA box and a wgmma N
    per warpgroup), R in {32, 64, 128}, pages of whole 64-token tiles."""
    return (
        dtype in _GL_DTYPES
        and L // 2 in (64, 128, 256)
        and L % 2 == 0
        and R in (32, 64, 128)
        and P % BLOCK_N == 0
    )


def launch(
    q_nope, q_pe, kv_cache, page_table, context_lens, scale_log2, o, lse, o_strides, lse_strides, num_splits
) -> None:
    """Launch over checked arguments into `o` (the output, or [B, N, Sp, L] float32 partials) and
    `lse` ([B, N, Sp]; untouched with one split), with the strides the Triton kernels take."""
    B, N, L = q_nope.shape
    R = q_pe.shape[2]
    P = kv_cache.shape[1]
    dt = _GL_DTYPES[kv_cache.dtype]
    rows = kv_cache.view(-1, L + R)  # [NP * P, L + R]: a tile is BN contiguous rows of one page
    ckv_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, L // 2], dt)
    kpe_layout = gl.NVMMASharedLayout.get_default_for([BLOCK_N, R], dt)
    ckv_desc = TensorDescriptor(rows, [rows.shape[0], L], [L + R, 1], [BLOCK_N, L // 2], ckv_layout)
    kpe_desc = TensorDescriptor(rows[:, L:], [rows.shape[0], R], [L + R, 1], [BLOCK_N, R], kpe_layout)
    grid = (triton.cdiv(N, BLOCK_H), num_splits, B)
    mla_decode_gluon_kernel[grid](
        q_nope,
        q_pe,
        ckv_desc,
        kpe_desc,
        kv_cache,
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
        kv_cache.stride(0),
        kv_cache.stride(1),
        page_table.stride(0),
        *o_strides,
        *lse_strides,
        P=P,
        HALF_L=L // 2,
        R=R,
        NUM_SPLITS=num_splits,
        BLOCK_H=BLOCK_H,
        BLOCK_N=BLOCK_N,
        STAGES=STAGES,
        q_layout=gl.NVMMASharedLayout.get_default_for([BLOCK_H, L // 2], dt),
        qpe_layout=gl.NVMMASharedLayout.get_default_for([BLOCK_H, R], dt),
        p_layout=gl.NVMMASharedLayout.get_default_for([BLOCK_H, BLOCK_N], dt),
        num_warps=NUM_WARPS,
    )
