"""Block-scaled FP8 GEMM for Hopper in Triton's Gluon dialect: `fp8_gemm` with the wgmma of one
block along Din overlapped with the scaling of the previous one.

Shapes: the legend in docs/ARCHITECTURE.md (T rows of x, Din, Dout, G_in, G_out).

Same semantics and arguments as `fp8_gemm` (kernels/fp8_gemm.py, whose `fp8_gemm_ref` is the
reference): y = (x_fp8 * x_scales) @ (w_fp8 * w_scale_inv)^T, fp32 accumulation, each 128-wide
block's product scaled before it joins the accumulator.

Why Gluon: Triton 3.6 waits for every wgmma before the scale FMA that reads its result (a
`wgmma.wait_group 0` each step: the tensor cores idle while the CUDA cores scale), and two dots a
step spill (255 registers, docs/PERF.md). Here each step issues block k's wgmma asynchronously,
waits until only that one is in flight (`warpgroup_mma_wait(num_outstanding=1)`), scales block
k - 1's product into the accumulator, then refills the stage block k - 1 used: three [BT, BW]
fp32 tiles live (the accumulator and two products), the x and w tiles of STAGES blocks in shared
memory, loaded by TMA (mbarrier per stage). The weight tile is BW <= 128 rows of one 128-row
scale block, so its scale is one scalar a step; the token scales are a [BT] vector.

Split-K as in `fp8_gemm`: program (tile, split) covers k_blocks_per_split blocks and writes
float32 partials that `fp8_gemm_reduce_kernel` sums in a fixed order.

Needs Triton's Gluon with its Hopper API (written against 3.6, the GPU host's; compiles with 3.9
too); `available()` says whether this Triton has it. The wrapper in kernels/fp8_gemm.py calls this
kernel only where the backend chose it at start-up.
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

BLOCK_K = 128  # one FP8 scale group a step

# The copy engine's global -> shared load: `async_copy_global_to_shared` in Triton 3.6 (the GPU
# host's), renamed `async_load` in later releases (3.9 on the dev machines).
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
# A barrier among the CTA's threads: `thread_barrier` in Triton 3.6's Gluon, `barrier` later.
_cta_barrier = gl.thread_barrier if hasattr(gl, "thread_barrier") else gl.barrier


@gluon.jit
def _issue_load(x_desc, w_desc, x_bufs, w_bufs, ready, stage, off_t, off_w, kb):
    bar = ready.index(stage)
    mbarrier.expect(bar, x_desc.block_type.nbytes + w_desc.block_type.nbytes)
    _tma_load(x_desc, [off_t, kb * 128], bar, x_bufs.index(stage))
    _tma_load(w_desc, [off_w, kb * 128], bar, w_bufs.index(stage))


@gluon.jit
def _issue_mma(
    x_bufs,
    w_bufs,
    ready,
    stage,
    phase,
    BLOCK_T: gl.constexpr,
    BLOCK_W: gl.constexpr,
    mma_layout: gl.constexpr,
):
    """Wait for a stage's tiles, issue their product [BT, BW] asynchronously (a fresh one)."""
    mbarrier.wait(ready.index(stage), phase)
    return warpgroup_mma(
        x_bufs.index(stage),
        w_bufs.index(stage).permute((1, 0)),
        gl.zeros([BLOCK_T, BLOCK_W], gl.float32, mma_layout),
        use_acc=False,
        is_async=True,
    )


@gluon.jit
def _refill(x_desc, w_desc, x_bufs, w_bufs, ready, done, n_k, off_t, off_w, kb_start, STAGES: gl.constexpr):
    """Block `done`'s product is complete in this warpgroup; once every warpgroup's is (the CTA
    barrier: with 8 warps the other one may still be reading the stage), load block done + STAGES
    into its stage."""
    _cta_barrier()
    if done + STAGES < n_k:
        _issue_load(
            x_desc, w_desc, x_bufs, w_bufs, ready, done % STAGES, off_t, off_w, kb_start + done + STAGES
        )


