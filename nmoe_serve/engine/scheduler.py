"""Scheduler: admission, rank choice, chunked prefill, decode batches and preemption, for N ranks.

Plain Python and numpy (no torch, no Ray): it owns the requests, every rank's page pool and the
group's slot table (engine/slots.py), and turns them into one StepPlan per rank per step. Every step is a
prefill step or a decode step for all ranks; a rank with nothing of that kind gets a T = 0 plan.
A decode step is a fixed number of array operations for the whole group: page tables, token
counts and outputs are preallocated arrays updated in place, and the step's tokens come back as columns
(engine/outputs.py), not one object each.

Policy:
- Admission is FIFO. A request goes to a rank that has a sequence slot, prefill budget left this
  step, and pages for its whole prompt plus the admission watermark (no watermark on an empty
  rank, so a request as large as the whole pool still runs): the one with the longest cached
  prefix of the request, among the ranks running at most `max_rank_imbalance` sequences more than
  the least loaded; without a hit, the one with the most free pages. The head of the queue waits
  rather than being overtaken. A preempted request returns to its own rank.
- Prefix cache (engine/page_cache.py, per rank): a request's full pages are offered to its rank's
  cache once the step that computes them is planned (after that step's admissions, so none reads
  a page in the step that writes it), and when it leaves (the pages its decode filled). An
  admitted request takes its rank's cached pages of its prefix, at most all but its last token,
  and its prefill starts after them. A failed or abandoned step drops every rank's cache.
- Prefill steps continue unfinished prefills first, then admit; a prompt larger than the rank's
  per-step token budget is split over steps (chunked prefill) and sampled after its last chunk.
  While sequences decode, a prefill step takes at most `decode_prefill_tokens` per rank, so the
  decoding sequences' inter-token latency stays bounded (None: `max_prefill_tokens`).
- Decode steps give every decoding sequence one token. A sequence whose last page is full gets a
  new page; when the pool is empty, the rank's newest request is preempted (its pages freed, its
  tokens kept) and later recomputed by a prefill of prompt + output: never an assertion.
- Prefill is preferred, but after `max_prefill_steps_in_a_row` prefill steps the decoding
  sequences get a step, so a stream of arrivals cannot starve them.
- When the last requests end, one more (T = 0) step carries their release to the ranks, so no
  rank keeps state of a finished request while the engine is idle.

Steps in flight (overlap): with `max_steps_in_flight` = 2 the next step is planned while the last
one runs, before its tokens are known. A decode row whose input is such a token says so in the
plan (token id -1 - i: the token the rank sampled for its i-th sampled row of the previous step,
plan.py) and the owner rank feeds it from the device. A request can only end on its own results,
so it is learnt one step late: a request that sampled EOS may take one more (wasted) row, whose
token is dropped, never emitted. max_tokens counts the tokens in flight, so it is never exceeded.

Speculative decoding (`num_draft_tokens` k > 0; steps one at a time): every decode step is a
verify step of 1 + k tokens per sequence, its last output and the k drafts its rank returned
with it. The rank returns 1 to 1 + k accepted tokens per sequence; they are taken in order and
the request ends at the first that ends it (EOS, a stop id, max_tokens): nothing past it is
emitted. The KV of the rejected drafts' positions is rolled back by the count alone (the next
step writes over it): after the step a sequence has start + accepted tokens computed. Pages:
a verify step writes positions up to start + k and the draft layer, drafting k tokens ahead of
the last accepted one, up to start + 2k - 1, so a decoding sequence holds pages for its
computed tokens + 2k, and an admitted one for its known tokens + k - 1; admission refuses a
request whose prompt + max_tokens + 2k - 1 does not fit a rank. The draft layer keeps, at each
token's slot, a value that depends on the next token as well, so with k > 0 the prefix cache
hashes each page with the token after it and offers a page only once that token is known.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from nmoe_serve.engine.outputs import GOES_ON, STOPPED, RankOutputs, StepOutputs, TokenUpdate
from nmoe_serve.engine.page_cache import PageCache, extend_page_hashes
from nmoe_serve.engine.plan import NewRequest, StepKind, StepPlan, StepResult, fed_token
from nmoe_serve.engine.request import FinishReason, Request, RequestRejected, RequestStatus, output_budget
from nmoe_serve.engine.slots import SlotTable
from nmoe_serve.sampling.params import SamplingParams

__all__ = ["Scheduler", "SchedulerLimits", "StepOutputs", "TokenUpdate"]


@dataclass(frozen=True)
class SchedulerLimits:
    num_ranks: int
    pages_per_rank: int
    page_size: int
    max_seq_len: int
    max_num_seqs: int  # running sequences per rank
    max_prefill_tokens: int  # prompt tokens per rank per prefill step
    max_prefill_steps_in_a_row: int
    watermark_pages: int  # pages per rank left free by admission
    decode_prefill_tokens: int | None = None  # prompt tokens per rank per prefill step while sequences decode
    prefix_caching: bool = True  # share full pages of equal prefixes on a rank (engine/page_cache.py)
    max_rank_imbalance: int = 4  # running sequences a cache hit may put on a rank over the least loaded
    num_draft_tokens: int = 0  # speculative decoding: tokens drafted per sequence per step (0: off)

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_size)

    @property
    def prefill_budget_while_decoding(self) -> int:
        if self.decode_prefill_tokens is None:
            return self.max_prefill_tokens
        return min(self.decode_prefill_tokens, self.max_prefill_tokens)

    @property
    def decode_lookahead(self) -> int:
        """Positions from a decoding sequence's first uncomputed one that its pages must hold
        before a decode step: the one it writes, or with k drafts those of a verify step and of
        the drafts after it (2k)."""
        return 2 * self.num_draft_tokens if self.num_draft_tokens else 1

    @property
    def admission_tail(self) -> int:
        """Positions past its known tokens an admitted sequence's pages hold: with k > 1 drafts,
        those the drafts after its prefill write (k - 1)."""
        return max(self.num_draft_tokens - 1, 0)

    @property
    def hash_lookahead(self) -> int:
        """Tokens after a page its prefix-cache hash covers (1 with speculative decoding)."""
        return 1 if self.num_draft_tokens else 0


@dataclass(slots=True)
class _SampledRows:
    """The rows of one rank's plan that sample, as the scheduler will accept their tokens."""

    slots: np.ndarray  # [B_s] int64
    generation: np.ndarray  # [B_s] int64, the slots' generations when planned
    request_ids: tuple[str, ...]  # [B_s]


