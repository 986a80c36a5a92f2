"""Kernel benchmarks at DeepSeek-V3 shapes, against the roofline and the torch reference.

    python bench/kernels.py [--out results.json] [--quick] [--peers]

Warms the GPU to its working clocks first (a few seconds of bf16 matmuls: an idle H200 sits at
345 MHz, and ceilings read cold overstated every ratio by ~5%), then measures the device's own
ceilings (device-to-device copy bandwidth, bf16 matmul and FP8 `torch._scaled_mm` rates at
8192^3); every result row carries the ceilings it was divided by. It then times each kernel with CUDA events (median of repeats
after warm-up) twice: the whole eager call (host overhead included) and its replay from a CUDA
graph (device time alone, as the engine runs decode; prefill MoE is timed eagerly only). It
reports bytes and FLOPs counted, the roofline time (bytes / copy bandwidth or FLOPs / matmul
rate, whichever is larger), the ratio roofline / measured for both timings, and the speed-up of
the eager call over the torch reference. Expert-parallel shapes are those of one rank of 8 (32 of 256 experts), fed
the tokens that real group-limited routing of all 8 ranks' tokens sends to it.

Each mla_decode shape also gets `mla_decode_fp8` rows (the FP8 latent cache, kernels/kv_fp8.py:
592-byte rows), its default config and, at 256 x 2000, each of its VARIANTS: roofline from the
FP8 cache's bytes and the FP8 matmul rate, `over_bf16_graph` = the bf16 kernel's graph time over
this row's, and the error against the bf16 torch reference on the unquantized rows
(`rel_err_vs_bf16`) and against `mla_decode_fp8_ref` (`rel_err`).

--peers adds, where it imports, FlashInfer's MLA decode (FA3 backend, through the engine's own
adapter, model/decode_attention.py) to every mla_decode row: same inputs, same timers, its error
against the torch reference, and the host time of its per-step plan.
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
from report import cuda_time, warm_up

from nmoe_serve.kernels.fp8_format import quantize_weight_blocks
from nmoe_serve.kernels.fp8_gemm import GLUON_MIN_T, fp8_gemm, fp8_gemm_ref
from nmoe_serve.kernels.fp8_gemm import gluon_available as fp8_gemm_gluon_available
from nmoe_serve.kernels.fp8_quant import fp8_quant, fp8_quant_ref
from nmoe_serve.kernels.fused_moe import fused_moe, fused_moe_ref
from nmoe_serve.kernels.gather_sum import gather_sum, gather_sum_ref
from nmoe_serve.kernels.kv_fp8 import KV_FP8_TAIL, quantize_kv_rows_ref
from nmoe_serve.kernels.mla_decode import mla_decode, mla_decode_ref
from nmoe_serve.kernels.mla_decode_fp8 import VARIANTS as FP8_MLA_VARIANTS
from nmoe_serve.kernels.mla_decode_fp8 import (
    default_config as fp8_mla_config,
)
from nmoe_serve.kernels.mla_decode_fp8 import (
    gluon_available as fp8_mla_gluon_available,
)
from nmoe_serve.kernels.mla_decode_fp8 import (
    gluon_config as fp8_mla_gluon_config,
)
from nmoe_serve.kernels.mla_decode_fp8 import (
    mla_decode_fp8,
    mla_decode_fp8_ref,
    mla_decode_fp8_with_config,
    variant_config,
)
from nmoe_serve.model.transport import combine_index

H, INTER, E, K, GROUPS, TOPK_GROUPS = 7168, 2048, 256, 8, 8, 4
EP, HEADS, LATENT, ROPE, PAGE = 8, 128, 512, 64, 64
E_LOCAL = E // EP


def graph_time(fns, reps: int, inner: int = 10) -> float:
    """Median seconds per call of the callables `fns` (one, or a list cycled through so that
    their inputs exceed L2) replayed from a CUDA graph of `inner` calls: the device time without
    the host's launch overhead, as the engine runs decode."""
    fns = fns if isinstance(fns, list) else [fns]
    inner = max(inner, len(fns))
    for fn in fns:
        fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fns[0]()  # warm the caching allocator on the side stream, as graph capture wants
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(inner):
            fns[i % len(fns)]()
    seconds = cuda_time(graph.replay, reps) / inner
    del graph
    return seconds


