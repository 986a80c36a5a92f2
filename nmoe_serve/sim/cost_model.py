"""StepCostModel: the seconds one global step takes, as a fitted function of what each rank computes.

A rank's step is described by its StepShape (from its StepPlan): the kind, sequences B, new tokens
T, cached context tokens S (the sum of the sequences' contexts after the step) and the attention
pairs A (query-key pairs the step's attention computes: Σ q·(ctx − (q − 1)/2), causal within a
chunk). The model is linear in per-kind features, fitted by least squares on relative error with
non-negative coefficients:

    decode:   seconds = c0 + c_B·B + c_S·S
    prefill:  seconds = c0 + c_T·T + c_A·A + c_S·S

A global step lasts as long as its slowest rank (every rank runs every layer and every collective
together), so `step_seconds(plans)` is the maximum over the ranks; an idle rank costs c0 of the
step's kind. The model carries where its points came from (`source`, `date`) and how well it fits
them (`fit`: mean and largest relative error per kind). Refit it when the kernels get faster.

A speculative verify step (1 + k tokens per sequence) is priced as the decode step of its token
rows: the decode coefficients were fitted at one token per sequence, so this extrapolates to
B·(1 + k) rows (bench/spec_step.py measures the real verify step).

Shapes: the legend in docs/ARCHITECTURE.md (B, T, S); A as above.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nmoe_serve.engine.plan import StepKind, StepPlan

FEATURES: dict[str, tuple[str, ...]] = {
    "decode": ("step", "seqs", "context_tokens"),
    "prefill": ("step", "tokens", "attention_pairs", "context_tokens"),
}


class CostModelError(ValueError):
    """A cost model or its points are missing, malformed or cannot be fitted; the message says how to fix it."""


@dataclass(frozen=True)
class StepShape:
    """What one rank computes in one step."""

    kind: str  # prefill | decode
    seqs: int = 0  # B
    tokens: int = 0  # T
    context_tokens: int = 0  # S, cached tokens after the step, summed over the sequences
    attention_pairs: int = 0  # A, query-key pairs of the step's attention

    @classmethod
    def of(cls, plan: StepPlan) -> StepShape:
        """A rank's shape; a decode plan of q > 1 tokens per sequence (a speculative verify step)
        is the decode step of its token rows, as the worker runs it (step_batch.token_rows): B·q
        rows, row j of a sequence with j + 1 tokens of context past its start."""
        if plan.kind == StepKind.PREFILL:
            return cls("prefill", *plan.work())
        rows, seqs = plan.num_tokens, plan.num_seqs
        if rows == seqs:
            return cls("decode", *plan.work())
        q = rows // seqs
        context = int(plan.context_lens.astype(np.int64).sum()) * q - seqs * q * (q - 1) // 2
        return cls("decode", seqs=rows, tokens=rows, context_tokens=context, attention_pairs=context)

    def features(self) -> np.ndarray:
        values = {
            "step": 1.0,
            "seqs": self.seqs,
            "tokens": self.tokens,
            "context_tokens": self.context_tokens,
            "attention_pairs": self.attention_pairs,
        }
        return np.array([values[f] for f in FEATURES[self.kind]], np.float64)


@dataclass(frozen=True)
class CostPoint:
    """One step time: measured, or derived from measurements (`note` says how)."""

    shape: StepShape
    seconds: float
    note: str = "measured"


@dataclass(frozen=True)
class StepCostModel:
    coefficients: dict[str, dict[str, float]]  # kind -> feature -> seconds per unit
    source: str  # what the points are and where they were measured
    date: str  # when
    fit: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> points, mean/max relative error
    points: tuple[CostPoint, ...] = ()

    def rank_seconds(self, shape: StepShape) -> float:
        coefficients = self.coefficients[shape.kind]
        return float(shape.features() @ np.array([coefficients[f] for f in FEATURES[shape.kind]]))

    def step_seconds(self, plans: list[StepPlan]) -> float:
        """One global step: its slowest rank."""
        return max(self.rank_seconds(StepShape.of(plan)) for plan in plans)

    @classmethod
    def fit_points(cls, points: list[CostPoint], source: str, date: str) -> StepCostModel:
        """Fit both kinds; each needs at least as many points as it has features."""
        coefficients, fit = {}, {}
        for kind, names in FEATURES.items():
            mine = [p for p in points if p.shape.kind == kind]
            if len(mine) < len(names):
                raise CostModelError(
                    f"{len(mine)} {kind} point(s) cannot fit the {len(names)} {kind} coefficients "
                    f"({', '.join(names)}): measure at least {len(names)} {kind} steps of different shapes"
                )
            a = np.stack([p.shape.features() for p in mine])
            y = np.array([p.seconds for p in mine])
            if np.any(y <= 0):
                raise CostModelError(f"every {kind} point needs a positive time; got {sorted(y)[:3]}")
            c = _nonnegative_least_squares(a / y[:, None], np.ones_like(y))
            relative = np.abs(a @ c - y) / y
            coefficients[kind] = dict(zip(names, c.tolist(), strict=True))
            fit[kind] = {
                "points": float(len(mine)),
                "mean_relative_error": float(relative.mean()),
                "max_relative_error": float(relative.max()),
            }
        return cls(coefficients, source, date, fit, tuple(points))

    def provenance(self, path: Path) -> dict[str, Any]:
        """Where the model loaded from `path` comes from and how well it fits, for a result file."""
        return {"path": str(path), "source": self.source, "date": self.date, "fit": self.fit}

    def save(self, path: Path) -> None:
        payload = {
            "source": self.source,
            "date": self.date,
            "coefficients": self.coefficients,
            "fit": self.fit,
            "features": FEATURES,
            "points": [{**asdict(p.shape), "seconds": p.seconds, "note": p.note} for p in self.points],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> StepCostModel:
        data = _read_json(path, "cost model")
        try:
            coefficients = {
                kind: {f: float(data["coefficients"][kind][f]) for f in names}
                for kind, names in FEATURES.items()
            }
            return cls(
                coefficients,
                str(data["source"]),
                str(data["date"]),
                data.get("fit", {}),
                tuple(_point(p) for p in data.get("points", [])),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CostModelError(
                f"{path} is not a step-cost model ({type(e).__name__}: {e}): write one with "
                "`nmoe-serve fit-cost-model --points POINTS.json --out MODEL.json`"
            ) from None


def load_points(path: Path) -> tuple[list[CostPoint], str, str]:
    """(points, source, date) from a points file: {"source", "date", "points": [{kind, seqs, tokens,
    context_tokens, attention_pairs, seconds, note?}, ...]}."""
    data = _read_json(path, "points")
    try:
        points = [_point(p) for p in data["points"]]
        return points, str(data["source"]), str(data["date"])
    except (KeyError, TypeError, ValueError) as e:
        raise CostModelError(
            f"{path}: {type(e).__name__}: {e}; a points file is JSON "
            '{"source": ..., "date": ..., "points": [{"kind": "decode", "seqs": 32, "tokens": 32, '
            '"context_tokens": 64000, "attention_pairs": 64000, "seconds": 0.048}, ...]}'
        ) from None


def _point(p: dict[str, Any]) -> CostPoint:
    kind = p["kind"]
    if kind not in FEATURES:
        raise ValueError(f"kind {kind!r} is not one of {sorted(FEATURES)}")
    shape = StepShape(
        kind, int(p.get("seqs", 0)), int(p.get("tokens", 0)), int(p.get("context_tokens", 0)),
        int(p.get("attention_pairs", 0)),
    )  # fmt: skip
    return CostPoint(shape, float(p["seconds"]), str(p.get("note", "measured")))


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CostModelError(f"{what} file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise CostModelError(f"{what} file {path} is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise CostModelError(f"{what} file {path} must hold a JSON object")
    return data


def _nonnegative_least_squares(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """min ||a c − y|| subject to c ≥ 0 (Lawson–Hanson active set; a few features)."""
    n = a.shape[1]
    c = np.zeros(n)
    passive = np.zeros(n, bool)
    for _ in range(3 * n + 10):
        gradient = a.T @ (y - a @ c)
        if passive.all() or gradient[~passive].max(initial=0.0) <= 1e-12:
            break
        passive[np.argmax(np.where(passive, -np.inf, gradient))] = True
        while True:
            trial = np.zeros(n)
            trial[passive] = np.linalg.lstsq(a[:, passive], y, rcond=None)[0]
            if (trial[passive] > 0).all():
                c = trial
                break
            shrink = passive & (trial <= 0)
            alpha = np.min(c[shrink] / (c[shrink] - trial[shrink] + 1e-300))
            c = c + alpha * (trial - c)
            passive &= c > 1e-15
            c[~passive] = 0.0
    return c
