"""FP8 MoE prefill GEMMs for Hopper in Triton's Gluon dialect: 128-slot blocks, each K step's
wgmma overlapped with the scaling of the step before.

Shapes: the legend in docs/ARCHITECTURE.md and kernels/fused_moe.py (T, H, I: `inter`, E local
experts, K top-k, A = T*K pairs, A_pad aligned pair slots, G_H / G_I scale groups).

Same semantics as `fused_moe` on FP8 weights (kernels/fused_moe.py, whose `fused_moe_ref` is the
reference); it replaces that file's two prefill GEMMs, keeping its `moe_align` (here with 128-slot
blocks), `fp8_quant`, `moe_gather` and `moe_combine_kernel`:

1. `moe_gather` copies each real block's x rows and scales into slot order, xg [A_pad, H] and
   xgs [A_pad, G_H], so that the copy engine loads a block's 128 rows as one tile.
2. `moe_gemm1_prefill_kernel`: one program per (block, 128-column group of h). Two passes over
   H, each with 64 gate rows and the matching 64 up rows of the expert, loaded by two TMA boxes
   into one [128, 128] weight tile: one wgmma of N = 128 a K step, its product scaled by column
   (the gate half by the gate tile's 128x128 block scale, the up half by the up tile's); pass 0's
   silu(gate) * up waits in shared memory for pass 1's, then the 128 columns are quantized as one
   1x128 group of h (slot order).
3. `moe_gemm2_prefill_kernel`: one program per (block, 128-row tile of w2[e]), y [A, H] = h @ w2^T
   with rows scattered back to pair order.

Why: the Triton prefill GEMMs wait for every wgmma before the scale FMA that reads its result
(`wgmma.wait_group 0` a step, the tensor cores idle while the CUDA cores scale): 43% of the FP8
rate at 16k tokens a rank (docs/PERF.md). As in kernels/fp8_gemm_gluon.py, each step here issues
step k's wgmma asynchronously, waits until only it is in flight, scales step k - 1's product into
the accumulator, then refills the stage step k - 1 read. Two warpgroups (8 warps) split the 128
rows; a CTA barrier before each refill makes sure both have read the stage.

Both launch a 1-D grid of (block, tile) items in groups of GROUP_T blocks, block fastest within
a group, so that the programs in flight share a few blocks' rows and a few weight tiles in L2.
Blocks past the last expert's run (-1) return at once.

Needs Triton's Gluon with its Hopper API (written against 3.6; compiles with 3.9 too), H and I
multiples of 128, contiguous tensors (`fused_moe_gluon.shapes_ok`). The wrapper in
kernels/fused_moe.py calls these kernels only where the backend chose the Gluon path at start-up.
"""

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    warpgroup_mma_wait,
)

from .fp8_gemm_gluon import _cta_barrier, _tma_load
from .fused_moe_gluon import _async_product, _descriptor

BLOCK_T = 128  # pair slots a block: two warpgroups of the wgmma's M = 64
HALF_W = 64  # GEMM 1: gate (and up) rows a pass; two passes make one 1x128 group of h
BLOCK_W = 128  # GEMM 2: w2 rows a tile
BLOCK_K = 128  # one FP8 scale group a step


