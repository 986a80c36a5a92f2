"""Block-scaled FP8 GEMM: y = (x_fp8 * x_scales) @ (w_fp8 * w_scale_inv)^T, fp32 accumulation.

Shapes: the legend in docs/ARCHITECTURE.md (T rows of x, Din the reduced dimension, Dout the
output features, G_in = ceil(Din/128), G_out = ceil(Dout/128) scale groups).

x is quantized per token and per group of 128 along Din (`fp8_quant`), w per 128 x 128 block
(DeepSeek's `weight_scale_inv`, edge blocks partial). BLOCK_K is 128, so each step along Din of the
kernel meets exactly one activation scale per row and one weight scale per column; the partial
product of a step is scaled before it joins the fp32 accumulator (DeepSeek-V3 §3.3.2 keeps its
accumulation in fp32 per 128-wide group for the same reason).

Decode (T <= 64) reads the weights once and computes little: the weight tile is the dot's M
(`scaled_dot`, SWAP_AB) and Din is split over several programs (split-K) so that enough of them
stream the weights; a second kernel sums the fp32 partials in a fixed order (deterministic).
"""

import torch
import triton
import triton.language as tl

from . import INTERPRET, num_sms
from ._validate import check_tensor
from .fp8_format import FP8_BLOCK, FP8_DTYPE, dequantize_token_groups, dequantize_weight_blocks

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def scaled_dot(acc, w, x, w_scale, x_scale, SWAP_AB: tl.constexpr):
    """acc + (w [BW, BK] @ x [BK, BT]) * w_scale [BW] * x_scale [BT]: one 128-wide block along Din of a
    block-scaled GEMM, the partial product scaled before it joins the fp32 accumulator.

    SWAP_AB: acc is [BW, BT] (weights as the dot's M: wgmma needs 64 rows a warpgroup, decode
    has a handful of tokens). Otherwise acc is [BT, BW], the transposed product, which large
    token tiles want: the per-token scales then vary along M, where each thread holds few rows,
    instead of along Dout, where it holds many. Both operands are Din-major either way (FP8 wgmma
    requires it), so the transposes are views of shared memory.
    """
    if SWAP_AB:
        acc += tl.dot(w, x) * w_scale[:, None] * x_scale[None, :]
    else:
        acc += tl.dot(tl.trans(x), tl.trans(w)) * x_scale[:, None] * w_scale[None, :]
    return acc


