"""How a MoE layer reaches the experts of its tokens.

The model computes routing for its own tokens and hands them to a transport, which brings each
token to the ranks owning its top-k experts and brings the weighted results back. With one rank
every expert is local and the transport calls the experts directly; the expert-parallel
transports (all-to-all over torch.distributed) implement the same method.

Legend: T tokens, H hidden, K top-k.
"""

from __future__ import annotations

from typing import Protocol

import torch


class LocalExperts(Protocol):
    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], topk_ids [T, K] global ids, topk_weights [T, K] → [T, H], summed over local experts."""
        ...


class ExpertTransport(Protocol):
    name: str

    def exchange(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: LocalExperts
    ) -> torch.Tensor:
        """Routed-expert output for this rank's tokens: [T, H]."""
        ...


class SingleRankTransport:
    """All experts live on this rank."""

    name = "single-rank"

    def exchange(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: LocalExperts
    ) -> torch.Tensor:
        return experts(x, topk_ids, topk_weights)
