"""A simulated run's outputs: a printed table, JSON (summary, settings, time series) and a PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from nmoe_serve.sim.simulator import SimResult


def print_summary(result: SimResult, title: str) -> None:
    summary = result.summary()
    print(f"\n{title}")
    print(
        f"  {summary['workload']}: {summary['makespan_s']:.1f} s simulated, {summary['steps']} steps "
        f"({summary['prefill_steps']} prefill, {summary['decode_steps']} decode), "
        f"{summary['preemptions']} preemptions"
    )
    print(
        f"  prefill {summary['prefill_tok_per_s']:,.0f} tok/s, decode {summary['decode_tok_per_s']:,.0f} tok/s "
        "(one EP group)"
    )
    cache = summary["prefix_cache"]
    assert isinstance(cache, dict)
    print(
        f"  prefix cache {'on' if cache['enabled'] else 'off'}: {cache['cached_tokens']:,} of "
        f"{cache['prompt_tokens']:,} prompt tokens cached (hit rate {cache['hit_rate']:.3f}), "
        f"{cache['prefill_tokens_computed']:,} computed; first admissions per rank {summary['admitted_by_rank']} "
        f"(max/mean {summary['rank_max_over_mean']:.2f})"
    )
    print(f"  {'ms':>12} {'p50':>9} {'p90':>9} {'p99':>9} {'max':>9}")
    for name in ("ttft_s", "itl_s", "e2e_s", "decode_step_s", "prefill_step_s"):
        p = summary[name]
        assert isinstance(p, dict)
        print(
            f"  {name[:-2]:>12} {p['p50'] * 1e3:9.1f} {p['p90'] * 1e3:9.1f} {p['p99'] * 1e3:9.1f} {p['max'] * 1e3:9.1f}"
        )


def write_json(result: SimResult, path: Path, settings: dict[str, Any]) -> None:
    payload = {"settings": settings, "summary": result.summary(), "series": result.series}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {path}")


def write_png(result: SimResult, path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"not writing {path}: the plot needs matplotlib (pip install matplotlib); the JSON is written")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for name, values in (("TTFT", result.ttft_s), ("ITL", result.itl_s)):
        ordered = np.sort(values)
        axes[0][0].plot(ordered, (np.arange(len(ordered)) + 1) / max(len(ordered), 1), label=name)
    axes[0][0].set_xscale("log")
    axes[0][0].set_xlabel("seconds")
    axes[0][0].set_ylabel("fraction")
    axes[0][0].legend()
    axes[0][0].set_title("latency CDFs")
    t = np.array(result.series["t"])
    axes[0][1].plot(t, result.series["waiting"], label="waiting")
    axes[0][1].plot(t, result.series["running"], label="running")
    axes[0][1].set_xlabel("simulated seconds")
    axes[0][1].set_title("queue depth")
    axes[0][1].legend()
    kinds = np.array(result.series["kind"])
    step_ms = np.array(result.series["step_s"]) * 1e3
    for kind, label in ((1.0, "decode"), (0.0, "prefill")):
        axes[1][0].scatter(t[kinds == kind], step_ms[kinds == kind], s=3, label=label)
    axes[1][0].set_yscale("log")
    axes[1][0].set_xlabel("simulated seconds")
    axes[1][0].set_ylabel("step ms")
    axes[1][0].set_title("steps")
    axes[1][0].legend()
    axes[1][1].plot(t, result.series["preemptions"], label="preemptions (total)")
    axes[1][1].plot(t, np.array(result.series["kv_usage"]) * 100, label="KV pages used (%)")
    axes[1][1].set_xlabel("simulated seconds")
    axes[1][1].legend()
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
