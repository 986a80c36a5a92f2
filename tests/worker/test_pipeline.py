"""StepPipeline: the order of a rank's step parts on its thread, results one call late, flush,
failures and bounded waits. With fake parts that log what ran; no model."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from nmoe_serve.engine.plan import StepKind, StepPlan, StepResult
from nmoe_serve.worker.pipeline import StepPipeline


def plan(step_id: int) -> StepPlan:
    return StepPlan.idle(step_id, StepKind.DECODE, 0)


class Parts:
    def __init__(self, fail_at: int | None = None, slow_s: float = 0.0) -> None:
        self.log: list[str] = []
        self.fail_at, self.slow_s = fail_at, slow_s
        self.lock = threading.Lock()

    def admit(self, p: StepPlan) -> None:
        self.log.append(f"admit {p.step_id}")

    def forward(self, p: StepPlan) -> int:
        if p.step_id == self.fail_at:
            raise ValueError(f"forward of {p.step_id} broke")
        time.sleep(self.slow_s)
        self.log.append(f"forward {p.step_id}")
        return p.step_id

    def sample(self, p: StepPlan, forward: int) -> int:
        self.log.append(f"sample {forward}")
        return forward

    def resolve(self, pending: int) -> StepResult:
        self.log.append(f"resolve {pending}")
        return StepResult(pending, 0, (), np.zeros(0, np.int64))

    def pipeline(self, queued: bool, timeout_s: float = 5.0) -> StepPipeline[int, int]:
        return StepPipeline(
            self.admit, self.forward, self.sample, self.resolve, queued, timeout_s, name="test-steps"
        )


@pytest.mark.parametrize("queued", [True, False])
def test_results_come_one_call_late_and_flush_returns_the_last(queued: bool) -> None:
    parts = Parts()
    pipe = parts.pipeline(queued)
    assert pipe.launch(plan(0)) is None
    assert [pipe.launch(plan(i)).step_id for i in range(1, 5)] == [0, 1, 2, 3]  # type: ignore[union-attr]
    last = pipe.flush()
    assert last is not None and last.step_id == 4
    assert pipe.flush() is None, "nothing is pending after a flush"
    pipe.close()
    assert parts.log.count("resolve 4") == 1


def test_queued_devices_enqueue_the_next_forward_before_waiting_for_the_last_results() -> None:
    parts = Parts()
    pipe = parts.pipeline(queued=True)
    pipe.launch(plan(0))
    pipe.launch(plan(1))
    pipe.flush()
    pipe.close()
    assert parts.log == [
        "admit 0", "forward 0", "sample 0",
        "admit 1", "forward 1", "resolve 0", "sample 1",
        "resolve 1",
    ]  # fmt: skip


def test_in_place_devices_return_the_last_results_before_computing_the_next() -> None:
    parts = Parts(slow_s=0.2)
    pipe = parts.pipeline(queued=False)
    pipe.launch(plan(0))
    pipe.flush()
    pipe.launch(plan(1))
    started = time.perf_counter()
    assert pipe.launch(plan(2)) is not None
    assert time.perf_counter() - started < 0.6, "step 1's results waited only for step 1"
    pipe.flush()
    pipe.close()
    assert parts.log.index("resolve 1") < parts.log.index("forward 2")
    assert parts.log.index("admit 2") < parts.log.index("resolve 1"), "releases apply before results go out"


def test_a_failed_step_fails_the_call_and_every_later_one() -> None:
    parts = Parts(fail_at=2)
    pipe = parts.pipeline(queued=True)
    pipe.launch(plan(0))
    pipe.launch(plan(1))
    with pytest.raises(RuntimeError, match="forward of 2 broke"):
        pipe.launch(plan(2))
    with pytest.raises(RuntimeError, match="forward of 2 broke"):
        pipe.launch(plan(3))
    with pytest.raises(RuntimeError, match="forward of 2 broke"):
        pipe.flush()
    pipe.close()


def test_waits_are_bounded() -> None:
    parts = Parts(slow_s=2.0)
    pipe = parts.pipeline(queued=False, timeout_s=0.3)
    pipe.launch(plan(0))
    with pytest.raises(TimeoutError, match=r"no result for .* within 0.3 s"):
        pipe.launch(plan(1))
    pipe.close()
