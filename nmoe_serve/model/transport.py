"""Every way a MoE layer reaches the experts of its tokens: one rank, or all-to-all between ranks.

The model routes its own tokens and hands them to a transport, which brings each token to the
ranks owning its top-k experts and brings the weighted results back. The model is built with its
transport (`make_transport`); one instance serves every MoE layer of a rank.

- SingleRankTransport: every expert is local; the experts are called directly.
- AllToAllTransport (expert parallelism over a torch.distributed group: NCCL on GPUs, gloo on
  CPUs). A token goes once to every rank that owns at least one of its top-k experts, carrying
  its full top-k ids and weights; the receiving rank sums its local experts' weighted outputs
  into one row and sends that row back, and the sender adds the rows it gets back (`gather_sum`:
  each token's rows summed in float32, deterministic, no [T, EP, H] temporary). Two paths,
  chosen by the step's kind, which comes with the call:
  - variable (prefill): row counts are exchanged first, then exactly those rows;
  - fixed (decode): every rank sends every other rank a buffer of Cap rows, padded with rows
    whose expert ids are -1 (no expert computes them). Shapes never depend on the data, so no
    host synchronisation happens and the exchange can be captured in a CUDA graph.

Both run their collectives whatever the local token count, zero included: every rank enters every
all-to-all of every MoE layer of every step (contract 1 of docs/ARCHITECTURE.md). Each collective
goes through `AllToAllTransport._all_to_all`, the one seam where tests record them.

Shapes: the legend in docs/ARCHITECTURE.md (T, H, K, EP, Cap, Ms, Mr).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.distributed as dist

from nmoe_serve.topology import Topology

# (rows [M, H], index [T, R]) -> [T, H]: each token's returned rows summed (kernels/gather_sum.py)
GatherSum = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class LocalExperts(Protocol):
    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, H], topk_ids [T, K] global ids, topk_weights [T, K] → [T, H], summed over local experts."""
        ...


class ExpertTransport(Protocol):
    name: str

    def exchange(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        experts: LocalExperts,
        decode: bool,
    ) -> torch.Tensor:
        """Routed-expert output for this rank's tokens: [T, H]. `decode`: the step is a decode step
        (static shapes)."""
        ...


class SingleRankTransport:
    """All experts live on this rank."""

    name = "single-rank"

    def exchange(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        experts: LocalExperts,
        decode: bool,
    ) -> torch.Tensor:
        return experts(x, topk_ids, topk_weights)