@gluon.jit
def _block_scale(xs_ptr, ws_row, rows, row_mask, stride_xs, kb):
    """[BT] x scale of block kb times the weight tile's scalar scale of block kb."""
    return gl.load(xs_ptr + rows * stride_xs + kb, mask=row_mask, other=0.0) * gl.load(ws_row + kb)


@gluon.jit
def fp8_gemm_gluon_kernel(
    x_desc,  # TMA descriptor of x_fp8 [T, Din], block [BT, 128]
    w_desc,  # TMA descriptor of w_fp8 [Dout, Din], block [BW, 128]
    xs_ptr,  # [T, G_in] float32
    ws_ptr,  # [G_out, G_in] float32
    y_ptr,  # [T, Dout] out, or [SPLIT_K, T, Dout] float32 partial sums
    T,
    N,
    K,
    k_blocks_per_split,
    stride_xs,
    stride_ws,
    stride_y,
    stride_split,
    BLOCK_T: gl.constexpr,
    BLOCK_W: gl.constexpr,
    STAGES: gl.constexpr,
    num_warps: gl.constexpr,
):
    # Weight tiles vary fastest: the programs in flight share the (small) token tiles.
    num_w = gl.cdiv(N, BLOCK_W)
    pid_t = gl.program_id(0) // num_w
    pid_w = gl.program_id(0) % num_w
    split = gl.program_id(1)
    off_t = pid_t * BLOCK_T
    off_w = pid_w * BLOCK_W
    kb_start = split * k_blocks_per_split
    n_k = gl.minimum(k_blocks_per_split, gl.cdiv(K, 128) - kb_start)

    x_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BLOCK_T, 128], x_desc.layout)
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES, BLOCK_W, 128], w_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
    fence_async_shared()  # the barriers' init before the copy engine uses them
    for s in gl.static_range(STAGES):  # every stage filled; block d + STAGES refills d's
        if s < n_k:
            _issue_load(x_desc, w_desc, x_bufs, w_bufs, ready, s, off_t, off_w, kb_start + s)

    mma_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_W, 32]
    )
    rows = off_t + gl.arange(0, BLOCK_T, layout=gl.SliceLayout(1, mma_layout))  # [BT]
    cols = off_w + gl.arange(0, BLOCK_W, layout=gl.SliceLayout(0, mma_layout))  # [BW]
    row_mask = rows < T
    ws_row = ws_ptr + (off_w // 128) * stride_ws  # the tile's one row of weight scales
    acc = gl.zeros([BLOCK_T, BLOCK_W], gl.float32, mma_layout)  # [BT, BW]

    # Block 0 of the split, then each step: issue block i, finish and scale block i - 1. The
    # loop takes two steps a turn with two named products, so that the product in flight across
    # the turn keeps its registers (a rename would make ptxas wait for it: serialized wgmma).
    prod_a = _issue_mma(x_bufs, w_bufs, ready, 0, 0, BLOCK_T, BLOCK_W, mma_layout)
    scale_a = _block_scale(xs_ptr, ws_row, rows, row_mask, stride_xs, kb_start)
    for j in range(0, (n_k - 1) // 2):
        k1 = 1 + 2 * j
        prod_b = _issue_mma(
            x_bufs, w_bufs, ready, k1 % STAGES, (k1 // STAGES) & 1, BLOCK_T, BLOCK_W, mma_layout
        )
        acc = acc + warpgroup_mma_wait(num_outstanding=1, deps=(prod_a,)) * scale_a[:, None]
        scale_b = _block_scale(xs_ptr, ws_row, rows, row_mask, stride_xs, kb_start + k1)
        _refill(x_desc, w_desc, x_bufs, w_bufs, ready, k1 - 1, n_k, off_t, off_w, kb_start, STAGES)
        k2 = k1 + 1
        prod_a = _issue_mma(
            x_bufs, w_bufs, ready, k2 % STAGES, (k2 // STAGES) & 1, BLOCK_T, BLOCK_W, mma_layout
        )
        acc = acc + warpgroup_mma_wait(num_outstanding=1, deps=(prod_b,)) * scale_b[:, None]
        scale_a = _block_scale(xs_ptr, ws_row, rows, row_mask, stride_xs, kb_start + k2)
        _refill(x_desc, w_desc, x_bufs, w_bufs, ready, k1, n_k, off_t, off_w, kb_start, STAGES)
    if (n_k - 1) % 2 == 1:  # one step left: block n_k - 1
        last = n_k - 1
        prod_b = _issue_mma(
            x_bufs, w_bufs, ready, last % STAGES, (last // STAGES) & 1, BLOCK_T, BLOCK_W, mma_layout
        )
        acc = acc + warpgroup_mma_wait(num_outstanding=1, deps=(prod_a,)) * scale_a[:, None]
        scale_b = _block_scale(xs_ptr, ws_row, rows, row_mask, stride_xs, kb_start + last)
        acc = acc + warpgroup_mma_wait(num_outstanding=0, deps=(prod_b,)) * scale_b[:, None]
    else:
        acc = acc + warpgroup_mma_wait(num_outstanding=0, deps=(prod_a,)) * scale_a[:, None]
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))

    y_ptrs = y_ptr + split * stride_split + rows[:, None].to(gl.int64) * stride_y + cols[None, :]  # [BT, BW]
    mask = row_mask[:, None] & (cols < N)[None, :]
    gl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def available() -> bool:
    """Whether this Triton's Gluon has the Hopper API the kernel uses."""
    return hasattr(gl, "NVMMADistributedLayout") and hasattr(mbarrier, "expect")


def launch(x_fp8, x_scales, w_fp8, w_scale_inv, out, cfg: dict, k_blocks_per_split: int, split: int) -> None:
    """Launch the kernel into `out` ([T, Dout], or [split, T, Dout] float32 partials) with the
    tiles of `cfg` (BLOCK_T, BLOCK_W <= 128, STAGES, num_warps)."""
    T, K = x_fp8.shape
    N = w_fp8.shape[0]
    bt, bw = cfg["BLOCK_T"], cfg["BLOCK_W"]
    x_layout = gl.NVMMASharedLayout.get_default_for([bt, BLOCK_K], gl.float8e4nv)
    w_layout = gl.NVMMASharedLayout.get_default_for([bw, BLOCK_K], gl.float8e4nv)
    x_desc = TensorDescriptor(x_fp8, list(x_fp8.shape), list(x_fp8.stride()), [bt, BLOCK_K], x_layout)
    w_desc = TensorDescriptor(w_fp8, list(w_fp8.shape), list(w_fp8.stride()), [bw, BLOCK_K], w_layout)
    grid = (triton.cdiv(T, bt) * triton.cdiv(N, bw), split)
    fp8_gemm_gluon_kernel[grid](
        x_desc,
        w_desc,
        x_scales,
        w_scale_inv,
        out,
        T,
        N,
        K,
        k_blocks_per_split,
        x_scales.stride(0),
        w_scale_inv.stride(0),
        N,
        T * N,
        BLOCK_T=bt,
        BLOCK_W=bw,
        STAGES=cfg["STAGES"],
        num_warps=cfg["num_warps"],
    )


def shapes_ok(x_fp8: torch.Tensor, w_fp8: torch.Tensor) -> bool:
    """TMA's needs: 16-byte aligned bases and row strides (Din a multiple of 16)."""
    return (
        x_fp8.data_ptr() % 16 == 0
        and w_fp8.data_ptr() % 16 == 0
        and x_fp8.shape[1] % 16 == 0
        and x_fp8.is_contiguous()
        and w_fp8.is_contiguous()
    )
