"""MTPDrafter: the draft half of MTP speculative decoding on one rank.

After every step the rank drafts k tokens for each sequence it sampled, with the checkpoint's
multi-token-prediction layer (model/mtp.py), greedily (argmax): drafts are deterministic, so the
verify step's acceptance rule (sampling/sampler.py, `verify_on_device`) keeps the target model's
output distribution exactly.

The MTP layer at position i reads the target's final hidden state h_i and the token t_{i+1}
after it, and writes its own latent KV at position i (its layer of the paged cache, on the
sequence's pages). So after each step it runs over that step's positions:

- a prefill step: every new token; t_{i+1} is the next prompt token (within the chunk, or the
  plan's `next_token_ids` at its end), or the token sampled now at a prompt's last token;
- a verify step (q = 1 + k tokens per sequence, one row per token): t_{i+1} is the target's own
  token at that row. Rows past the accepted ones hold wrong values but lie past the sequence's
  computed tokens: the next step writes over them.

The first draft is the MTP prediction at each sampled sequence's last accepted position; draft
j + 1 reuses the layer one position further on (decode rows, the layer's output stream as h and
draft j as the token), writing its latents at the positions the next verify step rewrites.

Every rank runs the same layers and collectives, whatever it holds: one MTP pass of the step's
kind, then k - 1 decode passes (T = 0 where it has no sequences), so the MoE exchanges of the
MTP layer stay aligned across the group. A rank alone (no exchange to keep aligned) skips the
passes of a step with nothing to draft.

Host work: the positions of the first draft depend on how many tokens each sequence accepted,
which the host reads (the step's tokens are copied back anyway; steps run one at a time with
speculative decoding). Everything here runs eagerly.

Shapes: the legend in docs/ARCHITECTURE.md; here B_s the sampled sequences, Kd = k the drafts,
q = 1 + k the tokens of a verify step per sequence.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from nmoe_serve.engine.plan import StepKind, StepPlan
from nmoe_serve.model.deepseek_v3 import MoE
from nmoe_serve.model.mtp import MTPLayer
from nmoe_serve.model.rope import RotaryEmbedding
from nmoe_serve.model.transport import SingleRankTransport
from nmoe_serve.worker.step_batch import build_step_batch, to_device


class MTPDrafter:
    def __init__(
        self,
        mtp: MTPLayer,
        kv_cache: torch.Tensor,
        rope: RotaryEmbedding,
        page_size: int,
        num_drafts: int,
        device: torch.device,
        decode_attention_plan: Callable[..., None],
    ) -> None:
        """kv_cache: the MTP layer's paged latent cache [NP + 1, P, C]; decode_attention_plan: the
        model's decode attention `plan` (called before each decode pass)."""
        if num_drafts < 1:
            raise ValueError(f"num_drafts must be >= 1, got {num_drafts}")
        self.mtp, self.kv_cache, self.rope = mtp, kv_cache, rope
        self.page_size, self.num_drafts, self.device = page_size, num_drafts, device
        self._plan_decode = decode_attention_plan
        self.alone = isinstance(mtp.mlp, MoE) and isinstance(mtp.mlp.transport, SingleRankTransport)

    def after_prefill(
        self, plan: StepPlan, hidden: torch.Tensor, sampled: torch.Tensor, logits_rows: torch.Tensor
    ) -> torch.Tensor:
        """Drafts [B_s, Kd] for the sampled sequences of prefill `plan`: hidden [T, H] its target
        hidden states, sampled [B_s] the tokens it sampled (at its rows `logits_rows` [B_s])."""
        if self.alone and not plan.num_tokens:
            return torch.zeros(0, self.num_drafts, dtype=torch.int64, device=self.device)
        following = np.zeros(plan.num_tokens, np.int64)  # t_{i+1} of every new token i
        if plan.num_seqs:
            if plan.next_token_ids is None:
                raise ValueError(
                    f"step {plan.step_id}: a prefill plan for speculative decoding must carry next_token_ids"
                )
            following[:-1] = plan.token_ids[1:]
            ends = np.cumsum(plan.query_lens.astype(np.int64))
            following[ends - 1] = np.maximum(plan.next_token_ids, 0)  # sampled ones are fed below
        mtp_plan = dataclasses.replace(plan, token_ids=following)
        next_ids, batch = build_step_batch(
            mtp_plan, self.page_size, self.rope, self.device, (logits_rows, sampled)
        )
        normed, stream = self.mtp.draft(hidden, next_ids, batch, self.kv_cache)
        sampled_seqs = np.flatnonzero(plan.sample)
        last_position = plan.context_lens[sampled_seqs].astype(np.int64) - 1  # [B_s]
        return self._chain(plan, sampled_seqs, normed[logits_rows], stream[logits_rows], last_position)

    def after_verify(
        self, rows_plan: StepPlan, q: int, hidden: torch.Tensor, tokens: torch.Tensor, num_emitted: np.ndarray
    ) -> torch.Tensor:
        """Drafts [B, Kd] after a verify step: rows_plan its plan of one row per token
        (step_batch.token_rows, q rows per sequence), hidden [B·q, H] the target's hidden states,
        tokens [B, q] the target's token at each row, num_emitted [B] (host) its accepted tokens."""
        b = rows_plan.num_seqs // q
        if self.alone and not b:
            return torch.zeros(0, self.num_drafts, dtype=torch.int64, device=self.device)
        mtp_plan = dataclasses.replace(rows_plan, token_ids=np.zeros(rows_plan.num_seqs, np.int64))
        every = torch.arange(rows_plan.num_seqs, device=self.device)
        next_ids, batch = build_step_batch(
            mtp_plan, self.page_size, self.rope, self.device, (every, tokens.reshape(-1))
        )
        self._plan_decode(mtp_plan.context_lens, batch.page_table, graph=False)
        normed, stream = self.mtp.draft(hidden, next_ids, batch, self.kv_cache)
        last = np.arange(b, dtype=np.int64) * q + num_emitted.astype(np.int64) - 1  # [B] rows
        last_t = to_device(last, self.device)
        # the sequences' page rows: row b·q of the token rows
        seqs_plan = dataclasses.replace(rows_plan, page_table=rows_plan.page_table[::q])
        last_position = rows_plan.context_lens[last].astype(np.int64) - 1
        return self._chain(seqs_plan, np.arange(b), normed[last_t], stream[last_t], last_position)

    def _chain(
        self,
        plan: StepPlan,
        seqs: np.ndarray,
        normed: torch.Tensor,
        stream: torch.Tensor,
        last_position: np.ndarray,
    ) -> torch.Tensor:
        """Drafts [B_s, Kd]: the first from `normed` [B_s, H] (the MTP output at each sequence's
        last position), each further one from a decode pass one position on. plan.page_table's
        rows `seqs` are the sequences' pages."""
        drafts = [self.mtp.compute_logits(normed).argmax(dim=-1)]  # [B_s]
        page_table = plan.page_table[seqs] if seqs.size else np.zeros((0, 1), np.int32)
        for j in range(1, self.num_drafts):
            step = StepPlan(
                step_id=plan.step_id,
                kind=StepKind.DECODE,
                rank=plan.rank,
                released=(),
                new_requests=(),
                request_ids=tuple(str(i) for i in range(seqs.size)),
                query_lens=np.ones(seqs.size, np.int32),
                context_lens=(last_position + j + 1).astype(np.int32),
                token_ids=np.zeros(seqs.size, np.int64),
                page_table=page_table,
                sample=np.ones(seqs.size, bool),
            )
            every = torch.arange(seqs.size, device=self.device)
            next_ids, batch = build_step_batch(
                step, self.page_size, self.rope, self.device, (every, drafts[-1])
            )
            self._plan_decode(step.context_lens, batch.page_table, graph=False)
            normed, stream = self.mtp.draft(stream, next_ids, batch, self.kv_cache)
            drafts.append(self.mtp.compute_logits(normed).argmax(dim=-1))
        return torch.stack(drafts, dim=1)
