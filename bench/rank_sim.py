"""One expert-parallel rank of DeepSeek-V3 on one GPU: decode step time and prefill throughput,
each against its summed per-layer roofline, and the 8-GPU node throughput they imply.

    PYTHONPATH=$PWD python bench/rank_sim.py --out rank_sim.json     # on the GPU host
    python bench/rank_sim.py --smoke                                  # small dims, any device

The rank is rank 0 of 8: its 32 of 256 routed experts, attention, dense layers and shared
experts replicated, dummy FP8 weights (load_format dummy), built with the engine's own layers
(the kernel backend: fp8_gemm, fused_moe, mla_decode, SDPA prefill) and decode CUDA graphs
(the worker's DecodeGraphs). As many of the 61 layers as fit beside the KV cache and the
prefill's transient memory are built (3 dense + n MoE layers); the rest are scaled in from the
measured time per MoE layer (the difference between the full stack and a 3 dense + 1 MoE stack,
divided by the n - 1 MoE layers between them).

The MoE all-to-all is replaced by a local feed: rank 0's experts receive the tokens that real
group-limited routing (sigmoid scores, 4 of 8 groups, top-8) of 8x the per-rank batch sends to
experts 0-31, gathered from this rank's own hidden states, and their outputs are summed back
(the combine). The network time of the exchange is not measured (one GPU): it is modeled
(`alltoall_model`) per MoE layer from the bytes the routing sends (each received token row in
FP8 with its per-128 float32 scales dispatched, in bf16 combined; the 1/8 from the rank itself
stays local), over a stated NVLink all-to-all bandwidth per GPU and a stated latency per
collective (--link-gbps, --link-latency-us: assumptions, printed with their published anchors),
and reported beside the compute-only step, with the node estimate both ways (compute only, and
communication added without overlap).

Decode: B sequences per rank (32, 128, 256), context 2000 each (KV pages filled with random
latents), one new token each; times are the median of repeats: `graph` the CUDA-graph replay
alone (device time), `step` the worker's decode step as the engine runs it (inputs to the
static buffers, replay, lm_head on the sampled rows; sampling not included), `eager` the same
forward without graphs. Prefill: 16384 new tokens per rank (8 prompts of 2048), eager.

Roofline per layer: max(bytes / copy bandwidth, FP8 FLOPs / FP8 rate + bf16 FLOPs / bf16 rate),
with bytes = the weights the step reads (FP8, kv_b_proj's bf16 copy in decode, the fp32 router)
plus the KV cache read and written; summed over 61 layers plus lm_head. The ceilings are
measured in the same run. Node throughput = 8 x tokens per rank per step / scaled step time: an
estimate that assumes the all-to-all hides under compute and the 8 ranks are balanced.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from report import cuda_time as _cuda_time
from report import warm_up
from torch import nn

from nmoe_serve.engine.plan import StepKind, StepPlan
from nmoe_serve.model.args import DEEPSEEK_V3_HF_CONFIG, ModelArgs
from nmoe_serve.model.attention import SdpaPrefill
from nmoe_serve.model.backend import choose_decode_attention, kernel_backend, reference_ops, triton_ops
from nmoe_serve.model.deepseek_v3 import DeepseekV3
from nmoe_serve.model.loader import fill_dummy
from nmoe_serve.model.mtp import DeepseekV3WithMTP
from nmoe_serve.model.rope import RotaryEmbedding
from nmoe_serve.worker.cuda_graphs import DecodeGraphs, EagerSteps
from nmoe_serve.worker.kv_cache import KVCache

EP = 8
PAGE = 64

# Published anchors for the modeled all-to-all (assumptions, not measurements of this host).
LINK_ANCHORS = (
    "DeepEP intranode (H800, NVLink): ~150-330 GB/s per GPU, dispatch and combine",
    "pplx-kernels: ~84 us dispatch at 128 tokens per rank",
)

DEEPSEEK_V3 = DEEPSEEK_V3_HF_CONFIG

# Small dims for --smoke (kernel-friendly multiples of 128; 64 experts, 8 per rank).
SMOKE = {
    "vocab_size": 1024,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "q_lora_rank": 128,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 32,
    "v_head_dim": 32,
    "n_routed_experts": 64,
    "max_position_embeddings": 16384,
    "rope_scaling": None,
}


@dataclass(frozen=True)
class Shape:
    layers: int  # total layers of the real model
    decode_batches: tuple[int, ...]
    context: int
    prefill_seqs: int
    prefill_len: int


FULL = Shape(layers=61, decode_batches=(32, 128, 256), context=2000, prefill_seqs=8, prefill_len=2048)
SMOKE_SHAPE = Shape(layers=6, decode_batches=(4, 16), context=200, prefill_seqs=2, prefill_len=256)


# --- the local feed that replaces the all-to-all -------------------------------------------------


def route(args: ModelArgs, tokens: int, g: torch.Generator, device: torch.device):  # type: ignore[no-untyped-def]
    """Group-limited top-k routing of random tokens: (ids [T, K], weights [T, K] float32)."""
    e, groups = args.n_routed_experts, args.n_expert_groups
    scores = torch.rand(tokens, e, generator=g, device=device)
    grouped = scores.view(tokens, groups, -1)
    chosen = grouped.topk(2, dim=-1).values.sum(-1).topk(args.n_limited_groups, dim=-1).indices
    keep = torch.zeros(tokens, groups, dtype=torch.bool, device=device).scatter_(1, chosen, True)
    ids = (
        grouped.masked_fill(~keep[..., None], -1.0).flatten(1).topk(args.n_activated_experts, dim=-1).indices
    )
    weights = scores.gather(1, ids)
    return ids, (weights / weights.sum(-1, keepdim=True) * args.route_scale).float()


class LocalFeed:
    """The MoE transport of the simulated rank: its experts get `ids`/`weights` for rows
    `rows` of the layer input (the tokens 8 ranks would send it), and the outputs are summed
    back into those rows by the backend's `gather_sum`, the engine's combine
    (model/transport.py)."""

    name = "local-feed"

    def __init__(self, gather_sum) -> None:  # type: ignore[no-untyped-def]
        self.gather_sum = gather_sum
        # tokens per rank -> (rows, ids, weights, index): a step may exchange at several sizes (the
        # MTP draft passes of bench/spec_step.py); a layer input of another size takes the last set
        self.routes: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.last = 0

    def set(self, args: ModelArgs, tokens_per_rank: int, seed: int, device: torch.device) -> dict:
        g = torch.Generator(device=device).manual_seed(seed)
        ids, weights = route(args, EP * tokens_per_rank, g, device)
        local = args.n_routed_experts // EP
        mine = (ids < local).any(dim=1)
        ids, weights = ids[mine].contiguous(), weights[mine].contiguous()
        received = int(ids.shape[0])
        per_token = max(tokens_per_rank, 1)
        rows = torch.arange(received, device=device) % per_token  # received row i -> token i mod T
        # The combine's index [T, R]: token t's received rows t, t + T, t + 2T, ... (-1 past the end).
        copies = -(-received // per_token)
        index = torch.arange(per_token, device=device)[:, None] + per_token * torch.arange(
            copies, device=device
        )
        index = torch.where(index < received, index, -1)
        self.routes[tokens_per_rank], self.last = (rows, ids, weights, index), tokens_per_rank
        return {"tokens_received": received, "local_pairs": int((ids < local).sum())}

    def exchange(self, x, topk_ids, topk_weights, experts, decode):  # type: ignore[no-untyped-def]
        rows, ids, weights, index = self.routes.get(int(x.shape[0]), self.routes[self.last])
        y = experts(x[rows], ids, weights)  # [Mr, H]
        out = self.gather_sum(y, index)  # [T of the route, H]
        if out.shape[0] == x.shape[0]:
            return out
        return torch.cat([out, x.new_zeros(x.shape[0] - out.shape[0], x.shape[1])])  # a larger input


# --- the modeled all-to-all -----------------------------------------------------------------------


@dataclass(frozen=True)
class LinkModel:
    """The exchange's assumed link: all-to-all bandwidth per GPU (bytes/s each way) and a fixed
    latency per collective (seconds)."""

    bytes_per_s: float
    latency_s: float


def alltoall_model(hidden: int, tokens_received: int, link: LinkModel, ep: int = EP) -> dict:
    """Modeled time of one MoE layer's exchange on a rank that receives `tokens_received` token
    rows (and, balanced, sends as many): dispatch of FP8 rows with their float32 scales per 128
    (DeepEP's FP8 dispatch), combine of bf16 rows; the (ep - 1) / ep that cross the link counted,
    two collectives."""
    remote = tokens_received * (ep - 1) / ep
    dispatch = remote * (hidden + 4 * -(-hidden // 128))
    combine = remote * hidden * 2
    return {
        "dispatch_bytes": dispatch,
        "combine_bytes": combine,
        "dispatch_s": link.latency_s + dispatch / link.bytes_per_s,
        "combine_s": link.latency_s + combine / link.bytes_per_s,
        "per_moe_layer_s": 2 * link.latency_s + (dispatch + combine) / link.bytes_per_s,
    }


def with_comm(row: dict, args: ModelArgs, link: LinkModel, tokens_per_rank: int) -> dict:
    """`row` plus the modeled exchange over all MoE layers of the real model, the step with it
    added (no overlap) and the node estimate that gives."""
    comm = alltoall_model(args.dim, row["tokens_received"], link)
    moe_layers = args.n_layers - args.n_dense_layers
    step_s = row["scaled_step_s"] + moe_layers * comm["per_moe_layer_s"]
    return row | {
        "comm_model": comm,
        "comm_step_s": moe_layers * comm["per_moe_layer_s"],
        "scaled_step_with_comm_s": step_s,
        "node_tokens_per_s_with_comm": EP * tokens_per_rank / step_s,
    }


# --- timing ---------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall(fn, reps: int, device: torch.device, warmup: int = 1) -> float:  # type: ignore[no-untyped-def]
    """Median wall seconds of fn() (host included), synchronised."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cuda_time(fn, reps: int) -> float:  # type: ignore[no-untyped-def]
    """Median CUDA-event seconds of fn() after one warm-up call."""
    return _cuda_time(fn, reps, warmup=1)


def ceilings(device: torch.device) -> dict[str, float]:
    if device.type != "cuda":
        return {"copy_bytes_per_s": 1e11, "bf16_flops_per_s": 1e12, "fp8_flops_per_s": 1e12}
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    warm_until = time.perf_counter() + 5.0  # clocks to their working level first (idle: 345 MHz)
    while time.perf_counter() < warm_until:
        for _ in range(10):
            a @ b
        torch.cuda.synchronize(device)
    copy_s = cuda_time(lambda: dst.copy_(src), 10)
    mm_s = cuda_time(lambda: a @ b, 10)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()
    one = torch.tensor(1.0, device=device)
    mm8_s = cuda_time(
        lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), 10
    )
    return {
        "copy_bytes_per_s": 2 * n / copy_s,
        "bf16_flops_per_s": 2 * 8192**3 / mm_s,
        "fp8_flops_per_s": 2 * 8192**3 / mm8_s,
    }


