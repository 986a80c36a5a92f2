"""The Coordinator deployment: one replica per EP group, its workers in the replica's own bundles.

The replica declares its EP group's resources to Serve (`deployment_options`): bundle 0 for
itself, bundles 1..N (one GPU each) for the N worker actors, in one STRICT_PACK placement group,
so Serve places, restarts and removes the replica and its workers as one gang. The replica holds
a Coordinator (scheduler, step loop, RayExecutor over those bundles; with ep_size 1 the rank
runs inside the replica, which then holds the GPU itself). Its `generate` streams a request's
token updates to the ingress through a Serve handle with stream=True; when the ingress stops
reading (client gone, stop string), Serve cancels the call here and the request is aborted.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from nmoe_serve.config import ServerSection
from nmoe_serve.engine.coordinator import Coordinator, StepReport
from nmoe_serve.engine.scheduler import TokenUpdate
from nmoe_serve.parallel.executor import Bundles, make_executor, rank_bundle
from nmoe_serve.sampling.params import SamplingParams
from nmoe_serve.serve.group_router import PrefixAffinityRouter
from nmoe_serve.serve.metrics import EngineMetrics
from nmoe_serve.serve.protocol import Overloaded
from nmoe_serve.settings import EngineSettings

log = logging.getLogger(__name__)

REPLICA_CPUS = 0.5  # the replica mostly waits on its ranks
STEP_LOG = 20_000  # recent steps kept for recent_steps()


def group_name() -> str:
    """A readable, unique EP group name for this replica: <rank>-<replica id prefix>."""
    context = serve.get_replica_context()
    rank = getattr(context.rank, "rank", context.rank)
    return f"{rank}-{context.replica_id.unique_id[:6]}"


class CoordinatorDeployment:
    """Wrapped by serve.deployment in app.py with `deployment_options`."""

    @staticmethod
    def deployment_options(settings: EngineSettings, server: ServerSection) -> dict[str, Any]:
        """Serve options of the deployment: one replica per EP group and the group's bundles."""
        gpu = settings.device == "cuda"
        if settings.ep_size == 1:  # the one rank runs in the replica
            replica = {"CPU": 1.0, "GPU": 1.0} if gpu else {"CPU": REPLICA_CPUS}
            bundles = [replica]
        else:
            replica = {"CPU": REPLICA_CPUS}
            bundles = [replica] + [rank_bundle(settings) for _ in range(settings.ep_size)]
        return {
            "name": "Coordinator",
            "num_replicas": server.ep_groups,
            "request_router_config": RequestRouterConfig.model_validate(
                {
                    "request_router_class": f"{PrefixAffinityRouter.__module__}:{PrefixAffinityRouter.__name__}",
                    "request_router_kwargs": {
                        "affinity_tokens": server.group_affinity_tokens,
                        "max_imbalance": server.group_max_imbalance,
                    },
                }
            ),
            "ray_actor_options": {"num_cpus": replica["CPU"], "num_gpus": replica.get("GPU", 0.0)},
            "placement_group_bundles": bundles,
            "placement_group_strategy": "STRICT_PACK",
            "max_ongoing_requests": 100_000,
            "health_check_period_s": 5,
            "health_check_timeout_s": 60,
            "graceful_shutdown_timeout_s": 20,
            # one log line per HTTP request is the ingress's; its engine requests log at debug
            "logging_config": {"enable_access_log": False},
        }

    def __init__(self, settings: EngineSettings, server: ServerSection) -> None:
        import ray

        self.max_waiting = server.max_waiting_requests
        self.group = group_name()
        bundles = None
        if settings.ep_size > 1:
            bundles = Bundles(ray.util.get_current_placement_group(), first=1)
        executor = make_executor(settings, self.group, bundles=bundles)
        self.coordinator = Coordinator(settings.core, executor, group=self.group)
        self.metrics = EngineMetrics(settings.model_name, self.group)
        self.coordinator.step_listeners.append(self.metrics.after_step)
        self.step_log: deque[StepReport] = deque(maxlen=STEP_LOG)
        self.coordinator.step_listeners.append(self.step_log.append)
        log.info("coordinator %s ready: %s", self.group, self.coordinator.stats())

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams
    ) -> AsyncIterator[list[TokenUpdate]]:
        if self.coordinator.engine.scheduler.num_waiting >= self.max_waiting:
            raise Overloaded(f"{self.max_waiting} requests are already waiting in EP group {self.group}")
        self.metrics.prompt_tokens.inc(len(prompt_token_ids))
        async for updates in self.coordinator.generate(request_id, prompt_token_ids, sampling):
            yield updates

    async def abort(self, request_id: str) -> bool:
        return await self.coordinator.abort(request_id)

    async def stats(self) -> dict[str, float]:
        return self.coordinator.stats()

    async def scheduler_pages(self) -> dict[str, list[int]]:
        """Pages in use, free and cached per rank, and first admissions per rank (tests, benchmarks)."""
        return self.coordinator.pages()

    async def reset_prefix_cache(self, group_index: int = 0) -> dict[str, Any]:
        """Forget this group's prefix cache. `group_index` names the group for the request router
        (serve/group_router.py sends the call to that replica); returns {group, dropped_pages}."""
        return {"group": self.group, "dropped_pages": self.coordinator.reset_prefix_cache()}

    async def recent_steps(self, clear: bool = False) -> list[dict[str, Any]]:
        """The last steps as served: kind, busiest rank's work (seqs, tokens, context tokens,
        attention pairs), period and launch-to-results seconds (bench/sim_check.py fits step costs
        to them); `clear` empties the log after reading."""
        steps = [
            {
                "kind": r.kind,
                "seqs": r.busiest[0],
                "tokens": r.busiest[1],
                "context_tokens": r.busiest[2],
                "attention_pairs": r.busiest[3],
                "period_s": r.period_s,
                "seconds": r.seconds,
            }
            for r in self.step_log
        ]
        if clear:
            self.step_log.clear()
        return steps

    async def worker_stats(self) -> list[dict[str, float]]:
        return self.coordinator.engine.executor.worker_stats()

    async def wait_idle(self, timeout_s: float = 60.0) -> None:
        await self.coordinator.wait_idle(timeout_s)

    async def check_health(self) -> None:
        """Serve's health check: fail when the step loop died (the group restarts on its own
        otherwise). It also refreshes the gauges, so an idle group reads 0, not nothing."""
        self.coordinator.check_health()
        self.metrics.idle(self.coordinator.stats())
