"""Executors run one step's plans on the workers: in-process for one rank; Ray actors for N ranks."""

from __future__ import annotations

from typing import Protocol

from nmoe_serve.engine.plan import StepPlan, StepResult
from nmoe_serve.engine.settings import EngineSettings


class Executor(Protocol):
    name: str
    num_ranks: int
    pages_per_rank: int

    def execute(self, plans: list[StepPlan]) -> list[StepResult]:
        """Run plans[r] on rank r; results in rank order."""
        ...

    def shutdown(self) -> None: ...


class InProcessExecutor:
    """One worker in this process (ep_size = 1)."""

    name = "in-process"

    def __init__(self, settings: EngineSettings) -> None:
        from nmoe_serve.topology import Topology
        from nmoe_serve.worker.worker import Worker

        self.num_ranks = 1
        self.worker = Worker(settings, Topology(rank=0, world_size=1))
        self.pages_per_rank = self.worker.num_pages

    def execute(self, plans: list[StepPlan]) -> list[StepResult]:
        return [self.worker.execute(plans[0])]

    def shutdown(self) -> None:
        pass


def make_executor(settings: EngineSettings) -> Executor:
    if settings.ep_size == 1:
        return InProcessExecutor(settings)
    raise NotImplementedError(
        f"parallel.ep_size = {settings.ep_size}: expert parallelism over several ranks runs on Ray worker actors, "
        "which this version does not have yet; use ep_size = 1"
    )