@gluon.jit
def _block_and_tile(num_blocks, num_tiles, group_t):
    """(block, tile) of this program: groups of group_t blocks take every tile, block fastest."""
    pid = gl.program_id(0)
    per_group = group_t * num_tiles
    first = (pid // per_group) * group_t
    rows = gl.minimum(num_blocks - first, group_t)
    return first + (pid % per_group) % rows, (pid % per_group) // rows


@gluon.jit
def _issue(x_bufs, w_bufs, ready, step, BLOCK_T: gl.constexpr, mma_layout: gl.constexpr):
    """Wait for step `step`'s tiles; issue its [BT, 128] product (GEMM 1: gate columns, then up)."""
    stage = step % x_bufs.shape[0]
    mbarrier.wait(ready.index(stage), (step // x_bufs.shape[0]) & 1)
    return _async_product(x_bufs.index(stage), w_bufs.index(stage), BLOCK_T, 128, mma_layout)


# ---------------------------------------------------------------------------------------------
# GEMM 1: two passes of (64 gate rows, 64 up rows) over H, one 1x128 group of h a program.


@gluon.jit
def _gemm1_load(x_desc, w_desc, x_bufs, w_bufs, ready, step, n_k, off_t, gate_row, up_row):
    """TMA loads of global step `step` (pass step // n_k, K block step % n_k) into its stage: the x
    tile, and the pass's 64 gate rows then its 64 up rows as one [128, 128] weight tile."""
    stage = step % x_bufs.shape[0]
    p = step // n_k
    kb = step - p * n_k
    bar = ready.index(stage)
    w_buf = w_bufs.index(stage)
    mbarrier.expect(bar, x_desc.block_type.nbytes + 2 * w_desc.block_type.nbytes)
    _tma_load(x_desc, [off_t, kb * 128], bar, x_bufs.index(stage))
    _tma_load(w_desc, [gate_row + p * 64, kb * 128], bar, w_buf.slice(0, 64))
    _tma_load(w_desc, [up_row + p * 64, kb * 128], bar, w_buf.slice(64, 64))


@gluon.jit
def _gemm1_scales(xs_ptr, ws_gate, ws_up, rows, is_gate, stride_xs, kb):
    """K block kb's [BT, 128] scales: the rows' x scales times the gate or the up block scale."""
    xs = gl.load(xs_ptr + rows * stride_xs + kb)  # [BT]
    return gl.where(
        is_gate[None, :], (xs * gl.load(ws_gate + kb))[:, None], (xs * gl.load(ws_up + kb))[:, None]
    )


@gluon.jit
def _gated(acc, ep, h_layout: gl.constexpr):
    """silu(gate) * up [BT, 64] of a pass's accumulator, its halves split through shared memory
    `ep` [BT, 128] float32 (the barriers: every thread's earlier reads of ep, then its writes,
    are done before the next step)."""
    _cta_barrier()
    ep.store(acc)
    _cta_barrier()
    gate = ep.slice(0, 64, dim=1).load(h_layout)
    up = ep.slice(64, 64, dim=1).load(h_layout)
    return gate / (1.0 + gl.exp(-gate)) * up


@gluon.jit
def moe_gemm1_prefill_kernel(
    x_desc,  # TMA descriptor of xg [A_pad, H] fp8, block [BT, 128]
    w_desc,  # TMA descriptor of w13 as [E * 2I, H] fp8, block [64, 128]
    xs_ptr,  # [A_pad, G_H] float32
    ws_ptr,  # [E, 2I / 128, G_H] float32
    h_ptr,  # [A_pad, I] fp8 out, slot order
    hs_ptr,  # [A_pad, G_I] float32 out
    block_expert_ptr,  # [A_pad / BT] int32
    num_blocks,
    group_t,
    inter,
    H,
    stride_xs,
    stride_wse,
    stride_wsn,
    stride_h,
    stride_hs,
    STAGES: gl.constexpr,
    FP8_MAX: gl.constexpr,
    AMAX_EPS: gl.constexpr,
    num_warps: gl.constexpr,
):
    BT: gl.constexpr = x_desc.block_type.shape[0]
    n_groups = inter // 128
    block, group = _block_and_tile(num_blocks, n_groups, group_t)
    expert = gl.load(block_expert_ptr + block)
    if expert >= 0:
        n_k = H // 128
        off_t = block * BT
        gate_row = expert * 2 * inter + group * 128  # pass p: gate rows gate_row + 64p, up rows I further
        up_row = gate_row + inter
        ws_gate = ws_ptr + expert * stride_wse + group * stride_wsn  # the gate tile's scale row
        ws_up = ws_ptr + expert * stride_wse + (n_groups + group) * stride_wsn

        x_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BT, 128], x_desc.layout)
        w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, 128, 128], w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
        fence_async_shared()  # the barriers' init before the copy engine uses them
        for i in gl.static_range(STAGES):  # 2 * n_k >= STAGES steps (the launcher checks)
            _gemm1_load(x_desc, w_desc, x_bufs, w_bufs, ready, i, n_k, off_t, gate_row, up_row)

        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 128, 32]
        )
        h_layout: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [num_warps, 1], [1, 0])  # [BT, 64]
        rows = off_t + gl.arange(0, BT, layout=gl.SliceLayout(1, mma_layout))  # [BT]
        is_gate = gl.arange(0, 128, layout=gl.SliceLayout(0, mma_layout)) < 64  # [128]
        # The epilogue's [BT, 128] float32 split buffer; pass 0's h waits in its first half.
        ep = gl.allocate_shared_memory(
            gl.float32, [BT, 128], gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
        )
        total = 2 * n_k
        acc = gl.zeros([BT, 128], gl.float32, mma_layout)
        for p in range(0, 2):
            s0 = p * n_k
            acc = gl.zeros([BT, 128], gl.float32, mma_layout)
            prod_a = _issue(x_bufs, w_bufs, ready, s0, BT, mma_layout)
            scale_a = _gemm1_scales(xs_ptr, ws_gate, ws_up, rows, is_gate, stride_xs, 0)
            for j in range(0, (n_k - 1) // 2):
                k1 = 1 + 2 * j
                prod_b = _issue(x_bufs, w_bufs, ready, s0 + k1, BT, mma_layout)
                acc = acc + warpgroup_mma_wait(num_outstanding=1, deps=(prod_a,)) * scale_a
                scale_b = _gemm1_scales(xs_ptr, ws_gate, ws_up, rows, is_gate, stride_xs, k1)
                _cta_barrier()
                if s0 + k1 - 1 + STAGES < total:
                    _gemm1_load(
                        x_desc,
                        w_desc,
                        x_bufs,
                        w_bufs,
                        ready,
                        s0 + k1 - 1 + STAGES,
                        n_k,
                        off_t,
                        gate_row,
                        up_row,
                    )
                k2 = k1 + 1
                prod_a = _issue(x_bufs, w_bufs, ready, s0 + k2, BT, mma_layout)
                acc = acc + warpgroup_mma_wait(num_outstanding=1, deps=(prod_b,)) * scale_b
                scale_a = _gemm1_scales(xs_ptr, ws_gate, ws_up, rows, is_gate, stride_xs, k2)
                _cta_barrier()
                if s0 + k1 + STAGES < total:
                    _gemm1_load(
                        x_desc, w_desc, x_bufs, w_bufs, ready, s0 + k1 + STAGES, n_k, off_t, gate_row, up_row
                    )
            if (n_k - 1) % 2 == 1:  # one step left: K block n_k - 1
                last = n_k - 1
                prod_b = _issue(x_bufs, w_bufs, ready, s0 + last, BT, mma_layout)
                acc = acc + warpgroup_mma_wait(num_outstanding=1, deps=(prod_a,)) * scale_a
                scale_b = _gemm1_scales(xs_ptr, ws_gate, ws_up, rows, is_gate, stride_xs, last)
                acc = acc + warpgroup_mma_wait(num_outstanding=0, deps=(prod_b,)) * scale_b
            else:
                acc = acc + warpgroup_mma_wait(num_outstanding=0, deps=(prod_a,)) * scale_a
            _cta_barrier()
            # The stages of the steps after the loop's (the last one or two): the next pass's steps.
            for i in gl.static_range(2):
                done = s0 + n_k - 2 + i
                if (done >= s0 + 2 * ((n_k - 1) // 2)) & (done + STAGES < total):
                    _gemm1_load(
                        x_desc, w_desc, x_bufs, w_bufs, ready, done + STAGES, n_k, off_t, gate_row, up_row
                    )
            if p == 0:
                h0 = _gated(acc, ep, h_layout)
                _cta_barrier()
                ep.slice(0, 64, dim=1).store(h0)
        h0f = ep.slice(0, 64, dim=1).load(h_layout)
        h1 = _gated(acc, ep, h_layout)
        amax = gl.maximum(gl.max(gl.abs(h0f), axis=1), gl.max(gl.abs(h1), axis=1))  # [BT]
        scale = gl.maximum(amax, AMAX_EPS) / FP8_MAX  # one 1x128 group of each row
        rows_h = off_t + gl.arange(0, BT, layout=gl.SliceLayout(1, h_layout))
        cols_h = gl.arange(0, 64, layout=gl.SliceLayout(0, h_layout))
        h_row = h_ptr + rows_h[:, None].to(gl.int64) * stride_h + group * 128 + cols_h[None, :]  # [BT, 64]
        q0 = gl.minimum(gl.maximum(h0f / scale[:, None], -FP8_MAX), FP8_MAX)
        q1 = gl.minimum(gl.maximum(h1 / scale[:, None], -FP8_MAX), FP8_MAX)
        gl.store(h_row, q0.to(h_ptr.dtype.element_ty))
        gl.store(h_row + 64, q1.to(h_ptr.dtype.element_ty))
        gl.store(hs_ptr + rows_h.to(gl.int64) * stride_hs + group, scale)


# ---------------------------------------------------------------------------------------------
# GEMM 2: one 128-row tile of w2[e] over I, rows scattered to pair order.


@gluon.jit
def _gemm2_load(h_desc, w_desc, x_bufs, w_bufs, ready, step, off_t, w_row):
    stage = step % x_bufs.shape[0]
    bar = ready.index(stage)
    mbarrier.expect(bar, h_desc.block_type.nbytes + w_desc.block_type.nbytes)
    _tma_load(h_desc, [off_t, step * 128], bar, x_bufs.index(stage))
    _tma_load(w_desc, [w_row, step * 128], bar, w_bufs.index(stage))


@gluon.jit
def _gemm2_refill(h_desc, w_desc, x_bufs, w_bufs, ready, done, n_k, off_t, w_row):
    """Step `done` is complete in both warpgroups: load step done + STAGES into its stage."""
    _cta_barrier()
    if done + x_bufs.shape[0] < n_k:
        _gemm2_load(h_desc, w_desc, x_bufs, w_bufs, ready, done + x_bufs.shape[0], off_t, w_row)


@gluon.jit
def moe_gemm2_prefill_kernel(
    h_desc,  # TMA descriptor of h [A_pad, I] fp8 (slot order), block [BT, 128]
    w_desc,  # TMA descriptor of w2 as [E * H, I] fp8, block [128, 128]
    hs_ptr,  # [A_pad, G_I] float32
    ws_ptr,  # [E, G_H, G_I] float32
    y_ptr,  # [A, H] out (pair order), activation dtype
    sorted_pair_ids_ptr,  # [A_pad] int32
    block_expert_ptr,  # [A_pad / BT] int32
    num_blocks,
    group_t,
    num_pairs,
    H,
    inter,
    stride_hs,
    stride_wse,
    stride_wsn,
    stride_y,
    STAGES: gl.constexpr,
    num_warps: gl.constexpr,
):
    BT: gl.constexpr = h_desc.block_type.shape[0]
    block, tile = _block_and_tile(num_blocks, H // 128, group_t)
    expert = gl.load(block_expert_ptr + block)
    if expert >= 0:
        n_k = inter // 128
        off_t = block * BT
        w_row = expert * H + tile * 128
        ws_row = ws_ptr + expert * stride_wse + tile * stride_wsn  # the tile's scales along I

        x_bufs = gl.allocate_shared_memory(h_desc.dtype, [STAGES, BT, 128], h_desc.layout)
        w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, 128, 128], w_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
        fence_async_shared()
        for i in gl.static_range(STAGES):
            if i < n_k:
                _gemm2_load(h_desc, w_desc, x_bufs, w_bufs, ready, i, off_t, w_row)

        mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, 128, 32]
        )
        rows_t = gl.arange(0, BT, layout=gl.SliceLayout(1, mma_layout))  # [BT]
        cols = gl.arange(0, 128, layout=gl.SliceLayout(0, mma_layout))  # [128]
        rows = off_t + rows_t
        acc = gl.zeros([BT, 128], gl.float32, mma_layout)
        prod_a = _issue(x_bufs, w_bufs, ready, 0, BT, mma_layout)
        scale_a = gl.load(hs_ptr + rows * stride_hs) * gl.load(ws_row)
        for j in range(0, (n_k - 1) // 2):
            k1 = 1 + 2 * j
            prod_b = _issue(x_bufs, w_bufs, ready, k1, BT, mma_layout)
            acc = acc + warpgroup_mma_wait(num_outstanding=1, deps=(prod_a,)) * scale_a[:, None]
            scale_b = gl.load(hs_ptr + rows * stride_hs + k1) * gl.load(ws_row + k1)
            _gemm2_refill(h_desc, w_desc, x_bufs, w_bufs, ready, k1 - 1, n_k, off_t, w_row)
            k2 = k1 + 1
            prod_a = _issue(x_bufs, w_bufs, ready, k2, BT, mma_layout)
            acc = acc + warpgroup_mma_wait(num_outstanding=1, deps=(prod_b,)) * scale_b[:, None]
            scale_a = gl.load(hs_ptr + rows * stride_hs + k2) * gl.load(ws_row + k2)
            _gemm2_refill(h_desc, w_desc, x_bufs, w_bufs, ready, k1, n_k, off_t, w_row)
        if (n_k - 1) % 2 == 1:
            last = n_k - 1
            prod_b = _issue(x_bufs, w_bufs, ready, last, BT, mma_layout)
            acc = acc + warpgroup_mma_wait(num_outstanding=1, deps=(prod_a,)) * scale_a[:, None]
            scale_b = gl.load(hs_ptr + rows * stride_hs + last) * gl.load(ws_row + last)
            acc = acc + warpgroup_mma_wait(num_outstanding=0, deps=(prod_b,)) * scale_b[:, None]
        else:
            acc = acc + warpgroup_mma_wait(num_outstanding=0, deps=(prod_a,)) * scale_a[:, None]
        for i in gl.static_range(STAGES):
            mbarrier.invalidate(ready.index(i))
        pair = gl.load(sorted_pair_ids_ptr + rows)  # [BT]
        y_ptrs = y_ptr + pair[:, None].to(gl.int64) * stride_y + (tile * 128 + cols)[None, :]
        gl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(pair < num_pairs)[:, None])


# ---------------------------------------------------------------------------------------------
# Launchers.


def gemm1(xg, xgs, w13, w13_scale, block_expert, tiles: dict, fp8_max: float, amax_eps: float):
    """h [A_pad, I] fp8 in slot order and its scales [A_pad, G_I] (`moe_gemm1_prefill_kernel`)."""
    slots, H = xg.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    h = torch.empty(slots, inter, dtype=xg.dtype, device=xg.device)  # [A_pad, I]
    hs = torch.empty(slots, inter // 128, dtype=torch.float32, device=xg.device)  # [A_pad, G_I]
    num_blocks = block_expert.numel()
    group_t = _group_t("GEMM 1", tiles, num_blocks)
    if num_blocks == 0:
        return h, hs
    if tiles["STAGES"] > 2 * (H // BLOCK_K):
        raise ValueError(f"fused_moe: the Gluon prefill GEMM 1 needs 2 * H / 128 >= STAGES; H = {H}, {tiles}")
    moe_gemm1_prefill_kernel[(num_blocks * (inter // 128),)](
        _descriptor(xg, [BLOCK_T, BLOCK_K]),
        _descriptor(w13.view(E * two_i, H), [HALF_W, BLOCK_K]),
        xgs,
        w13_scale,
        h,
        hs,
        block_expert,
        num_blocks,
        group_t,
        inter,
        H,
        xgs.stride(0),
        w13_scale.stride(0),
        w13_scale.stride(1),
        h.stride(0),
        hs.stride(0),
        STAGES=tiles["STAGES"],
        FP8_MAX=fp8_max,
        AMAX_EPS=amax_eps,
        num_warps=tiles["num_warps"],
    )
    return h, hs


def _group_t(gemm: str, tiles: dict, num_blocks: int) -> int:
    """The launch's group of token blocks (`_block_and_tile`): GROUP_T, at most the blocks there are.
    The Triton GEMMs' GROUP_T = 0 (the plain grid) is a group of every block here."""
    group_t = tiles["GROUP_T"]
    if not (isinstance(group_t, int) and group_t >= 1):
        raise ValueError(
            f"fused_moe: the Gluon prefill {gemm} needs GROUP_T >= 1 (token blocks a group; a large one is "
            f"the plain grid), got {group_t!r}"
        )
    return max(1, min(group_t, num_blocks))


def gemm2(h, hs, w2, w2_scale, sorted_pair_ids, block_expert, num_pairs: int, out_dtype, tiles: dict):
    """y [A, H] = h @ w2[e]^T per local pair, in out_dtype (`moe_gemm2_prefill_kernel`)."""
    E, H, inter = w2.shape
    y = torch.empty(num_pairs, H, dtype=out_dtype, device=h.device)  # [A, H]
    num_blocks = block_expert.numel()
    group_t = _group_t("GEMM 2", tiles, num_blocks)
    if num_blocks == 0:
        return y
    moe_gemm2_prefill_kernel[(num_blocks * triton.cdiv(H, BLOCK_W),)](
        _descriptor(h, [BLOCK_T, BLOCK_K]),
        _descriptor(w2.view(E * H, inter), [BLOCK_W, BLOCK_K]),
        hs,
        w2_scale,
        y,
        sorted_pair_ids,
        block_expert,
        num_blocks,
        group_t,
        num_pairs,
        H,
        inter,
        hs.stride(0),
        w2_scale.stride(0),
        w2_scale.stride(1),
        y.stride(0),
        STAGES=tiles["STAGES"],
        num_warps=tiles["num_warps"],
    )
    return y
