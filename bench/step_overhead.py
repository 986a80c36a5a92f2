"""What a global step costs the coordinator, and the round trip to the workers.

    python bench/step_overhead.py [--ranks 8] [--seqs-per-rank 32,64,128,256,512] [--steps 200] \
        [--cases scheduler,null,tiny] [--pin-cpu 1] [--out step_overhead.json]

Three cases: `scheduler`, the scheduler alone with results made up in-process (no Ray: the
coordinator's cost where it has a core to itself; `--pin-cpu` keeps it on one core); and on the
dev (tiny) model over Ray worker actors, `null` ranks that run no model (so the round trip is the
step channel itself: plan serialization, Ray actor calls, results), and `tiny` ranks running the
real model with gloo all-to-alls; `null-overlap` is `null` with overlapped steps (launch: each call
returns the previous step's results). Per decode step it reports the coordinator's own time
(schedule + update, on its thread) and the round trip (execute), as p50/p90/p99 and mean, and the
garbage collections that ran inside the measured steps (count and longest pause), for each number
of sequences per rank. Goal: coordinator overhead <= 1 ms p50, <= 2 ms p99 per step at 8 x 256.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from nmoe_serve.config import ServeConfig
from nmoe_serve.engine.core import EngineCore
from nmoe_serve.engine.plan import StepPlan, StepResult
from nmoe_serve.parallel.executor import RayExecutor
from nmoe_serve.sampling.params import SamplingParams
from nmoe_serve.settings import resolve_settings
from nmoe_serve.worker.actor import WorkerActor


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "p50_ms": at(0.5) * 1e3,
        "p90_ms": at(0.9) * 1e3,
        "p99_ms": at(0.99) * 1e3,
        "mean_ms": statistics.fmean(values) * 1e3,
    }


class NullWorkerActor(WorkerActor):
    """A rank that runs no model: it checks nothing, computes nothing and samples token 0, so a
    step's round trip is the channel itself (plan serialization, Ray actor calls, results)."""

    def start(self, host: str, port: int, timeout_s: float) -> int:
        return self.settings.num_pages or 4096

    pending: StepResult | None = None

    def execute(self, plan: StepPlan) -> StepResult:
        sampled = tuple(rid for rid, s in zip(plan.request_ids, plan.sample, strict=True) if s)
        return StepResult(plan.step_id, self.topology.rank, sampled, np.zeros(len(sampled), np.int64))

    def launch(self, plan: StepPlan) -> StepResult | None:
        previous, self.pending = self.pending, self.execute(plan)
        return previous

    def flush(self) -> StepResult | None:
        previous, self.pending = self.pending, None
        return previous


class InlineRanks:
    """Results made up in-process: every sampled sequence gets token 0."""

    def __init__(self, ranks: int, pages: int) -> None:
        self.num_ranks, self.pages_per_rank, self.name, self.restarts = ranks, pages, "inline", 0

    def execute(self, plans):  # type: ignore[no-untyped-def]
        return [
            StepResult(p.step_id, p.rank, sampled, np.zeros(len(sampled), np.int64))
            for p in plans
            for sampled in [
                p.request_ids
                if p.sample.all()
                else tuple(r for r, s in zip(p.request_ids, p.sample, strict=True) if s)
            ]
        ]

    def shutdown(self) -> None:
        pass


class CollectorPauses:
    """The garbage collections that run while it is on (gc.callbacks): count and longest pause."""

    def __init__(self) -> None:
        self.count, self.longest, self._started, self.on = 0, 0.0, 0.0, False

    def __call__(self, phase: str, info: dict) -> None:
        if not self.on:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.count += 1
            self.longest = max(self.longest, time.perf_counter() - self._started)


