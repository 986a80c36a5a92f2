"""The whole single-rank engine on the dev checkpoint: 64 prompts of mixed lengths, with a page
budget so small that decode must preempt, give the same greedy tokens as a run with pages to spare."""

from __future__ import annotations

import random

from nmoe_serve.llm import LLM
from nmoe_serve.sampling.params import SamplingParams

MAX_SEQ_LEN = 256
PAGE_SIZE = 16


def run(dev_config_path, num_pages: int, max_prefill_tokens: int):
    llm = LLM(
        config=dev_config_path,
        num_pages=num_pages,
        max_seq_len=MAX_SEQ_LEN,
        max_num_seqs=64,
        max_prefill_tokens=max_prefill_tokens,
        page_size=PAGE_SIZE,
    )
    rng = random.Random(0)
    prompts = [[rng.randrange(0, 496) for _ in range(rng.randrange(1, 180))] for _ in range(64)]
    params = [
        SamplingParams(max_tokens=rng.randrange(8, 40), temperature=0.0, ignore_eos=True) for _ in prompts
    ]
    outputs = llm.generate(prompts, params)
    return llm, prompts, params, outputs


def test_small_page_budget_preempts_and_gives_the_same_tokens(dev_config_path) -> None:
    ample, _, params, expected = run(dev_config_path, num_pages=1024, max_prefill_tokens=4096)
    assert ample.engine.scheduler.num_preemptions == 0
    tight, _, _, got = run(dev_config_path, num_pages=MAX_SEQ_LEN // PAGE_SIZE + 8, max_prefill_tokens=100)
    assert tight.engine.scheduler.num_preemptions > 0
    for p, want, out in zip(params, expected, got, strict=True):
        completion = out.outputs[0]
        assert completion.finish_reason == "length"
        assert len(completion.token_ids) == p.max_tokens
        assert completion.token_ids == want.outputs[0].token_ids
    for engine in (ample.engine, tight.engine):
        assert all(pool.num_free == pool.num_pages for pool in engine.scheduler.pools)
        assert len(engine.executor.worker.sampler) == 0, "sampler state left on the worker"
