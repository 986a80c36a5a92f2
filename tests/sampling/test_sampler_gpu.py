"""Sampler on CUDA: the same contracts as on CPU, at DeepSeek-V3's vocabulary size."""

import numpy as np
import pytest
import torch

from nmoe_serve.sampling import Sampler, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

VOCAB = 129280  # DeepSeek-V3


@pytest.fixture
def cuda():
    return torch.device("cuda")


def test_greedy_with_penalties_and_min_tokens_matches_cpu(cuda):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, VOCAB, generator=gen).to(torch.bfloat16)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, repetition_penalty=1.5, frequency_penalty=0.5, presence_penalty=0.3),
        SamplingParams(temperature=0, min_tokens=2, logprobs=5),
        SamplingParams(temperature=0, repetition_penalty=0.7),
    ]
    outs = []
    for device in (torch.device("cpu"), cuda):
        sampler = Sampler(VOCAB, device, seed=0)
        for i, p in enumerate(params):
            sampler.add_request(f"r{i}", p, [int(logits[i].float().argmax()), 5, 6], [7, 7])
        steps = [
            sampler.sample([f"r{i}" for i in range(4)], logits.to(device), eos_token_id=1) for _ in range(3)
        ]
        outs.append(steps)
    for cpu_step, gpu_step in zip(*outs, strict=True):
        np.testing.assert_array_equal(cpu_step.token_ids, gpu_step.token_ids)
        np.testing.assert_allclose(cpu_step.logprobs, gpu_step.logprobs, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(cpu_step.top_token_ids, gpu_step.top_token_ids)


def test_a_seed_gives_the_same_tokens_whatever_else_is_in_the_batch(cuda):
    gen = torch.Generator(device=cuda).manual_seed(1)
    steps = [torch.randn(VOCAB, device=cuda, generator=gen) for _ in range(8)]
    seeded = SamplingParams(temperature=0.8, top_p=0.95, top_k=50, seed=1234)

    alone = Sampler(VOCAB, cuda)
    alone.add_request("x", seeded, [0])
    expected = [int(alone.sample(["x"], s[None], None).token_ids[0]) for s in steps]

    crowded = Sampler(VOCAB, cuda, seed=5)
    crowded.add_request("x", seeded, [0])
    others = [f"o{i}" for i in range(31)]
    for i, rid in enumerate(others):
        crowded.add_request(rid, SamplingParams(temperature=1.0, min_p=0.05, seed=i if i % 3 else None), [0])
    got = []
    for n, step in enumerate(steps):
        batch = [*others[: 3 * n], "x", *others[3 * n : 5 * n]]  # size and position vary
        logits = torch.randn(len(batch), VOCAB, device=cuda)
        logits[batch.index("x")] = step
        got.append(int(crowded.sample(batch, logits, None).token_ids[batch.index("x")]))
    assert got == expected


def test_truncation_stays_inside_top_k(cuda):
    gen = torch.Generator(device=cuda).manual_seed(2)
    logits = torch.randn(1, VOCAB, device=cuda, generator=gen).expand(256, -1)
    sampler = Sampler(VOCAB, cuda, seed=3)
    ids = [f"r{i}" for i in range(256)]
    for rid in ids:
        sampler.add_request(rid, SamplingParams(temperature=2.0, top_k=20), [0])
    tokens = sampler.sample(ids, logits, None).token_ids
    allowed = set(logits[0].topk(20).indices.tolist())
    assert set(tokens.tolist()) <= allowed
    assert len(set(tokens.tolist())) > 5
