"""The engine over Ray worker actors on the CPU (gloo): EP = 1, 2 and 8 agree, overlapped steps give
the tokens of one step at a time, idle ranks take every step with T = 0, each rank holds exactly its
experts, every rank runs the same collectives, cancelling frees pages on the ranks, and a killed
worker fails the step and the group recovers."""

from __future__ import annotations

import random
import time

import pytest

from nmoe_serve.config import ServeConfig
from nmoe_serve.engine.executor import StepFailed
from nmoe_serve.llm import LLM
from nmoe_serve.parallel.executor import RayExecutor
from nmoe_serve.sampling.params import SamplingParams
from tests.helpers import resolve
from tests.recording import RecordingWorkerActor

ray = pytest.importorskip("ray")

OPTIONS = {
    "max_seq_len": 128,
    "page_size": 16,
    "max_prefill_tokens": 64,
    "max_num_seqs": 16,
    "step_timeout_s": 30.0,
}


def workload(count: int = 24, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(0, 496) for _ in range(rng.randrange(1, 100))] for _ in range(count)]
    params = [
        SamplingParams(max_tokens=rng.randrange(4, 20), temperature=0.0, ignore_eos=True) for _ in prompts
    ]
    return prompts, params


def tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def ep8(dev_config_path, progress):
    """EP 8 whose ranks record their collectives (tests/recording.py)."""
    progress("starting 8 Ray worker ranks for tests/parallel (about a minute)")
    settings = resolve(
        ServeConfig.from_toml(dev_config_path, overrides={"ep_size": 8, "num_pages": 10, **OPTIONS})
    )
    llm = LLM.from_executor(settings, RayExecutor(settings, "ep8-test", actor_class=RecordingWorkerActor))
    yield llm
    llm.shutdown()
    ray.shutdown()  # the local cluster these engines started


@pytest.fixture(scope="module")
def expected(dev_config_path):
    llm = LLM(config=dev_config_path, num_pages=10, **OPTIONS)
    return tokens(llm, *workload())


def test_ep_sizes_give_identical_greedy_tokens(dev_config_path, ep8, expected) -> None:
    prompts, params = workload()
    ep2 = LLM(config=dev_config_path, ep_size=2, num_pages=10, **OPTIONS)
    try:
        assert tokens(ep2, prompts, params) == expected
        assert ep2.engine.scheduler.num_preemptions > 0, "the workload is meant to preempt"
    finally:
        ep2.shutdown()
    before = ep8.engine.scheduler.num_preemptions
    assert tokens(ep8, prompts, params) == expected
    assert ep8.engine.scheduler.num_preemptions > before


