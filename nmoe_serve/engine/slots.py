"""SlotTable: the running sequences of every rank of a group, as preallocated arrays updated in place.

A request that runs takes a slot (a row) on its rank until it finishes or is preempted; rank r owns
rows r·S … (r+1)·S − 1. Everything the scheduler touches per token lives in these rows: the page
table, how many tokens are computed, outputs known and scheduled, the last token, the stop ids,
the outputs of the last steps. A decode step reads and writes them with a fixed number of numpy
operations for the whole group, whatever the batch size or the number of ranks, and makes no
Python object per token.

Generations: a slot's `generation` grows every time it is vacated, so a row of a step still in
flight that names a slot whose request has since left is recognised (and its token dropped).

Outputs stay in the slot's history row and move to the request (`Request.output_chunks`) when the
row fills or the request leaves. Each slot fills after its own count (`flush_at`, spread over
[Hw/2, Hw]), so sequences admitted together do not all move their outputs in the same step.

Shapes: the legend in docs/ARCHITECTURE.md; here S slots per rank (max_num_seqs), RS = EP·S rows,
W page-table width (pages of one max_seq_len sequence), Ks stop ids per slot (the most any
running request has), Kd draft tokens per slot (speculative decoding; 0 without), Hw outputs a
slot holds before they move (`history_width`), B_a rows accepted in a step.
"""

from __future__ import annotations

import numpy as np

from nmoe_serve.engine.outputs import GOES_ON, LENGTH, STOPPED
from nmoe_serve.engine.request import Request

HISTORY_WIDTH = 256


