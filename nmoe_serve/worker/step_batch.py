"""Turn a StepPlan (plain arrays) into the model's StepBatch (tensors on the device)."""

from __future__ import annotations

import numpy as np
import torch

from nmoe_serve.engine.plan import StepKind, StepPlan
from nmoe_serve.model.batch import StepBatch
from nmoe_serve.model.rope import RotaryEmbedding


class PlanError(RuntimeError):
    """A step plan is inconsistent (a scheduler bug): it names the request and what is wrong."""


def build_step_batch(
    plan: StepPlan, page_size: int, rope: RotaryEmbedding, device: torch.device
) -> tuple[torch.Tensor, StepBatch]:
    """(input_ids [T], StepBatch) for `plan`."""
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
        return torch.from_numpy(np.array(a)).to(
            device=device, dtype=dtype
        )  # a copy: plans may arrive read-only

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
    return t(plan.token_ids, torch.int64), batch


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
