"""Prefill attention cores behind one small interface, chosen once at start-up by the model backend.

MLA's prefill calls a PrefillAttention with K/V expanded per head from the cached latent: causal,
variable length, each sequence's queries aligned to the end of its context (chunked prefill
continues a cached context). Decode attention is the absorbed form over the paged latent cache,
the `mla_decode` op of the backend's KernelOps (kernel or torch reference), so it is not here.

- TorchPrefill: the reference semantics, in float32 (the CPU path).
- SdpaPrefill: PyTorch's scaled_dot_product_attention, one call per sequence.
- FlashVarlenPrefill: vllm_flash_attn's varlen kernel over the whole flat batch, where it imports.

Shapes: the legend in docs/ARCHITECTURE.md (T, S, N, Dq, Dv).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from nmoe_serve.model.batch import StepBatch


class PrefillAttention(Protocol):
    name: str

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: StepBatch, scale: float
    ) -> torch.Tensor:
        """q [T, N, Dq], k [S, N, Dq], v [S, N, Dv] → [T, N, Dv]; causal within each sequence."""
        ...


def causal_mask(n_q: int, n_k: int, device: torch.device) -> torch.Tensor:
    """[n_q, n_k] bool, True where query i (at position n_k - n_q + i) may see key j."""
    return torch.arange(n_k, device=device)[None, :] <= torch.arange(n_q, device=device)[:, None] + (
        n_k - n_q
    )


class TorchPrefill:
    """Reference prefill attention in plain torch (float32 scores and softmax); the CPU path."""

    name = "torch"

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: StepBatch, scale: float
    ) -> torch.Tensor:
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])  # [T, N, Dv]
        q_start = k_start = 0
        for n_q, n_k in zip(batch.query_lens, batch.context_lens, strict=True):
            qs = q[q_start : q_start + n_q]  # [n_q, N, Dq]
            ks = k[k_start : k_start + n_k]  # [n_k, N, Dq]
            vs = v[k_start : k_start + n_k]  # [n_k, N, Dv]
            scores = torch.einsum("qnd,knd->nqk", qs.float(), ks.float()) * scale  # [N, n_q, n_k]
            scores = scores.masked_fill(~causal_mask(n_q, n_k, q.device), float("-inf"))
            probs = scores.softmax(dim=-1).to(q.dtype)
            out[q_start : q_start + n_q] = torch.einsum("nqk,knv->qnv", probs, vs)
            q_start += n_q
            k_start += n_k
        return out


class SdpaPrefill:
    """PyTorch scaled_dot_product_attention, one call per sequence. A chunk that continues a
    cached context (fewer queries than keys) gets an explicit mask aligned to the end of the
    context (SDPA's is_causal aligns to the start). Inputs go in as 4-D [1, N, n, Dq]: SDPA's
    fused kernels take only 4-D inputs, and otherwise CUDA falls back to the math path, which
    materialises the [N, n_q, n_k] scores in float32 (docs/PERF.md, rank_sim). V keeps its own
    head dim (MLA: 128 against q/k's 192): cuDNN's kernel takes it, and on an H100 that ran
    1.1x (2048 causal) to 2.6x (2048 queries over 8192 keys, masked) faster than V zero-padded
    to 192 for the flash kernel, without the pad copy (bench/prefill_attention.py)."""

    name = "sdpa"

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: StepBatch, scale: float
    ) -> torch.Tensor:
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])  # [T, N, Dv]
        q_start = k_start = 0
        for n_q, n_k in zip(batch.query_lens, batch.context_lens, strict=True):
            qs = q[q_start : q_start + n_q].transpose(0, 1)[None]  # [1, N, n_q, Dq]
            ks = k[k_start : k_start + n_k].transpose(0, 1)[None]  # [1, N, n_k, Dq]
            vs = v[k_start : k_start + n_k].transpose(0, 1)[None]  # [1, N, n_k, Dv]
            if n_q == n_k:
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
            else:
                mask = causal_mask(n_q, n_k, q.device)
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
            out[q_start : q_start + n_q] = o[0].transpose(0, 1)  # [n_q, N, Dv]
            q_start += n_q
            k_start += n_k
        return out


class FlashVarlenPrefill:
    """vllm_flash_attn's flash_attn_varlen_func over the whole flat batch (causal masks align to
    the end of each context). V is padded to the q/k head dim, which the kernel requires."""

    name = "flash-varlen"

    def __init__(self, flash_attn_varlen_func: Callable[..., torch.Tensor]) -> None:
        self.fn = flash_attn_varlen_func

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: StepBatch, scale: float
    ) -> torch.Tensor:
        if q.shape[0] == 0:
            return q.new_empty(0, q.shape[1], v.shape[2])
        v_dim = v.shape[2]
        v_padded = F.pad(v, (0, max(0, q.shape[2] - v_dim)))  # [S, N, max(Dq, Dv)]
        out = self.fn(
            q,
            k,
            v_padded,
            cu_seqlens_q=batch.cu_query_lens,
            cu_seqlens_k=batch.cu_context_lens,
            max_seqlen_q=max(batch.query_lens),
            max_seqlen_k=max(batch.context_lens),
            softmax_scale=scale,
            causal=True,
        )
        return out[..., :v_dim]


def choose_prefill_attention() -> PrefillAttention:
    """vllm_flash_attn's varlen kernel where it imports, else PyTorch SDPA per sequence."""
    try:
        from vllm_flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
    except ImportError:
        return SdpaPrefill()
    return FlashVarlenPrefill(flash_attn_varlen_func)
