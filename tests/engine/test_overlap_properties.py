"""The scheduler with one step in flight (overlap), under hypothesis, against fake ranks.

The ranks are test_scheduler_properties.FakeRanks, driven the way the overlapped engine drives its
executor: step n+1 is planned before step n's results are taken. A decode row whose input token is
not known yet names the token the rank sampled in its previous step (-1 - i); the fake ranks feed
it from their own last samples, as a worker does from the device. Outputs must be exactly the
serial reference (no token after EOS, a stop id or max_tokens; none after an abort), pages and
worker state must not leak, and a request that ends costs at most one wasted row.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nmoe_serve.engine.plan import StepKind, StepPlan, StepResult
from nmoe_serve.engine.scheduler import RequestRejected, Scheduler, SchedulerLimits
from nmoe_serve.sampling.params import SamplingParams
from tests.engine.test_scheduler_properties import (
    EOS,
    FakeRanks,
    check_pages,
    expected_output,
    make_prompt,
    register_hashes,
    request_strategy,
    sampling_of,
    scheduler_limits,
)


class FeedingRanks(FakeRanks):
    """FakeRanks that resolve fed tokens (-1 - i) from each rank's previous step's samples."""

    def __init__(self, limits: SchedulerLimits) -> None:
        super().__init__(limits)
        self.last: list[StepResult | None] = [None] * limits.num_ranks
        self.rows: Counter[str] = Counter()  # plan rows each request took
        self.decode_rows: Counter[str] = Counter()
        self.admissions: Counter[str] = Counter()  # times a rank was told to start it

    def execute(self, plans: list[StepPlan]) -> list[StepResult]:
        resolved = []
        for rank, plan in enumerate(plans):
            fed = plan.token_ids < 0
            if fed.any():
                assert plan.kind == StepKind.DECODE, "only decode rows take fed tokens"
                last = self.last[rank]
                assert last is not None, "a fed token names a step this rank did not run"
                tokens = plan.token_ids.copy()
                for row in np.flatnonzero(fed):
                    i = -1 - int(tokens[row])
                    assert last.request_ids[i] == plan.request_ids[row], "fed from another request"
                    tokens[row] = last.token_ids[i]
                plan = StepPlan(**{**plan.__dict__, "token_ids": tokens})
            resolved.append(plan)
            self.rows.update(plan.request_ids)
            if plan.kind == StepKind.DECODE:
                self.decode_rows.update(plan.request_ids)
            self.admissions.update(new.request_id for new in plan.new_requests)
        results = super().execute(resolved)
        self.last = list(results)
        return results


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    limits=scheduler_limits(decode_prefill=True),
    reset_at=st.one_of(st.none(), st.integers(0, 40)),
    requests=st.lists(request_strategy, min_size=1, max_size=14),
    seed=st.integers(0, 2**16),
)
def test_overlapped_steps_keep_every_invariant_and_the_exact_outputs(
    limits, reset_at, requests, seed
) -> None:
    max_seq_len, page_size = limits.max_seq_len, limits.page_size
    scheduler = Scheduler(limits, max_steps_in_flight=2)
    ranks = FeedingRanks(limits)
    rng = np.random.default_rng(seed)
    expected: dict[str, tuple[list[int], str]] = {}
    finished: dict[str, tuple[list[int], str]] = {}
    outputs: dict[str, list[int]] = {}
    aborted: set[str] = set()
    pending = sorted(enumerate(requests), key=lambda kv: kv[1]["arrive_at"])
    conversations: list[list[int]] = []  # prompt + reference output of each request so far
    registry: dict[bytes, list[int]] = {}
    launched: list[list[StepResult]] = []  # results computed by the ranks, not yet taken
    step = 0

    def take(results: list[StepResult]) -> None:
        for update in scheduler.update(results):
            rid = update.request_id
            assert rid not in finished, f"{rid}: a token after its finish"
            assert rid not in aborted, f"{rid}: a token after its abort"
            outputs[rid].append(update.token_id)
            if update.finish_reason is not None:
                finished[rid] = (outputs[rid], update.finish_reason.value)

    while pending or scheduler.has_work():
        while pending and pending[0][1]["arrive_at"] <= step:
            i, spec = pending.pop(0)
            rid = f"r{i}"
            prompt = make_prompt(spec, rng, conversations)
            sampling = sampling_of(spec)
            try:
                scheduler.add(rid, prompt, sampling, frozenset({EOS}))
            except RequestRejected:
                assert spec["prompt_len"] + spec["max_tokens"] > max_seq_len
                continue
            expected[rid] = expected_output(prompt, sampling, spec["max_tokens"], max_seq_len)
            conversations.append(prompt + expected[rid][0])
            register_hashes(registry, conversations[-1], page_size)
            outputs[rid] = []
        for i, spec in enumerate(requests):
            rid = f"r{i}"
            if spec["abort_at"] == step and rid in outputs and rid not in finished and scheduler.abort(rid):
                aborted.add(rid)
        plans = scheduler.schedule()  # with the last step's results still out
        if plans is not None:
            launched.append(ranks.execute(plans))
        if launched and (plans is None or len(launched) == 2):
            take(launched.pop(0))  # launch(n+1) returns step n's results; flush when nothing is planned
        elif plans is None:
            assert not scheduler.has_work() or pending, "work is left but nothing was scheduled (deadlock)"
        assert scheduler.num_in_flight == len(launched)
        if step == reset_at:
            scheduler.reset_prefix_cache()
            assert all(pool.num_cached == 0 for pool in scheduler.pools)
        check_pages(scheduler, ranks, registry)
        step += 1
        assert step < 3000, "no progress"
    for rid, want in expected.items():
        if rid in aborted:
            got = outputs[rid]
            assert got == want[0][: len(got)], "an aborted request's tokens so far are exact"
        else:
            assert finished[rid] == want, f"{rid}: wrong tokens or finish reason"
            if ranks.admissions[rid] == 1:  # not recomputed after a preemption
                assert ranks.decode_rows[rid] <= len(want[0]), "more than one wasted decode row"
    assert all(pool.num_free == limits.pages_per_rank for pool in scheduler.pools), "pages leaked"
    assert all(not s for s in ranks.state), "sampler state leaked on a rank"
    assert not scheduler.requests


def test_a_stop_costs_one_wasted_row_and_no_token() -> None:
    """A request ends on its third token (a stop id): with one step in flight it takes one more decode
    row, whose token is dropped; max_tokens ends another exactly, without a wasted row."""
    limits = SchedulerLimits(1, 32, 4, 64, 4, 64, 4, 0)
    scheduler, ranks = Scheduler(limits, max_steps_in_flight=2), FeedingRanks(limits)
    prompt = [3, 1, 4]
    tokens = expected_output(prompt, SamplingParams(max_tokens=10, ignore_eos=True), 10, 64)[0]
    stop = SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=(tokens[2],))
    scheduler.add("stop", prompt, stop, frozenset())
    scheduler.add("length", [2, 7], SamplingParams(max_tokens=3, ignore_eos=True), frozenset())
    out: dict[str, list[int]] = {"stop": [], "length": []}
    launched: list[list[StepResult]] = []
    while scheduler.has_work():
        plans = scheduler.schedule()
        if plans is not None:
            launched.append(ranks.execute(plans))
        if launched and (plans is None or len(launched) == 2):
            for update in scheduler.update(launched.pop(0)):
                out[update.request_id].append(update.token_id)
    assert out["stop"] == tokens[: tokens.index(tokens[2]) + 1]
    assert len(out["length"]) == 3
    assert ranks.rows["stop"] == 1 + len(out["stop"]), "the prefill row, its decode rows and one wasted"
    assert ranks.rows["length"] == 3, "max_tokens counts the tokens in flight: no wasted row"
