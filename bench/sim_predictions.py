"""Predicted SLOs of one 8-GPU node: the simulator over the issue's SLO and LMSYS points, per policy.

    NMOE_MODEL_PATH=/unused python bench/sim_predictions.py \
        --cost-model docs/perf/2026-12-01-coordinator/gpu_cost_model_h100.json \
        [--config configs/production.toml] [--pages-per-rank 6500] [--coordinator-ms 6] [--out predictions.json]

Workloads (closed loops, as bench/latency.py; P prompt and N output tokens, EOS ignored):
C 256, P 2000, N 100 (SLO: TTFT p99 <= 2 s, ITL p99 <= 100 ms); C 256, P 32000, N 100 (TTFT p99
<= 8 s); C 2048 (256 per GPU), P 2000, N 100, the LMSYS throughput point; and Poisson arrivals at
8 req/s, P 2000, N 100 (about half of what the node serves). Policies: unbounded prefill steps
(16384 tokens a GPU, two in a row: the policy before issue 12), one step at a time and overlapped;
and separate prefill steps with a budget while sequences decode (scheduler.decode_prefill_tokens)
and one prefill step between decode steps. Prints a markdown
table (for docs/PERF.md) and writes every run's summary as JSON. These are predictions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from report import write_json

from nmoe_serve.sim.cli import read_config, scheduler_limits
from nmoe_serve.sim.cost_model import StepCostModel
from nmoe_serve.sim.simulator import Simulator
from nmoe_serve.sim.workload import Workload

WORKLOADS = {
    "C256 P2000 N100": Workload(2000, 100, 1024, concurrency=256),
    "C256 P32000 N100": Workload(32000, 100, 512, concurrency=256),
    "LMSYS: C2048 P2000 N100": Workload(2000, 100, 6144, concurrency=2048),
    "Poisson 8/s P2000 N100": Workload(2000, 100, 1200, rate=8.0),
}
UNBOUNDED = {"decode_prefill_tokens": None, "max_prefill_steps_in_a_row": 2}  # the policy before issue 12
POLICIES: dict[str, tuple[dict[str, object], bool]] = {  # name -> (config overrides, overlap)
    "unbounded, serial": (UNBOUNDED, False),
    "unbounded, overlap": (UNBOUNDED, True),
    "budget 4096": ({"decode_prefill_tokens": 4096, "max_prefill_steps_in_a_row": 1}, True),
    "budget 1024 (production.toml)": ({"decode_prefill_tokens": 1024, "max_prefill_steps_in_a_row": 1}, True),
    "budget 256": ({"decode_prefill_tokens": 256, "max_prefill_steps_in_a_row": 1}, True),
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cost-model", type=Path, required=True)
    parser.add_argument("--config", default="configs/production.toml")
    parser.add_argument("--pages-per-rank", type=int, default=6500)
    parser.add_argument("--coordinator-ms", type=float, default=6.0)
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="comma list of: " + ", ".join(WORKLOADS)
    )
    parser.add_argument("--out", type=Path, default=Path("predictions.json"))
    args = parser.parse_args()
    names = args.workloads.split(",")
    if unknown := [n for n in names if n not in WORKLOADS]:
        raise SystemExit(f"--workloads: unknown {unknown}; choose from {list(WORKLOADS)}")
    cost = StepCostModel.load(args.cost_model)
    runs = []
    print(
        "| workload | policy | TTFT p50 / p99 (s) | ITL p50 / p99 (ms) | prefill tok/s | decode tok/s | preemptions |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in names:
        for policy, (overrides, overlap) in POLICIES.items():
            limits = scheduler_limits(read_config(args.config, overrides), args.pages_per_rank)
            simulator = Simulator(limits, cost, overlap=overlap, coordinator_s=args.coordinator_ms / 1e3)
            s = simulator.run(WORKLOADS[name]).summary()
            ttft, itl = s["ttft_s"], s["itl_s"]
            assert isinstance(ttft, dict) and isinstance(itl, dict)
            print(
                f"| {name} | {policy} | {ttft['p50']:.2f} / {ttft['p99']:.2f} | {itl['p50'] * 1e3:.0f} / "
                f"{itl['p99'] * 1e3:.0f} | {s['prefill_tok_per_s']:,.0f} | {s['decode_tok_per_s']:,.0f} | "
                f"{s['preemptions']} |",
                flush=True,
            )
            runs.append({"workload": name, "policy": policy, "overrides": overrides, "overlap": overlap, **s})
    payload = {
        "prediction": "simulated, not measured",
        "config": args.config,
        "pages_per_rank": args.pages_per_rank,
        "coordinator_ms": args.coordinator_ms,
        "cost_model": cost.provenance(args.cost_model),
        "runs": runs,
    }
    write_json(args.out, payload)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
