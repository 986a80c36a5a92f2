"""Tile and variant sweep of fused_moe (FP8) at DeepSeek-V3 expert-parallel shapes, on one GPU.

    PYTHONPATH=$PWD python bench/sweep_moe.py --out moe_sweep.json [--only default,baseline]

Each candidate is a change to `fused_moe.default_config`'s tiles (the `default_config` docstring says what
the switches do). For each, the sweep first checks the candidate's decode and prefill tiles
against `fused_moe_ref` on a small random case, then times rank 0 of 8 (32 of 256 experts,
H 7168, I 2048, top-8) fed the tokens that group-limited routing of all ranks sends it:
decode at 32, 128 and 256 sequences per rank (graph-replayed), prefill at 16384 tokens per
rank (eager). Times: the whole call and each GEMM alone. Decode is reported against the
weight-bandwidth roofline (weight bytes / copy bandwidth), prefill against the FP8 rate, both
measured by bench/kernels.py's `ceilings`. At the DeepSeek shapes each candidate's output is
also compared with the baseline's. A candidate that fails to compile, or is wrong, is reported
and skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch
from report import cuda_time

import kernels as bench_kernels  # bench/kernels.py: timers, ceilings, shapes
from nmoe_serve.kernels.fp8_format import AMAX_EPS, FP8_MAX, quantize_weight_blocks
from nmoe_serve.kernels.fp8_quant import fp8_quant
from nmoe_serve.kernels.fused_moe import (
    GLUON_DECODE,
    GLUON_DECODE_WIDE,
    GLUON_PREFILL,
    default_config,
    fused_moe_ref,
    fused_moe_with_config,
    gluon_blocks,
    moe_align,
    moe_gather,
    moe_gemm1,
    moe_gemm2,
)

DECODE_SEQS = (32, 128, 256)
PREFILL_TOKENS = 16384


def _all(**overrides):
    """Overrides for both GEMMs in both phases."""
    return lambda cfg, phase: {g: dict(t, **overrides) for g, t in cfg.items()}


def _phase(phase_name: str, gemm: str | None = None, **overrides):
    """Overrides for one phase ("decode" or "prefill"), one GEMM ("gemm1", "gemm2") or both."""

    def change(cfg, phase):
        if phase != phase_name:
            return cfg
        return {g: dict(t, **overrides) if gemm in (None, g) else t for g, t in cfg.items()}

    return change


def _decode_bt64(stages: int):
    """GEMM 1 with 64-token blocks as N, 8 warps (fewer blocks per expert, so fewer re-reads of
    each weight tile from L2); GEMM 2 then shares the 64-token alignment (tokens as M)."""

    def change(cfg, phase):
        if phase != "decode":
            return cfg
        gemm2 = dict(cfg["gemm1"], BLOCK_T=64, SWAP_AB=False, num_warps=8, num_stages=4)
        gemm2.pop("MERGE_GU")
        return dict(gemm1=dict(cfg["gemm1"], BLOCK_T=64, num_warps=8, num_stages=stages), gemm2=gemm2)

    return change


# name -> (phases it changes, change to `default_config`'s output)
def _gluon(**per_gemm):
    """The Gluon GEMMs as `default_config(..., gluon=True)` picks them (decode:
    kernels/fused_moe_gluon.py at 256 seqs a rank, Triton below; prefill:
    kernels/fused_moe_gluon_prefill.py), their tiles changed per GEMM: _gluon(gemm1=dict(STAGES=3))."""

    def change(cfg, phase):
        cfg = default_config(cfg["_num_pairs"], bench_kernels.E_LOCAL, fp8=True, gluon=True)
        if "VARIANT" not in cfg:  # decode at 32 and 128 seqs: the Triton tiles
            return cfg
        return {g: dict(t, **per_gemm.get(g, {})) if isinstance(t, dict) else t for g, t in cfg.items()}

    return change


def _gluon_everywhere(tiles: dict, **per_gemm):
    """Decode at every batch on one family of Gluon GEMMs, whatever `default_config` would pick:
    `GLUON_DECODE` (persistent, 64-slot blocks), `GLUON_DECODE_WIDE` (persistent, 128-slot blocks)
    or `GLUON_PREFILL` (128-slot blocks, a program an item; with 128-slot blocks, at 256 seqs a rank
    about one block an expert, so each weight tile is streamed once), tiles changed per GEMM."""

    def change(cfg, phase):
        return {g: dict(t, **per_gemm.get(g, {})) if isinstance(t, dict) else t for g, t in tiles.items()}

    return change


CANDIDATES = {
    "baseline": (("decode", "prefill"), _all(MERGE_GU=False, SCALAR_WS=False, GROUP_T=0)),
    "default": (("decode", "prefill"), lambda cfg, phase: cfg),
    "unmerged": (("decode", "prefill"), _all(MERGE_GU=False)),
    "vector-scales": (("decode", "prefill"), _all(SCALAR_WS=False)),
    "decode-g1-bt64-s3": (("decode",), _decode_bt64(3)),
    "decode-g1-bt64-s2": (("decode",), _decode_bt64(2)),
    "decode-s4": (("decode",), _phase("decode", "gemm1", num_stages=4)),
    "prefill-plain-grid": (("prefill",), _phase("prefill", GROUP_T=0)),
    "prefill-group8": (("prefill",), _phase("prefill", GROUP_T=8)),
    "prefill-group32": (("prefill",), _phase("prefill", GROUP_T=32)),
    "prefill-g1-s3": (("prefill",), _phase("prefill", "gemm1", num_stages=3)),
    "prefill-g2-bt128": (("prefill",), _phase("prefill", "gemm2", BLOCK_T=128)),
    "gluon": (("decode",), _gluon()),
    "gluon-g1s3": (("decode",), _gluon(gemm1=dict(STAGES=3))),
    "gluon-g1s5": (("decode",), _gluon(gemm1=dict(STAGES=5))),
    "gluon-g1s2c2": (("decode",), _gluon(gemm1=dict(STAGES=2, CTAS_PER_SM=2))),
    "gluon-g2s8c1": (("decode",), _gluon(gemm2=dict(STAGES=8, CTAS_PER_SM=1))),
    "gluon-g2s3c3": (("decode",), _gluon(gemm2=dict(STAGES=3, CTAS_PER_SM=3))),
    "gluon-g2w8": (("decode",), _gluon(gemm2=dict(num_warps=8))),
    "gluon-g2bw256": (("decode",), _gluon(gemm2=dict(BLOCK_W=256, num_warps=8))),
    "gluon-g2bw256s3": (("decode",), _gluon(gemm2=dict(BLOCK_W=256, num_warps=8, STAGES=3))),
    "gluon-decode-all": (("decode",), _gluon_everywhere(GLUON_DECODE)),
    "gluon-wide-decode": (("decode",), _gluon_everywhere(GLUON_DECODE_WIDE)),
    "gluon-wide-decode-g1s3": (("decode",), _gluon_everywhere(GLUON_DECODE_WIDE, gemm1=dict(STAGES=3))),
    "gluon-wide-decode-g2wide": (
        ("decode",),
        _gluon_everywhere(GLUON_DECODE_WIDE, gemm2=dict(BLOCK_T=128, STAGES=6, CTAS_PER_SM=1, num_warps=8)),
    ),
    "gluon-128slot-decode": (("decode",), _gluon_everywhere(GLUON_PREFILL)),
    "gluon-128slot-decode-flat": (
        ("decode",),
        _gluon_everywhere(GLUON_PREFILL, gemm1=dict(GROUP_T=1 << 20), gemm2=dict(GROUP_T=1 << 20)),
    ),
    "gluon-128slot-decode-s3": (
        ("decode",),
        _gluon_everywhere(GLUON_PREFILL, gemm1=dict(STAGES=3), gemm2=dict(STAGES=3)),
    ),
    "gluon-prefill": (("prefill",), _gluon()),
    "gluon-prefill-s3": (("prefill",), _gluon(gemm1=dict(STAGES=3), gemm2=dict(STAGES=3))),
    "gluon-prefill-g2s5": (("prefill",), _gluon(gemm2=dict(STAGES=5))),
    "gluon-prefill-group8": (("prefill",), _gluon(gemm1=dict(GROUP_T=8), gemm2=dict(GROUP_T=8))),
    "gluon-prefill-group32": (("prefill",), _gluon(gemm1=dict(GROUP_T=32), gemm2=dict(GROUP_T=32))),
}


def candidate_config(name: str, num_pairs: int, phase: str) -> dict:
    _, change = CANDIDATES[name]
    cfg = change(
        dict(default_config(num_pairs, bench_kernels.E_LOCAL, fp8=True), _num_pairs=num_pairs), phase
    )
    cfg.pop("_num_pairs", None)
    return cfg


def _errors(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    diff = got.float() - want.float()
    return (
        (diff.abs().max() / want.float().abs().max()).item(),
        (diff.norm() / want.float().norm()).item(),
    )


def check_small(name: str) -> str | None:
    """Run the candidate's decode and prefill tiles on a small case against fused_moe_ref; None
    when both pass, else what failed."""
    g = torch.Generator(device="cuda").manual_seed(0)
    T, H, inter, E, K, total, start = 512, 512, 256, 4, 4, 12, 2
    x = torch.randn(T, H, generator=g, device="cuda").to(torch.bfloat16)
    ids = torch.rand(T, total, generator=g, device="cuda").topk(K, dim=1).indices.to(torch.int32)
    weights = torch.rand(T, K, generator=g, device="cuda") + 0.1
    w13, s13 = quantize_weight_blocks(torch.randn(E, 2 * inter, H, generator=g, device="cuda") * H**-0.5)
    w2, s2 = quantize_weight_blocks(torch.randn(E, H, inter, generator=g, device="cuda") * inter**-0.5)
    want = fused_moe_ref(x, ids, weights, w13, w2, start, s13, s2)
    # Pair counts of decode at 32 and 256 seqs a rank and of prefill: each tile choice of _config.
    for phase, num_pairs in (("decode", 127 * 8), ("decode", 990 * 8), ("prefill", PREFILL_TOKENS * 8)):
        cfg = candidate_config(name, num_pairs, phase)
        got = fused_moe_with_config(x, ids, weights, w13, w2, start, s13, s2, cfg)
        max_err, norm_err = _errors(got, want)
        if not (max_err <= 2e-2 and norm_err <= 1e-2):
            return (
                f"{phase} tiles wrong on the small case: max {max_err:.3g} of the range, norm {norm_err:.3g}"
            )
    return None


def time_case(cfg: dict, inputs: dict, graph: bool, reps: int) -> tuple[float, float, float]:
    """Seconds of the whole call, GEMM 1 alone and GEMM 2 alone (Gluon: GEMM 1 with the gather of x
    into slot order before it)."""
    x, ids, weights, w13, w2, s13, s2 = (inputs[k] for k in ("x", "ids", "weights", "w13", "w2", "s13", "s2"))
    E, K = w13.shape[0], ids.shape[1]
    if cfg.get("VARIANT") in ("gluon", "gluon_prefill"):
        from nmoe_serve.kernels import fused_moe_gluon, fused_moe_gluon_prefill

        gemms = fused_moe_gluon if cfg["VARIANT"] == "gluon" else fused_moe_gluon_prefill

        ids_sorted, block_expert, halves = gluon_blocks(ids, E, 0, cfg)
        x8, xs = fp8_quant(x)

        def gemm1():
            xg, xgs = moe_gather(x8, xs, ids_sorted, block_expert, K)
            return gemms.gemm1(xg, xgs, w13, s13, block_expert, cfg["gemm1"], FP8_MAX, AMAX_EPS)

        h, hs = gemm1()
        calls = (
            lambda: fused_moe_with_config(x, ids, weights, w13, w2, 0, s13, s2, cfg),
            gemm1,
            lambda: gemms.gemm2(
                h, hs, w2, s2, ids_sorted, block_expert, ids.numel(), x.dtype, cfg["gemm2"], halves
            ),
        )
        if graph:
            return tuple(bench_kernels.graph_time(fn, reps) for fn in calls)  # type: ignore[return-value]
        return tuple(cuda_time(fn, reps, warmup=2) for fn in calls)  # type: ignore[return-value]
    blocks1 = moe_align(ids, E, 0, cfg["gemm1"]["BLOCK_T"])
    blocks2 = moe_align(ids, E, 0, cfg["gemm2"]["BLOCK_T"])
    x8, xs = fp8_quant(x)
    h, hs = moe_gemm1(x8, xs, w13, s13, *blocks1, K, cfg["gemm1"])
    calls = (
        lambda: fused_moe_with_config(x, ids, weights, w13, w2, 0, s13, s2, cfg),
        lambda: moe_gemm1(x8, xs, w13, s13, *blocks1, K, cfg["gemm1"]),
        lambda: moe_gemm2(h, hs, w2, s2, *blocks2, x.dtype, cfg["gemm2"]),
    )
    if graph:
        return tuple(bench_kernels.graph_time(fn, reps) for fn in calls)  # type: ignore[return-value]
    return tuple(cuda_time(fn, reps, warmup=2) for fn in calls)  # type: ignore[return-value]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("moe-sweep.json"))
    parser.add_argument("--only", help="comma-separated candidate names (default: all)")
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/sweep_moe.py needs a CUDA GPU", file=sys.stderr)
        return 2
    names = args.only.split(",") if args.only else list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        print(f"unknown candidates {unknown}; known: {', '.join(CANDIDATES)}", file=sys.stderr)
        return 2
    if "baseline" in names:
        names = ["baseline"] + [n for n in names if n != "baseline"]
    started = time.time()
    ceil = bench_kernels.ceilings(args.reps)
    copy_bw = ceil["copy_bytes_per_s"]
    fp8_rate = ceil.get("fp8_flops_per_s", ceil["bf16_flops_per_s"])
    device = torch.cuda.get_device_name()
    print(f"{device}: copy {copy_bw / 1e12:.2f} TB/s, fp8 {fp8_rate / 1e12:.0f} TFLOP/s", flush=True)

    g = torch.Generator(device="cuda").manual_seed(0)
    w13, w2, s13, s2 = bench_kernels.moe_weights(True, g)
    w13_bytes, w2_bytes = w13.numel(), w2.numel()  # fp8: one byte each
    H, inter = bench_kernels.H, bench_kernels.INTER
    shapes = [("decode", n) for n in DECODE_SEQS] + [("prefill", PREFILL_TOKENS)]
    inputs = {}
    for phase, per_rank in shapes:
        ids, weights, pairs = bench_kernels.rank0_tokens(per_rank, g)
        x = torch.randn(ids.shape[0], H, generator=g, device="cuda", dtype=torch.bfloat16)
        inputs[(phase, per_rank)] = dict(
            x=x, ids=ids, weights=weights, pairs=pairs, w13=w13, w2=w2, s13=s13, s2=s2
        )

    rows: list[dict] = []
    configs: dict[str, dict] = {}
    baseline_out: dict[tuple[str, int], torch.Tensor] = {}
    header = f"{'candidate':<20} {'shape':<16} {'call':>10} {'ratio':>7} {'gemm 1':>10} {'ratio':>7} {'gemm 2':>10} {'ratio':>7}"
    print(header, flush=True)
    for name in names:
        phases, _ = CANDIDATES[name]
        try:
            problem = check_small(name)
        except Exception as e:  # a candidate that does not compile or launch is skipped
            problem = f"{type(e).__name__}: {str(e)[:500]}"
            traceback.print_exc()
        if problem:
            print(f"{name:<20} SKIPPED: {problem}", flush=True)
            rows.append(dict(candidate=name, error=problem))
            continue
        for phase, per_rank in shapes:
            if phase not in phases:
                continue
            case = inputs[(phase, per_rank)]
            num_pairs = case["ids"].numel()
            cfg = candidate_config(name, num_pairs, phase)
            configs.setdefault(name, {})[f"{phase} {per_rank}"] = cfg
            row: dict = dict(candidate=name, phase=phase, per_rank=per_rank, tokens=case["x"].shape[0])
            row["local_pairs"] = case["pairs"]
            try:
                args_ = (case["x"], case["ids"], case["weights"], w13, w2, 0, s13, s2, cfg)
                out = fused_moe_with_config(*args_)
                key = (phase, per_rank)
                if name == "baseline":
                    baseline_out[key] = out
                elif key in baseline_out:
                    max_err, norm_err = _errors(out, baseline_out[key])
                    row.update(vs_baseline_max=max_err, vs_baseline_norm=norm_err)
                    if not (max_err <= 2e-2 and norm_err <= 1e-2):
                        raise RuntimeError(
                            f"differs from the baseline: max {max_err:.3g}, norm {norm_err:.3g}"
                        )
                del out
                reps = args.reps if phase == "decode" else max(3, args.reps // 4)
                call_s, g1_s, g2_s = time_case(cfg, case, graph=phase == "decode", reps=reps)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
                print(f"{name:<20} {phase} {per_rank}: FAILED {row['error']}", flush=True)
                rows.append(row)
                continue
            pairs = case["pairs"]
            if phase == "decode":
                ratios = (
                    (w13_bytes + w2_bytes) / copy_bw / call_s,
                    w13_bytes / copy_bw / g1_s,
                    w2_bytes / copy_bw / g2_s,
                )
                row["ratio_of"] = "weight bandwidth"
            else:
                f1, f2 = 2 * pairs * 2 * inter * H, 2 * pairs * H * inter
                ratios = ((f1 + f2) / fp8_rate / call_s, f1 / fp8_rate / g1_s, f2 / fp8_rate / g2_s)
                row["ratio_of"] = "fp8 rate"
            row.update(
                seconds=call_s,
                gemm1_seconds=g1_s,
                gemm2_seconds=g2_s,
                ratio=ratios[0],
                gemm1_ratio=ratios[1],
                gemm2_ratio=ratios[2],
            )
            rows.append(row)
            shape = f"{phase} {per_rank}"
            print(
                f"{name:<20} {shape:<16} {call_s * 1e6:8.0f}us {ratios[0]:7.1%} {g1_s * 1e6:8.0f}us {ratios[1]:7.1%} "
                f"{g2_s * 1e6:8.0f}us {ratios[2]:7.1%}  [{time.time() - started:.0f} s]",
                flush=True,
            )
    result = dict(
        device=device,
        date=time.strftime("%Y-%m-%d"),
        torch=torch.__version__,
        ceilings=ceil,
        rows=rows,
        configs=configs,
    )
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
