"""Fused MoE over the experts one rank owns: grouped GEMMs with SiLU·mul fused, bf16 or FP8 weights.

Shapes: the legend in docs/ARCHITECTURE.md (T, H, I: `inter` in code, as ruff refuses the name I;
E: here the rank's local experts; K, A = T*K pairs, A_pad = max_blocks * BLOCK_T aligned pair
slots, G_H / G_I scale groups); Ch chunks of the align kernels.

    out[t] = Σ_k topk_weights[t, k] · w2[e] @ (silu(w13[e, :I] @ x[t]) · (w13[e, I:] @ x[t]))
             over the k whose global expert id e_k lies in [expert_start, expert_start + E)

Ids outside that range belong to other ranks and are ignored. Steps (six launches, seven when
the GEMMs use different token blocks; no host sync, shapes fixed by T, K, E and the tiles, so a
CUDA graph can capture the whole call):

1. `moe_align` (two Triton kernels: per-chunk counts, then scatter; the torch version,
   `moe_align_ref`, took about 30 launches and 100 us of device time): pairs sorted by local
   expert, each expert's run padded to a multiple of BLOCK_T; one expert per block of BLOCK_T
   slots; unused blocks marked -1.
2. GEMM 1: one program per (block, I tile) computes the gate and the up tile from the same
   gathered x rows and writes silu(gate) · up per pair. FP8: x is quantized per 1x128 group by
   `fp8_quant` first; the I tile is 128 wide, so the epilogue quantizes it as one 1x128 group
   for GEMM 2 (no separate pass over the intermediate).
3. GEMM 2: one program per (block, H tile) writes w2[e] @ h per pair.
   Both GEMMs launch a 1-D grid ordered by `_block_and_tile` (groups of token blocks for L2
   reuse in prefill), and fold a weight tile's single 128x128 block scale into the token scales
   (`_token_scaled_dot`); GEMM 1 can compute gate and up as one dot (`default_config` says why).
4. Combine: one program per (token, H tile) sums its local pairs in k order, in fp32 with the
   routing weight applied there: deterministic, no atomics.

Decode computes both GEMMs transposed, weights @ tokens^T (SWAP_AB): the weight tile (BLOCK_W
rows) is the M dimension of the dot and the block's tokens are N. Decode blocks hold 16 or 32
tokens, too few for Hopper's wgmma as M (64 per warpgroup) but fine as N; with tokens as M
Triton fell back to mma.sync with FP8 converted to fp16 (30% of the weight bandwidth). Prefill
keeps tokens as M (`fp8_gemm.scaled_dot` says why).

FP8 decode on Hopper can run GEMMs 1 and 2 in Gluon instead (kernels/fused_moe_gluon.py, chosen
once by the backend; `default_config(..., gluon=True)`): 64-slot blocks, x rows gathered into slot
order first (`moe_gather`), tokens as the wgmma's M and weight tiles fed by TMA in a persistent
grid; align, quantization and the combine are the ones above.

Intermediates are indexed by pair id: h [A, I] and y [A, H] in the activation dtype (h in fp8
with scales [A, G_I] on the FP8 path); rows of foreign pairs are never written nor read.

FP8 weights carry 128x128 block scales over the stacked rows: w13_scale [E, ceil(2I/128), G_H]
and w2_scale [E, G_H, G_I]. With I % 128 != 0 a block of w13 rows straddles gate and up, which
separately quantized gate_proj / up_proj checkpoints cannot express; DeepSeek-V3 has I = 2048.
"""

import torch
import triton
import triton.language as tl

from . import INTERPRET
from ._validate import FLOAT_DTYPES, check_tensor
from .fp8_format import (
    AMAX_EPS,
    FP8_BLOCK,
    FP8_DTYPE,
    FP8_MAX,
    dequantize_token_groups,
    dequantize_weight_blocks,
)
from .fp8_gemm import scaled_dot
from .fp8_quant import fp8_quant, fp8_quant_ref, quantize_rows

ID_DTYPES = (torch.int32, torch.int64)
ALIGN_SUB = 256  # pairs per inner step of the align kernels
ALIGN_MAX_CHUNKS = 128  # programs of the align kernels; each reads all chunks' counts


def max_aligned_blocks(num_pairs: int, num_experts: int, block_t: int) -> int:
    """Upper bound on Σ_e ceil(pairs_e / block_t): at most num_pairs // block_t full blocks plus one
    partial block per non-empty expert."""
    return num_pairs // block_t + min(num_experts, num_pairs)


@triton.jit
def _local_bins(ids_ptr, offs, num_pairs, expert_start, num_experts):
    """Local expert of each pair id in `offs`, or num_experts for foreign pairs and offs past the end."""
    ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int64) - expert_start
    local = (offs < num_pairs) & (ids >= 0) & (ids < num_experts)
    return tl.where(local, ids, num_experts).to(tl.int32)


@triton.jit
def moe_align_count_kernel(
    ids_ptr,  # [A] global expert ids
    counts_ptr,  # [Ch, BLOCK_E] int32 out: local pairs per (chunk, expert)
    num_pairs,
    expert_start,
    num_experts,
    CHUNK: tl.constexpr,
    SUB: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    chunk = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)  # [BE]
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for sub in range(0, CHUNK, SUB):
        offs = chunk * CHUNK + sub + tl.arange(0, SUB)  # [SUB]
        bins = _local_bins(ids_ptr, offs, num_pairs, expert_start, num_experts)
        counts += tl.sum((bins[:, None] == experts[None, :]).to(tl.int32), axis=0)
    tl.store(counts_ptr + chunk * BLOCK_E + experts, counts)


