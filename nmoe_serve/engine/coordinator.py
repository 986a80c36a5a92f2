"""Coordinator: one EP group's engine core and step loop, serving many requests concurrently.

A plain asyncio class handed its executor, so it runs the same way inside a Serve deployment or
in a test. Callers `generate()` a request and iterate its token updates as steps complete;
leaving the iteration early (a client gone) cancels the request and frees its pages. One task
runs the global steps back to back while there is work: scheduler bookkeeping happens on the
event loop between steps, and the ranks' work is awaited, so requests can arrive and be
cancelled while a step runs. With overlap (engine/core.py) the ranks already compute the next
step while the loop takes the last one's tokens and streams them, so the streams' delivery is off
the ranks' critical path. A failed step ends the group's in-flight requests with the error;
the executor restarts its workers and the loop goes on serving.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from nmoe_serve.engine.core import Completed, CoreSettings, EngineCore
from nmoe_serve.engine.executor import Executor, StepFailed
from nmoe_serve.engine.scheduler import StepOutputs, TokenUpdate
from nmoe_serve.sampling.params import SamplingParams

log = logging.getLogger(__name__)


class RequestFailed(RuntimeError):
    """The engine failed while running this request (a worker died or raised); it may be retried.

    Its message is for the request's client: it names that request only. The cause (which rank,
    which error, which other requests failed with it) is in the coordinator's log."""


@dataclass(frozen=True)
class StepReport:
    """What one completed step did, for metrics (Coordinator.step_listeners)."""

    kind: str  # prefill | decode
    seconds: float  # on the ranks: plans sent to results back
    tokens: int  # sampled
    running: int
    waiting: int
    kv_usage: float  # fraction of the group's KV pages in use
    preemptions: int  # since the start
    period_s: float = 0.0  # since the later of its launch and the last step's results (Completed)
    busiest: tuple[int, int, int, int] = (0, 0, 0, 0)  # StepPlan.work() of its busiest rank
    cache_queries: int = 0  # prompt tokens looked up in the prefix cache, since the start
    cache_hits: int = 0  # of those, tokens found cached
    spec_drafts: int = 0  # speculative decoding, since the start: sequence-steps verified ...
    spec_draft_tokens: int = 0  # ... draft tokens they verified ...
    spec_accepted_tokens: int = 0  # ... and of those, accepted


