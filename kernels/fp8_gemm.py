"""Block-scaled FP8 GEMM: y = (x_fp8 * x_scales) @ (w_fp8 * w_scale_inv)^T, fp32 accumulation.

Legend: T tokens (rows of x), K reduction dimension (hidden), N output features, and
GK = ceil(K/128), GN = ceil(N/128) scale blocks.

x is quantized per token and per group of 128 along K (`fp8_quant`), w per 128 x 128 block
(DeepSeek's `weight_scale_inv`, edge blocks partial). BLOCK_K is 128, so each K step of the
kernel meets exactly one activation scale per row and one weight scale per column; the partial
product of a step is scaled before it joins the fp32 accumulator (DeepSeek-V3 §3.3.2 keeps its
accumulation in fp32 per 128-wide K group for the same reason).
"""

import torch
import triton
import triton.language as tl

from kernels import INTERPRET
from kernels._validate import check_tensor
from kernels.fp8_quant import (
    FP8_DTYPE,
    GROUP_SIZE,
    WEIGHT_BLOCK,
    dequantize_token_groups,
    dequantize_weight_blocks,
)

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def fp8_gemm_kernel(
    x_ptr,  # [T, K] fp8
    xs_ptr,  # [T, GK] float32
    w_ptr,  # [N, K] fp8
    ws_ptr,  # [GN, GK] float32
    y_ptr,  # [T, N]
    T,
    N,
    K,
    stride_x,
    stride_xs,
    stride_w,
    stride_ws,
    stride_y,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCALE_BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    # Grouped launch order: GROUP_M row blocks share each weight column block while it is in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(T, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    m_mask = offs_m < T
    n_mask = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_x + offs_k[None, :]  # [BM, BK]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_w + offs_k[:, None]  # [BK, BN]
    xs_ptrs = xs_ptr + offs_m.to(tl.int64) * stride_xs  # [BM]
    ws_ptrs = ws_ptr + (offs_n // SCALE_BLOCK_N) * stride_ws  # [BN]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - kb * BLOCK_K
        a = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        a_s = tl.load(xs_ptrs + kb, mask=m_mask, other=0.0)
        b_s = tl.load(ws_ptrs + kb, mask=n_mask, other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_y + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _config(T: int) -> dict:
    """Fixed tiles by the number of rows. Small T is weight-bandwidth bound: narrow N tiles make more
    programs to fill 132 SMs (N=7168 gives 112 at BLOCK_N=64). Large T is compute bound: 128 x 128."""
    if T <= 64:
        block_m = max(16, triton.next_power_of_2(T))
        return dict(BLOCK_M=block_m, BLOCK_N=64, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)


def fp8_gemm(
    x_fp8: torch.Tensor,
    x_scales: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale_inv: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """y [T, N] = dequant(x_fp8, x_scales) @ dequant(w_fp8, w_scale_inv)^T in `out_dtype`.

    x_fp8: [T, K] float8_e4m3fn and x_scales: [T, ceil(K/128)] float32, as `fp8_quant` returns.
    w_fp8: [N, K] float8_e4m3fn and w_scale_inv: [ceil(N/128), ceil(K/128)] float32, as in
    DeepSeek checkpoints. All contiguous, on one device. out_dtype: bf16, fp16 or fp32.
    T = 0 returns an empty [0, N] without launching.
    """
    op = "fp8_gemm"
    check_tensor(op, "x_fp8", x_fp8, ndim=2, dims="[T, K]", dtypes=(FP8_DTYPE,))
    device = x_fp8.device
    T, K = x_fp8.shape
    check_tensor(op, "w_fp8", w_fp8, ndim=2, dims="[N, K]", dtypes=(FP8_DTYPE,), device=device)
    N = w_fp8.shape[0]
    if w_fp8.shape[1] != K:
        raise ValueError(
            f"{op}: w_fp8 has shape {tuple(w_fp8.shape)}, expected [N, K] with K = {K} (x_fp8's K)"
        )
    gk = triton.cdiv(K, GROUP_SIZE)
    check_tensor(
        op,
        "x_scales",
        x_scales,
        shape=(T, gk),
        dims="[T, ceil(K/128)]",
        dtypes=(torch.float32,),
        device=device,
    )
    check_tensor(
        op,
        "w_scale_inv",
        w_scale_inv,
        shape=(triton.cdiv(N, WEIGHT_BLOCK), gk),
        dims="[ceil(N/128), ceil(K/128)]",
        dtypes=(torch.float32,),
        device=device,
    )
    if out_dtype not in OUT_DTYPES:
        raise ValueError(
            f"{op}: out_dtype is {out_dtype}, expected one of: {', '.join(map(str, OUT_DTYPES))}"
        )

    y = torch.empty(T, N, dtype=out_dtype, device=device)  # [T, N]
    if T == 0 or N == 0:
        return y
    cfg = _config(T)
    grid = (triton.cdiv(T, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    fp8_gemm_kernel[grid](
        x_fp8,
        x_scales,
        w_fp8,
        w_scale_inv,
        y,
        T,
        N,
        K,
        x_fp8.stride(0),
        x_scales.stride(0),
        w_fp8.stride(0),
        w_scale_inv.stride(0),
        y.stride(0),
        BLOCK_K=GROUP_SIZE,
        SCALE_BLOCK_N=WEIGHT_BLOCK,
        GROUP_M=8,
        DOT_FP32=INTERPRET,
        **cfg,
    )
    return y


def fp8_gemm_ref(
    x_fp8: torch.Tensor,
    x_scales: torch.Tensor,
    w_fp8: torch.Tensor,
    w_scale_inv: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Torch reference of `fp8_gemm`: dequantize both operands to float32, matmul, cast."""
    x = dequantize_token_groups(x_fp8, x_scales)  # [T, K]
    w = dequantize_weight_blocks(w_fp8, w_scale_inv)  # [N, K]
    return (x @ w.T).to(out_dtype)
