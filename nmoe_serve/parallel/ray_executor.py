"""RayExecutor: one EP group's worker actors in a placement group, stepping together.

Layout: a STRICT_PACK placement group with one bundle per rank (1 GPU each; 1 CPU each on machines
without GPUs), an actor per bundle named `nmoe-worker-<group>-r<k>`, and a torch.distributed group
among them whose rendezvous is a free port on rank 0's node. A step sends every rank its plan and
waits for all results with a bounded wait. A worker that raises, dies or overruns the wait fails
the step: the whole gang is killed (so no process is left waiting in a collective) and started
again before the next step.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from nmoe_serve.engine.executor import StepFailed
from nmoe_serve.engine.plan import StepPlan, StepResult
from nmoe_serve.engine.settings import EngineSettings
from nmoe_serve.topology import Topology

log = logging.getLogger(__name__)


CPU_RANK_SHARE = 0.1


class RayExecutor:
    name = "ray"

    def __init__(self, settings: EngineSettings, group: str = "0", actor_class: type | None = None) -> None:
        """actor_class: the rank implementation (WorkerActor; NullWorkerActor to measure the channel)."""
        import ray

        from nmoe_serve.parallel.worker_actor import WorkerActor

        self.settings, self.group = settings, group
        self.actor_class = actor_class or WorkerActor
        self.num_ranks = settings.ep_size
        parallel = settings.config.parallel
        self.step_timeout_s = parallel.step_timeout_s
        self.start_timeout_s = parallel.start_timeout_s
        if not ray.is_initialized() and os.environ.get("RAY_ADDRESS"):
            ray.init()  # inside a Ray job or with an explicit cluster: join it
        elif not ray.is_initialized():
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local cluster on 127.0.0.1
            resources: dict[str, Any] = {}
            if settings.device == "cpu":
                # logical CPUs: room for a few groups of CPU ranks on a small machine
                resources["num_cpus"] = max(2 * self.num_ranks + 2, 16, os.cpu_count() or 1)
            ray.init(include_dashboard=False, log_to_driver=True, **resources)
        self.actors: list[Any] = []
        self.placement_group: Any = None
        self.restarts = 0
        self.pages_per_rank = self._start()

    def _start(self) -> int:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        started = time.monotonic()
        gpu = self.settings.device == "cuda"
        # CPU ranks take a sliver of a logical CPU each, so 8 of them fit a 2-core laptop's cluster
        bundle = {"GPU": 1.0, "CPU": 1.0} if gpu else {"CPU": CPU_RANK_SHARE}
        self.placement_group = placement_group(
            [dict(bundle) for _ in range(self.num_ranks)],
            strategy="STRICT_PACK",
            name=f"nmoe-pg-{self.group}",
        )
        try:
            ray.get(self.placement_group.ready(), timeout=self.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(self.placement_group)
            raise StepFailed(
                f"the placement group for EP group {self.group} ({self.num_ranks} bundles of {bundle}) was not "
                f"placed within {self.start_timeout_s:.0f} s: the cluster lacks a node with {self.num_ranks} "
                f"{'GPUs' if gpu else 'CPUs'} free (see `ray status`)"
            ) from None
        remote: Any = ray.remote(self.actor_class)
        self.actors = [
            remote.options(
                name=f"nmoe-worker-{self.group}-r{rank}",
                num_cpus=bundle["CPU"],
                num_gpus=1 if gpu else 0,
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, rank),
            ).remote(self.settings, Topology(self.group, rank, self.num_ranks))
            for rank in range(self.num_ranks)
        ]
        try:
            host, port = ray.get(self.actors[0].rendezvous_address.remote(), timeout=self.start_timeout_s)
            pages = ray.get(
                [a.start.remote(host, port, self.step_timeout_s) for a in self.actors],
                timeout=self.start_timeout_s,
            )
        except Exception as e:
            self._kill()
            raise StepFailed(f"EP group {self.group} failed to start: {e}") from e
        log.info(
            "EP group %s: %d ranks up in %.1f s (rendezvous %s:%d), %d KV pages per rank",
            self.group,
            self.num_ranks,
            time.monotonic() - started,
            host,
            port,
            min(pages),
        )
        return min(pages)

    def execute(self, plans: list[StepPlan]) -> list[StepResult]:
        import ray

        refs = [actor.execute.remote(plan) for actor, plan in zip(self.actors, plans, strict=True)]
        try:
            return ray.get(refs, timeout=self.step_timeout_s)
        except Exception as e:
            raise self._failed(plans[0].step_id, e, isinstance(e, ray.exceptions.GetTimeoutError)) from e

    async def execute_async(self, plans: list[StepPlan]) -> list[StepResult]:
        import asyncio

        refs = [actor.execute.remote(plan) for actor, plan in zip(self.actors, plans, strict=True)]
        try:
            return list(await asyncio.wait_for(asyncio.gather(*refs), timeout=self.step_timeout_s))
        except Exception as e:
            raise self._failed(plans[0].step_id, e, isinstance(e, TimeoutError)) from e

    def _failed(self, step_id: int, error: BaseException, timed_out: bool) -> StepFailed:
        reason = (
            f"no result within {self.step_timeout_s:.0f} s"
            if timed_out
            else f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        )
        log.error("EP group %s: step %d failed (%s); restarting the group", self.group, step_id, reason)
        self._kill()
        return StepFailed(f"step {step_id} failed on EP group {self.group}: {reason}")

    def restart(self) -> None:
        """Start a fresh gang (after a failed step); the KV page count must not shrink."""
        self._kill()
        pages = self._start()
        self.restarts += 1
        if pages < self.pages_per_rank:
            raise StepFailed(
                f"restarted group {self.group} has {pages} KV pages per rank, fewer than {self.pages_per_rank}"
            )

    def call_all(self, method: str, *args: Any) -> list[Any]:
        """Call a WorkerActor method on every rank (inventory, collective_log, stats...)."""
        import ray

        return ray.get([getattr(a, method).remote(*args) for a in self.actors], timeout=self.step_timeout_s)

    def _kill(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        names = [f"nmoe-worker-{self.group}-r{rank}" for rank in range(len(self.actors))]
        self.actors = []
        deadline = time.monotonic() + 30
        for name in names:  # the names are free again only once the actors are gone
            while time.monotonic() < deadline:
                try:
                    ray.get_actor(name)
                except ValueError:
                    break
                time.sleep(0.05)
        if self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)
            self.placement_group = None

    def shutdown(self) -> None:
        self._kill()
