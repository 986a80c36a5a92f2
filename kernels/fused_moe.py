"""Fused MoE over the experts one rank owns: grouped GEMMs with SiLU·mul fused, bf16 or FP8 weights.

Legend: T tokens, H hidden, I expert intermediate (`inter` in code; ruff refuses the name I),
E local experts (this rank's), K top-k, A = T*K token-expert pairs, S = max_blocks * BLOCK_M
aligned slots, GH / GI = ceil(H/128) / ceil(I/128) quantization groups.

    out[t] = Σ_k topk_weights[t, k] · w2[e] @ (silu(w13[e, :I] @ x[t]) · (w13[e, I:] @ x[t]))
             over the k whose global expert id e_k lies in [expert_start, expert_start + E)

Ids outside that range belong to other ranks and are ignored. Steps:

1. `moe_align` (torch ops on the device, no host sync, shapes fixed by T, K, E and BLOCK_M so a
   CUDA graph can capture it): pairs sorted by local expert, each expert's run padded to a
   multiple of BLOCK_M; one expert per block of BLOCK_M slots; unused blocks marked -1.
2. GEMM 1: one program per (block, I tile) computes the gate and the up tile from the same
   gathered x rows and writes silu(gate) · up per pair. FP8: x is quantized per 1x128 group by
   `fp8_quant` first; BLOCK_N is 128, so the epilogue quantizes its tile as one 1x128 group for
   GEMM 2 (no separate pass over the intermediate).
3. GEMM 2: one program per (block, H tile) writes w2[e] @ h per pair.
4. Combine: one program per (token, H tile) sums its local pairs in k order, in fp32 with the
   routing weight applied there: deterministic, no atomics.

Intermediates are indexed by pair id: h [A, I] and y [A, H] in the activation dtype (h in fp8
with scales [A, GI] on the FP8 path); rows of foreign pairs are never written nor read.

FP8 weights carry 128x128 block scales over the stacked rows: w13_scale [E, ceil(2I/128), GH]
and w2_scale [E, GH, GI]. With I % 128 != 0 a block of w13 rows straddles gate and up, which
separately quantized gate_proj / up_proj checkpoints cannot express; DeepSeek-V3 has I = 2048.
"""

import torch
import triton
import triton.language as tl

from kernels import INTERPRET
from kernels._validate import FLOAT_DTYPES, check_tensor
from kernels.fp8_quant import (
    AMAX_EPS,
    FP8_DTYPE,
    FP8_MAX,
    GROUP_SIZE,
    WEIGHT_BLOCK,
    dequantize_token_groups,
    dequantize_weight_blocks,
    fp8_quant,
    fp8_quant_ref,
    quantize_rows,
)

ID_DTYPES = (torch.int32, torch.int64)


