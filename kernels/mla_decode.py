"""Paged MLA decode in the absorbed form, over the latent KV cache (split-K / flash-decoding).

Legend: B decode sequences (one query token each), N heads, L latent (kv_lora_rank), R rope
dim, P page size, S context splits, NP pages in the cache, MP page-table width.

    scores[b, n, j] = (q_nope[b, n] · c_kv[b, j] + q_pe[b, n] · k_pe[b, j]) * softmax_scale
    out[b, n]       = Σ_j softmax_j(scores[b, n]) · c_kv[b, j]           for j < context_lens[b]

Token j of sequence b lives at kv_cache[page_table[b, j // P], j % P]: c_kv in the first L
entries, k_pe in the last R. The caller has multiplied q_nope by W_UK and multiplies out by W_UV.

All heads attend to the same latent K (= V) per token, so a program takes BLOCK_H heads (64) as
the M dimension of its dots: each [BLOCK_N, L] tile of c_kv is loaded once per program and
serves both the scores and the weighted sum. The two head blocks of N = 128 read the same tiles
(the second mostly from L2: head blocks vary fastest in launch order); all 128 heads in one
program would need a [128, 512] fp32 accumulator, 256 registers a thread with 8 warps. Programs also split each sequence's context into
S equal parts (S chosen from the shapes so that head blocks x S x B fills the SMs); each writes
its normalized partial output and log-sum-exp (equivalent to the running max, sum and
accumulator) in float32, and a second kernel merges them. With S = 1 the first kernel writes
the output directly.

context_lens[b] must be >= 1 (the engine never sends an empty sequence): a row with 0 tokens
has no softmax; the kernel leaves NaN there and the reference raises.
"""

import math

import torch
import triton
import triton.language as tl

from kernels import INTERPRET, num_sms
from kernels._validate import FLOAT_DTYPES, check_tensor

MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 64


