"""Triton kernels for nmoe_serve, each beside a pure-torch reference of the same semantics.

One module per op: `<op>_kernel` (Triton), `<op>` (wrapper: checks shapes, dtypes and
layout, picks a fixed block config from the shapes, launches) and `<op>_ref` (torch; the CPU
tests run the kernel layers on these). Modules: `fp8_quant`, `fp8_gemm`, `fused_moe`,
`mla_decode`, `mla_decode_fp8` (over the FP8 latent cache of `kv_fp8`), and the small fused ops
of a layer: `rms_norm`, `rope`, `mla_kv_write` (and its FP8 variant), `router`, `silu_mul`.
"""

import functools
import os

import torch

# Read once, at import, as @triton.jit reads it when the kernel modules are imported. Wrapper
# paths that must avoid the interpreter's traps (PITFALLS.md) branch on this flag.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def num_sms(device) -> int:
    """Multiprocessors of a CUDA device (cached); 4 elsewhere, to keep interpreter grids tiny."""
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
