"""StepCostModel: shapes from plans, the non-negative fit, fit errors, files and their refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nmoe_serve.engine.plan import StepKind, StepPlan
from nmoe_serve.sim.cost_model import CostModelError, CostPoint, StepCostModel, StepShape, load_points


def plan(kind: StepKind, query: list[int], context: list[int]) -> StepPlan:
    q, c = np.array(query, np.int32), np.array(context, np.int32)
    return StepPlan(
        0, kind, 0, (), (), tuple(f"r{i}" for i in range(len(q))), q, c,
        np.zeros(int(q.sum()), np.int64), np.zeros((len(q), 1), np.int32), np.ones(len(q), bool),
    )  # fmt: skip


def test_shapes_count_tokens_contexts_and_causal_attention_pairs() -> None:
    shape = StepShape.of(plan(StepKind.PREFILL, [4, 2], [4, 10]))
    assert (shape.kind, shape.seqs, shape.tokens, shape.context_tokens) == ("prefill", 2, 6, 14)
    # a fresh 4-token prompt: 4+3+2+1 pairs; a 2-token chunk after 8 cached: 9 + 10
    assert shape.attention_pairs == 10 + 19
    decode = StepShape.of(plan(StepKind.DECODE, [1, 1, 1], [5, 6, 7]))
    assert (decode.kind, decode.seqs, decode.tokens, decode.context_tokens) == ("decode", 3, 3, 18)
    assert StepShape.of(StepPlan.idle(0, StepKind.DECODE, 0)) == StepShape("decode")


def synthetic(decode=(0.04, 2e-4, 5e-8), prefill=(0.2, 1.5e-4, 1e-8, 3e-6)) -> list[CostPoint]:
    points = []
    for seqs in (1, 32, 128, 256):
        for context in (100, 2000, 16000):
            shape = StepShape("decode", seqs, seqs, seqs * context)
            points.append(CostPoint(shape, float(np.dot(shape.features(), decode))))
    for tokens, context in ((32, 32), (2048, 2048), (16384, 16384), (2048, 32768)):
        pairs = tokens * context - tokens * (tokens - 1) // 2
        shape = StepShape("prefill", 1, tokens, context, pairs)
        points.append(CostPoint(shape, float(np.dot(shape.features(), prefill))))
    return points


def test_the_fit_recovers_the_coefficients_of_exact_points() -> None:
    model = StepCostModel.fit_points(synthetic(), "synthetic", "2026-12-01")
    assert model.coefficients["decode"] == pytest.approx(
        {"step": 0.04, "seqs": 2e-4, "context_tokens": 5e-8}, rel=1e-6
    )
    assert model.coefficients["prefill"]["tokens"] == pytest.approx(1.5e-4, rel=1e-6)
    assert model.fit["decode"]["max_relative_error"] < 1e-9
    assert model.fit["prefill"]["points"] == 4


def test_coefficients_stay_non_negative_and_the_error_is_reported() -> None:
    points = synthetic()
    # a noisy decode point that would pull the context coefficient below zero in plain least squares
    noisy = [CostPoint(StepShape("decode", 256, 256, 256 * 16000), 0.02)] * 6
    model = StepCostModel.fit_points(points + noisy, "noisy", "2026-12-01")
    assert all(v >= 0 for kind in model.coefficients.values() for v in kind.values())
    assert model.fit["decode"]["max_relative_error"] > 0.1


def test_the_step_is_its_slowest_rank_and_an_idle_rank_costs_the_intercept() -> None:
    model = StepCostModel.fit_points(synthetic(), "synthetic", "2026-12-01")
    busy = plan(StepKind.DECODE, [1] * 32, [2000] * 32)
    idle = StepPlan.idle(0, StepKind.DECODE, 1)
    assert model.rank_seconds(StepShape.of(idle)) == pytest.approx(0.04)
    assert model.step_seconds([busy, idle]) == pytest.approx(model.rank_seconds(StepShape.of(busy)))


def test_save_and_load_round_trip(tmp_path) -> None:
    model = StepCostModel.fit_points(synthetic(), "synthetic points", "2026-12-01")
    model.save(tmp_path / "model.json")
    again = StepCostModel.load(tmp_path / "model.json")
    assert again.coefficients == model.coefficients and again.source == "synthetic points"
    assert len(again.points) == len(model.points)


def test_refusals_say_what_to_do(tmp_path) -> None:
    with pytest.raises(CostModelError, match=r"1 prefill point\(s\) cannot fit the 4 prefill coefficients"):
        StepCostModel.fit_points(
            [p for p in synthetic() if p.shape.kind == "decode"][:3] + synthetic()[-1:], "x", "d"
        )
    with pytest.raises(CostModelError, match="does not exist"):
        StepCostModel.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text(json.dumps({"source": "x"}))
    with pytest.raises(CostModelError, match="fit-cost-model"):
        StepCostModel.load(tmp_path / "bad.json")
    (tmp_path / "points.json").write_text(
        json.dumps({"source": "x", "date": "d", "points": [{"kind": "mixed"}]})
    )
    with pytest.raises(CostModelError, match="kind 'mixed' is not one of"):
        load_points(tmp_path / "points.json")