def conversations(llm: LLM, turns: int = 3, count: int = 8, seed: int = 1) -> list[list[int]]:
    """Greedy multi-turn chats sharing a system prompt, one llm.generate per turn (so later turns can
    read the pages of earlier ones): every turn's output tokens, conversation after conversation."""
    rng = random.Random(seed)
    system = [rng.randrange(0, 496) for _ in range(40)]
    history = [list(system) for _ in range(count)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outputs = []
    for _ in range(turns):
        for h in history:
            h.extend(rng.randrange(0, 496) for _ in range(rng.randrange(3, 12)))
        for h, out in zip(history, llm.generate([list(h) for h in history], params), strict=True):
            h.extend(out.outputs[0].token_ids)
            outputs.append(out.outputs[0].token_ids)
    return outputs


def test_prefix_caching_keeps_greedy_tokens_at_ep_1_2_and_8(dev_config_path, ep8) -> None:
    """The same chats with the cache off (EP 1) and on (EP 1, 2, 8): identical tokens, and the cache
    served part of every cached run's prompts."""
    plain = LLM(config=dev_config_path, num_pages=10, enable_prefix_caching=False, **OPTIONS)
    try:
        expected = conversations(plain)
        assert plain.engine.scheduler.cache_hits == 0
    finally:
        plain.shutdown()
    for ep_size in (1, 2):
        cached = LLM(config=dev_config_path, ep_size=ep_size, num_pages=10, **OPTIONS)
        try:
            assert conversations(cached) == expected, f"EP {ep_size}"
            assert cached.engine.scheduler.cache_hits > 0, f"EP {ep_size}: nothing was read from the cache"
        finally:
            cached.shutdown()
    hits = ep8.engine.scheduler.cache_hits
    assert conversations(ep8) == expected
    assert ep8.engine.scheduler.cache_hits > hits


def stopping_workload(reference: LLM, count: int = 20, seed: int = 4):
    """Greedy params whose stop ids are tokens the model emits, so requests end on them (one step
    late under overlap), and on EOS and max_tokens."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(0, 496) for _ in range(rng.randrange(1, 90))] for _ in range(count)]
    free = tokens(
        reference, prompts, [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)] * count
    )
    params = [
        SamplingParams(
            max_tokens=rng.randrange(2, 20),
            temperature=0.0,
            ignore_eos=rng.random() < 0.5,
            stop_token_ids=tuple(rng.sample(out, k=2)) if rng.random() < 0.6 else (),
        )
        for out in free
    ]
    return prompts, params


def finished(llm: LLM, prompts, params) -> list[tuple[list[int], str]]:
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in llm.generate(prompts, params)]


def test_overlapped_steps_at_ep_2_and_8_give_the_serial_tokens(dev_config_path, ep8) -> None:
    serial = LLM(config=dev_config_path, num_pages=10, overlap=False, **OPTIONS)
    prompts, params = stopping_workload(serial)
    want = finished(serial, prompts, params)
    assert {reason for _, reason in want} == {"stop", "length"}
    ep2 = LLM(config=dev_config_path, ep_size=2, num_pages=10, overlap=True, **OPTIONS)
    try:
        assert ep2.engine.overlap and finished(ep2, prompts, params) == want
    finally:
        ep2.shutdown()
    assert ep8.engine.overlap, "the EP 8 engine of this module overlaps its steps"
    assert finished(ep8, prompts, params) == want
    assert all(int(s["requests"]) == 0 for s in ep8.engine.executor.call_all("stats"))


def test_one_request_with_seven_idle_ranks(ep8) -> None:
    prompts, params = workload(16, seed=1)
    busy = tokens(ep8, prompts, params)
    ep8.engine.executor.call_all("collective_log")  # drain
    alone = tokens(ep8, prompts[3:4], params[3:4])
    assert alone == busy[3:4]
    logs = ep8.engine.executor.call_all("collective_log")
    assert logs[0] and all(log == logs[0] for log in logs), "idle ranks must run every collective"


def test_each_rank_holds_exactly_its_experts(ep8) -> None:
    inventories = ep8.engine.executor.call_all("inventory")
    for rank, inv in enumerate(inventories):
        assert inv["experts"] == list(range(2 * rank, 2 * rank + 2))
        assert all(shape[0] == 2 for shape in inv["expert_params"].values())
    assert all(inv["replicated"] == inventories[0]["replicated"] for inv in inventories)
    assert not any(".experts." in name for name in inventories[0]["replicated"])


def test_every_rank_runs_the_same_collective_sequence(ep8) -> None:
    ep8.engine.executor.call_all("collective_log")
    step_before = ep8.engine.scheduler.step_id
    tokens(ep8, *workload(10, seed=2))
    logs = ep8.engine.executor.call_all("collective_log")
    assert all(log == logs[0] for log in logs)
    steps = sorted({entry[0] for entry in logs[0]})
    assert steps == list(range(step_before, ep8.engine.scheduler.step_id))
    kinds = {entry[1] for entry in logs[0]}
    assert kinds == {0, 1}, "both prefill and decode steps ran"
    moe_layers = 3
    per_step = {s: sum(1 for e in logs[0] if e[0] == s) for s in steps}
    assert all(n in (4 * moe_layers, 5 * moe_layers) for n in per_step.values())


def test_cancelling_half_frees_their_pages_on_their_ranks(ep8) -> None:
    engine = ep8.engine
    for i in range(32):
        engine.add_request(
            f"c{i}", [1 + i % 7] * 20, SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
        )
    for _ in range(3):
        engine.step()
    by_rank_before = [len(r) for r in engine.scheduler.running]
    assert sum(by_rank_before) == 32
    for i in range(0, 32, 2):
        assert engine.abort(f"c{i}")
    engine.step()  # carries the releases to the ranks
    live = {f"c{i}" for i in range(1, 32, 2)}
    for rank, running in enumerate(engine.scheduler.running):
        assert {r.request_id for r in running} <= live
        held = sum(len(r.pages) for r in running)
        assert engine.scheduler.pools[rank].num_used == held
    stats = engine.executor.call_all("stats")
    assert [int(s["requests"]) for s in stats] == [len(r) for r in engine.scheduler.running]
    for i in range(1, 32, 2):
        engine.abort(f"c{i}")
    while engine.has_work():
        engine.step()
    assert all(p.num_used == 0 for p in engine.scheduler.pools)
    assert all(int(s["requests"]) == 0 for s in engine.executor.call_all("stats"))


def test_killed_worker_fails_the_step_and_the_group_recovers(ep8, expected) -> None:
    engine = ep8.engine
    for i in range(6):
        engine.add_request(f"k{i}", [3] * 30, SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True))
    engine.step()
    victim = ray.get_actor(f"nmoe-worker-{engine.executor.group}-r3")
    ray.kill(victim, no_restart=True)
    started = time.monotonic()
    with pytest.raises(StepFailed, match=r"failed on EP group .*6 request\(s\) failed"):
        for _ in range(5):
            engine.step()
    assert time.monotonic() - started < OPTIONS["step_timeout_s"] + 60
    assert engine.executor.restarts == 1
    assert not engine.has_work() and all(p.num_used == 0 for p in engine.scheduler.pools)
    prompts, params = workload()
    assert tokens(ep8, prompts, params) == expected, "the restarted group serves again"