class SlotTable:
    def __init__(
        self,
        num_ranks: int,
        capacity: int,
        width: int,
        history_width: int = HISTORY_WIDTH,
        num_drafts: int = 0,
    ) -> None:
        n = num_ranks * capacity
        self.num_ranks, self.capacity = num_ranks, capacity
        self.width, self.history_width = width, history_width
        self.occupant: list[Request | None] = [None] * n
        self.request_ids = np.empty(n, object)  # [RS] str, for the plans' id tuples
        self.active = np.zeros(n, bool)  # [RS]
        self.generation = np.zeros(n, np.int64)  # [RS]
        self.admitted = np.zeros(n, np.int64)  # [RS] admission order (re-admissions count anew)
        self.page_table = np.full((n, width), -1, np.int32)  # [RS, W]
        self.num_pages = np.zeros(n, np.int64)  # [RS]
        self.num_computed = np.zeros(n, np.int64)  # [RS] tokens whose KV is written, or scheduled to be
        self.num_prefill = np.zeros(n, np.int64)  # [RS] tokens the (re)prefill computes before sampling
        self.num_cached_pages = np.zeros(n, np.int64)  # [RS] leading pages offered to the prefix cache
        self.cached_prompt = np.zeros(n, np.int64)  # [RS] prompt tokens cached at first admission
        self.out_known = np.zeros(n, np.int64)  # [RS] outputs returned by the rank
        self.out_scheduled = np.zeros(n, np.int64)  # [RS] outputs returned or in flight
        self.max_out = np.zeros(n, np.int64)  # [RS] outputs it may sample (max_tokens)
        self.min_tokens = np.zeros(n, np.int64)  # [RS] outputs before a stop id may end it
        self.last_token = np.zeros(n, np.int64)  # [RS] the last known output (a decode step's input)
        self.fed_index = np.full(n, -1, np.int64)  # [RS] its row among the last planned step's samples
        self.stop_ids = np.full((n, 1), -1, np.int64)  # [RS, Ks], -1 past each slot's ids
        self.aborting = np.zeros(n, bool)  # [RS] aborted while a step that runs it is in flight
        self.drafts = np.zeros((n, num_drafts), np.int64)  # [RS, Kd] speculative drafts for the next step
        self.history = np.zeros((n, history_width), np.int64)  # [RS, Hw]
        self.history_len = np.zeros(n, np.int64)  # [RS]
        self.flush_at = np.full(n, history_width, np.int64)  # [RS] history length at which outputs move
        self.rank_bounds = np.arange(1, num_ranks) * capacity  # where each rank's rows start (rank 0 aside)
        self._free = [list(range((r + 1) * capacity - 1, r * capacity - 1, -1)) for r in range(num_ranks)]
        self.counts = [0] * num_ranks

    def rank_of(self, slot: int) -> int:
        return slot // self.capacity

    def occupy(self, rank: int, request: Request, pages: np.ndarray, admitted: int) -> int:
        """Seat `request` on `rank` (its pages already allocated) for a (re)prefill of all its known tokens."""
        slot = self._free[rank].pop()
        outputs = request.num_stored_outputs
        self.occupant[slot] = request
        self.request_ids[slot] = request.request_id
        self.active[slot] = True
        self.admitted[slot] = admitted
        self.page_table[slot, : pages.size] = pages
        self.num_pages[slot] = pages.size
        self.num_computed[slot] = 0
        self.num_cached_pages[slot] = 0
        self.cached_prompt[slot] = request.num_cached_tokens or 0
        self.num_prefill[slot] = len(request.prompt_token_ids) + outputs
        self.out_known[slot] = self.out_scheduled[slot] = outputs
        self.max_out[slot] = request.max_tokens
        self.min_tokens[slot] = request.sampling.min_tokens
        self.fed_index[slot] = -1
        self.aborting[slot] = False
        self.history_len[slot] = 0
        half = self.history_width // 2
        self.flush_at[slot] = self.history_width - admitted % max(half, 1)
        self._set_stop_ids(slot, request.stop_ids)
        request.slot, request.slots = slot, self
        self.counts[rank] += 1
        return slot

    def vacate(self, slot: int) -> np.ndarray:
        """Empty the slot: its outputs move to the request; returns the pages it held (to free)."""
        request = self.occupant[slot]
        assert request is not None
        self._flush_history(slot, request)
        pages = self.page_table[slot, : self.num_pages[slot]].copy()
        self.page_table[slot, : self.num_pages[slot]] = -1
        self.num_pages[slot] = 0
        self.active[slot] = False
        self.aborting[slot] = False
        self.occupant[slot] = None
        self.request_ids[slot] = None
        self.generation[slot] += 1
        request.slot, request.slots = -1, None
        rank = self.rank_of(slot)
        self._free[rank].append(slot)
        self.counts[rank] -= 1
        return pages

    def split(self, rows: np.ndarray) -> list[np.ndarray]:
        """Sorted rows → one view per rank (its rows, still global slot ids)."""
        return np.split(rows, np.searchsorted(rows, self.rank_bounds))

    def decodable(self) -> np.ndarray:
        """Slots that take a token in a decode step (prefilled, under max_tokens counting those in
        flight), ascending."""
        return np.flatnonzero(
            self.active & (self.num_computed >= self.num_prefill) & (self.out_scheduled < self.max_out)
        )

    def prefilling(self, rank: int) -> np.ndarray:
        """The rank's slots with prompt (or recompute) tokens left, in admission order."""
        lo, hi = rank * self.capacity, (rank + 1) * self.capacity
        rows = lo + np.flatnonzero(self.active[lo:hi] & (self.num_computed[lo:hi] < self.num_prefill[lo:hi]))
        return rows[np.argsort(self.admitted[rows], kind="stable")]

    def any_prefilling(self) -> bool:
        return bool(np.any(self.active & (self.num_computed < self.num_prefill)))

    def by_admission(self, rank: int) -> np.ndarray:
        """The rank's occupied slots, oldest admission first."""
        lo = rank * self.capacity
        rows = lo + np.flatnonzero(self.active[lo : lo + self.capacity])
        return rows[np.argsort(self.admitted[rows], kind="stable")]

    def accept(self, slots: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """Record one new output per slot (each slot once); returns [B_a] int8 finish codes."""
        length = self.history_len[slots]
        self.history[slots, length] = tokens
        length += 1
        self.history_len[slots] = length
        known = self.out_known[slots] + 1
        self.out_known[slots] = known
        self.last_token[slots] = tokens
        stopped = (self.stop_ids[slots] == tokens[:, None]).any(axis=1)
        stopped &= known >= self.min_tokens[slots]
        finish = np.where(known >= self.max_out[slots], LENGTH, GOES_ON).astype(np.int8)
        finish[stopped] = STOPPED
        full = length >= self.flush_at[slots]
        if full.any():
            for slot in slots[full].tolist():
                request = self.occupant[slot]
                assert request is not None
                self._flush_history(slot, request)
                self.flush_at[slot] = self.history_width
        return finish

    def _flush_history(self, slot: int, request: Request) -> None:
        n = int(self.history_len[slot])
        if n:
            request.output_chunks.append(self.history[slot, :n].copy())
            request.num_stored_outputs += n
            self.history_len[slot] = 0

    def _set_stop_ids(self, slot: int, stop_ids: frozenset[int]) -> None:
        if len(stop_ids) > self.stop_ids.shape[1]:
            wider = np.full((self.stop_ids.shape[0], len(stop_ids)), -1, np.int64)
            wider[:, : self.stop_ids.shape[1]] = self.stop_ids
            self.stop_ids = wider
        self.stop_ids[slot] = -1
        self.stop_ids[slot, : len(stop_ids)] = sorted(stop_ids)
