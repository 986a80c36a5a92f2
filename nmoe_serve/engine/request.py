"""Request: the scheduler's state of one generation request. Plain Python, no tensors."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from nmoe_serve.sampling.params import SamplingParams


class RequestRejected(ValueError):
    """A request that can never be served with this configuration; the message says why."""


def output_budget(prompt_len: int, max_tokens: int | None, max_seq_len: int) -> int:
    """The tokens a request may generate: max_tokens, or (None) up to the context limit.

    Raises RequestRejected for an empty prompt or one that does not fit the context with its
    max_tokens. The front end calls this before admission (to answer 400 at once) and the
    scheduler when it queues the request: one rule, one place."""
    if prompt_len == 0:
        raise RequestRejected("the prompt is empty: send at least one token")
    if prompt_len >= max_seq_len:
        raise RequestRejected(
            f"the prompt has {prompt_len} tokens, which leaves no room to generate within the context "
            f"limit of {max_seq_len} tokens (max_seq_len): shorten the prompt"
        )
    budget = max_seq_len - prompt_len if max_tokens is None else max_tokens
    if prompt_len + budget > max_seq_len:
        raise RequestRejected(
            f"the prompt ({prompt_len} tokens) plus max_tokens ({budget}) exceeds the context limit of "
            f"{max_seq_len} tokens (max_seq_len): lower max_tokens to at most {max_seq_len - prompt_len} "
            "or shorten the prompt"
        )
    return budget


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and queued again; holds no pages
    RUNNING = "running"  # on a rank, holding pages (prefilling or decoding)
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token id, or (decided by the front end) a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # the engine failed while running it


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    max_tokens: int  # resolved: sampling.max_tokens capped by the context limit
    eos_token_ids: frozenset[int]  # empty when sampling.ignore_eos
    arrival: int  # admission order (a counter, not a clock)
    stop_ids: frozenset[int] = frozenset()  # eos_token_ids and sampling.stop_token_ids
    length_limit: int = 0  # total tokens (prompt + output) at which it ends with "length"
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    rank: int | None = None  # fixed at first admission; the request never moves
    pages: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in this request's pages
    num_prefill_tokens: int = 0  # tokens the current (re)prefill must compute before sampling
    on_worker: bool = False  # the owner rank holds sampler state for it
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prefill_tokens

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
