"""Sweep mla_decode's kernel variants (kernels.mla_decode.VARIANTS) at DeepSeek-V3 decode shapes.

    PYTHONPATH=$PWD python bench/sweep_mla.py --out mla_sweep.json [--only NAME ...] [--measure-ceilings]

For each candidate (a named variant, at `default_config`'s split count or a multiple of it): one small
correctness check against `mla_decode_ref` (bf16, N 128, L 512, R 64, P 64; lengths that leave a
partial tile, an empty split and inf in the slots past a context), then the device time replayed
from a CUDA graph (`graph_time` of bench/kernels.py) at B x context = 32/64/128/256 x 2000 and
32 x 16000. The roofline is max(K/V bytes / copy rate, FLOPs / bf16 rate), with bytes =
B * ctx * (L + R) * 2 and FLOPs = 2 * B * N * ctx * (L + R + L), at 3.0 TB/s and 782 TFLOP/s
(an H100's measured ceilings) unless --measure-ceilings. A candidate that fails to compile or
launch, or is wrong, is reported and skipped. Takes about 1-2 minutes, mostly Triton compiles.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch

import kernels as bench
from nmoe_serve.kernels import num_sms
from nmoe_serve.kernels.mla_decode import (
    VARIANTS,
    default_config,
    mla_decode_ref,
    mla_decode_with_config,
    variant_config,
)

HEADS, LATENT, ROPE, PAGE = 128, 512, 64, 64
SHAPES = ((32, 2000), (64, 2000), (128, 2000), (256, 2000), (32, 16000))
# (variant, split multiplier): every variant at `default_config`'s splits, two of them also at twice as many.
CANDIDATES = [(name, 1) for name in VARIANTS] + [("tma-split-64x2", 2), ("tma-split-32x3", 2)]
COPY_BYTES_PER_S, BF16_FLOPS_PER_S = 3.0e12, 782e12


def _inputs(lens: list[int], g: torch.Generator) -> dict:
    """bf16 q and a paged cache with each sequence's pages in random order."""
    B = len(lens)
    pages_per_seq = math.ceil(max(lens) / PAGE)
    num_pages = B * pages_per_seq
    return dict(
        q_nope=torch.randn(B, HEADS, LATENT, generator=g, device="cuda").bfloat16(),  # [B, N, L]
        q_pe=torch.randn(B, HEADS, ROPE, generator=g, device="cuda").bfloat16(),  # [B, N, R]
        kv_cache=torch.randn(num_pages, PAGE, LATENT + ROPE, generator=g, device="cuda").bfloat16(),
        page_table=torch.randperm(num_pages, generator=g, device="cuda").view(B, pages_per_seq).int(),
        context_lens=torch.tensor(lens, dtype=torch.int32, device="cuda"),  # [B]
    )


def _candidate_cfg(name: str, split_mult: int, B: int, max_context: int) -> dict:
    cfg = variant_config(
        default_config(B, HEADS, LATENT, ROPE, PAGE, 2, max_context, num_sms(torch.device("cuda"))), name
    )
    cfg["NUM_SPLITS"] = max(1, min(cfg["NUM_SPLITS"] * split_mult, math.ceil(max_context / 256), 64))
    return cfg


