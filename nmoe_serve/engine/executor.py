"""What the engine asks of the ranks: the Executor protocol, and StepFailed.

The engine never builds ranks; it is handed an executor (nmoe_serve.parallel.executor makes
them: one worker in process, or Ray worker actors).
"""

from __future__ import annotations

from typing import Protocol

from nmoe_serve.engine.plan import StepPlan, StepResult


class StepFailed(RuntimeError):
    """A step could not complete on every rank; the executor has restarted (or is restarting) its workers."""

    def __init__(self, message: str, failed_request_ids: list[str] | None = None) -> None:
        super().__init__(message)
        self.failed_request_ids = failed_request_ids or []


class Executor(Protocol):
    name: str
    num_ranks: int
    pages_per_rank: int  # KV pages of each rank (the smallest, where they differ)
    restarts: int  # times the workers were replaced after a failed step

    def execute(self, plans: list[StepPlan]) -> list[StepResult]:
        """Run plans[r] on rank r; results in rank order. Raises StepFailed (bounded wait)."""
        ...

    async def execute_async(self, plans: list[StepPlan]) -> list[StepResult]:
        """The same, awaited: the event loop stays free while the ranks compute."""
        ...

    def launch(self, plans: list[StepPlan]) -> list[StepResult] | None:
        """Start plans[r] on rank r and return, in rank order, the results of the step launched
        before them (None when no step was pending): the ranks compute this step while the caller
        plans the next (overlap). Raises StepFailed (bounded wait)."""
        ...

    async def launch_async(self, plans: list[StepPlan]) -> list[StepResult] | None:
        """The same, awaited."""
        ...

    def flush(self) -> list[StepResult] | None:
        """The results of the last launched step, in rank order (None when none is pending)."""
        ...

    async def flush_async(self) -> list[StepResult] | None:
        """The same, awaited."""
        ...

    def restart(self) -> None:
        """Replace the workers after a failed step (all their state is gone)."""
        ...

    def worker_stats(self) -> list[dict[str, float]]:
        """Each rank's own counters (KV pages, requests it holds), in rank order."""
        ...

    def shutdown(self) -> None: ...
