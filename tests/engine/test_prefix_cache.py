"""The prefix cache: PageCache on its own, and the scheduler using it (fake ranks that store tokens in
pages, so a wrong shared page changes the outputs). The random sequences are in
test_scheduler_properties.py and test_overlap_properties.py (check_pages)."""

from __future__ import annotations

import numpy as np
import pytest

from nmoe_serve.engine.page_cache import PageCache, extend_page_hashes
from nmoe_serve.engine.plan import StepKind
from nmoe_serve.engine.scheduler import Scheduler, SchedulerLimits
from nmoe_serve.sampling.params import SamplingParams
from tests.engine.test_scheduler_properties import FakeRanks, check_pages, expected_output

P = 4


def limits(**overrides) -> SchedulerLimits:
    values = dict(
        num_ranks=1,
        pages_per_rank=32,
        page_size=P,
        max_seq_len=64,
        max_num_seqs=8,
        max_prefill_tokens=64,
        max_prefill_steps_in_a_row=4,
        watermark_pages=0,
    )
    values.update(overrides)
    return SchedulerLimits(**values)  # type: ignore[arg-type]


def run(scheduler: Scheduler, ranks: FakeRanks) -> tuple[dict[str, list[int]], list]:
    """Step until idle; (outputs by request, every step's plans)."""
    outputs: dict[str, list[int]] = {}
    steps = []
    while scheduler.has_work():
        plans = scheduler.schedule()
        assert plans is not None
        steps.append(plans)
        for update in scheduler.update(ranks.execute(plans)):
            outputs.setdefault(update.request_id, []).append(update.token_id)
        check_pages(scheduler)
    return outputs, steps


def first_plan_row(steps: list, request_id: str) -> tuple[int, int]:
    """(query_len, context_len) of the request's first prefill row."""
    for plans in steps:
        for plan in plans:
            if plan.kind == StepKind.PREFILL and request_id in plan.request_ids:
                i = plan.request_ids.index(request_id)
                return int(plan.query_lens[i]), int(plan.context_lens[i])
    raise AssertionError(f"{request_id} never prefilled")


# ---- PageCache -------------------------------------------------------------------------------------


def test_page_hashes_chain_over_the_whole_prefix() -> None:
    a = extend_page_hashes([], np.array([1, 2, 3, 4, 5, 6, 7, 8, 9]), 4)
    b = extend_page_hashes([], np.array([9, 2, 3, 4, 5, 6, 7, 8]), 4)
    assert len(a) == 2 and len(b) == 2, "only full pages are hashed"
    assert a[0] != b[0] and a[1] != b[1], "equal page tokens after different prefixes hash apart"
    assert extend_page_hashes(a[:1], np.array([1, 2, 3, 4, 5, 6, 7, 8]), 4) == a


def test_cached_pages_are_kept_until_needed_then_evicted_oldest_first() -> None:
    cache = PageCache(4)
    first = cache.allocate(2)
    assert first is not None
    cache.cache(int(first[0]), b"a")
    cache.cache(int(first[1]), b"b")
    cache.release(first)
    assert cache.num_free == 4 and cache.num_used == 0 and cache.num_cached == 2
    assert cache.match([b"a", b"b", b"c"]) == [int(first[0]), int(first[1])]
    second = cache.allocate(3)  # two free pages, then the last page of the released table
    assert second is not None and cache.match([b"a", b"b"]) == [int(first[0])]
    assert cache.allocate(2) is None, "one page left: nothing is taken"
    cache.release(second)
    assert cache.num_free == 4


def test_a_page_in_use_is_never_evicted_and_sharing_counts_references() -> None:
    cache = PageCache(3)
    pages = cache.allocate(1)
    assert pages is not None
    cache.cache(int(pages[0]), b"x")
    cache.acquire(cache.match([b"x"]))  # a second request shares it
    assert cache.refcount(int(pages[0])) == 2 and cache.num_used == 1
    other = cache.allocate(2)
    assert other is not None and int(pages[0]) not in other.tolist()
    assert cache.allocate(1) is None, "the shared page is in use: not evictable"
    cache.release(pages)
    cache.release(pages)
    assert cache.refcount(int(pages[0])) == 0 and cache.num_cached == 1
    with pytest.raises(RuntimeError, match="released twice"):
        cache.release(pages)


