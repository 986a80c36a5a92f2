"""Helpers for tests that run several ranks as processes on gloo (importable by spawned children)."""

from __future__ import annotations

import datetime
import socket
import traceback
from pathlib import Path

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeExperts:
    """Expert e maps row x to (e + 1) * x + e; weighted and summed over the owned experts."""

    def __init__(self, owned: range) -> None:
        self.owned = owned

    def __call__(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for k in range(topk_ids.shape[1]):
            ids = topk_ids[:, k]
            mine = (ids >= self.owned.start) & (ids < self.owned.stop)
            y = (ids[:, None] + 1).to(x.dtype) * x + ids[:, None].to(x.dtype)
            out += torch.where(mine[:, None], topk_weights[:, k : k + 1].to(x.dtype) * y, 0)
        return out


def transport_rank(rank: int, world: int, port: int, out_dir: str, rounds: list[dict]) -> None:
    """Run each round's exchange on this rank and save what it returned."""
    from tests.recording import RecordingTransport

    try:
        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=60),
        )
        experts_per_rank = rounds[0]["experts"] // world
        transport = RecordingTransport(rank, world, experts_per_rank, rounds[0]["capacity"])
        experts = FakeExperts(range(rank * experts_per_rank, (rank + 1) * experts_per_rank))
        results = []
        for step, r in enumerate(rounds):
            transport.begin(step)
            x, ids, w = r["inputs"][rank]
            results.append(transport.exchange(x, ids, w, experts, decode=r["fixed"]))
        torch.save({"results": results, "log": transport.drain()}, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()
    except BaseException:
        (Path(out_dir) / f"rank{rank}.error").write_text(traceback.format_exc())
        raise
