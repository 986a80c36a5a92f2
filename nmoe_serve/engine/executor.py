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

    def restart(self) -> None:
        """Replace the workers after a failed step (all their state is gone)."""
        ...

    def worker_stats(self) -> list[dict[str, float]]:
        """Each rank's own counters (KV pages, requests it holds), in rank order."""
        ...

    def shutdown(self) -> None: ...
