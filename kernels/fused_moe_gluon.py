"""FP8 MoE decode GEMMs for Hopper in Triton's Gluon dialect: each expert's weight tile streamed
once per 64- or 128-token block by the copy engine, in a persistent grid.

Shapes: the legend in docs/ARCHITECTURE.md and kernels/fused_moe.py (T, H, I: `inter`, E local
experts, K top-k, A = T*K pairs, A_pad aligned pair slots, G_H / G_I scale groups).

Same semantics as `fused_moe` on FP8 weights (kernels/fused_moe.py, whose `fused_moe_ref` is the
reference); it replaces that file's two decode GEMMs, keeping its `moe_align` (here with 64-slot
blocks), `fp8_quant` and `moe_combine_kernel`:

1. `moe_gather` (kernels/fused_moe.py, plain Triton) copies each real block's x rows and scales into slot order,
   xg [A_pad, H] and xgs [A_pad, G_H] (zeros in padding slots), so that the copy engine can load
   a block's 64 rows as one tile.
2. `moe_gemm1_gluon_kernel`: h [A_pad, I] in slot order, silu(gate) * up quantized per 1x128
   group (a 128-column tile is one group), scales [A_pad, G_I].
3. `moe_gemm2_gluon_kernel`: y [A, H] = h @ w2[e]^T, rows scattered back to pair order.

Why: the Triton decode GEMMs use 16- or 32-token blocks (tokens as the wgmma's N, weights as M;
64-token blocks spilled or ran one program per SM with shallow pipelines), so at 256 sequences a
rank (about 62 local pairs per expert) each weight tile was read by 2-3 blocks: from L2 mostly,
but L2 -> SM traffic then ran near 3x the weight bytes and GEMM 1 reached 58% of the weight
bandwidth (docs/PERF.md). Here tokens are the wgmma's M (64, one warpgroup), weights its N (128),
so one block holds up to 64 pairs of an expert (1-2 blocks an expert at 256 sequences), and the
weight tiles come through a ring of STAGES shared-memory stages filled by TMA (one mbarrier a
stage) that runs ahead across work items: each program of the persistent grid takes items
(block, weight tile) pid, pid + grid, ..., weight tiles fastest, so the programs in flight share a
few blocks' x tiles and each expert's blocks read its weight tiles at about the same time.

One warpgroup per program (4 warps): its wgmma completes as a whole before the stage it read is
refilled, with no barrier between warpgroups. Each K step's product is scaled (the block's
token scales times the weight tile's one 128x128 block scale) after its wgmma completes; the
kernel is bound by the weight stream, and the TMA ring keeps STAGES steps of it in flight.

128-slot blocks (`BLOCK_TS`, `fused_moe.GLUON_DECODE_WIDE`, the default at 256 sequences a rank):
GEMM 1 takes two warpgroups along the tokens, so an expert of up to 128 pairs streams its gate
and up tiles once (with 64-slot blocks, the ~40% of experts above 64 pairs streamed them twice).
Its two 128 x 128 sums take 128 registers a thread; each K step then computes four 64-column
half products, two in flight, each next one chained onto the sum just scaled (`SPLIT`: 224
registers, no spills). GEMM 2 stays on 64-slot blocks: it takes the halves of GEMM 1's blocks
that hold pairs (`moe_align_halves`, INDIRECT: a list entry says where its slots start), since
on 128-slot blocks its tensor work per weight byte doubles and it ran slower (docs/PERF.md).

Needs Triton's Gluon with its Hopper API (written against 3.6; compiles with 3.9 too), H and I
multiples of 128, contiguous tensors (`shapes_ok`). The wrapper in kernels/fused_moe.py calls
these kernels only where the backend chose them at start-up.
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

from .fp8_gemm_gluon import _cta_barrier, _tma_load

BLOCK_T = 64  # pair slots a block: the wgmma's M (one warpgroup)
BLOCK_TS = (64, 128)  # the block sizes the kernels take: 128 is two warpgroups along M (8 warps)
BLOCK_W = 128  # weight rows a tile: the wgmma's N; GEMM 1's tile is one 1x128 group of h
BLOCK_K = 128  # one FP8 scale group a step


@gluon.jit
def _item_coords(item, n_tiles, num_blocks, block_expert_ptr, block_base_ptr, INDIRECT: gl.constexpr):
    """(block, weight tile, local expert) of work item `item`, the block clamped into the list and
    the expert to >= 0: an item past this program's last gets safe addresses, its values unused.
    The block is where its slots start, in blocks: its index in the list, or (INDIRECT) the list's
    block_base entry."""
    block = gl.minimum(item // n_tiles, num_blocks - 1)
    expert = gl.maximum(gl.load(block_expert_ptr + block), 0)
    if INDIRECT:
        block = gl.load(block_base_ptr + block)
    return block, item % n_tiles, expert


@gluon.jit
def _load_step(
    x_desc,
    w_desc,
    x_bufs,
    w_bufs,
    ready,
    stage,
    block,
    tile,
    kb,
    expert,
    rows_per_expert,
    up_offset,
    W_TILES: gl.constexpr,
):
    """TMA loads of one K step into stage `stage`: block `block`'s x tile and its expert's weight
    tile(s) (GEMM 1: gate rows, then the up rows `up_offset` further)."""
    w_row = expert * rows_per_expert + tile * w_desc.block_type.shape[0]
    bar = ready.index(stage)
    mbarrier.expect(bar, x_desc.block_type.nbytes + W_TILES * w_desc.block_type.nbytes)
    _tma_load(x_desc, [block * x_desc.block_type.shape[0], kb * 128], bar, x_bufs.index(stage))
    _tma_load(w_desc, [w_row, kb * 128], bar, w_bufs.index(W_TILES * stage))
    if W_TILES == 2:
        _tma_load(w_desc, [w_row + up_offset, kb * 128], bar, w_bufs.index(2 * stage + 1))


@gluon.jit
def _weight_scales(row_ptr, tile, stride_wsn, cols, W_GROUPS: gl.constexpr):
    """A weight tile's block scales at one K block (row_ptr: the expert's scales at that K block):
    a scalar for a 128-row tile, else one per column ([BW]; W_GROUPS 128-row groups)."""
    if W_GROUPS == 1:
        return gl.load(row_ptr + tile * stride_wsn)
    else:
        return gl.load(row_ptr + (tile * W_GROUPS + cols // 128) * stride_wsn)


@gluon.jit
def _scaled(prod, x_scale, w_scale, W_GROUPS: gl.constexpr):
    """prod [BT, BW] times its token scales [BT] and weight scales (scalar, or [BW])."""
    if W_GROUPS == 1:
        return prod * (x_scale * w_scale)[:, None]
    else:
        return prod * x_scale[:, None] * w_scale[None, :]


@gluon.jit
def _async_product(x_buf, w_buf, BLOCK_T: gl.constexpr, BLOCK_W: gl.constexpr, mma_layout: gl.constexpr):
    """x_buf @ w_buf^T [BT, BW], issued asynchronously (a fresh product)."""
    return warpgroup_mma(
        x_buf,
        w_buf.permute((1, 0)),
        gl.zeros([BLOCK_T, BLOCK_W], gl.float32, mma_layout),
        use_acc=False,
        is_async=True,
    )


@gluon.jit
def _count_items(block_expert_ptr, num_blocks, n_tiles, MAX_BLOCKS: gl.constexpr, num_warps: gl.constexpr):
    """Work items (real block, weight tile): blocks past the last expert's run hold -1."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    offs = gl.arange(0, MAX_BLOCKS, layout=layout)
    experts = gl.load(block_expert_ptr + offs, mask=offs < num_blocks, other=-1)
    return gl.sum((experts >= 0).to(gl.int32), axis=0) * n_tiles