class Coordinator:
    def __init__(self, settings: CoreSettings, executor: Executor, group: str = "0") -> None:
        self.group = group
        self.engine = EngineCore(settings, executor)
        self.steps = 0
        self.step_listeners: list[Callable[[StepReport], None]] = []
        self._streams: dict[str, asyncio.Queue[list[TokenUpdate] | BaseException]] = {}
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._stepping = False

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams
    ) -> AsyncIterator[list[TokenUpdate]]:
        """Token updates of one request, a list per step, the last one carrying its finish_reason.

        Raises RequestRejected before the first update for a request that can never run, and
        RequestFailed if the engine fails while running it."""
        wake = self._ensure_loop()
        self.engine.add_request(request_id, prompt_token_ids, sampling)
        queue: asyncio.Queue[list[TokenUpdate] | BaseException] = asyncio.Queue()
        self._streams[request_id] = queue
        wake.set()
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item[-1].finish_reason is not None
                yield item
        finally:
            self._streams.pop(request_id, None)
            if not finished and self.engine.abort(request_id):
                log.debug("request %s cancelled by its caller", request_id)
                wake.set()

    async def abort(self, request_id: str) -> bool:
        aborted = self.engine.abort(request_id)
        if aborted and self._wake is not None:
            self._wake.set()
        return aborted

    async def wait_idle(self, timeout_s: float = 60.0) -> None:
        """Return once no request is left and no step is running (every release has reached the ranks)."""
        self._ensure_loop().set()
        deadline = time.monotonic() + timeout_s
        while self.engine.has_work() or self._stepping:
            if time.monotonic() > deadline:
                raise TimeoutError(f"coordinator {self.group} still busy after {timeout_s:.0f} s")
            await asyncio.sleep(0.005)

    def stats(self) -> dict[str, float]:
        scheduler = self.engine.scheduler
        return {
            "running": float(scheduler.num_running),
            "waiting": float(scheduler.num_waiting),
            "kv_usage": scheduler.kv_usage(),
            "steps": float(self.steps),
            "preemptions": float(scheduler.num_preemptions),
            "restarts": float(self.engine.executor.restarts),
            "prefix_cache_queries": float(scheduler.cache_queries),
            "prefix_cache_hits": float(scheduler.cache_hits),
            "prefix_cache_pages": float(sum(p.num_cached for p in scheduler.pools)),
        }

    def pages(self) -> dict[str, list[int]]:
        """KV pages in use, free (evictable cached pages included) and cached on each rank, as the
        scheduler accounts them."""
        pools = self.engine.scheduler.pools
        return {
            "used": [p.num_used for p in pools],
            "free": [p.num_free for p in pools],
            "cached": [p.num_cached for p in pools],
            "admitted": list(self.engine.scheduler.admitted_by_rank),
        }

    def reset_prefix_cache(self) -> int:
        """Forget every cached page of the group (requests running keep theirs); how many were dropped."""
        return self.engine.reset_prefix_cache()

    def check_health(self) -> None:
        """Raise if the step loop died (a failed step does not kill it: the group restarts itself)."""
        task = self._loop_task
        if task is not None and task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError(f"the step loop of EP group {self.group} died: {task.exception()}")

    def _ensure_loop(self) -> asyncio.Event:
        if self._wake is None or self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            # A fresh context: the loop must not inherit the request that happened to start it, or
            # cancelling that request (Ray cancels a request's child tasks) would cancel the steps.
            self._loop_task = asyncio.get_running_loop().create_task(
                self._run(self._wake), name=f"nmoe-steps-{self.group}", context=contextvars.Context()
            )
        return self._wake

    async def _run(self, wake: asyncio.Event) -> None:
        while True:
            if not self.engine.has_work():
                wake.clear()
                await wake.wait()
                continue
            try:
                self._stepping = True
                completed = await self._step()
            except StepFailed as e:  # logged with its cause by the executor and the engine core
                for request_id in e.failed_request_ids:
                    self._end(
                        request_id, RequestFailed(f"request {request_id} failed: a rank of the engine failed")
                    )
                continue
            except Exception:  # a bug in the engine itself: fail everyone rather than hang them
                log.exception("coordinator step loop failed; ending every request")
                self.engine.abandon()
                for request_id in list(self._streams):
                    self._end(
                        request_id, RequestFailed(f"request {request_id} failed: an internal engine error")
                    )
                continue
            finally:
                self._stepping = False
            if completed is not None:
                self._deliver(completed.outputs)
                self._report(completed)
            await asyncio.sleep(0)  # let arrivals and cancellations in between steps

    async def _step(self) -> Completed | None:
        """One global step: the engine core's body, with the ranks' work awaited."""
        engine = self.engine
        plans = engine.schedule()
        if not engine.needs_dispatch(plans):
            return None
        try:
            results = await engine.dispatch_async(plans)
        except StepFailed as e:
            raise engine.fail(e) from e
        except asyncio.CancelledError:  # the loop is shutting down mid-step: its results are lost
            engine.abandon()
            raise
        return None if results is None else engine.complete(results)

    def _deliver(self, updates: StepOutputs) -> None:
        by_request: dict[str, list[TokenUpdate]] = defaultdict(list)
        for update in updates:
            by_request[update.request_id].append(update)
        for request_id, items in by_request.items():
            queue = self._streams.get(request_id)
            if queue is not None:
                queue.put_nowait(items)

    def _end(self, request_id: str, error: RequestFailed) -> None:
        queue = self._streams.get(request_id)
        if queue is not None:
            queue.put_nowait(error)

    def _report(self, completed: Completed) -> None:
        self.steps += 1
        if not self.step_listeners:
            return
        scheduler = self.engine.scheduler
        report = StepReport(
            completed.kind.name.lower(),
            completed.seconds,
            len(completed.outputs),
            scheduler.num_running,
            scheduler.num_waiting,
            scheduler.kv_usage(),
            scheduler.num_preemptions,
            completed.period_s,
            completed.busiest,
            scheduler.cache_queries,
            scheduler.cache_hits,
            scheduler.num_verified_seqs,
            scheduler.num_drafted,
            scheduler.num_accepted,
        )
        for listener in self.step_listeners:
            listener(report)

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self.engine.shutdown()