@dataclass(slots=True)
class _InFlight:
    step_id: int
    plans: list[StepPlan]
    sampled: list[_SampledRows]


_NO_ROWS = _SampledRows(np.zeros(0, np.int64), np.zeros(0, np.int64), ())


class Scheduler:
    def __init__(self, limits: SchedulerLimits, max_steps_in_flight: int = 1) -> None:
        """max_steps_in_flight: 1 plans a step only once the last one's results are in; 2 plans the
        next step while the last one runs (the engine core's overlap)."""
        if max_steps_in_flight not in (1, 2):
            raise ValueError(f"max_steps_in_flight must be 1 or 2, got {max_steps_in_flight}")
        if limits.num_draft_tokens and max_steps_in_flight != 1:
            raise ValueError(
                "speculative decoding plans each step once the last one's results are in: "
                "max_steps_in_flight must be 1 (scheduler.overlap = false)"
            )
        self.limits = limits
        self.max_steps_in_flight = max_steps_in_flight
        self.pools = [
            PageCache(limits.pages_per_rank, limits.prefix_caching) for _ in range(limits.num_ranks)
        ]
        self.num_draft_tokens = limits.num_draft_tokens
        self.table = SlotTable(
            limits.num_ranks,
            limits.max_num_seqs,
            limits.pages_for(limits.max_seq_len + 2 * limits.num_draft_tokens),
            num_drafts=limits.num_draft_tokens,
        )
        self.waiting: deque[Request] = deque()
        self.requests: dict[str, Request] = {}
        self._released: list[list[str]] = [[] for _ in range(limits.num_ranks)]
        self._deferred_aborts: list[str] = []
        self._in_flight: deque[_InFlight] = deque()
        self._prefill_streak = 0
        self._arrivals = 0
        self._admissions = 0
        self.step_id = 0
        self.num_preemptions = 0
        self.cache_queries = 0  # prompt tokens looked up in the prefix cache (first admissions)
        self.cache_hits = 0  # of those, tokens found cached
        self.admitted_by_rank = [0] * limits.num_ranks  # first admissions per rank (the rank balance)
        self.num_drafted = 0  # speculative decoding: draft tokens verified ...
        self.num_accepted = 0  # ... and of those, accepted (emitted tokens minus one per sequence-step)
        self.num_verified_seqs = 0  # sequence-steps of verify steps (the mean accepted length's count)

    # ---- requests in and out -------------------------------------------------------------------

    def add(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        eos_token_ids: frozenset[int],
    ) -> Request:
        """Queue a request, or raise RequestRejected if it can never run (its id is taken, it does
        not fit the context, or it needs more KV pages than a rank has). Token ids are the front
        end's to check (nmoe_serve.frontend.validation)."""
        if request_id in self.requests:
            raise RequestRejected(f"request id {request_id!r} is already in use")
        prompt_len = len(prompt_token_ids)
        max_tokens = output_budget(prompt_len, sampling.max_tokens, self.limits.max_seq_len)
        need = self.limits.pages_for(prompt_len + max_tokens - 1 + self.limits.decode_lookahead)
        if need > self.limits.pages_per_rank:
            raise RequestRejected(
                f"the request needs up to {need} KV pages but a rank has "
                f"{self.limits.pages_per_rank}: lower max_tokens or shorten the prompt"
            )
        eos = frozenset() if sampling.ignore_eos else eos_token_ids
        request = Request(
            request_id=request_id,
            prompt_token_ids=np.asarray(prompt_token_ids, np.int64),
            sampling=sampling,
            max_tokens=max_tokens,
            eos_token_ids=eos,
            arrival=self._arrivals,
            stop_ids=eos | frozenset(sampling.stop_token_ids),
        )
        self._arrivals += 1
        self.requests[request_id] = request
        self.waiting.append(request)
        return request

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its pages are freed now, or (a step that runs it in flight) before
        the next step is planned. False if unknown. No token of it is returned after this."""
        request = self.requests.get(request_id)
        if request is None or request.finished or request.abort_pending:
            return False
        if self._in_flight and request.status is RequestStatus.RUNNING:
            request.abort_pending = True
            self.table.aborting[request.slot] = True
            self._deferred_aborts.append(request_id)
        else:
            self._finish(request, FinishReason.ABORT)
            del self.requests[request_id]
        return True

    def has_work(self) -> bool:
        """Requests to run, ended requests whose worker state still has to be released, or steps
        in flight whose results are still to come."""
        return bool(self.waiting) or any(self.table.counts) or any(self._released) or bool(self._in_flight)

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def oldest_in_flight(self) -> int | None:
        """The step id whose results update() takes next."""
        return self._in_flight[0].step_id if self._in_flight else None

    @property
    def oldest_plans(self) -> list[StepPlan]:
        """The plans of that step ([] when none is in flight)."""
        return self._in_flight[0].plans if self._in_flight else []

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return sum(self.table.counts)

    @property
    def running(self) -> list[list[Request]]:
        """Each rank's running requests, oldest admission first (a snapshot)."""
        table = self.table
        return [
            [r for r in (table.occupant[s] for s in table.by_admission(rank).tolist()) if r is not None]
            for rank in range(self.limits.num_ranks)
        ]

    def kv_usage(self) -> float:
        used = sum(p.num_used for p in self.pools)
        return used / (self.limits.pages_per_rank * self.limits.num_ranks)

    # ---- one step --------------------------------------------------------------------------------

    def schedule(self) -> list[StepPlan] | None:
        """Plans for the next step (one per rank), or None when there is nothing to run now (with a
        step in flight: nothing until its results are in)."""
        if len(self._in_flight) >= self.max_steps_in_flight:
            raise RuntimeError(
                f"schedule() called with {len(self._in_flight)} step(s) in flight: call update() with "
                "the results of the oldest first"
            )
        self._apply_deferred_aborts()  # every rank runs steps in order: the pages' last use is planned
        decodable = self.table.decodable()
        has_decodes = decodable.size > 0
        wants_prefill = bool(self.waiting) or self.table.any_prefilling()
        planned = None
        if wants_prefill and (
            not has_decodes or self._prefill_streak < self.limits.max_prefill_steps_in_a_row
        ):
            planned = self._plan_prefill(has_decodes)
            self._prefill_streak += planned is not None
        if planned is None and has_decodes:
            planned = self._plan_decode(decodable)
            self._prefill_streak = 0
        if (
            planned is None and wants_prefill
        ):  # decodes were all preempted, or the streak limit had no decodes to serve
            planned = self._plan_prefill(False)
        if planned is None and any(self._released) and not self._in_flight:
            # going idle: one T = 0 step tells the ranks what ended
            planned = [
                (self._idle_plan(StepKind.DECODE, rank), _NO_ROWS) for rank in range(self.limits.num_ranks)
            ]
        if planned is None:
            return None
        plans = [p for p, _ in planned]
        self._in_flight.append(_InFlight(self.step_id, plans, [s for _, s in planned]))
        self.step_id += 1
        return plans

    def update(self, results: list[StepResult]) -> StepOutputs:
        """Take the oldest in-flight step's results; return its accepted tokens (requests that
        ended included; rows of requests that left while it ran are dropped)."""
        if not self._in_flight:
            raise RuntimeError("update() called with no step in flight")
        step = self._in_flight[0]
        if results and results[0].step_id != step.step_id:
            raise RuntimeError(
                f"update() got the results of step {results[0].step_id} but step {step.step_id} is the "
                "oldest in flight"
            )
        self._in_flight.popleft()
        for rank, (result, rows) in enumerate(zip(results, step.sampled, strict=True)):
            if result.request_ids != rows.request_ids:
                raise RuntimeError(
                    f"rank {rank} returned tokens for {len(result.request_ids)} sequences of step "
                    f"{step.step_id} that differ from the {len(rows.request_ids)} its plan sampled"
                )
        if self.num_draft_tokens:
            outputs = self._accept_speculative(results, step.sampled, step.plans[0].kind)
        else:
            outputs = self._accept(results, step.sampled)
        self._apply_deferred_aborts()
        return outputs

    def fail_in_flight(self, workers_lost: bool = True) -> list[str]:
        """The step failed: end every request that holds pages or is queued with ERROR; return their ids.

        workers_lost: the ranks are being restarted, so there is no worker state left to release;
        otherwise (a step abandoned by its caller, which may or may not have run) the releases go
        out again with the next step."""
        if not workers_lost:
            for step in self._in_flight:
                for plan in step.plans:
                    self._released[plan.rank].extend(plan.released)
        failed = [r.request_id for r in self.requests.values() if not r.finished]
        for request_id in failed:
            self._finish(self.requests.pop(request_id), FinishReason.ERROR)
        # the ranks' caches are gone (restarted) or may miss what the lost step wrote: trust none
        self.reset_prefix_cache()
        self._in_flight.clear()
        self._deferred_aborts.clear()
        if workers_lost:
            self._released = [[] for _ in range(self.limits.num_ranks)]
        return failed

    # ---- accepting a step's tokens -----------------------------------------------------------

    def _accept(self, results: list[StepResult], sampled: list[_SampledRows]) -> StepOutputs:
        ranks = [r for r, rows in enumerate(sampled) if rows.slots.size]
        if not ranks:
            return StepOutputs()
        table = self.table
        slots = np.concatenate([sampled[r].slots for r in ranks])
        generation = np.concatenate([sampled[r].generation for r in ranks])
        tokens = np.concatenate([results[r].token_ids for r in ranks])
        valid = (table.generation[slots] == generation) & ~table.aborting[slots]
        accepted = np.flatnonzero(valid)
        slots, tokens = slots[accepted], tokens[accepted]
        finish = table.accept(slots, tokens)
        cached = np.where(table.out_known[slots] == 1, table.cached_prompt[slots], -1)  # first outputs
        stop_token = np.full(accepted.size, -1, np.int64)
        for i in np.flatnonzero(finish).tolist():
            request = table.occupant[int(slots[i])]
            assert request is not None
            token = int(tokens[i])
            reason = FinishReason.STOP if finish[i] == STOPPED else FinishReason.LENGTH
            if reason is FinishReason.STOP and token not in request.eos_token_ids:
                request.stop_token_id = int(token)
                stop_token[i] = token
            self._finish(request, reason)
            del self.requests[request.request_id]
        # back to rank parts: the accepted rows of each rank's result
        offsets = np.cumsum([0] + [sampled[r].slots.size for r in ranks])
        cuts = np.searchsorted(accepted, offsets)
        parts = []
        for j, rank in enumerate(ranks):
            a, b = cuts[j], cuts[j + 1]
            if a < b:
                rows = accepted[a:b] - offsets[j]
                parts.append(
                    RankOutputs(results[rank], rows, rows, finish[a:b], stop_token[a:b], cached[a:b])
                )
        return StepOutputs(parts)

    def _accept_speculative(
        self, results: list[StepResult], sampled: list[_SampledRows], kind: StepKind
    ) -> StepOutputs:
        """`_accept` for steps with 1 to 1 + k tokens per sequence: each sequence's tokens are
        taken in order until one ends the request; a verify step's computed count becomes its
        start plus the tokens taken (the rejected drafts' KV rolled back), and the sequences that
        go on keep the drafts for their next step."""
        ranks = [r for r, rows in enumerate(sampled) if rows.slots.size]
        if not ranks:
            return StepOutputs()
        table, q = self.table, 1 + self.num_draft_tokens
        slots = np.concatenate([sampled[r].slots for r in ranks])  # [S]
        generation = np.concatenate([sampled[r].generation for r in ranks])
        counts = np.concatenate([_emitted(results[r]) for r in ranks])  # [S]
        drafts = np.concatenate([_drafts(results[r], self.num_draft_tokens) for r in ranks])  # [S, k]
        flat = np.concatenate([results[r].token_ids for r in ranks])  # [S_e]
        first = np.concatenate(([0], np.cumsum(counts)[:-1]))  # [S], each sequence's first token
        valid = (table.generation[slots] == generation) & ~table.aborting[slots]
        finish = np.zeros(slots.size, np.int8)
        taken = np.zeros(slots.size, np.int64)
        token_rows, seq_rows, codes, stops, cached_parts = [], [], [], [], []
        for j in range(int(counts.max())):
            live = np.flatnonzero(valid & (counts > j) & (finish == GOES_ON))
            if not live.size:
                break
            tokens = flat[first[live] + j]
            code = table.accept(slots[live], tokens)
            finish[live] = code
            taken[live] += 1
            known = table.out_known[slots[live]]
            stop = np.where(code == STOPPED, tokens, -1)
            token_rows.append(first[live] + j)
            seq_rows.append(live)
            codes.append(code)
            stops.append(stop)
            cached_parts.append(np.where(known == 1, table.cached_prompt[slots[live]], -1))
        rows_v = np.flatnonzero(valid)
        kept = slots[rows_v]
        if kind == StepKind.DECODE:
            table.num_computed[kept] += taken[rows_v] - q  # planned start + q -> start + taken
            self.num_verified_seqs += rows_v.size
            self.num_drafted += rows_v.size * self.num_draft_tokens
            self.num_accepted += int((counts[rows_v] - 1).sum())
        table.out_scheduled[kept] = table.out_known[kept]
        table.drafts[kept] = drafts[rows_v]
        if not token_rows:
            return StepOutputs()
        order = np.argsort(np.concatenate(token_rows), kind="stable")
        token_row = np.concatenate(token_rows)[order]
        seq_row = np.concatenate(seq_rows)[order]
        code_all = np.concatenate(codes)[order]
        stop_all = np.concatenate(stops)[order]
        cached_all = np.concatenate(cached_parts)[order]
        for i in np.flatnonzero(code_all).tolist():
            request = table.occupant[int(slots[seq_row[i]])]
            assert request is not None
            token = int(flat[token_row[i]])
            reason = FinishReason.STOP if code_all[i] == STOPPED else FinishReason.LENGTH
            if reason is FinishReason.STOP and token not in request.eos_token_ids:
                request.stop_token_id = token
            else:
                stop_all[i] = -1
            self._finish(request, reason)
            del self.requests[request.request_id]
        # back to rank parts: each rank's tokens and sequences, counted from its own first
        seq_offsets = np.cumsum([0] + [sampled[r].slots.size for r in ranks])
        token_offsets = np.cumsum([0] + [int(_emitted(results[r]).sum()) for r in ranks])
        cuts = np.searchsorted(token_row, token_offsets)
        parts = []
        for j, rank in enumerate(ranks):
            a, b = cuts[j], cuts[j + 1]
            if a < b:
                parts.append(
                    RankOutputs(
                        results[rank],
                        token_row[a:b] - token_offsets[j],
                        seq_row[a:b] - seq_offsets[j],
                        code_all[a:b],
                        stop_all[a:b],
                        cached_all[a:b],
                    )
                )
        return StepOutputs(parts)

    def _apply_deferred_aborts(self) -> None:
        if not self._deferred_aborts:
            return
        aborts, self._deferred_aborts = self._deferred_aborts, []
        for request_id in aborts:
            request = self.requests.pop(request_id, None)
            if request is not None and not request.finished:
                self._finish(request, FinishReason.ABORT)

    # ---- planning --------------------------------------------------------------------------------

    def _plan_prefill(self, decoding: bool) -> list[tuple[StepPlan, _SampledRows]] | None:
        per_rank = self.limits.prefill_budget_while_decoding if decoding else self.limits.max_prefill_tokens
        table = self.table
        budget = [per_rank] * self.limits.num_ranks
        chunks: list[list[tuple[int, int]]] = [[] for _ in range(self.limits.num_ranks)]  # (slot, tokens)
        for rank in range(self.limits.num_ranks):
            if not table.counts[rank]:
                continue
            for slot in table.prefilling(rank).tolist():
                if budget[rank] <= 0:
                    break
                n = min(int(table.num_prefill[slot] - table.num_computed[slot]), budget[rank])
                chunks[rank].append((slot, n))
                budget[rank] -= n
        while self.waiting:
            request = self.waiting[0]
            choice = self._choose_rank(request, budget)
            if choice is None:
                break
            chosen, hit = choice
            self.waiting.popleft()
            slot = self._admit(request, chosen, hit)
            n = min(int(table.num_prefill[slot] - table.num_computed[slot]), budget[chosen])
            chunks[chosen].append((slot, n))
            budget[chosen] -= n
        if not any(chunks):
            return None
        return [self._prefill_plan(rank, chunks[rank]) for rank in range(self.limits.num_ranks)]

    def _choose_rank(self, request: Request, budget: list[int]) -> tuple[int, list[int]] | None:
        """(rank, its cached pages of the request's prefix), or None when no rank can take it now.

        Without a cache hit: the fitting rank with the most free pages. With one: the fitting rank
        with the longest cached prefix among those running at most `max_rank_imbalance` sequences
        more than the least loaded fitting rank, so a hot prefix cannot pin the traffic to one rank
        (the others then compute it once and cache it too)."""
        limits, counts = self.limits, self.table.counts
        total = limits.pages_for(request.num_tokens + limits.admission_tail)
        # a prompt is never wholly cached: its last token is computed to sample from it
        hashes = self._page_hashes(request, (request.num_tokens - 1) // limits.page_size)
        candidates = [request.rank] if request.rank is not None else range(limits.num_ranks)
        fits: list[tuple[int, list[int]]] = []
        for r in candidates:
            if budget[r] <= 0 or counts[r] >= limits.max_num_seqs:
                continue
            pool = self.pools[r]
            hit = pool.match(hashes)
            taken = total - len(hit) + pool.num_idle(hit)
            if pool.num_free - taken >= (limits.watermark_pages if counts[r] else 0):
                fits.append((r, hit))
        if not fits:
            return None
        least = min(counts[r] for r, _ in fits)
        near = [(r, hit) for r, hit in fits if counts[r] <= least + limits.max_rank_imbalance]
        best = max(near, key=lambda f: (len(f[1]), self.pools[f[0]].num_free, -counts[f[0]], -f[0]))
        if best[1]:
            return best
        return max(fits, key=lambda f: (self.pools[f[0]].num_free, -counts[f[0]], -f[0]))

    def _admit(self, request: Request, rank: int, hit: list[int]) -> int:
        """Seat the request on `rank` with the cached pages `hit` and new pages for the rest; its
        prefill starts after the cached tokens."""
        pool, table = self.pools[rank], self.table
        pool.acquire(hit)  # first, so that the allocation cannot evict them
        fresh = pool.allocate(
            self.limits.pages_for(request.num_tokens + self.limits.admission_tail) - len(hit)
        )
        assert fresh is not None  # _choose_rank checked the pool
        pages = np.concatenate([np.asarray(hit, np.int32), fresh])
        request.rank, request.status = rank, RequestStatus.RUNNING
        self._admissions += 1
        slot = table.occupy(rank, request, pages, self._admissions)
        cached = len(hit) * self.limits.page_size
        table.num_computed[slot] = cached
        table.num_cached_pages[slot] = len(hit)
        if request.num_cached_tokens is None:
            self.admitted_by_rank[rank] += 1
            request.num_cached_tokens = cached
            table.cached_prompt[slot] = cached
            if self.limits.prefix_caching:
                self.cache_queries += request.num_tokens
                self.cache_hits += cached
        return slot

    def _page_hashes(self, request: Request, count: int) -> list[bytes]:
        """The hashes of the request's first `count` pages (their tokens must be known)."""
        if not self.limits.prefix_caching or count <= 0:
            return []
        hashes, page_size, ahead = request.page_hashes, self.limits.page_size, self.limits.hash_lookahead
        if len(hashes) < count:
            prompt, end = request.prompt_token_ids, count * page_size + ahead
            tokens = prompt if end <= prompt.shape[0] else request.all_token_ids
            extend_page_hashes(hashes, tokens[:end], page_size, ahead)
        return hashes[:count]

    def _cache_pages(self, slot: int, tokens: int) -> None:
        """Offer the slot's full pages among its first `tokens` (computed, or planned in a step
        already made, and known, with the `hash_lookahead` tokens after them) to its rank's cache."""
        table = self.table
        if not self.limits.prefix_caching:
            return
        request = table.occupant[slot]
        assert request is not None and request.rank is not None
        tokens = min(tokens, request.num_tokens - self.limits.hash_lookahead)
        first, last = int(table.num_cached_pages[slot]), tokens // self.limits.page_size
        if last <= first:
            return
        hashes = self._page_hashes(request, last)
        pool = self.pools[request.rank]
        for page, page_hash in zip(table.page_table[slot, first:last].tolist(), hashes[first:], strict=True):
            pool.cache(page, page_hash)
        table.num_cached_pages[slot] = last

    def _vacate(self, request: Request) -> None:
        """Take the request out of its slot: its known full pages stay cached, its pages are released."""
        assert request.rank is not None
        slot = request.slot
        self._cache_pages(slot, min(int(self.table.num_computed[slot]), request.num_tokens))
        self.pools[request.rank].release(self.table.vacate(slot))

    def reset_prefix_cache(self) -> int:
        """Forget every cached page on every rank (pages in use stay with their requests); returns
        how many were dropped. Safe at any time, steps in flight included."""
        return sum(pool.reset() for pool in self.pools)

    def _prefill_plan(self, rank: int, chunks: list[tuple[int, int]]) -> tuple[StepPlan, _SampledRows]:
        if not chunks:
            return self._idle_plan(StepKind.PREFILL, rank), _NO_ROWS
        table = self.table
        slots = np.array([s for s, _ in chunks], np.int64)
        counts = np.array([n for _, n in chunks], np.int64)
        starts = table.num_computed[slots]
        new_requests, tokens, next_tokens = [], [], []
        for (slot, n), start in zip(chunks, starts.tolist(), strict=True):
            request = table.occupant[slot]
            assert request is not None
            known = request.prompt_token_ids if request.num_stored_outputs == 0 else request.all_token_ids
            tokens.append(known[start : start + n])
            next_tokens.append(int(known[start + n]) if start + n < known.shape[0] else -1)
            if not request.on_worker:
                new_requests.append(
                    NewRequest(
                        request.request_id,
                        tuple(request.prompt_token_ids.tolist()),
                        tuple(request.outputs().tolist()),
                        request.sampling,
                    )
                )
                request.on_worker = True
        computed = starts + counts
        table.num_computed[slots] = computed
        for slot, done in zip(slots.tolist(), computed.tolist(), strict=True):
            self._cache_pages(slot, done)  # after every admission of this step: none reads them in it
        sample = computed >= table.num_prefill[slots]
        sampled = slots[sample]
        table.out_scheduled[sampled] += 1
        table.fed_index[sampled] = np.arange(sampled.size)
        plan = self._plan(
            StepKind.PREFILL,
            rank,
            slots,
            counts.astype(np.int32),
            computed.astype(np.int32),
            np.concatenate(tokens),
            sample,
            tuple(new_requests),
            np.asarray(next_tokens, np.int64) if self.num_draft_tokens else None,
        )
        ids = plan.request_ids if sample.all() else tuple(table.request_ids[sampled])
        return plan, _SampledRows(sampled, table.generation[sampled], ids)

    def _plan_decode(self, decodable: np.ndarray) -> list[tuple[StepPlan, _SampledRows]] | None:
        """One decode plan per rank, built for all ranks at once: the group's decode rows are
        gathered in a fixed number of array operations, then cut into each rank's plan."""
        table = self.table
        rows = self._reserve_pages(decodable)
        if not rows.size:
            return None
        q = 1 + self.num_draft_tokens  # tokens per sequence
        if self.num_draft_tokens:  # a verify step: the last output, then its drafts
            tokens = np.column_stack([table.last_token[rows], table.drafts[rows]])  # [rows, q]
        else:
            in_flight = table.out_scheduled[rows] > table.out_known[rows]
            tokens = np.where(in_flight, fed_token(table.fed_index[rows]), table.last_token[rows])
        computed = table.num_computed[rows] + q
        table.num_computed[rows] = computed
        table.out_scheduled[rows] += 1
        cuts = np.searchsorted(rows, table.rank_bounds)
        starts = np.concatenate(([0], cuts))
        ends = np.concatenate((cuts, [rows.size]))
        table.fed_index[rows] = np.arange(rows.size) - starts[rows // table.capacity]
        generation = table.generation[rows]
        context = computed.astype(np.int32)
        num_pages = table.num_pages[rows]
        page_table = table.page_table[rows, : int(num_pages.max())]
        request_ids = table.request_ids[rows]
        query_lens = np.full(rows.size, q, np.int32)
        ones = np.ones(rows.size, bool)
        planned = []
        for rank, (a, b) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
            if a == b:
                planned.append((self._idle_plan(StepKind.DECODE, rank), _NO_ROWS))
                continue
            released = tuple(self._released[rank])
            self._released[rank].clear()
            ids = tuple(request_ids[a:b])
            plan = StepPlan(
                step_id=self.step_id,
                kind=StepKind.DECODE,
                rank=rank,
                released=released,
                new_requests=(),
                request_ids=ids,
                query_lens=query_lens[a:b],
                context_lens=context[a:b],
                token_ids=tokens[a:b].reshape(-1),
                page_table=page_table[a:b, : int(num_pages[a:b].max())],
                sample=ones[a:b],
            )
            planned.append((plan, _SampledRows(rows[a:b], generation[a:b], ids)))
        return planned

    def _reserve_pages(self, rows: np.ndarray) -> np.ndarray:
        """The decode rows, each with pages for the positions it writes (`decode_lookahead`),
        preempting if needed."""
        table, page_size, ahead = self.table, self.limits.page_size, self.limits.decode_lookahead
        while True:  # one page per row per round: more than one only when 2k > page_size
            need = rows[table.num_computed[rows] + ahead > table.num_pages[rows] * page_size]
            if not need.size:
                return rows
            short = False
            for rank, need_r in enumerate(table.split(need)):
                if not need_r.size:
                    continue
                pages = self.pools[rank].allocate(need_r.size)
                if pages is None:  # the rank's rows get all their pages, or some are preempted
                    self._reserve_or_preempt(rank)
                    short = True
                    continue
                table.page_table[need_r, table.num_pages[need_r]] = pages
                table.num_pages[need_r] += 1
            if short:
                rows = table.decodable()

    def _reserve_or_preempt(self, rank: int) -> None:
        """Too few free pages on `rank`: oldest first, each decoding request takes the page it needs
        or the rank's newest request is preempted (possibly itself)."""
        table, pool, page_size = self.table, self.pools[rank], self.limits.page_size
        ahead = self.limits.decode_lookahead
        decoding = set(table.decodable().tolist())
        for slot in table.by_admission(rank).tolist():
            if slot not in decoding:
                continue
            while table.active[slot] and table.num_computed[slot] + ahead > table.num_pages[slot] * page_size:
                page = pool.allocate(1)
                if page is not None:
                    table.page_table[slot, table.num_pages[slot]] = page[0]
                    table.num_pages[slot] += 1
                    continue
                victim = table.occupant[int(table.by_admission(rank)[-1])]
                assert victim is not None
                self._preempt(victim)

    def _plan(
        self,
        kind: StepKind,
        rank: int,
        slots: np.ndarray,
        query_lens: np.ndarray,
        context_lens: np.ndarray,
        token_ids: np.ndarray,
        sample: np.ndarray,
        new_requests: tuple[NewRequest, ...],
        next_token_ids: np.ndarray | None = None,
    ) -> StepPlan:
        table = self.table
        released = tuple(self._released[rank])
        self._released[rank].clear()
        width = int(table.num_pages[slots].max())
        return StepPlan(
            step_id=self.step_id,
            kind=kind,
            rank=rank,
            released=released,
            new_requests=new_requests,
            request_ids=tuple(table.request_ids[slots]),
            query_lens=query_lens,
            context_lens=context_lens,
            token_ids=token_ids,
            page_table=table.page_table[slots, :width],
            sample=sample,
            next_token_ids=next_token_ids,
        )

    def _idle_plan(self, kind: StepKind, rank: int) -> StepPlan:
        released = tuple(self._released[rank])
        self._released[rank].clear()
        return StepPlan.idle(self.step_id, kind, rank, released)

    def _preempt(self, request: Request) -> None:
        self._vacate(request)
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self._release_on_worker(request)
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    # ---- endings -------------------------------------------------------------------------------

    def _finish(self, request: Request, reason: FinishReason) -> None:
        if request.status is RequestStatus.RUNNING:
            self._vacate(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        self._release_on_worker(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    def _release_on_worker(self, request: Request) -> None:
        if request.on_worker:
            assert request.rank is not None
            self._released[request.rank].append(request.request_id)
            request.on_worker = False


def _emitted(result: StepResult) -> np.ndarray:
    """[B_s] int64, tokens per sampled sequence of a result."""
    if result.num_emitted is None:
        return np.ones(len(result.request_ids), np.int64)
    return result.num_emitted.astype(np.int64, copy=False)


def _drafts(result: StepResult, num_drafts: int) -> np.ndarray:
    """[B_s, k] int64, the drafts a result returned for its sequences' next steps."""
    drafts = result.draft_token_ids
    if drafts is None or drafts.shape != (len(result.request_ids), num_drafts):
        raise RuntimeError(
            f"rank {result.rank} returned no drafts of {num_drafts} token(s) for its {len(result.request_ids)} "
            f"sampled sequences in step {result.step_id} (speculative decoding is on: every sampling step drafts)"
        )
    return drafts.astype(np.int64, copy=False)
