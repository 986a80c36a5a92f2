"""Which implementation each kind of layer uses, chosen once when the model is built.

Two families:

- **reference** (the CPU path, and any dtype or device the kernels do not serve): plain torch
  Linear layers, the per-expert torch loop, TorchAttention. FP8 checkpoints are dequantized at
  load, so the numerics are those the oracle tests pin.
- **kernels** (CUDA with bf16/fp16 activations): quantizable Linear layers keep FP8 e4m3 weights
  with their 128x128 block scales and run `fp8_quant` + `fp8_gemm`; routed experts keep stacked
  FP8 w13/w2 with block scales (or bf16 when the checkpoint is not FP8) and run `fused_moe`;
  decode attention runs `mla_decode`, prefill attention runs `vllm_flash_attn`'s varlen kernel if
  it imports, else PyTorch SDPA.

The kernel family takes its four ops from a KernelOps: the Triton kernels on the GPU, or their
torch references (`<op>_ref`, same semantics), which lets the CPU tests run the very layers the
GPU runs. The model reads the flags here only in its constructors: its forward has no branches
on configuration.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nmoe_serve.model.args import FP8_BLOCK, ModelArgs
from nmoe_serve.model.attention import AttentionBackend, KernelAttention, PrefillAttention, TorchAttention

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelOps:
    """The kernels the kernel layers call, with the signatures of `kernels/`: the four big ones
    and the small fused ones that replace chains of torch launches (norms, rope, the latent
    cache write, the router's top-k, SwiGLU's activation)."""

    name: str
    fp8_quant: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    fp8_gemm: Callable[..., torch.Tensor]
    fused_moe: Callable[..., torch.Tensor]
    mla_decode: Callable[..., torch.Tensor]
    rms_norm: Callable[..., torch.Tensor]
    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rope_: Callable[..., torch.Tensor]
    mla_kv_write: Callable[..., None]
    grouped_topk: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_mul: Callable[..., torch.Tensor]
    router_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def tensor_core_router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits [T, E] float32 from x [T, H] and the gate weight [E, H], both bf16: a
    tensor-core GEMM accumulating and returning float32. DeepSeek-V3 stores the gate in bf16, so
    this computes the same products as the float32 GEMM (on FFMA: 1.15 ms of a 16k-token prefill
    layer and 35 us of a 256-seq decode layer on an H100), in another summation order."""
    return torch.mm(x, weight.t(), out_dtype=torch.float32)


def float32_router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits in float32 (any device): the reference of `tensor_core_router_logits`."""
    return torch.nn.functional.linear(x.float(), weight.float())


def triton_ops() -> KernelOps:
    """The Triton kernels (imported here, not at module import: the CPU path never needs them)."""
    from kernels.fp8_gemm import fp8_gemm
    from kernels.fp8_quant import fp8_quant
    from kernels.fused_moe import fused_moe
    from kernels.mla_decode import mla_decode
    from kernels.mla_kv_write import mla_kv_write
    from kernels.rms_norm import add_rms_norm, rms_norm
    from kernels.rope import rope_
    from kernels.router import grouped_topk
    from kernels.silu_mul import silu_mul

    return KernelOps(
        "triton", fp8_quant, fp8_gemm, fused_moe, mla_decode,
        rms_norm, add_rms_norm, rope_, mla_kv_write, grouped_topk, silu_mul, tensor_core_router_logits,
    )  # fmt: skip


def reference_ops() -> KernelOps:
    """The kernels' torch references: same arguments and semantics, any device (tests)."""
    from kernels.fp8_gemm import fp8_gemm_ref
    from kernels.fp8_quant import fp8_quant_ref
    from kernels.fused_moe import fused_moe_ref
    from kernels.mla_decode import mla_decode_ref
    from kernels.mla_kv_write import mla_kv_write_ref
    from kernels.rms_norm import add_rms_norm_ref, rms_norm_ref
    from kernels.rope import rope_ref_
    from kernels.router import grouped_topk_ref
    from kernels.silu_mul import silu_mul_ref

    return KernelOps(
        "torch-ref", fp8_quant_ref, fp8_gemm_ref, fused_moe_ref, mla_decode_ref,
        rms_norm_ref, add_rms_norm_ref, rope_ref_, mla_kv_write_ref, grouped_topk_ref, silu_mul_ref,
        float32_router_logits,
    )  # fmt: skip


@dataclass(frozen=True)
class ModelBackend:
    """The layer implementations of one model. `ops` is None for the reference family."""

    name: str
    attention: AttentionBackend
    ops: KernelOps | None = None
    fp8_linear: bool = False  # quantizable Linear layers keep FP8 weights (Fp8Linear)
    fp8_experts: bool = False  # routed experts keep FP8 weights (Fp8Experts)

    @classmethod
    def reference(cls) -> ModelBackend:
        return cls(name="torch", attention=TorchAttention())

    def describe(self) -> str:
        if self.ops is None:
            return "torch reference (Linear, expert loop, TorchAttention; FP8 dequantized at load)"
        linear = "FP8 fp8_quant+fp8_gemm" if self.fp8_linear else "torch Linear"
        experts = "FP8" if self.fp8_experts else "bf16"
        return (
            f"{self.ops.name} kernels: linear {linear}, experts fused_moe {experts}, "
            f"attention {self.attention.name}"
        )


def kernel_backend(args: ModelArgs, ops: KernelOps, prefill: PrefillAttention | None = None) -> ModelBackend:
    """The kernel family for `args`: FP8 weights where the checkpoint is FP8.

    Routed experts stay FP8 only when moe_intermediate_size is a multiple of 128: fused_moe
    stacks gate and up rows, so a 128-row scale block must not straddle the two (DeepSeek-V3 has
    2048); otherwise they are dequantized to the compute dtype at load."""
    fp8 = args.fp8_block is not None
    attention = KernelAttention(ops.mla_decode, prefill or choose_prefill_attention())
    return ModelBackend(
        name=ops.name,
        attention=attention,
        ops=ops,
        fp8_linear=fp8,
        fp8_experts=fp8 and args.moe_inter_dim % FP8_BLOCK == 0,
    )


def choose_prefill_attention() -> PrefillAttention:
    """vllm_flash_attn's varlen kernel where it imports, else PyTorch SDPA per sequence."""
    from nmoe_serve.model.attention import FlashVarlenPrefill, SdpaPrefill

    try:
        from vllm_flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
    except ImportError:
        return SdpaPrefill()
    return FlashVarlenPrefill(flash_attn_varlen_func)


def choose_backend(kernels: str, args: ModelArgs) -> ModelBackend:
    """The backend for the resolved settings' `kernels` choice ("triton" or "torch"), logged."""
    if kernels == "torch":
        backend = ModelBackend.reference()
    elif kernels == "triton":
        backend = kernel_backend(args, triton_ops())
    else:
        raise ValueError(f"kernels must be 'triton' or 'torch', got {kernels!r}")
    log.info("model backend: %s", backend.describe())
    return backend
