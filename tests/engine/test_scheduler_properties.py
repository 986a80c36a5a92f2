"""Scheduler and page-allocator invariants under hypothesis, with a fake executor.

The fake executor keeps a "KV cache" of token ids per page slot: it writes each step's tokens into
the slots the plan names and derives the next token from the tokens it reads back from the
sequence's pages. A page handed to two requests, a stale page table or a wrong context length
corrupts what it reads, so outputs then differ from the reference computed from the tokens alone.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nmoe_serve.engine.page_cache import extend_page_hashes
from nmoe_serve.engine.plan import StepKind, StepPlan, StepResult
from nmoe_serve.engine.request import FinishReason, RequestStatus
from nmoe_serve.engine.scheduler import RequestRejected, Scheduler, SchedulerLimits
from nmoe_serve.sampling.params import SamplingParams

VOCAB = 40
EOS = 0


def next_token(tokens: list[int]) -> int:
    digest = hashlib.blake2b(np.asarray(tokens, np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % VOCAB


class FakeRanks:
    """Executes plans on N ranks by storing token ids in page slots."""

    def __init__(self, limits: SchedulerLimits) -> None:
        self.limits = limits
        self.slots = [
            np.full(limits.pages_per_rank * limits.page_size, -1, np.int64) for _ in range(limits.num_ranks)
        ]
        self.state: list[set[str]] = [set() for _ in range(limits.num_ranks)]  # sampler state per rank
        self.steps: list[tuple[int, StepKind]] = []

    def execute(self, plans: list[StepPlan]) -> list[StepResult]:
        assert len(plans) == self.limits.num_ranks
        assert len({(p.step_id, p.kind) for p in plans}) == 1, "every rank runs the same step"
        self.steps.append((plans[0].step_id, plans[0].kind))
        results = []
        for rank, plan in enumerate(plans):
            assert plan.rank == rank
            for rid in plan.released:
                self.state[rank].remove(rid)  # KeyError: released something the rank never had
            for new in plan.new_requests:
                assert new.request_id not in self.state[rank], "added twice"
                self.state[rank].add(new.request_id)
            assert plan.num_tokens == int(plan.query_lens.sum())
            if plan.kind == StepKind.DECODE:
                assert (plan.query_lens == 1).all()
            results.append(self._run(rank, plan))
        return results

    def _run(self, rank: int, plan: StepPlan) -> StepResult:
        p, cache = self.limits.page_size, self.slots[rank]
        writer: dict[int, str] = {}  # cache slot -> the sequence writing it in this step
        start = 0
        for i, rid in enumerate(plan.request_ids):
            n, ctx = int(plan.query_lens[i]), int(plan.context_lens[i])
            for pos in range(ctx - n, ctx):
                slot = int(plan.page_table[i][pos // p]) * p + pos % p
                assert slot not in writer, f"{rid} and {writer.get(slot)} write the same cache slot"
                writer[slot] = rid
        sampled_ids, sampled = [], []
        for i, rid in enumerate(plan.request_ids):
            assert rid in self.state[rank], "a scheduled request has no sampler state"
            n, ctx = int(plan.query_lens[i]), int(plan.context_lens[i])
            pages = plan.page_table[i]
            assert (pages[: math.ceil(ctx / p)] >= 0).all(), "page table misses a page of the context"
            for pos in range(ctx - n):
                other = writer.get(int(pages[pos // p]) * p + pos % p)
                assert other is None, f"{rid} reads a page that {other} writes in the same step"
            for j, pos in enumerate(range(ctx - n, ctx)):
                cache[pages[pos // p] * p + pos % p] = plan.token_ids[start + j]
            start += n
            if plan.sample[i]:
                history = [int(cache[pages[pos // p] * p + pos % p]) for pos in range(ctx)]
                sampled_ids.append(rid)
                sampled.append(next_token(history))
        return StepResult(plan.step_id, rank, tuple(sampled_ids), np.array(sampled, np.int64))


def expected_output(
    prompt: list[int], sampling: SamplingParams, max_tokens: int, max_seq_len: int
) -> tuple[list[int], str]:
    tokens, out = list(prompt), []
    while True:
        t = next_token(tokens)
        tokens.append(t)
        out.append(t)
        if len(out) >= sampling.min_tokens and (
            (t == EOS and not sampling.ignore_eos) or t in sampling.stop_token_ids
        ):
            return out, "stop"
        if len(out) >= max_tokens or len(tokens) >= max_seq_len:
            return out, "length"


def check_pages(
    scheduler: Scheduler, ranks: FakeRanks | None = None, registry: dict[bytes, list[int]] | None = None
) -> None:
    """Page accounting: every page is free, cached-and-unused or held; a page's reference count is
    the number of page tables holding it; only full, computed pages are shared, and the
    pages a request still writes are its own (a reset may leave shared pages uncached). With `ranks` and `registry` (page hash -> the page's
    tokens), every cached page holds the tokens its hash stands for."""
    page_size = scheduler.limits.page_size
    for rank, pool in enumerate(scheduler.pools):
        refs: Counter[int] = Counter()
        writes: set[int] = set()  # pages a running request has still to fill
        cached = pool.cached_pages()
        cached_pages = set(cached.values())
        assert len(cached_pages) == len(cached), "a page cached under two hashes"
        for r in scheduler.running[rank]:
            assert r.status is RequestStatus.RUNNING and r.rank == rank
            assert len(r.pages) * page_size >= r.num_computed_tokens
            pages = [int(x) for x in r.pages]
            assert len(set(pages)) == len(pages), f"{r.request_id} holds a page twice"
            refs.update(pages)
            writes.update(pages[r.num_computed_tokens // page_size :])
        for page in range(pool.num_pages):
            assert pool.refcount(page) == refs[page], (
                f"page {page}: refcount {pool.refcount(page)}, held {refs[page]}"
            )
        for page in writes:
            assert refs[page] == 1 and page not in cached_pages, (
                f"page {page} is written but shared or cached"
            )
        assert pool.num_used == len(refs), "a page is neither free, cached nor held (leak)"
        assert pool.num_free + pool.num_used == pool.num_pages
        assert len(scheduler.running[rank]) <= scheduler.limits.max_num_seqs
        if ranks is not None and registry is not None:
            for page_hash, page in cached.items():
                assert page_hash in registry, "a cached hash that no request's tokens make"
                held = ranks.slots[rank][page * page_size : (page + 1) * page_size].tolist()
                assert held == registry[page_hash], f"cached page {page} holds other tokens"
    for r in scheduler.waiting:
        assert not r.pages and r.status is RequestStatus.WAITING


def register_hashes(registry: dict[bytes, list[int]], tokens: list[int], page_size: int) -> None:
    """Record page hash -> page tokens for every full page of `tokens`."""
    for i, page_hash in enumerate(extend_page_hashes([], np.asarray(tokens, np.int64), page_size)):
        registry[page_hash] = tokens[i * page_size : (i + 1) * page_size]


SYSTEM = [(7 * i + 3) % VOCAB for i in range(24)]  # a prompt prefix many requests share


def make_prompt(spec: dict, rng: np.random.Generator, earlier: list[list[int]]) -> list[int]:
    """A random prompt of spec["prompt_len"] tokens that may start with the shared system prefix or
    with an earlier request's prompt and reference output (the next turn of its conversation)."""
    n = spec["prompt_len"]
    head: list[int] = []
    if spec["shares"] == "system":
        head = SYSTEM[: max(0, n - spec["tail"])]
    elif spec["shares"] == "turn" and earlier:
        head = earlier[spec["tail"] % len(earlier)][: max(0, n - spec["tail"])]
    return head + rng.integers(0, VOCAB, n - len(head)).tolist()


