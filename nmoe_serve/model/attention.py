"""Attention cores behind one small interface, chosen once at start-up.

MLA calls `prefill` with expanded per-head K/V (causal, variable length, queries aligned to the
end of their context) and `decode` in the absorbed form over the paged latent cache. The torch
implementations here are the reference semantics and the CPU path; faster ones (flash-attn,
Triton MLA decode) implement the same two methods.

Legend: T new tokens, S cached tokens (all sequences), B sequences, N heads, Dq q/k head dim,
V value head dim, L latent (kv_lora_rank), R rope dim, P page size.
"""

from __future__ import annotations

from typing import Protocol

import torch

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
