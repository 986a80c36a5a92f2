"""Executors run one step's plans on the workers: in-process for one rank; Ray actors for N ranks."""

from __future__ import annotations

import asyncio
import threading
from typing import Protocol

from nmoe_serve.engine.plan import StepPlan, StepResult
from nmoe_serve.engine.settings import EngineSettings


class StepFailed(RuntimeError):
    """A step could not complete on every rank; the executor has restarted (or is restarting) its workers."""

    def __init__(self, message: str, failed_request_ids: list[str] | None = None) -> None:
        super().__init__(message)
        self.failed_request_ids = failed_request_ids or []


class Executor(Protocol):
    name: str
    num_ranks: int
    pages_per_rank: int

    def execute(self, plans: list[StepPlan]) -> list[StepResult]:
        """Run plans[r] on rank r; results in rank order."""
        ...

    async def execute_async(self, plans: list[StepPlan]) -> list[StepResult]:
        """The same, awaited: the event loop stays free while the ranks compute."""
        ...

    def restart(self) -> None:
        """Replace the workers after a failed step (all their state is gone)."""
        ...

    def shutdown(self) -> None: ...


class InProcessExecutor:
    """One worker in this process (ep_size = 1)."""

    name = "in-process"

    def __init__(self, settings: EngineSettings) -> None:
        from nmoe_serve.topology import Topology
        from nmoe_serve.worker.worker import Worker

        self.num_ranks = 1
        self.settings = settings
        self.worker = Worker(settings, Topology(rank=0, world_size=1))
        self.pages_per_rank = self.worker.num_pages
        self._lock = threading.Lock()  # one step at a time, even if an abandoned one is still running

    def execute(self, plans: list[StepPlan]) -> list[StepResult]:
        with self._lock:
            try:
                return [self.worker.execute(plans[0])]
            except Exception as e:
                raise StepFailed(f"step {plans[0].step_id} failed: {type(e).__name__}: {e}") from e

    async def execute_async(self, plans: list[StepPlan]) -> list[StepResult]:
        return await asyncio.to_thread(self.execute, plans)

    def restart(self) -> None:
        from nmoe_serve.topology import Topology
        from nmoe_serve.worker.worker import Worker

        self.worker = Worker(self.settings, Topology(rank=0, world_size=1))

    def shutdown(self) -> None:
        pass


def make_executor(settings: EngineSettings, group: str = "0") -> Executor:
    """In-process for ep_size 1; Ray worker actors in a placement group otherwise."""
    if settings.ep_size == 1:
        return InProcessExecutor(settings)
    from nmoe_serve.parallel.ray_executor import RayExecutor

    return RayExecutor(settings, group)