@triton.jit
def moe_align_scatter_kernel(
    ids_ptr,  # [A] global expert ids
    counts_ptr,  # [Ch, BLOCK_E] int32
    sorted_pair_ids_ptr,  # [A_pad] int32 out
    block_expert_ptr,  # [A_pad / BLOCK_T] int32 out
    half_expert_ptr,  # HALVES: [num_halves] int32 out, the local expert of each half block
    half_base_ptr,  # HALVES: [num_halves] int32 out, where it starts, in half blocks
    num_pairs,
    expert_start,
    num_experts,
    num_chunks,
    num_blocks,
    blocks_per_chunk,
    num_halves,
    halves_per_chunk,
    BLOCK_T: tl.constexpr,
    CHUNK: tl.constexpr,
    SUB: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_C: tl.constexpr,
    FILL_BLOCKS: tl.constexpr,
    HALVES: tl.constexpr,
):
    chunk = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)  # [BE]
    chunks = tl.arange(0, BLOCK_C)  # [BC]
    all_counts = tl.load(
        counts_ptr + chunks[:, None] * BLOCK_E + experts[None, :], mask=chunks[:, None] < num_chunks, other=0
    )  # [BC, BE]
    is_local = experts < num_experts
    total = tl.where(is_local, tl.sum(all_counts, axis=0), 0)  # [BE]
    before = tl.sum(tl.where(chunks[:, None] < chunk, all_counts, 0), axis=0)  # [BE] in earlier chunks
    padded = (total + BLOCK_T - 1) // BLOCK_T * BLOCK_T
    padded_ends = tl.cumsum(padded, axis=0)  # [BE]
    padded_starts = padded_ends - padded

    # This chunk's pairs, in pair order within each expert.
    next_slot = padded_starts + before  # [BE]
    for sub in range(0, CHUNK, SUB):
        offs = chunk * CHUNK + sub + tl.arange(0, SUB)  # [SUB]
        bins = _local_bins(ids_ptr, offs, num_pairs, expert_start, num_experts)
        one_hot = (bins[:, None] == experts[None, :]).to(tl.int32)  # [SUB, BE]
        rank = tl.cumsum(one_hot, axis=0) - one_hot  # [SUB, BE] earlier pairs of the expert in this step
        slot = tl.sum(one_hot * (rank + next_slot[None, :]), axis=1)  # [SUB]
        tl.store(sorted_pair_ids_ptr + slot, offs.to(tl.int32), mask=bins < num_experts)
        next_slot += tl.sum(one_hot, axis=0)

    # This chunk's share of the blocks: their expert, and num_pairs in the slots no pair fills.
    real_ends = padded_starts + total  # [BE]
    first = chunk * blocks_per_chunk
    for b0 in range(first, first + blocks_per_chunk, FILL_BLOCKS):
        blocks = b0 + tl.arange(0, FILL_BLOCKS)  # [FB]
        block_mask = (blocks < first + blocks_per_chunk) & (blocks < num_blocks)
        starts = blocks * BLOCK_T  # [FB]
        expert = tl.sum((is_local[None, :] & (padded_ends[None, :] <= starts[:, None])).to(tl.int32), axis=1)
        expert = tl.where(expert < num_experts, expert, -1)  # [FB]
        real_end = tl.sum(tl.where(experts[None, :] == expert[:, None], real_ends[None, :], 0), axis=1)
        tl.store(block_expert_ptr + blocks, expert, mask=block_mask)
        slots = starts[:, None] + tl.arange(0, BLOCK_T)[None, :]  # [FB, BT]
        padding = block_mask[:, None] & (slots >= real_end[:, None])
        tl.store(sorted_pair_ids_ptr + slots, tl.zeros_like(slots) + num_pairs, mask=padding)

    if HALVES:
        # The half blocks (BLOCK_T / 2 slots) that hold pairs, each expert's in slot order: an
        # expert's run of ceil(total / half) of them starts at its first block's first half.
        HALF: tl.constexpr = BLOCK_T // 2
        half_counts = (total + HALF - 1) // HALF  # [BE]
        half_ends = tl.cumsum(half_counts, axis=0)  # [BE]
        half_starts = half_ends - half_counts
        first_h = chunk * halves_per_chunk
        for h0 in range(first_h, first_h + halves_per_chunk, FILL_BLOCKS):
            halves = h0 + tl.arange(0, FILL_BLOCKS)  # [FB]
            half_mask = (halves < first_h + halves_per_chunk) & (halves < num_halves)
            expert = tl.sum(
                (is_local[None, :] & (half_ends[None, :] <= halves[:, None])).to(tl.int32), axis=1
            )
            found = expert < num_experts
            mine = experts[None, :] == expert[:, None]  # [FB, BE]
            base = tl.sum(tl.where(mine, padded_starts[None, :] // HALF - half_starts[None, :], 0), axis=1)
            tl.store(half_expert_ptr + halves, tl.where(found, expert, -1), mask=half_mask)
            tl.store(half_base_ptr + halves, tl.where(found, base + halves, 0), mask=half_mask)


def moe_align(
    topk_ids: torch.Tensor, num_experts: int, expert_start: int, block_t: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group token-expert pairs by local expert, each expert's run padded to a multiple of block_t.

    topk_ids: [T, K] global expert ids, contiguous. Returns (sorted_pair_ids [A_pad] int32,
    block_expert [A_pad / block_t] int32) with A_pad = max_aligned_blocks(T*K, E, block_t) * block_t.
    sorted_pair_ids holds pair ids t*K + k grouped by expert (in pair order within an expert)
    and T*K in padding slots; block_expert holds the local expert of each block, or -1 for
    blocks past the last expert's run. Experts with no pairs get no blocks. Two launches, no
    host sync: the sizes depend only on the shapes.
    """
    sorted_pair_ids, block_expert, _ = _moe_align(topk_ids, num_experts, expert_start, block_t, False)
    return sorted_pair_ids, block_expert


def moe_align_halves(
    topk_ids: torch.Tensor, num_experts: int, expert_start: int, block_t: int
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """`moe_align`, and the half blocks (block_t / 2 slots) of its blocks that hold pairs, in slot
    order: (half_expert [num_halves] int32, the local expert of each, -1 past the last one;
    half_base [num_halves] int32, where each starts, in half blocks), num_halves =
    max_aligned_blocks(T*K, E, block_t / 2). A GEMM on half blocks streams no weights for a block's
    half that holds only padding. Same two launches."""
    sorted_pair_ids, block_expert, halves = _moe_align(topk_ids, num_experts, expert_start, block_t, True)
    assert halves is not None
    return sorted_pair_ids, block_expert, halves


def _moe_align(
    topk_ids: torch.Tensor, num_experts: int, expert_start: int, block_t: int, with_halves: bool
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    device = topk_ids.device
    num_pairs = topk_ids.numel()
    num_blocks = max_aligned_blocks(num_pairs, num_experts, block_t)
    sorted_pair_ids = torch.empty(num_blocks * block_t, dtype=torch.int32, device=device)  # [A_pad]
    block_expert = torch.empty(num_blocks, dtype=torch.int32, device=device)  # [A_pad / BT]
    num_halves = max_aligned_blocks(num_pairs, num_experts, block_t // 2) if with_halves else 0
    half_expert = torch.empty(num_halves, dtype=torch.int32, device=device)  # [NH]
    half_base = torch.empty(num_halves, dtype=torch.int32, device=device)  # [NH]
    halves = (half_expert, half_base) if with_halves else None
    if num_pairs == 0:
        return sorted_pair_ids, block_expert, halves
    chunk = max(ALIGN_SUB, triton.next_power_of_2(triton.cdiv(num_pairs, ALIGN_MAX_CHUNKS)))
    num_chunks = triton.cdiv(num_pairs, chunk)
    block_e = triton.next_power_of_2(num_experts)
    counts = torch.empty(num_chunks, block_e, dtype=torch.int32, device=device)  # [Ch, BE]
    common = dict(CHUNK=chunk, SUB=ALIGN_SUB, BLOCK_E=block_e, num_warps=4)
    moe_align_count_kernel[(num_chunks,)](topk_ids, counts, num_pairs, expert_start, num_experts, **common)
    moe_align_scatter_kernel[(num_chunks,)](
        topk_ids,
        counts,
        sorted_pair_ids,
        block_expert,
        half_expert,
        half_base,
        num_pairs,
        expert_start,
        num_experts,
        num_chunks,
        num_blocks,
        triton.cdiv(num_blocks, num_chunks),
        num_halves,
        triton.cdiv(num_halves, num_chunks),
        BLOCK_T=block_t,
        BLOCK_C=triton.next_power_of_2(num_chunks),
        FILL_BLOCKS=max(1, min(16, 2048 // block_t)),
        HALVES=with_halves,
        **common,
    )
    return sorted_pair_ids, block_expert, halves


def moe_align_ref(
    topk_ids: torch.Tensor, num_experts: int, expert_start: int, block_t: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `moe_align` (same outputs; about 30 small launches)."""
    device = topk_ids.device
    bins = topk_ids.reshape(-1).to(torch.int64) - expert_start  # [A]
    num_pairs = bins.numel()
    bins = torch.where((bins >= 0) & (bins < num_experts), bins, num_experts)  # foreign pairs -> bin E
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, bins, torch.ones_like(bins))  # [E + 1]
    order = torch.argsort(bins, stable=True)  # [A] pair ids by expert
    sorted_bins = bins[order]  # [A]
    rank_in_expert = torch.arange(num_pairs, device=device) - (torch.cumsum(counts, 0) - counts)[sorted_bins]
    padded_ends = torch.cumsum((counts[:num_experts] + block_t - 1) // block_t * block_t, 0)  # [E]
    padded_starts = torch.cat([padded_ends.new_zeros(1), padded_ends[:-1]])  # [E]

    num_blocks = max_aligned_blocks(num_pairs, num_experts, block_t)
    capacity = num_blocks * block_t
    local_bin = sorted_bins.clamp(max=num_experts - 1)
    # Foreign pairs (sorted last) go to one spare slot past the end, dropped below.
    dest = torch.where(sorted_bins < num_experts, padded_starts[local_bin] + rank_in_expert, capacity)  # [A]
    sorted_pair_ids = torch.full((capacity + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids.scatter_(0, dest, order.to(torch.int32))

    block_starts = torch.arange(num_blocks, device=device) * block_t
    block_expert = torch.searchsorted(padded_ends, block_starts, right=True)  # [A_pad / block_t]
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_pair_ids[:capacity], block_expert


@triton.jit
def moe_gather_kernel(
    x_ptr,  # [T, H] bytes (fp8 viewed as uint8)
    xs_ptr,  # [T, G_H] float32
    xg_ptr,  # [A_pad, H] bytes out, slot order
    xgs_ptr,  # [A_pad, G_H] float32 out
    sorted_pair_ids_ptr,  # [A_pad] int32
    block_expert_ptr,  # [A_pad / BLOCK_T] int32
    num_pairs,
    top_k,
    H,
    G_H,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    block = tl.program_id(0)
    chunk = tl.program_id(1)
    if tl.load(block_expert_ptr + block) < 0:
        return
    slots = block * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    pair = tl.load(sorted_pair_ids_ptr + slots)
    valid = pair < num_pairs
    token = tl.where(valid, pair // top_k, 0).to(tl.int64)  # [BT]
    offs_h = chunk * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    h_mask = offs_h < H
    rows = tl.load(
        x_ptr + token[:, None] * H + offs_h[None, :], mask=valid[:, None] & h_mask[None, :], other=0
    )  # [BT, BH]
    tl.store(xg_ptr + slots[:, None].to(tl.int64) * H + offs_h[None, :], rows, mask=h_mask[None, :])
    if chunk == 0:
        offs_g = tl.arange(0, BLOCK_G)  # [BG]
        g_mask = offs_g < G_H
        scales = tl.load(
            xs_ptr + token[:, None] * G_H + offs_g[None, :], mask=valid[:, None] & g_mask[None, :], other=0.0
        )
        tl.store(xgs_ptr + slots[:, None].to(tl.int64) * G_H + offs_g[None, :], scales, mask=g_mask[None, :])


def moe_gather(
    x_fp8, x_scales, sorted_pair_ids, block_expert, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """x rows and scales in slot order for the blocks `moe_align` made: (xg [A_pad, H] fp8,
    xgs [A_pad, G_H] float32), zeros in the padding slots of real blocks; rows of blocks past the
    last expert's run are not written."""
    T, H = x_fp8.shape
    g_h = x_scales.shape[1]
    num_blocks = block_expert.numel()
    slots = sorted_pair_ids.numel()
    block_t = slots // max(num_blocks, 1)
    xg = torch.empty(slots, H, dtype=x_fp8.dtype, device=x_fp8.device)  # [A_pad, H]
    xgs = torch.empty(slots, g_h, dtype=torch.float32, device=x_fp8.device)  # [A_pad, G_H]
    if num_blocks == 0:
        return xg, xgs
    # 64 KB of rows a program (64-slot blocks: 1024 bytes of each row; 128-slot blocks: 512):
    # 128-slot blocks with 1024-byte chunks spilled and ran at about 0.8 TB/s (docs/PERF.md).
    block_h = max(128, 65536 // block_t)
    moe_gather_kernel[(num_blocks, triton.cdiv(H, block_h))](
        x_fp8.view(torch.uint8),
        x_scales,
        xg.view(torch.uint8),
        xgs,
        sorted_pair_ids,
        block_expert,
        T * top_k,
        top_k,
        H,
        g_h,
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        BLOCK_G=triton.next_power_of_2(g_h),
        num_warps=4,
    )
    return xg, xgs


def moe_gather_ref(
    x_fp8, x_scales, sorted_pair_ids, block_expert, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `moe_gather`, with zeros also in the rows of blocks past the last run."""
    T = x_fp8.shape[0]
    num_pairs = T * top_k
    pair = sorted_pair_ids.to(torch.int64)
    valid = pair < num_pairs
    block_t = sorted_pair_ids.numel() // max(block_expert.numel(), 1)
    valid &= (block_expert >= 0).repeat_interleave(block_t)
    token = torch.where(valid, pair // top_k, 0)
    xg = torch.where(valid[:, None], x_fp8.view(torch.uint8)[token], 0).view(x_fp8.dtype)
    xgs = torch.where(valid[:, None], x_scales[token], 0.0)
    return xg, xgs


@triton.jit
def _token_scaled_dot(acc, w, x, w_scale, x_scale, SWAP_AB: tl.constexpr):
    """`scaled_dot` for a weight tile inside one 128x128 scale block: w_scale is a scalar, folded
    into the token scales, so the partial product takes one FMA an element and no column scales."""
    if SWAP_AB:
        acc += tl.dot(w, x) * (x_scale * w_scale)[None, :]
    else:
        acc += tl.dot(tl.trans(x), tl.trans(w)) * (x_scale * w_scale)[:, None]
    return acc


@triton.jit
def _gate_up_scaled_dot(acc, w, x, gate_scale, up_scale, x_scale, SWAP_AB: tl.constexpr):
    """`_token_scaled_dot` for a merged [2BW, BK] tile of gate rows then up rows, each half inside
    one 128x128 scale block (scalars gate_scale, up_scale)."""
    half: tl.constexpr = w.shape[0] // 2
    is_gate = tl.arange(0, 2 * half) < half  # [2BW]
    if SWAP_AB:
        scale = tl.where(is_gate[:, None], (x_scale * gate_scale)[None, :], (x_scale * up_scale)[None, :])
        acc += tl.dot(w, x) * scale
    else:
        scale = tl.where(is_gate[None, :], (x_scale * gate_scale)[:, None], (x_scale * up_scale)[:, None])
        acc += tl.dot(tl.trans(x), tl.trans(w)) * scale
    return acc


@triton.jit
def _block_and_tile(num_blocks, num_tiles, group_t):
    """(token block, weight tile) of this program in a 1-D grid of num_blocks * num_tiles.

    Groups of group_t token blocks take every weight tile in turn, token block fastest: the
    programs running at once share a few blocks' gathered rows and a few weight tiles in L2.
    group_t = num_blocks is the plain (block, tile) grid, every block of one tile before the
    next tile: each tile's weights are read once, but every block's rows once per tile.
    """
    pid = tl.program_id(0)
    per_group = group_t * num_tiles
    first = (pid // per_group) * group_t
    rows = tl.minimum(num_blocks - first, group_t)
    return first + (pid % per_group) % rows, (pid % per_group) // rows


@triton.jit
def fused_moe_gemm1_kernel(
    x_ptr,  # [T, H] activations (fp8 on the FP8 path)
    xs_ptr,  # [T, G_H] float32 (FP8 only)
    w_ptr,  # [E, 2I, H] gate rows then up rows
    ws_ptr,  # [E, ceil(2I/128), G_H] float32 (FP8 only)
    h_ptr,  # [A, I] out: silu(gate) * up (fp8 on the FP8 path; float32 there when interpreting)
    hs_ptr,  # [A, G_I] out: float32 scales of h (FP8 only)
    sorted_pair_ids_ptr,  # [A_pad] int32
    block_expert_ptr,  # [A_pad / BLOCK_T] int32
    num_blocks,
    group_t,
    num_pairs,
    top_k,
    H,
    inter,
    stride_x,
    stride_xs,
    stride_we,
    stride_wn,
    stride_wse,
    stride_wsn,
    stride_h,
    stride_hs,
    BLOCK_T: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCALE_BLOCK_N: tl.constexpr,
    SWAP_AB: tl.constexpr,
    MERGE_GU: tl.constexpr,
    SCALAR_WS: tl.constexpr,
    EVEN_K: tl.constexpr,
    FP8: tl.constexpr,
    DOT_FP32: tl.constexpr,
    FP8_MAX: tl.constexpr,
    AMAX_EPS: tl.constexpr,
):
    pid_t, pid_w = _block_and_tile(num_blocks, tl.cdiv(inter, BLOCK_W), group_t)
    expert = tl.load(block_expert_ptr + pid_t).to(tl.int64)
    if expert < 0:
        return
    pair = tl.load(sorted_pair_ids_ptr + pid_t * BLOCK_T + tl.arange(0, BLOCK_T))  # [BT]
    pair_mask = pair < num_pairs
    token = (pair // top_k).to(tl.int64)  # [BT]
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)  # [BW] gate rows (the up rows are I further)
    w_mask = offs_w < inter
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + token[None, :] * stride_x + offs_k[:, None]  # [BK, BT]
    if FP8:
        xs_ptrs = xs_ptr + token * stride_xs  # [BT]
    if MERGE_GU:
        # One [2BW, BK] weight tile, the gate rows then the up rows, and one dot a K step.
        offs_r = tl.arange(0, 2 * BLOCK_W)  # [2BW]
        rows = pid_w * BLOCK_W + offs_r % BLOCK_W + tl.where(offs_r < BLOCK_W, 0, inter)  # [2BW] rows of w13
        r_mask = offs_r % BLOCK_W < inter - pid_w * BLOCK_W
        w_ptrs = w_ptr + expert * stride_we + rows[:, None] * stride_wn + offs_k[None, :]  # [2BW, BK]
        if FP8:
            ws_ptrs = ws_ptr + expert * stride_wse + (rows // SCALE_BLOCK_N) * stride_wsn  # [2BW]
            wgs_ptr = ws_ptr + expert * stride_wse + (pid_w * BLOCK_W // SCALE_BLOCK_N) * stride_wsn
            wus_ptr = ws_ptr + expert * stride_wse + ((pid_w * BLOCK_W + inter) // SCALE_BLOCK_N) * stride_wsn
        acc = tl.zeros((2 * BLOCK_W, BLOCK_T) if SWAP_AB else (BLOCK_T, 2 * BLOCK_W), dtype=tl.float32)
        for kb in range(0, tl.cdiv(H, BLOCK_K)):
            k_mask = (offs_k < H - kb * BLOCK_K) | EVEN_K
            a = tl.load(x_ptrs, mask=k_mask[:, None] & pair_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            if FP8:
                a_s = tl.load(xs_ptrs + kb, mask=pair_mask, other=0.0)
                if SCALAR_WS:
                    g_s = tl.load(wgs_ptr + kb)
                    u_s = tl.load(wus_ptr + kb)
                    acc = _gate_up_scaled_dot(acc, w, a, g_s, u_s, a_s, SWAP_AB)
                else:
                    w_s = tl.load(ws_ptrs + kb, mask=r_mask, other=0.0)
                    acc = scaled_dot(acc, w, a, w_s, a_s, SWAP_AB)
            elif SWAP_AB:
                acc = tl.dot(w, a, acc)
            else:
                acc = tl.dot(tl.trans(a), tl.trans(w), acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        if SWAP_AB:
            acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc, (2, BLOCK_W, BLOCK_T)), (1, 2, 0)))  # [BW, BT]
        else:
            acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc, (BLOCK_T, 2, BLOCK_W)), (0, 2, 1)))  # [BT, BW]
    else:
        wg_ptrs = w_ptr + expert * stride_we + offs_w[:, None] * stride_wn + offs_k[None, :]  # [BW, BK]
        wu_ptrs = wg_ptrs + inter * stride_wn
        if FP8:
            wgs_ptrs = ws_ptr + expert * stride_wse + (offs_w // SCALE_BLOCK_N) * stride_wsn  # [BW]
            wus_ptrs = ws_ptr + expert * stride_wse + ((offs_w + inter) // SCALE_BLOCK_N) * stride_wsn  # [BW]
        acc_g = tl.zeros((BLOCK_W, BLOCK_T) if SWAP_AB else (BLOCK_T, BLOCK_W), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_W, BLOCK_T) if SWAP_AB else (BLOCK_T, BLOCK_W), dtype=tl.float32)
        for kb in range(0, tl.cdiv(H, BLOCK_K)):
            k_mask = (offs_k < H - kb * BLOCK_K) | EVEN_K
            a = tl.load(x_ptrs, mask=k_mask[:, None] & pair_mask[None, :], other=0.0)
            wg = tl.load(wg_ptrs, mask=w_mask[:, None] & k_mask[None, :], other=0.0)
            wu = tl.load(wu_ptrs, mask=w_mask[:, None] & k_mask[None, :], other=0.0)
            if DOT_FP32:
                a = a.to(tl.float32)
                wg = wg.to(tl.float32)
                wu = wu.to(tl.float32)
            if FP8:
                a_s = tl.load(xs_ptrs + kb, mask=pair_mask, other=0.0)
                if SCALAR_WS:
                    g_s = tl.load(
                        ws_ptr + expert * stride_wse + (pid_w * BLOCK_W // SCALE_BLOCK_N) * stride_wsn + kb
                    )
                    u_s = tl.load(
                        ws_ptr
                        + expert * stride_wse
                        + ((pid_w * BLOCK_W + inter) // SCALE_BLOCK_N) * stride_wsn
                        + kb
                    )
                    acc_g = _token_scaled_dot(acc_g, wg, a, g_s, a_s, SWAP_AB)
                    acc_u = _token_scaled_dot(acc_u, wu, a, u_s, a_s, SWAP_AB)
                else:
                    g_s = tl.load(wgs_ptrs + kb, mask=w_mask, other=0.0)
                    u_s = tl.load(wus_ptrs + kb, mask=w_mask, other=0.0)
                    acc_g = scaled_dot(acc_g, wg, a, g_s, a_s, SWAP_AB)
                    acc_u = scaled_dot(acc_u, wu, a, u_s, a_s, SWAP_AB)
            elif SWAP_AB:
                acc_g = tl.dot(wg, a, acc_g)
                acc_u = tl.dot(wu, a, acc_u)
            else:
                acc_g = tl.dot(tl.trans(a), tl.trans(wg), acc_g)
                acc_u = tl.dot(tl.trans(a), tl.trans(wu), acc_u)
            x_ptrs += BLOCK_K
            wg_ptrs += BLOCK_K
            wu_ptrs += BLOCK_K

    h = acc_g * tl.sigmoid(acc_g) * acc_u  # zero in masked rows of w
    if SWAP_AB:
        h = tl.trans(h)  # [BT, BW]
    h_ptrs = h_ptr + pair[:, None].to(tl.int64) * stride_h + offs_w[None, :]
    out_mask = pair_mask[:, None] & w_mask[None, :]
    if FP8:
        # BLOCK_W == 128: this tile is exactly quantization group pid_w of each row of h.
        q, scale = quantize_rows(h, FP8_MAX, AMAX_EPS)
        tl.store(h_ptrs, q.to(h_ptr.dtype.element_ty), mask=out_mask)
        tl.store(hs_ptr + pair.to(tl.int64) * stride_hs + pid_w, scale, mask=pair_mask)
    else:
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def fused_moe_gemm2_kernel(
    h_ptr,  # [A, I] (fp8 on the FP8 path)
    hs_ptr,  # [A, G_I] float32 (FP8 only)
    w_ptr,  # [E, H, I]
    ws_ptr,  # [E, G_H, G_I] float32 (FP8 only)
    y_ptr,  # [A, H] out, activation dtype
    sorted_pair_ids_ptr,  # [A_pad] int32
    block_expert_ptr,  # [A_pad / BLOCK_T] int32
    num_blocks,
    group_t,
    num_pairs,
    H,
    inter,
    stride_h,
    stride_hs,
    stride_we,
    stride_wn,
    stride_wse,
    stride_wsn,
    stride_y,
    BLOCK_T: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCALE_BLOCK_N: tl.constexpr,
    SWAP_AB: tl.constexpr,
    SCALAR_WS: tl.constexpr,
    EVEN_K: tl.constexpr,
    FP8: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_t, pid_w = _block_and_tile(num_blocks, tl.cdiv(H, BLOCK_W), group_t)
    expert = tl.load(block_expert_ptr + pid_t).to(tl.int64)
    if expert < 0:
        return
    pair = tl.load(sorted_pair_ids_ptr + pid_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)  # [BT]
    pair_mask = pair < num_pairs
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)  # [BW] rows of w2 (columns of H)
    w_mask = offs_w < H
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = h_ptr + pair[None, :] * stride_h + offs_k[:, None]  # [BK, BT]
    b_ptrs = w_ptr + expert * stride_we + offs_w[:, None] * stride_wn + offs_k[None, :]  # [BW, BK]
    if FP8:
        as_ptrs = hs_ptr + pair * stride_hs  # [BT]
        bs_ptrs = ws_ptr + expert * stride_wse + (offs_w // SCALE_BLOCK_N) * stride_wsn  # [BW]

    acc = tl.zeros((BLOCK_W, BLOCK_T) if SWAP_AB else (BLOCK_T, BLOCK_W), dtype=tl.float32)
    for kb in range(0, tl.cdiv(inter, BLOCK_K)):
        k_mask = (offs_k < inter - kb * BLOCK_K) | EVEN_K
        a = tl.load(a_ptrs, mask=k_mask[:, None] & pair_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=w_mask[:, None] & k_mask[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if FP8:
            a_s = tl.load(as_ptrs + kb, mask=pair_mask, other=0.0)
            if SCALAR_WS:
                b_s = tl.load(
                    ws_ptr + expert * stride_wse + (pid_w * BLOCK_W // SCALE_BLOCK_N) * stride_wsn + kb
                )
                acc = _token_scaled_dot(acc, b, a, b_s, a_s, SWAP_AB)
            else:
                b_s = tl.load(bs_ptrs + kb, mask=w_mask, other=0.0)
                acc = scaled_dot(acc, b, a, b_s, a_s, SWAP_AB)
        elif SWAP_AB:
            acc = tl.dot(b, a, acc)
        else:
            acc = tl.dot(tl.trans(a), tl.trans(b), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    if SWAP_AB:
        y_ptrs = y_ptr + pair[None, :] * stride_y + offs_w[:, None]  # [BW, BT]
        mask = w_mask[:, None] & pair_mask[None, :]
    else:
        y_ptrs = y_ptr + pair[:, None] * stride_y + offs_w[None, :]  # [BT, BW]
        mask = pair_mask[:, None] & w_mask[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def moe_combine_kernel(
    y_ptr,  # [A, H] per-pair expert outputs
    ids_ptr,  # [T, K] global expert ids
    weights_ptr,  # [T, K] float32
    out_ptr,  # [T, H]
    H,
    expert_start,
    num_experts,
    stride_y,
    stride_out,
    TOP_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BH]
    h_mask = offs_h < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        # A [BLOCK_H] vector, not a scalar: the interpreter rejects a scalar bool inside a load mask.
        local = tl.zeros((BLOCK_H,), dtype=tl.int64) + (tl.load(ids_ptr + t * TOP_K + k) - expert_start)
        is_local = (local >= 0) & (local < num_experts)  # [BH]
        weight = tl.load(weights_ptr + t * TOP_K + k)
        y = tl.load(y_ptr + (t * TOP_K + k) * stride_y + offs_h, mask=h_mask & is_local, other=0.0)
        acc += tl.where(is_local, weight, 0.0) * y.to(tl.float32)
    tl.store(out_ptr + t * stride_out + offs_h, acc.to(out_ptr.dtype.element_ty), mask=h_mask)


# Gluon decode above this T*K/E (256 sequences a rank of 8: 247; 128: 121, where the two tie; 32:
# 32, where Triton's 16-token blocks are 7% faster), H200, docs/PERF.md.
GLUON_MIN_PAIRS_PER_EXPERT = 160
GLUON_DECODE = dict(
    VARIANT="gluon",
    gemm1=dict(BLOCK_T=64, STAGES=4, CTAS_PER_SM=1, num_warps=8),
    gemm2=dict(BLOCK_T=64, STAGES=4, CTAS_PER_SM=2, num_warps=4),
)
# GEMM 1 of the same on 128-slot blocks (two warpgroups along the tokens, 8 warps, one program an
# SM): at 256 sequences a rank about one block an expert, so each weight tile is streamed once.
# GEMM 2 takes the 64-slot halves of those blocks that hold pairs (`moe_align_halves`): on 128-slot
# blocks its tensor work per weight byte doubles and it runs slower (docs/PERF.md).
GLUON_DECODE_WIDE = dict(
    VARIANT="gluon",
    gemm1=dict(BLOCK_T=128, STAGES=4, CTAS_PER_SM=1, num_warps=8),
    gemm2=dict(BLOCK_T=64, STAGES=4, CTAS_PER_SM=2, num_warps=4),
)
# Above 512 pairs an expert (prefill), the Gluon prefill GEMMs (kernels/fused_moe_gluon_prefill.py).
GLUON_PREFILL = dict(
    VARIANT="gluon_prefill",
    gemm1=dict(BLOCK_T=128, STAGES=4, GROUP_T=16, num_warps=8),
    gemm2=dict(BLOCK_T=128, STAGES=4, GROUP_T=16, num_warps=8),
)


def default_config(num_pairs: int, num_experts: int, fp8: bool, gluon: bool = False) -> dict:
    """Fixed tiles per GEMM from the shapes (H100, docs/PERF.md; bench/sweep_moe.py times the
    alternatives).

    gluon (Hopper, chosen by the backend at start-up): FP8 decode with more than
    GLUON_MIN_PAIRS_PER_EXPERT pairs an expert runs the Gluon GEMMs (kernels/fused_moe_gluon.py:
    tokens as the wgmma's M, weight tiles through a TMA ring in a persistent grid) with
    `GLUON_DECODE_WIDE`'s tiles (GEMM 1 on 128-slot blocks, GEMM 2 on their 64-slot halves;
    `GLUON_DECODE`, 64-slot blocks for both, was about 10% slower at 256 seqs, docs/PERF.md);
    more than 512 (prefill) the Gluon prefill GEMMs (kernels/fused_moe_gluon_prefill.py: 128-slot
    blocks, each K step's wgmma overlapped with the previous step's scaling) with `GLUON_PREFILL`'s;
    smaller decode batches keep the Triton tiles.

    BLOCK_T follows T*K/E, the mean pairs per expert if every pair were local (an upper bound;
    with expert parallelism about a quarter are). Decode streams each expert's weights once per
    block of its tokens, so blocks are small (16 or 32) and the weight tile is the dot's M
    (SWAP_AB); 64-token blocks as N spill with 4 warps. Prefill is compute bound: 64-token
    blocks as M, 8 warps. FP8 needs BLOCK_K = 128 (one scale per step) and GEMM 1's BLOCK_W =
    128 (its epilogue quantizes one 1x128 group of h). Those tiles, stages and warps were
    measured (the tile sweeps in PERF.md).

    Three newer switches, chosen from the compiled code and then timed by bench/sweep_moe.py on an
    H100 (docs/PERF.md): prefill 25.6 ms → 19.5 ms with all three, decode at 256 seqs/rank
    708 → 682 µs, 32 and 128 unchanged:
    - MERGE_GU (GEMM 1): the gate and the up tile as one [2 BLOCK_W, BLOCK_K] weight tile and one
      dot a K step, so one wgmma wait a step instead of two (each waits before the scale FMA).
    - SCALAR_WS: a 128-row weight tile lies inside one 128x128 scale block, so its scale is a
      scalar folded into the token scales: one FMA an element instead of two multiplies and an
      add, and no column-scale loads. The prefill loop of GEMM 1 drops from 328 to 192
      instructions a K step (sm_90 SASS); GEMM 2 uses 115 registers, so two 8-warp programs
      fit an SM. Applied only where valid (the wrappers check).
    - GROUP_T: groups of GROUP_T token blocks take every weight tile before the next group
      (`_block_and_tile`); 0 is the plain grid, each weight tile across all blocks. Prefill
      with the plain grid reads every block's gathered rows from HBM once per weight tile
      (about 15 GB for each GEMM at 16k tokens a rank); grouped, about once. Decode keeps 0: a
      few blocks per expert share each weight tile at the same time.
    """
    per_expert = num_pairs / num_experts
    if gluon and fp8 and per_expert > GLUON_MIN_PAIRS_PER_EXPERT:
        chosen = GLUON_DECODE_WIDE if per_expert <= 512 else GLUON_PREFILL
        return {k: dict(v) if isinstance(v, dict) else v for k, v in chosen.items()}
    block_k = 128 if fp8 else 64
    common = dict(BLOCK_W=128, BLOCK_K=block_k, SCALAR_WS=fp8)
    if per_expert <= 512:
        block_t = 16 if per_expert <= 32 else 32
        decode = dict(common, BLOCK_T=block_t, SWAP_AB=True, GROUP_T=0, num_warps=4, num_stages=3)
        gemm1, gemm2 = dict(decode, MERGE_GU=True), dict(decode)
        if per_expert > 128:
            # About 60 local pairs per expert: GEMM 2 reads each expert's w2 once with 64-token blocks.
            gemm2 = dict(common, BLOCK_T=64, SWAP_AB=False, GROUP_T=0, num_warps=8, num_stages=4)
    else:
        prefill = dict(common, BLOCK_T=64, SWAP_AB=False, GROUP_T=16, num_warps=8, num_stages=4)
        # GEMM 2 with 128-token blocks: 6.04 ms against 6.66 ms with 64 (H100, 16k tokens a rank).
        gemm1, gemm2 = dict(prefill, MERGE_GU=True), dict(prefill, BLOCK_T=128)
    return dict(gemm1=gemm1, gemm2=gemm2)


def _check_fused_moe_args(x, topk_ids, topk_weights, w13, w2, expert_start, w13_scale, w2_scale) -> bool:
    """Validate fused_moe's arguments; returns whether the weights are FP8."""
    op = "fused_moe"
    check_tensor(op, "x", x, ndim=2, dims="[T, H]", dtypes=FLOAT_DTYPES)
    device = x.device
    T, H = x.shape
    check_tensor(op, "topk_ids", topk_ids, ndim=2, dims="[T, K]", dtypes=ID_DTYPES, device=device)
    K = topk_ids.shape[1]
    if topk_ids.shape[0] != T or K == 0:
        raise ValueError(
            f"{op}: topk_ids has shape {tuple(topk_ids.shape)}, expected [T, K] with T = {T}, K >= 1"
        )
    check_tensor(
        op, "topk_weights", topk_weights, shape=(T, K), dims="[T, K]", dtypes=(torch.float32,), device=device
    )
    check_tensor(op, "w13", w13, ndim=3, dims="[E, 2I, H]", dtypes=(x.dtype, FP8_DTYPE), device=device)
    fp8 = w13.dtype == FP8_DTYPE
    E, two_i, w13_h = w13.shape
    if w13_h != H or two_i % 2 != 0 or E == 0:
        raise ValueError(
            f"{op}: w13 has shape {tuple(w13.shape)}, expected [E, 2I, H] with E >= 1, an even 2I and H = {H}"
        )
    inter = two_i // 2
    check_tensor(op, "w2", w2, shape=(E, H, inter), dims="[E, H, I]", dtypes=(w13.dtype,), device=device)
    if not isinstance(expert_start, int) or expert_start < 0:
        raise ValueError(f"{op}: expert_start is {expert_start!r}, expected an int >= 0")
    gh, gi = triton.cdiv(H, FP8_BLOCK), triton.cdiv(inter, FP8_BLOCK)
    if fp8:
        check_tensor(
            op,
            "w13_scale",
            w13_scale,
            shape=(E, triton.cdiv(two_i, FP8_BLOCK), gh),
            dims="[E, ceil(2I/128), ceil(H/128)]",
            dtypes=(torch.float32,),
            device=device,
        )
        check_tensor(
            op,
            "w2_scale",
            w2_scale,
            shape=(E, gh, gi),
            dims="[E, ceil(H/128), ceil(I/128)]",
            dtypes=(torch.float32,),
            device=device,
        )
    elif w13_scale is not None or w2_scale is not None:
        raise ValueError(f"{op}: w13_scale / w2_scale are only for float8_e4m3fn weights; w13 is {w13.dtype}")
    return fp8


def fused_moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    expert_start: int = 0,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    gluon: bool = False,
) -> torch.Tensor:
    """Routed-expert MLP of the experts [expert_start, expert_start + E) for tokens x; returns [T, H].

    x: [T, H] bf16/fp16/fp32. topk_ids: [T, K] int32/int64 global expert ids (others are
    ignored). topk_weights: [T, K] float32. w13: [E, 2I, H] (gate rows, then up rows) and w2:
    [E, H, I], both in x's dtype, or both float8_e4m3fn with w13_scale [E, ceil(2I/128),
    ceil(H/128)] and w2_scale [E, ceil(H/128), ceil(I/128)] float32 (`weight_scale_inv`
    convention). All contiguous, on one device. Output in x's dtype; a token with no local
    expert gets zeros. T = 0 returns an empty [0, H] without launching. gluon: the Gluon decode
    GEMMs (Hopper) for FP8 decode shapes with H and I multiples of 128, where the caller has
    checked that they are available (`gluon_available`); elsewhere the Triton kernels.
    """
    fp8 = _check_fused_moe_args(x, topk_ids, topk_weights, w13, w2, expert_start, w13_scale, w2_scale)
    H, inter = w13.shape[2], w13.shape[1] // 2
    gluon = gluon and H % FP8_BLOCK == 0 and inter % FP8_BLOCK == 0
    cfg = default_config(topk_ids.numel(), w13.shape[0], fp8, gluon)
    return fused_moe_with_config(x, topk_ids, topk_weights, w13, w2, expert_start, w13_scale, w2_scale, cfg)


def fused_moe_with_config(
    x, topk_ids, topk_weights, w13, w2, expert_start, w13_scale, w2_scale, cfg
) -> torch.Tensor:
    """`fused_moe` on checked arguments with the tiles `cfg` (as `default_config` returns: one dict of
    tiles per GEMM)."""
    T, H = x.shape
    E = w13.shape[0]
    K = topk_ids.shape[1]
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)  # [T, H]
    if T == 0:
        return out
    if cfg.get("VARIANT") in ("gluon", "gluon_prefill"):
        y = _gluon_gemms(x, topk_ids, w13, w2, expert_start, w13_scale, w2_scale, cfg)  # [A, H]
    else:
        # Each GEMM's token blocks; aligned once when both use the same BLOCK_T.
        block_t1, block_t2 = cfg["gemm1"]["BLOCK_T"], cfg["gemm2"]["BLOCK_T"]
        blocks1 = moe_align(topk_ids, E, expert_start, block_t1)  # ([A_pad], [A_pad / BT])
        blocks2 = blocks1 if block_t2 == block_t1 else moe_align(topk_ids, E, expert_start, block_t2)
        if w13.dtype == FP8_DTYPE:
            x_in, x_scales = fp8_quant(x)  # [T, H] fp8, [T, G_H]
        else:
            x_in, x_scales = x, None
        h, h_scales = moe_gemm1(x_in, x_scales, w13, w13_scale, *blocks1, K, cfg["gemm1"])
        y = moe_gemm2(h, h_scales, w2, w2_scale, *blocks2, x.dtype, cfg["gemm2"])  # [A, H]
    block_h = min(1024, triton.next_power_of_2(H))
    moe_combine_kernel[(T, triton.cdiv(H, block_h))](
        y,
        topk_ids,
        topk_weights,
        out,
        H,
        expert_start,
        E,
        y.stride(0),
        out.stride(0),
        TOP_K=K,
        BLOCK_H=block_h,
        num_warps=4,
    )
    return out


def _gluon_gemms(x, topk_ids, w13, w2, expert_start, w13_scale, w2_scale, cfg) -> torch.Tensor:
    """y [A, H] per local pair through the Gluon GEMMs of cfg["VARIANT"] (kernels/fused_moe_gluon.py
    for "gluon", kernels/fused_moe_gluon_prefill.py for "gluon_prefill"): x quantized, its rows
    gathered into slot order, GEMM 1 into h in slot order, GEMM 2 scattered back to pair order."""
    from . import fused_moe_gluon, fused_moe_gluon_prefill

    gemms = fused_moe_gluon if cfg["VARIANT"] == "gluon" else fused_moe_gluon_prefill

    K = topk_ids.shape[1]
    sorted_pair_ids, block_expert, halves = gluon_blocks(topk_ids, w13.shape[0], expert_start, cfg)
    x_fp8, x_scales = fp8_quant(x)  # [T, H], [T, G_H]
    xg, xgs = moe_gather(x_fp8, x_scales, sorted_pair_ids, block_expert, K)  # [A_pad, H], [A_pad, G_H]
    h, hs = gemms.gemm1(xg, xgs, w13, w13_scale, block_expert, cfg["gemm1"], FP8_MAX, AMAX_EPS)
    args = (h, hs, w2, w2_scale, sorted_pair_ids, block_expert, topk_ids.numel(), x.dtype, cfg["gemm2"])
    return gemms.gemm2(*args) if halves is None else gemms.gemm2(*args, halves)


def gluon_blocks(topk_ids, num_experts: int, expert_start: int, cfg: dict):
    """The aligned pairs the Gluon GEMMs of `cfg` take: (sorted_pair_ids, block_expert, halves),
    halves from `moe_align_halves` where GEMM 1 takes 128-slot blocks and GEMM 2 their 64-slot
    halves, else None. Refuses tiles whose block sizes no kernel takes."""
    from . import fused_moe_gluon, fused_moe_gluon_prefill

    gemms = fused_moe_gluon if cfg["VARIANT"] == "gluon" else fused_moe_gluon_prefill
    block_t = cfg["gemm1"]["BLOCK_T"]
    sizes = gemms.BLOCK_TS if cfg["VARIANT"] == "gluon" else (gemms.BLOCK_T,)
    on_halves = cfg["VARIANT"] == "gluon" and block_t == 128 and cfg["gemm2"]["BLOCK_T"] == 64
    if block_t not in sizes or (cfg["gemm2"]["BLOCK_T"] != block_t and not on_halves):
        raise ValueError(
            f"fused_moe: the {cfg['VARIANT']} GEMMs take blocks of {sizes} slots, the same for both "
            f"(or, for 'gluon', 128 for GEMM 1 and 64 for GEMM 2, on its blocks' halves); cfg has {cfg}"
        )
    if on_halves:
        return moe_align_halves(topk_ids, num_experts, expert_start, block_t)
    return (*moe_align(topk_ids, num_experts, expert_start, block_t), None)


def gluon_available(device: torch.device) -> tuple[bool, str]:
    """Whether the Gluon decode GEMMs can run on `device` (a Hopper GPU, this Triton's Gluon), and why."""
    from .fp8_gemm import gluon_available as gemm_gluon_available

    ok, why = gemm_gluon_available(device)
    if not ok:
        return ok, why
    try:
        from . import fused_moe_gluon, fused_moe_gluon_prefill  # noqa: F401
    except Exception as e:  # a Triton whose Gluon lacks what the kernels use
        return False, f"the MoE Gluon kernels do not import ({type(e).__name__}: {e})"
    if not fused_moe_gluon.available():
        return False, "this Triton's Gluon lacks the Hopper API the MoE kernels use"
    return True, why


def kernel_tiles(tiles: dict, gemm: int, H: int, inter: int, num_blocks: int) -> tuple[dict, int]:
    """A config's tiles for GEMM `gemm` (1 or 2) as the kernel takes them: (launch options and
    constexprs, group_t). SCALAR_WS stays on only where each weight tile (GEMM 1: its gate and
    its up rows) lies inside one 128x128 scale block; EVEN_K drops the K mask."""
    tiles = dict(tiles)
    group_t = tiles.pop("GROUP_T")
    scalar = tiles.get("SCALAR_WS", False) and FP8_BLOCK % tiles["BLOCK_W"] == 0
    if gemm == 1:
        tiles.setdefault("MERGE_GU", False)
        scalar = scalar and inter % FP8_BLOCK == 0
    else:
        tiles.pop("MERGE_GU", None)  # GEMM 1's switch; candidates may set it for both
    tiles["SCALAR_WS"] = scalar
    tiles["EVEN_K"] = (H if gemm == 1 else inter) % tiles["BLOCK_K"] == 0
    return tiles, min(group_t or num_blocks, num_blocks)


def moe_gemm1(x_in, x_scales, w13, w13_scale, sorted_pair_ids, block_expert, top_k, tiles):
    """h [A, I] = silu(x @ w13[e, :I]^T) * (x @ w13[e, I:]^T) per local pair, and its scales [A, G_I]
    on the FP8 path (None otherwise)."""
    T, H = x_in.shape
    inter = w13.shape[1] // 2
    num_pairs = T * top_k
    fp8 = w13.dtype == FP8_DTYPE
    device = x_in.device
    if fp8:
        # The interpreter's fp32 -> fp8 cast is wrong (PITFALLS.md): GEMM 1 writes float32 there.
        h = torch.empty(num_pairs, inter, dtype=torch.float32 if INTERPRET else FP8_DTYPE, device=device)
        h_scales = torch.empty(num_pairs, triton.cdiv(inter, FP8_BLOCK), dtype=torch.float32, device=device)
        x_scales_arg, w_scales_arg, h_scales_arg = x_scales, w13_scale, h_scales
    else:
        h = torch.empty(num_pairs, inter, dtype=x_in.dtype, device=device)  # [A, I]
        h_scales = None
        # Dummies: the kernels touch scale pointers only on the FP8 path.
        x_scales_arg = w_scales_arg = h_scales_arg = torch.empty(1, 1, 1, dtype=torch.float32, device=device)
    num_blocks = block_expert.numel()
    tiles, group_t = kernel_tiles(tiles, 1, H, inter, num_blocks)
    grid = (num_blocks * triton.cdiv(inter, tiles["BLOCK_W"]),)
    fused_moe_gemm1_kernel[grid](
        x_in,
        x_scales_arg,
        w13,
        w_scales_arg,
        h,
        h_scales_arg,
        sorted_pair_ids,
        block_expert,
        num_blocks,
        group_t,
        num_pairs,
        top_k,
        H,
        inter,
        x_in.stride(0),
        x_scales_arg.stride(0),
        w13.stride(0),
        w13.stride(1),
        w_scales_arg.stride(0),
        w_scales_arg.stride(1),
        h.stride(0),
        h_scales_arg.stride(0),
        SCALE_BLOCK_N=FP8_BLOCK,
        FP8=fp8,
        DOT_FP32=INTERPRET,
        FP8_MAX=FP8_MAX,
        AMAX_EPS=AMAX_EPS,
        **tiles,
    )
    return (h.to(FP8_DTYPE) if fp8 else h), h_scales


def moe_gemm2(h, h_scales, w2, w2_scale, sorted_pair_ids, block_expert, out_dtype, tiles):
    """y [A, H] = h @ w2[e]^T per local pair, in out_dtype."""
    num_pairs, inter = h.shape
    H = w2.shape[1]
    fp8 = w2.dtype == FP8_DTYPE
    y = torch.empty(num_pairs, H, dtype=out_dtype, device=h.device)  # [A, H]
    if not fp8:
        h_scales = w2_scale = torch.empty(1, 1, 1, dtype=torch.float32, device=h.device)
    num_blocks = block_expert.numel()
    tiles, group_t = kernel_tiles(tiles, 2, H, inter, num_blocks)
    fused_moe_gemm2_kernel[(num_blocks * triton.cdiv(H, tiles["BLOCK_W"]),)](
        h,
        h_scales,
        w2,
        w2_scale,
        y,
        sorted_pair_ids,
        block_expert,
        num_blocks,
        group_t,
        num_pairs,
        H,
        inter,
        h.stride(0),
        h_scales.stride(0),
        w2.stride(0),
        w2.stride(1),
        w2_scale.stride(0),
        w2_scale.stride(1),
        y.stride(0),
        SCALE_BLOCK_N=FP8_BLOCK,
        FP8=fp8,
        DOT_FP32=INTERPRET,
        **tiles,
    )
    return y


def fused_moe_ref(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    expert_start: int = 0,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch reference of `fused_moe`: a loop over the local experts in float32.

    It rounds where the kernels round: h and each expert's output to x's dtype, and on the FP8
    path x and h are quantized per 1x128 group (`fp8_quant_ref`) before their GEMMs.
    """
    T, H = x.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    fp8 = w13.dtype == FP8_DTYPE
    xf = dequantize_token_groups(*fp8_quant_ref(x)) if fp8 else x.float()  # [T, H]
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)  # [T, H]
    for e in range(E):
        tokens, slots = torch.nonzero(topk_ids == expert_start + e, as_tuple=True)  # [n], [n]
        if tokens.numel() == 0:
            continue
        if fp8:
            assert w13_scale is not None and w2_scale is not None
            w13_e = dequantize_weight_blocks(w13[e], w13_scale[e])  # [2I, H]
            w2_e = dequantize_weight_blocks(w2[e], w2_scale[e])  # [H, I]
        else:
            w13_e, w2_e = w13[e].float(), w2[e].float()
        gate_up = xf[tokens] @ w13_e.T  # [n, 2I]
        h = torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [n, I]
        h = dequantize_token_groups(*fp8_quant_ref(h)) if fp8 else h.to(x.dtype).float()
        y = (h @ w2_e.T).to(x.dtype).float()  # [n, H]
        out.index_add_(0, tokens, y * topk_weights[tokens, slots, None])
    return out.to(x.dtype)