MAX_SEQ_LEN = 48


def sampling_of(spec: dict) -> SamplingParams:
    """The SamplingParams of a drawn request (request_strategy)."""
    return SamplingParams(
        max_tokens=spec["max_tokens"],
        ignore_eos=spec["ignore_eos"],
        min_tokens=min(spec["min_tokens"], spec["max_tokens"]),
        stop_token_ids=spec["stop_token_ids"],
    )


request_strategy = st.fixed_dictionaries(
    {
        "prompt_len": st.integers(1, 40),
        "max_tokens": st.integers(1, 24),
        "ignore_eos": st.booleans(),
        "min_tokens": st.integers(0, 3),
        "stop_token_ids": st.lists(st.integers(1, VOCAB - 1), max_size=2),
        "arrive_at": st.integers(0, 30),
        "abort_at": st.one_of(st.none(), st.integers(0, 60)),
        "shares": st.sampled_from([None, "system", "turn"]),
        "tail": st.integers(0, 8),
    }
)


@st.composite
def scheduler_limits(draw, decode_prefill: bool = False) -> SchedulerLimits:
    """A small group's limits (1-3 ranks, up to 40 pages a rank beyond one longest sequence, tiny
    batches and budgets, caching on or off); `decode_prefill`: a prefill budget while decoding too."""
    page_size = draw(st.sampled_from([1, 2, 4, 8]))
    budget = draw(st.one_of(st.none(), st.integers(1, 16))) if decode_prefill else None
    return SchedulerLimits(
        num_ranks=draw(st.integers(1, 3)),
        pages_per_rank=math.ceil(MAX_SEQ_LEN / page_size) + draw(st.integers(0, 40)),
        page_size=page_size,
        max_seq_len=MAX_SEQ_LEN,
        max_num_seqs=draw(st.integers(1, 6)),
        max_prefill_tokens=draw(st.integers(1, 48)),
        max_prefill_steps_in_a_row=draw(st.integers(1, 3)),
        watermark_pages=draw(st.integers(0, 3)),
        prefix_caching=draw(st.booleans()),
        max_rank_imbalance=draw(st.integers(0, 3)),
        decode_prefill_tokens=budget,
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    limits=scheduler_limits(),
    reset_at=st.one_of(st.none(), st.integers(0, 40)),
    fail_at=st.one_of(st.none(), st.integers(0, 40)),
    requests=st.lists(request_strategy, min_size=1, max_size=14),
    seed=st.integers(0, 2**16),
)
def test_scheduler_invariants_and_exact_outputs(limits, reset_at, fail_at, requests, seed) -> None:
    max_seq_len, page_size = limits.max_seq_len, limits.page_size
    scheduler = Scheduler(limits)
    ranks = FakeRanks(limits)
    rng = np.random.default_rng(seed)
    expected: dict[str, tuple[list[int], str]] = {}
    finished: dict[str, tuple[list[int], str]] = {}
    outputs: dict[str, list[int]] = {}
    aborted: set[str] = set()
    pending = sorted(enumerate(requests), key=lambda kv: kv[1]["arrive_at"])
    conversations: list[list[int]] = []  # prompt + reference output of each request so far
    registry: dict[bytes, list[int]] = {}
    step = 0
    while pending or scheduler.has_work():
        while pending and pending[0][1]["arrive_at"] <= step:
            i, spec = pending.pop(0)
            rid = f"r{i}"
            prompt = make_prompt(spec, rng, conversations)
            sampling = sampling_of(spec)
            too_long = spec["prompt_len"] + spec["max_tokens"] > max_seq_len
            try:
                scheduler.add(rid, prompt, sampling, frozenset({EOS}))
            except RequestRejected as e:
                assert too_long, f"rejected a request that fits: {e}"
                assert "max_seq_len" in str(e)
                continue
            assert not too_long
            expected[rid] = expected_output(prompt, sampling, spec["max_tokens"], max_seq_len)
            conversations.append(prompt + expected[rid][0])
            register_hashes(registry, conversations[-1], page_size)
            outputs[rid] = []
        for i, spec in enumerate(requests):
            rid = f"r{i}"
            if spec["abort_at"] == step and rid in outputs and rid not in finished and scheduler.abort(rid):
                aborted.add(rid)
        plans = scheduler.schedule()
        if plans is not None and step == fail_at:  # the step fails: its requests end, the gang restarts
            aborted.update(scheduler.fail_in_flight())
            ranks = FakeRanks(limits)  # fresh ranks: no KV, no sampler state (a cached page would read -1)
        elif plans is not None:
            for update in scheduler.update(ranks.execute(plans)):
                outputs[update.request_id].append(update.token_id)
                if update.finish_reason is not None:
                    finished[update.request_id] = (outputs[update.request_id], update.finish_reason.value)
        else:
            assert not scheduler.has_work() or pending, "work is left but nothing was scheduled (deadlock)"
        if step == reset_at:
            scheduler.reset_prefix_cache()
            assert all(pool.num_cached == 0 for pool in scheduler.pools)
        check_pages(scheduler, ranks, registry)
        step += 1
        assert step < 3000, "no progress"
    for rid, want in expected.items():
        if rid in aborted:
            assert rid not in finished or finished[rid] == want
            got = outputs[rid]
            assert got == want[0][: len(got)], "an aborted request's tokens so far are still exact"
        else:
            assert finished[rid] == want, f"{rid}: wrong tokens or finish reason"
    assert all(pool.num_free == limits.pages_per_rank for pool in scheduler.pools), "pages leaked"
    assert all(not s for s in ranks.state), "sampler state leaked on a rank"
    assert not scheduler.requests


