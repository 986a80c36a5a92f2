"""Sampler randomness: distributions, truncation sets, and seeds that reproduce.

Every generator here is seeded, so these tests are deterministic; the statistical bounds are loose
enough that a correct sampler passes them for any seed.
"""

import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nmoe_serve.sampling import Sampler, SamplingParams
from nmoe_serve.sampling.sampler import position_seed

# chi-square with 3 degrees of freedom exceeds 30 with probability ~1.4e-6
CHI2_3DOF_BOUND = 30.0


def draw_many(params_for_row, logits_row, rows, sampler_seed=0):
    """One token per row from `rows` requests sharing `logits_row`; params_for_row(i) -> params."""
    sampler = Sampler(logits_row.numel(), "cpu", seed=sampler_seed)
    ids = [f"r{i}" for i in range(rows)]
    for i, rid in enumerate(ids):
        sampler.add_request(rid, params_for_row(i), [0])
    return sampler.sample(ids, logits_row.expand(rows, -1), eos_token_id=None).token_ids


def chi_square(tokens, probs):
    expected = len(tokens) * np.asarray(probs)
    observed = np.bincount(tokens, minlength=len(probs))
    return float(((observed - expected) ** 2 / expected).sum())


def test_unseeded_frequencies_follow_softmax_of_logits_over_temperature():
    logits = torch.tensor([1.0, 0.0, -0.5, 0.7])
    probs = torch.softmax(logits / 0.7, -1).numpy()
    tokens = draw_many(lambda i: SamplingParams(temperature=0.7), logits, rows=4000, sampler_seed=123)
    assert chi_square(tokens, probs) < CHI2_3DOF_BOUND


def test_seeded_rows_follow_the_same_distribution():
    logits = torch.tensor([0.3, -1.0, 0.0, 1.2])
    probs = torch.softmax(logits / 1.3, -1).numpy()
    tokens = draw_many(lambda i: SamplingParams(temperature=1.3, seed=i), logits, rows=4000)
    assert chi_square(tokens, probs) < CHI2_3DOF_BOUND


def test_top_k_renormalises_over_the_kept_tokens():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.4, -1.0])
    tokens = draw_many(lambda i: SamplingParams(top_k=2), logits, rows=3000, sampler_seed=5)
    assert set(tokens.tolist()) <= {0, 1}
    p0 = math.exp(2.0) / (math.exp(2.0) + math.exp(1.0))
    # binomial standard deviation ~0.008: 0.04 is five of them
    assert abs((tokens == 0).mean() - p0) < 0.04


# Truncation never samples outside the allowed set.

finite_logit = st.floats(min_value=-20, max_value=20, allow_nan=False, width=32)
logit_rows = st.lists(st.one_of(finite_logit, st.just(-math.inf)), min_size=2, max_size=40)


@st.composite
def truncation_cases(draw):
    logits = draw(logit_rows.filter(lambda xs: any(math.isfinite(x) for x in xs)))
    vocab = len(logits)
    params = SamplingParams(
        temperature=draw(st.floats(min_value=0.05, max_value=3.0)),
        top_k=draw(st.one_of(st.just(0), st.just(-1), st.integers(min_value=1, max_value=vocab + 2))),
        top_p=draw(st.one_of(st.just(1.0), st.floats(min_value=0.01, max_value=1.0))),
        min_p=draw(st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=1.0))),
    )
    return logits, params


@settings(max_examples=120, deadline=None, derandomize=True)
@given(truncation_cases())
def test_truncation_never_samples_outside_the_allowed_set(case):
    logits_list, params = case
    logits = torch.tensor(logits_list, dtype=torch.float32)
    tokens = draw_many(lambda i: params, logits, rows=32)

    # Each rule on its own gives a necessary condition for a sampled token, tie-robust.
    scaled = (logits / torch.tensor(params.temperature, dtype=torch.float32)).double().numpy()
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    for token in tokens:
        x = scaled[token]
        assert math.isfinite(x), "sampled a masked (-inf) token"
        if params.top_k > 0:
            assert (scaled > x).sum() < params.top_k, "outside top_k"
        if params.top_p < 1.0:
            # top_p after top_k only removes more tokens, so the full distribution gives a bound.
            assert probs[scaled > x].sum() < params.top_p + 1e-5, "outside top_p"
        if params.min_p > 0.0:
            assert x >= scaled.max() + math.log(params.min_p) - 1e-3, "below min_p"


