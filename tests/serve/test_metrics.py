"""EngineMetrics from the coordinator's step reports: counters move by what each step added, the
speculative-decoding gauges are the running acceptance rate and mean accepted length."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from nmoe_serve.engine.coordinator import StepReport
from nmoe_serve.serve.metrics import EngineMetrics


def report(**counts: int) -> StepReport:
    """A decode step's report; the spec_* counts are the scheduler's totals since the start."""
    return StepReport("decode", 0.05, counts.pop("tokens", 0), 4, 0, 0.5, 0, **counts)


def test_speculative_counters_move_by_each_steps_share_and_the_gauges_follow() -> None:
    metrics = EngineMetrics("m", "0")
    seen: dict[str, list[float]] = {}
    for name in ("spec_drafts", "spec_draft_tokens", "spec_accepted_tokens"):
        getattr(metrics, name).inc = lambda value, tags=None, name=name: seen.setdefault(name, []).append(
            value
        )
    for name in ("spec_acceptance_rate", "spec_mean_accepted_length"):
        getattr(metrics, name).set = lambda value, tags=None, name=name: seen.setdefault(name, []).append(
            value
        )
    metrics.after_step(report(tokens=6, spec_drafts=4, spec_draft_tokens=8, spec_accepted_tokens=2))
    metrics.after_step(
        report(tokens=4, spec_drafts=4, spec_draft_tokens=8, spec_accepted_tokens=2)
    )  # no verify
    metrics.after_step(report(tokens=9, spec_drafts=8, spec_draft_tokens=16, spec_accepted_tokens=8))
    assert seen["spec_drafts"] == [4, 4]
    assert seen["spec_draft_tokens"] == [8, 8]
    assert seen["spec_accepted_tokens"] == [2, 6]
    assert seen["spec_acceptance_rate"] == [pytest.approx(0.25), pytest.approx(0.5)]
    assert seen["spec_mean_accepted_length"] == [pytest.approx(1.5), pytest.approx(2.0)]