class AllToAllTransport:
    """The expert-parallel exchange of one rank (see the module docstring)."""

    name = "all-to-all"

    def __init__(
        self,
        rank: int,
        world_size: int,
        experts_per_rank: int,
        capacity: int,
        group: dist.ProcessGroup | None = None,
        gather_sum: GatherSum | None = None,
    ) -> None:
        """gather_sum: the combine's row sum (the model backend's `ops.gather_sum`; default: the
        torch reference)."""
        self.rank, self.world_size = rank, world_size
        self.experts_per_rank, self.capacity, self.group = experts_per_rank, capacity, group
        if gather_sum is None:
            from nmoe_serve.kernels.gather_sum import gather_sum_ref

            gather_sum = gather_sum_ref
        self.gather_sum: GatherSum = gather_sum

    def exchange(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        experts: LocalExperts,
        decode: bool,
    ) -> torch.Tensor:
        if decode:
            return self.exchange_fixed(x, topk_ids, topk_weights, experts)
        return self.exchange_variable(x, topk_ids, topk_weights, experts)

    def _destinations(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """[T, EP] bool: rank r owns at least one of token t's experts."""
        owner = topk_ids // self.experts_per_rank  # [T, K]
        to_rank = torch.zeros(topk_ids.shape[0], self.world_size, dtype=torch.bool, device=topk_ids.device)
        return to_rank.scatter_(1, owner, True)

    def _all_to_all(
        self,
        op: str,
        out: torch.Tensor,
        inp: torch.Tensor,
        out_splits: list[int] | None = None,
        in_splits: list[int] | None = None,
    ) -> None:
        """One collective of the exchange; `op` names it (counts, tokens, ids, weights, combine)."""
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group)

    def exchange_variable(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: LocalExperts
    ) -> torch.Tensor:
        to_rank = self._destinations(topk_ids)  # [T, EP]
        _, send_token = to_rank.t().nonzero(as_tuple=True)  # [Ms], grouped by destination rank
        send_counts = to_rank.sum(dim=0)  # [EP]
        recv_counts = torch.empty_like(send_counts)
        self._all_to_all("counts", recv_counts, send_counts)
        send_split, recv_split = send_counts.tolist(), recv_counts.tolist()
        received = sum(recv_split)
        k, h = topk_ids.shape[1], x.shape[1]
        x_recv = x.new_empty(received, h)  # [Mr, H]
        ids_recv = topk_ids.new_empty(received, k)  # [Mr, K]
        w_recv = topk_weights.new_empty(received, k)  # [Mr, K]
        self._all_to_all("tokens", x_recv, x[send_token], recv_split, send_split)
        self._all_to_all("ids", ids_recv, topk_ids[send_token], recv_split, send_split)
        self._all_to_all("weights", w_recv, topk_weights[send_token], recv_split, send_split)
        y_recv = experts(x_recv, ids_recv, w_recv)  # [Mr, H]
        y_back = x.new_empty(send_token.shape[0], h)  # [Ms, H]
        self._all_to_all("combine", y_back, y_recv, send_split, recv_split)
        return self.gather_sum(y_back, combine_index(to_rank))

    def exchange_fixed(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: LocalExperts
    ) -> torch.Tensor:
        t, k = topk_ids.shape
        h, ranks, cap = x.shape[1], self.world_size, self.capacity
        if t > cap:
            raise RuntimeError(
                f"decode step has {t} tokens on rank {self.rank} but the fixed exchange holds {cap}: "
                "the scheduler's max_num_seqs and the transport's capacity disagree"
            )
        to_rank = self._destinations(topk_ids)  # [T, EP]
        slot = to_rank.long().cumsum(dim=0) - 1  # [T, EP] row of token t in rank r's buffer
        discard = ranks * cap  # one spare row past the buffers takes the tokens a rank does not get
        flat = torch.where(to_rank, torch.arange(ranks, device=x.device) * cap + slot, discard)  # [T, EP]
        send_x = x.new_zeros(discard + 1, h)  # [EP*Cap + 1, H]
        send_ids = topk_ids.new_full((discard + 1, k), -1)
        send_w = topk_weights.new_zeros(discard + 1, k)
        rows = flat.flatten()  # [T*EP]
        tokens = torch.arange(t, device=x.device).repeat_interleave(ranks)  # [T*EP]
        send_x[rows] = x[tokens]
        send_ids[rows] = topk_ids[tokens]
        send_w[rows] = topk_weights[tokens]
        recv_x = x.new_empty(discard, h)  # [EP*Cap, H]
        recv_ids = topk_ids.new_empty(discard, k)
        recv_w = topk_weights.new_empty(discard, k)
        self._all_to_all("tokens", recv_x, send_x[:discard])
        self._all_to_all("ids", recv_ids, send_ids[:discard])
        self._all_to_all("weights", recv_w, send_w[:discard])
        y_recv = experts(recv_x, recv_ids, recv_w)  # [EP*Cap, H]; padded rows are zero
        y_back = x.new_empty(discard, h)  # [EP*Cap, H]
        self._all_to_all("combine", y_back, y_recv)
        return self.gather_sum(y_back, torch.where(to_rank, flat, -1))


def combine_index(to_rank: torch.Tensor) -> torch.Tensor:
    """The variable exchange's combine index [T, EP] for `gather_sum`: the row of y_back that holds
    token t's result from rank r, -1 where t was not sent to r. y_back's rows are to_rank's true
    entries in (rank, token) order (as `send_token` lists them), so (t, r)'s row is its rank among
    them."""
    row_of = (to_rank.t().flatten().long().cumsum(0) - 1).view(to_rank.shape[1], -1).t()  # [T, EP]
    return torch.where(to_rank, row_of, -1)


def make_transport(
    topology: Topology, n_routed_experts: int, capacity: int, gather_sum: GatherSum | None = None
) -> ExpertTransport:
    """The transport of a rank at `topology`: all-to-all over the default process group (which
    must be initialised) with several ranks; capacity = the most decode tokens a rank sends;
    gather_sum: the combine's row sum (the backend's `ops.gather_sum`)."""
    if topology.world_size == 1:
        return SingleRankTransport()
    per_rank = len(topology.owned_experts(n_routed_experts))
    return AllToAllTransport(topology.rank, topology.world_size, per_rank, capacity, gather_sum=gather_sum)