def ceilings(reps: int) -> dict[str, float]:
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_s = cuda_time(lambda: dst.copy_(src), reps)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    mm_s = cuda_time(lambda: a @ b, reps)
    out = {"copy_bytes_per_s": 2 * n / copy_s, "bf16_flops_per_s": 2 * 8192**3 / mm_s}
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
    one = torch.tensor(1.0, device="cuda")
    try:
        s8 = cuda_time(
            lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), reps
        )
        out["fp8_flops_per_s"] = 2 * 8192**3 / s8
    except (RuntimeError, TypeError) as e:  # no FP8 tensor cores
        print(f"fp8 _scaled_mm unavailable: {e}")
    return out


def route(tokens: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 routing of random tokens: sigmoid scores, 4 of 8 groups, top-8, normalised × 2.5."""
    scores = torch.rand(tokens, E, generator=generator, device="cuda")
    grouped = scores.view(tokens, GROUPS, -1)
    chosen = grouped.topk(2, dim=-1).values.sum(-1).topk(TOPK_GROUPS, dim=-1).indices
    keep = torch.zeros(tokens, GROUPS, dtype=torch.bool, device="cuda").scatter_(1, chosen, True)
    ids = grouped.masked_fill(~keep[..., None], -1.0).flatten(1).topk(K, dim=-1).indices
    weights = scores.gather(1, ids)
    return ids, (weights / weights.sum(-1, keepdim=True) * 2.5).float()


def rank0_tokens(per_rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The routed tokens rank 0 (experts 0..31) receives when each of 8 ranks has `per_rank` tokens."""
    ids, weights = route(EP * per_rank, generator)
    mine = (ids < E_LOCAL).any(dim=1)
    ids, weights = ids[mine].contiguous(), weights[mine].contiguous()
    return ids, weights, int((ids < E_LOCAL).sum())


def moe_weights(fp8: bool, generator: torch.Generator):
    w13 = (
        torch.randn(E_LOCAL, 2 * INTER, H, generator=generator, device="cuda", dtype=torch.bfloat16) * H**-0.5
    )
    w2 = (
        torch.randn(E_LOCAL, H, INTER, generator=generator, device="cuda", dtype=torch.bfloat16) * INTER**-0.5
    )
    if not fp8:
        return w13, w2, None, None
    q13 = [quantize_weight_blocks(w) for w in w13]
    q2 = [quantize_weight_blocks(w) for w in w2]
    return (
        torch.stack([q for q, _ in q13]),
        torch.stack([q for q, _ in q2]),
        torch.stack([s for _, s in q13]),
        torch.stack([s for _, s in q2]),
    )


def timing_row(
    shape: dict,
    seconds: float,
    graph_seconds: float,
    ref_seconds: float,
    nbytes: int,
    roof: float,
    flops: float | None = None,
    ceilings_used: dict[str, float] | None = None,
) -> dict:
    """One result row: `shape` (kernel name and its sizes), the eager and graph times, the work
    counted, the roofline time and its ratios (with the ceilings it was divided by), and the
    speed-up over the torch reference."""
    row = dict(shape, seconds=seconds, graph_seconds=graph_seconds, bytes=nbytes)
    if flops is not None:
        row["flops"] = flops
    return row | {
        "roofline_seconds": roof,
        "roofline_ratio": roof / seconds,
        "graph_roofline_ratio": roof / graph_seconds,
        "ref_seconds": ref_seconds,
        "speedup": ref_seconds / seconds,
        "ceilings": dict(ceilings_used or {}),
    }


def used(ceil: dict, *names: str) -> dict[str, float]:
    """The ceilings of `names` that a row's roofline divided by."""
    return {k: ceil[k] for k in names if k in ceil}


def mla_work(batch: int, context: int) -> dict:
    """Bytes and FLOPs of one MLA decode call at DeepSeek-V3 dims: the K/V cache read (the
    issue's roofline), q and the output, and the FLOPs of the scores and the weighted sum."""
    return {
        "kv_bytes": batch * context * (LATENT + ROPE) * 2,
        "q_out_bytes": batch * HEADS * (2 * LATENT + ROPE) * 2,
        "flops": 2 * batch * HEADS * context * (LATENT + ROPE + LATENT),
    }


def bench_moe(
    ceil: dict, per_rank: int, fp8: bool, reps: int, prefill: bool, gluon: bool = False
) -> list[dict]:
    """One row for the Triton kernels and, with `gluon` (FP8), one for the Gluon GEMMs (decode or
    prefill, as `default_config` picks them) on the same inputs, with its error against the
    reference."""
    g = torch.Generator(device="cuda").manual_seed(per_rank)
    ids, weights, pairs = rank0_tokens(per_rank, g)
    t = ids.shape[0]
    x = torch.randn(t, H, generator=g, device="cuda", dtype=torch.bfloat16)
    w13, w2, s13, s2 = moe_weights(fp8, g)
    ref_reps = 1 if prefill else 3
    ref_seconds = cuda_time(lambda: fused_moe_ref(x, ids, weights, w13, w2, 0, s13, s2), ref_reps, warmup=1)
    rows = [
        _moe_row(ceil, per_rank, fp8, reps, prefill, ids, weights, x, w13, w2, s13, s2, pairs, ref_seconds)
    ]
    if gluon and fp8:
        want = fused_moe_ref(x, ids, weights, w13, w2, 0, s13, s2).float()
        got = fused_moe(x, ids, weights, w13, w2, 0, s13, s2, gluon=True).float()
        row = _moe_row(
            ceil, per_rank, fp8, reps, prefill, ids, weights, x, w13, w2, s13, s2, pairs, ref_seconds, True
        )
        row["rel_err"] = ((got - want).norm() / want.norm()).item()
        row["max_err_of_range"] = ((got - want).abs().max() / want.abs().max()).item()
        rows.append(row)
    return rows


def _moe_row(
    ceil, per_rank, fp8, reps, prefill, ids, weights, x, w13, w2, s13, s2, pairs, ref_seconds, gluon=False
) -> dict:
    t = ids.shape[0]
    run = lambda: fused_moe(x, ids, weights, w13, w2, 0, s13, s2, gluon=gluon)  # noqa: E731
    seconds = cuda_time(run, reps)
    graph_seconds = seconds if prefill else graph_time(run, reps)
    wbytes = w13.numel() * w13.element_size() + w2.numel() * w2.element_size()
    abytes = x.numel() * 2 * 2 + ids.numel() * 8 + weights.numel() * 4
    flops = 2 * pairs * 3 * INTER * H
    rate = ceil["fp8_flops_per_s"] if fp8 and "fp8_flops_per_s" in ceil else ceil["bf16_flops_per_s"]
    roof = max((wbytes + abytes) / ceil["copy_bytes_per_s"], flops / rate)
    shape = {
        "kernel": "fused_moe",
        "phase": "prefill" if prefill else "decode",
        "weights": "fp8" if fp8 else "bf16",
        "seqs_or_tokens_per_rank": per_rank,
        "tokens_received": t,
        "local_pairs": pairs,
        "variant": "gluon" if gluon else "triton",
    }
    rate_name = "fp8_flops_per_s" if fp8 and "fp8_flops_per_s" in ceil else "bf16_flops_per_s"
    ceils = used(ceil, "copy_bytes_per_s", rate_name)
    return timing_row(shape, seconds, graph_seconds, ref_seconds, wbytes + abytes, roof, flops, ceils) | {
        "weight_bw_ratio": (wbytes / ceil["copy_bytes_per_s"]) / seconds,
        "graph_weight_bw_ratio": (wbytes / ceil["copy_bytes_per_s"]) / graph_seconds,
        "flop_rate_ratio": (flops / rate) / seconds,
    }


def flashinfer_peer():  # type: ignore[no-untyped-def]
    """The flashinfer module, or None (and why) where it does not import."""
    try:
        import flashinfer  # type: ignore[import-not-found]
        import flashinfer.mla  # type: ignore[import-not-found]
    except Exception as e:
        print(f"--peers: flashinfer does not import ({type(e).__name__}: {e})", flush=True)
        return None
    print(f"--peers: flashinfer {getattr(flashinfer, '__version__', '?')}", flush=True)
    return flashinfer


def bench_mla_peer(flashinfer, q, q_pe, kv, table, lens, scale, ref, roof, reps: int) -> dict:  # type: ignore[no-untyped-def]
    """FlashInfer's FA3 MLA decode on the same inputs and timers as ours: `peer_*` columns."""
    from nmoe_serve.model.decode_attention import FlashInferDecode

    core = FlashInferDecode(
        flashinfer, HEADS, LATENT, ROPE, PAGE, scale, torch.bfloat16, torch.device("cuda")
    )
    lens_host = lens.cpu().numpy()
    started = time.perf_counter()
    core.plan(lens_host, table, graph=False)  # first plan: JIT build or load of the module
    first_plan_s = time.perf_counter() - started
    plan_s = []
    for _ in range(5):
        t0 = time.perf_counter()
        core.plan(lens_host, table, graph=False)
        torch.cuda.synchronize()
        plan_s.append(time.perf_counter() - t0)
    run = lambda: core(q, q_pe, kv, None, scale)  # noqa: E731
    out = run()
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    seconds = cuda_time(run, reps)
    graph_seconds = graph_time(run, reps)
    return {
        "peer": "flashinfer-fa3",
        "peer_seconds": seconds,
        "peer_graph_seconds": graph_seconds,
        "peer_graph_roofline_ratio": roof / graph_seconds,
        "peer_rel_err": err,
        "peer_plan_host_seconds": sorted(plan_s)[len(plan_s) // 2],
        "peer_first_plan_seconds": first_plan_s,
    }


def mla_inputs(batch: int, context: int) -> tuple[torch.Tensor, ...]:
    """(kv [NP, P, L + R] bf16, page table [B, W], context lens [B], q [B, N, L], q_pe [B, N, R]):
    a random decode step of `batch` sequences of `context` tokens, the same for a given shape."""
    g = torch.Generator(device="cuda").manual_seed(batch * 7 + context)
    pages_per_seq = math.ceil(context / PAGE)
    num_pages = batch * pages_per_seq
    kv = torch.randn(num_pages, PAGE, LATENT + ROPE, generator=g, device="cuda", dtype=torch.bfloat16)
    table = torch.randperm(num_pages, generator=g, device="cuda").view(batch, pages_per_seq).int()
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, HEADS, LATENT, generator=g, device="cuda", dtype=torch.bfloat16)
    q_pe = torch.randn(batch, HEADS, ROPE, generator=g, device="cuda", dtype=torch.bfloat16)
    return kv, table, lens, q, q_pe


def bench_mla(ceil: dict, batch: int, context: int, reps: int, flashinfer=None, gluon: bool = False) -> dict:  # type: ignore[no-untyped-def]
    """mla_decode at one shape: the Triton kernel, or with `gluon` kernels/mla_decode_gluon.py's
    (row "variant"); the peer (FlashInfer) beside it where given."""
    kv, table, lens, q, q_pe = mla_inputs(batch, context)
    scale = 192**-0.5
    seconds = cuda_time(lambda: mla_decode(q, q_pe, kv, table, lens, scale, gluon=gluon), reps)
    graph_seconds = graph_time(lambda: mla_decode(q, q_pe, kv, table, lens, scale, gluon=gluon), reps)
    ref_seconds = cuda_time(lambda: mla_decode_ref(q, q_pe, kv, table, lens, scale), 3, warmup=1)
    work = mla_work(batch, context)
    nbytes = work["kv_bytes"] + work["q_out_bytes"]
    roof = max(nbytes / ceil["copy_bytes_per_s"], work["flops"] / ceil["bf16_flops_per_s"])
    shape = {
        "kernel": "mla_decode",
        "batch": batch,
        "context": context,
        "variant": "gluon" if gluon else "triton",
    }
    ref = mla_decode_ref(q, q_pe, kv, table, lens, scale)
    ours = mla_decode(q, q_pe, kv, table, lens, scale, gluon=gluon)
    ceils = used(ceil, "copy_bytes_per_s", "bf16_flops_per_s")
    row = timing_row(shape, seconds, graph_seconds, ref_seconds, nbytes, roof, work["flops"], ceils)
    row["rel_err"] = ((ours.float() - ref.float()).norm() / ref.float().norm()).item()
    if flashinfer is not None:
        try:
            row |= bench_mla_peer(flashinfer, q, q_pe, kv, table, lens, scale, ref, roof, reps)
            row["ours_over_peer_graph"] = graph_seconds / row["peer_graph_seconds"]
        except Exception as e:  # a peer that fails is reported, not fatal
            traceback.print_exc()
            row["peer_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return row


def bench_mla_fp8(
    ceil: dict, batch: int, context: int, reps: int, bf16_row: dict, gluon: bool = False
) -> list[dict]:
    """`mla_decode_fp8` at the shape of `bf16_row` (the same random cache, quantized; the fastest of
    our bf16 kernels, which `over_bf16_graph` divides): the Triton kernel's default config, with
    `gluon` the Gluon kernel's (kernels/mla_decode_fp8_gluon.py) and, at 256 x 2000, each variant."""
    kv, table, lens, q, q_pe = mla_inputs(batch, context)
    scale = 192**-0.5
    kv8 = quantize_kv_rows_ref(kv.view(-1, LATENT + ROPE), LATENT).view(kv.shape[0], PAGE, -1)
    ref = mla_decode_fp8_ref(q, q_pe, kv8, table, lens, scale).float()
    ref_bf16 = mla_decode_ref(q, q_pe, kv, table, lens, scale).float()
    ref_seconds = cuda_time(lambda: mla_decode_fp8_ref(q, q_pe, kv8, table, lens, scale), 2, warmup=1)
    work = mla_work(batch, context)
    nbytes = batch * context * (LATENT + ROPE + KV_FP8_TAIL) + work["q_out_bytes"]
    fp8_rate = ceil.get("fp8_flops_per_s", 2 * ceil["bf16_flops_per_s"])
    roof = max(nbytes / ceil["copy_bytes_per_s"], work["flops"] / fp8_rate)
    ceils = used(ceil, "copy_bytes_per_s", "fp8_flops_per_s")
    base = fp8_mla_config(
        batch,
        HEADS,
        LATENT,
        ROPE,
        PAGE,
        table.shape[1] * PAGE,
        torch.cuda.get_device_properties(0).multi_processor_count,
    )
    configs = [("default", base)]
    if gluon:
        configs.append(("gluon", fp8_mla_gluon_config(base)))
    if (batch, context) == (256, 2000):
        configs += [(name, variant_config(base, name)) for name in FP8_MLA_VARIANTS]
    rows = []
    for name, cfg in configs:
        try:

            def call(cfg=cfg, name=name):  # type: ignore[no-untyped-def]
                if name in ("default", "gluon"):
                    return mla_decode_fp8(q, q_pe, kv8, table, lens, scale, gluon=name == "gluon")
                return mla_decode_fp8_with_config(q, q_pe, kv8, table, lens, scale, cfg)

            out = call().float()
            seconds = cuda_time(call, reps)
            graph_seconds = graph_time(call, reps)
        except Exception as e:  # a variant that fails to compile or run is reported, not fatal
            traceback.print_exc()
            print(
                f"mla_decode_fp8 {name} at {batch} x {context} failed: {type(e).__name__}: {str(e)[:300]}",
                flush=True,
            )
            continue
        shape = {"kernel": "mla_decode_fp8", "batch": batch, "context": context, "variant": name}
        row = timing_row(shape, seconds, graph_seconds, ref_seconds, nbytes, roof, work["flops"], ceils)
        row["rel_err"] = ((out - ref).norm() / ref.norm()).item()
        row["rel_err_vs_bf16"] = ((out - ref_bf16).norm() / ref_bf16.norm()).item()
        row["over_bf16_graph"] = bf16_row["graph_seconds"] / graph_seconds
        row["splits"] = cfg["NUM_SPLITS"]
        rows.append(row)
    return rows


def bench_fp8_gemm(ceil: dict, name: str, n: int, k: int, t: int, reps: int, gluon: bool = False) -> dict:
    """fp8_gemm at one shape as the backend runs it: with `gluon` (the backend's choice on Hopper)
    the Gluon kernel from GLUON_MIN_T tokens, the Triton one below (the row's `variant` says which)."""
    g = torch.Generator(device="cuda").manual_seed(n + k + t)
    w, s = quantize_weight_blocks(torch.randn(n, k, generator=g, device="cuda") * k**-0.5)
    x8, xs = fp8_quant(torch.randn(t, k, generator=g, device="cuda", dtype=torch.bfloat16))
    seconds = cuda_time(lambda: fp8_gemm(x8, xs, w, s, gluon=gluon), reps)
    # Small weights fit in L2 (50 MB on an H100): cycle through copies worth 150 MB.
    copies = [(w, s)] + [(w.clone(), s.clone()) for _ in range(min(15, math.ceil(150e6 / w.numel()) - 1))]
    graph_seconds = graph_time(
        [lambda w=w, s=s: fp8_gemm(x8, xs, w, s, gluon=gluon) for w, s in copies], reps
    )
    del copies
    ref_seconds = cuda_time(lambda: fp8_gemm_ref(x8, xs, w, s), 3, warmup=1)
    nbytes = n * k + t * k + t * n * 2
    flops = 2 * t * n * k
    roof = max(
        nbytes / ceil["copy_bytes_per_s"], flops / ceil.get("fp8_flops_per_s", ceil["bf16_flops_per_s"])
    )
    variant = "gluon" if gluon and t >= GLUON_MIN_T else "triton"
    shape = {"kernel": "fp8_gemm", "weight": name, "n": n, "k": k, "tokens": t, "variant": variant}
    rate_name = "fp8_flops_per_s" if "fp8_flops_per_s" in ceil else "bf16_flops_per_s"
    ceils = used(ceil, "copy_bytes_per_s", rate_name)
    row = timing_row(shape, seconds, graph_seconds, ref_seconds, nbytes, roof, flops, ceils)
    # The measure for these projections: the weight bytes alone at the copy rate.
    weight_roof = n * k / ceil["copy_bytes_per_s"]
    return row | {
        "weight_bw_ratio": weight_roof / seconds,
        "graph_weight_bw_ratio": weight_roof / graph_seconds,
    }


def bench_fp8_quant(ceil: dict, t: int, reps: int) -> dict:
    x = torch.randn(t, H, device="cuda", dtype=torch.bfloat16)
    seconds = cuda_time(lambda: fp8_quant(x), reps)
    graph_seconds = graph_time(lambda: fp8_quant(x), reps)
    ref_seconds = cuda_time(lambda: fp8_quant_ref(x), 3, warmup=1)
    nbytes = t * H * 3 + t * (H // 128) * 4
    roof = nbytes / ceil["copy_bytes_per_s"]
    shape = {"kernel": "fp8_quant", "tokens": t}
    ceils = used(ceil, "copy_bytes_per_s")
    return timing_row(shape, seconds, graph_seconds, ref_seconds, nbytes, roof, None, ceils)


def bench_gather_sum(ceil: dict, t: int, reps: int) -> dict:
    """The expert-parallel combine of a rank with t tokens (EP 8, DeepSeek-V3 routing): the rows
    coming back from the ranks that own each token's experts, summed; beside it the bf16
    index_add the prefill exchange ran before (model/transport.py)."""
    g = torch.Generator(device="cuda").manual_seed(t)
    ids, _ = route(t, g)
    to_rank = torch.zeros(t, EP, dtype=torch.bool, device="cuda").scatter_(1, ids // E_LOCAL, True)
    _, send_token = to_rank.t().nonzero(as_tuple=True)
    index = combine_index(to_rank)  # [T, EP]
    src = torch.randn(send_token.shape[0], H, device="cuda", dtype=torch.bfloat16)  # [Ms, H]
    seconds = cuda_time(lambda: gather_sum(src, index), reps)
    graph_seconds = graph_time(lambda: gather_sum(src, index), reps)
    ref_seconds = cuda_time(lambda: gather_sum_ref(src, index), 3, warmup=1)
    index_add_seconds = cuda_time(
        lambda: torch.zeros(t, H, dtype=src.dtype, device="cuda").index_add_(0, send_token, src), reps
    )
    nbytes = src.numel() * 2 + t * H * 2 + index.numel() * 8
    roof = nbytes / ceil["copy_bytes_per_s"]
    shape = {"kernel": "gather_sum", "tokens": t, "rows": int(send_token.shape[0])}
    row = timing_row(
        shape, seconds, graph_seconds, ref_seconds, nbytes, roof, None, used(ceil, "copy_bytes_per_s")
    )
    row["index_add_bf16_seconds"] = index_add_seconds
    print(f"  bf16 index_add at {t} tokens: {index_add_seconds * 1e6:.1f} us", flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench-kernels.json"))
    parser.add_argument("--quick", action="store_true", help="fewer repeats and shapes")
    parser.add_argument("--only", choices=["moe", "mla", "gemm", "quant", "combine"], action="append")
    parser.add_argument("--peers", action="store_true", help="FlashInfer's MLA decode beside ours")
    parser.add_argument("--warmup-seconds", type=float, default=5.0, help="clock warm-up before the ceilings")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    reps = 5 if args.quick else 20
    only = set(args.only or ["moe", "mla", "gemm", "quant", "combine"])
    started = time.time()
    warm_rate = warm_up(args.warmup_seconds)
    ceil = ceilings(max(reps, 20))
    device = torch.cuda.get_device_name()
    print(
        f"{device}: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 {ceil['bf16_flops_per_s'] / 1e12:.0f} "
        f"TFLOP/s, fp8 {ceil.get('fp8_flops_per_s', 0) / 1e12:.0f} TFLOP/s (after {args.warmup_seconds:.0f} s "
        f"of warm-up, its last second at {warm_rate / 1e12:.0f} TFLOP/s)",
        flush=True,
    )
    peer = flashinfer_peer() if args.peers else None
    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        shape = {
            k: v
            for k, v in row.items()
            if k
            in (
                "phase",
                "weights",
                "seqs_or_tokens_per_rank",
                "tokens_received",
                "batch",
                "context",
                "weight",
                "tokens",
                "variant",
            )
        }
        peer = ""
        if "peer_graph_seconds" in row:
            peer = (
                f" | {row['peer']} graph {row['peer_graph_seconds'] * 1e6:.1f} us "
                f"({row['peer_graph_roofline_ratio']:.1%}, err {row['peer_rel_err']:.1e}), ours/peer "
                f"{row['ours_over_peer_graph']:.2f}"
            )
        elif "peer_error" in row:
            peer = f" | peer failed: {row['peer_error'][:120]}"
        fp8 = ""
        if "over_bf16_graph" in row:
            fp8 = (
                f" | x{row['over_bf16_graph']:.2f} over bf16 mla_decode (graphs), err {row['rel_err']:.1e} "
                f"(vs bf16 {row['rel_err_vs_bf16']:.1e}), splits {row['splits']}"
            )
        print(
            f"{row['kernel']:>10} {shape}: graph {row['graph_seconds'] * 1e6:9.1f} us "
            f"({row['graph_roofline_ratio']:6.1%}), call {row['seconds'] * 1e6:9.1f} us "
            f"({row['roofline_ratio']:6.1%}), x{row['speedup']:.1f} vs torch{peer}{fp8}  [{time.time() - started:.0f} s]",
            flush=True,
        )

    if "quant" in only:
        for t in (1, 256, 16384):
            add(bench_fp8_quant(ceil, t, reps))
    if "combine" in only:
        for t in (256, 16384):
            add(bench_gather_sum(ceil, t, reps))
    if "gemm" in only:
        gemm_gluon, why = fp8_gemm_gluon_available(torch.device("cuda"))
        print(
            f"fp8_gemm Gluon kernel from {GLUON_MIN_T} tokens: {'yes' if gemm_gluon else 'no'} ({why})",
            flush=True,
        )
        for name, n, k in (
            ("q_a_proj", 1536, 7168),
            ("kv_a_proj_with_mqa", 576, 7168),
            ("qkv_a_proj (stacked, as the model runs it)", 1536 + 576, 7168),
            ("o_proj", 7168, 16384),
        ):
            for t in (1, 32, 256, 4096):
                add(bench_fp8_gemm(ceil, name, n, k, t, reps, gluon=gemm_gluon))
    if "mla" in only:
        from nmoe_serve.kernels.mla_decode import gluon_available as mla_gluon_available

        mla_gluon, why = mla_gluon_available(torch.device("cuda"))
        print(f"mla_decode Gluon kernel: {'yes' if mla_gluon else 'no'} ({why})", flush=True)
        fp8_gluon, why = fp8_mla_gluon_available(torch.device("cuda"))
        print(f"mla_decode_fp8 Gluon kernel: {'yes' if fp8_gluon else 'no'} ({why})", flush=True)
        for batch, context in ((32, 2000), (64, 2000), (128, 2000), (256, 2000), (32, 16000)):
            bf16_row = bench_mla(ceil, batch, context, reps, peer)
            add(bf16_row)
            if mla_gluon:
                bf16_row = bench_mla(ceil, batch, context, reps, peer, gluon=True)
                add(bf16_row)
            for row in bench_mla_fp8(ceil, batch, context, reps, bf16_row, gluon=fp8_gluon):
                add(row)
    if "moe" in only:
        from nmoe_serve.kernels.fused_moe import gluon_available

        moe_gluon, why = gluon_available(torch.device("cuda"))
        print(f"fused_moe Gluon GEMMs: {'yes' if moe_gluon else 'no'} ({why})", flush=True)
        for per_rank in (32, 128, 256):
            for row in bench_moe(ceil, per_rank, fp8=True, reps=reps, prefill=False, gluon=moe_gluon):
                add(row)
        add(bench_moe(ceil, 128, fp8=False, reps=reps, prefill=False)[0])
        for row in bench_moe(ceil, 16384, fp8=True, reps=max(3, reps // 4), prefill=True, gluon=moe_gluon):
            add(row)
    ceil_end = ceilings(max(reps, 20))
    print(
        f"ceilings again at the end: copy {ceil_end['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 "
        f"{ceil_end['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s, fp8 {ceil_end.get('fp8_flops_per_s', 0) / 1e12:.0f} "
        "TFLOP/s (the rows divide by those measured before them)",
        flush=True,
    )
    result = {
        "device": device,
        "date": time.strftime("%Y-%m-%d"),
        "ceilings": ceil,
        "ceilings_at_end": ceil_end,
        "warmup_seconds": args.warmup_seconds,
        "warmup_last_second_flops_per_s": warm_rate,
        "rows": rows,
        "torch": torch.__version__,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
