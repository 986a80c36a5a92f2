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


def test_verify_on_cuda_with_a_started_copy_matches_sequential_samples(cuda):
    gen = torch.Generator(device=cuda).manual_seed(4)
    rows, width = 6, 3
    logits = 4.0 * torch.randn(rows * width, VOCAB, device=cuda, generator=gen)  # [B·J, V]
    drafts = logits.argmax(-1).view(rows, width)[:, :-1].clone()  # [B, J-1]
    drafts[1, 0] += 1  # a wrong first draft
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0, frequency_penalty=0.5, logprobs=3),
        SamplingParams(temperature=0.7, top_p=0.9, seed=1),
        SamplingParams(temperature=1.0, top_k=40, min_tokens=2, seed=2),
        SamplingParams(temperature=0.9, min_p=0.1, presence_penalty=0.4, seed=3),
        SamplingParams(temperature=0, logprobs=0),
    ]
    sampler, reference = Sampler(VOCAB, cuda, seed=0), Sampler(VOCAB, cuda, seed=0)
    ids = [f"r{i}" for i in range(rows)]
    for rid, p in zip(ids, params, strict=True):
        sampler.add_request(rid, p, [0])
        reference.add_request(rid, p, [0])
    device_verify = sampler.verify_on_device(ids, logits, drafts, eos_token_id=1)
    device_verify.start_copy()
    out = device_verify.to_host()
    sampler.advance(ids, out.num_emitted)
    for b, rid in enumerate(ids):
        expected = []
        for j in range(width):
            token = int(reference.sample([rid], logits[b * width + j][None], 1).token_ids[0])
            expected.append(token)
            if j == width - 1 or token != int(drafts[b, j]):
                break
        assert out.token_ids[b, : out.num_emitted[b]].tolist() == expected
    assert out.num_emitted[0] == width and out.num_emitted[1] == 1
    raw = logits.view(rows, width, VOCAB)[1].float().log_softmax(-1)  # [J, V]
    chosen = raw.gather(1, torch.as_tensor(out.token_ids[1], device=cuda)[:, None])[:, 0]
    np.testing.assert_allclose(out.logprobs[1], chosen.cpu().numpy(), rtol=1e-5, atol=1e-5)