def test_preemption_happens_and_recomputes_exactly() -> None:
    """A pool that holds one growing sequence at a time forces preemption; outputs stay exact."""
    limits = SchedulerLimits(
        num_ranks=1,
        pages_per_rank=6,
        page_size=4,
        max_seq_len=24,
        max_num_seqs=4,
        max_prefill_tokens=64,
        max_prefill_steps_in_a_row=2,
        watermark_pages=0,
    )
    scheduler, ranks = Scheduler(limits), FakeRanks(limits)
    prompts = {f"r{i}": [i + 1] * 5 for i in range(4)}
    sampling = SamplingParams(max_tokens=15, ignore_eos=True)
    for rid, prompt in prompts.items():
        scheduler.add(rid, prompt, sampling, frozenset({EOS}))
    outputs: dict[str, list[int]] = {rid: [] for rid in prompts}
    while scheduler.has_work():
        plans = scheduler.schedule()
        assert plans is not None
        for update in scheduler.update(ranks.execute(plans)):
            outputs[update.request_id].append(update.token_id)
        check_pages(scheduler)
    assert scheduler.num_preemptions > 0
    for rid, prompt in prompts.items():
        assert outputs[rid] == expected_output(prompt, sampling, 15, 24)[0]


def test_decode_gets_a_step_between_prefill_streaks() -> None:
    limits = SchedulerLimits(
        num_ranks=1,
        pages_per_rank=100,
        page_size=4,
        max_seq_len=64,
        max_num_seqs=64,
        max_prefill_tokens=4,
        max_prefill_steps_in_a_row=2,
        watermark_pages=0,
    )
    scheduler, ranks = Scheduler(limits), FakeRanks(limits)
    scheduler.add("first", [1, 2, 3], SamplingParams(max_tokens=10, ignore_eos=True), frozenset())
    for i in range(6):
        scheduler.add(f"late{i}", [5] * 8, SamplingParams(max_tokens=2, ignore_eos=True), frozenset())
    kinds = []
    for _ in range(8):
        plans = scheduler.schedule()
        assert plans is not None
        kinds.append(plans[0].kind)
        scheduler.update(ranks.execute(plans))
    # first prefill completes in step 0; afterwards at most 2 prefill steps in a row before a decode
    run = 0
    for kind in kinds[1:]:
        run = run + 1 if kind == StepKind.PREFILL else 0
        assert run <= 2


