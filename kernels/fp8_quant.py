"""Per-token-group FP8 (e4m3) activation quantization, as DeepSeek-V3 quantizes GEMM inputs.

Legend: T tokens, H hidden (the quantized dimension), G = ceil(H / 128) groups per token,
N and K the rows and columns of a weight (y = x @ w^T).

Each token row is cut into groups of GROUP_SIZE = 128 along H; the last group may be partial.
Per group:

    scale = max(amax, AMAX_EPS) / FP8_MAX        x_fp8 = clamp(x / scale, -FP8_MAX, FP8_MAX)

AMAX_EPS = 1e-10 keeps an all-zero group finite: its scale is 1e-10 / 448 and its values
quantize to 0 (DeepSeek's own act_quant divides by zero there). Both divisions round to
nearest (tl.math.div_rn; the reference divides by tensors, since CUDA torch computes
`t / 448.0` as t * (1 / 448.0)), so the kernel and the reference agree bit for bit.

Weights use 128 x 128 blocks with the checkpoint's `weight_scale_inv` convention
(dequantized = w_fp8 * scale_inv); `quantize_weight_blocks` / `dequantize_weight_blocks` here
are the torch versions the references and the tests share.
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import INTERPRET
from kernels._validate import FLOAT_DTYPES, check_tensor

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
GROUP_SIZE = 128
WEIGHT_BLOCK = 128
AMAX_EPS = 1e-10


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
    s_ptr,  # [T, G] float32
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
    scales [T, ceil(H/128)] float32) with x ≈ x_fp8 * scales (per group). See the module
    docstring for the scale rule and the all-zero group.
    """
    check_tensor("fp8_quant", "x", x, ndim=2, dims="[T, H]", dtypes=FLOAT_DTYPES)
    T, H = x.shape
    num_groups = triton.cdiv(H, GROUP_SIZE)
    # The interpreter's float32 -> fp8 cast is wrong (PITFALLS.md), so there the kernel writes the
    # clamped float32 values and torch does the (round-to-nearest-even) cast.
    q = torch.empty(T, H, dtype=torch.float32 if INTERPRET else FP8_DTYPE, device=x.device)  # [T, H]
    scales = torch.empty(T, num_groups, dtype=torch.float32, device=x.device)  # [T, G]
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
            GROUP=GROUP_SIZE,
            BLOCK_G=block_g,
            FP8_MAX=FP8_MAX,
            AMAX_EPS=AMAX_EPS,
            num_warps=4,
        )
    return q.to(FP8_DTYPE), scales


def fp8_quant_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `fp8_quant` (same outputs, bit for bit)."""
    T, H = x.shape
    num_groups = triton.cdiv(H, GROUP_SIZE)
    groups = F.pad(x.float(), (0, num_groups * GROUP_SIZE - H)).view(T, num_groups, GROUP_SIZE)  # [T, G, 128]
    amax = groups.abs().amax(dim=-1).clamp(min=AMAX_EPS)  # [T, G]
    # Divide by a tensor, not a Python float: CUDA torch turns `t / 448.0` into t * (1 / 448.0),
    # which is not round-to-nearest division and differs from the kernel by 1 ulp in about half
    # of the scales.
    scales = amax / torch.full_like(amax, FP8_MAX)  # [T, G]
    y = (groups / scales[..., None]).clamp(-FP8_MAX, FP8_MAX)  # [T, G, 128]
    return y.view(T, num_groups * GROUP_SIZE)[:, :H].to(FP8_DTYPE), scales


def dequantize_token_groups(x_fp8: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x_fp8 [T, H] with scales [T, ceil(H/128)] -> float32 [T, H]."""
    H = x_fp8.shape[-1]
    return x_fp8.float() * scales.repeat_interleave(GROUP_SIZE, dim=-1)[..., :H]


def quantize_weight_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize w [..., N, K] per 128 x 128 block, as DeepSeek's FP8 checkpoints are stored.

    Returns (w_fp8 [..., N, K] float8_e4m3fn, scale_inv [..., ceil(N/128), ceil(K/128)] float32);
    edge blocks are partial. Same scale rule as activations (amax / 448, amax floored at AMAX_EPS).
    """
    *lead, N, K = w.shape
    nb, kb = triton.cdiv(N, WEIGHT_BLOCK), triton.cdiv(K, WEIGHT_BLOCK)
    padded = F.pad(w.float(), (0, kb * WEIGHT_BLOCK - K, 0, nb * WEIGHT_BLOCK - N))
    blocks = padded.reshape(*lead, nb, WEIGHT_BLOCK, kb, WEIGHT_BLOCK)
    scale_inv = blocks.abs().amax(dim=(-3, -1)).clamp(min=AMAX_EPS) / FP8_MAX  # [..., nb, kb]
    y = (blocks / scale_inv[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    y = y.reshape(*lead, nb * WEIGHT_BLOCK, kb * WEIGHT_BLOCK)[..., :N, :K]
    return y.to(FP8_DTYPE), scale_inv


def dequantize_weight_blocks(w_fp8: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """w_fp8 [..., N, K] with scale_inv [..., ceil(N/128), ceil(K/128)] -> float32 [..., N, K]."""
    N, K = w_fp8.shape[-2:]
    s = scale_inv.repeat_interleave(WEIGHT_BLOCK, dim=-2).repeat_interleave(WEIGHT_BLOCK, dim=-1)
    return w_fp8.float() * s[..., :N, :K]
