"""The executors that run one step's plans on the ranks: one worker in this process, or one Ray
actor per rank in a placement group. `make_executor` picks by ep_size.

RayExecutor's layout: a STRICT_PACK placement group with one bundle per rank (1 GPU each; a
sliver of a CPU each on machines without GPUs), an actor per bundle named
`nmoe-worker-<group>-r<k>`, and a torch.distributed group among them whose rendezvous is a free
port on rank 0's node. Inside a Serve replica that declared the group's bundles
(serve/coordinator_deployment.py), the workers take bundles 1..N of the replica's own placement
group, so Serve places and removes the replica and its workers as one gang; elsewhere (the
offline LLM, tests, benchmarks) the executor makes its own placement group.

The ranks' code (torch) is imported where a rank is built, so a Coordinator replica of a group of
Ray workers runs without torch. A step sends every rank its plan and waits for all results with a bounded wait. A worker that
raises, dies or overruns the wait fails the step: every actor of the gang is killed (so no
process is left waiting in a collective) and new ones are started before the next step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from nmoe_serve.engine.executor import Executor, StepFailed
from nmoe_serve.engine.plan import StepPlan, StepResult
from nmoe_serve.settings import EngineSettings
from nmoe_serve.topology import Topology

log = logging.getLogger(__name__)

CPU_RANK_SHARE = 0.1  # logical CPUs a CPU rank's bundle takes: 8 ranks fit a 2-core laptop


def rank_bundle(settings: EngineSettings) -> dict[str, float]:
    """The placement-group bundle of one rank."""
    return {"GPU": 1.0, "CPU": 1.0} if settings.device == "cuda" else {"CPU": CPU_RANK_SHARE}


class InProcessExecutor:
    """One worker in this process (ep_size = 1)."""

    name = "in-process"

    def __init__(self, settings: EngineSettings) -> None:
        from nmoe_serve.worker.worker import Worker

        self.num_ranks = 1
        self.settings = settings
        self.restarts = 0
        self.make_worker = lambda: Worker(settings, Topology(rank=0, world_size=1))
        self.worker = self.make_worker()
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

    def launch(self, plans: list[StepPlan]) -> list[StepResult] | None:
        with self._lock:
            try:
                result = self.worker.launch(plans[0])
            except Exception as e:
                raise StepFailed(f"step {plans[0].step_id} failed: {type(e).__name__}: {e}") from e
        return None if result is None else [result]

    async def launch_async(self, plans: list[StepPlan]) -> list[StepResult] | None:
        return await asyncio.to_thread(self.launch, plans)

    def flush(self) -> list[StepResult] | None:
        with self._lock:
            try:
                result = self.worker.flush()
            except Exception as e:
                raise StepFailed(f"the last launched step failed: {type(e).__name__}: {e}") from e
        return None if result is None else [result]

    async def flush_async(self) -> list[StepResult] | None:
        return await asyncio.to_thread(self.flush)

    def idle_times(self) -> list[list[tuple[int, int, int, float]]]:
        """Each rank's device idle time before its recent steps (Worker.idle_times)."""
        return [self.worker.idle_times()]

    def restart(self) -> None:
        self.worker.close()
        self.worker = self.make_worker()
        self.restarts += 1

    def worker_stats(self) -> list[dict[str, float]]:
        return [self.worker.stats()]

    def shutdown(self) -> None:
        self.worker.close()


@dataclass(frozen=True)
class Bundles:
    """Where a RayExecutor's ranks go: bundles first..first+N-1 of `placement_group`."""

    placement_group: Any
    first: int


