"""MTP speculative decoding on one expert-parallel rank of DeepSeek-V3: the verify step against the
plain decode step, and the decode tokens per second they imply for an 8-GPU node.

    PYTHONPATH=$PWD python bench/spec_step.py --out spec_step.json     # on the GPU host
    python bench/spec_step.py --smoke                                   # small dims, any device

The rank is bench/rank_sim.py's (rank 0 of 8, dummy FP8 weights, the engine's layers and decode
CUDA graphs, the all-to-all replaced by a local feed of real routing), built with the MTP layer
(DeepseekV3WithMTP). At B sequences per rank with context 2000:

- plain: a decode step of B tokens (graph replay, lm_head, the sampler's greedy argmax);
- verify k: the step of B·(1 + k) token rows a verify plan becomes (step_batch.token_rows), from
  its CUDA graph, lm_head on every row and the sampler's greedy verify (`verify_on_device`), then
  the MTP drafter's passes as the worker runs them (eager): one over the B·(1 + k) rows, k - 1
  over B, each with the MTP layer's logits of the drafted rows.

The main model's step is timed on two stacks and scaled to 61 layers as rank_sim does; the MTP
layer is one layer and timed as it is. Node decode tok/s = 8 · B · E / step, where E, the tokens a
sequence gets per verify step, is 1 + a + ... + a^k for a per-draft acceptance a (assumed:
0.6 / 0.8 / 0.9; DeepSeek reports 85-90% for the second token): estimates, not measurements, and
the modeled all-to-all is left out (rank_sim reports it; the verify step sends 1 + k times the tokens).
The issue's goal: a k = 1 verify step (drafts included) costs at most 1.25x a plain decode step at 256
sequences per rank.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import torch
from rank_sim import (
    EP,
    PAGE,
    Rank,
    build_rank,
    cuda_time,
    decode_plan,
    profile_layer,
    provenance,
    rank_arguments,
    scaled,
    truncated,
    wall,
)

from nmoe_serve.engine.plan import StepPlan
from nmoe_serve.model.mtp import DeepseekV3WithMTP
from nmoe_serve.sampling.params import SamplingParams
from nmoe_serve.sampling.sampler import Sampler
from nmoe_serve.worker.cuda_graphs import DecodeGraphs, EagerSteps
from nmoe_serve.worker.drafter import MTPDrafter
from nmoe_serve.worker.step_batch import token_rows

ACCEPTANCE = (0.6, 0.8, 0.9)


def verify_plan(rank: Rank, batch: int, k: int, rng: np.random.Generator) -> StepPlan:
    """A verify step of B sequences with 1 + k tokens each, the context ending at rank_sim's 2000."""
    plain = decode_plan(rank.args, batch, rank.shape.context, rank.table, rng)
    q = 1 + k
    return dataclasses.replace(
        plain,
        query_lens=np.full(batch, q, np.int32),
        token_ids=rng.integers(0, rank.args.vocab_size, batch * q).astype(np.int64),
    )


def sampler_for(rank: Rank, plan: StepPlan) -> Sampler:
    sampler = Sampler(rank.args.vocab_size, rank.device, seed=0)
    for rid in dict.fromkeys(plan.request_ids):
        sampler.add_request(rid, SamplingParams(temperature=0.0, max_tokens=10_000), [1])
    return sampler


def time_step(rank: Rank, batch: int, k: int, rng: np.random.Generator) -> dict:
    """One row: the step of B sequences (k = 0: plain decode; else verify + drafts)."""
    cuda = rank.device.type == "cuda"
    model = rank.model
    assert isinstance(model, DeepseekV3WithMTP)
    q = 1 + k
    plan = (
        verify_plan(rank, batch, k, rng)
        if k
        else decode_plan(rank.args, batch, rank.shape.context, rank.table, rng)
    )
    rows = token_rows(plan)
    routed = rank.feed.set(rank.args, batch * q, seed=batch * q, device=rank.device)
    if k > 1:
        rank.feed.set(rank.args, batch, seed=batch, device=rank.device)  # the drafter's later passes
        rank.feed.set(rank.args, batch * q, seed=batch * q, device=rank.device)
    sampler = sampler_for(rank, plan)
    ids = plan.request_ids
    drafts_in = torch.as_tensor(plan.token_ids.reshape(batch, q)[:, 1:].copy(), device=rank.device)
    num_emitted = rng.integers(1, q + 1, batch).astype(np.int64)  # a mix of acceptances
    drafter = MTPDrafter(
        model.mtp, rank.kv.extra_layers[0], rank.rope, PAGE, max(k, 1), rank.device,
        model.backend.decode_attention.plan,
    )  # fmt: skip
    times: dict[int, dict[str, float]] = {}
    for n_layers in rank.stacks():
        with truncated(model, rank.kv.layers, n_layers) as kv_layers:
            eager = EagerSteps(model, kv_layers, rank.rope, PAGE, rank.device)
            graphs = DecodeGraphs(
                model, kv_layers, rank.kv.scratch_page, rank.rope, PAGE, rank.max_pages, (batch * q,),
                rank.device, eager, capture=cuda,
            )  # fmt: skip
            graphs.capture()

            def target(graphs: DecodeGraphs = graphs) -> torch.Tensor:
                hidden, logits_rows = graphs.run(rows)
                logits = model.compute_logits(hidden[logits_rows])
                if k:
                    sampler.verify_on_device(ids, logits, drafts_in, None)
                    sampler.advance(ids, np.ones(batch, np.int64))
                else:
                    sampler.sample_on_device(ids, logits, None)
                return hidden

            times[n_layers] = {"step": wall(target, rank.reps, rank.device)}
            if cuda:
                times[n_layers]["graph"] = cuda_time(graphs._graphs[batch * q][0].replay, rank.reps)
            if n_layers == rank.built and k:
                hidden = target()
                tokens = torch.as_tensor(plan.token_ids.reshape(batch, q).copy(), device=rank.device)
                times[n_layers]["draft"] = wall(
                    lambda h=hidden, t=tokens: drafter.after_verify(rows, q, h, t, num_emitted),
                    rank.reps,
                    rank.device,
                )
            del graphs
    row = {"k": k, "seqs_per_rank": batch, "token_rows": batch * q, "context": rank.shape.context, **routed}
    draft = times[rank.built].pop("draft", 0.0)
    row.update(scaled(times, rank.built, rank.n_dense, rank.full_args.n_layers))
    row["draft_s"] = draft
    row["total_s"] = row["scaled_step_s"] + draft
    return row


