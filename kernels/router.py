"""DeepSeek-V3's router: its logits GEMM, then noaux_tc expert selection, one program per token.

Shapes: the legend in docs/ARCHITECTURE.md (T, H, E, G, K); G_lim groups are kept.

`router_logits` [T, E] float32 from x [T, H] and the gate weight [E, H], both in the compute
dtype: a tensor-core GEMM accumulating and returning float32. DeepSeek-V3 stores the gate in
bf16, so this computes the same products as a float32 GEMM (on FFMA: 1.15 ms of a 16k-token
prefill layer and 35 us of a 256-seq decode layer on an H100), in another summation order.
`router_logits_ref` is the float32 GEMM (transformers' router, any device).

`grouped_topk` then selects:

    scores  = sigmoid(logits)                     [T, E] float32
    biased  = scores + bias                       (bias = e_score_correction_bias)
    group g scores the sum of its two largest biased scores; the G_lim best groups are kept
    ids     = the K largest biased scores of the kept groups, largest first
    weights = scores[ids] (unbiased), / (their sum + 1e-20) when normalize, * route_scale

In torch (`grouped_topk_ref`) the selection takes about 15 launches. Ties between exactly equal scores go to the lower expert or group index here; torch's
topk leaves their order unspecified.
"""

import torch
import triton
import triton.language as tl

from ._validate import check_tensor