class RayExecutor:
    name = "ray"

    def __init__(
        self,
        settings: EngineSettings,
        group: str = "0",
        actor_class: type | None = None,
        bundles: Bundles | None = None,
    ) -> None:
        """actor_class: the rank implementation (a WorkerActor, or a subclass: tests record the
        collectives, bench/step_overhead.py measures the channel with one that runs no model).
        bundles: the replica's own placement group (Serve); None makes one for this group."""
        import ray

        if actor_class is None:
            from nmoe_serve.worker.actor import WorkerActor

            actor_class = WorkerActor
        self.settings, self.group, self.actor_class = settings, group, actor_class
        self.num_ranks = settings.ep_size
        self.step_timeout_s, self.start_timeout_s = settings.step_timeout_s, settings.start_timeout_s
        if not ray.is_initialized() and os.environ.get("RAY_ADDRESS"):
            ray.init()  # inside a Ray job or with an explicit cluster: join it
        elif not ray.is_initialized():
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local cluster on 127.0.0.1
            resources: dict[str, Any] = {}
            if settings.device == "cpu":
                # logical CPUs: room for a few groups of CPU ranks on a small machine
                resources["num_cpus"] = max(2 * self.num_ranks + 2, 16, os.cpu_count() or 1)
            ray.init(include_dashboard=False, log_to_driver=True, **resources)
        self.given_bundles = bundles
        self.bundles: Bundles | None = None
        self.actors: list[Any] = []
        self.restarts = 0
        self.pages_per_rank = self._start()

    def _place(self) -> Bundles:
        """The bundles the ranks take: the given ones, or a placement group made (and waited) here."""
        import ray
        from ray.util.placement_group import placement_group

        if self.given_bundles is not None:
            return self.given_bundles
        bundle = rank_bundle(self.settings)
        pg = placement_group(
            [dict(bundle) for _ in range(self.num_ranks)],
            strategy="STRICT_PACK",
            name=f"nmoe-pg-{self.group}",
        )
        try:
            ray.get(pg.ready(), timeout=self.start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(pg)
            raise StepFailed(
                f"the placement group for EP group {self.group} ({self.num_ranks} bundles of {bundle}) was not "
                f"placed within {self.start_timeout_s:.0f} s: the cluster lacks a node with {self.num_ranks} "
                f"{'GPUs' if 'GPU' in bundle else 'CPUs'} free (see `ray status`)"
            ) from None
        return Bundles(pg, 0)

    def _start(self) -> int:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        started = time.monotonic()
        self.bundles = self._place()
        bundle = rank_bundle(self.settings)
        remote: Any = ray.remote(self.actor_class)
        self.actors = [
            remote.options(
                name=f"nmoe-worker-{self.group}-r{rank}",
                num_cpus=bundle["CPU"],
                num_gpus=bundle.get("GPU", 0),
                max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.bundles.placement_group, self.bundles.first + rank
                ),
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
            raise StepFailed(f"EP group {self.group} failed to start: {_first_line(e)}") from e
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
        refs = [actor.execute.remote(plan) for actor, plan in zip(self.actors, plans, strict=True)]
        try:
            return list(await asyncio.wait_for(asyncio.gather(*refs), timeout=self.step_timeout_s))
        except Exception as e:
            raise self._failed(plans[0].step_id, e, isinstance(e, TimeoutError)) from e

    def launch(self, plans: list[StepPlan]) -> list[StepResult] | None:
        import ray

        refs = [actor.launch.remote(plan) for actor, plan in zip(self.actors, plans, strict=True)]
        try:
            return _one_step(ray.get(refs, timeout=self.step_timeout_s))
        except Exception as e:
            raise self._failed(plans[0].step_id, e, isinstance(e, ray.exceptions.GetTimeoutError)) from e

    async def launch_async(self, plans: list[StepPlan]) -> list[StepResult] | None:
        refs = [actor.launch.remote(plan) for actor, plan in zip(self.actors, plans, strict=True)]
        try:
            results = await asyncio.wait_for(asyncio.gather(*refs), timeout=self.step_timeout_s)
            return _one_step(list(results))
        except Exception as e:
            raise self._failed(plans[0].step_id, e, isinstance(e, TimeoutError)) from e

    def flush(self) -> list[StepResult] | None:
        import ray

        refs = [actor.flush.remote() for actor in self.actors]
        try:
            return _one_step(ray.get(refs, timeout=self.step_timeout_s))
        except Exception as e:
            raise self._failed(-1, e, isinstance(e, ray.exceptions.GetTimeoutError)) from e

    async def flush_async(self) -> list[StepResult] | None:
        refs = [actor.flush.remote() for actor in self.actors]
        try:
            return _one_step(list(await asyncio.wait_for(asyncio.gather(*refs), timeout=self.step_timeout_s)))
        except Exception as e:
            raise self._failed(-1, e, isinstance(e, TimeoutError)) from e

    def idle_times(self) -> list[list[tuple[int, int, int, float]]]:
        """Each rank's device idle time before its recent steps (Worker.idle_times)."""
        return self.call_all("idle_times")

    def _failed(self, step_id: int, error: BaseException, timed_out: bool) -> StepFailed:
        reason = f"no result within {self.step_timeout_s:.0f} s" if timed_out else _first_line(error)
        step = f"step {step_id}" if step_id >= 0 else "the last launched step"
        log.error("EP group %s: %s failed (%s); restarting the group", self.group, step, reason)
        self._kill()
        return StepFailed(f"{step} failed on EP group {self.group}: {reason}")

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
        """Call a method of the actor class on every rank (inventory, stats...), in rank order."""
        import ray

        return ray.get([getattr(a, method).remote(*args) for a in self.actors], timeout=self.step_timeout_s)

    def worker_stats(self) -> list[dict[str, float]]:
        return self.call_all("stats")

    def _kill(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        names = [f"nmoe-worker-{self.group}-r{rank}" for rank in range(len(self.actors))]
        self.actors = []
        deadline = time.monotonic() + 30
        for name in names:  # the names (and the bundles) are free again only once the actors are gone
            while time.monotonic() < deadline:
                try:
                    ray.get_actor(name)
                except ValueError:
                    break
                time.sleep(0.05)
        if self.bundles is not None and self.given_bundles is None:
            ray.util.remove_placement_group(self.bundles.placement_group)
        self.bundles = None

    def shutdown(self) -> None:
        self._kill()


def _one_step(results: list[StepResult | None]) -> list[StepResult] | None:
    """The ranks' results of one launched step: all of them, or None from every rank."""
    if all(r is None for r in results):
        return None
    if any(r is None for r in results) or len({r.step_id for r in results if r is not None}) != 1:
        steps = [None if r is None else r.step_id for r in results]
        raise RuntimeError(f"the ranks returned the results of different steps: {steps}")
    return [r for r in results if r is not None]


def _first_line(error: BaseException) -> str:
    """The exception's type and first line: Ray's remote tracebacks stay in the log."""
    text = str(error)
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def make_executor(settings: EngineSettings, group: str = "0", bundles: Bundles | None = None) -> Executor:
    """In-process for ep_size 1; Ray worker actors in a placement group otherwise."""
    if settings.ep_size == 1:
        return InProcessExecutor(settings)
    return RayExecutor(settings, group, bundles=bundles)
