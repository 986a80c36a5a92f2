"""Which implementation each kind of layer uses, chosen once when the model is built.

Every layer calls its ops through a KernelOps: the Triton kernels of `nmoe_serve.kernels` on the
GPU, or their torch references (`<op>_ref`, same arguments and semantics), which are the model's
torch path. Two families:

- **reference** (the CPU path, and any dtype or device the kernels do not serve): the torch
  references, plain torch Linear layers with FP8 checkpoints dequantized at load, and
  TorchPrefill. These are the numerics the transformers oracle pins.
- **kernels** (CUDA with bf16/fp16 activations): the Triton kernels; quantizable Linear layers
  keep FP8 e4m3 weights with their 128x128 block scales and run `fp8_quant` + `fp8_gemm`;
  routed experts keep stacked FP8 w13/w2 with block scales (or bf16 when the checkpoint is not
  FP8) for `fused_moe`; prefill attention runs `vllm_flash_attn`'s varlen kernel where it
  imports, else PyTorch SDPA; decode attention runs FlashInfer's MLA (FA3 backend) where it
  imports and takes the model's dims, else the `mla_decode` kernel (model/decode_attention.py).

Tests build the kernel family on the references (`kernel_backend(args, reference_ops())`) to run
the GPU path's very layers on the CPU. The model reads the backend only in its constructors: its
forward has no branches on configuration.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from nmoe_serve.model.args import ModelArgs
from nmoe_serve.model.attention import PrefillAttention, TorchPrefill, choose_prefill_attention
from nmoe_serve.model.decode_attention import DecodeAttention, OpsDecode, flashinfer_decode

log = logging.getLogger(__name__)

_NOT_INSTALLED = (
    "nmoe_serve.kernels is not importable: the top-level kernels/ folder installs under that name. "
    "Install the project (pip install -e . from the repository root) rather than adding it to PYTHONPATH"
)


def _kv_read_plain(
    kv_cache: torch.Tensor, slots: torch.Tensor, latent: int, dtype: torch.dtype
) -> torch.Tensor:
    """A bf16/fp16/fp32 cache's rows at flat slots [S] → [S, C], as stored."""
    return kv_cache.view(-1, kv_cache.shape[-1])[slots]


KV_DTYPES = ("auto", "fp8")  # [cache] kv_dtype: the model's dtype, or kernels/kv_fp8.py's format


def fp8_kv_ops(ops: KernelOps, args: ModelArgs, page_size: int | None) -> KernelOps:
    """`ops` over the FP8 latent cache (kernels/kv_fp8.py): the FP8 cache write, the dequantizing
    read of prefill's context, and FP8 decode attention: the `mla_decode_fp8` kernel for Triton ops
    where it takes the model's dims (DeepSeek-V3's L 512, R 64, P 64), else its torch reference."""
    from nmoe_serve.kernels import mla_decode_fp8 as fp8_decode
    from nmoe_serve.kernels.kv_fp8 import mla_kv_read_fp8
    from nmoe_serve.kernels.mla_kv_write import mla_kv_write_fp8, mla_kv_write_fp8_ref

    triton = ops.name == "triton"
    decode_kernel = (
        triton
        and page_size is not None
        and fp8_decode.fp8_shape_ok(args.kv_lora_rank, args.qk_rope_head_dim, page_size)
    )
    decode: Callable[..., torch.Tensor] = (
        fp8_decode.mla_decode_fp8 if decode_kernel else fp8_decode.mla_decode_fp8_ref
    )
    if decode_kernel and torch.cuda.is_available():
        # Both GEMMs on FP8 tensor cores (kernels/mla_decode_fp8_gluon.py) where Gluon runs.
        gluon, why = fp8_decode.gluon_available(torch.device("cuda", torch.cuda.current_device()))
        log.info("mla_decode_fp8: %s", f"the Gluon kernel ({why})" if gluon else f"the Triton kernel: {why}")
        if gluon:
            decode = fp8_decode.mla_decode_fp8_gluon
    return replace(
        ops,
        name=f"{ops.name}+fp8-kv",
        mla_kv_write=mla_kv_write_fp8 if triton else mla_kv_write_fp8_ref,
        mla_decode=decode,
        mla_kv_read=mla_kv_read_fp8,
    )


@dataclass(frozen=True)
class KernelOps:
    """The ops the layers call, with the signatures of `nmoe_serve.kernels`: the four big ones
    and the small fused ones that replace chains of torch launches (norms, rope, the latent
    cache write, the router's logits and top-k, SwiGLU's activation)."""

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
    # the expert-parallel combine: (rows [M, H], index [T, R]) -> [T, H] (kernels/gather_sum.py)
    gather_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    # prefill's keys: (k_nope [S, N, D], k_pe [S, R]) -> [S, N, D + R] (kernels/mla_prefill_keys.py)
    mla_prefill_keys: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    # prefill's cached context: (kv_cache, flat slots [S], L, dtype) -> [S, C] (kernels/kv_fp8.py)
    mla_kv_read: Callable[..., torch.Tensor] = _kv_read_plain


