"""EngineCore: the scheduler and the executor, stepping together. No tokenizer, no text.

It takes token-id requests, runs one global step per `step()` call and returns the sampled
tokens, ending requests on EOS, stop token ids and length. Text concerns (detokenization, stop
strings) belong to the front end, which aborts a request when its text hits a stop string.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nmoe_serve.engine.executor import Executor, StepFailed
from nmoe_serve.engine.request import Request
from nmoe_serve.engine.scheduler import RequestRejected, Scheduler, SchedulerLimits, TokenUpdate
from nmoe_serve.engine.settings import EngineSettings
from nmoe_serve.sampling.params import SamplingParams

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, settings: EngineSettings, executor: Executor) -> None:
        self.settings, self.executor = settings, executor
        config = settings.config
        pages = executor.pages_per_rank
        self.limits = SchedulerLimits(
            num_ranks=executor.num_ranks,
            pages_per_rank=pages,
            page_size=config.cache.page_size,
            max_seq_len=settings.max_seq_len,
            max_num_seqs=config.scheduler.max_num_seqs,
            max_prefill_tokens=config.scheduler.max_prefill_tokens,
            max_prefill_steps_in_a_row=config.scheduler.max_prefill_steps_in_a_row,
            watermark_pages=int(config.scheduler.admission_watermark * pages),
        )
        self.scheduler = Scheduler(self.limits)
        self.eos_token_ids = frozenset(settings.args.eos_token_ids)
        self.vocab_size = settings.args.vocab_size
        self.last_step_seconds = 0.0
        self.last_step_kind = "none"
        log.info(
            "engine core: %d rank(s) via %s executor, %d pages x %d tokens per rank",
            executor.num_ranks,
            executor.name,
            pages,
            config.cache.page_size,
        )

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams) -> Request:
        """Queue a request; RequestRejected if it can never run (bad ids, too long for the context)."""
        bad = [t for t in prompt_token_ids if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad:
            raise RequestRejected(
                f"prompt token ids must be integers in [0, {self.vocab_size}) for this model; got {bad[:5]}"
            )
        bad_stop = [t for t in sampling.stop_token_ids if t >= self.vocab_size]
        if bad_stop:
            raise RequestRejected(
                f"stop_token_ids {bad_stop} are outside the vocabulary of {self.vocab_size}"
            )
        return self.scheduler.add(request_id, prompt_token_ids, sampling, self.eos_token_ids)

    def abort(self, request_id: str) -> bool:
        return self.scheduler.abort(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[TokenUpdate]:
        """Run one global step; [] when there is nothing to do."""
        plans = self.scheduler.schedule()
        if plans is None:
            return []
        started = time.perf_counter()
        self.last_step_kind = plans[0].kind.name.lower()
        try:
            results = self.executor.execute(plans)
        except StepFailed as e:
            raise self._recover(e) from e
        self.last_step_seconds = time.perf_counter() - started
        return self.scheduler.update(results)

    async def step_async(self) -> list[TokenUpdate]:
        """step(), with the ranks' work awaited; requests may be added or aborted meanwhile."""
        plans = self.scheduler.schedule()
        if plans is None:
            return []
        started = time.perf_counter()
        self.last_step_kind = plans[0].kind.name.lower()
        try:
            results = await self.executor.execute_async(plans)
        except StepFailed as e:
            raise self._recover(e) from e
        except asyncio.CancelledError:  # the loop is shutting down mid-step: its results are lost
            self.scheduler.fail_in_flight(workers_lost=False)
            raise
        self.last_step_seconds = time.perf_counter() - started
        return self.scheduler.update(results)

    def _recover(self, error: StepFailed) -> StepFailed:
        """End every request with an error, restart the workers, and say what failed."""
        failed = self.scheduler.fail_in_flight()
        log.error("%s; ended %d request(s) with an error; restarting the workers", error, len(failed))
        self.executor.restart()
        return StepFailed(f"{error}; {len(failed)} request(s) failed: {', '.join(failed[:8])}", failed)

    def shutdown(self) -> None:
        self.executor.shutdown()
