"""The EP group choice of serve/group_router.py, without a cluster: prefix affinity, the imbalance
bound, and the routing of reset calls (the router's methods on a stand-in for Serve's state)."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace

from nmoe_serve.serve.group_router import PrefixAffinityRouter, group_order, prefix_key

GROUPS = [f"g{i}" for i in range(2)]


def test_equal_leading_tokens_choose_the_same_group() -> None:
    loads = dict.fromkeys(GROUPS, 0)
    system = list(range(100))
    first = group_order(prefix_key([*system, 1, 2], 64), loads, 4)[0]
    assert all(group_order(prefix_key([*system, i], 64), loads, 4)[0] == first for i in range(20))
    spread = Counter(group_order(prefix_key([i, i + 1], 64), loads, 4)[0] for i in range(200))
    assert set(spread) == set(GROUPS) and min(spread.values()) > 60, f"keys spread unevenly: {spread}"


def test_an_overloaded_group_is_passed_over() -> None:
    key = prefix_key([7, 8, 9], 64)
    preferred, other = group_order(key, dict.fromkeys(GROUPS, 0), 4)
    assert group_order(key, {preferred: 4, other: 0}, 4)[0] == preferred, "within the bound"
    assert group_order(key, {preferred: 5, other: 0}, 4) == [other, preferred], "past the bound"


def fake_router() -> SimpleNamespace:
    router = SimpleNamespace()
    PrefixAffinityRouter.initialize_state(router, affinity_tokens=16, max_imbalance=2)  # type: ignore[arg-type]
    return router


def replica(uid: str) -> SimpleNamespace:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=uid))


def pending(method: str, args: list, rid: str = "x") -> SimpleNamespace:
    return SimpleNamespace(args=args, metadata=SimpleNamespace(call_method=method, internal_request_id=rid))


def choose(router: SimpleNamespace, replicas: list, request: SimpleNamespace) -> list[str]:
    ranks = asyncio.run(PrefixAffinityRouter.choose_replicas(router, replicas, request))  # type: ignore[arg-type]
    return [r.replica_id.unique_id for rank in ranks for r in rank]


def test_the_router_counts_its_requests_and_bounds_a_hot_prefix() -> None:
    router, replicas = fake_router(), [replica(g) for g in GROUPS]
    hot = list(range(30))
    chosen = []
    for i in range(12):
        request = pending("generate", [f"r{i}", hot, None], rid=f"r{i}")
        uid = choose(router, replicas, request)[0]
        PrefixAffinityRouter.on_request_routed(router, request, SimpleNamespace(unique_id=uid), None)  # type: ignore[arg-type]
        chosen.append(uid)
    counts = Counter(chosen)
    assert max(counts.values()) - min(counts.values()) <= 2 + 1, f"over the bound: {counts}"
    assert counts[chosen[0]] == max(counts.values())
    for i in range(12):
        PrefixAffinityRouter.on_request_completed(router, SimpleNamespace(unique_id=chosen[i]), f"r{i}")  # type: ignore[arg-type]
    assert all(v == 0 for v in router.inflight.values())


def test_reset_calls_reach_each_group_once() -> None:
    router, replicas = fake_router(), [replica(g) for g in reversed(GROUPS)]
    reached = [choose(router, replicas, pending("reset_prefix_cache", [i]))[0] for i in range(2)]
    assert sorted(reached) == GROUPS
