"""One fused_moe call at a DeepSeek-V3 expert-parallel decode shape, for a profiler to wrap.

    ncu --clock-control none -k regex:gemm --launch-skip 4 --launch-count 2 \
        python3 bench/moe_once.py --per-rank 256 --variant gluon

Rank 0 of 8 (32 of 256 experts), fed the tokens that routing of all ranks' `per_rank` tokens
sends it (bench/kernels.py's shapes); two warm-up calls (compilation), then one more.
"""

from __future__ import annotations

import argparse

import torch

import kernels as bench_kernels  # bench/kernels.py: shapes, routing, weights
from nmoe_serve.kernels.fused_moe import fused_moe


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--per-rank", type=int, default=256)
    parser.add_argument(
        "--variant",
        choices=["triton", "gluon"],
        default="triton",
        help="gluon: as default_config picks it (decode or prefill GEMMs)",
    )
    args = parser.parse_args()
    g = torch.Generator(device="cuda").manual_seed(args.per_rank)
    ids, weights, _ = bench_kernels.rank0_tokens(args.per_rank, g)
    x = torch.randn(ids.shape[0], bench_kernels.H, generator=g, device="cuda", dtype=torch.bfloat16)
    w13, w2, s13, s2 = bench_kernels.moe_weights(True, g)
    for _ in range(3):
        fused_moe(x, ids, weights, w13, w2, 0, s13, s2, gluon=args.variant == "gluon")
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
