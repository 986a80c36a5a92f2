"""Measure the engine's step times at a grid of step shapes, for the simulator's step-cost model.

    python bench/step_costs.py --config configs/dev.toml [--set KEY=VALUE] [--out step_points.json]
    nmoe-serve fit-cost-model --points step_points.json --out cost_model.json

It drives the engine directly, one step at a time, and times `executor.execute(plans)` (the ranks'
work: plans out, forward, sampling, results back; not the scheduler's bookkeeping, which the
simulator takes as --coordinator-ms). Decode: B sequences at a context, a few timed steps each.
Prefill: B prompts of T tokens (longer ones are chunked at max_prefill_tokens, so the later chunks
read a cached context). Each point is the median of its repeats, with the busiest rank's shape.
Writes the points JSON (source, date, machine, load) that `nmoe-serve fit-cost-model` reads, and
shows progress. Run it on a quiet machine: the fit is only as good as these times.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from dataclasses import asdict
from pathlib import Path

from lmsys import parse_set

from nmoe_serve.engine.plan import StepKind
from nmoe_serve.llm import LLM
from nmoe_serve.sampling.params import SamplingParams
from nmoe_serve.sim.cost_model import StepShape

SAMPLING_EXTRA: dict[str, int] = {}  # --logprobs
DECODE_GRID = [(b, c) for b in (1, 2, 4, 8, 16, 32, 64) for c in (64, 192, 640)]
PREFILL_GRID = [
    (1, 32),
    (1, 128),
    (2, 128),
    (4, 128),
    (8, 128),
    (16, 128),
    (1, 512),
    (4, 256),
    (1, 1024),
    (1, 2000),
]


def timed_step(llm: LLM) -> tuple[StepShape, float, StepKind] | None:
    engine = llm.engine
    plans = engine.schedule()
    if plans is None:
        return None
    started = time.perf_counter()
    results = engine.executor.execute(plans)
    seconds = time.perf_counter() - started
    engine.complete(results)
    busiest = max(plans, key=lambda p: (p.num_tokens, int(p.context_lens.sum()) if p.num_seqs else 0))
    return StepShape.of(busiest), seconds, plans[0].kind


def drain(llm: LLM, ids: list[str]) -> None:
    for request_id in ids:
        llm.engine.abort(request_id)
    while llm.engine.has_work():
        timed_step(llm)


def decode_point(llm: LLM, seqs: int, context: int, repeats: int, rng: random.Random) -> dict:
    engine, vocab = llm.engine, llm.settings.args.vocab_size
    ranks = engine.limits.num_ranks
    ids = [f"d{seqs}-{context}-{i}" for i in range(seqs * ranks)]
    for request_id in ids:
        prompt = [rng.randrange(1, vocab) for _ in range(context - 1)]
        engine.add_request(
            request_id,
            prompt,
            SamplingParams(max_tokens=repeats + 4, temperature=0.0, ignore_eos=True, **SAMPLING_EXTRA),
        )
    while engine.scheduler.waiting or engine.scheduler.table.any_prefilling():
        timed_step(llm)
    times, shape = [], None
    for _ in range(repeats):
        step = timed_step(llm)
        assert step is not None and step[2] == StepKind.DECODE
        shape, seconds, _ = step
        times.append(seconds)
    drain(llm, ids)
    assert shape is not None
    return {**asdict(shape), "seconds": statistics.median(times), "note": f"measured, median of {repeats}"}


def prefill_points(llm: LLM, seqs: int, tokens: int, repeats: int, rng: random.Random) -> list[dict]:
    engine, vocab = llm.engine, llm.settings.args.vocab_size
    ranks = engine.limits.num_ranks
    by_shape: dict[StepShape, list[float]] = {}
    for r in range(repeats):
        ids = [f"p{seqs}-{tokens}-{r}-{i}" for i in range(seqs * ranks)]
        for request_id in ids:
            prompt = [rng.randrange(1, vocab) for _ in range(tokens)]
            engine.add_request(
                request_id,
                prompt,
                SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, **SAMPLING_EXTRA),
            )
        while engine.has_work():
            step = timed_step(llm)
            if step is not None and step[2] == StepKind.PREFILL:
                by_shape.setdefault(step[0], []).append(step[1])
    return [
        {**asdict(shape), "seconds": statistics.median(times), "note": f"measured, median of {len(times)}"}
        for shape, times in by_shape.items()
    ]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/dev.toml")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="engine option override"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--torch-threads", type=int, help="torch threads of the rank (a served CPU replica gets Ray's 1)"
    )
    parser.add_argument(
        "--logprobs", type=int, help="ask this many logprobs per token (as latency.py --token-chunks)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("step_points.json"))
    args = parser.parse_args()
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be at least 1, got {args.repeats}")
    if args.torch_threads is not None:
        import torch

        torch.set_num_threads(args.torch_threads)
    global SAMPLING_EXTRA
    SAMPLING_EXTRA = {} if args.logprobs is None else {"logprobs": args.logprobs}
    llm = LLM(config=args.config, overlap=False, **parse_set(args.set))
    limits, rng = llm.engine.limits, random.Random(args.seed)
    points: list[dict] = []
    started = time.perf_counter()
    for seqs, tokens in PREFILL_GRID:
        if tokens + 1 <= limits.max_seq_len and seqs <= limits.max_num_seqs:
            points += prefill_points(llm, seqs, tokens, args.repeats, rng)
            print(
                f"  prefill {seqs} x {tokens}: {len(points)} points, {time.perf_counter() - started:.0f} s",
                flush=True,
            )
    for seqs, context in DECODE_GRID:
        if seqs <= limits.max_num_seqs and context + args.repeats + 4 <= limits.max_seq_len:
            points.append(decode_point(llm, seqs, context, args.repeats, rng))
            print(f"  decode {seqs} x {context}: {points[-1]['seconds'] * 1e3:.1f} ms", flush=True)
    llm.shutdown()
    payload = {
        "source": (
            f"bench/step_costs.py on {llm.settings.model_name} ({args.config} {' '.join(args.set)}), "
            f"{limits.num_ranks} rank(s) on {llm.settings.device}, torch threads "
            f"{args.torch_threads or 'default'}, logprobs {args.logprobs}, host {os.uname().nodename} "
            f"({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})"
        ),
        "date": time.strftime("%Y-%m-%d"),
        "points": points,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {len(points)} points to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