def test_idle_ranks_get_t0_plans_and_requests_spread_by_free_pages() -> None:
    limits = SchedulerLimits(
        num_ranks=4,
        pages_per_rank=10,
        page_size=4,
        max_seq_len=32,
        max_num_seqs=4,
        max_prefill_tokens=64,
        max_prefill_steps_in_a_row=4,
        watermark_pages=0,
    )
    scheduler = Scheduler(limits)
    scheduler.add("only", [1, 2, 3, 4, 5], SamplingParams(max_tokens=3, ignore_eos=True), frozenset())
    plans = scheduler.schedule()
    assert plans is not None and len(plans) == 4
    assert sum(p.num_seqs for p in plans) == 1
    idle = [p for p in plans if p.num_seqs == 0]
    assert len(idle) == 3 and all(p.num_tokens == 0 and p.kind == StepKind.PREFILL for p in idle)
    scheduler.update(FakeRanks(limits).execute(plans))
    for i in range(3):
        scheduler.add(f"more{i}", [1] * 5, SamplingParams(max_tokens=3, ignore_eos=True), frozenset())
    plans = scheduler.schedule()
    assert plans is not None
    # the three new requests go to the three ranks with the most free pages: one each
    assert sorted(p.num_seqs for p in plans if p.kind == StepKind.PREFILL) == [0, 1, 1, 1]


