"""Coordinator: one EP group's scheduler and step loop, serving many requests concurrently.

A plain asyncio class, so it runs the same way inside a Ray actor (`nmoe-coordinator-<group>`),
inside a Serve deployment, or in a test. Callers `generate()` a request and iterate its token
updates as steps complete; leaving the iteration early (a client gone) cancels the request and
frees its pages. One task runs the global steps back to back while there is work: scheduler
bookkeeping happens on the event loop between steps, and the ranks' work is awaited, so requests
can arrive and be cancelled while a step runs. A failed step ends the group's in-flight requests
with the error; the executor restarts its workers and the loop goes on serving.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from nmoe_serve.config import ServeConfig
from nmoe_serve.engine.core import EngineCore
from nmoe_serve.engine.executor import StepFailed, make_executor
from nmoe_serve.engine.scheduler import TokenUpdate
from nmoe_serve.engine.settings import EngineSettings, resolve_settings
from nmoe_serve.sampling.params import SamplingParams

log = logging.getLogger(__name__)


class RequestFailed(RuntimeError):
    """The engine failed while running this request (a worker died or raised); it may be retried."""


@dataclass
class StepTimings:
    """Where the coordinator's time goes, per step (seconds)."""

    steps: int = 0
    bookkeeping_s: list[float] = field(default_factory=list)  # schedule + update + fan-out, on the loop
    execute_s: list[float] = field(default_factory=list)  # waiting for the ranks (round trip)
    max_kept: int = 10_000

    def add(self, bookkeeping: float, execute: float) -> None:
        self.steps += 1
        if len(self.bookkeeping_s) >= self.max_kept:
            del self.bookkeeping_s[: self.max_kept // 2], self.execute_s[: self.max_kept // 2]
        self.bookkeeping_s.append(bookkeeping)
        self.execute_s.append(execute)


class Coordinator:
    def __init__(self, config: ServeConfig | EngineSettings, group: str = "0") -> None:
        self.settings = config if isinstance(config, EngineSettings) else resolve_settings(config)
        self.group = group
        self.engine = EngineCore(self.settings, make_executor(self.settings, group))
        self.timings = StepTimings()
        # called after every completed step with (step kind, seconds on the ranks, the step's updates)
        self.step_listeners: list[Callable[[str, float, list[TokenUpdate]], None]] = []
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
        self._ensure_loop()
        assert self._wake is not None
        self.engine.add_request(request_id, prompt_token_ids, sampling)
        queue: asyncio.Queue[list[TokenUpdate] | BaseException] = asyncio.Queue()
        self._streams[request_id] = queue
        self._wake.set()
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
                log.info("request %s cancelled by its caller", request_id)
                self._wake.set()

    async def abort(self, request_id: str) -> bool:
        aborted = self.engine.abort(request_id)
        if aborted and self._wake is not None:
            self._wake.set()
        return aborted

    async def wait_idle(self, timeout_s: float = 60.0) -> None:
        """Return once no request is left and no step is running (every release has reached the ranks)."""
        self._ensure_loop()
        assert self._wake is not None
        self._wake.set()
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
            "steps": float(self.timings.steps),
            "preemptions": float(scheduler.num_preemptions),
            "restarts": float(getattr(self.engine.executor, "restarts", 0)),
        }

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            # A fresh context: the loop must not inherit the request that happened to start it, or
            # cancelling that request (Ray cancels a request's child tasks) would cancel the steps.
            self._loop_task = asyncio.get_running_loop().create_task(
                self._run(), name=f"nmoe-steps-{self.group}", context=contextvars.Context()
            )

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            if not self.engine.has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            started = time.perf_counter()
            self._stepping = True
            try:
                updates = await self.engine.step_async()
            except StepFailed as e:
                for request_id in e.failed_request_ids:
                    queue = self._streams.get(request_id)
                    if queue is not None:
                        queue.put_nowait(RequestFailed(f"request {request_id} failed: {e}"))
                continue
            except Exception as e:  # a bug in the engine itself: fail everyone rather than hang them
                log.exception("coordinator step loop failed; ending every request")
                self.engine.scheduler.fail_in_flight(workers_lost=False)
                for queue in self._streams.values():
                    queue.put_nowait(RequestFailed(f"engine error: {type(e).__name__}: {e}"))
                continue
            finally:
                self._stepping = False
            execute = self.engine.last_step_seconds
            by_request: dict[str, list[TokenUpdate]] = defaultdict(list)
            for update in updates:
                by_request[update.request_id].append(update)
            for request_id, items in by_request.items():
                queue = self._streams.get(request_id)
                if queue is not None:
                    queue.put_nowait(items)
            self.timings.add(time.perf_counter() - started - execute, execute)
            for listener in self.step_listeners:
                listener(self.engine.last_step_kind, execute, updates)
            await asyncio.sleep(0)  # let arrivals and cancellations in between steps

    async def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self.engine.shutdown()


def launch_coordinator_actor(config: ServeConfig, group: str = "0"):  # type: ignore[no-untyped-def]
    """Start the group's coordinator as a named Ray actor (`nmoe-coordinator-<group>`).

    Its `generate` is a streaming generator: iterate
    `handle.generate.options(num_returns="streaming").remote(request_id, ids, sampling)`."""
    import ray

    actor = ray.remote(Coordinator).options(
        name=f"nmoe-coordinator-{group}", num_cpus=0, max_concurrency=10_000, max_restarts=0
    )
    return actor.remote(config, group)
