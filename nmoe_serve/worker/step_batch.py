"""Turn a StepPlan (plain arrays) into the model's StepBatch (tensors on the device)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from nmoe_serve.engine.plan import StepKind, StepPlan
from nmoe_serve.model.batch import StepBatch
from nmoe_serve.model.rope import RotaryEmbedding


class PlanError(RuntimeError):
    """A step plan is inconsistent (a scheduler bug): it names the request and what is wrong."""


# (rows [B_f] int64, tokens [B_f] int64), on the device: tokens to write into a step's input rows in
# place of the plan's -1 - i entries (the tokens this rank sampled in its previous step).
Feed = tuple[torch.Tensor, torch.Tensor]


def to_device(array: np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A copy of `array` on `device`. On CUDA through pinned memory without waiting for the device,
    so a step's inputs are enqueued behind the step still running (plans may arrive read-only)."""
    host = torch.from_numpy(np.array(array))
    if dtype is not None:
        host = host.to(dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def fed_rows(plan: StepPlan, last_sampled: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray] | None:
    """(rows, index into the previous step's sampled rows) of the plan's fed tokens, or None.

    A decode row whose token id is -1 - i takes the token this rank sampled for the i-th sampled row
    of its previous step (`last_sampled`: their request ids); the request must be the same."""
    fed = np.flatnonzero(plan.token_ids < 0)
    if not fed.size:
        return None
    if plan.kind != StepKind.DECODE:
        raise PlanError(f"step {plan.step_id}: a prefill plan names tokens of the previous step")
    index = -1 - plan.token_ids[fed]
    if int(index.max()) >= len(last_sampled):
        raise PlanError(
            f"step {plan.step_id}: a row takes sampled row {int(index.max())} of the previous step, "
            f"which sampled {len(last_sampled)}"
        )
    ids = plan.request_ids
    for row, i in zip(fed.tolist(), index.tolist(), strict=True):
        if ids[row] != last_sampled[i]:
            raise PlanError(
                f"step {plan.step_id}: request {ids[row]} takes the token the previous step sampled for "
                f"{last_sampled[i]}"
            )
    return fed, index


def build_step_batch(
    plan: StepPlan, page_size: int, rope: RotaryEmbedding, device: torch.device, feed: Feed | None = None
) -> tuple[torch.Tensor, StepBatch]:
    """(input_ids [T], StepBatch) for `plan`, with the `feed` tokens written into their rows."""
    query_lens = plan.query_lens.astype(np.int64)
    context_lens = plan.context_lens.astype(np.int64)
    cu_query = np.concatenate([[0], np.cumsum(query_lens)])
    cu_context = np.concatenate([[0], np.cumsum(context_lens)])
    seq_of_token = np.repeat(np.arange(plan.num_seqs), query_lens)
    first_position = context_lens - query_lens
    positions = np.arange(plan.num_tokens) - cu_query[:-1][seq_of_token] + first_position[seq_of_token]
    slot_mapping = _slots(plan, seq_of_token, positions, page_size)
    if plan.kind == StepKind.PREFILL:
        seq_of_cached = np.repeat(np.arange(plan.num_seqs), context_lens)
        cached_positions = np.arange(int(cu_context[-1])) - cu_context[:-1][seq_of_cached]
        context_slots = _slots(plan, seq_of_cached, cached_positions, page_size)
    else:
        context_slots = np.zeros(0, np.int64)
    logits_rows = (cu_query[1:] - 1)[plan.sample]

    def t(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return to_device(a, device, dtype)

    positions_t = t(positions, torch.int64)
    cos, sin = rope.cos_sin(positions_t)
    batch = StepBatch(
        is_prefill=plan.kind == StepKind.PREFILL,
        positions=positions_t,
        slot_mapping=t(slot_mapping, torch.int64),
        rope_cos=cos,
        rope_sin=sin,
        query_lens=query_lens.tolist(),
        context_lens=context_lens.tolist(),
        cu_query_lens=t(cu_query, torch.int32),
        cu_context_lens=t(cu_context, torch.int32),
        context_lens_t=t(context_lens, torch.int32),
        page_table=t(plan.page_table, torch.int32),
        context_slots=t(context_slots, torch.int64),
        logits_rows=t(logits_rows, torch.int64),
    )
    input_ids = t(plan.token_ids, torch.int64)
    if feed is not None:
        input_ids[feed[0]] = feed[1]
    return input_ids, batch


def token_rows(plan: StepPlan) -> StepPlan:
    """A decode plan of q > 1 tokens per sequence (a speculative verify step) as the decode plan
    of one row per token: row b·q + j is token j of sequence b, at position start_b + j with
    start_b + j + 1 tokens of context (its own and the earlier ones of its sequence written by the
    same step: each layer writes the step's latents before it attends), on its sequence's pages.
    The decode paths (eager, CUDA graphs, the MoE's fixed exchange) then run it unchanged. Its
    request ids repeat each sequence's q times; every row is sampled. A plan of one token per
    sequence is returned as it is."""
    if plan.kind != StepKind.DECODE:
        raise PlanError(f"step {plan.step_id}: only decode plans have token rows")
    q = int(plan.query_lens[0]) if plan.num_seqs else 1
    if np.any(plan.query_lens != q):
        raise PlanError(f"step {plan.step_id}: a decode plan's sequences must have equal token counts")
    if q == 1:
        return plan
    rows = plan.num_seqs * q
    context = (plan.context_lens.astype(np.int64) - q)[:, None] + np.arange(1, q + 1)  # [B, q]
    return dataclasses.replace(
        plan,
        request_ids=tuple(rid for rid in plan.request_ids for _ in range(q)),
        query_lens=np.ones(rows, np.int32),
        context_lens=context.reshape(-1).astype(np.int32),
        page_table=np.repeat(plan.page_table, q, axis=0),
        sample=np.ones(rows, bool),
    )


def decode_inputs(plan: StepPlan, page_size: int) -> dict[str, np.ndarray]:
    """A decode plan's per-sequence arrays: token_ids, positions, slot_mapping [B] int64,
    context_lens [B] int32 and logits_rows (the rows to sample) int64."""
    if plan.kind != StepKind.DECODE or np.any(plan.query_lens != 1):
        raise PlanError(f"step {plan.step_id}: not a decode plan (one new token per sequence)")
    seqs = np.arange(plan.num_seqs)
    positions = plan.context_lens.astype(np.int64) - 1
    return {
        "token_ids": plan.token_ids.astype(np.int64),
        "positions": positions,
        "slot_mapping": _slots(plan, seqs, positions, page_size),
        "context_lens": plan.context_lens.astype(np.int32),
        "logits_rows": np.flatnonzero(plan.sample).astype(np.int64),
    }


def _slots(plan: StepPlan, seqs: np.ndarray, positions: np.ndarray, page_size: int) -> np.ndarray:
    page_index = positions // page_size
    if page_index.size and page_index.max() >= plan.page_table.shape[1]:
        bad = int(np.argmax(page_index >= plan.page_table.shape[1]))
        raise PlanError(
            f"step {plan.step_id}: request {plan.request_ids[seqs[bad]]} needs page {page_index[bad]} for "
            f"position {positions[bad]} but its page table has {plan.page_table.shape[1]} columns"
        )
    pages = plan.page_table[seqs, page_index].astype(np.int64)
    if pages.size and pages.min() < 0:
        bad = int(np.argmin(pages))
        raise PlanError(
            f"step {plan.step_id}: request {plan.request_ids[seqs[bad]]} has no page for position {positions[bad]}"
        )
    return pages * page_size + positions % page_size
