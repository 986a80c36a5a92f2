"""What a step gives back to the engine's callers: the new tokens, as columns.

`Scheduler.update` returns a StepOutputs: per rank the sampled rows' request ids, tokens and
finish codes as arrays, built without a Python object per token. Callers that want one object per
token (the offline API, the coordinator's per-request streams, tests) iterate it and get
TokenUpdates, made only then.

Shapes: the legend in docs/ARCHITECTURE.md: B_s the sampled rows of one rank, k top logprobs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from nmoe_serve.engine.plan import StepResult
from nmoe_serve.engine.request import FinishReason

# Finish codes in StepOutputs' arrays: 0 the request goes on, else the reason it ended.
FINISH_CODES: tuple[FinishReason | None, ...] = (None, FinishReason.STOP, FinishReason.LENGTH)
GOES_ON, STOPPED, LENGTH = 0, 1, 2


@dataclass(slots=True)
class TokenUpdate:
    """One new token of one request, and whether the request ended with it."""

    request_id: str
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None
    num_cached_tokens: int | None = None  # on a request's first token: its prompt tokens found cached


@dataclass(frozen=True, slots=True)
class RankOutputs:
    """The accepted tokens of one rank in one step.

    rows: [B_a] int64, the accepted token rows of `result` (rows of requests that ended or were
    preempted or aborted while the step was in flight are left out, and with speculative decoding
    the tokens past a request's end); seqs: [B_a] int64, each one's sequence (its index in
    `result.request_ids`; equal to rows with one token per sequence); finish: [B_a] int8 finish codes;
    stop_token: [B_a] int64, the stop token id that ended the row (-1: none, or an EOS); cached:
    [B_a] int64, on a request's first output its prompt tokens found in the prefix cache (else -1)."""

    result: StepResult
    rows: np.ndarray
    seqs: np.ndarray
    finish: np.ndarray
    stop_token: np.ndarray
    cached: np.ndarray

    def __len__(self) -> int:
        return int(self.rows.shape[0])


class StepOutputs:
    """The tokens one step produced, rank by rank; iterate for one TokenUpdate per token."""

    __slots__ = ("parts",)

    def __init__(self, parts: list[RankOutputs] | None = None) -> None:
        self.parts = parts or []

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __bool__(self) -> bool:
        return any(len(p) for p in self.parts)

    def __iter__(self) -> Iterator[TokenUpdate]:
        for part in self.parts:
            result = part.result
            tokens = result.token_ids[part.rows].tolist()
            ids = result.request_ids
            with_logprobs = result.num_top is not None
            for row, seq, token, code, stop, cached in zip(
                part.rows.tolist(),
                part.seqs.tolist(),
                tokens,
                part.finish.tolist(),
                part.stop_token.tolist(),
                part.cached.tolist(),
                strict=True,
            ):
                update = TokenUpdate(
                    ids[seq],
                    token,
                    finish_reason=FINISH_CODES[code],
                    stop_token_id=None if stop < 0 else stop,
                    num_cached_tokens=None if cached < 0 else cached,
                )
                if with_logprobs:
                    update.logprob, update.top_logprobs = _logprob(result, row), _top_logprobs(result, row)
                yield update

    @property
    def num_finished(self) -> int:
        return sum(int(np.count_nonzero(p.finish)) for p in self.parts)


def _logprob(result: StepResult, i: int) -> float | None:
    if result.logprobs is None or result.num_top is None or result.num_top[i] < 0:
        return None
    return float(result.logprobs[i])


def _top_logprobs(result: StepResult, i: int) -> tuple[tuple[int, float], ...] | None:
    if result.num_top is None or result.num_top[i] < 0:
        return None
    k = int(result.num_top[i])
    assert result.top_token_ids is not None and result.top_logprobs is not None
    return tuple((int(result.top_token_ids[i, j]), float(result.top_logprobs[i, j])) for j in range(k))