def triton_ops() -> KernelOps:
    """The Triton kernels (imported here, not at module import: the CPU path never needs them).

    The dense FP8 GEMM runs its Gluon variant (each block's wgmma overlapped with the previous
    block's scaling; 1.3-1.5x faster at 256 and 4096 tokens on an H200, docs/PERF.md) from 128
    tokens up where the current device is a Hopper GPU with Triton 3.6's Gluon, and so do the
    FP8 MoE GEMMs: the decode ones above 160 pairs an expert (kernels/fused_moe_gluon.py; 9%
    faster at 256 sequences a rank, no faster below) and the prefill ones above 512
    (kernels/fused_moe_gluon_prefill.py; 3-4% faster at 16k tokens a rank), and so does MLA
    decode (kernels/mla_decode_gluon.py; 1.2-1.4x faster than the Triton kernel on an H200),
    docs/PERF.md; the choices are made here, once, and logged."""
    try:
        from nmoe_serve.kernels.fp8_gemm import fp8_gemm, gluon_available
        from nmoe_serve.kernels.fp8_quant import fp8_quant
        from nmoe_serve.kernels.fused_moe import GLUON_MIN_PAIRS_PER_EXPERT, fused_moe
        from nmoe_serve.kernels.fused_moe import gluon_available as moe_gluon_available
        from nmoe_serve.kernels.gather_sum import gather_sum
        from nmoe_serve.kernels.mla_decode import gluon_available as mla_gluon_available
        from nmoe_serve.kernels.mla_decode import mla_decode
        from nmoe_serve.kernels.mla_kv_write import mla_kv_write
        from nmoe_serve.kernels.mla_prefill_keys import mla_prefill_keys
        from nmoe_serve.kernels.rms_norm import add_rms_norm, rms_norm
        from nmoe_serve.kernels.rope import rope_
        from nmoe_serve.kernels.router import grouped_topk, router_logits
        from nmoe_serve.kernels.silu_mul import silu_mul
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"{_NOT_INSTALLED} ({e})") from e

    device = torch.device("cuda", torch.cuda.current_device())
    gluon, why = gluon_available(device)
    log.info("fp8_gemm: %s", f"the Gluon kernel from 128 tokens ({why})" if gluon else f"Triton only: {why}")
    gemm = functools.partial(fp8_gemm, gluon=True) if gluon else fp8_gemm
    moe_gluon, why = moe_gluon_available(device)
    log.info(
        "fused_moe: %s",
        f"the Gluon GEMMs for FP8 above {GLUON_MIN_PAIRS_PER_EXPERT} pairs an expert ({why})"
        if moe_gluon
        else f"Triton only: {why}",
    )
    moe = functools.partial(fused_moe, gluon=True) if moe_gluon else fused_moe
    mla_gluon, why = mla_gluon_available(device)
    log.info("mla_decode: %s", f"the Gluon kernel ({why})" if mla_gluon else f"Triton only: {why}")
    decode = functools.partial(mla_decode, gluon=True) if mla_gluon else mla_decode
    return KernelOps(
        "triton", fp8_quant, gemm, moe, decode,
        rms_norm, add_rms_norm, rope_, mla_kv_write, grouped_topk, silu_mul, router_logits, gather_sum,
        mla_prefill_keys,
    )  # fmt: skip


def reference_ops() -> KernelOps:
    """The kernels' torch references: same arguments and semantics, any device."""
    try:
        from nmoe_serve.kernels.fp8_gemm import fp8_gemm_ref
        from nmoe_serve.kernels.fp8_quant import fp8_quant_ref
        from nmoe_serve.kernels.fused_moe import fused_moe_ref
        from nmoe_serve.kernels.gather_sum import gather_sum_ref
        from nmoe_serve.kernels.mla_decode import mla_decode_ref
        from nmoe_serve.kernels.mla_kv_write import mla_kv_write_ref
        from nmoe_serve.kernels.mla_prefill_keys import mla_prefill_keys_ref
        from nmoe_serve.kernels.rms_norm import add_rms_norm_ref, rms_norm_ref
        from nmoe_serve.kernels.rope import rope_ref_
        from nmoe_serve.kernels.router import grouped_topk_ref, router_logits_ref
        from nmoe_serve.kernels.silu_mul import silu_mul_ref
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(f"{_NOT_INSTALLED} ({e})") from e

    return KernelOps(
        "torch-ref", fp8_quant_ref, fp8_gemm_ref, fused_moe_ref, mla_decode_ref,
        rms_norm_ref, add_rms_norm_ref, rope_ref_, mla_kv_write_ref, grouped_topk_ref, silu_mul_ref,
        router_logits_ref, gather_sum_ref, mla_prefill_keys_ref,
    )  # fmt: skip


