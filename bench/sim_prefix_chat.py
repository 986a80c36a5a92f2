"""Prefix caching on a multi-turn chat workload, predicted for one 8-GPU node by the simulator.

    NMOE_MODEL_PATH=/unused python bench/sim_prefix_chat.py \
        --cost-model docs/perf/2026-12-01-coordinator/gpu_cost_model_h100.json \
        [--config configs/production.toml] [--pages-per-rank 6500] [--coordinator-ms 6] \
        [--conversations 512 --conversation-rate 8 --turns 6 --system-prompt-tokens 2000 --user-tokens 200 \
         --output-tokens 100 --output-tokens-max 200] [--out sim_prefix_chat.json]

The simulator's chat workload (nmoe_serve/sim/chat.py: the conversations share one system prompt,
each turn re-sends the conversation so far, the answers' own tokens included) on the real
scheduler of one EP group, per setup of the prefix cache and the rank choice: cache off; on with
the default imbalance bound (`max_rank_imbalance` 4); no bound (10000: the cache decides alone);
bound 0 (only the least loaded ranks, the cache breaking ties). The setups of bench/prefix_chat.py
at EP 8, over HTTP on the CPU. Prints a markdown table (for docs/PERF.md) and writes every run's
summary as JSON. These are predictions, not measurements.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from report import write_json

from nmoe_serve.sim.chat import ChatWorkload
from nmoe_serve.sim.cli import read_config, scheduler_limits
from nmoe_serve.sim.cost_model import StepCostModel
from nmoe_serve.sim.simulator import Simulator

SETUPS: dict[str, dict[str, object]] = {  # name -> config overrides
    "cache off": {"enable_prefix_caching": False},
    "cache on, bound 4 (the default)": {},
    "cache on, no bound (10000)": {"max_rank_imbalance": 10_000},
    "cache on, bound 0 (least loaded only)": {"max_rank_imbalance": 0},
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cost-model", type=Path, required=True)
    parser.add_argument("--config", default="configs/production.toml")
    parser.add_argument("--pages-per-rank", type=int, default=6500)
    parser.add_argument("--coordinator-ms", type=float, default=6.0)
    parser.add_argument("--conversations", type=int, default=512)
    parser.add_argument(
        "--conversation-rate",
        type=float,
        default=8.0,
        help="conversations started a second (Poisson; 0: all at once)",
    )
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--system-prompt-tokens", type=int, default=2000)
    parser.add_argument("--user-tokens", type=int, default=200)
    parser.add_argument("--output-tokens", type=int, default=100)
    parser.add_argument("--output-tokens-max", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("sim_prefix_chat.json"))
    args = parser.parse_args()
    workload = ChatWorkload(
        conversations=args.conversations,
        turns=args.turns,
        system_prompt_tokens=args.system_prompt_tokens,
        user_tokens=args.user_tokens,
        output_tokens=args.output_tokens,
        output_tokens_max=args.output_tokens_max,
        conversation_rate=args.conversation_rate or None,
        seed=args.seed,
    )
    cost = StepCostModel.load(args.cost_model)
    print(f"simulated (a prediction): {workload.describe()}")
    print(
        "| setup | hit rate | prefill tokens computed (of sent) | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) "
        "| makespan (s) | first admissions per rank | max/mean |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    runs = []
    for name, overrides in SETUPS.items():
        limits = scheduler_limits(read_config(args.config, overrides), args.pages_per_rank)
        simulator = Simulator(limits, cost, overlap=True, coordinator_s=args.coordinator_ms / 1e3)
        s = simulator.run(workload).summary()
        ttft, itl, cache = s["ttft_s"], s["itl_s"], s["prefix_cache"]
        assert isinstance(ttft, dict) and isinstance(itl, dict) and isinstance(cache, dict)
        print(
            f"| {name} | {cache['hit_rate']:.3f} | {cache['prefill_tokens_computed']:,} "
            f"(of {cache['prompt_tokens']:,}) | {ttft['p50']:.2f} / {ttft['p99']:.2f} | "
            f"{itl['p50'] * 1e3:.0f} / {itl['p99'] * 1e3:.0f} | {s['makespan_s']:.1f} | "
            f"{', '.join(map(str, s['admitted_by_rank']))} | {s['rank_max_over_mean']:.2f} |",
            flush=True,
        )
        runs.append({"setup": name, "overrides": overrides, "limits": limits.__dict__, **s})
    payload = {
        "prediction": "simulated, not measured",
        "config": args.config,
        "pages_per_rank": args.pages_per_rank,
        "coordinator_ms": args.coordinator_ms,
        "workload": {**workload.__dict__, "describe": workload.describe()},
        "cost_model": cost.provenance(args.cost_model),
        "runs": runs,
    }
    write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
