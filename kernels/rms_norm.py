"""RMSNorm, alone or fused with the residual add that precedes it (one launch instead of ~8).

Shapes: the legend in docs/ARCHITECTURE.md (T; H here is the normalized dimension).

    rms_norm(x, w)             = w * round(x / sqrt(mean(x^2) + eps))
    add_rms_norm(x, r, w)      = (rms_norm(s, w), s)   with s = round(x + r)

`round` is the cast to x's dtype, placed where the model's torch RMSNorm rounds (it normalizes
in float32, casts, then multiplies by the weight in x's dtype), so the two agree to float32
reduction order. Rows may be strided (a slice of a wider projection output); the last dimension
must be contiguous.
"""

import torch
import triton
import triton.language as tl

from ._validate import FLOAT_DTYPES, check_tensor


@triton.jit
def rms_norm_row(x, w, H, eps, OUT_DTYPE: tl.constexpr):
    """RMSNorm of one [BLOCK] float32 row (zeros past H) with weight w [BLOCK] float32: the
    normalized row in float32, rounded through OUT_DTYPE where torch rounds."""
    var = tl.sum(x * x, axis=0) / H
    y = (x * tl.rsqrt(var + eps)).to(OUT_DTYPE).to(tl.float32)
    return (w * y).to(OUT_DTYPE)


@triton.jit
def rms_norm_kernel(
    x_ptr,  # [T, H], row stride stride_x
    r_ptr,  # [T, H] residual (read only when ADD)
    w_ptr,  # [H]
    out_ptr,  # [T, H] contiguous
    sum_ptr,  # [T, H] contiguous, x + residual (written only when ADD)
    H,
    stride_x,
    stride_r,
    eps,
    ADD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        s = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * H + cols, s, mask=mask)
        x = s
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = rms_norm_row(x.to(tl.float32), w, H, eps, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * H + cols, y, mask=mask)


def _check_row_major(op: str, name: str, x: object, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    return check_tensor(op, name, x, ndim=2, dims="[T, H]", dtypes=dtypes, contiguous="last")


def _check_weight(op: str, x: torch.Tensor, weight: object, eps: object) -> None:
    check_tensor(op, "weight", weight, shape=(x.shape[1],), dims="[H]", dtypes=FLOAT_DTYPES, device=x.device)
    if not (isinstance(eps, float) and eps > 0):
        raise ValueError(f"{op}: eps is {eps!r}, expected a positive float")


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    T, H = x.shape
    out = torch.empty(T, H, dtype=x.dtype, device=x.device)  # [T, H]
    total = torch.empty(T, H, dtype=x.dtype, device=x.device) if residual is not None else out  # [T, H]
    if T:
        block = triton.next_power_of_2(H)
        rms_norm_kernel[(T,)](
            x,
            residual if residual is not None else x,
            weight,
            out,
            total,
            H,
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            eps,
            ADD=residual is not None,
            BLOCK=block,
            num_warps=8 if block >= 4096 else 4,
        )
    return out, total


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of each row of x [T, H] (bf16/fp16/fp32, last dim contiguous) → [T, H] in x's dtype."""
    x = _check_row_major("rms_norm", "x", x)
    _check_weight("rms_norm", x, weight, eps)
    return _launch(x, None, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm of s, s) with s = x + residual rounded to x's dtype; x, residual [T, H]."""
    op = "add_rms_norm"
    x = _check_row_major(op, "x", x)
    residual = _check_row_major(op, "residual", residual, dtypes=(x.dtype,))
    if residual.shape != x.shape or residual.device != x.device:
        raise ValueError(
            f"{op}: residual is {tuple(residual.shape)} on {residual.device}, expected {tuple(x.shape)} on {x.device}"
        )
    _check_weight(op, x, weight, eps)
    return _launch(x, residual, weight, eps)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Torch reference of `rms_norm` (the model's RMSNorm)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `add_rms_norm`."""
    total = x + residual
    return rms_norm_ref(total, weight, eps), total