@triton.jit
def mla_decode_kernel(
    q_nope_ptr,  # [B, N, L]
    q_pe_ptr,  # [B, N, R]
    kv_ptr,  # [NP, P, L + R]
    page_table_ptr,  # [B, MP] int32
    context_lens_ptr,  # [B] int32
    o_ptr,  # [B, N, S, L] float32 partials, or the [B, N, L] output when S == 1
    lse_ptr,  # [B, N, S] float32 log2-sum-exp of the scaled scores (unused when S == 1)
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
def mla_decode_merge_kernel(
    o_part_ptr,  # [B, N, S, L] float32
    lse_ptr,  # [B, N, S] float32, log2 domain
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
    # One [BL] row per split, not an [S, L] tile: 64 x 512 floats would not fit in registers.
    acc = tl.zeros((BLOCK_L,), dtype=tl.float32)
    o_row = o_part_ptr + b * stride_pb + h * stride_ph + offs_l
    for split in range(NUM_SPLITS):
        weight = tl.exp2(tl.load(lse_row + split) - lse_max)
        acc += weight * tl.load(o_row + split * stride_ps, mask=l_mask, other=0.0)
    out = acc / denom  # [BL]
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_l, out.to(out_ptr.dtype.element_ty), mask=l_mask)


def _config(B: int, N: int, max_context: int, num_sms: int) -> dict:
    """Fixed tiles (tuned on an H100, docs/PERF.md): BLOCK_H = 64 heads (two head blocks for
    N = 128; 16 is the smallest dot M) as two warpgroups, BLOCK_N = 64 tokens ([64, 576] bf16 =
    72 KB a step, one page of DeepSeek's P = 64), one stage. The [64, 512] fp32 accumulator alone
    takes 128 registers a thread and this tile spills some, yet it measured fastest: 16 tokens a
    step spent more time on the per-step softmax than 64 do on spills. One program per SM fits
    (q stays in shared memory), so splits make at most one wave: S = num_sms // (B x head
    blocks), at least 1, each split at least MIN_TOKENS_PER_SPLIT tokens of the longest possible
    context (page-table width x P, a shape, so no host sync), at most MAX_SPLITS."""
    block_h = min(64, max(16, triton.next_power_of_2(N)))
    programs = B * triton.cdiv(N, block_h)
    splits = min(num_sms // programs, triton.cdiv(max_context, MIN_TOKENS_PER_SPLIT), MAX_SPLITS)
    return dict(BLOCK_H=block_h, BLOCK_N=64, NUM_SPLITS=max(1, splits), num_warps=8, num_stages=1)


def _check_mla_decode_args(
    q_nope, q_pe, kv_cache, page_table, context_lens, softmax_scale, num_splits
) -> None:
    op = "mla_decode"
    check_tensor(op, "q_nope", q_nope, ndim=3, dims="[B, N, L]", dtypes=FLOAT_DTYPES)
    device = q_nope.device
    B, N, L = q_nope.shape
    check_tensor(op, "q_pe", q_pe, ndim=3, dims="[B, N, R]", dtypes=(q_nope.dtype,), device=device)
    if q_pe.shape[:2] != (B, N):
        raise ValueError(f"{op}: q_pe has shape {tuple(q_pe.shape)}, expected [B, N, R] with B, N = {B}, {N}")
    R = q_pe.shape[2]
    check_tensor(
        op, "kv_cache", kv_cache, ndim=3, dims="[num_pages, P, L + R]", dtypes=(q_nope.dtype,), device=device
    )
    if kv_cache.shape[2] != L + R:
        raise ValueError(
            f"{op}: kv_cache has shape {tuple(kv_cache.shape)}, expected [num_pages, P, L + R] with L + R = {L + R}"
        )
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


def mla_decode(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: torch.Tensor,
    context_lens: torch.Tensor,
    softmax_scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Absorbed MLA decode attention over a paged latent cache; returns [B, N, L] in q's dtype.

    q_nope: [B, N, L] (already multiplied by W_UK), q_pe: [B, N, R], kv_cache: [num_pages, P,
    L + R] (c_kv, then k_pe), all one dtype (bf16/fp16/fp32). page_table: [B, max_pages] int32
    (-1 padding past a sequence's pages; pages in any order). context_lens: [B] int32, each >= 1
    and <= max_pages * P (not checked on the device: an empty row gives NaN). All contiguous, on
    one device. num_splits: context splits per sequence, None to choose from the shapes.
    """
    _check_mla_decode_args(q_nope, q_pe, kv_cache, page_table, context_lens, softmax_scale, num_splits)
    B, N, _ = q_nope.shape
    cfg = _config(B, N, page_table.shape[1] * kv_cache.shape[1], num_sms(q_nope.device))
    if num_splits is not None:
        cfg["NUM_SPLITS"] = num_splits
    return _mla_decode(q_nope, q_pe, kv_cache, page_table, context_lens, softmax_scale, cfg)


def _mla_decode(q_nope, q_pe, kv_cache, page_table, context_lens, softmax_scale, cfg) -> torch.Tensor:
    """`mla_decode` on checked arguments with the tiles `cfg` (as `_config` returns)."""
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
        o = torch.empty(B, N, S, L, dtype=torch.float32, device=q_nope.device)  # [B, N, S, L]
        lse = torch.empty(B, N, S, dtype=torch.float32, device=q_nope.device)  # [B, N, S]
        o_strides = (o.stride(0), o.stride(1), o.stride(2))
        lse_strides = (lse.stride(0), lse.stride(1))
    # tl.dot wants K >= 16: a narrower latent or rope part (tiny test models) loads masked tiles.
    block_l = max(16, triton.next_power_of_2(L))
    grid = (triton.cdiv(N, cfg["BLOCK_H"]), S, B)
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
        **cfg,
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
    """Torch reference of `mla_decode`: gather each sequence's pages, masked softmax in float32.

    Raises ValueError if a context length is < 1 or beyond the page table (one host sync).
    """
    B, N, L = q_nope.shape
    P = kv_cache.shape[1]
    out = torch.empty(B, N, L, dtype=q_nope.dtype, device=q_nope.device)  # [B, N, L]
    if B == 0:
        return out
    lo, hi = int(context_lens.min()), int(context_lens.max())
    if lo < 1 or hi > page_table.shape[1] * P:
        raise ValueError(
            f"mla_decode_ref: context_lens must lie in [1, max_pages * P = {page_table.shape[1] * P}], "
            f"got min {lo}, max {hi}"
        )
    pages_used = triton.cdiv(hi, P)
    positions = torch.arange(pages_used * P, device=q_nope.device)  # [MP * P]
    for b in range(B):
        kv = kv_cache[page_table[b, :pages_used].clamp(min=0).long()].reshape(-1, kv_cache.shape[2]).float()
        c_kv, k_pe = kv[:, :L], kv[:, L:]  # [MP * P, L], [MP * P, R]
        scores = (q_nope[b].float() @ c_kv.T + q_pe[b].float() @ k_pe.T) * softmax_scale  # [N, MP * P]
        scores = scores.masked_fill(positions >= context_lens[b], float("-inf"))
        out[b] = (torch.softmax(scores, dim=-1) @ c_kv).to(q_nope.dtype)
    return out
