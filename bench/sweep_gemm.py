"""Sweep fp8_gemm's tiles at decode-step shapes (256 tokens) of DeepSeek-V3's dense projections.

    PYTHONPATH=$PWD python bench/sweep_gemm.py --out gemm_sweep.json [--tokens 256]

For q_a_proj (1536 x 7168), kv_a_proj_with_mqa (576 x 7168), the stacked qkv_a (2112 x 7168) and
o_proj (7168 x 16384): `default_config`'s tiles, then each candidate of CANDIDATES (tiles, warps,
stages) at every split-K count that leaves no split empty, each checked once against
`fp8_gemm_ref` and timed from a CUDA graph that cycles weight copies worth 150 MB (weights
larger than L2 read from memory, as in the model). Ratios: the weight bytes over the measured
copy rate (the issue's weight-bandwidth roofline) and max(all bytes / copy, FLOPs / FP8 rate),
with ceilings measured after a warm-up in the same run. Prints the best candidate per weight.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import torch
import triton

import kernels as bench
from nmoe_serve.kernels import num_sms
from nmoe_serve.kernels.fp8_format import FP8_BLOCK, quantize_weight_blocks
from nmoe_serve.kernels.fp8_gemm import default_config, fp8_gemm_ref, fp8_gemm_with_config, gluon_available
from nmoe_serve.kernels.fp8_quant import fp8_quant

WEIGHTS = (
    ("q_a_proj", 1536, 7168),
    ("kv_a_proj_with_mqa", 576, 7168),
    ("qkv_a_proj", 2112, 7168),
    ("o_proj", 7168, 16384),
)
# (BLOCK_T, BLOCK_W, SWAP_AB, num_warps, num_stages): token tiles as M (SWAP_AB False) or the
# weight tile as M with tokens as N (SWAP_AB True).
CANDIDATES = (
    (128, 128, False, 8, 3),
    (128, 128, False, 8, 4),
    (64, 128, False, 4, 4),
    (128, 64, False, 4, 4),
    (256, 128, False, 8, 3),
    (64, 64, False, 4, 5),
    (256, 64, True, 8, 3),
    (128, 128, True, 8, 3),
)
SPLITS = (1, 2, 3, 4, 6, 8, 12, 16)
# The Gluon kernel's (BLOCK_T, BLOCK_W, STAGES, num_warps), where it is available (Hopper).
GLUON_CANDIDATES = ((128, 128, 4, 8), (64, 128, 4, 4), (64, 128, 6, 4), (128, 64, 5, 4), (64, 64, 6, 4))


def _cfg(bt: int, bw: int, swap: bool, warps: int, stages: int, split: int) -> dict:
    return dict(BLOCK_T=bt, BLOCK_W=bw, SWAP_AB=swap, num_warps=warps, num_stages=stages, SPLIT_K=split)


def sweep_weight(
    ceil: dict, name: str, n: int, k: int, t: int, reps: int, gluon: bool, triton_tiles: bool
) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(n + k)
    w, s = quantize_weight_blocks(torch.randn(n, k, generator=g, device="cuda") * k**-0.5)
    x8, xs = fp8_quant(torch.randn(t, k, generator=g, device="cuda", dtype=torch.bfloat16))
    ref = fp8_gemm_ref(x8, xs, w, s).float()
    copies = [(w, s)] + [(w.clone(), s.clone()) for _ in range(min(15, math.ceil(150e6 / w.numel()) - 1))]
    k_blocks = triton.cdiv(k, FP8_BLOCK)
    weight_roof = n * k / ceil["copy_bytes_per_s"]
    nbytes = n * k + t * k + t * n * 2
    roof = max(nbytes / ceil["copy_bytes_per_s"], 2 * t * n * k / ceil["fp8_flops_per_s"])
    default = default_config(t, n, k, num_sms(torch.device("cuda")))
    splits = [
        sp for sp in SPLITS if sp <= k_blocks and triton.cdiv(k_blocks, triton.cdiv(k_blocks, sp)) == sp
    ]
    cands = [("default", default)] + [
        (f"{bt}x{bw}{'s' if sw else ''} w{wa} st{st} k{sp}", _cfg(bt, bw, sw, wa, st, sp))
        for bt, bw, sw, wa, st in (CANDIDATES if triton_tiles else ())
        for sp in splits
    ]
    if gluon:
        cands.append(("gluon-default", default_config(t, n, k, num_sms(torch.device("cuda")), gluon=True)))
        cands += [
            (
                f"gluon {bt}x{bw} st{st} w{wa} k{sp}",
                dict(VARIANT="gluon", BLOCK_T=bt, BLOCK_W=bw, STAGES=st, num_warps=wa, SPLIT_K=sp),
            )
            for bt, bw, st, wa in GLUON_CANDIDATES
            for sp in splits
        ]
    rows = []
    for label, cfg in cands:
        y = torch.empty(t, n, dtype=torch.bfloat16, device="cuda")
        try:
            fp8_gemm_with_config(x8, xs, w, s, y, cfg)
            err = ((y.float() - ref).norm() / ref.norm()).item()
            if not err < 2e-2:
                rows.append(dict(weight=name, label=label, cfg=cfg, error=f"wrong: rel err {err:.3g}"))
                continue
            fns = [
                lambda w=w, s=s, y=y, cfg=cfg: fp8_gemm_with_config(x8, xs, w, s, y, cfg) for w, s in copies
            ]
            sec = bench.graph_time(fns, reps)
        except Exception as e:  # a candidate that does not compile or launch is reported, not fatal
            rows.append(dict(weight=name, label=label, cfg=cfg, error=f"{type(e).__name__}: {str(e)[:200]}"))
            continue
        rows.append(
            dict(
                weight=name, n=n, k=k, tokens=t, label=label, cfg=cfg, graph_seconds=sec, rel_err=err,
                graph_weight_bw_ratio=weight_roof / sec, graph_roofline_ratio=roof / sec,
            )
        )  # fmt: skip
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("gemm_sweep.json"))
    parser.add_argument("--tokens", type=int, action="append", help="default: 256")
    parser.add_argument("--no-triton-tiles", action="store_true", help="only the defaults and Gluon's")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    bench.warm_up(3.0)
    ceil = bench.ceilings(args.reps)
    started = time.time()
    rows: list[dict] = []
    gluon, why = gluon_available(torch.device("cuda"))
    print(f"Gluon kernel: {why}", flush=True)
    for (name, n, k), tokens in itertools.product(WEIGHTS, args.tokens or [256]):
        got = sweep_weight(ceil, name, n, k, tokens, args.reps, gluon, not args.no_triton_tiles)
        rows += got
        timed = sorted((r for r in got if "graph_seconds" in r), key=lambda r: r["graph_seconds"])
        for r in got:
            if "error" in r and r["label"].startswith("gluon"):
                print(f"  {r['label']}: {r['error']}", flush=True)
        default = next(r for r in got if r["label"] == "default")
        best = timed[0]
        print(
            f"{name:>20} T={tokens}: default {default.get('graph_seconds', float('nan')) * 1e6:7.1f} us "
            f"({default.get('graph_weight_bw_ratio', 0):.0%} of weight BW), best {best['label']:>24} "
            f"{best['graph_seconds'] * 1e6:7.1f} us ({best['graph_weight_bw_ratio']:.0%} weight BW, "
            f"{best['graph_roofline_ratio']:.0%} roofline); next: "
            + ", ".join(f"{r['label']} {r['graph_seconds'] * 1e6:.1f}" for r in timed[1:4])
            + f"  [{time.time() - started:.0f} s]",
            flush=True,
        )
    args.out.write_text(
        json.dumps(dict(device=torch.cuda.get_device_name(), ceilings=ceil, rows=rows), indent=2)
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
