"""Step plans and step results: the only things that cross from the scheduler to a worker and back.

Plain data (numpy arrays, ints, strings, frozen dataclasses), so they serialize cheaply between
processes and carry no code. Every rank gets a plan every step; a rank with nothing to do gets one
with zero sequences (T = 0) and still runs the step, so collectives stay aligned across ranks.

Fed tokens: with overlapped steps the coordinator plans step n+1 before it knows the tokens of
step n. A decode row's token id is then -1 - i: the token this rank sampled for the i-th sampled
row of its previous step (`fed_token`), which the rank keeps on its device and feeds itself.

Speculative decoding (k draft tokens per sequence): a decode plan then carries 1 + k tokens per
sequence, the last output followed by the k drafts its rank made after the sequence's previous
step (a verify step); each rank's result gives per sampled sequence the tokens the target model
accepted (1 to 1 + k) and the k drafts for its next step. A prefill plan carries the token after
each sequence's chunk (`next_token_ids`), which the draft layer reads at the chunk's last token.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from nmoe_serve.sampling.params import SamplingParams


class StepKind(enum.IntEnum):
    PREFILL = 0
    DECODE = 1


@dataclass(frozen=True)
class NewRequest:
    """A request starting (or restarting after preemption) on a rank: the state its sampler keeps."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]  # non-empty when a preempted request is recomputed
    sampling: SamplingParams


@dataclass(frozen=True)
class StepPlan:
    """What one rank computes in one step (shapes: docs/ARCHITECTURE.md; T = sum(query_lens))."""

    step_id: int
    kind: StepKind
    rank: int
    released: tuple[str, ...]  # requests that ended or were preempted: drop their sampler state first
    new_requests: tuple[NewRequest, ...]  # then add these
    request_ids: tuple[str, ...]  # [B] sequences in this step, in batch order
    query_lens: np.ndarray  # [B] int32, new tokens per sequence (1 in decode)
    context_lens: np.ndarray  # [B] int32, tokens in the cache after this step
    token_ids: np.ndarray  # [T] int64, the new tokens, sequence after sequence (-1 - i: fed, see above)
    page_table: np.ndarray  # [B, W] int32, -1 past each sequence's pages
    sample: np.ndarray  # [B] bool, sample a token after this step (complete prefills, all decodes)
    # [B] int64, speculative decoding only: the known token after each sequence's new tokens (the
    # next prompt token of a chunk), -1 where it is the one this step samples; None otherwise
    next_token_ids: np.ndarray | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.request_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def sampled_ids(self) -> tuple[str, ...]:
        """[B_s] the request ids of the rows that sample (those its StepResult answers for)."""
        if self.sample.all():
            return self.request_ids
        return tuple(rid for rid, s in zip(self.request_ids, self.sample, strict=True) if s)

    def work(self) -> tuple[int, int, int, int]:
        """(sequences, new tokens, cached context tokens after the step, attention query-key pairs)
        of this rank's step; the pairs are causal within a chunk: sum of q·ctx − q(q−1)/2."""
        q = self.query_lens.astype(np.int64)
        ctx = self.context_lens.astype(np.int64)
        return self.num_seqs, int(q.sum()), int(ctx.sum()), int((q * ctx - q * (q - 1) // 2).sum())

    @classmethod
    def idle(
        cls,
        step_id: int,
        kind: StepKind,
        rank: int,
        released: tuple[str, ...] = (),
        new_requests: tuple[NewRequest, ...] = (),
    ) -> StepPlan:
        """The T = 0 plan of a rank with no sequences this step."""
        return cls(
            step_id=step_id,
            kind=kind,
            rank=rank,
            released=released,
            new_requests=new_requests,
            request_ids=(),
            query_lens=np.zeros(0, np.int32),
            context_lens=np.zeros(0, np.int32),
            token_ids=np.zeros(0, np.int64),
            page_table=np.zeros((0, 1), np.int32),
            sample=np.zeros(0, bool),
        )


Rows = TypeVar("Rows", int, np.ndarray)


def fed_token(sampled_row: Rows) -> Rows:
    """The token id(s) standing for the token a rank sampled for `sampled_row` of its previous step."""
    return -1 - sampled_row


@dataclass(frozen=True)
class StepResult:
    """The tokens a rank sampled in one step, for the sequences whose plan row had sample=True.

    One token per sampled sequence, or with speculative decoding `num_emitted[i]` tokens for the
    i-th (B_e = their sum, sequence after sequence): token_ids and the logprob arrays have a row
    per token. Shapes: B_s sampled sequences, B_e tokens, k top logprobs (here), Kd drafts."""

    step_id: int
    rank: int
    request_ids: tuple[str, ...]  # [B_s], the sampled sequences
    token_ids: np.ndarray  # [B_e] int64
    logprobs: np.ndarray | None = None  # [B_e] float32, sampled token's logprob (rows that asked)
    top_token_ids: np.ndarray | None = None  # [B_e, k] int64
    top_logprobs: np.ndarray | None = None  # [B_e, k] float32
    num_top: np.ndarray | None = None  # [B_e] int32, alternatives each row asked for (-1: no logprobs)
    num_emitted: np.ndarray | None = None  # [B_s] int64, tokens per sequence (None: one each)
    draft_token_ids: np.ndarray | None = None  # [B_s, Kd] int64, drafts for each sequence's next step