# --- roofline -------------------------------------------------------------------------------------


def attention_weights(args: ModelArgs) -> tuple[int, int]:
    """(elements of q_a, q_b, kv_a and o_proj together, elements of kv_b_proj)."""
    h, n, lat, rope = args.dim, args.n_heads, args.kv_lora_rank, args.qk_rope_head_dim
    nope, v = args.qk_nope_head_dim, args.v_head_dim
    proj = h * args.q_lora_rank + args.q_lora_rank * n * (nope + rope) + h * (lat + rope) + n * v * h
    return proj, lat * n * (nope + v)


def layer_costs(args: ModelArgs, moe: bool, phase: str, seqs: int, tokens: int, context: int, pairs: int):  # type: ignore[no-untyped-def]
    """(bytes, fp8 FLOPs, bf16 FLOPs) of one layer of the rank in one step."""
    h, n, lat, rope = args.dim, args.n_heads, args.kv_lora_rank, args.qk_rope_head_dim
    nope, v = args.qk_nope_head_dim, args.v_head_dim
    proj, kv_b = attention_weights(args)
    kv_token = (lat + rope) * 2
    if phase == "decode":
        nbytes = proj + 2 * kv_b + seqs * context * kv_token + tokens * kv_token
        fp8 = 2 * tokens * proj
        bf16 = 2 * tokens * n * (nope + v) * lat + 2 * tokens * n * context * (2 * lat + rope)
    else:
        per_seq = tokens // seqs
        causal = seqs * per_seq * (per_seq + 1) // 2
        nbytes = proj + kv_b + 2 * tokens * kv_token
        fp8 = 2 * tokens * (proj + kv_b)
        bf16 = 2 * n * causal * (nope + rope + v)
    if moe:
        expert = 3 * h * args.moe_inter_dim
        local = args.n_routed_experts // EP
        nbytes += local * expert + args.n_shared_experts * expert + args.n_routed_experts * h * 4
        fp8 += 2 * pairs * expert + 2 * tokens * args.n_shared_experts * expert
        bf16 += 2 * tokens * args.n_routed_experts * h
    else:
        dense = 3 * h * args.inter_dim
        nbytes += dense
        fp8 += 2 * tokens * dense
    return nbytes, fp8, bf16