@dataclass(frozen=True)
class ModelBackend:
    """The layer implementations of one model."""

    name: str
    ops: KernelOps
    prefill_attention: PrefillAttention
    decode_attention: DecodeAttention
    fp8_linear: bool = False  # quantizable Linear layers keep FP8 weights (Fp8Linear)
    fp8_experts: bool = False  # routed experts keep FP8 weights (Fp8Experts)

    def describe(self) -> str:
        linear = "FP8 fp8_quant+fp8_gemm" if self.fp8_linear else "torch Linear"
        experts = "FP8" if self.fp8_experts else "unquantized"
        return (
            f"{self.ops.name} ops: linear {linear}, experts fused_moe {experts}, "
            f"decode attention {self.decode_attention.name}, prefill attention {self.prefill_attention.name}"
        )


def reference_backend(args: ModelArgs | None = None, kv_dtype: str = "auto") -> ModelBackend:
    """The torch path: the kernels' references, FP8 dequantized at load, TorchPrefill; with
    kv_dtype "fp8" (and the model's args), over the FP8 latent cache."""
    ops, decode_name = reference_ops(), "mla_decode_ref"
    if kv_dtype == "fp8":
        if args is None:
            raise ValueError("reference_backend: kv_dtype 'fp8' needs the model's args")
        ops, decode_name = fp8_kv_ops(ops, args, None), "mla_decode_fp8_ref"
    return ModelBackend(
        name="torch",
        ops=ops,
        prefill_attention=TorchPrefill(),
        decode_attention=OpsDecode(ops.mla_decode, decode_name),
    )


def kernel_backend(
    args: ModelArgs,
    ops: KernelOps,
    prefill: PrefillAttention | None = None,
    decode: DecodeAttention | None = None,
) -> ModelBackend:
    """The kernel family for `args`: FP8 weights where the checkpoint is FP8; decode attention
    `decode`, by default the ops' `mla_decode`.

    Routed experts stay FP8 only when moe_intermediate_size is a multiple of 128: fused_moe
    stacks gate and up rows, so a 128-row scale block must not straddle the two (DeepSeek-V3 has
    2048); otherwise they are dequantized to the compute dtype at load."""
    from nmoe_serve.kernels.fp8_format import FP8_BLOCK

    return ModelBackend(
        name=ops.name,
        ops=ops,
        prefill_attention=prefill or choose_prefill_attention(),
        decode_attention=decode or OpsDecode(ops.mla_decode),
        fp8_linear=args.fp8,
        fp8_experts=args.fp8 and args.moe_inter_dim % FP8_BLOCK == 0,
    )


def choose_decode_attention(
    args: ModelArgs, ops: KernelOps, page_size: int, dtype: torch.dtype, device: torch.device
) -> DecodeAttention:
    """FlashInfer's MLA decode where it imports and takes these dims on this device (measured
    faster than our kernel on the H200: docs/PERF.md), else the ops' `mla_decode`; logged."""
    core, why = flashinfer_decode(
        args.n_heads, args.kv_lora_rank, args.qk_rope_head_dim, page_size, args.softmax_scale, dtype, device
    )
    if core is not None:
        log.info("decode attention: %s", why)
        return core
    log.info("decode attention: mla_decode (FlashInfer not used: %s)", why)
    return OpsDecode(ops.mla_decode)


def choose_backend(
    kernels: str,
    args: ModelArgs,
    page_size: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    kv_dtype: str = "auto",
) -> ModelBackend:
    """The backend for the resolved settings' `kernels` choice ("triton" or "torch"), logged.
    With "triton" and the cache's page size, dtype and device given, decode attention is
    `choose_decode_attention`'s; without them, the `mla_decode` kernel. kv_dtype "fp8": the
    ops of `fp8_kv_ops` (FlashInfer's decode, on bf16 caches only, is not used)."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {KV_DTYPES}, got {kv_dtype!r}")
    if kernels == "torch":
        backend = reference_backend(args, kv_dtype)
    elif kernels == "triton" and kv_dtype == "fp8":
        ops = fp8_kv_ops(triton_ops(), args, page_size)
        name = getattr(ops.mla_decode, "__name__", "mla_decode_fp8")
        log.info("decode attention: %s over the FP8 KV cache (FlashInfer's is for bf16 caches)", name)
        backend = kernel_backend(args, ops, decode=OpsDecode(ops.mla_decode, name))
    elif kernels == "triton":
        ops = triton_ops()
        decode = None
        if page_size is not None and dtype is not None and device is not None:
            decode = choose_decode_attention(args, ops, page_size, dtype, device)
        backend = kernel_backend(args, ops, decode=decode)
    else:
        raise ValueError(f"kernels must be 'triton' or 'torch', got {kernels!r}")
    log.info("model backend: %s", backend.describe())
    return backend