def test_abort_frees_pages_and_releases_worker_state() -> None:
    limits = SchedulerLimits(
        num_ranks=1,
        pages_per_rank=20,
        page_size=4,
        max_seq_len=32,
        max_num_seqs=8,
        max_prefill_tokens=64,
        max_prefill_steps_in_a_row=4,
        watermark_pages=0,
    )
    scheduler, ranks = Scheduler(limits), FakeRanks(limits)
    for i in range(4):
        scheduler.add(f"r{i}", [1] * 9, SamplingParams(max_tokens=10, ignore_eos=True), frozenset())
    scheduler.update(ranks.execute(scheduler.schedule()))
    used = scheduler.pools[0].num_used
    assert scheduler.abort("r1") and scheduler.abort("r2")
    assert not scheduler.abort("r1"), "aborting twice reports False"
    assert not scheduler.abort("nope")
    assert scheduler.pools[0].num_used < used
    plans = scheduler.schedule()
    assert set(plans[0].released) == {"r1", "r2"}
    scheduler.update(ranks.execute(plans))
    assert ranks.state[0] == {"r0", "r3"}


def test_abort_during_a_step_takes_effect_after_it() -> None:
    limits = SchedulerLimits(
        num_ranks=1,
        pages_per_rank=20,
        page_size=4,
        max_seq_len=32,
        max_num_seqs=8,
        max_prefill_tokens=64,
        max_prefill_steps_in_a_row=4,
        watermark_pages=0,
    )
    scheduler, ranks = Scheduler(limits), FakeRanks(limits)
    scheduler.add("r", [1] * 9, SamplingParams(max_tokens=10, ignore_eos=True), frozenset())
    plans = scheduler.schedule()
    assert scheduler.abort("r")
    assert scheduler.pools[0].num_used > 0, "pages stay while the step that uses them runs"
    scheduler.update(ranks.execute(plans))
    assert scheduler.pools[0].num_used == 0
    assert scheduler.has_work(), "the release still has to reach the rank"
    plans = scheduler.schedule()
    assert plans is not None and plans[0].num_tokens == 0 and plans[0].released == ("r",)
    scheduler.update(ranks.execute(plans))
    assert not scheduler.has_work() and not ranks.state[0]
    assert scheduler.schedule() is None


def test_refusals_name_the_limit() -> None:
    limits = SchedulerLimits(
        num_ranks=1,
        pages_per_rank=8,
        page_size=4,
        max_seq_len=32,
        max_num_seqs=8,
        max_prefill_tokens=64,
        max_prefill_steps_in_a_row=4,
        watermark_pages=0,
    )
    scheduler = Scheduler(limits)
    import pytest

    with pytest.raises(RequestRejected, match="empty"):
        scheduler.add("a", [], SamplingParams(), frozenset())
    with pytest.raises(RequestRejected, match=r"32 tokens.*leaves no room.*shorten the prompt"):
        scheduler.add("b", [1] * 32, SamplingParams(), frozenset())
    with pytest.raises(RequestRejected, match=r"lower max_tokens to at most 2"):
        scheduler.add("c", [1] * 30, SamplingParams(max_tokens=5), frozenset())
    scheduler.add("d", [1] * 30, SamplingParams(max_tokens=None), frozenset())
    assert scheduler.requests["d"].max_tokens == 2
    with pytest.raises(RequestRejected, match="already in use"):
        scheduler.add("d", [1], SamplingParams(), frozenset())
    small = Scheduler(SchedulerLimits(1, 4, 4, 32, 8, 64, 4, 0))
    with pytest.raises(RequestRejected, match=r"needs up to 5 KV pages but a rank has 4"):
        small.add("e", [1] * 10, SamplingParams(max_tokens=10), frozenset())
    assert FinishReason.ABORT.value == "abort"