def _check(name: str, split_mult: int, g: torch.Generator) -> str | None:
    """None if the candidate matches the reference on a small case, else what went wrong."""
    args = _inputs([1, 63, 101, 700], g)
    scale = (LATENT + ROPE) ** -0.5
    want = mla_decode_ref(**args, softmax_scale=scale)
    for b, n in enumerate(args["context_lens"].tolist()):  # inf past each context in its last page
        args["kv_cache"][args["page_table"][b, (n - 1) // PAGE].long(), (n - 1) % PAGE + 1 :] = float("inf")
    cfg = _candidate_cfg(name, split_mult, 4, args["page_table"].shape[1] * PAGE)
    cfg["NUM_SPLITS"] = 2 * split_mult  # B = 32's count: the compiled kernel serves both (fewer compiles)
    out = mla_decode_with_config(**args, softmax_scale=scale, cfg=cfg)
    err = ((out.float() - want.float()).abs().max() / want.float().abs().max()).item()
    if not err <= 2e-2:  # also catches NaN
        return f"wrong: max error {err:.3g} of the output's range (cfg {cfg})"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("mla_sweep.json"))
    parser.add_argument("--only", action="append", help="variant names to run (default: all)")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--measure-ceilings", action="store_true", help="measure copy and bf16 rates first")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/sweep_mla.py needs a CUDA GPU", file=sys.stderr)
        return 2
    started = time.time()
    ceil = {"copy_bytes_per_s": COPY_BYTES_PER_S, "bf16_flops_per_s": BF16_FLOPS_PER_S}
    if args.measure_ceilings:
        ceil = bench.ceilings(args.reps)
    device = torch.cuda.get_device_name()
    print(
        f"{device}: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 {ceil['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s",
        flush=True,
    )
    g = torch.Generator(device="cuda").manual_seed(0)
    candidates = [c for c in CANDIDATES if not args.only or c[0] in args.only]
    failed: dict[str, str] = {}
    for name, mult in candidates:
        label = name if mult == 1 else f"{name}/splits*{mult}"
        try:
            problem = _check(name, mult, g)
        except Exception as e:  # a compile or launch failure (shared memory, registers) skips the candidate
            problem = f"failed: {type(e).__name__}: {str(e)[:300]}"
            traceback.print_exc()
        if problem:
            failed[label] = problem
            print(f"{label}: {problem}", flush=True)
    rows: list[dict] = []
    print(f"\n{'variant':28s} {'B':>4s} {'ctx':>6s} {'S':>3s} {'us':>9s} {'roofline':>9s}", flush=True)
    for B, context in SHAPES:
        inputs = _inputs([context] * B, g)
        max_context = inputs["page_table"].shape[1] * PAGE
        work = bench.mla_work(B, context)
        roof = max(work["kv_bytes"] / ceil["copy_bytes_per_s"], work["flops"] / ceil["bf16_flops_per_s"])
        for name, mult in candidates:
            label = name if mult == 1 else f"{name}/splits*{mult}"
            if label in failed:
                continue
            cfg = _candidate_cfg(name, mult, B, max_context)
            try:
                seconds = bench.graph_time(
                    lambda cfg=cfg, inputs=inputs: mla_decode_with_config(
                        **inputs, softmax_scale=192**-0.5, cfg=cfg
                    ),
                    args.reps,
                )
            except Exception as e:
                failed[label] = f"failed at B {B} x {context}: {type(e).__name__}: {str(e)[:300]}"
                print(f"{label}: {failed[label]}", flush=True)
                continue
            rows.append(
                dict(
                    variant=label,
                    batch=B,
                    context=context,
                    splits=cfg["NUM_SPLITS"],
                    cfg=cfg,
                    graph_seconds=seconds,
                    roofline_seconds=roof,
                    graph_roofline_ratio=roof / seconds,
                )
            )
            print(
                f"{label:28s} {B:4d} {context:6d} {cfg['NUM_SPLITS']:3d} {seconds * 1e6:9.1f} {roof / seconds:9.1%}"
                f"  [{time.time() - started:.0f} s]",
                flush=True,
            )
    best: dict[tuple[int, int], dict] = {}
    for row in rows:
        key = (row["batch"], row["context"])
        if key not in best or row["graph_seconds"] < best[key]["graph_seconds"]:
            best[key] = row
    print("\nfastest per shape:")
    for (B, context), row in best.items():
        print(
            f"  B {B} x {context}: {row['variant']} {row['graph_seconds'] * 1e6:.1f} us ({row['graph_roofline_ratio']:.1%})"
        )
    result = {
        "device": device,
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "ceilings": ceil,
        "failed": failed,
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} [{time.time() - started:.0f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
