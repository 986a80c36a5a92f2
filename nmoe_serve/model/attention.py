"""Attention cores behind one small interface, chosen once at start-up.

MLA calls `prefill` with expanded per-head K/V (causal, variable length, queries aligned to the
end of their context) and `decode` in the absorbed form over the paged latent cache. The torch
implementations here are the reference semantics and the CPU path. KernelAttention is the GPU
path: decode through the `mla_decode` kernel, prefill through flash-attn's varlen kernel or
PyTorch SDPA (a PrefillAttention, chosen once by the model backend).

Legend: T new tokens, S cached tokens (all sequences), B sequences, N heads, Dq q/k head dim,
V value head dim, L latent (kv_lora_rank), R rope dim, P page size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

from nmoe_serve.model.batch import StepBatch


class AttentionBackend(Protocol):
    name: str

    def prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: StepBatch, scale: float
    ) -> torch.Tensor:
        """q [T, N, Dq], k [S, N, Dq], v [S, N, V] → [T, N, V]; causal within each sequence."""
        ...

    def decode(
        self,
        q_latent: torch.Tensor,
        q_pe: torch.Tensor,
        kv_cache: torch.Tensor,
        batch: StepBatch,
        scale: float,
    ) -> torch.Tensor:
        """q_latent [B, N, L], q_pe [B, N, R], kv_cache [pages, P, L+R] → [B, N, L]."""
        ...


class TorchAttention:
    """Reference attention in plain torch (float32 softmax); the CPU path."""

    name = "torch"

    def prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: StepBatch, scale: float
    ) -> torch.Tensor:
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])  # [T, N, V]
        q_start = k_start = 0
        for n_q, n_k in zip(batch.query_lens, batch.context_lens, strict=True):
            qs = q[q_start : q_start + n_q]  # [n_q, N, Dq]
            ks = k[k_start : k_start + n_k]  # [n_k, N, Dq]
            vs = v[k_start : k_start + n_k]  # [n_k, N, V]
            scores = torch.einsum("qnd,knd->nqk", qs.float(), ks.float()) * scale  # [N, n_q, n_k]
            # query i sits at position n_k - n_q + i and sees keys up to it
            allowed = torch.arange(n_k, device=q.device)[None, :] <= (
                torch.arange(n_q, device=q.device)[:, None] + (n_k - n_q)
            )
            scores = scores.masked_fill(~allowed, float("-inf"))
            probs = scores.softmax(dim=-1).to(q.dtype)
            out[q_start : q_start + n_q] = torch.einsum("nqk,knv->qnv", probs, vs)
            q_start += n_q
            k_start += n_k
        return out

    def decode(
        self,
        q_latent: torch.Tensor,
        q_pe: torch.Tensor,
        kv_cache: torch.Tensor,
        batch: StepBatch,
        scale: float,
    ) -> torch.Tensor:
        return mla_decode_torch(q_latent, q_pe, kv_cache, batch.page_table, batch.context_lens_t, scale)


def mla_decode_torch(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    page_table: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Absorbed MLA decode over a paged latent cache, gathered and computed in float32."""
    b, _, latent = q_latent.shape
    if b == 0:
        return q_latent.new_empty(q_latent.shape)
    page_size = kv_cache.shape[1]
    max_len = page_table.shape[1] * page_size
    offsets = torch.arange(max_len, device=kv_cache.device)
    slots = (
        page_table.long().clamp(min=0).repeat_interleave(page_size, dim=1) * page_size + offsets % page_size
    )
    kv = kv_cache.view(-1, kv_cache.shape[-1])[slots].float()  # [B, Smax, L+R]
    scores = torch.einsum("bnl,bsl->bns", q_latent.float(), kv[..., :latent])
    scores += torch.einsum("bnr,bsr->bns", q_pe.float(), kv[..., latent:])
    scores *= scale
    valid = offsets[None, :] < context_lens[:, None].long()  # [B, Smax]
    scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bns,bsl->bnl", probs, kv[..., :latent]).to(q_latent.dtype)


class PrefillAttention(Protocol):
    name: str

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: StepBatch, scale: float
    ) -> torch.Tensor:
        """q [T, N, Dq], k [S, N, Dq], v [S, N, V] → [T, N, V]; causal within each sequence."""
        ...


def causal_mask(n_q: int, n_k: int, device: torch.device) -> torch.Tensor:
    """[n_q, n_k] bool, True where query i (at position n_k - n_q + i) may see key j."""
    return torch.arange(n_k, device=device)[None, :] <= torch.arange(n_q, device=device)[:, None] + (
        n_k - n_q
    )


class SdpaPrefill:
    """PyTorch scaled_dot_product_attention, one call per sequence. A chunk that continues a
    cached context (fewer queries than keys) gets an explicit mask aligned to the end of the
    context (SDPA's is_causal aligns to the start). Inputs go in as 4-D [1, N, n, D]: SDPA's
    fused kernels take only 4-D inputs, and otherwise CUDA falls back to the math path, which
    materialises the [N, n_q, n_k] scores in float32 (docs/PERF.md, rank_sim). V keeps its own
    head dim (MLA: 128 against q/k's 192): cuDNN's kernel takes it, and on an H100 that ran
    1.1x (2048 causal) to 2.6x (2048 queries over 8192 keys, masked) faster than V zero-padded
    to 192 for the flash kernel, without the pad copy (bench/prefill_attention.py)."""

    name = "sdpa"

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: StepBatch, scale: float
    ) -> torch.Tensor:
        out = q.new_empty(q.shape[0], q.shape[1], v.shape[2])  # [T, N, V]
        q_start = k_start = 0
        for n_q, n_k in zip(batch.query_lens, batch.context_lens, strict=True):
            qs = q[q_start : q_start + n_q].transpose(0, 1)[None]  # [1, N, n_q, Dq]
            ks = k[k_start : k_start + n_k].transpose(0, 1)[None]  # [1, N, n_k, Dq]
            vs = v[k_start : k_start + n_k].transpose(0, 1)[None]  # [1, N, n_k, V]
            if n_q == n_k:
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
            else:
                mask = causal_mask(n_q, n_k, q.device)
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale)
            out[q_start : q_start + n_q] = o[0].transpose(0, 1)  # [n_q, N, V]
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
        v_padded = F.pad(v, (0, max(0, q.shape[2] - v_dim)))  # [S, N, max(Dq, V)]
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


class KernelAttention:
    """The GPU path: `mla_decode` (Triton, or its reference in CPU tests) for decode and a
    PrefillAttention for prefill."""

    def __init__(self, mla_decode: Callable[..., torch.Tensor], prefill: PrefillAttention) -> None:
        self.mla_decode = mla_decode
        self.prefill_attention = prefill
        self.name = f"mla_decode/{prefill.name}"

    def prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: StepBatch, scale: float
    ) -> torch.Tensor:
        return self.prefill_attention(q, k, v, batch, scale)

    def decode(
        self,
        q_latent: torch.Tensor,
        q_pe: torch.Tensor,
        kv_cache: torch.Tensor,
        batch: StepBatch,
        scale: float,
    ) -> torch.Tensor:
        return self.mla_decode(q_latent, q_pe, kv_cache, batch.page_table, batch.context_lens_t, scale)
