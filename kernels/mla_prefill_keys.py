"""Prefill attention's keys: each head's no-rope key beside the rope key all heads share, in one
launch.

Shapes: the legend in docs/ARCHITECTURE.md (S context tokens, N heads, D = qk_nope_head_dim,
R = qk_rope_head_dim). From k_nope [S, N, D] (a strided view of kv_b_proj's output, which holds
each head's key and value side by side) and k_pe [S, R] (the cached rope key, a slice of the
latent cache's rows):

    k[s, n] = [k_nope[s, n], k_pe[s]]        k [S, N, D + R], contiguous

Why: `torch.cat([k_nope, k_pe[:, None].expand(S, N, R)], -1)` takes torch's non-vectorized copy
for the strided and broadcast inputs: 1.37 ms at 16k tokens and 128 heads on an H200, about 1 TB/s
(docs/PERF.md). This reads each key row once and the rope key once per token.
"""

import torch
import triton
import triton.language as tl

from ._validate import FLOAT_DTYPES, check_tensor

BLOCK_N = 32  # heads a program: 32 rows of D + R, contiguous in k


@triton.jit
def mla_prefill_keys_kernel(
    nope_ptr,  # [S, N, D], last dimension contiguous
    pe_ptr,  # [S, R], last dimension contiguous
    k_ptr,  # [S, N, D + R] contiguous
    N,
    D,
    R,
    stride_ns,
    stride_nn,
    stride_ps,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    r = tl.arange(0, BLOCK_R)
    in_heads = (heads < N)[:, None]
    nope = tl.load(
        nope_ptr + s * stride_ns + heads[:, None] * stride_nn + d[None, :], mask=in_heads & (d < D)[None, :]
    )  # [BLOCK_N, BLOCK_D]
    pe = tl.load(pe_ptr + s * stride_ps + r, mask=r < R)  # [BLOCK_R]
    row = k_ptr + (s * N + heads[:, None]) * (D + R)  # [BLOCK_N, 1]
    tl.store(row + d[None, :], nope, mask=in_heads & (d < D)[None, :])
    pe_rows = tl.zeros([BLOCK_N, BLOCK_R], dtype=pe.dtype) + pe[None, :]
    tl.store(row + D + r[None, :], pe_rows, mask=in_heads & (r < R)[None, :])


def _check(op: str, k_nope: object, k_pe: object, dtypes=FLOAT_DTYPES) -> tuple[torch.Tensor, torch.Tensor]:
    k_nope = check_tensor(op, "k_nope", k_nope, ndim=3, dims="[S, N, D]", dtypes=dtypes, contiguous="last")
    k_pe = check_tensor(op, "k_pe", k_pe, ndim=2, dims="[S, R]", dtypes=(k_nope.dtype,), contiguous="last")
    if k_pe.shape[0] != k_nope.shape[0] or k_pe.device != k_nope.device:
        raise ValueError(
            f"{op}: k_pe {tuple(k_pe.shape)} on {k_pe.device} must have k_nope's {k_nope.shape[0]} rows "
            f"and device ({k_nope.device}): one rope key per context token"
        )
    return k_nope, k_pe


def mla_prefill_keys(k_nope: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
    """k [S, N, D + R] = each head's k_nope beside the shared k_pe (see the module docstring)."""
    k_nope, k_pe = _check("mla_prefill_keys", k_nope, k_pe)
    S, N, D = k_nope.shape
    R = k_pe.shape[1]
    k = torch.empty(S, N, D + R, dtype=k_nope.dtype, device=k_nope.device)  # [S, N, D + R]
    if S and N:
        mla_prefill_keys_kernel[(S, triton.cdiv(N, BLOCK_N))](
            k_nope, k_pe, k, N, D, R, k_nope.stride(0), k_nope.stride(1), k_pe.stride(0),
            BLOCK_N=BLOCK_N, BLOCK_D=triton.next_power_of_2(D), BLOCK_R=triton.next_power_of_2(R),
        )  # fmt: skip
    return k


def mla_prefill_keys_ref(k_nope: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
    """Torch reference of `mla_prefill_keys` (the model's torch path; float64 too, for the CPU tests)."""
    k_nope, k_pe = _check("mla_prefill_keys_ref", k_nope, k_pe, dtypes=(*FLOAT_DTYPES, torch.float64))
    S, N, _ = k_nope.shape
    return torch.cat([k_nope, k_pe[:, None].expand(S, N, k_pe.shape[1])], dim=-1)