@gluon.jit
def _moe_gemm_loop(
    x_desc,
    w_desc,
    xs_ptr,
    ws_ptr,
    out_ptr,
    outs_ptr,
    sorted_pair_ids_ptr,
    block_expert_ptr,
    block_base_ptr,
    num_blocks,
    num_pairs,
    N,
    K,
    rows_per_expert,
    stride_xs,
    stride_wse,
    stride_wsn,
    stride_out,
    stride_outs,
    GATED: gl.constexpr,
    INDIRECT: gl.constexpr,
    STAGES: gl.constexpr,
    MAX_BLOCKS: gl.constexpr,
    FP8_MAX: gl.constexpr,
    AMAX_EPS: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Both GEMMs' persistent loop. Program pid takes items pid, pid + grid, ... (item = block *
    n_tiles + tile) and walks each item's K steps; step s of its sequence uses stage s % STAGES.
    Nothing on a step's path waits on a global load or divides by a run-time value: the TMA
    producer runs STAGES steps ahead with its own (block, tile, K block, expert), advanced by
    one each step, and each step's scales are loaded during the step before. GATED (GEMM 1):
    the gate and up tiles of N = I columns and the silu * up, quantized epilogue into out (slot
    order) and outs; otherwise (GEMM 2) one tile and rows scattered to pair order."""
    W_TILES: gl.constexpr = 2 if GATED else 1
    BLOCK_T: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_W: gl.constexpr = w_desc.block_type.shape[0]
    W_GROUPS: gl.constexpr = BLOCK_W // 128  # GEMM 2 may take 256-row tiles; GEMM 1's are 128
    pid = gl.program_id(0)
    grid = gl.num_programs(0)
    n_k = gl.cdiv(K, 128)
    n_tiles = N // BLOCK_W
    up_group = N // 128  # GEMM 1: the up rows' first scale row
    n_items = _count_items(block_expert_ptr, num_blocks, n_tiles, MAX_BLOCKS, num_warps)
    my_items = (n_items - pid + grid - 1) // grid
    total = my_items * n_k  # this program's steps

    x_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BLOCK_T, 128], x_desc.layout)
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [W_TILES * STAGES, BLOCK_W, 128], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
    fence_async_shared()  # the barriers' init before the copy engine uses them
    for i in gl.static_range(STAGES):
        if i < total:
            block, tile, expert = _item_coords(
                pid + (i // n_k) * grid, n_tiles, num_blocks, block_expert_ptr, block_base_ptr, INDIRECT
            )
            _load_step(
                x_desc, w_desc, x_bufs, w_bufs, ready, i, block, tile, i % n_k, expert,
                rows_per_expert, N, W_TILES,
            )  # fmt: skip
    # The producer's next step, STAGES.
    load_item = pid + (STAGES // n_k) * grid
    load_kb = STAGES % n_k
    load_block, load_tile, load_expert = _item_coords(
        load_item, n_tiles, num_blocks, block_expert_ptr, block_base_ptr, INDIRECT
    )

    # 64-slot blocks: one warpgroup along the tokens; a second one (8 warps) takes half of the
    # weight rows. 128-slot blocks: two warpgroups along the tokens (8 warps); GEMM 1 there keeps
    # gate and up (128 x 128 each: 128 registers a thread) as four halves of CHUNK_W columns
    # (`SPLIT`) and has two 32-register half products in flight beside them (two full products
    # would need 128 more, and spill).
    WG_M: gl.constexpr = BLOCK_T // 64
    WG_N: gl.constexpr = num_warps // 4 // WG_M
    SPLIT: gl.constexpr = 2 if GATED and WG_M == 2 else 1
    CHUNK_W: gl.constexpr = BLOCK_W // SPLIT
    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4 * WG_M, WG_N], instr_shape=[16, CHUNK_W // WG_N, 32]
    )
    rows = gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, mma_layout))  # [BT]
    cols = gl.arange(0, CHUNK_W, layout=gl.SliceLayout(0, mma_layout))  # [CW]
    block, tile, expert = _item_coords(pid, n_tiles, num_blocks, block_expert_ptr, block_base_ptr, INDIRECT)
    x_scale = gl.load(xs_ptr + (block * BLOCK_T + rows) * stride_xs)  # [BT] step 0's scales
    w_scale = _weight_scales(ws_ptr + expert * stride_wse, tile, stride_wsn, cols, W_GROUPS)
    u_scale = gl.load(ws_ptr + expert * stride_wse + (up_group + tile) * stride_wsn) if GATED else w_scale
    acc = gl.zeros([BLOCK_T, CHUNK_W], gl.float32, mma_layout)  # [BT, CW] (GEMM 1: gate)
    acc_u = gl.zeros([BLOCK_T, CHUNK_W], gl.float32, mma_layout)  # GEMM 1: up
    acc_1 = gl.zeros([BLOCK_T, CHUNK_W], gl.float32, mma_layout)  # SPLIT 2: the gate's second half
    acc_u1 = gl.zeros([BLOCK_T, CHUNK_W], gl.float32, mma_layout)  # SPLIT 2: the up's second half
    s = 0
    for k in range(0, my_items):
        item = pid + k * grid
        block, tile, expert = _item_coords(
            item, n_tiles, num_blocks, block_expert_ptr, block_base_ptr, INDIRECT
        )
        next_block, next_tile, next_expert = _item_coords(
            item + grid, n_tiles, num_blocks, block_expert_ptr, block_base_ptr, INDIRECT
        )
        for kb in range(0, n_k):
            # Step s + 1's scales (this item's K block kb + 1, or the next item's first), while
            # this step runs.
            last = (kb + 1 == n_k).to(gl.int32)
            kb1 = kb + 1 - last * n_k
            block1 = block + last * (next_block - block)
            tile1 = tile + last * (next_tile - tile)
            ws_row1 = ws_ptr + (expert + last * (next_expert - expert)) * stride_wse + kb1
            x_scale_next = gl.load(xs_ptr + (block1 * BLOCK_T + rows) * stride_xs + kb1)
            w_scale_next = _weight_scales(ws_row1, tile1, stride_wsn, cols, W_GROUPS)
            if GATED:
                u_scale_next = gl.load(ws_row1 + (up_group + tile1) * stride_wsn)

            stage = s % STAGES
            mbarrier.wait(ready.index(stage), (s // STAGES) & 1)
            if SPLIT == 2:
                # Four half products, two in flight: the gate's two are issued together, and each
                # up half is issued once a gate half has been scaled into its sum, accumulating
                # onto that sum times 0. That makes it wait for the scale FMA (ptxas otherwise
                # defers the FMAs past the later products, keeps every product live and spills;
                # so 224 registers, no spills). The zero term joins each element to itself in
                # the same row, and a row whose sum is inf or NaN has its whole 1x128 group of h
                # so already.
                x_buf = x_bufs.index(stage)
                gate_buf = w_bufs.index(2 * stage)
                up_buf = w_bufs.index(2 * stage + 1)
                gate_scale = (x_scale * w_scale)[:, None]
                up_scale = (x_scale * u_scale)[:, None]
                p0 = _async_product(x_buf, gate_buf.slice(0, CHUNK_W), BLOCK_T, CHUNK_W, mma_layout)
                p1 = _async_product(x_buf, gate_buf.slice(CHUNK_W, CHUNK_W), BLOCK_T, CHUNK_W, mma_layout)
                acc = acc + warpgroup_mma_wait(num_outstanding=1, deps=(p0,)) * gate_scale
                p2 = warpgroup_mma(x_buf, up_buf.slice(0, CHUNK_W).permute((1, 0)), acc * 0.0, is_async=True)
                acc_1 = acc_1 + warpgroup_mma_wait(num_outstanding=1, deps=(p1,)) * gate_scale
                p3 = warpgroup_mma(
                    x_buf, up_buf.slice(CHUNK_W, CHUNK_W).permute((1, 0)), acc_1 * 0.0, is_async=True
                )
                acc_u = acc_u + warpgroup_mma_wait(num_outstanding=1, deps=(p2,)) * up_scale
                acc_u1 = acc_u1 + warpgroup_mma_wait(num_outstanding=0, deps=(p3,)) * up_scale
            elif GATED:
                gate = _async_product(
                    x_bufs.index(stage), w_bufs.index(2 * stage), BLOCK_T, BLOCK_W, mma_layout
                )
                up = _async_product(
                    x_bufs.index(stage), w_bufs.index(2 * stage + 1), BLOCK_T, BLOCK_W, mma_layout
                )
                gate = warpgroup_mma_wait(num_outstanding=1, deps=(gate,))
                acc = acc + gate * (x_scale * w_scale)[:, None]  # while the up product runs
                up = warpgroup_mma_wait(num_outstanding=0, deps=(up,))
                acc_u = acc_u + up * (x_scale * u_scale)[:, None]
            else:
                prod = _async_product(x_bufs.index(stage), w_bufs.index(stage), BLOCK_T, BLOCK_W, mma_layout)
                prod = warpgroup_mma_wait(num_outstanding=0, deps=(prod,))
                acc = acc + _scaled(prod, x_scale, w_scale, W_GROUPS)
            if num_warps > 4:
                _cta_barrier()  # every warpgroup's wgmma has read the stage
            if s + STAGES < total:  # the stage is read: load step s + STAGES into it
                _load_step(
                    x_desc, w_desc, x_bufs, w_bufs, ready, stage, load_block, load_tile, load_kb,
                    load_expert, rows_per_expert, N, W_TILES,
                )  # fmt: skip
                load_kb += 1
                if load_kb == n_k:
                    load_kb = 0
                    load_item += grid
                    load_block, load_tile, load_expert = _item_coords(
                        load_item, n_tiles, num_blocks, block_expert_ptr, block_base_ptr, INDIRECT
                    )
            x_scale = x_scale_next
            w_scale = w_scale_next
            if GATED:
                u_scale = u_scale_next
            s += 1

        slots = block * BLOCK_T + rows  # [BT]
        if GATED:
            # silu(gate) * up, quantized per row as one 1x128 group (this tile is group `tile`).
            h = acc / (1.0 + gl.exp(-acc)) * acc_u
            amax = gl.max(gl.abs(h), axis=1)  # [BT]
            if SPLIT == 2:
                h1 = acc_1 / (1.0 + gl.exp(-acc_1)) * acc_u1
                amax = gl.maximum(amax, gl.max(gl.abs(h1), axis=1))
            scale = gl.maximum(amax, AMAX_EPS) / FP8_MAX
            q = gl.minimum(gl.maximum(h / scale[:, None], -FP8_MAX), FP8_MAX)
            h_ptrs = out_ptr + slots[:, None].to(gl.int64) * stride_out + (tile * BLOCK_W + cols)[None, :]
            gl.store(h_ptrs, q.to(out_ptr.dtype.element_ty))
            if SPLIT == 2:
                q1 = gl.minimum(gl.maximum(h1 / scale[:, None], -FP8_MAX), FP8_MAX)
                gl.store(h_ptrs + CHUNK_W, q1.to(out_ptr.dtype.element_ty))
                acc_1 = gl.zeros([BLOCK_T, CHUNK_W], gl.float32, mma_layout)
                acc_u1 = gl.zeros([BLOCK_T, CHUNK_W], gl.float32, mma_layout)
            gl.store(outs_ptr + slots.to(gl.int64) * stride_outs + tile, scale)
            acc_u = gl.zeros([BLOCK_T, CHUNK_W], gl.float32, mma_layout)
        else:
            pair = gl.load(sorted_pair_ids_ptr + slots)  # [BT]
            y_ptrs = out_ptr + pair[:, None].to(gl.int64) * stride_out + (tile * BLOCK_W + cols)[None, :]
            gl.store(y_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(pair < num_pairs)[:, None])
        acc = gl.zeros([BLOCK_T, CHUNK_W], gl.float32, mma_layout)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(i))


@gluon.jit
def moe_gemm1_gluon_kernel(
    x_desc,  # TMA descriptor of xg [A_pad, H] fp8, block [BT, 128]
    w_desc,  # TMA descriptor of w13 as [E * 2I, H] fp8, block [BW, 128]
    xs_ptr,  # [A_pad, G_H] float32
    ws_ptr,  # [E, 2I / 128, G_H] float32
    h_ptr,  # [A_pad, I] fp8 out, slot order
    hs_ptr,  # [A_pad, G_I] float32 out
    block_expert_ptr,  # [A_pad / BT] int32
    num_blocks,
    inter,
    H,
    stride_xs,
    stride_wse,
    stride_wsn,
    stride_h,
    stride_hs,
    STAGES: gl.constexpr,
    MAX_BLOCKS: gl.constexpr,
    FP8_MAX: gl.constexpr,
    AMAX_EPS: gl.constexpr,
    num_warps: gl.constexpr,
):
    _moe_gemm_loop(
        x_desc, w_desc, xs_ptr, ws_ptr, h_ptr, hs_ptr, block_expert_ptr, block_expert_ptr,
        block_expert_ptr, num_blocks, 0, inter, H, 2 * inter, stride_xs, stride_wse, stride_wsn,
        stride_h, stride_hs, True, False, STAGES, MAX_BLOCKS, FP8_MAX, AMAX_EPS, num_warps,
    )  # fmt: skip


@gluon.jit
def moe_gemm2_gluon_kernel(
    x_desc,  # TMA descriptor of h [A_pad, I] fp8 (slot order), block [BT, 128]
    w_desc,  # TMA descriptor of w2 as [E * H, I] fp8, block [BW, 128]
    xs_ptr,  # [A_pad, G_I] float32
    ws_ptr,  # [E, G_H, G_I] float32
    y_ptr,  # [A, H] out (pair order), activation dtype
    sorted_pair_ids_ptr,  # [A_pad] int32
    block_expert_ptr,  # [num_blocks] int32: the blocks' local experts (-1 past the last)
    block_base_ptr,  # INDIRECT: [num_blocks] int32, where each block's slots start, in blocks
    num_blocks,
    num_pairs,
    H,
    inter,
    stride_xs,
    stride_wse,
    stride_wsn,
    stride_y,
    INDIRECT: gl.constexpr,
    STAGES: gl.constexpr,
    MAX_BLOCKS: gl.constexpr,
    num_warps: gl.constexpr,
):
    _moe_gemm_loop(
        x_desc, w_desc, xs_ptr, ws_ptr, y_ptr, xs_ptr, sorted_pair_ids_ptr, block_expert_ptr,
        block_base_ptr, num_blocks, num_pairs, H, inter, H, stride_xs, stride_wse, stride_wsn,
        stride_y, 0, False, INDIRECT, STAGES, MAX_BLOCKS, 448.0, 1e-10, num_warps,
    )  # fmt: skip


def available() -> bool:
    """Whether this Triton's Gluon has the Hopper API the kernels use."""
    return hasattr(gl, "NVMMADistributedLayout") and hasattr(mbarrier, "expect")


