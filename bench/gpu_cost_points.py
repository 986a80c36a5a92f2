"""Step-cost points of one GPU rank for the simulator, from the GPU runs already in docs/perf/.

    python bench/gpu_cost_points.py [--perf docs/perf/2026-11-23-pass2] [--out gpu_points.json]
    nmoe-serve fit-cost-model --points gpu_points.json --out gpu_cost_model.json

No GPU is used: the points are read from rank_sim.json (one DeepSeek-V3 rank of 8, 61 layers
scaled from 26, CUDA-graph decode, eager prefill), mla_sweep.json and prefill_attention.json of
one run, and each says whether it was measured or derived and how. Measured: decode at 32, 128
and 256 sequences per rank (context 2000), prefill of 8 prompts of 2048 tokens. Derived:

- decode at 32 x 16000: the 32 x 2000 step plus 61 x the mla_decode kernel's time difference
  between the two contexts (the sweep's default variant): only attention reads the context;
- the prefill floor: an eager step of few tokens costs about what rank_sim's eager (host-bound)
  decode steps cost, 61/26 of the measured 26-layer eager step;
- a 2048-token chunk over 8192 keys: a fresh 2048-token prompt (the floor plus 1/8 of the
  measured prefill above it) plus 61 x the SDPA time difference between 2048 and 8192 keys
  (prefill_attention.json, cuDNN) plus the latent expansion (kv_b_proj) of the 6144 more cached
  tokens at 60% of the run's bf16 rate.

The fit through these points is exact for prefill (4 points, 4 coefficients): its error says
nothing; the decode fit has one point more than coefficients. Refit when the kernels get faster.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LAYERS, BUILT = 61, 26
KV_B_FLOPS_PER_TOKEN = 2 * 512 * 128 * (128 + 128)  # kv_b_proj of one cached token, one layer
EXPANSION_EFFICIENCY = 0.6


def pairs(q: int, ctx: int) -> int:
    return q * ctx - q * (q - 1) // 2


def point(kind: str, seqs: int, tokens: int, context: int, attention: int, seconds: float, note: str) -> dict:
    return {
        "kind": kind, "seqs": seqs, "tokens": tokens, "context_tokens": context,
        "attention_pairs": attention, "seconds": seconds, "note": note,
    }  # fmt: skip


def build(perf: Path) -> dict:
    rank_sim = json.loads((perf / "rank_sim.json").read_text())
    mla = json.loads((perf / "mla_sweep.json").read_text())
    attention = json.loads((perf / "prefill_attention.json").read_text())
    rows = {(r["phase"], r["seqs_per_rank"]): r for r in rank_sim["rows"]}
    points = []
    for seqs in (32, 128, 256):
        r = rows[("decode", seqs)]
        ctx = r["context"]
        points.append(point("decode", seqs, seqs, seqs * ctx, seqs * ctx, r["scaled_step_s"],
                            f"measured: rank_sim decode {seqs} seqs x {ctx}, 61 layers scaled from 26"))  # fmt: skip
    mla_us = {
        (m["batch"], m["context"]): m["graph_seconds"]
        for m in mla["rows"]
        if m["variant"] == "tma-split-64x2"
    }
    base = rows[("decode", 32)]
    extra = LAYERS * (mla_us[(32, 16000)] - mla_us[(32, 2000)])
    points.append(point("decode", 32, 32, 32 * 16000, 32 * 16000, base["scaled_step_s"] + extra,
                        f"derived: decode 32 x 2000 + 61 x mla_decode(32 x 16000 - 32 x 2000) = +{extra * 1e3:.1f} ms"))  # fmt: skip
    prefill = rows[("prefill", 8)]
    t, per = prefill["tokens_per_rank"], prefill["tokens_per_rank"] // prefill["seqs_per_rank"]
    points.append(point("prefill", 8, t, t, 8 * pairs(per, per), prefill["scaled_step_s"],
                        f"measured: rank_sim prefill 8 prompts x {per}, eager, 61 layers scaled from 26"))  # fmt: skip
    floors = {}
    for seqs in (32, 256):
        eager = rows[("decode", seqs)]["eager_s"] * LAYERS / BUILT
        floors[seqs] = eager
        points.append(point("prefill", 1, seqs, seqs, pairs(seqs, seqs), eager,
                            f"derived: the floor of an eager step, rank_sim's eager decode at {seqs} seqs x 61/26"))  # fmt: skip
    sdpa = {(r["case"], r["variant"]): r["us"] for r in attention["rows"] if "us" in r}
    more_keys = (
        LAYERS
        * (sdpa[("2048 q / 8192 k", "unpadded, default")] - sdpa[("2048 q / 2048 k", "unpadded, default")])
        / 1e6
    )
    expansion = (
        6144
        * LAYERS
        * KV_B_FLOPS_PER_TOKEN
        / (EXPANSION_EFFICIENCY * rank_sim["ceilings"]["bf16_flops_per_s"])
    )
    fresh = floors[32] + (prefill["scaled_step_s"] - floors[32]) * 2048 / t
    points.append(point("prefill", 1, 2048, 8192, pairs(2048, 8192), fresh + more_keys + expansion,
                        f"derived: fresh 2048 prompt {fresh * 1e3:.0f} ms + SDPA over 8192 keys "
                        f"+{more_keys * 1e3:.0f} ms + kv_b expansion of 6144 cached +{expansion * 1e3:.0f} ms"))  # fmt: skip
    return {
        "source": (
            f"one DeepSeek-V3 rank of 8 on an {rank_sim['device']} (rank_sim, mla_sweep, prefill_attention of "
            f"{perf}); decode from CUDA graphs, prefill eager; all-to-all not included"
        ),
        "date": rank_sim["date"],
        "points": points,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--perf", type=Path, default=Path("docs/perf/2026-11-23-pass2"))
    parser.add_argument("--out", type=Path, default=Path("gpu_points.json"))
    args = parser.parse_args()
    for name in ("rank_sim.json", "mla_sweep.json", "prefill_attention.json"):
        if not (args.perf / name).is_file():
            raise SystemExit(
                f"{args.perf / name} is missing: --perf names a docs/perf run folder with all three"
            )
    payload = build(args.perf)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    for p in payload["points"]:
        print(
            f"  {p['kind']:7} B {p['seqs']:3} T {p['tokens']:6} S {p['context_tokens']:7}: {p['seconds'] * 1e3:8.1f} ms  {p['note']}"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
