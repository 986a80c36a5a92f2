"""Topology: where a worker sits in its expert-parallel group. Immutable, passed in, never global."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    group: str = "0"  # EP group name (one per 8-GPU node)
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is outside a group of {self.world_size} ranks")

    def owned_experts(self, n_experts: int) -> range:
        """The contiguous block of routed experts this rank holds."""
        if n_experts % self.world_size:
            raise ValueError(
                f"{n_experts} routed experts cannot be split evenly over ep_size={self.world_size} ranks: "
                "choose an ep_size that divides the expert count"
            )
        per_rank = n_experts // self.world_size
        return range(self.rank * per_rank, (self.rank + 1) * per_rank)