def shapes_ok(H: int, inter: int) -> bool:
    """H and I multiples of 128: whole 128-row weight tiles and 128-wide K steps, no masks."""
    return H % BLOCK_W == 0 and inter % BLOCK_W == 0


def _descriptor(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    layout = gl.NVMMASharedLayout.get_default_for(block, gl.float8e4nv)
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)


def _grid(device: torch.device, tiles: dict) -> tuple[int]:
    from . import num_sms

    return (num_sms(device) * tiles["CTAS_PER_SM"],)


def block_slots(tiles: dict, slots: int, num_blocks: int) -> int:
    """The block size of `tiles` ("BLOCK_T", 64 by default), checked against the kernels' and the
    aligned pairs' (slots / num_blocks): 128-slot blocks need 8 warps (two warpgroups along M)."""
    block_t = tiles.get("BLOCK_T", BLOCK_T)
    if block_t not in BLOCK_TS:
        raise ValueError(f"fused_moe: the Gluon decode GEMMs take blocks of {BLOCK_TS} slots, not {block_t}")
    if block_t == 128 and tiles["num_warps"] != 8:
        raise ValueError(
            f"fused_moe: 128-slot Gluon decode blocks need num_warps = 8 (two warpgroups along the "
            f"tokens), not {tiles['num_warps']}"
        )
    if slots != block_t * num_blocks:
        raise ValueError(
            f"fused_moe: the pairs were aligned to {slots // max(num_blocks, 1)}-slot blocks, the tiles "
            f"say {block_t}: align with moe_align(..., block_t={block_t})"
        )
    return block_t