def max_aligned_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on Σ_e ceil(pairs_e / block_m): at most num_pairs // block_m full blocks plus one
    partial block per non-empty expert."""
    return num_pairs // block_m + min(num_experts, num_pairs)


def moe_align(
    topk_ids: torch.Tensor, num_experts: int, expert_start: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group token-expert pairs by local expert, each expert's run padded to a multiple of block_m.

    topk_ids: [T, K] global expert ids. Returns (sorted_pair_ids [S] int32, block_expert
    [S / block_m] int32) with S = max_aligned_blocks(T*K, E, block_m) * block_m. sorted_pair_ids
    holds pair ids t*K + k grouped by expert (in pair order within an expert) and T*K in
    padding slots; block_expert holds the local expert of each block, or -1 for blocks past the
    last expert's run. Experts with no pairs get no blocks. Runs on the device without a host
    sync, so the sizes depend only on the shapes.
    """
    device = topk_ids.device
    bins = topk_ids.reshape(-1).to(torch.int64) - expert_start  # [A]
    num_pairs = bins.numel()
    bins = torch.where((bins >= 0) & (bins < num_experts), bins, num_experts)  # foreign pairs -> bin E
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    counts.scatter_add_(0, bins, torch.ones_like(bins))  # [E + 1]
    order = torch.argsort(bins, stable=True)  # [A] pair ids by expert
    sorted_bins = bins[order]  # [A]
    rank_in_expert = torch.arange(num_pairs, device=device) - (torch.cumsum(counts, 0) - counts)[sorted_bins]
    padded_ends = torch.cumsum((counts[:num_experts] + block_m - 1) // block_m * block_m, 0)  # [E]
    padded_starts = torch.cat([padded_ends.new_zeros(1), padded_ends[:-1]])  # [E]

    num_blocks = max_aligned_blocks(num_pairs, num_experts, block_m)
    capacity = num_blocks * block_m
    local_bin = sorted_bins.clamp(max=num_experts - 1)
    # Foreign pairs (sorted last) go to one spare slot past the end, dropped below.
    dest = torch.where(sorted_bins < num_experts, padded_starts[local_bin] + rank_in_expert, capacity)  # [A]
    sorted_pair_ids = torch.full((capacity + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids.scatter_(0, dest, order.to(torch.int32))

    block_starts = torch.arange(num_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_ends, block_starts, right=True)  # [S / block_m]
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_pair_ids[:capacity], block_expert


@triton.jit
def fused_moe_gemm1_kernel(
    x_ptr,  # [T, H] activations (fp8 on the FP8 path)
    xs_ptr,  # [T, GH] float32 (FP8 only)
    w_ptr,  # [E, 2I, H] gate rows then up rows
    ws_ptr,  # [E, ceil(2I/128), GH] float32 (FP8 only)
    h_ptr,  # [A, I] out: silu(gate) * up (fp8 on the FP8 path; float32 there when interpreting)
    hs_ptr,  # [A, GI] out: float32 scales of h (FP8 only)
    sorted_pair_ids_ptr,  # [S] int32
    block_expert_ptr,  # [S / BLOCK_M] int32
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCALE_BLOCK_N: tl.constexpr,
    FP8: tl.constexpr,
    DOT_FP32: tl.constexpr,
    FP8_MAX: tl.constexpr,
    AMAX_EPS: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    pair = tl.load(sorted_pair_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM]
    row_mask = pair < num_pairs
    token = (pair // top_k).to(tl.int64)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] columns of gate (and of up, I rows later)
    n_mask = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)

    x_ptrs = x_ptr + token[:, None] * stride_x + offs_k[None, :]  # [BM, BK]
    wg_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BK, BN]
    wu_ptrs = wg_ptrs + inter * stride_wn
    if FP8:
        xs_ptrs = xs_ptr + token * stride_xs  # [BM]
        wgs_ptrs = ws_ptr + expert * stride_wse + (offs_n // SCALE_BLOCK_N) * stride_wsn  # [BN]
        wus_ptrs = ws_ptr + expert * stride_wse + ((offs_n + inter) // SCALE_BLOCK_N) * stride_wsn  # [BN]

    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(H, BLOCK_K)):
        k_mask = offs_k < H - kb * BLOCK_K
        a = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        bg = tl.load(wg_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        bu = tl.load(wu_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            bg = bg.to(tl.float32)
            bu = bu.to(tl.float32)
        if FP8:
            a_s = tl.load(xs_ptrs + kb, mask=row_mask, other=0.0)
            g_s = tl.load(wgs_ptrs + kb, mask=n_mask, other=0.0)
            u_s = tl.load(wus_ptrs + kb, mask=n_mask, other=0.0)
            acc_g += tl.dot(a, bg) * a_s[:, None] * g_s[None, :]
            acc_u += tl.dot(a, bu) * a_s[:, None] * u_s[None, :]
        else:
            acc_g = tl.dot(a, bg, acc_g)
            acc_u = tl.dot(a, bu, acc_u)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K

    h = acc_g * tl.sigmoid(acc_g) * acc_u  # [BM, BN]; zero in masked columns
    h_ptrs = h_ptr + pair[:, None].to(tl.int64) * stride_h + offs_n[None, :]
    out_mask = row_mask[:, None] & n_mask[None, :]
    if FP8:
        # BLOCK_N == 128: this tile is exactly quantization group pid_n of each row of h.
        q, scale = quantize_rows(h, FP8_MAX, AMAX_EPS)
        tl.store(h_ptrs, q.to(h_ptr.dtype.element_ty), mask=out_mask)
        tl.store(hs_ptr + pair.to(tl.int64) * stride_hs + pid_n, scale, mask=row_mask)
    else:
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def fused_moe_gemm2_kernel(
    h_ptr,  # [A, I] (fp8 on the FP8 path)
    hs_ptr,  # [A, GI] float32 (FP8 only)
    w_ptr,  # [E, H, I]
    ws_ptr,  # [E, GH, GI] float32 (FP8 only)
    y_ptr,  # [A, H] out, activation dtype
    sorted_pair_ids_ptr,  # [S] int32
    block_expert_ptr,  # [S / BLOCK_M] int32
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCALE_BLOCK_N: tl.constexpr,
    FP8: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    pair = tl.load(sorted_pair_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)  # [BM]
    row_mask = pair < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] columns of H
    n_mask = offs_n < H
    offs_k = tl.arange(0, BLOCK_K)

    a_ptrs = h_ptr + pair[:, None] * stride_h + offs_k[None, :]  # [BM, BK]
    b_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BK, BN]
    if FP8:
        as_ptrs = hs_ptr + pair * stride_hs  # [BM]
        bs_ptrs = ws_ptr + expert * stride_wse + (offs_n // SCALE_BLOCK_N) * stride_wsn  # [BN]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(inter, BLOCK_K)):
        k_mask = offs_k < inter - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if FP8:
            a_s = tl.load(as_ptrs + kb, mask=row_mask, other=0.0)
            b_s = tl.load(bs_ptrs + kb, mask=n_mask, other=0.0)
            acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    y_ptrs = y_ptr + pair[:, None] * stride_y + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


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


def _config(num_pairs: int, num_experts: int, fp8: bool) -> dict:
    """Fixed tiles from the shapes. BLOCK_M follows the mean pairs per expert (the bound counts
    foreign pairs too): 16 for decode, where the weights' bandwidth is all that matters, 64 once
    experts see many tokens. FP8 needs BLOCK_K = 128 (one scale per step) and GEMM 1's
    BLOCK_N = 128 (its epilogue quantizes one 1x128 group of h)."""
    per_expert = num_pairs / num_experts
    block_m = 16 if per_expert <= 16 else 32 if per_expert <= 48 else 64
    return dict(
        BLOCK_M=block_m,
        BLOCK_N=128,
        BLOCK_K=128 if fp8 else 64,
        num_warps=8 if block_m == 64 else 4,
        num_stages=3 if block_m == 64 else 4,
    )


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
    gh, gi = triton.cdiv(H, WEIGHT_BLOCK), triton.cdiv(inter, WEIGHT_BLOCK)
    if fp8:
        check_tensor(
            op,
            "w13_scale",
            w13_scale,
            shape=(E, triton.cdiv(two_i, WEIGHT_BLOCK), gh),
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
) -> torch.Tensor:
    """Routed-expert MLP of the experts [expert_start, expert_start + E) for tokens x; returns [T, H].

    x: [T, H] bf16/fp16/fp32. topk_ids: [T, K] int32/int64 global expert ids (others are
    ignored). topk_weights: [T, K] float32. w13: [E, 2I, H] (gate rows, then up rows) and w2:
    [E, H, I], both in x's dtype, or both float8_e4m3fn with w13_scale [E, ceil(2I/128),
    ceil(H/128)] and w2_scale [E, ceil(H/128), ceil(I/128)] float32 (`weight_scale_inv`
    convention). All contiguous, on one device. Output in x's dtype; a token with no local
    expert gets zeros. T = 0 returns an empty [0, H] without launching.
    """
    fp8 = _check_fused_moe_args(x, topk_ids, topk_weights, w13, w2, expert_start, w13_scale, w2_scale)
    T, H = x.shape
    E, two_i, _ = w13.shape
    inter = two_i // 2
    K = topk_ids.shape[1]
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)  # [T, H]
    if T == 0:
        return out
    num_pairs = T * K
    cfg = _config(num_pairs, E, fp8)
    sorted_pair_ids, block_expert = moe_align(topk_ids, E, expert_start, cfg["BLOCK_M"])  # [S], [S / BM]
    num_blocks = block_expert.numel()
    common = dict(DOT_FP32=INTERPRET, SCALE_BLOCK_N=WEIGHT_BLOCK, FP8=fp8, **cfg)

    if fp8:
        x_in, x_scales = fp8_quant(x)  # [T, H] fp8, [T, GH]
        # The interpreter's fp32 -> fp8 cast is wrong (PITFALLS.md): GEMM 1 writes float32 there.
        h_dtype = torch.float32 if INTERPRET else FP8_DTYPE
        h = torch.empty(num_pairs, inter, dtype=h_dtype, device=x.device)  # [A, I]
        num_groups = triton.cdiv(inter, GROUP_SIZE)
        h_scales = torch.empty(num_pairs, num_groups, dtype=torch.float32, device=x.device)  # [A, GI]
        w13_scales, w2_scales = w13_scale, w2_scale
    else:
        x_in = x
        h = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)  # [A, I]
        # Dummies: the kernels touch scale pointers only on the FP8 path.
        no_scales = torch.empty(1, 1, 1, dtype=torch.float32, device=x.device)
        x_scales = h_scales = w13_scales = w2_scales = no_scales

    fused_moe_gemm1_kernel[(num_blocks, triton.cdiv(inter, cfg["BLOCK_N"]))](
        x_in,
        x_scales,
        w13,
        w13_scales,
        h,
        h_scales,
        sorted_pair_ids,
        block_expert,
        num_pairs,
        K,
        H,
        inter,
        x_in.stride(0),
        x_scales.stride(0),
        w13.stride(0),
        w13.stride(1),
        w13_scales.stride(0),
        w13_scales.stride(1),
        h.stride(0),
        h_scales.stride(0),
        FP8_MAX=FP8_MAX,
        AMAX_EPS=AMAX_EPS,
        **common,
    )
    h = h.to(FP8_DTYPE) if fp8 else h

    y = torch.empty(num_pairs, H, dtype=x.dtype, device=x.device)  # [A, H]
    fused_moe_gemm2_kernel[(num_blocks, triton.cdiv(H, cfg["BLOCK_N"]))](
        h,
        h_scales,
        w2,
        w2_scales,
        y,
        sorted_pair_ids,
        block_expert,
        num_pairs,
        H,
        inter,
        h.stride(0),
        h_scales.stride(0),
        w2.stride(0),
        w2.stride(1),
        w2_scales.stride(0),
        w2_scales.stride(1),
        y.stride(0),
        **common,
    )

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