def roofline(
    args: ModelArgs, ceil: dict, phase: str, seqs: int, tokens: int, context: int, pairs: int
) -> float:
    """Summed per-layer roofline seconds of the full model's step on this rank."""
    total = 0.0
    for layer in range(args.n_layers):
        nbytes, fp8, bf16 = layer_costs(args, args.is_moe_layer(layer), phase, seqs, tokens, context, pairs)
        flops_s = fp8 / ceil["fp8_flops_per_s"] + bf16 / ceil["bf16_flops_per_s"]
        total += max(nbytes / ceil["copy_bytes_per_s"], flops_s)
    head_bytes = args.vocab_size * args.dim * 2
    head_flops = 2 * seqs * args.vocab_size * args.dim
    return total + max(head_bytes / ceil["copy_bytes_per_s"], head_flops / ceil["bf16_flops_per_s"])


# --- the simulated rank ---------------------------------------------------------------------------


def layer_bytes(args: ModelArgs, pages: int) -> tuple[int, int]:
    """(bytes of a dense layer, bytes of a MoE layer) on this rank, KV cache included."""
    proj, kv_b = attention_weights(args)
    attn = proj + 3 * kv_b  # FP8, plus kv_b_proj's bf16 copy
    kv = (pages + 1) * PAGE * args.kv_cache_dim * 2
    expert = 3 * args.dim * args.moe_inter_dim
    moe = (
        args.n_routed_experts // EP + args.n_shared_experts
    ) * expert + args.n_routed_experts * args.dim * 4
    return attn + 3 * args.dim * args.inter_dim + kv, attn + moe + kv