def measure(case: str, ranks: int, seqs: int, steps: int) -> dict:
    config = ServeConfig.from_toml(
        Path(__file__).resolve().parents[1] / "configs" / "dev.toml",
        overrides={
            "ep_size": ranks,
            "max_num_seqs": seqs,
            "num_pages": 4 * seqs * 8,  # 512 tokens per sequence: the prompt and every measured step
            "max_seq_len": 1024,
            "max_prefill_tokens": 4096,
            "step_timeout_s": 120.0,
            "overlap": case == "null-overlap",
        },
    )
    settings = resolve_settings(config, cuda_available=False)
    if case == "scheduler":
        executor = InlineRanks(ranks, config.cache.num_pages)
    else:
        executor = RayExecutor(
            settings, group=f"bench-{case}", actor_class=WorkerActor if case == "tiny" else NullWorkerActor
        )
    engine = EngineCore(settings.core, executor)
    sampling = SamplingParams(max_tokens=steps + 64, temperature=0.0, ignore_eos=True)
    for i in range(ranks * seqs):
        engine.add_request(f"r{i}", [1 + i % 100] * 16, sampling)
    while (
        any(r.prefilling for running in engine.scheduler.running for r in running) or engine.scheduler.waiting
    ):
        engine.step()
    bookkeeping, bookkeeping_cpu, round_trip = [], [], []
    pauses = CollectorPauses()
    gc.callbacks.append(pauses)
    pauses.on = True
    for step in range(steps):
        t0, c0 = time.perf_counter(), time.thread_time()
        plans = engine.scheduler.schedule()
        t1, c1 = time.perf_counter(), time.thread_time()
        results = executor.launch(plans) if engine.overlap else executor.execute(plans)
        t2, c2 = time.perf_counter(), time.thread_time()
        if results is not None:
            engine.scheduler.update(results)
        t3, c3 = time.perf_counter(), time.thread_time()
        bookkeeping_cpu.append((c1 - c0) + (c3 - c2))
        assert sum(p.num_seqs for p in plans) == ranks * seqs
        bookkeeping.append((t1 - t0) + (t3 - t2))
        round_trip.append(t2 - t1)
        if step % 50 == 0:
            print(f"  {case} x {seqs}: step {step}/{steps}", flush=True)
    pauses.on = False
    gc.callbacks.remove(pauses)
    if engine.overlap and (results := executor.flush()) is not None:
        engine.scheduler.update(results)
    executor.shutdown()
    return {
        "case": case,
        "ranks": ranks,
        "seqs_per_rank": seqs,
        "steps": steps,
        "coordinator": percentiles(bookkeeping),
        "coordinator_cpu": percentiles(
            bookkeeping_cpu
        ),  # the thread's CPU time: without preemption by others
        "round_trip": percentiles(round_trip),
        "gc_collections": pauses.count,
        "gc_longest_pause_ms": pauses.longest * 1e3,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument(
        "--seqs-per-rank", default="32", help="decoding sequences per rank, or a comma list for a curve"
    )
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--cases", default="scheduler,null,tiny")
    parser.add_argument("--pin-cpu", type=int, help="run this process on this one CPU core (Linux)")
    parser.add_argument("--out", type=Path, default=Path("step_overhead.json"))
    args = parser.parse_args()
    try:
        sizes = [int(s) for s in args.seqs_per_rank.split(",")]
    except ValueError:
        raise SystemExit(
            f"--seqs-per-rank {args.seqs_per_rank!r}: give integers, e.g. 32 or 32,64,128"
        ) from None
    cases = args.cases.split(",")
    if unknown := set(cases) - {"scheduler", "null", "null-overlap", "tiny"}:
        raise SystemExit(
            f"--cases: unknown case(s) {sorted(unknown)}; choose from scheduler, null, null-overlap, tiny"
        )
    if args.pin_cpu is not None:
        os.sched_setaffinity(0, {args.pin_cpu})
    rows = [measure(case, args.ranks, seqs, args.steps) for case in cases for seqs in sizes]
    print(
        f"{'case':>12} {'ranks':>5} {'seqs/rank':>9} | coordinator p50 / p99 / mean (ms) | CPU p50 / p99 | "
        "round trip p50 / p99 / mean (ms) | gc runs, longest (ms)"
    )
    for r in rows:
        c, t, u = r["coordinator"], r["round_trip"], r["coordinator_cpu"]
        print(
            f"{r['case']:>12} {r['ranks']:>5} {r['seqs_per_rank']:>9} | {c['p50_ms']:7.3f} {c['p99_ms']:7.3f} "
            f"{c['mean_ms']:7.3f} | {u['p50_ms']:6.3f} {u['p99_ms']:6.3f} | {t['p50_ms']:8.2f} {t['p99_ms']:8.2f} {t['mean_ms']:8.2f} | "
            f"{r['gc_collections']:4d} {r['gc_longest_pause_ms']:6.2f}"
        )
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "host": os.uname().nodename,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "pinned_cpu": args.pin_cpu,
    }
    args.out.write_text(json.dumps({**meta, "rows": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
