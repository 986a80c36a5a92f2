"""The expert-parallel combine: each token's rows, as they come back from the ranks that ran its
experts, summed into one row, in one launch.

Shapes: the legend in docs/ARCHITECTURE.md (T, H, EP). src [M, H] holds the returned rows; index
[T, R] (R: EP on the engine's exchange) names, for each token, the rows of src to add up, -1 for
none: out[t] = sum of src[index[t, r]] over r with index[t, r] >= 0, accumulated in float32 in
the order of r, rounded once to src's dtype. A token with no rows gets zeros.

Why: the sum `torch.zeros(T, H).index_add_(0, rows, src)` does atomic adds in src's dtype (bf16:
each partial sum rounded, in an order that changes from run to run) and read-modify-writes the
output once per row; `src[index].sum(1)` materialises [T, R, H] (1.9 GB at 16k tokens, EP 8).
This reads each returned row once and writes each output row once: deterministic, and bound by
those bytes.
"""

import torch
import triton
import triton.language as tl

from ._validate import FLOAT_DTYPES, check_tensor

BLOCK_H = 1024


@triton.jit
def gather_sum_kernel(
    src_ptr, index_ptr, out_ptr, H, R, stride_src, stride_index, stride_out, BLOCK_H: tl.constexpr
):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_row = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for r in range(0, R):
        row = tl.load(index_ptr + t * stride_index + r).to(tl.int64)
        if row >= 0:
            acc += tl.load(src_ptr + row * stride_src + cols, mask=in_row, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=in_row)


def _check(op: str, src: object, index: object, dtypes=FLOAT_DTYPES) -> tuple[torch.Tensor, torch.Tensor]:
    src = check_tensor(op, "src", src, ndim=2, dims="[M, H]", dtypes=dtypes, contiguous="last")
    index = check_tensor(
        op, "index", index, ndim=2, dims="[T, R]", dtypes=(torch.int32, torch.int64), device=src.device
    )
    return src, index


def gather_sum(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """out [T, H] in src's dtype: out[t] = sum over r of src[index[t, r]], rows with index -1
    left out (see the module docstring). Indices must be below M (not checked: that would sync)."""
    src, index = _check("gather_sum", src, index)
    T, H = index.shape[0], src.shape[1]
    out = torch.empty(T, H, dtype=src.dtype, device=src.device)  # [T, H]
    if T and H:
        gather_sum_kernel[(T, triton.cdiv(H, BLOCK_H))](
            src, index, out, H, index.shape[1], src.stride(0), index.stride(0), out.stride(0), BLOCK_H=BLOCK_H
        )
    return out


def gather_sum_ref(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Torch reference of `gather_sum`, summing in the kernel's order (no host sync: it runs in
    captured decode graphs on the torch backend). float64 rows (the CPU tests' models) are summed
    in float64."""
    src, index = _check("gather_sum_ref", src, index, dtypes=(*FLOAT_DTYPES, torch.float64))
    acc_dtype = torch.promote_types(src.dtype, torch.float32)
    out = torch.zeros(index.shape[0], src.shape[1], dtype=acc_dtype, device=src.device)  # [T, H]
    if src.shape[0] == 0:
        return out.to(src.dtype)
    for r in range(index.shape[1]):
        rows = index[:, r]
        out += torch.where((rows >= 0)[:, None], src[rows.clamp(min=0).long()].to(acc_dtype), 0.0)
    return out.to(src.dtype)
