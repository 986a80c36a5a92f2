"""The expert-parallel MoE exchange on 8 gloo ranks (processes, no Ray): every zero-token pattern
returns the same rows as computing all experts on one rank, and no rank hangs."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from tests.dist_helpers import FakeExperts, free_port, transport_rank

WORLD, EXPERTS, TOPK, HIDDEN, CAPACITY = 8, 16, 4, 6, 5


def token_counts(pattern: str, round_index: int) -> list[int]:
    if pattern == "all":
        return [3 + (r % 3) for r in range(WORLD)]
    if pattern == "even":
        return [4 if r % 2 == 0 else 0 for r in range(WORLD)]
    if pattern == "rank0":
        return [CAPACITY] + [0] * (WORLD - 1)
    if pattern == "empty":
        return [0] * WORLD
    if pattern == "rotating":
        return [CAPACITY if r == round_index % WORLD else 0 for r in range(WORLD)]
    raise ValueError(pattern)


def make_round(pattern: str, index: int, fixed: bool, g: torch.Generator) -> dict:
    inputs = []
    for t in token_counts(pattern, index):
        x = torch.randn(t, HIDDEN, generator=g, dtype=torch.float64)
        ids = (
            torch.stack([torch.randperm(EXPERTS, generator=g)[:TOPK] for _ in range(t)])
            if t
            else torch.zeros(0, TOPK, dtype=torch.int64)
        )
        w = torch.rand(t, TOPK, generator=g, dtype=torch.float64)
        inputs.append((x, ids, w))
    return {"inputs": inputs, "fixed": fixed, "experts": EXPERTS, "capacity": CAPACITY}


def test_exchange_patterns_match_single_rank(tmp_path) -> None:
    g = torch.Generator().manual_seed(0)
    rounds = []
    for fixed in (False, True):
        for pattern in ("all", "even", "rank0", "empty"):
            rounds.append(make_round(pattern, 0, fixed, g))
        for i in range(10):
            rounds.append(make_round("rotating", i, fixed, g))
    mp.start_processes(
        transport_rank,
        args=(WORLD, free_port(), str(tmp_path), rounds),
        nprocs=WORLD,
        join=True,
        start_method="spawn",
    )
    errors = sorted(tmp_path.glob("*.error"))
    assert not errors, errors[0].read_text()
    saved = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    everything = FakeExperts(range(EXPERTS))
    for i, r in enumerate(rounds):
        for rank in range(WORLD):
            x, ids, w = r["inputs"][rank]
            got = saved[rank]["results"][i]
            assert got.shape == x.shape
            torch.testing.assert_close(got, everything(x, ids, w), rtol=1e-12, atol=1e-12)
    logs = [s["log"] for s in saved]
    assert all(log == logs[0] for log in logs), "ranks ran different collective sequences"
    fixed_ops = [op for step, kind, _, op in logs[0] if kind == 1]
    assert "counts" not in fixed_ops, "the fixed (decode) path exchanges no counts"
    assert len(logs[0]) == 14 * 5 + 14 * 4