def main() -> int:
    parser = rank_arguments(__doc__ or "", "spec_step.json", 30.0)
    parser.add_argument("--seqs", type=int, default=None, help="sequences per rank (default 256; smoke 16)")
    parser.add_argument("--drafts", default="1,2", help="k values to time beside the plain step")
    parser.add_argument(
        "--profile", action="store_true", help="kernel times of one MoE layer, plain and k = 1"
    )
    opts = parser.parse_args()
    opts.mtp, opts.skip_eager, opts.decode_attention, opts.moe_kernels = True, True, "auto", "auto"
    opts.link_gbps, opts.link_latency_us = 150.0, 25.0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()
    rank = build_rank(opts, device)
    batch = opts.seqs or max(rank.shape.decode_batches)
    rng = np.random.default_rng(1)
    rows = []
    with torch.inference_mode():
        for k in [0, *(int(x) for x in opts.drafts.split(","))]:
            rows.append(time_step(rank, batch, k, rng))
            r = rows[-1]
            print(
                f"k={k}: step {r['scaled_step_s'] * 1e3:.2f} ms (61 layers), drafts {r['draft_s'] * 1e3:.2f} ms, "
                f"total {r['total_s'] * 1e3:.2f} ms  [{time.time() - started:.0f} s]",
                flush=True,
            )
        profiles = {}
        if opts.profile:  # the first MoE layer's kernels: the plain step's rows, and a k = 1 verify's
            for k in (0, 1):
                plan = (
                    verify_plan(rank, batch, k, rng)
                    if k
                    else decode_plan(rank.args, batch, rank.shape.context, rank.table, rng)
                )
                profiles[f"k={k}"] = profile_layer(rank, token_rows(plan), batch * (1 + k))
    plain = rows[0]["total_s"]
    for r in rows:
        r["vs_plain"] = r["total_s"] / plain
        r["node_tokens_per_s"] = {
            str(a): EP * batch * sum(a**i for i in range(r["k"] + 1)) / r["total_s"] for a in ACCEPTANCE
        }
    result = {
        **provenance(rank, opts.smoke),
        "decode_attention": rank.model.backend.decode_attention.name,
        "assumed_acceptance": list(ACCEPTANCE),
        "goal": "k = 1 verify step (drafts included) <= 1.25x the plain decode step at 256 seqs per rank",
        "rows": rows,
        "first_moe_layer_kernels": profiles,
    }
    opts.out.write_text(json.dumps(result, indent=2))
    print(
        f"\n{result['device']}, {batch} seqs per rank, context {rank.shape.context}, {result['decode_attention']}"
    )
    print("| step | token rows | main model, 61 layers (graph) | MTP drafts | total | vs plain "
          "| node tok/s at a = 0.6 / 0.8 / 0.9 (est.) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        name = "plain decode" if r["k"] == 0 else f"verify k = {r['k']}"
        tps = " / ".join(f"{v:,.0f}" for v in r["node_tokens_per_s"].values())
        print(
            f"| {name} | {r['token_rows']} | {r['scaled_step_s'] * 1e3:.2f} ms | {r['draft_s'] * 1e3:.2f} ms | "
            f"{r['total_s'] * 1e3:.2f} ms | {r['vs_plain']:.2f}x | {tps} |"
        )
    print(f"BENCH-RESULT-JSON {opts.out.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
