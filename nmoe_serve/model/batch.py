"""StepBatch: one step's flat batch of tokens, as the layers see it.

Built once per step by the worker from a StepPlan and passed down to every layer, so layer
signatures stay tensors plus this one object. Shapes: the legend in
docs/ARCHITECTURE.md (T, B, S, R, W).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepBatch:
    is_prefill: bool
    positions: torch.Tensor  # [T] int64, position of each new token in its sequence
    slot_mapping: torch.Tensor  # [T] int64, flat KV slot (page * page_size + offset) of each new token
    rope_cos: torch.Tensor  # [T, R/2] float32, YaRN attention factor included
    rope_sin: torch.Tensor  # [T, R/2] float32
    query_lens: list[int]  # [B] new tokens of each sequence (1 in decode)
    context_lens: list[int]  # [B] cached tokens of each sequence after this step
    cu_query_lens: torch.Tensor  # [B+1] int32, prefix sums of query_lens
    cu_context_lens: torch.Tensor  # [B+1] int32, prefix sums of context_lens
    context_lens_t: torch.Tensor  # [B] int32, context_lens on the device
    page_table: torch.Tensor  # [B, W] int32, -1 past each sequence's pages
    context_slots: torch.Tensor  # [S] int64, KV slots of every cached token (prefill), else empty
    logits_rows: torch.Tensor  # [B_sampled] int64, rows of the step's hidden states to turn into logits

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)
