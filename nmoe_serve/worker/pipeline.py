"""StepPipeline: a rank's steps on a thread of their own, each step's results returned one call late.

`launch(plan)` hands the plan to the step thread and returns the results of the step launched
before it (None for the first), so the caller (an actor call from the coordinator) gets step n's
tokens back while step n+1 computes, and plans step n+2 meanwhile: in steady decode the rank never
waits for the coordinator as long as the coordinator's turn (results back, bookkeeping, the next
plan out) is shorter than a step. `flush()` returns the last launched step's results.

Per plan the thread runs, in this order:

    admit(plan)              releases and new requests (before any result is published, so a
                             caller that reads the rank's state after launch() sees them)
    forward(plan)            the model's forward; on a device with a queue (CUDA) only enqueued
    publish(resolve(prev))   the previous step's results: on CUDA after the forward is enqueued,
                             so the device goes from step n to n+1 without a gap; on the CPU, where
                             the forward computes in place, before it, so the results are not held
                             back by this step's compute
    sample(plan, forward)    sampling, its tokens kept on the device for the next step

A step that raises fails this call or the next; afterwards every call raises (the executor then
restarts the whole gang). Waits are bounded by `timeout_s`.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from nmoe_serve.engine.plan import StepPlan, StepResult

F = TypeVar("F")  # what forward() hands to sample()
P = TypeVar("P")  # a launched step, as resolve() takes it

_FLUSH, _CLOSE = object(), object()


class StepPipeline(Generic[F, P]):
    def __init__(
        self,
        admit: Callable[[StepPlan], None],
        forward: Callable[[StepPlan], F],
        sample: Callable[[StepPlan, F], P],
        resolve: Callable[[P], StepResult],
        forward_is_queued: bool,
        timeout_s: float,
        name: str,
        context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    ) -> None:
        self._admit, self._forward, self._sample, self._resolve = admit, forward, sample, resolve
        self._queued, self._timeout_s, self._context = forward_is_queued, timeout_s, context
        self._plans: queue.Queue[Any] = queue.Queue()
        self._results: queue.Queue[StepResult | BaseException | None] = queue.Queue()
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def launch(self, plan: StepPlan) -> StepResult | None:
        """Start `plan`; return the results of the step launched before it (None if none)."""
        self._plans.put(plan)
        return self._take(f"step {plan.step_id - 1} (before step {plan.step_id})")

    def flush(self) -> StepResult | None:
        """The results of the last launched step (None if every step's results were returned)."""
        self._plans.put(_FLUSH)
        return self._take("the last launched step")

    def close(self) -> None:
        self._plans.put(_CLOSE)
        self._thread.join(timeout=self._timeout_s)

    def _take(self, what: str) -> StepResult | None:
        try:
            item = self._results.get(timeout=self._timeout_s)
        except queue.Empty:
            raise TimeoutError(
                f"{self._thread.name}: no result for {what} within {self._timeout_s:g} s (parallel.step_timeout_s)"
            ) from None
        if isinstance(item, BaseException):
            raise RuntimeError(f"{self._thread.name}: a step failed: {type(item).__name__}: {item}") from item
        return item

    def _run(self) -> None:
        pending: P | None = None
        with self._context():
            for item in self._items():
                if self._failed is not None:
                    self._results.put(self._failed)
                    continue
                try:
                    if item is _FLUSH:
                        self._results.put(self._resolve_pending(pending))
                        pending = None
                        continue
                    self._admit(item)
                    if not self._queued:
                        self._results.put(self._resolve_pending(pending))
                        pending = None
                    forward = self._forward(item)
                    if self._queued:
                        self._results.put(self._resolve_pending(pending))
                    pending = self._sample(item, forward)
                except BaseException as e:  # reported to the caller; the gang restarts
                    self._failed = e
                    self._results.put(e)

    def _items(self) -> Iterator[Any]:
        while (item := self._plans.get()) is not _CLOSE:
            yield item

    def _resolve_pending(self, pending: P | None) -> StepResult | None:
        return None if pending is None else self._resolve(pending)
