"""SwiGLU's activation on the fused gate/up projection: h = silu(gate) * up, one launch.

Shapes: the legend in docs/ARCHITECTURE.md (T, I). gate_up [T, 2I] holds gate in its first I columns and up
in the last I (one GEMM over the stacked gate and up weights); h [T, I]. Roundings as torch's
`F.silu(gate) * up` in gate's dtype: silu in float32 rounded, then the product rounded.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._validate import FLOAT_DTYPES, check_tensor

BLOCK = 1024


@triton.jit
def silu_mul_kernel(gu_ptr, h_ptr, inter, stride_gu, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(gu_ptr + t * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + t * stride_gu + inter + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(h_ptr.dtype.element_ty).to(tl.float32)
    tl.store(h_ptr + t * inter + cols, (act * up).to(h_ptr.dtype.element_ty), mask=mask)


def _check(op: str, gate_up: object) -> torch.Tensor:
    gate_up = check_tensor(
        op, "gate_up", gate_up, ndim=2, dims="[T, 2I]", dtypes=FLOAT_DTYPES, contiguous="last"
    )
    if gate_up.shape[1] % 2:
        raise ValueError(f"{op}: gate_up has shape {tuple(gate_up.shape)}: need an even width (gate then up)")
    return gate_up


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate_up[:, :I]) * gate_up[:, I:] → [T, I] in gate_up's dtype."""
    gate_up = _check("silu_mul", gate_up)
    T, I2 = gate_up.shape
    h = torch.empty(T, I2 // 2, dtype=gate_up.dtype, device=gate_up.device)  # [T, I]
    if T and I2:
        silu_mul_kernel[(T, triton.cdiv(I2 // 2, BLOCK))](gate_up, h, I2 // 2, gate_up.stride(0), BLOCK=BLOCK)
    return h


def silu_mul_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """Torch reference of `silu_mul`."""
    gate, up = _check("silu_mul_ref", gate_up).chunk(2, dim=-1)
    return F.silu(gate) * up
