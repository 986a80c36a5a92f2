"""A transport that records every collective it enters, and a worker actor that builds its rank
with one: the T = 0 tests compare the records of all ranks. Test code only; the production
transport has no logging (nmoe_serve.model.transport)."""

from __future__ import annotations

import sys

import torch
from ray import cloudpickle

from nmoe_serve.engine.plan import StepPlan
from nmoe_serve.model.transport import AllToAllTransport, LocalExperts
from nmoe_serve.worker.actor import WorkerActor
from nmoe_serve.worker.worker import Worker

# Ray ships these classes to its worker processes by value, so they need not import this module.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

Record = tuple[int, int, int, str]  # (step id, kind: 0 prefill / 1 decode, MoE layer of the step, op)


class RecordingTransport(AllToAllTransport):
    """AllToAllTransport that appends a Record per collective; `begin(step_id)` before each step."""

    def __init__(self, rank: int, world_size: int, experts_per_rank: int, capacity: int) -> None:
        super().__init__(rank, world_size, experts_per_rank, capacity)
        self.records: list[Record] = []
        self.step, self.layer, self.kind = -1, 0, 0

    def begin(self, step_id: int) -> None:
        self.step, self.layer = step_id, 0

    def exchange(
        self,
        x: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        experts: LocalExperts,
        decode: bool,
    ) -> torch.Tensor:
        self.kind = int(decode)
        out = super().exchange(x, topk_ids, topk_weights, experts, decode)
        self.layer += 1
        return out

    def _all_to_all(self, op, out, inp, out_splits=None, in_splits=None) -> None:  # type: ignore[no-untyped-def]
        self.records.append((self.step, self.kind, self.layer, op))
        super()._all_to_all(op, out, inp, out_splits, in_splits)

    def drain(self) -> list[Record]:
        records, self.records = self.records, []
        return records


class RecordingWorker(Worker):
    """A Worker that tells its RecordingTransport which step each forward belongs to."""

    def __init__(self, settings, topology, transport: RecordingTransport) -> None:  # type: ignore[no-untyped-def]
        super().__init__(settings, topology, transport=transport)
        self.recording = transport

    def _forward(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
        self.recording.begin(plan.step_id)
        return super()._forward(plan)


class RecordingWorkerActor(WorkerActor):
    """WorkerActor whose rank exchanges through a RecordingTransport (read by collective_log)."""

    def make_worker(self) -> Worker:
        args, topology = self.settings.args, self.topology
        per_rank = len(topology.owned_experts(args.n_routed_experts))
        self.transport = RecordingTransport(
            topology.rank, topology.world_size, per_rank, self.settings.core.max_decode_tokens
        )
        return RecordingWorker(self.settings, topology, self.transport)

    def collective_log(self) -> list[Record]:
        return self.transport.drain()
