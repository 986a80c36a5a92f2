"""Shared by the benchmark scripts: CUDA timing, percentiles, a printed table, JSON and a PNG plot."""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path
from typing import Any


def percentiles(values: list[float], scale: float = 1.0) -> dict[str, float]:
    """p50/p90/p99/mean/max of values × scale (nearest-rank); zeros when empty."""
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0, "max": 0.0, "count": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))] * scale

    return {
        "p50": at(0.5),
        "p90": at(0.9),
        "p99": at(0.99),
        "mean": statistics.fmean(values) * scale,
        "max": ordered[-1] * scale,
        "count": len(values),
    }


def cuda_time(fn, reps: int, warmup: int = 3) -> float:  # type: ignore[no-untyped-def]
    """Median seconds of fn() over reps (CUDA events), after warmup calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def warm_up(seconds: float) -> float:
    """bf16 matmuls for `seconds` so that the GPU's clocks reach their working level (a cold start
    reads ceilings ~5% low); returns the rate of the last round (FLOP/s), a first look at the ceiling."""
    import torch

    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    rate, started = 0.0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        t0 = time.perf_counter()
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
        rate = 10 * 2 * 8192**3 / (time.perf_counter() - t0)
    return rate


def print_table(title: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    print(f"\n{title}")
    widths = [max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(_cell(r.get(c)).rjust(w) for c, w in zip(columns, widths, strict=True)))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


RESULT_MARKER = "BENCH-RESULT-JSON"


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write the result to `path` (its absolute path printed) and also print it on one line after
    RESULT_MARKER: a `ray job submit` runs in a copy of the working directory that the submitter
    never sees, but it streams the job's output back (and `ray job logs` keeps it)."""
    payload = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}
    path = path.expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    print(f"{RESULT_MARKER} {json.dumps(payload, separators=(',', ':'))}")
    print(f"wrote {path}")


def new_figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (10, 4)):  # type: ignore[no-untyped-def]
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "the PNG plot needs matplotlib (the JSON is written): pip install matplotlib"
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=size, squeeze=False)


def save_figure(fig, path: Path) -> None:  # type: ignore[no-untyped-def]
    path = path.expanduser().resolve()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")