def test_reset_keeps_pages_in_use_and_frees_the_rest() -> None:
    cache = PageCache(4)
    held, kept = cache.allocate(1), cache.allocate(1)
    assert held is not None and kept is not None
    cache.cache(int(held[0]), b"held")
    cache.cache(int(kept[0]), b"kept")
    cache.release(kept)
    assert cache.reset() == 2
    assert cache.num_cached == 0 and cache.num_used == 1 and cache.match([b"kept"]) == []
    cache.release(held)
    assert cache.num_free == 4


def test_a_disabled_cache_caches_nothing() -> None:
    cache = PageCache(2, enabled=False)
    pages = cache.allocate(1)
    assert pages is not None and not cache.cache(int(pages[0]), b"x") and cache.match([b"x"]) == []


# ---- the scheduler ---------------------------------------------------------------------------------


def test_a_shared_prefix_is_read_from_the_cache_and_outputs_stay_exact() -> None:
    scheduler, ranks = Scheduler(limits()), None
    ranks = FakeRanks(scheduler.limits)
    system = list(range(1, 13))  # three full pages
    sampling = SamplingParams(max_tokens=5, ignore_eos=True)
    scheduler.add("a", [*system, 20, 21], sampling, frozenset())
    run(scheduler, ranks)
    scheduler.add("b", [*system, 30], sampling, frozenset())
    outputs, steps = run(scheduler, ranks)
    assert first_plan_row(steps, "b") == (1, 13), "b computes only its own token after 12 cached"
    assert outputs["b"] == expected_output([*system, 30], sampling, 5, 64)[0]
    assert scheduler.cache_queries == 14 + 13 and scheduler.cache_hits == 12


def test_a_fully_cached_prompt_still_computes_its_last_page() -> None:
    scheduler = Scheduler(limits())
    ranks = FakeRanks(scheduler.limits)
    prompt = list(range(1, 9))  # exactly two pages
    sampling = SamplingParams(max_tokens=3, ignore_eos=True)
    scheduler.add("a", prompt, sampling, frozenset())
    run(scheduler, ranks)
    scheduler.add("again", prompt, sampling, frozenset())
    outputs, steps = run(scheduler, ranks)
    assert first_plan_row(steps, "again") == (P, 8), "the last page is computed to sample from it"
    assert outputs["again"] == expected_output(prompt, sampling, 3, 64)[0]


def test_the_next_turn_reads_the_pages_the_last_turn_decoded() -> None:
    scheduler = Scheduler(limits())
    ranks = FakeRanks(scheduler.limits)
    sampling = SamplingParams(max_tokens=10, ignore_eos=True)
    turn1 = [5, 6, 7]
    scheduler.add("t1", turn1, sampling, frozenset())
    outputs, _ = run(scheduler, ranks)  # 13 tokens, 12 computed (the last output is never fed)
    turn2 = turn1 + outputs["t1"] + [8, 9]
    scheduler.add("t2", turn2, sampling, frozenset())
    outputs, steps = run(scheduler, ranks)
    assert first_plan_row(steps, "t2") == (3, 15), "three full pages, two of them decoded, are read"
    assert outputs["t2"] == expected_output(turn2, sampling, 10, 64)[0]


def test_first_token_carries_the_cached_prompt_tokens() -> None:
    scheduler = Scheduler(limits())
    ranks = FakeRanks(scheduler.limits)
    sampling = SamplingParams(max_tokens=2, ignore_eos=True)
    scheduler.add("a", list(range(10)), sampling, frozenset())
    first = [u for u in scheduler.update(ranks.execute(scheduler.schedule() or []))]
    assert [u.num_cached_tokens for u in first] == [0]
    run(scheduler, ranks)
    scheduler.add("b", list(range(10)), sampling, frozenset())
    updates = []
    while scheduler.has_work():
        updates += list(scheduler.update(ranks.execute(scheduler.schedule() or [])))
    assert [u.num_cached_tokens for u in updates] == [8, None]


