"""The Coordinator deployment: one replica per EP group, each owning its placement group of workers.

The replica holds a Coordinator (scheduler, step loop, RayExecutor). Its `generate` streams a
request's token updates to the ingress through a Serve handle with stream=True; when the ingress
stops reading (client gone, stop string), Serve cancels the call here and the request is aborted.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from ray import serve

from nmoe_serve.config import ServeConfig
from nmoe_serve.coordinator import Coordinator
from nmoe_serve.engine.scheduler import TokenUpdate
from nmoe_serve.sampling.params import SamplingParams
from nmoe_serve.serve.metrics import EngineMetrics

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """Too many requests are queued in this EP group; the caller should retry later."""


def group_name() -> str:
    """A readable, unique EP group name for this replica: <rank>-<replica id prefix>."""
    context = serve.get_replica_context()
    rank = getattr(context.rank, "rank", context.rank)
    return f"{rank}-{context.replica_id.unique_id[:6]}"


class CoordinatorDeployment:
    """Wrapped by serve.deployment in app.py (so options come from the config)."""

    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.group = group_name()
        self.coordinator = Coordinator(config, group=self.group)
        self.metrics = EngineMetrics(self.coordinator.settings.model_name, self.group)
        self.coordinator.step_listeners.append(self._after_step)
        log.info("coordinator %s ready: %s", self.group, self.coordinator.stats())

    def _after_step(self, kind: str, seconds: float, updates: list[TokenUpdate]) -> None:
        scheduler = self.coordinator.engine.scheduler
        self.metrics.after_step(
            kind,
            seconds,
            len(updates),
            scheduler.num_running,
            scheduler.num_waiting,
            scheduler.kv_usage(),
            scheduler.num_preemptions,
        )

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams
    ) -> AsyncIterator[list[TokenUpdate]]:
        if self.coordinator.engine.scheduler.num_waiting >= self.config.server.max_waiting_requests:
            raise Overloaded(
                f"{self.config.server.max_waiting_requests} requests are already waiting in EP group {self.group}"
            )
        self.metrics.prompt_tokens.inc(len(prompt_token_ids))
        async for updates in self.coordinator.generate(request_id, prompt_token_ids, sampling):
            yield updates

    async def abort(self, request_id: str) -> bool:
        return await self.coordinator.abort(request_id)

    async def stats(self) -> dict[str, float]:
        return self.coordinator.stats()

    async def scheduler_pages(self) -> dict[str, list[int]]:
        """Pages in use and free per rank (for tests and diagnostics)."""
        pools = self.coordinator.engine.scheduler.pools
        return {"used": [p.num_used for p in pools], "free": [p.num_free for p in pools]}

    async def worker_stats(self) -> list[dict[str, float]]:
        executor = self.coordinator.engine.executor
        if hasattr(executor, "call_all"):
            return executor.call_all("stats")  # type: ignore[no-any-return]
        return [executor.worker.stats()]  # type: ignore[attr-defined]

    async def wait_idle(self, timeout_s: float = 60.0) -> None:
        await self.coordinator.wait_idle(timeout_s)

    async def check_health(self) -> None:
        """Serve's health check: fail when the step loop died (the group restarts on its own otherwise)."""
        task = self.coordinator._loop_task
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"the step loop of EP group {self.group} died: {task.exception()}")