@contextmanager
def truncated(model: DeepseekV3, kv_layers: list[torch.Tensor], n: int):  # type: ignore[no-untyped-def]
    """The model with only its first n layers (and their KV) for the duration."""
    layers = model.model.layers
    model.model.layers = nn.ModuleList(list(layers)[:n])
    try:
        yield kv_layers[:n]
    finally:
        model.model.layers = layers


def decode_plan(
    args: ModelArgs, batch: int, context: int, table: np.ndarray, rng: np.random.Generator
) -> StepPlan:
    return StepPlan(
        step_id=1,
        kind=StepKind.DECODE,
        rank=0,
        released=(),
        new_requests=(),
        request_ids=tuple(f"d{i}" for i in range(batch)),
        query_lens=np.ones(batch, np.int32),
        context_lens=np.full(batch, context, np.int32),
        token_ids=rng.integers(0, args.vocab_size, batch).astype(np.int64),
        page_table=table[:batch],
        sample=np.ones(batch, bool),
    )


def prefill_plan(
    args: ModelArgs, seqs: int, length: int, table: np.ndarray, rng: np.random.Generator
) -> StepPlan:
    return StepPlan(
        step_id=2,
        kind=StepKind.PREFILL,
        rank=0,
        released=(),
        new_requests=(),
        request_ids=tuple(f"p{i}" for i in range(seqs)),
        query_lens=np.full(seqs, length, np.int32),
        context_lens=np.full(seqs, length, np.int32),
        token_ids=rng.integers(0, args.vocab_size, seqs * length).astype(np.int64),
        page_table=table[:seqs, : -(-length // PAGE)],
        sample=np.ones(seqs, bool),
    )


@dataclass
class Rank:
    """The simulated rank and what the measurements share."""

    args: ModelArgs  # the layers built
    full_args: ModelArgs  # the real model
    model: DeepseekV3
    kv: KVCache
    rope: RotaryEmbedding
    feed: LocalFeed
    table: np.ndarray  # [seqs, pages per seq] page ids
    max_pages: int
    device: torch.device
    ceil: dict
    shape: Shape
    reps: int
    time_eager: bool
    link: LinkModel

    @property
    def built(self) -> int:
        return self.args.n_layers

    @property
    def n_dense(self) -> int:
        return self.args.n_dense_layers

    def stacks(self) -> tuple[int, int]:
        """Layers of the two stacks timed: all built, and the dense layers plus one MoE layer."""
        return self.built, self.n_dense + 1


def time_decode(rank: Rank, batch: int, rng: np.random.Generator) -> dict:
    cuda = rank.device.type == "cuda"
    routed = rank.feed.set(rank.args, batch, seed=batch, device=rank.device)
    plan = decode_plan(rank.args, batch, rank.shape.context, rank.table, rng)
    row = {"phase": "decode", "seqs_per_rank": batch, "context": rank.shape.context, **routed}
    times: dict[int, dict[str, float]] = {}
    for n_layers in rank.stacks():
        with truncated(rank.model, rank.kv.layers, n_layers) as kv_layers:
            eager = EagerSteps(rank.model, kv_layers, rank.rope, PAGE, rank.device)
            graphs = DecodeGraphs(
                rank.model,
                kv_layers,
                rank.kv.scratch_page,
                rank.rope,
                PAGE,
                rank.max_pages,
                (batch,),
                rank.device,
                eager,
                capture=cuda,
            )
            graphs.capture()
            times[n_layers] = {
                "step": wall(lambda r=graphs: logits_of(rank, r, plan), rank.reps, rank.device)
            }
            if cuda:
                times[n_layers]["graph"] = cuda_time(graphs._graphs[batch][0].replay, rank.reps)
            if n_layers == rank.built and rank.time_eager:
                reps = max(3, rank.reps // 2)
                times[n_layers]["eager"] = wall(lambda r=eager: logits_of(rank, r, plan), reps, rank.device)
            del graphs
    row.update(scaled(times, rank.built, rank.n_dense, rank.full_args.n_layers))
    row["roofline_s"] = roofline(
        rank.full_args, rank.ceil, "decode", batch, batch, rank.shape.context, routed["local_pairs"]
    )
    row["node_tokens_per_s"] = EP * batch / row["scaled_step_s"]
    return with_comm(row, rank.full_args, rank.link, batch)


def time_prefill(rank: Rank, rng: np.random.Generator) -> dict:
    shape = rank.shape
    tokens = shape.prefill_seqs * shape.prefill_len
    routed = rank.feed.set(rank.args, tokens, seed=tokens, device=rank.device)
    plan = prefill_plan(rank.args, shape.prefill_seqs, shape.prefill_len, rank.table, rng)
    row = {"phase": "prefill", "seqs_per_rank": shape.prefill_seqs, "tokens_per_rank": tokens, **routed}
    times = {}
    for n_layers in rank.stacks():
        with truncated(rank.model, rank.kv.layers, n_layers) as kv_layers:
            eager = EagerSteps(rank.model, kv_layers, rank.rope, PAGE, rank.device)
            times[n_layers] = {"step": wall(lambda r=eager: logits_of(rank, r, plan), 3, rank.device)}
    row.update(scaled(times, rank.built, rank.n_dense, rank.full_args.n_layers))
    row["roofline_s"] = roofline(
        rank.full_args,
        rank.ceil,
        "prefill",
        shape.prefill_seqs,
        tokens,
        shape.prefill_len,
        routed["local_pairs"],
    )
    row["node_tokens_per_s"] = EP * tokens / row["scaled_step_s"]
    return with_comm(row, rank.full_args, rank.link, tokens)


def profile_layer(rank: Rank, plan: StepPlan, tokens_per_rank: int) -> list[dict]:
    """Device time per kernel (CPU time per op on the CPU) of the first MoE layer on `plan`,
    eager (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from nmoe_serve.worker.step_batch import build_step_batch

    rank.feed.set(rank.args, tokens_per_rank, seed=tokens_per_rank, device=rank.device)
    input_ids, batch = build_step_batch(plan, PAGE, rank.rope, rank.device)
    residual = rank.model.model.embed_tokens(input_ids)  # [T, H]
    layer = rank.model.model.layers[rank.n_dense]
    kv_layer = rank.kv.layers[rank.n_dense]
    h = layer.input_layernorm(residual)
    next_norm = rank.model.model.next_norms()[rank.n_dense]

    def run() -> None:
        out, total = layer(h, residual, batch, kv_layer)
        next_norm.add(out, total)

    run()
    sync(rank.device)
    reps = 3
    cuda = rank.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            run()
        sync(rank.device)
    rows = []
    for event in prof.key_averages():
        if cuda:
            device_us = getattr(event, "self_device_time_total", 0) or getattr(
                event, "self_cuda_time_total", 0
            )
        else:
            device_us = event.self_cpu_time_total
        if device_us > 0:
            rows.append(
                {"kernel": event.key[:90], "us_per_layer": device_us / reps, "calls": event.count // reps}
            )
    rows.sort(key=lambda r: -r["us_per_layer"])
    total = sum(r["us_per_layer"] for r in rows)
    print(
        f"  first MoE layer, {plan.kind.name.lower()} {plan.num_tokens} tokens: {total / 1e3:.2f} ms of kernels"
    )
    for r in rows[:30]:
        print(f"    {r['us_per_layer']:9.1f} us  x{r['calls']:<3} {r['kernel']}")
    return rows


def logits_of(rank: Rank, runner: EagerSteps | DecodeGraphs, plan: StepPlan) -> torch.Tensor:
    """One step as the worker runs it, up to the logits of the sampled rows."""
    hidden, logits_rows = runner.run(plan)
    return rank.model.compute_logits(hidden[logits_rows])


def build_rank(opts: argparse.Namespace, device: torch.device) -> Rank:
    cuda = device.type == "cuda"
    shape = SMOKE_SHAPE if opts.smoke else FULL
    hf = dict(DEEPSEEK_V3, **SMOKE) if opts.smoke else dict(DEEPSEEK_V3)
    full_args = ModelArgs.from_hf_config(hf, source="DeepSeek-V3")
    if cuda:
        warm_up(5.0)  # the clocks at their working level before the ceilings
    ceil = ceilings(device)
    print(
        f"{torch.cuda.get_device_name() if cuda else 'cpu'}: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"bf16 {ceil['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s, fp8 {ceil['fp8_flops_per_s'] / 1e12:.0f} TFLOP/s",
        flush=True,
    )
    longest = max(shape.context, shape.prefill_len)
    pages_per_seq = -(-longest // PAGE)
    num_pages = max(max(shape.decode_batches), shape.prefill_seqs) * pages_per_seq
    dense_bytes, moe_bytes = layer_bytes(full_args, num_pages)
    n_dense = full_args.n_dense_layers
    full_moe = full_args.n_layers - n_dense
    if opts.moe_layers is not None:
        n_moe = opts.moe_layers
    elif cuda:
        free = torch.cuda.mem_get_info(device)[0]
        fixed = 2 * full_args.vocab_size * full_args.dim * 2 + n_dense * dense_bytes
        n_moe = int((free - opts.reserve_gib * 2**30 - fixed) // moe_bytes)
    else:
        n_moe = full_moe
    n_moe = max(2, min(n_moe, full_moe))
    args = ModelArgs.from_hf_config(dict(hf, num_hidden_layers=n_dense + n_moe), source="DeepSeek-V3")
    print(
        f"building {n_dense} dense + {n_moe} MoE layers of {full_args.n_layers}, {num_pages} KV pages",
        flush=True,
    )
    ops = triton_ops() if cuda else reference_ops()
    if cuda and opts.moe_kernels == "triton":  # the Triton decode GEMMs, not the backend's Gluon ones
        from nmoe_serve.kernels.fused_moe import fused_moe

        ops = dataclasses.replace(ops, fused_moe=fused_moe)
    decode = None
    if opts.decode_attention == "auto":  # FlashInfer's MLA where it imports, as the worker picks
        decode = choose_decode_attention(args, ops, PAGE, torch.bfloat16, device)
    backend = kernel_backend(args, ops, SdpaPrefill(), decode)
    feed = LocalFeed(ops.gather_sum)
    model_class = DeepseekV3WithMTP if getattr(opts, "mtp", False) else DeepseekV3  # bench/spec_step.py
    model = model_class(
        args,
        torch.bfloat16,
        device,
        owned=range(args.n_routed_experts // EP),
        backend=backend,
        transport=feed,
    )
    fill_dummy(model, seed=0)
    model.eval()
    kv = KVCache(args, num_pages, PAGE, torch.bfloat16, device, extra_layers=model.mtp_depth)
    for layer in kv.layers + kv.extra_layers:  # filled pages: random latents of unit scale
        for start in range(0, layer.shape[0], 1024):
            layer[start : start + 1024].normal_()
    table = np.random.default_rng(0).permutation(num_pages).astype(np.int32).reshape(-1, pages_per_seq)
    print(f"model: {backend.describe()}", flush=True)
    return Rank(
        args=args,
        full_args=full_args,
        model=model,
        kv=kv,
        rope=RotaryEmbedding(args.rope, device),
        feed=feed,
        table=table,
        max_pages=pages_per_seq,
        device=device,
        ceil=ceil,
        shape=shape,
        reps=opts.reps,
        time_eager=not opts.skip_eager,
        link=LinkModel(opts.link_gbps * 1e9, opts.link_latency_us * 1e-6),
    )


def rank_arguments(doc: str, out: str, reserve_gib: float) -> argparse.ArgumentParser:
    """The parser of a benchmark of this rank: the output file and how the rank is built."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument(
        "--smoke", action="store_true", help="small dims (any device; CPU uses the torch refs)"
    )
    parser.add_argument("--moe-layers", type=int, default=None, help="MoE layers to build (default: as fit)")
    parser.add_argument(
        "--reserve-gib", type=float, default=reserve_gib, help="GPU memory kept for activations"
    )
    parser.add_argument("--reps", type=int, default=10)
    return parser


def main() -> int:
    parser = rank_arguments(__doc__ or "", "rank_sim.json", 20.0)
    parser.add_argument("--skip-eager", action="store_true", help="do not time eager decode")
    parser.add_argument("--skip-prefill", action="store_true")
    parser.add_argument("--profile", action="store_true", help="kernel times of one MoE layer")
    parser.add_argument(
        "--decode-attention",
        choices=["auto", "kernel"],
        default="auto",
        help="auto: as the worker chooses (FlashInfer's MLA where it imports); kernel: our mla_decode",
    )
    parser.add_argument(
        "--moe-kernels",
        choices=["auto", "triton"],
        default="auto",
        help="auto: as the backend chooses (the Gluon FP8 decode GEMMs on Hopper); triton: the Triton ones",
    )
    parser.add_argument(
        "--link-gbps", type=float, default=150.0, help="assumed all-to-all GB/s per GPU (modeled exchange)"
    )
    parser.add_argument(
        "--link-latency-us", type=float, default=25.0, help="assumed latency per collective (modeled)"
    )
    opts = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()
    rank = build_rank(opts, device)
    print(f"built in {time.time() - started:.0f} s", flush=True)
    rng = np.random.default_rng(1)
    rows: list[dict] = []
    with torch.inference_mode():
        for batch in rank.shape.decode_batches:
            rows.append(time_decode(rank, batch, rng))
            print_row(rows[-1], time.time() - started)
        if not opts.skip_prefill:
            rows.append(time_prefill(rank, rng))
            print_row(rows[-1], time.time() - started)
        profiles = {}
        if opts.profile:
            batch = max(rank.shape.decode_batches)
            plan = decode_plan(rank.args, batch, rank.shape.context, rank.table, rng)
            profiles["decode"] = profile_layer(rank, plan, batch)
            tokens = rank.shape.prefill_seqs * rank.shape.prefill_len
            plan = prefill_plan(rank.args, rank.shape.prefill_seqs, rank.shape.prefill_len, rank.table, rng)
            profiles["prefill"] = profile_layer(rank, plan, tokens)
    cuda = device.type == "cuda"
    result = {
        **provenance(rank, opts.smoke),
        "kv_pages": rank.kv.num_pages,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0,
        "rows": rows,
        "first_moe_layer_kernels": profiles,
        "targets_node_tokens_per_s": {"prefill": 60000, "decode": 25000},
        "decode_attention": rank.model.backend.decode_attention.name,
        "link_assumptions": {
            "bytes_per_s": rank.link.bytes_per_s,
            "latency_per_collective_s": rank.link.latency_s,
            "anchors": LINK_ANCHORS,
        },
    }
    opts.out.write_text(json.dumps(result, indent=2))
    print_table(rows, result)
    return 0


def provenance(rank: Rank, smoke: bool) -> dict:
    """Where and on what a benchmark of this rank ran: device, date, torch, ceilings, layers built."""
    return {
        "device": torch.cuda.get_device_name() if rank.device.type == "cuda" else "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "smoke": smoke,
        "ceilings": rank.ceil,
        "layers_built": {
            "dense": rank.n_dense,
            "moe": rank.built - rank.n_dense,
            "of": rank.full_args.n_layers,
        },
    }


def scaled(times: dict, built: int, n_dense: int, total_layers: int) -> dict:
    """Per-MoE-layer time from the two stacks, and the step scaled to all layers."""
    full, short = times[built], times[n_dense + 1]
    out: dict[str, float] = {"layers_built": built}
    for key, value in full.items():
        out[f"{key}_s"] = value
    key = "graph" if "graph" in full else "step"
    per_moe = max(0.0, (full[key] - short[key]) / (built - n_dense - 1))
    out["per_moe_layer_s"] = per_moe
    out["scaled_step_s"] = full["step"] + (total_layers - built) * per_moe
    if "graph" in full:
        out["scaled_graph_s"] = full["graph"] + (total_layers - built) * per_moe
    return out


def print_row(row: dict, elapsed: float) -> None:
    row["roofline_ratio"] = row["roofline_s"] / row["scaled_step_s"]
    print(
        f"{row['phase']:>7} {row['seqs_per_rank']:>4} seqs: step {row['step_s'] * 1e3:8.2f} ms "
        f"({row['layers_built']} layers), per MoE layer {row['per_moe_layer_s'] * 1e3:.3f} ms, scaled "
        f"{row['scaled_step_s'] * 1e3:8.2f} ms, roofline {row['roofline_s'] * 1e3:7.2f} ms "
        f"({row['roofline_ratio']:.1%}), node {row['node_tokens_per_s']:,.0f} tok/s; with the modeled "
        f"all-to-all {row['scaled_step_with_comm_s'] * 1e3:.2f} ms, {row['node_tokens_per_s_with_comm']:,.0f} "
        f"tok/s  [{elapsed:.0f} s]",
        flush=True,
    )


def print_table(rows: list[dict], result: dict) -> None:
    built = result["layers_built"]
    print(f"\n{result['device']}, {built['dense']} dense + {built['moe']} MoE layers built of {built['of']}")
    link = result["link_assumptions"]
    print(
        f"decode attention: {result['decode_attention']}; modeled all-to-all (assumed): "
        f"{link['bytes_per_s'] / 1e9:.0f} GB/s per GPU, {link['latency_per_collective_s'] * 1e6:.0f} us per "
        f"collective, FP8 dispatch + bf16 combine; anchors: " + "; ".join(link["anchors"])
    )
    print(
        "| phase | per rank | recv tokens / local pairs | graph (built) | step (built) | eager (built) "
        "| per MoE layer | step, all layers | roofline | ratio | node tok/s (est.) | target "
        "| a2a per MoE layer (model) | step + a2a | node tok/s with a2a |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        per_rank = (
            f"{r['seqs_per_rank']} seqs" if r["phase"] == "decode" else f"{r['tokens_per_rank']} tokens"
        )
        target = result["targets_node_tokens_per_s"][r["phase"]]

        def ms(key: str, r: dict = r) -> str:
            return f"{r[key] * 1e3:.2f} ms" if key in r else "–"

        print(
            f"| {r['phase']} | {per_rank} | {r['tokens_received']} / {r['local_pairs']} | {ms('graph_s')} | "
            f"{ms('step_s')} | {ms('eager_s')} | {ms('per_moe_layer_s')} | {ms('scaled_step_s')} | "
            f"{ms('roofline_s')} | {r['roofline_ratio']:.1%} | {r['node_tokens_per_s']:,.0f} | {target:,} "
            f"| {r['comm_model']['per_moe_layer_s'] * 1e6:.0f} us | {ms('scaled_step_with_comm_s')} "
            f"| {r['node_tokens_per_s_with_comm']:,.0f} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
