"""Request: the scheduler's state of one generation request. Plain Python and numpy, no tensors.

While a request runs, its per-token state (pages, tokens computed, outputs of the last steps) lives
in the group's SlotTable arrays, row `slot`; the properties here read it from there. Outputs move
from the slot's history row into `output_chunks` every few dozen tokens and when the
request leaves its slot.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from nmoe_serve.sampling.params import SamplingParams

if TYPE_CHECKING:
    from nmoe_serve.engine.slots import SlotTable


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
    RUNNING = "running"  # on a rank, holding pages and a slot (prefilling or decoding)
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS, a stop token id, or (decided by the front end) a stop string
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # the engine failed while running it


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: np.ndarray  # [prompt] int64
    sampling: SamplingParams
    max_tokens: int  # resolved: sampling.max_tokens capped by the context limit (outputs it may sample)
    eos_token_ids: frozenset[int]  # empty when sampling.ignore_eos
    arrival: int  # admission order (a counter, not a clock)
    stop_ids: frozenset[int] = frozenset()  # eos_token_ids and sampling.stop_token_ids
    status: RequestStatus = RequestStatus.WAITING
    rank: int | None = None  # fixed at first admission; the request never moves
    slot: int = -1  # its row in the SlotTable while RUNNING
    slots: SlotTable | None = None  # the group's SlotTable while RUNNING
    output_chunks: list[np.ndarray] = field(default_factory=list)  # outputs moved out of the slot
    num_stored_outputs: int = 0  # tokens in output_chunks
    on_worker: bool = False  # the owner rank holds sampler state for it
    abort_pending: bool = False  # aborted while a step that runs it is in flight
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None
    num_preemptions: int = 0
    num_cached_tokens: int | None = None  # prompt tokens found in the prefix cache at first admission
    page_hashes: list[bytes] = field(default_factory=list)  # of its first full pages (engine/page_cache.py)

    @property
    def num_outputs(self) -> int:
        """Output tokens known to the scheduler (sampled and returned by the rank)."""
        if self.slots is not None:
            return int(self.slots.out_known[self.slot])
        return self.num_stored_outputs

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + self.num_outputs

    @property
    def output_token_ids(self) -> list[int]:
        return self.outputs().tolist()

    def outputs(self) -> np.ndarray:
        """[outputs] int64, every known output token."""
        chunks = list(self.output_chunks)
        if self.slots is not None:
            chunks.append(self.slots.history[self.slot, : self.slots.history_len[self.slot]])
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int64)

    @property
    def all_token_ids(self) -> np.ndarray:
        """[prompt + outputs] int64."""
        return np.concatenate([self.prompt_token_ids, self.outputs()])

    @property
    def pages(self) -> np.ndarray | list[int]:
        """The KV pages it holds, in order (a view of its page-table row while it runs)."""
        if self.slots is None:
            return []
        return self.slots.page_table[self.slot, : self.slots.num_pages[self.slot]]

    @property
    def num_computed_tokens(self) -> int:
        """Tokens whose KV is in its pages, or will be once the steps in flight complete."""
        return 0 if self.slots is None else int(self.slots.num_computed[self.slot])

    @property
    def num_prefill_tokens(self) -> int:
        """Tokens the current (re)prefill must compute before it samples."""
        return 0 if self.slots is None else int(self.slots.num_prefill[self.slot])

    @property
    def prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prefill_tokens

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED
