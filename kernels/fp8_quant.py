"""Per-token-group FP8 (e4m3) activation quantization, as DeepSeek-V3 quantizes GEMM inputs.

Shapes: the legend in docs/ARCHITECTURE.md (T; H here is the quantized dimension, G_H =
ceil(H / 128) groups per token).

Each token row is cut into groups of FP8_BLOCK = 128 along H; the last group may be partial.
Per group:

    scale = max(amax, AMAX_EPS) / FP8_MAX        x_fp8 = clamp(x / scale, -FP8_MAX, FP8_MAX)

AMAX_EPS = 1e-10 keeps an all-zero group finite: its scale is 1e-10 / 448 and its values
quantize to 0 (DeepSeek's own act_quant divides by zero there). Both divisions round to
nearest (tl.math.div_rn; the reference divides by tensors, since CUDA torch computes
`t / 448.0` as t * (1 / 448.0)), so the kernel and the reference agree bit for bit.

The constants, the weight block format and the torch dequantizations live in `fp8_format`.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import INTERPRET
from ._validate import FLOAT_DTYPES, check_tensor
from .fp8_format import AMAX_EPS, FP8_BLOCK, FP8_DTYPE, FP8_MAX


@triton.jit
def quantize_rows(x, FP8_MAX: tl.constexpr, AMAX_EPS: tl.constexpr):
    """Quantize each row of a [ROWS, GROUP] float32 tile as one group: (values in fp8 range, scale [ROWS]).

    The values are float32 already clamped to the fp8 range; the caller casts them on store.
    """
    amax = tl.max(tl.abs(x), axis=1)
    scale = tl.math.div_rn(tl.maximum(amax, AMAX_EPS), tl.full(amax.shape, FP8_MAX, tl.float32))
    y = tl.math.div_rn(x, tl.broadcast_to(scale[:, None], x.shape))
    y = tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX)
    return y, scale


@triton.jit
def fp8_quant_kernel(
    x_ptr,  # [T, H]
    q_ptr,  # [T, H] fp8 (float32 when interpreting; the wrapper casts)
    s_ptr,  # [T, G_H] float32
    H,
    num_groups,
    stride_x,
    stride_q,
    stride_s,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    FP8_MAX: tl.constexpr,
    AMAX_EPS: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    groups = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)  # [BLOCK_G]
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [BLOCK_G, GROUP]
    mask = (groups[:, None] < num_groups) & (cols < H)
    x = tl.load(x_ptr + t * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    y, scale = quantize_rows(x, FP8_MAX, AMAX_EPS)
    tl.store(q_ptr + t * stride_q + cols, y.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + t * stride_s + groups, scale, mask=groups < num_groups)


def _block_groups(num_groups: int) -> int:
    """Groups per program: 8 (a [8, 128] tile, 1024 elements for 4 warps) or fewer for narrow rows."""
    return min(8, triton.next_power_of_2(num_groups))


def fp8_quant(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize activations per token and per group of 128 along H to float8_e4m3fn.

    x: [T, H] bf16/fp16/fp32, contiguous. Returns (x_fp8 [T, H] float8_e4m3fn,
    scales [T, G_H] float32) with x ≈ x_fp8 * scales (per group). See the module
    docstring for the scale rule and the all-zero group.
    """
    check_tensor("fp8_quant", "x", x, ndim=2, dims="[T, H]", dtypes=FLOAT_DTYPES)
    T, H = x.shape
    num_groups = triton.cdiv(H, FP8_BLOCK)
    # The interpreter's float32 -> fp8 cast is wrong (PITFALLS.md), so there the kernel writes the
    # clamped float32 values and torch does the (round-to-nearest-even) cast.
    q = torch.empty(T, H, dtype=torch.float32 if INTERPRET else FP8_DTYPE, device=x.device)  # [T, H]
    scales = torch.empty(T, num_groups, dtype=torch.float32, device=x.device)  # [T, G_H]
    if T > 0 and H > 0:
        block_g = _block_groups(num_groups)
        grid = (T, triton.cdiv(num_groups, block_g))
        fp8_quant_kernel[grid](
            x,
            q,
            scales,
            H,
            num_groups,
            x.stride(0),
            q.stride(0),
            scales.stride(0),
            GROUP=FP8_BLOCK,
            BLOCK_G=block_g,
            FP8_MAX=FP8_MAX,
            AMAX_EPS=AMAX_EPS,
            num_warps=4,
        )
    return q.to(FP8_DTYPE), scales


def fp8_quant_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `fp8_quant` (same outputs, bit for bit)."""
    T, H = x.shape
    num_groups = triton.cdiv(H, FP8_BLOCK)
    groups = F.pad(x.float(), (0, num_groups * FP8_BLOCK - H)).view(T, num_groups, FP8_BLOCK)  # [T, G_H, 128]
    amax = groups.abs().amax(dim=-1).clamp(min=AMAX_EPS)  # [T, G_H]
    # Divide by a tensor, not a Python float: CUDA torch turns `t / 448.0` into t * (1 / 448.0),
    # which is not round-to-nearest division and differs from the kernel by 1 ulp in about half
    # of the scales.
    scales = amax / torch.full_like(amax, FP8_MAX)  # [T, G_H]
    y = (groups / scales[..., None]).clamp(-FP8_MAX, FP8_MAX)  # [T, G_H, 128]
    return y.view(T, num_groups * FP8_BLOCK)[:, :H].to(FP8_DTYPE), scales