@triton.jit
def fp8_gemm_kernel(
    x_ptr,  # [T, Din] fp8
    xs_ptr,  # [T, G_in] float32
    w_ptr,  # [Dout, Din] fp8
    ws_ptr,  # [G_out, G_in] float32
    y_ptr,  # [T, Dout] out, or [SPLIT_K, T, Dout] float32 partial sums when SPLIT_K > 1
    T,
    N,
    K,
    k_blocks_per_split,
    stride_x,
    stride_xs,
    stride_w,
    stride_ws,
    stride_y,
    stride_split,
    BLOCK_T: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCALE_BLOCK_N: tl.constexpr,
    GROUP_T: tl.constexpr,
    SWAP_AB: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    # Grouped launch order: GROUP_T token blocks share each weight block while it is in L2.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_t = tl.cdiv(T, BLOCK_T)
    num_w = tl.cdiv(N, BLOCK_W)
    per_group = GROUP_T * num_w
    first_t = (pid // per_group) * GROUP_T
    group_rows = tl.minimum(num_t - first_t, GROUP_T)
    pid_t = first_t + (pid % per_group) % group_rows
    pid_w = (pid % per_group) // group_rows

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    offs_w = pid_w * BLOCK_W + tl.arange(0, BLOCK_W)  # [BW]
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    t_mask = offs_t < T
    w_mask = offs_w < N
    kb_start = split * k_blocks_per_split
    kb_end = tl.minimum(kb_start + k_blocks_per_split, tl.cdiv(K, BLOCK_K))
    x_ptrs = (
        x_ptr + offs_t[None, :].to(tl.int64) * stride_x + kb_start * BLOCK_K + offs_k[:, None]
    )  # [BK, BT]
    w_ptrs = (
        w_ptr + offs_w[:, None].to(tl.int64) * stride_w + kb_start * BLOCK_K + offs_k[None, :]
    )  # [BW, BK]
    xs_ptrs = xs_ptr + offs_t.to(tl.int64) * stride_xs  # [BT]
    ws_ptrs = ws_ptr + (offs_w // SCALE_BLOCK_N) * stride_ws  # [BW]

    acc = tl.zeros((BLOCK_W, BLOCK_T) if SWAP_AB else (BLOCK_T, BLOCK_W), dtype=tl.float32)
    for kb in range(kb_start, kb_end):
        k_mask = offs_k < K - kb * BLOCK_K
        a = tl.load(x_ptrs, mask=k_mask[:, None] & t_mask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=w_mask[:, None] & k_mask[None, :], other=0.0)
        a_s = tl.load(xs_ptrs + kb, mask=t_mask, other=0.0)
        b_s = tl.load(ws_ptrs + kb, mask=w_mask, other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = scaled_dot(acc, b, a, b_s, a_s, SWAP_AB)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    y_base = y_ptr + split * stride_split
    if SWAP_AB:
        y_ptrs = y_base + offs_t[None, :].to(tl.int64) * stride_y + offs_w[:, None]  # [BW, BT]
        mask = w_mask[:, None] & t_mask[None, :]
    else:
        y_ptrs = y_base + offs_t[:, None].to(tl.int64) * stride_y + offs_w[None, :]  # [BT, BW]
        mask = t_mask[:, None] & w_mask[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def fp8_gemm_reduce_kernel(
    partial_ptr,  # [SPLIT_K, T * Dout] float32
    y_ptr,  # [T * Dout]
    numel,
    SPLIT_K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):  # fixed order: deterministic
        acc += tl.load(partial_ptr + split * numel + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


MIN_K_BLOCKS_PER_SPLIT = 8


def default_config(T: int, N: int, K: int, num_sms: int, gluon: bool = False) -> dict:
    """Fixed tiles from the shapes (tuned on an H100, docs/PERF.md).

    gluon (Hopper, chosen by the backend at start-up): T >= GLUON_MIN_T runs the Gluon kernel
    (kernels/fp8_gemm_gluon.py: each block's wgmma overlapped with the previous block's scaling),
    with `gluon_config`'s tiles; smaller T keeps the Triton tiles below.

    T <= 64 is weight-bandwidth bound: 64-row weight tiles as the dot's M (SWAP_AB), and split-K
    until about two programs per SM stream the weights; the fp32 partial sums are small next to
    the weights. Larger T: 128 x 128 tiles with the tokens as M, split-K up to one program per
    SM (T = 256 still streams more than it computes). Each split takes at least
    MIN_K_BLOCKS_PER_SPLIT blocks of 128 (shorter ones lost to their pipeline's fill).
    """
    if gluon and T >= GLUON_MIN_T:
        return gluon_config(T, N, K, num_sms)
    if T <= 64:
        cfg = dict(
            BLOCK_T=max(16, triton.next_power_of_2(T)), BLOCK_W=64, SWAP_AB=True, num_warps=4, num_stages=4
        )
    else:
        cfg = dict(BLOCK_T=128, BLOCK_W=128, SWAP_AB=False, num_warps=8, num_stages=3)
    tiles = triton.cdiv(T, cfg["BLOCK_T"]) * triton.cdiv(N, cfg["BLOCK_W"])
    k_blocks = triton.cdiv(K, FP8_BLOCK)
    target = 2 * num_sms if cfg["SWAP_AB"] else num_sms
    split = max(1, min(target // tiles, k_blocks // MIN_K_BLOCKS_PER_SPLIT))
    cfg["SPLIT_K"] = triton.cdiv(k_blocks, triton.cdiv(k_blocks, split))  # no empty splits
    return cfg


GLUON_MIN_T = 128


def gluon_config(T: int, N: int, K: int, num_sms: int) -> dict:
    """Tiles of the Gluon kernel: 128 x 128 (8 warps, two warpgroups along T), 4 stages of
    x and w tiles (128 KB); split-K until the tiles and splits fill the SMs once."""
    cfg = dict(VARIANT="gluon", BLOCK_T=128, BLOCK_W=128, STAGES=4, num_warps=8)
    tiles = triton.cdiv(T, cfg["BLOCK_T"]) * triton.cdiv(N, cfg["BLOCK_W"])
    k_blocks = triton.cdiv(K, FP8_BLOCK)
    split = max(1, min(num_sms // tiles, k_blocks // MIN_K_BLOCKS_PER_SPLIT))
    cfg["SPLIT_K"] = triton.cdiv(k_blocks, triton.cdiv(k_blocks, split))  # no empty splits
    return cfg


def fp8_gemm(
    x_fp8: torch.Tensor,
    x_scales: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale_inv: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    gluon: bool = False,
) -> torch.Tensor:
    """y [T, Dout] = dequant(x_fp8, x_scales) @ dequant(w_fp8, w_scale_inv)^T in `out_dtype`.

    x_fp8: [T, Din] float8_e4m3fn and x_scales: [T, G_in] float32, as `fp8_quant` returns.
    w_fp8: [Dout, Din] float8_e4m3fn and w_scale_inv: [G_out, G_in] float32, as in
    DeepSeek checkpoints. All contiguous, on one device. out_dtype: bf16, fp16 or fp32.
    T = 0 returns an empty [0, Dout] without launching. gluon: the Gluon kernel (Hopper) for
    T >= GLUON_MIN_T, where the caller has checked that it is available (`gluon_available`).
    """
    op = "fp8_gemm"
    check_tensor(op, "x_fp8", x_fp8, ndim=2, dims="[T, Din]", dtypes=(FP8_DTYPE,))
    device = x_fp8.device
    T, K = x_fp8.shape
    check_tensor(op, "w_fp8", w_fp8, ndim=2, dims="[Dout, Din]", dtypes=(FP8_DTYPE,), device=device)
    N = w_fp8.shape[0]
    if w_fp8.shape[1] != K:
        raise ValueError(
            f"{op}: w_fp8 has shape {tuple(w_fp8.shape)}, expected [Dout, Din] with Din = {K} (x_fp8's)"
        )
    gk = triton.cdiv(K, FP8_BLOCK)
    check_tensor(
        op,
        "x_scales",
        x_scales,
        shape=(T, gk),
        dims="[T, G_in]",
        dtypes=(torch.float32,),
        device=device,
    )
    check_tensor(
        op,
        "w_scale_inv",
        w_scale_inv,
        shape=(triton.cdiv(N, FP8_BLOCK), gk),
        dims="[G_out, G_in]",
        dtypes=(torch.float32,),
        device=device,
    )
    if out_dtype not in OUT_DTYPES:
        raise ValueError(
            f"{op}: out_dtype is {out_dtype}, expected one of: {', '.join(map(str, OUT_DTYPES))}"
        )

    y = torch.empty(T, N, dtype=out_dtype, device=device)  # [T, Dout]
    if T == 0 or N == 0:
        return y
    return fp8_gemm_with_config(
        x_fp8, x_scales, w_fp8, w_scale_inv, y, default_config(T, N, K, num_sms(device), gluon)
    )


def gluon_available(device: torch.device) -> tuple[bool, str]:
    """Whether the Gluon kernel can run here (a Hopper GPU, Triton's Gluon of 3.6), and why not."""
    if device.type != "cuda" or INTERPRET:
        return False, f"not a CUDA device ({device})" if device.type != "cuda" else "Triton interpreter"
    if torch.cuda.get_device_capability(device) != (9, 0):
        return False, f"compute capability {torch.cuda.get_device_capability(device)}, not Hopper's (9, 0)"
    try:
        from . import fp8_gemm_gluon
    except Exception as e:  # an older or newer Triton without this Gluon API
        return False, f"Gluon does not import ({type(e).__name__}: {e})"
    if not fp8_gemm_gluon.available():
        return False, f"Triton {triton.__version__}'s Gluon lacks the Hopper API of 3.6"
    return True, f"Gluon (Triton {triton.__version__})"


def fp8_gemm_with_config(x_fp8, x_scales, w_fp8, w_scale_inv, y, cfg) -> torch.Tensor:
    """`fp8_gemm` on checked, non-empty arguments into y [T, Dout], with the tiles `cfg`
    (cfg["VARIANT"] "gluon": the Gluon kernel; otherwise the Triton one)."""
    T, K = x_fp8.shape
    N = w_fp8.shape[0]
    cfg = dict(cfg)
    split = cfg.pop("SPLIT_K")
    k_blocks = triton.cdiv(K, FP8_BLOCK)
    out = y if split == 1 else torch.empty(split, T, N, dtype=torch.float32, device=y.device)
    if cfg.pop("VARIANT", "triton") == "gluon":
        from . import fp8_gemm_gluon

        if not fp8_gemm_gluon.shapes_ok(x_fp8, w_fp8):
            raise ValueError(
                "fp8_gemm: the Gluon kernel needs contiguous, 16-byte aligned x and w with Din a multiple "
                f"of 16, got Din {K}; use the Triton variant"
            )
        fp8_gemm_gluon.launch(
            x_fp8, x_scales, w_fp8, w_scale_inv, out, cfg, triton.cdiv(k_blocks, split), split
        )
    else:
        _launch_triton(x_fp8, x_scales, w_fp8, w_scale_inv, out, cfg, triton.cdiv(k_blocks, split), split)
    if split > 1:
        block = 1024
        fp8_gemm_reduce_kernel[(triton.cdiv(T * N, block),)](
            out, y, T * N, SPLIT_K=split, BLOCK=block, num_warps=4
        )
    return y


def _launch_triton(x_fp8, x_scales, w_fp8, w_scale_inv, out, cfg, k_blocks_per_split, split) -> None:
    T, K = x_fp8.shape
    N = w_fp8.shape[0]
    grid = (triton.cdiv(T, cfg["BLOCK_T"]) * triton.cdiv(N, cfg["BLOCK_W"]), split)
    fp8_gemm_kernel[grid](
        x_fp8,
        x_scales,
        w_fp8,
        w_scale_inv,
        out,
        T,
        N,
        K,
        k_blocks_per_split,
        x_fp8.stride(0),
        x_scales.stride(0),
        w_fp8.stride(0),
        w_scale_inv.stride(0),
        N,
        T * N,
        BLOCK_K=FP8_BLOCK,
        SCALE_BLOCK_N=FP8_BLOCK,
        GROUP_T=8,
        DOT_FP32=INTERPRET,
        **cfg,
    )


def fp8_gemm_ref(
    x_fp8: torch.Tensor,
    x_scales: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale_inv: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Torch reference of `fp8_gemm`: dequantize both operands to float32, matmul, cast."""
    x = dequantize_token_groups(x_fp8, x_scales)  # [T, Din]
    w = dequantize_weight_blocks(w_fp8, w_scale_inv)  # [Dout, Din]
    return (x @ w.T).to(out_dtype)
