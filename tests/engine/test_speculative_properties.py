"""The scheduler with speculative decoding (k drafts per sequence), under hypothesis, with fake ranks.

The fake ranks keep two "KV caches" of token ids per page slot, as the worker keeps the target's
and the MTP draft layer's latents: the target's slot of position i holds token t_i, the draft
layer's holds t_{i+1} (its value depends on the next token, as the MTP layer's does). A verify
step writes its 1 + k tokens, takes the reference next token at each position from what it reads
back, and accepts the drafts up to the first wrong one; drafts come from a deterministic function
that is right about two times in three, and each draft step first checks that the draft layer's
slots before it hold the sequence's true next tokens (rolled-back positions, preemption and pages
shared through the prefix cache included). So a page handed to two requests, a page missing for
a draft position, a wrong rollback or a cached page whose draft entries belong to another prefix
fails a check, and every request's tokens must still equal the reference.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nmoe_serve.engine.page_cache import extend_page_hashes
from nmoe_serve.engine.plan import StepKind, StepPlan, StepResult
from nmoe_serve.engine.scheduler import RequestRejected, Scheduler, SchedulerLimits
from nmoe_serve.sampling.params import SamplingParams
from tests.engine.test_scheduler_properties import (
    EOS,
    MAX_SEQ_LEN,
    VOCAB,
    check_pages,
    expected_output,
    make_prompt,
    next_token,
    request_strategy,
    sampling_of,
)


def draft_of(tokens: list[int], salt: int) -> int:
    """The fake draft model: the reference next token, except for one history in three."""
    digest = hashlib.blake2b(np.asarray([*tokens, salt], np.int64).tobytes(), digest_size=8).digest()
    right = next_token(tokens)
    return right if int.from_bytes(digest, "little") % 3 else (right + 1) % VOCAB


class FakeSpeculativeRanks:
    def __init__(self, limits: SchedulerLimits, salt: int) -> None:
        self.limits, self.salt, self.k = limits, salt, limits.num_draft_tokens
        n = limits.pages_per_rank * limits.page_size
        self.slots = [np.full(n, -1, np.int64) for _ in range(limits.num_ranks)]  # the target's cache
        self.draft_slots = [np.full(n, -1, np.int64) for _ in range(limits.num_ranks)]  # the draft layer's
        self.state: list[set[str]] = [set() for _ in range(limits.num_ranks)]
        self.drafted = self.accepted = 0

    def execute(self, plans: list[StepPlan]) -> list[StepResult]:
        assert len({(p.step_id, p.kind) for p in plans}) == 1, "every rank runs the same step"
        results = []
        for rank, plan in enumerate(plans):
            for rid in plan.released:
                self.state[rank].remove(rid)
            for new in plan.new_requests:
                assert new.request_id not in self.state[rank], "added twice"
                self.state[rank].add(new.request_id)
            if plan.kind == StepKind.DECODE:
                assert (plan.query_lens == 1 + self.k).all(), "a verify step carries 1 + k tokens"
            elif plan.num_seqs:  # (a T = 0 plan carries none)
                assert plan.next_token_ids is not None and plan.next_token_ids.shape == (plan.num_seqs,)
            results.append(self._run(rank, plan))
        return results

    def _slot(self, plan: StepPlan, i: int, pos: int) -> int:
        p = self.limits.page_size
        page = int(plan.page_table[i][pos // p]) if pos // p < plan.page_table.shape[1] else -1
        assert page >= 0, f"{plan.request_ids[i]} has no page for position {pos}"
        return page * p + pos % p

    def _run(self, rank: int, plan: StepPlan) -> StepResult:
        cache, draft_cache = self.slots[rank], self.draft_slots[rank]
        ids, tokens_out, emitted, drafts = [], [], [], []
        start = 0
        for i, rid in enumerate(plan.request_ids):
            assert rid in self.state[rank]
            n, ctx = int(plan.query_lens[i]), int(plan.context_lens[i])
            new = plan.token_ids[start : start + n].tolist()
            start += n
            first = ctx - n
            for j, pos in enumerate(range(first, ctx)):
                cache[self._slot(plan, i, pos)] = new[j]
            history = [int(cache[self._slot(plan, i, pos)]) for pos in range(first)]
            if plan.kind == StepKind.PREFILL:
                if not plan.sample[i]:
                    assert plan.next_token_ids is not None
                    following = [*new[1:], int(plan.next_token_ids[i])]
                    for j, pos in enumerate(range(first, ctx)):
                        draft_cache[self._slot(plan, i, pos)] = following[j]
                    continue
                assert plan.next_token_ids is not None and plan.next_token_ids[i] == -1
                known = history + new
                out = [next_token(known)]
                for j, pos in enumerate(range(first, ctx)):
                    draft_cache[self._slot(plan, i, pos)] = (new[1:] + out)[j]
                last = ctx - 1
            else:
                out, m = [], 0
                for j in range(n):
                    target = next_token(history + new[: j + 1])
                    out.append(target)
                    if j < n - 1 and new[j + 1] == target:
                        m += 1
                    else:
                        break
                for j, pos in enumerate(range(first, ctx)):  # the draft layer reads the target's tokens
                    draft_cache[self._slot(plan, i, pos)] = out[j] if j < len(out) else -2
                self.drafted += self.k
                self.accepted += m
                known = history + new[: m + 1]
                last = first + m
            # the draft layer's entries before the draft position hold the true next tokens
            sequence = [*known, out[-1]]
            for pos in range(last + 1):
                got = int(draft_cache[self._slot(plan, i, pos)])
                assert got == sequence[pos + 1], f"{rid}: draft entry of position {pos} is stale"
            chain = []
            for j in range(self.k):
                chain.append(draft_of(sequence + chain, self.salt))
                if j < self.k - 1:  # the next draft's pass writes one position further on
                    draft_cache[self._slot(plan, i, last + 1 + j)] = chain[-1]
            ids.append(rid)
            tokens_out.extend(out)
            emitted.append(len(out))
            drafts.append(chain)
        return StepResult(
            plan.step_id,
            rank,
            tuple(ids),
            np.array(tokens_out, np.int64),
            num_emitted=np.array(emitted, np.int64) if plan.kind == StepKind.DECODE else None,
            draft_token_ids=np.array(drafts, np.int64).reshape(len(ids), self.k),
        )


@st.composite
def speculative_limits(draw) -> SchedulerLimits:
    page_size = draw(st.sampled_from([1, 2, 4, 8]))
    k = draw(st.integers(1, 3))
    return SchedulerLimits(
        num_ranks=draw(st.integers(1, 3)),
        pages_per_rank=math.ceil((MAX_SEQ_LEN + 2 * k) / page_size) + draw(st.integers(0, 30)),
        page_size=page_size,
        max_seq_len=MAX_SEQ_LEN,
        max_num_seqs=draw(st.integers(1, 6)),
        max_prefill_tokens=draw(st.integers(1, 48)),
        max_prefill_steps_in_a_row=draw(st.integers(1, 3)),
        watermark_pages=draw(st.integers(0, 3)),
        prefix_caching=draw(st.booleans()),
        max_rank_imbalance=draw(st.integers(0, 3)),
        num_draft_tokens=k,
    )


def check_cached_pages(
    scheduler: Scheduler, ranks: FakeSpeculativeRanks, registry: dict[bytes, list[int]]
) -> None:
    """Every cached page holds, in both caches, the tokens its hash (with the token after it) stands for."""
    p = scheduler.limits.page_size
    for rank, pool in enumerate(scheduler.pools):
        for page_hash, page in pool.cached_pages().items():
            assert page_hash in registry, "a cached hash that no request's tokens make"
            want = registry[page_hash]
            assert ranks.slots[rank][page * p : (page + 1) * p].tolist() == want[:p]
            assert ranks.draft_slots[rank][page * p : (page + 1) * p].tolist() == want[1:]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    limits=speculative_limits(),
    fail_at=st.one_of(st.none(), st.integers(0, 40)),
    requests=st.lists(request_strategy, min_size=1, max_size=12),
    seed=st.integers(0, 2**16),
)
def test_speculative_steps_keep_pages_exact_and_outputs_equal_to_the_reference(
    limits, fail_at, requests, seed
) -> None:
    scheduler = Scheduler(limits)
    ranks = FakeSpeculativeRanks(limits, salt=seed)
    rng = np.random.default_rng(seed)
    expected: dict[str, tuple[list[int], str]] = {}
    finished: dict[str, tuple[list[int], str]] = {}
    outputs: dict[str, list[int]] = {}
    aborted: set[str] = set()
    pending = sorted(enumerate(requests), key=lambda kv: kv[1]["arrive_at"])
    conversations: list[list[int]] = []
    registry: dict[bytes, list[int]] = {}  # page hash -> the page's tokens and the one after it
    step = 0
    while pending or scheduler.has_work():
        while pending and pending[0][1]["arrive_at"] <= step:
            i, spec = pending.pop(0)
            rid = f"r{i}"
            prompt = make_prompt(spec, rng, conversations)
            sampling = sampling_of(spec)
            too_long = spec["prompt_len"] + spec["max_tokens"] > MAX_SEQ_LEN
            try:
                scheduler.add(rid, prompt, sampling, frozenset({EOS}))
            except RequestRejected as e:
                assert too_long or "KV pages" in str(e), f"rejected a request that fits: {e}"
                continue
            expected[rid] = expected_output(prompt, sampling, spec["max_tokens"], MAX_SEQ_LEN)
            conversations.append(prompt + expected[rid][0])
            tokens = np.asarray(conversations[-1], np.int64)
            for j, page_hash in enumerate(extend_page_hashes([], tokens, limits.page_size, lookahead=1)):
                registry[page_hash] = conversations[-1][j * limits.page_size : (j + 1) * limits.page_size + 1]
            outputs[rid] = []
        for i, spec in enumerate(requests):
            rid = f"r{i}"
            if spec["abort_at"] == step and rid in outputs and rid not in finished and scheduler.abort(rid):
                aborted.add(rid)
        plans = scheduler.schedule()
        if plans is not None and step == fail_at:
            aborted.update(scheduler.fail_in_flight())
            ranks = FakeSpeculativeRanks(limits, salt=seed)
        elif plans is not None:
            for update in scheduler.update(ranks.execute(plans)):
                outputs[update.request_id].append(update.token_id)
                if update.finish_reason is not None:
                    finished[update.request_id] = (outputs[update.request_id], update.finish_reason.value)
        else:
            assert not scheduler.has_work() or pending, "work is left but nothing was scheduled (deadlock)"
        check_pages(scheduler)
        check_cached_pages(scheduler, ranks, registry)
        step += 1
        assert step < 3000, "no progress"
    for rid, want in expected.items():
        if rid in aborted:
            got = outputs[rid]
            assert got == want[0][: len(got)], "an aborted request's tokens so far are still exact"
        else:
            assert finished[rid] == want, f"{rid}: wrong tokens or finish reason"
    assert all(pool.num_free == limits.pages_per_rank for pool in scheduler.pools), "pages leaked"
    assert all(not s for s in ranks.state), "sampler state leaked on a rank"
    assert scheduler.num_accepted <= scheduler.num_drafted


def run_one(
    limits: SchedulerLimits, prompt: list[int], sampling: SamplingParams, salt: int = 0
) -> tuple[list[int], list[tuple[StepPlan, int]], Scheduler]:
    """(tokens, each step's rank-0 plan and the tokens it gave, the scheduler) of one request."""
    scheduler, ranks = Scheduler(limits), FakeSpeculativeRanks(limits, salt)
    scheduler.add("r", prompt, sampling, frozenset({EOS}))
    out: list[int] = []
    steps = []
    while scheduler.has_work():
        plans = scheduler.schedule()
        assert plans is not None
        tokens = [u.token_id for u in scheduler.update(ranks.execute(plans))]
        steps.append((plans[0], len(tokens)))
        out.extend(tokens)
        check_pages(scheduler)
    return out, steps, scheduler


LIMITS = SchedulerLimits(
    num_ranks=1,
    pages_per_rank=40,
    page_size=4,
    max_seq_len=64,
    max_num_seqs=4,
    max_prefill_tokens=64,
    max_prefill_steps_in_a_row=2,
    watermark_pages=0,
    num_draft_tokens=2,
)


def test_a_verify_step_carries_the_last_token_and_its_drafts_and_rolls_back_the_rejected() -> None:
    prompt = [3, 5, 7, 9, 11]
    sampling = SamplingParams(max_tokens=20, ignore_eos=True)
    out, steps, scheduler = run_one(LIMITS, prompt, sampling, salt=1)
    assert out == expected_output(prompt, sampling, 20, 64)[0]
    verify = [(plan, n) for plan, n in steps if plan.kind == StepKind.DECODE and plan.num_seqs]
    assert verify and all(plan.num_tokens == 3 for plan, _ in verify)
    assert any(n == 3 for _, n in verify) and any(n == 1 for _, n in verify), (
        "full and no acceptance both seen"
    )
    assert len(verify) < 19, "accepted drafts took fewer steps than tokens"
    assert 0 < scheduler.num_accepted < scheduler.num_drafted
    # a verify step starts after every known token but the last: the previous start + its tokens
    start = len(prompt)
    for plan, n in verify:
        assert plan.context_lens[0] == start + 3  # start + 1 + k
        assert plan.token_ids[0] == ([*prompt, *out])[start]  # the last output, then the drafts
        start += n


def test_tokens_past_a_stop_id_or_max_tokens_are_never_emitted() -> None:
    prompt = [2, 4, 6]
    reference = expected_output(prompt, SamplingParams(max_tokens=40, ignore_eos=True), 40, 64)[0]
    stop = reference[5]
    want_stop = reference[: reference.index(stop) + 1]
    got, _, _ = run_one(LIMITS, prompt, SamplingParams(max_tokens=40, ignore_eos=True, stop_token_ids=[stop]))
    assert got == want_stop
    for max_tokens in (1, 2, 3, 7):
        got, _, _ = run_one(LIMITS, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
        assert got == reference[:max_tokens]


def test_speculative_limits_refuse_overlap_and_count_the_draft_pages() -> None:
    with pytest.raises(ValueError, match="max_steps_in_flight must be 1"):
        Scheduler(LIMITS, max_steps_in_flight=2)
    small = SchedulerLimits(**{**LIMITS.__dict__, "pages_per_rank": 4, "max_seq_len": 64})
    scheduler = Scheduler(small)
    # 10 prompt + 6 outputs: 16 tokens fill 4 pages, but the drafts after the last output need 2k - 1 more
    with pytest.raises(RequestRejected, match="KV pages"):
        scheduler.add("r", [1] * 10, SamplingParams(max_tokens=6, ignore_eos=True), frozenset())
    scheduler.add("ok", [1] * 10, SamplingParams(max_tokens=3, ignore_eos=True), frozenset())
