"""Overlapped steps (scheduler.overlap) against one step at a time, on the dev checkpoint, in-process
(EP 1): the same greedy tokens and finish reasons with stop ids, EOS, max_tokens, stop strings,
preemption and aborts. The EP 2 and EP 8 comparisons are in tests/parallel/."""

from __future__ import annotations

import random

import pytest

from nmoe_serve.llm import LLM
from nmoe_serve.sampling.params import SamplingParams

OPTIONS = {"max_seq_len": 256, "page_size": 16, "max_num_seqs": 64}


def workload(llm: LLM, count: int = 40, seed: int = 0) -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts and greedy params; the stop ids are tokens the model emits, so requests end on them."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, 496) for _ in range(rng.randrange(1, 120))] for _ in range(count)]
    free = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    params = []
    for out in free:
        tokens = out.outputs[0].token_ids
        stop = tuple(rng.sample(tokens, k=min(2, len(tokens)))) if rng.random() < 0.5 else ()
        params.append(
            SamplingParams(
                max_tokens=rng.randrange(1, 30),
                temperature=0.0,
                ignore_eos=rng.random() < 0.5,
                stop_token_ids=stop,
                min_tokens=rng.choice([0, 0, 2]),
            )
        )
    return prompts, params


def run(llm: LLM, prompts, params) -> list[tuple[list[int], str, object]]:
    outs = llm.generate(prompts, params)
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason) for o in outs]


@pytest.fixture(scope="module")
def serial(dev_config_path) -> LLM:
    return LLM(config=dev_config_path, overlap=False, num_pages=1024, **OPTIONS)


@pytest.fixture(scope="module")
def overlapped(dev_config_path) -> LLM:
    return LLM(config=dev_config_path, overlap=True, num_pages=1024, **OPTIONS)


def test_overlap_gives_the_serial_tokens_and_finish_reasons(serial, overlapped) -> None:
    assert overlapped.engine.overlap and not serial.engine.overlap
    prompts, params = workload(serial)
    want = run(serial, prompts, params)
    assert {reason for _, reason, _ in want} == {"stop", "length"}, "the workload is meant to stop both ways"
    assert run(overlapped, prompts, params) == want
    for llm in (serial, overlapped):
        assert not llm.engine.has_work()
        assert len(llm.engine.executor.worker.sampler) == 0, "sampler state left on the worker"
        assert all(p.num_used == 0 for p in llm.engine.scheduler.pools)


def test_stop_strings_end_exactly_the_same(serial, overlapped) -> None:
    free = serial.generate(
        "Once upon a time", SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    )
    text = free[0].outputs[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=(stop,))
    want = serial.generate("Once upon a time", params)[0].outputs[0]
    got = overlapped.generate("Once upon a time", params)[0].outputs[0]
    assert want.finish_reason == "stop" and want.stop_reason == stop
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)
    assert not overlapped.engine.has_work() and len(overlapped.engine.executor.worker.sampler) == 0


def test_preemption_under_overlap_gives_the_same_tokens(dev_config_path, serial) -> None:
    tight = LLM(
        config=dev_config_path, overlap=True, num_pages=256 // 16 + 6, max_prefill_tokens=100, **OPTIONS
    )
    rng = random.Random(3)
    prompts = [[rng.randrange(1, 496) for _ in range(rng.randrange(1, 150))] for _ in range(32)]
    params = [
        SamplingParams(max_tokens=rng.randrange(8, 40), temperature=0.0, ignore_eos=True) for _ in prompts
    ]
    want = run(serial, prompts, params)
    assert run(tight, prompts, params) == want
    assert tight.engine.scheduler.num_preemptions > 0, "the page budget is meant to preempt"
    assert all(p.num_free == p.num_pages for p in tight.engine.scheduler.pools)
    assert len(tight.engine.executor.worker.sampler) == 0


def test_aborts_while_a_step_is_in_flight_free_everything(overlapped) -> None:
    engine = overlapped.engine
    for i in range(12):
        engine.add_request(
            f"a{i}", [5 + i] * 30, SamplingParams(max_tokens=80, temperature=0.0, ignore_eos=True)
        )
    for _ in range(6):
        engine.step()
    assert engine.scheduler.num_in_flight == 1, "a step is in flight between calls"
    evens, odds = {f"a{i}" for i in range(0, 12, 2)}, {f"a{i}" for i in range(1, 12, 2)}
    for request_id in evens:
        assert engine.abort(request_id)
    after = {u.request_id for u in engine.step()}  # the step in flight completes: evens are dropped
    assert after == odds
    for request_id in odds:
        assert engine.abort(request_id)
    late = set()
    while engine.has_work():
        late.update(u.request_id for u in engine.step())
    assert not late, "no token of a request after its abort"
    assert all(p.num_used == 0 for p in engine.scheduler.pools)
    assert len(engine.executor.worker.sampler) == 0
