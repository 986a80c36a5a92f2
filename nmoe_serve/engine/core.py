"""EngineCore: the scheduler and the executor, stepping together. No tokenizer, no text, no torch.

It takes token-id requests, runs one global step at a time and returns the sampled tokens,
ending requests on EOS, stop token ids and length. Text concerns (detokenization, stop strings,
request validation) belong to the front end, which aborts a request when its text hits a stop
string.

A step has one body in three parts around the ranks' work: `schedule()` plans it, `dispatch()`
(blocking) or `dispatch_async()` (awaited by the Coordinator) runs the plans on the executor, and
`complete()` takes the results, or `fail()` a StepFailed (every request ends with an error and the
executor restarts its workers).

Overlap (`CoreSettings.overlap`): the executor launches a step and hands back the results of the
one before, so the ranks compute step n+1 while the scheduler takes step n's tokens and plans
n+2. Each step is planned with one step in flight; requests learn of their ends one step late
(engine/scheduler.py says what that costs: at most one wasted row, never an extra token). When
nothing can be planned the last launched step is flushed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from nmoe_serve.engine.executor import Executor, StepFailed
from nmoe_serve.engine.plan import StepKind, StepPlan, StepResult
from nmoe_serve.engine.request import Request
from nmoe_serve.engine.scheduler import Scheduler, SchedulerLimits, StepOutputs
from nmoe_serve.sampling.params import SamplingParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoreSettings:
    """What the engine core reads, resolved once (nmoe_serve.settings)."""

    max_seq_len: int  # longest sequence, prompt + output
    page_size: int  # tokens per KV page
    max_num_seqs: int  # running sequences per rank (the decode batch)
    max_prefill_tokens: int  # prompt tokens per rank per prefill step
    max_prefill_steps_in_a_row: int
    admission_watermark: float  # fraction of a rank's pages admission leaves free
    eos_token_ids: tuple[int, ...]
    overlap: bool = False  # launch step n+1 while step n's results come back (one step in flight)
    decode_prefill_tokens: int | None = None  # prompt tokens per rank per prefill step while decoding
    prefix_caching: bool = True  # reuse the KV pages of equal prefixes on a rank
    max_rank_imbalance: int = 4  # running sequences a cache hit may put on a rank over the least loaded
    num_draft_tokens: int = 0  # speculative decoding: tokens drafted per sequence per step (0: off)

    @property
    def max_decode_tokens(self) -> int:
        """The most tokens a rank computes in a decode step: a token per sequence, or with
        speculative decoding 1 + num_draft_tokens (a verify step)."""
        return self.max_num_seqs * (1 + self.num_draft_tokens)


@dataclass(frozen=True)
class Completed:
    """A step whose results the scheduler took."""

    step_id: int
    kind: StepKind
    outputs: StepOutputs
    seconds: float  # from its launch to its results
    period_s: float  # from the later of its launch and the last step's results, to its results
    busiest: tuple[int, int, int, int]  # StepPlan.work() of its busiest rank (most tokens, then context)


class EngineCore:
    def __init__(self, settings: CoreSettings, executor: Executor) -> None:
        self.settings, self.executor = settings, executor
        pages = executor.pages_per_rank
        self.limits = SchedulerLimits(
            num_ranks=executor.num_ranks,
            pages_per_rank=pages,
            page_size=settings.page_size,
            max_seq_len=settings.max_seq_len,
            max_num_seqs=settings.max_num_seqs,
            max_prefill_tokens=settings.max_prefill_tokens,
            max_prefill_steps_in_a_row=settings.max_prefill_steps_in_a_row,
            watermark_pages=int(settings.admission_watermark * pages),
            decode_prefill_tokens=settings.decode_prefill_tokens,
            prefix_caching=settings.prefix_caching,
            max_rank_imbalance=settings.max_rank_imbalance,
            num_draft_tokens=settings.num_draft_tokens,
        )
        self.overlap = settings.overlap
        self.scheduler = Scheduler(self.limits, max_steps_in_flight=2 if self.overlap else 1)
        self.eos_token_ids = frozenset(settings.eos_token_ids)
        self._launched: dict[int, tuple[StepKind, float]] = {}  # step id -> (kind, launch time)
        self._last_completed = 0.0
        log.info(
            "engine core: %d rank(s) via %s executor, %d pages x %d tokens per rank, %s, prefix cache %s",
            executor.num_ranks,
            executor.name,
            pages,
            settings.page_size,
            "overlapped steps (one in flight)" if self.overlap else "one step at a time",
            f"on (rank imbalance <= {settings.max_rank_imbalance})" if settings.prefix_caching else "off",
        )

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams) -> Request:
        """Queue a request; RequestRejected if it can never run (see Scheduler.add)."""
        return self.scheduler.add(request_id, prompt_token_ids, sampling, self.eos_token_ids)

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id)

    def reset_prefix_cache(self) -> int:
        """Forget every rank's cached pages (running requests keep theirs); how many were dropped."""
        dropped = self.scheduler.reset_prefix_cache()
        log.info("prefix cache reset: %d cached page(s) dropped", dropped)
        return dropped

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def schedule(self) -> list[StepPlan] | None:
        """Plans of the next step (one per rank), or None when there is nothing to plan now."""
        plans = self.scheduler.schedule()
        if plans is not None:
            self._launched[plans[0].step_id] = (plans[0].kind, time.perf_counter())
        return plans

    def needs_dispatch(self, plans: list[StepPlan] | None) -> bool:
        """Whether the executor has to be called: plans to run, or a launched step to flush."""
        return plans is not None or (self.overlap and self.scheduler.num_in_flight > 0)

    def dispatch(self, plans: list[StepPlan] | None) -> list[StepResult] | None:
        """Run `plans` (or, overlapped with nothing to plan, flush); the results of the step they
        complete, or None (the first launched step). Raises StepFailed."""
        if not self.overlap:
            assert plans is not None
            return self.executor.execute(plans)
        return self.executor.launch(plans) if plans is not None else self.executor.flush()

    async def dispatch_async(self, plans: list[StepPlan] | None) -> list[StepResult] | None:
        """`dispatch`, awaited."""
        if not self.overlap:
            assert plans is not None
            return await self.executor.execute_async(plans)
        if plans is not None:
            return await self.executor.launch_async(plans)
        return await self.executor.flush_async()

    def complete(self, results: list[StepResult]) -> Completed | None:
        """Take a step's results: its accepted tokens. None for results of a step no longer in
        flight (abandoned by an earlier caller): they are dropped."""
        step_id = results[0].step_id
        kind, launched = self._launched.pop(step_id, (StepKind.DECODE, time.perf_counter()))
        if step_id != self.scheduler.oldest_in_flight:
            log.warning("dropped the results of step %d, which is no longer in flight", step_id)
            return None
        busiest = max((p.work() for p in self.scheduler.oldest_plans), key=lambda w: (w[1], w[2]))
        outputs = self.scheduler.update(results)
        now = time.perf_counter()
        period = now - max(launched, self._last_completed)
        self._last_completed = now
        return Completed(step_id, kind, outputs, now - launched, period, busiest)

    def fail(self, error: StepFailed) -> StepFailed:
        """The step failed on the ranks: end every request with an error, restart the workers, and
        return the error to raise, naming the requests that failed."""
        failed = self.scheduler.fail_in_flight()
        self._launched.clear()
        log.error(
            "%s; ended %d request(s) with an error (%s); restarting the workers",
            error,
            len(failed),
            ", ".join(failed[:32]),
        )
        self.executor.restart()
        return StepFailed(f"{error}; {len(failed)} request(s) failed: {', '.join(failed[:8])}", failed)

    def abandon(self) -> None:
        """The step in flight was given up (its caller was cancelled): its results are lost."""
        self.scheduler.fail_in_flight(workers_lost=False)
        self._launched.clear()

    def step(self) -> StepOutputs:
        """Run one global step, blocking; the tokens of the step it completes (with overlap, the
        one launched before), empty when there is nothing to do."""
        plans = self.schedule()
        if not self.needs_dispatch(plans):
            return StepOutputs()
        try:
            results = self.dispatch(plans)
        except StepFailed as e:
            raise self.fail(e) from e
        completed = None if results is None else self.complete(results)
        return StepOutputs() if completed is None else completed.outputs

    def shutdown(self) -> None:
        self.executor.shutdown()