def test_requests_admitted_in_one_step_do_not_read_each_others_pages() -> None:
    scheduler = Scheduler(limits())
    ranks = FakeRanks(scheduler.limits)  # asserts no sequence reads a page written in its own step
    sampling = SamplingParams(max_tokens=3, ignore_eos=True)
    for i in range(3):
        scheduler.add(f"r{i}", list(range(1, 11)), sampling, frozenset())
    outputs, steps = run(scheduler, ranks)
    assert [first_plan_row(steps, f"r{i}")[0] for i in range(3)] == [10, 10, 10]
    assert all(outputs[f"r{i}"] == expected_output(list(range(1, 11)), sampling, 3, 64)[0] for i in range(3))


def test_caching_off_computes_every_token() -> None:
    scheduler = Scheduler(limits(prefix_caching=False))
    ranks = FakeRanks(scheduler.limits)
    sampling = SamplingParams(max_tokens=2, ignore_eos=True)
    scheduler.add("a", list(range(10)), sampling, frozenset())
    run(scheduler, ranks)
    scheduler.add("b", list(range(10)), sampling, frozenset())
    _, steps = run(scheduler, ranks)
    assert first_plan_row(steps, "b") == (10, 10)
    assert scheduler.cache_queries == 0 and scheduler.pools[0].num_cached == 0


def test_a_preempted_request_recomputes_from_its_cached_pages() -> None:
    small = limits(pages_per_rank=9, max_seq_len=28, max_num_seqs=2)
    scheduler = Scheduler(small)
    ranks = FakeRanks(small)
    sampling = SamplingParams(max_tokens=14, ignore_eos=True)
    prompts = {"old": [1] * 9, "new": [2] * 9}
    for rid, prompt in prompts.items():
        scheduler.add(rid, prompt, sampling, frozenset())
    outputs, steps = run(scheduler, ranks)
    assert scheduler.num_preemptions > 0
    recomputes = [
        int(p.query_lens[p.request_ids.index("new")])
        for plans in steps
        for p in plans
        if p.kind == StepKind.PREFILL and "new" in p.request_ids and p.new_requests
    ]
    assert len(recomputes) >= 2 and min(recomputes[1:]) < 9, "the recompute skipped cached pages"
    for rid, prompt in prompts.items():
        assert outputs[rid] == expected_output(prompt, sampling, 14, 28)[0]


def test_a_failed_step_drops_every_cache() -> None:
    scheduler = Scheduler(limits(num_ranks=2))
    ranks = FakeRanks(scheduler.limits)
    scheduler.add("a", list(range(10)), SamplingParams(max_tokens=4, ignore_eos=True), frozenset())
    scheduler.update(ranks.execute(scheduler.schedule() or []))
    assert sum(p.num_cached for p in scheduler.pools) == 2
    scheduler.schedule()
    assert scheduler.fail_in_flight() == ["a"]
    assert all(p.num_cached == 0 and p.num_free == p.num_pages for p in scheduler.pools)


def hot_prefix_ranks(max_rank_imbalance: int, num_requests: int = 16) -> list[int]:
    """Ranks chosen for requests sharing one long prefix, arriving one per step on 4 ranks."""
    scheduler = Scheduler(
        limits(num_ranks=4, max_num_seqs=16, pages_per_rank=80, max_rank_imbalance=max_rank_imbalance)
    )
    ranks = FakeRanks(scheduler.limits)
    prefix = list(range(1, 33))
    chosen = []
    for i in range(num_requests):
        request = scheduler.add(
            f"r{i}", [*prefix, 40 + i], SamplingParams(max_tokens=30, ignore_eos=True), frozenset()
        )
        while request.rank is None:  # a decode step may come between prefill streaks
            scheduler.update(ranks.execute(scheduler.schedule() or []))
        chosen.append(request.rank)
    return chosen


def test_a_hot_prefix_fills_its_rank_only_up_to_the_imbalance_bound() -> None:
    chosen = hot_prefix_ranks(max_rank_imbalance=2)
    counts = [chosen.count(r) for r in range(4)]
    assert max(counts) - min(counts) <= 2 + 1, f"ranks {counts}: over the bound"
    assert counts[chosen[0]] == max(counts), "the rank holding the prefix takes the most"
    unbounded = hot_prefix_ranks(max_rank_imbalance=100)
    assert len(set(unbounded)) == 1, "without a bound every request follows the cache"
