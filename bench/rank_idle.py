"""How long each rank's device waits between consecutive decode steps: one step at a time against
overlapped steps (scheduler.overlap).

    python bench/rank_idle.py --config configs/benchmark_lmsys.toml --seqs-per-rank 256 \
        --prompt-tokens 2000 --steps 100 [--modes serial,overlap] [--out rank_idle.json]
    python bench/rank_idle.py --config configs/dev.toml --set ep_size=2 --seqs-per-rank 16 \
        --prompt-tokens 64 --steps 60          # the tiny model on the CPU

It drives the engine directly (no HTTP). Each rank's StepClock (nmoe_serve/worker/step_clock.py)
records the idle time before every step: on CUDA from the end of the previous step's last kernel
to the start of this step's first (CUDA events on the step stream), on the CPU the same on the
host clock. Once every request decodes, `--steps` decode steps are timed and the idle times
before the decode steps that follow a decode step are reported per mode, over all ranks:
p50/p90/p99/max, with the step period. Goal (issue 12): <= 0.5 ms p99 with 8 ranks on the GPU
host. Writes JSON and a PNG (CDFs), prints a table and shows progress.
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

from lmsys import parse_set
from report import new_figure, percentiles, print_table, save_figure, write_json

from nmoe_serve.engine.plan import StepKind
from nmoe_serve.llm import LLM
from nmoe_serve.sampling.params import SamplingParams

DECODE = int(StepKind.DECODE)


def measure(args: argparse.Namespace, overlap: bool) -> dict:
    llm = LLM(config=args.config, overlap=overlap, **parse_set(args.set))
    engine, executor = llm.engine, llm.engine.executor
    if not hasattr(executor, "idle_times"):
        raise SystemExit(f"the {executor.name} executor does not report idle times")
    ranks = engine.limits.num_ranks
    rng = random.Random(args.seed)
    vocab = llm.settings.args.vocab_size
    params = SamplingParams(max_tokens=args.steps + 8, temperature=0.0, ignore_eos=True)
    count = ranks * args.seqs_per_rank
    for i in range(count):
        engine.add_request(f"idle-{i}", [rng.randrange(1, vocab) for _ in range(args.prompt_tokens)], params)
    started = time.perf_counter()
    while engine.scheduler.waiting or engine.scheduler.table.any_prefilling():
        engine.step()
    print(f"  {'overlap' if overlap else 'serial'}: {count} sequences prefilled in "
          f"{time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
    engine.step()
    executor.idle_times()  # drop the prefill phase's
    started = time.perf_counter()
    for step in range(args.steps):
        engine.step()
        if step % max(1, args.steps // 5) == 0:
            print(f"  {'overlap' if overlap else 'serial'}: decode step {step}/{args.steps}", flush=True)
    seconds = time.perf_counter() - started
    per_rank = executor.idle_times()
    for i in range(count):
        engine.abort(f"idle-{i}")
    while engine.has_work():
        engine.step()
    llm.shutdown()
    idle = [s for rank in per_rank for (_, kind, before, s) in rank if kind == DECODE and before == DECODE]
    return {
        "mode": "overlap" if overlap else "serial",
        "ranks": ranks,
        "device": llm.settings.device,
        "decode_steps": args.steps,
        "step_period_ms": 1e3 * seconds / args.steps,
        "idle_ms": percentiles(idle, 1e3),
        "raw_idle_ms": [1e3 * s for s in idle],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/benchmark_lmsys.toml")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="engine option override"
    )
    parser.add_argument("--seqs-per-rank", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--modes", default="serial,overlap")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("rank_idle.json"))
    args = parser.parse_args()
    modes = args.modes.split(",")
    if not modes or set(modes) - {"serial", "overlap"}:
        raise SystemExit(f"--modes {args.modes!r}: give serial, overlap or both (comma-separated)")
    rows = [measure(args, mode == "overlap") for mode in modes]
    print_table(
        f"device idle time between decode steps ({rows[0]['ranks']} ranks, {rows[0]['device']}, "
        f"{args.seqs_per_rank} seqs/rank)",
        [{"mode": r["mode"], "step ms": r["step_period_ms"], **r["idle_ms"]} for r in rows],
        ["mode", "step ms", "p50", "p90", "p99", "max", "count"],
    )
    raw = {r["mode"]: r.pop("raw_idle_ms") for r in rows}
    write_json(args.out, {"config": args.config, "overrides": args.set, "rows": rows})
    fig, axes = new_figure(1, 1, (6, 4))
    for mode, values in raw.items():
        ordered = sorted(values)
        axes[0][0].plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=mode)
    axes[0][0].set_xlabel("device idle before a decode step (ms)")
    axes[0][0].set_ylabel("fraction of steps")
    axes[0][0].set_xscale("symlog", linthresh=0.1)
    axes[0][0].legend()
    axes[0][0].grid(alpha=0.3)
    save_figure(fig, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
