"""EngineCore: the scheduler and the executor, stepping together. No tokenizer, no text, no torch.

It takes token-id requests, runs one global step at a time and returns the sampled tokens,
ending requests on EOS, stop token ids and length. Text concerns (detokenization, stop strings,
request validation) belong to the front end, which aborts a request when its text hits a stop
string.

A step has one body in two halves around the ranks' work: `schedule()` plans it, the caller runs
the plans on the executor (blocking in `step()`, awaited by the Coordinator), and `complete()`
takes the results, or `fail()` a StepFailed (every request ends with an error and the executor
restarts its workers).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from nmoe_serve.engine.executor import Executor, StepFailed
from nmoe_serve.engine.plan import StepPlan, StepResult
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
        )
        self.scheduler = Scheduler(self.limits)
        self.eos_token_ids = frozenset(settings.eos_token_ids)
        self._step_started = 0.0
        log.info(
            "engine core: %d rank(s) via %s executor, %d pages x %d tokens per rank",
            executor.num_ranks,
            executor.name,
            pages,
            settings.page_size,
        )

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams) -> Request:
        """Queue a request; RequestRejected if it can never run (see Scheduler.add)."""
        return self.scheduler.add(request_id, prompt_token_ids, sampling, self.eos_token_ids)

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def schedule(self) -> list[StepPlan] | None:
        """Plans of the next step (one per rank), or None when there is nothing to run."""
        plans = self.scheduler.schedule()
        self._step_started = time.perf_counter()
        return plans

    def complete(self, results: list[StepResult]) -> tuple[StepOutputs, float]:
        """Take the step's results: (one update per sampled token, seconds since schedule())."""
        seconds = time.perf_counter() - self._step_started
        return self.scheduler.update(results), seconds

    def fail(self, error: StepFailed) -> StepFailed:
        """The step failed on the ranks: end every request with an error, restart the workers, and
        return the error to raise, naming the requests that failed."""
        failed = self.scheduler.fail_in_flight()
        log.error("%s; ended %d request(s) with an error; restarting the workers", error, len(failed))
        self.executor.restart()
        return StepFailed(f"{error}; {len(failed)} request(s) failed: {', '.join(failed[:8])}", failed)

    def abandon(self) -> None:
        """The step in flight was given up (its caller was cancelled): its results are lost."""
        self.scheduler.fail_in_flight(workers_lost=False)

    def step(self) -> StepOutputs:
        """Run one global step, blocking; empty outputs when there is nothing to do."""
        plans = self.schedule()
        if plans is None:
            return StepOutputs()
        try:
            results = self.executor.execute(plans)
        except StepFailed as e:
            raise self.fail(e) from e
        return self.complete(results)[0]

    def shutdown(self) -> None:
        self.executor.shutdown()