@triton.jit
def grouped_topk_kernel(
    logits_ptr,  # [T, E] float32
    bias_ptr,  # [E] float32
    weights_ptr,  # [T, K] float32
    ids_ptr,  # [T, K] int64
    E,
    GS,  # experts per group
    G,
    route_scale,
    TOPK_GROUPS: tl.constexpr,
    TOP_K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_GS: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    groups = tl.arange(0, BLOCK_G)  # [BG]
    members = tl.arange(0, BLOCK_GS)  # [BGS]
    experts = groups[:, None] * GS + members[None, :]  # [BG, BGS] expert ids
    valid = (groups[:, None] < G) & (members[None, :] < GS)
    logits = tl.load(logits_ptr + t * E + experts, mask=valid, other=0.0)
    scores = tl.sigmoid(logits)
    biased = scores + tl.load(bias_ptr + experts, mask=valid, other=0.0)
    biased = tl.where(valid, biased, float("-inf"))

    # Group score: the two largest biased scores of each group (the first maximum removed once).
    top1 = tl.max(biased, axis=1)  # [BG]
    first = tl.argmax(biased, axis=1)  # [BG]
    top2 = tl.max(tl.where(members[None, :] == first[:, None], float("-inf"), biased), axis=1)
    group_score = tl.where(groups < G, top1 + top2, float("-inf"))
    keep = groups < 0  # all False
    for _ in tl.static_range(TOPK_GROUPS):
        best = tl.argmax(group_score, axis=0)
        keep = keep | (groups == best)
        group_score = tl.where(groups == best, float("-inf"), group_score)
    candidates = tl.where(keep[:, None], biased, float("-inf"))  # [BG, BGS]

    # Largest candidate: the best group by its row maximum, then the best member in it (lowest
    # indices win ties). Two 1-D reductions instead of an argmax over a reshaped tile.
    ks = tl.arange(0, BLOCK_K)
    chosen_ids = tl.zeros((BLOCK_K,), dtype=tl.int64)
    chosen_weights = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        best_group = tl.argmax(tl.max(candidates, axis=1), axis=0)
        in_group = groups[:, None] == best_group  # [BG, 1]
        best_member = tl.argmax(tl.max(tl.where(in_group, candidates, float("-inf")), axis=0), axis=0)
        chosen = in_group & (members[None, :] == best_member)  # [BG, BGS], one True
        weight = tl.sum(tl.sum(tl.where(chosen, scores, 0.0), axis=1), axis=0)
        candidates = tl.where(chosen, float("-inf"), candidates)
        expert = best_group.to(tl.int64) * GS + best_member
        chosen_ids = tl.where(ks == k, expert, chosen_ids)
        chosen_weights = tl.where(ks == k, weight, chosen_weights)
    if NORMALIZE:
        chosen_weights = chosen_weights / (tl.sum(chosen_weights, axis=0) + 1e-20)
    k_mask = ks < TOP_K
    tl.store(ids_ptr + t * TOP_K + ks, chosen_ids, mask=k_mask)
    tl.store(weights_ptr + t * TOP_K + ks, chosen_weights * route_scale, mask=k_mask)


def _check_args(op, logits, bias, n_groups, topk_groups, top_k) -> None:
    check_tensor(op, "logits", logits, ndim=2, dims="[T, E]", dtypes=(torch.float32,))
    E = logits.shape[1]
    check_tensor(op, "bias", bias, shape=(E,), dims="[E]", dtypes=(torch.float32,), device=logits.device)
    ok = (
        isinstance(n_groups, int)
        and n_groups >= 1
        and E % n_groups == 0
        and E // n_groups >= 2
        and isinstance(topk_groups, int)
        and 1 <= topk_groups <= n_groups
        and isinstance(top_k, int)
        and 1 <= top_k <= topk_groups * (E // n_groups)
    )
    if not ok:
        raise ValueError(
            f"{op}: n_groups={n_groups!r}, topk_groups={topk_groups!r}, top_k={top_k!r} do not fit E={E}: need "
            "E % n_groups == 0 with >= 2 experts a group, 1 <= topk_groups <= n_groups, "
            "1 <= top_k <= topk_groups * E / n_groups"
        )


def grouped_topk(
    logits: torch.Tensor,
    bias: torch.Tensor,
    n_groups: int,
    topk_groups: int,
    top_k: int,
    normalize: bool,
    route_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, K] float32, ids [T, K] int64) from router logits [T, E] float32 and the
    correction bias [E] float32, as the module docstring says."""
    _check_args("grouped_topk", logits, bias, n_groups, topk_groups, top_k)
    T, E = logits.shape
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)  # [T, K]
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)  # [T, K]
    if T:
        gs = E // n_groups
        grouped_topk_kernel[(T,)](
            logits, bias, weights, ids, E, gs, n_groups, float(route_scale),
            TOPK_GROUPS=topk_groups, TOP_K=top_k, NORMALIZE=bool(normalize),
            BLOCK_G=triton.next_power_of_2(n_groups), BLOCK_GS=triton.next_power_of_2(gs),
            BLOCK_K=triton.next_power_of_2(top_k), num_warps=4,
        )  # fmt: skip
    return weights, ids


def grouped_topk_ref(
    logits: torch.Tensor,
    bias: torch.Tensor,
    n_groups: int,
    topk_groups: int,
    top_k: int,
    normalize: bool,
    route_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch reference of `grouped_topk`."""
    _check_args("grouped_topk_ref", logits, bias, n_groups, topk_groups, top_k)
    T, E = logits.shape
    scores = logits.sigmoid()  # [T, E]
    grouped = (scores + bias).view(T, n_groups, E // n_groups)  # [T, G, E/G]
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
    chosen_groups = group_scores.topk(topk_groups, dim=-1).indices  # [T, G_lim]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, chosen_groups, True)  # [T, G]
    biased = grouped.masked_fill(~keep[..., None], float("-inf")).flatten(1)  # [T, E]
    ids = biased.topk(top_k, dim=-1).indices  # [T, K]
    weights = scores.gather(1, ids)  # [T, K]
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * route_scale, ids


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits [T, E] float32 from x [T, H] and weight [E, H] in x's dtype (tensor cores)."""
    op = "router_logits"
    check_tensor(op, "x", x, ndim=2, dims="[T, H]", contiguous=False)
    check_tensor(
        op, "weight", weight, ndim=2, dims="[E, H]", dtypes=(x.dtype,), contiguous=False, device=x.device
    )
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: weight is {tuple(weight.shape)} [E, H] but x has H = {x.shape[1]}")
    return torch.mm(x, weight.t(), out_dtype=torch.float32)


def router_logits_ref(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Torch reference of `router_logits`: the GEMM in float32."""
    return torch.nn.functional.linear(x.float(), weight.float())
