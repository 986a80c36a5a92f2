"""Request: the scheduler's state of one generation request. Plain Python, no tensors."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from nmoe_serve.sampling.params import SamplingParams


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