def gemm1(xg, xgs, w13, w13_scale, block_expert, tiles: dict, fp8_max: float, amax_eps: float):
    """h [A_pad, I] fp8 in slot order and its scales [A_pad, G_I] (`moe_gemm1_gluon_kernel`)."""
    slots, H = xg.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    h = torch.empty(slots, inter, dtype=xg.dtype, device=xg.device)  # [A_pad, I]
    hs = torch.empty(slots, inter // 128, dtype=torch.float32, device=xg.device)  # [A_pad, G_I]
    num_blocks = block_expert.numel()
    if num_blocks == 0:
        return h, hs
    block_t = block_slots(tiles, slots, num_blocks)
    moe_gemm1_gluon_kernel[_grid(xg.device, tiles)](
        _descriptor(xg, [block_t, BLOCK_K]),
        _descriptor(w13.view(E * two_i, H), [BLOCK_W, BLOCK_K]),
        xgs,
        w13_scale,
        h,
        hs,
        block_expert,
        num_blocks,
        inter,
        H,
        xgs.stride(0),
        w13_scale.stride(0),
        w13_scale.stride(1),
        h.stride(0),
        hs.stride(0),
        STAGES=tiles["STAGES"],
        MAX_BLOCKS=max(128, triton.next_power_of_2(num_blocks)),
        FP8_MAX=fp8_max,
        AMAX_EPS=amax_eps,
        num_warps=tiles["num_warps"],
    )
    return h, hs


def gemm2(
    h, hs, w2, w2_scale, sorted_pair_ids, block_expert, num_pairs: int, out_dtype, tiles: dict, halves=None
):
    """y [A, H] = h @ w2[e]^T per local pair, in out_dtype (`moe_gemm2_gluon_kernel`). halves: GEMM 2
    on 64-slot halves of h's 128-slot blocks, (half_expert, half_base) from `moe_align_halves`
    (tiles' BLOCK_T 64): only halves that hold pairs stream weights; block_expert is then unused."""
    E, H, inter = w2.shape
    y = torch.empty(num_pairs, H, dtype=out_dtype, device=h.device)  # [A, H]
    if halves is None:
        num_blocks = block_expert.numel()
        block_list, block_base = block_expert, block_expert
        slots = h.shape[0]
    else:
        block_list, block_base = halves
        num_blocks = block_list.numel()
        slots = num_blocks * tiles.get("BLOCK_T", BLOCK_T)  # the halves index h's rows
    if num_blocks == 0:
        return y
    block_t = block_slots(tiles, slots, num_blocks)
    block_w = tiles.get("BLOCK_W", BLOCK_W)
    if block_w not in (128, 256) or H % block_w:
        raise ValueError(
            f"fused_moe: the Gluon GEMM 2 takes 128- or 256-row tiles dividing H = {H}, not {block_w}"
        )
    if block_t == 128 and block_w != 128:
        raise ValueError(
            f"fused_moe: the Gluon GEMM 2 takes 128-row tiles with 128-slot blocks, not {block_w}"
        )
    moe_gemm2_gluon_kernel[_grid(h.device, tiles)](
        _descriptor(h, [block_t, BLOCK_K]),
        _descriptor(w2.view(E * H, inter), [block_w, BLOCK_K]),
        hs,
        w2_scale,
        y,
        sorted_pair_ids,
        block_list,
        block_base,
        num_blocks,
        num_pairs,
        H,
        inter,
        hs.stride(0),
        w2_scale.stride(0),
        w2_scale.stride(1),
        y.stride(0),
        INDIRECT=halves is not None,
        STAGES=tiles["STAGES"],
        MAX_BLOCKS=max(128, triton.next_power_of_2(num_blocks)),
        num_warps=tiles["num_warps"],
    )
    return y
