"""Scheduler: admission, rank choice, chunked prefill, decode batches and preemption, for N ranks.

Plain Python (no torch, no Ray): it owns the requests and every rank's page pool, and turns them
into one StepPlan per rank per step. Every step is a prefill step or a decode step for all ranks;
a rank with nothing of that kind gets a T = 0 plan.

Policy:
- Admission is FIFO. A request goes to the rank with the most free pages that has a sequence slot,
  prefill budget left this step, and pages for its whole prompt plus the admission watermark (no
  watermark on an empty rank, so a request as large as the whole pool still runs). The
  head of the queue waits rather than being overtaken. A preempted request returns to its own rank.
- Prefill steps continue unfinished prefills first, then admit; a prompt larger than the rank's
  per-step token budget is split over steps (chunked prefill) and sampled after its last chunk.
- Decode steps give every decoding sequence one token. A sequence whose last page is full gets a
  new page; when the pool is empty, the rank's newest request is preempted (its pages freed, its
  tokens kept) and later recomputed by a prefill of prompt + output: never an assertion.
- Prefill is preferred, but after `max_prefill_steps_in_a_row` prefill steps the decoding
  sequences get a step, so a stream of arrivals cannot starve them.
- When the last requests end, one more (T = 0) step carries their release to the ranks, so no
  rank keeps state of a finished request while the engine is idle.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from nmoe_serve.engine.page_pool import PagePool
from nmoe_serve.engine.plan import NewRequest, StepKind, StepPlan, StepResult
from nmoe_serve.engine.request import FinishReason, Request, RequestRejected, RequestStatus, output_budget
from nmoe_serve.sampling.params import SamplingParams


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

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_size)


@dataclass(slots=True)
class TokenUpdate:
    """One new token of one request, and whether the request ended with it."""

    request_id: str
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] | None = None
    finish_reason: FinishReason | None = None
    stop_token_id: int | None = None


@dataclass(slots=True)
class _Chunk:
    request: Request
    num_tokens: int


class Scheduler:
    def __init__(self, limits: SchedulerLimits) -> None:
        self.limits = limits
        self.pools = [PagePool(limits.pages_per_rank) for _ in range(limits.num_ranks)]
        self.waiting: deque[Request] = deque()
        self.running: list[list[Request]] = [[] for _ in range(limits.num_ranks)]
        self.requests: dict[str, Request] = {}
        self._released: list[list[str]] = [[] for _ in range(limits.num_ranks)]
        self._deferred_aborts: list[str] = []
        self._in_flight: list[StepPlan] | None = None
        self._prefill_streak = 0
        self._arrivals = 0
        self.step_id = 0
        self.num_preemptions = 0

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
        limit = self.limits.max_seq_len
        max_tokens = output_budget(prompt_len, sampling.max_tokens, limit)
        if self.limits.pages_for(prompt_len + max_tokens) > self.limits.pages_per_rank:
            raise RequestRejected(
                f"the request needs up to {self.limits.pages_for(prompt_len + max_tokens)} KV pages but a rank has "
                f"{self.limits.pages_per_rank}: lower max_tokens or shorten the prompt"
            )
        request = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            sampling=sampling,
            max_tokens=max_tokens,
            eos_token_ids=frozenset() if sampling.ignore_eos else eos_token_ids,
            arrival=self._arrivals,
            stop_ids=(frozenset() if sampling.ignore_eos else eos_token_ids)
            | frozenset(sampling.stop_token_ids),
            length_limit=min(prompt_len + max_tokens, limit),
        )
        self._arrivals += 1
        self.requests[request_id] = request
        self.waiting.append(request)
        return request

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its pages are freed now, or after the step in flight. False if unknown."""
        request = self.requests.get(request_id)
        if request is None or request.finished:
            return False
        if self._in_flight is not None:
            self._deferred_aborts.append(request_id)
        else:
            self._finish(request, FinishReason.ABORT)
            del self.requests[request_id]
        return True

    def has_work(self) -> bool:
        """Requests to run, or ended requests whose worker state still has to be released."""
        return bool(self.waiting) or any(self.running) or any(self._released)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return sum(len(r) for r in self.running)

    def kv_usage(self) -> float:
        used = sum(p.num_used for p in self.pools)
        return used / (self.limits.pages_per_rank * self.limits.num_ranks)

    # ---- one step --------------------------------------------------------------------------------

    def schedule(self) -> list[StepPlan] | None:
        """Plans for the next step (one per rank), or None when there is nothing to run."""
        if self._in_flight is not None:
            raise RuntimeError(
                "schedule() called while a step is in flight: call update() with its results first"
            )
        has_decodes = wants_prefill = False
        for rank in self.running:
            for r in rank:
                if r.num_computed_tokens < r.num_prefill_tokens:
                    wants_prefill = True
                else:
                    has_decodes = True
        wants_prefill = wants_prefill or bool(self.waiting)
        plans = None
        if wants_prefill and (
            not has_decodes or self._prefill_streak < self.limits.max_prefill_steps_in_a_row
        ):
            plans = self._plan_prefill()
            self._prefill_streak += plans is not None
        if plans is None and has_decodes:
            plans = self._plan_decode()
            self._prefill_streak = 0
        if (
            plans is None and wants_prefill
        ):  # decodes were all preempted, or the streak limit had no decodes to serve
            plans = self._plan_prefill()
        if plans is None and any(self._released):  # going idle: one T = 0 step tells the ranks what ended
            plans = [self._build_plan(StepKind.DECODE, rank, []) for rank in range(self.limits.num_ranks)]
        if plans is None:
            return None
        self._in_flight = plans
        self.step_id += 1
        return plans

    def update(self, results: list[StepResult]) -> list[TokenUpdate]:
        """Take the step's sampled tokens; return one update per token (requests that ended included)."""
        if self._in_flight is None:
            raise RuntimeError("update() called with no step in flight")
        updates: list[TokenUpdate] = []
        running = RequestStatus.RUNNING
        for result in results:
            with_logprobs = result.num_top is not None
            for i, (request_id, token) in enumerate(
                zip(result.request_ids, result.token_ids.tolist(), strict=True)
            ):
                request = self.requests.get(request_id)
                if request is None or request.status is not running:
                    continue
                request.output_token_ids.append(token)
                reason = self._stop_reason(request, token)
                if reason is not None:
                    self._finish(request, reason)
                    del self.requests[request_id]
                update = TokenUpdate(
                    request_id, token, finish_reason=reason, stop_token_id=request.stop_token_id
                )
                if with_logprobs:
                    update.logprob, update.top_logprobs = _logprob(result, i), _top_logprobs(result, i)
                updates.append(update)
        self._in_flight = None
        for request_id in self._deferred_aborts:
            self.abort(request_id)
        self._deferred_aborts.clear()
        return updates

    def fail_in_flight(self, workers_lost: bool = True) -> list[str]:
        """The step failed: end every request that holds pages or is queued with ERROR; return their ids.

        workers_lost: the ranks are being restarted, so there is no worker state left to release;
        otherwise (a step abandoned by its caller, which may or may not have run) the releases go
        out again with the next step."""
        if not workers_lost and self._in_flight is not None:
            for plan in self._in_flight:
                self._released[plan.rank].extend(plan.released)
        failed = [r.request_id for r in self.requests.values() if not r.finished]
        for request_id in failed:
            self._finish(self.requests.pop(request_id), FinishReason.ERROR)
        self._in_flight = None
        self._deferred_aborts.clear()
        if workers_lost:
            self._released = [[] for _ in range(self.limits.num_ranks)]
        return failed

    # ---- planning --------------------------------------------------------------------------------

    def _plan_prefill(self) -> list[StepPlan] | None:
        budget = [self.limits.max_prefill_tokens] * self.limits.num_ranks
        chunks: list[list[_Chunk]] = [[] for _ in range(self.limits.num_ranks)]
        for rank, running in enumerate(self.running):
            for request in running:
                if request.prefilling and budget[rank] > 0:
                    n = min(request.num_prefill_tokens - request.num_computed_tokens, budget[rank])
                    chunks[rank].append(_Chunk(request, n))
                    budget[rank] -= n
        while self.waiting:
            request = self.waiting[0]
            chosen = self._choose_rank(request, budget)
            if chosen is None:
                break
            self.waiting.popleft()
            self._admit(request, chosen)
            n = min(request.num_prefill_tokens, budget[chosen])
            chunks[chosen].append(_Chunk(request, n))
            budget[chosen] -= n
        if not any(chunks):
            return None
        return [
            self._build_plan(StepKind.PREFILL, rank, chunks[rank]) for rank in range(self.limits.num_ranks)
        ]

    def _choose_rank(self, request: Request, budget: list[int]) -> int | None:
        need = self.limits.pages_for(request.num_tokens)
        candidates = [request.rank] if request.rank is not None else range(self.limits.num_ranks)
        fits = [
            r
            for r in candidates
            if budget[r] > 0
            and len(self.running[r]) < self.limits.max_num_seqs
            and self.pools[r].num_free - need >= (self.limits.watermark_pages if self.running[r] else 0)
        ]
        if not fits:
            return None
        return max(fits, key=lambda r: (self.pools[r].num_free, -len(self.running[r]), -r))

    def _admit(self, request: Request, rank: int) -> None:
        pages = self.pools[rank].allocate(self.limits.pages_for(request.num_tokens))
        assert pages is not None  # _choose_rank checked the pool
        request.rank, request.pages, request.status = rank, pages, RequestStatus.RUNNING
        request.num_computed_tokens, request.num_prefill_tokens = 0, request.num_tokens
        self.running[rank].append(request)

    def _plan_decode(self) -> list[StepPlan] | None:
        chunks: list[list[_Chunk]] = [[] for _ in range(self.limits.num_ranks)]
        page_size, running = self.limits.page_size, RequestStatus.RUNNING
        for rank in range(self.limits.num_ranks):
            for request in list(self.running[rank]):
                if request.status is not running or request.num_computed_tokens < request.num_prefill_tokens:
                    continue
                has_slot = request.num_computed_tokens < len(request.pages) * page_size
                if has_slot or self._reserve_slot(request, rank):
                    chunks[rank].append(_Chunk(request, 1))
        if not any(chunks):
            return None
        return [
            self._build_plan(StepKind.DECODE, rank, chunks[rank]) for rank in range(self.limits.num_ranks)
        ]

    def _reserve_slot(self, request: Request, rank: int) -> bool:
        """Make room for the token at position num_computed_tokens, preempting the newest request if
        the pool is empty. False when `request` itself had to be preempted."""
        while len(request.pages) * self.limits.page_size <= request.num_computed_tokens:
            page = self.pools[rank].allocate(1)
            if page is not None:
                request.pages += page
                continue
            victim = self.running[rank][-1]
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        assert request.rank is not None
        rank = request.rank
        self.pools[rank].free(request.pages)
        request.pages = []
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.running[rank].remove(request)
        self._release_on_worker(request)
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def _build_plan(self, kind: StepKind, rank: int, chunks: list[_Chunk]) -> StepPlan:
        released = tuple(self._released[rank])
        self._released[rank].clear()
        new_requests = []
        for c in chunks:
            if not c.request.on_worker:
                r = c.request
                new_requests.append(
                    NewRequest(r.request_id, tuple(r.prompt_token_ids), tuple(r.output_token_ids), r.sampling)
                )
                r.on_worker = True
        if not chunks:
            return StepPlan.idle(self.step_id, kind, rank, released, tuple(new_requests))
        page_lists = [c.request.pages for c in chunks]
        page_counts = np.fromiter((len(p) for p in page_lists), np.int64, len(chunks))
        page_table = np.full((len(chunks), int(page_counts.max())), -1, np.int32)
        rows = np.repeat(np.arange(len(chunks)), page_counts)
        cols = np.arange(rows.shape[0]) - np.repeat(np.cumsum(page_counts) - page_counts, page_counts)
        page_table[rows, cols] = list(itertools.chain.from_iterable(page_lists))
        tokens: list[int] = []
        context_lens, sample = [], []
        decode = kind is StepKind.DECODE
        for c in chunks:
            r = c.request
            start = r.num_computed_tokens
            if decode:
                tokens.append(r.output_token_ids[-1])
            else:
                tokens.extend(r.all_token_ids[start : start + c.num_tokens])
            r.num_computed_tokens = start + c.num_tokens
            context_lens.append(r.num_computed_tokens)
            sample.append(r.num_computed_tokens >= r.num_prefill_tokens)
        return StepPlan(
            step_id=self.step_id,
            kind=kind,
            rank=rank,
            released=released,
            new_requests=tuple(new_requests),
            request_ids=tuple(c.request.request_id for c in chunks),
            query_lens=np.array([c.num_tokens for c in chunks], np.int32),
            context_lens=np.array(context_lens, np.int32),
            token_ids=np.array(tokens, np.int64),
            page_table=page_table,
            sample=np.array(sample, bool),
        )

    # ---- endings -------------------------------------------------------------------------------

    @staticmethod
    def _stop_reason(request: Request, token: int) -> FinishReason | None:
        n_out = len(request.output_token_ids)
        if token in request.stop_ids and n_out >= request.sampling.min_tokens:
            if token not in request.eos_token_ids:
                request.stop_token_id = token
            return FinishReason.STOP
        if len(request.prompt_token_ids) + n_out >= request.length_limit:
            return FinishReason.LENGTH
        return None

    def _finish(self, request: Request, reason: FinishReason) -> None:
        if request.status is RequestStatus.RUNNING:
            assert request.rank is not None
            self.pools[request.rank].free(request.pages)
            request.pages = []
            self.running[request.rank].remove(request)
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