# Seeds


def logits_for_steps(vocab, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(vocab, generator=gen) * 0.5 for _ in range(steps)]


SEEDED = SamplingParams(temperature=0.9, top_p=0.97, min_p=0.01, seed=42, frequency_penalty=0.2)


def run_alone(params, steps_logits, prompt=(0,), sampler_seed=0):
    sampler = Sampler(steps_logits[0].numel(), "cpu", seed=sampler_seed)
    sampler.add_request("x", params, prompt)
    return [int(sampler.sample(["x"], step[None], None).token_ids[0]) for step in steps_logits]


def test_a_seed_gives_the_same_tokens_whatever_else_is_in_the_batch():
    steps = logits_for_steps(64, 20)
    alone = run_alone(SEEDED, steps)

    sampler = Sampler(64, "cpu", seed=99)
    others = {
        "greedy": SamplingParams(temperature=0),
        "topk": SamplingParams(top_k=3),  # forces the sort path for the whole batch
        "penal": SamplingParams(repetition_penalty=1.4, logprobs=3),
        "seeded": SamplingParams(seed=7),
    }
    for rid, params in others.items():
        sampler.add_request(rid, params, [1, 2])
    sampler.add_request("x", SEEDED, [0])
    rng = np.random.default_rng(0)
    together = []
    for n, step in enumerate(steps):
        batch = ["x", *rng.choice(list(others), size=n % 5, replace=False)]
        rng.shuffle(batch)
        logits = torch.stack([step if rid == "x" else torch.randn(64) for rid in batch])
        out = sampler.sample(batch, logits, eos_token_id=None)
        together.append(int(out.token_ids[batch.index("x")]))
    assert together == alone


def test_a_seed_does_not_depend_on_the_samplers_own_seed():
    steps = logits_for_steps(64, 10)
    assert run_alone(SEEDED, steps, sampler_seed=1) == run_alone(SEEDED, steps, sampler_seed=2)


def test_the_samplers_seed_reproduces_unseeded_requests():
    steps = logits_for_steps(64, 10)
    unseeded = SamplingParams(temperature=1.0)
    assert run_alone(unseeded, steps, sampler_seed=3) == run_alone(unseeded, steps, sampler_seed=3)
    assert run_alone(unseeded, steps, sampler_seed=3) != run_alone(unseeded, steps, sampler_seed=4)


def test_different_seeds_give_different_sequences_on_a_flat_distribution():
    flat = [torch.zeros(1000)] * 20
    runs = [tuple(run_alone(SamplingParams(seed=s), flat)) for s in range(10)]
    assert len(set(runs)) == len(runs)
    assert all(len(set(r)) > 1 for r in runs)


def test_readmission_with_outputs_continues_the_same_stream():
    steps = logits_for_steps(32, 20, seed=5)
    params = SamplingParams(
        temperature=1.1,
        seed=2024,
        repetition_penalty=1.3,
        presence_penalty=0.5,
        min_tokens=12,
        stop_token_ids=(3,),
    )
    uninterrupted = run_alone(params, steps, prompt=(4, 5, 6))

    sampler = Sampler(32, "cpu", seed=1)
    sampler.add_request("x", params, [4, 5, 6])
    before = [int(sampler.sample(["x"], s[None], None).token_ids[0]) for s in steps[:8]]
    sampler.remove_request("x")
    sampler.add_request("x", params, [4, 5, 6], output_token_ids=before)
    after = [int(sampler.sample(["x"], s[None], None).token_ids[0]) for s in steps[8:]]
    assert before + after == uninterrupted


def test_position_seeds_are_64_bit_and_distinct():
    values = {position_seed(seed, pos) for seed in (0, 1, 2**63 - 1) for pos in range(100)}
    assert len(values) == 300
    assert all(0 <= v < 2**64 for v in values)
