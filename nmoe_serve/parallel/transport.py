"""Expert-parallel MoE transports: tokens to the ranks that own their experts, results back.

A token goes once to every rank that owns at least one of its top-k experts, carrying its full
top-k ids and weights; the receiving rank sums its local experts' weighted outputs into one row
and sends that row back, and the sender adds the rows it gets back. Two paths:

- `exchange_variable` (prefill): row counts are exchanged first, then exactly those rows.
- `exchange_fixed` (decode): every rank sends every other rank a buffer of `capacity` rows, padded
  with rows whose expert ids are -1 (no expert computes them). Shapes never depend on the data,
  so no host synchronisation happens and the exchange can be captured in a CUDA graph.

Both run their collectives whatever the local token count, zero included: every rank enters every
all-to-all of every MoE layer of every step (contract 1). Each collective is recorded in a
bounded log so tests can check that all ranks ran the same sequence.

Legend: T local tokens, H hidden, K top-k, N ranks, C capacity rows per destination, S rows sent,
R rows received.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from nmoe_serve.engine.plan import StepKind
from nmoe_serve.model.transport import LocalExperts


@dataclass
class CollectiveLog:
    """(step_id, kind, moe layer, op) for the last `maxlen` collectives of this rank."""

    maxlen: int = 100_000
    entries: deque[tuple[int, int, int, str]] = field(default_factory=deque)

    def record(self, step_id: int, kind: int, layer: int, op: str) -> None:
        if len(self.entries) >= self.maxlen:
            self.entries.popleft()
        self.entries.append((step_id, kind, layer, op))

    def drain(self) -> list[tuple[int, int, int, str]]:
        out = list(self.entries)
        self.entries.clear()
        return out


class StepClock:
    """The step being run, shared by all MoE layers of a rank; set by the worker at step start."""

    def __init__(self) -> None:
        self.step_id = -1
        self.kind = StepKind.PREFILL
        self.layer = 0

    def begin(self, step_id: int, kind: StepKind) -> None:
        self.step_id, self.kind, self.layer = step_id, kind, 0


class AllToAllTransport:
    """The expert-parallel transport of one MoE layer (one instance per layer, sharing the clock)."""

    name = "all-to-all"

    def __init__(
        self,
        layer: int,
        rank: int,
        world_size: int,
        experts_per_rank: int,
        capacity: int,
        clock: StepClock,
        log: CollectiveLog,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        self.layer, self.rank, self.world_size = layer, rank, world_size
        self.experts_per_rank, self.capacity = experts_per_rank, capacity
        self.clock, self.log, self.group = clock, log, group

    def exchange(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: LocalExperts
    ) -> torch.Tensor:
        if self.clock.kind == StepKind.DECODE:
            return self.exchange_fixed(x, topk_ids, topk_weights, experts)
        return self.exchange_variable(x, topk_ids, topk_weights, experts)

    def _destinations(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """[T, N] bool: rank n owns at least one of token t's experts."""
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
        self.log.record(self.clock.step_id, int(self.clock.kind), self.layer, op)
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group)

    def exchange_variable(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: LocalExperts
    ) -> torch.Tensor:
        to_rank = self._destinations(topk_ids)  # [T, N]
        _, send_token = to_rank.t().nonzero(as_tuple=True)  # [S], grouped by destination rank
        send_counts = to_rank.sum(dim=0)  # [N]
        recv_counts = torch.empty_like(send_counts)
        self._all_to_all("counts", recv_counts, send_counts)
        send_split, recv_split = send_counts.tolist(), recv_counts.tolist()
        received = sum(recv_split)
        k, h = topk_ids.shape[1], x.shape[1]
        x_recv = x.new_empty(received, h)  # [R, H]
        ids_recv = topk_ids.new_empty(received, k)
        w_recv = topk_weights.new_empty(received, k)
        self._all_to_all("tokens", x_recv, x[send_token], recv_split, send_split)
        self._all_to_all("ids", ids_recv, topk_ids[send_token], recv_split, send_split)
        self._all_to_all("weights", w_recv, topk_weights[send_token], recv_split, send_split)
        y_recv = experts(x_recv, ids_recv, w_recv)  # [R, H]
        y_back = x.new_empty(send_token.shape[0], h)  # [S, H]
        self._all_to_all("combine", y_back, y_recv, send_split, recv_split)
        return torch.zeros_like(x).index_add_(0, send_token, y_back)

    def exchange_fixed(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, experts: LocalExperts
    ) -> torch.Tensor:
        t, k = topk_ids.shape
        h, n, c = x.shape[1], self.world_size, self.capacity
        if t > c:
            raise RuntimeError(
                f"decode step has {t} tokens on rank {self.rank} but the fixed exchange holds {c}: "
                "the scheduler's max_num_seqs and the transport's capacity disagree"
            )
        to_rank = self._destinations(topk_ids)  # [T, N]
        slot = to_rank.long().cumsum(dim=0) - 1  # [T, N] row of token t in rank n's buffer
        flat = torch.where(
            to_rank, torch.arange(n, device=x.device) * c + slot, n * c
        )  # [T, N]; n*c = discard row
        send_x = x.new_zeros(n * c + 1, h)
        send_ids = topk_ids.new_full((n * c + 1, k), -1)
        send_w = topk_weights.new_zeros(n * c + 1, k)
        rows = flat.flatten()  # [T*N]
        tokens = torch.arange(t, device=x.device).repeat_interleave(n)  # [T*N]
        send_x[rows] = x[tokens]
        send_ids[rows] = topk_ids[tokens]
        send_w[rows] = topk_weights[tokens]
        recv_x = x.new_empty(n * c, h)
        recv_ids = topk_ids.new_empty(n * c, k)
        recv_w = topk_weights.new_empty(n * c, k)
        self._all_to_all("tokens", recv_x, send_x[: n * c])
        self._all_to_all("ids", recv_ids, send_ids[: n * c])
        self._all_to_all("weights", recv_w, send_w[: n * c])
        y_recv = experts(recv_x, recv_ids, recv_w)  # [N*C, H]; padded rows are zero
        y_back = x.new_empty(n * c + 1, h)
        y_back[n * c] = 0
        self._all_to_all("combine", y_back[: n * c], y_recv)
        return y_back[flat].sum(dim=1, dtype=x.dtype) if t else torch.zeros_like(x)
