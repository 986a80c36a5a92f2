"""PrefixAffinityRouter: Serve's request router for the Coordinator deployment (one replica per EP group).

A prefix cache lives on the ranks of one EP group, so requests that share a prefix should reach
the same group. The router hashes a request's first `affinity_tokens` prompt tokens and orders the
groups by rendezvous hashing of that key over the replica ids (a group that joins or leaves moves
only its own share of the prefixes). The first group in that order gets the request unless it has
more than `max_imbalance` engine requests in flight beyond the least loaded group: then the next
one in the order that is within the bound does, so one hot prefix cannot pin all traffic to one
group while the others idle.

The loads are the requests this router (one per ingress replica) has routed and not yet seen
complete: exact with one ingress replica, each replica's own share with several. Calls other than
`generate` go to the least loaded group, except `reset_prefix_cache(i)`, which goes to the i-th
group in replica-id order, so the ingress reaches every group once.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)


def prefix_key(prompt_token_ids: Sequence[int], affinity_tokens: int) -> bytes:
    """The affinity key of a prompt: a hash of its first `affinity_tokens` tokens."""
    head = np.asarray(list(prompt_token_ids[:affinity_tokens]), np.int64)
    return hashlib.blake2b(head.tobytes(), digest_size=16).digest()


def group_order(key: bytes, loads: Mapping[str, int], max_imbalance: int) -> list[str]:
    """The groups (ids → requests in flight) in the order to try for `key`: by rendezvous hash,
    those within `max_imbalance` of the least loaded first, the others after them."""
    by_hash = sorted(
        loads, key=lambda g: hashlib.blake2b(key + g.encode(), digest_size=8).digest(), reverse=True
    )
    least = min(loads.values())
    within = [g for g in by_hash if loads[g] <= least + max_imbalance]
    return within + [g for g in by_hash if loads[g] > least + max_imbalance]


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, affinity_tokens: int = 256, max_imbalance: int = 8, **_: Any) -> None:
        self.affinity_tokens, self.max_imbalance = affinity_tokens, max_imbalance
        self.inflight: Counter[str] = Counter()  # replica unique id -> generate calls in flight
        self._routed: dict[str, str] = {}  # internal request id -> replica unique id

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        loads = {uid: self.inflight[uid] for uid in by_id}
        method = pending_request.metadata.call_method if pending_request is not None else ""
        args = pending_request.args if pending_request is not None else []
        if method == "reset_prefix_cache" and args:
            ordered = sorted(by_id)
            return [[by_id[ordered[int(args[0]) % len(ordered)]]]]
        if method == "generate" and len(args) >= 2:
            order = group_order(prefix_key(args[1], self.affinity_tokens), loads, self.max_imbalance)
        else:
            order = sorted(loads, key=lambda uid: loads[uid])
        return [[by_id[uid]] for uid in order]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        if pending_request.metadata.call_method == "generate":
            self.inflight[replica_id.unique_id] += 1
            self._routed[pending_request.metadata.internal_request_id] = replica_id.unique_id

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        uid = self._routed.pop(internal_request_id, None)
        if uid is not None:
            self.inflight[uid] -= 1
