"""Sampler: greedy, penalties, min_tokens, logprobs, request state and validation."""

import re

import numpy as np
import pytest
import torch

from nmoe_serve.sampling import Sampler, SamplerOutput, SamplingParams
from nmoe_serve.sampling.sampler import apply_penalties

GREEDY = SamplingParams(temperature=0.0)


def make_sampler(vocab_size=16, **requests):
    """A Sampler on CPU with `requests` as name=params (prompt [0])."""
    sampler = Sampler(vocab_size, torch.device("cpu"), seed=0)
    for request_id, params in requests.items():
        sampler.add_request(request_id, params, [0])
    return sampler


def row(*values):
    return torch.tensor([values], dtype=torch.float32)


# Greedy and the batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_greedy_is_argmax_for_every_float_dtype(dtype):
    torch.manual_seed(0)
    logits = torch.randn(5, 50).to(dtype)
    sampler = make_sampler(50, **{f"r{i}": GREEDY for i in range(5)})
    out = sampler.sample([f"r{i}" for i in range(5)], logits, eos_token_id=1)
    assert isinstance(out, SamplerOutput)
    assert out.token_ids.dtype == np.int64
    np.testing.assert_array_equal(out.token_ids, logits.float().argmax(-1).numpy())
    assert out.logprobs is None and out.top_token_ids is None and out.top_logprobs is None
    assert out.num_top is None


def test_greedy_rows_mixed_with_sampled_rows_stay_argmax():
    torch.manual_seed(1)
    logits = torch.randn(6, 30)
    ids = [f"r{i}" for i in range(6)]
    hot = SamplingParams(temperature=1.5, top_k=10)
    sampler = make_sampler(30, **{rid: GREEDY if i % 2 else hot for i, rid in enumerate(ids)})
    out = sampler.sample(ids, logits, eos_token_id=None)
    np.testing.assert_array_equal(out.token_ids[1::2], logits[1::2].argmax(-1).numpy())


def test_tiny_temperature_is_greedy_not_an_overflow():
    logits = row(1.0, 3.0, 2.0)
    sampler = make_sampler(3, a=SamplingParams(temperature=1e-30))
    assert [sampler.sample(["a"], logits, None).token_ids[0] for _ in range(5)] == [1] * 5


def test_an_empty_batch_gives_empty_outputs():
    sampler = make_sampler(8, a=GREEDY)
    out = sampler.sample([], torch.zeros(0, 8), eos_token_id=3)
    assert out.token_ids.shape == (0,)
    assert sampler.num_outputs("a") == 0


def test_sample_leaves_the_callers_logits_untouched():
    torch.manual_seed(2)
    logits = torch.randn(2, 12)
    before = logits.clone()
    params = SamplingParams(
        temperature=0.8, top_k=3, top_p=0.8, min_p=0.1, repetition_penalty=2.0, min_tokens=2, logprobs=2
    )
    sampler = make_sampler(12, a=params, b=GREEDY)
    sampler.sample(["a", "b"], logits, eos_token_id=5)
    torch.testing.assert_close(logits, before, rtol=0, atol=0)


# Request state


def test_outputs_are_counted_per_request_and_readmission_starts_from_its_outputs():
    sampler = make_sampler(8, a=GREEDY, b=GREEDY)
    for _ in range(3):
        sampler.sample(["a"], torch.zeros(1, 8), None)
    sampler.sample(["b", "a"], torch.zeros(2, 8), None)
    assert sampler.num_outputs("a") == 4
    assert sampler.num_outputs("b") == 1
    sampler.add_request("c", GREEDY, [1, 2], output_token_ids=[3, 4, 5])
    assert sampler.num_outputs("c") == 3


def test_remove_forgets_the_request_and_its_id_can_come_back():
    sampler = make_sampler(8, a=GREEDY)
    assert "a" in sampler and len(sampler) == 1
    sampler.remove_request("a")
    assert "a" not in sampler and len(sampler) == 0
    sampler.add_request("a", GREEDY, [1])
    assert sampler.num_outputs("a") == 0


def test_a_reused_penalty_slot_starts_clean():
    penalized = SamplingParams(temperature=0.0, presence_penalty=2.0, repetition_penalty=3.0)
    sampler = Sampler(4, "cpu")
    for i in range(20):  # more than the tables start with, so they grow and slots are reused
        sampler.add_request(f"old{i}", penalized, [2], output_token_ids=[1, 1])
    for i in range(20):
        sampler.remove_request(f"old{i}")
    sampler.add_request("new", penalized, [3])
    # Tokens 1 (output) and 2 (prompt) were seen by the old requests only: no penalty for the new one.
    assert sampler.sample(["new"], row(0.5, 1.0, 0.0, 0.0), None).token_ids[0] == 1
    assert sampler.sample(["new"], row(0.5, 0.0, 1.0, 0.0), None).token_ids[0] == 2


# Penalties


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens_only():
    logits = row(2.0, -1.0, 2.0, -1.0, 0.5)
    counts = torch.tensor([[0, 0, 1, 0, 0]], dtype=torch.int32)
    prompt = torch.tensor([[False, True, False, False, False]])
    one, zero = torch.tensor([1.0]), torch.tensor([0.0])
    out = apply_penalties(logits, counts, prompt, torch.tensor([2.0]), zero, zero)
    torch.testing.assert_close(out, row(2.0, -2.0, 1.0, -1.0, 0.5))
    assert torch.equal(apply_penalties(logits, counts, prompt, one, zero, zero), logits)


def test_frequency_scales_with_the_count_and_presence_does_not():
    logits = row(1.0, 1.0, 1.0, 1.0)
    counts = torch.tensor([[0, 1, 3, 0]], dtype=torch.int32)
    prompt = torch.tensor([[False, False, False, True]])  # prompt tokens: repetition penalty only
    one, zero = torch.tensor([1.0]), torch.tensor([0.0])
    freq = apply_penalties(logits, counts, prompt, one, torch.tensor([0.5]), zero)
    torch.testing.assert_close(freq, row(1.0, 0.5, -0.5, 1.0))
    pres = apply_penalties(logits, counts, prompt, one, zero, torch.tensor([0.5]))
    torch.testing.assert_close(pres, row(1.0, 0.5, 0.5, 1.0))


def test_repetition_penalty_flips_greedy_away_from_a_prompt_token():
    sampler = Sampler(4, "cpu")
    sampler.add_request("pos", SamplingParams(temperature=0, repetition_penalty=2.0), [3])
    sampler.add_request("neg", SamplingParams(temperature=0, repetition_penalty=2.0), [3])
    sampler.add_request("off", GREEDY, [3])
    logits = torch.tensor([[0.0, 1.5, 0.0, 2.0], [-5.0, -1.5, -5.0, -1.0], [0.0, 1.5, 0.0, 2.0]])
    assert sampler.sample(["pos", "neg", "off"], logits, None).token_ids.tolist() == [1, 1, 3]


def test_repetition_penalty_covers_generated_tokens():
    sampler = Sampler(3, "cpu")
    sampler.add_request("a", SamplingParams(temperature=0, repetition_penalty=1.5), [0])
    logits = row(0.0, 3.0, 2.5)
    # 1 is generated, so 3.0 / 1.5 < 2.5; once 2 is generated too, both are divided and 1 wins again.
    assert [sampler.sample(["a"], logits, None).token_ids[0] for _ in range(3)] == [1, 2, 1]


@pytest.mark.parametrize(("count", "flips"), [(3, False), (4, True)])
def test_frequency_penalty_flips_greedy_once_the_count_is_high_enough(count, flips):
    sampler = Sampler(2, "cpu")
    sampler.add_request("a", SamplingParams(temperature=0, frequency_penalty=0.3), [], [0] * count)
    assert sampler.sample(["a"], row(2.0, 1.0), None).token_ids[0] == (1 if flips else 0)


@pytest.mark.parametrize("count", [1, 10])
def test_presence_penalty_is_the_same_for_any_count(count):
    sampler = Sampler(3, "cpu")
    sampler.add_request("small", SamplingParams(temperature=0, presence_penalty=0.3), [], [0] * count)
    sampler.add_request("large", SamplingParams(temperature=0, presence_penalty=1.5), [], [0] * count)
    logits = torch.tensor([[2.0, 1.0, 0.0]] * 2)
    assert sampler.sample(["small", "large"], logits, None).token_ids.tolist() == [0, 1]


def test_penalties_follow_a_float64_reference_over_many_steps():
    vocab, steps = 12, 15
    gen = torch.Generator().manual_seed(3)
    prompt = [1, 4, 4, 7]
    params = SamplingParams(
        temperature=0, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.25
    )
    sampler = Sampler(vocab, "cpu")
    sampler.add_request("a", params, prompt)
    counts = np.zeros(vocab)
    for _ in range(steps):
        logits = torch.randn(1, vocab, generator=gen) * 2
        ref = logits[0].double().numpy()
        seen = (counts > 0) | np.isin(np.arange(vocab), prompt)
        ref = np.where(seen, np.where(ref > 0, ref / 1.3, ref * 1.3), ref)
        ref = ref - 0.4 * counts - 0.25 * (counts > 0)
        token = sampler.sample(["a"], logits, None).token_ids[0]
        assert token == ref.argmax()
        counts[token] += 1


# min_tokens


def test_min_tokens_blocks_eos_and_stop_ids_until_reached():
    params = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=(2, 99))  # 99: outside vocab
    sampler = Sampler(5, "cpu")
    sampler.add_request("a", params, [0])
    logits = row(0.0, 1.0, 4.0, 0.0, 5.0)  # eos=4 then stop id 2 are the favourites
    tokens = [sampler.sample(["a"], logits, eos_token_id=4).token_ids[0] for _ in range(4)]
    assert tokens == [1, 1, 1, 4]


def test_min_tokens_counts_the_outputs_of_a_readmitted_request():
    sampler = Sampler(3, "cpu")
    sampler.add_request("a", SamplingParams(temperature=0, min_tokens=3), [0], output_token_ids=[1, 1])
    logits = row(0.0, 1.0, 9.0)
    assert [sampler.sample(["a"], logits, eos_token_id=2).token_ids[0] for _ in range(2)] == [1, 2]


def test_min_tokens_blocks_eos_when_sampling_at_a_temperature():
    sampler = Sampler(4, "cpu", seed=1)
    ids = [f"r{i}" for i in range(64)]
    for i, rid in enumerate(ids):
        sampler.add_request(rid, SamplingParams(min_tokens=2, seed=i if i % 2 else None), [0])
    logits = torch.tensor([[0.0, 0.0, 0.0, 3.0]]).repeat(64, 1)
    first = sampler.sample(ids, logits, eos_token_id=3).token_ids
    second = sampler.sample(ids, logits, eos_token_id=3).token_ids
    assert not (first == 3).any() and not (second == 3).any()
    assert (sampler.sample(ids, logits, eos_token_id=3).token_ids == 3).any()


def test_without_an_eos_id_min_tokens_blocks_only_stop_ids():
    sampler = Sampler(3, "cpu")
    sampler.add_request("a", SamplingParams(temperature=0, min_tokens=1, stop_token_ids=[1]), [0])
    assert sampler.sample(["a"], row(0.0, 9.0, 5.0), eos_token_id=None).token_ids[0] == 2


# Logprobs


def test_logprobs_are_of_the_raw_logits_with_sorted_top_alternatives():
    torch.manual_seed(4)
    logits = (torch.randn(3, 40) * 3).to(torch.bfloat16)
    sampler = Sampler(40, "cpu", seed=0)
    params = SamplingParams(
        temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.5, logprobs=4
    )
    sampler.add_request("a", params, [1, 2, 3])
    sampler.add_request("b", SamplingParams(temperature=0, presence_penalty=1.0, logprobs=2), [5], [7])
    sampler.add_request("c", GREEDY, [0])
    out = sampler.sample(["a", "b", "c"], logits, eos_token_id=0)

    ref = torch.log_softmax(logits.float(), dim=-1)
    assert out.logprobs.dtype == np.float32 and out.top_logprobs.dtype == np.float32
    assert out.top_token_ids.shape == (3, 4) and out.top_logprobs.shape == (3, 4)
    np.testing.assert_array_equal(out.num_top, [4, 2, -1])
    for i, k in [(0, 4), (1, 2)]:
        ref_top, ref_ids = ref[i].topk(k)
        np.testing.assert_array_equal(out.top_token_ids[i, :k], ref_ids.numpy())
        np.testing.assert_allclose(out.top_logprobs[i, :k], ref_top.numpy(), rtol=1e-6, atol=1e-6)
        assert np.all(np.diff(out.top_logprobs[i, :k]) <= 0)
        sampled = out.token_ids[i]
        np.testing.assert_allclose(out.logprobs[i], ref[i, sampled].item(), rtol=1e-6, atol=1e-6)
    # Entries a row did not ask for are padding, and a row that asked for nothing has none.
    assert out.top_token_ids[1, 2:].tolist() == [-1, -1]
    assert np.isnan(out.top_logprobs[1, 2:]).all()
    assert np.isnan(out.logprobs[2]) and (out.top_token_ids[2] == -1).all()


def test_sampled_logprob_is_right_when_the_token_is_not_among_the_top_alternatives():
    logits = row(3.0, 2.0, 1.0, 0.0)
    sampler = Sampler(4, "cpu")
    sampler.add_request("a", SamplingParams(temperature=0, repetition_penalty=10.0, logprobs=1), [0, 1])
    out = sampler.sample(["a"], logits, None)
    ref = torch.log_softmax(logits[0], dim=-1)
    assert out.token_ids[0] == 2
    assert out.top_token_ids[0].tolist() == [0]
    np.testing.assert_allclose(out.logprobs[0], ref[2].item(), rtol=1e-6)
    np.testing.assert_allclose(out.top_logprobs[0, 0], ref[0].item(), rtol=1e-6)


def test_logprobs_zero_gives_the_sampled_logprob_only_and_requests_above_vocab_are_capped():
    logits = row(0.0, 1.0, 2.0)
    sampler = Sampler(3, "cpu")
    sampler.add_request("zero", SamplingParams(temperature=0, logprobs=0), [0])
    out = sampler.sample(["zero"], logits, None)
    assert out.top_token_ids.shape == (1, 0) and out.num_top.tolist() == [0]
    np.testing.assert_allclose(out.logprobs, torch.log_softmax(logits[0], -1)[2:].numpy(), rtol=1e-6)

    sampler.add_request("many", SamplingParams(temperature=0, logprobs=10), [0])
    out = sampler.sample(["many"], logits, None)
    assert out.top_token_ids.tolist() == [[2, 1, 0]] and out.num_top.tolist() == [3]


# Validation


def test_logits_of_the_wrong_shape_are_refused_with_both_shapes():
    sampler = make_sampler(8, a=GREEDY, b=GREEDY)
    with pytest.raises(ValueError, match=re.escape("logits have shape (2, 9), expected (2, 8)")):
        sampler.sample(["a", "b"], torch.zeros(2, 9), None)
    with pytest.raises(ValueError, match=re.escape("logits have shape (1, 8), expected (2, 8)")):
        sampler.sample(["a", "b"], torch.zeros(1, 8), None)
    with pytest.raises(ValueError, match=re.escape("logits have shape (8,), expected (1, 8)")):
        sampler.sample(["a"], torch.zeros(8), None)


def test_logits_must_be_float_and_on_the_samplers_device():
    sampler = make_sampler(8, a=GREEDY)
    with pytest.raises(ValueError, match=re.escape("logits must be a float tensor, got torch.int64")):
        sampler.sample(["a"], torch.zeros(1, 8, dtype=torch.int64), None)
    with pytest.raises(ValueError, match="logits are on meta but the Sampler is on cpu"):
        sampler.sample(["a"], torch.zeros(1, 8, device="meta"), None)


def test_unknown_request_ids_are_named():
    sampler = make_sampler(8, a=GREEDY)
    with pytest.raises(KeyError, match=r"Sampler\.sample: unknown request 'ghost'"):
        sampler.sample(["a", "ghost"], torch.zeros(2, 8), None)
    with pytest.raises(KeyError, match=r"Sampler\.remove_request: unknown request 'ghost'"):
        sampler.remove_request("ghost")
    with pytest.raises(KeyError, match=r"Sampler\.num_outputs: unknown request 'ghost'"):
        sampler.num_outputs("ghost")
    assert sampler.num_outputs("a") == 0  # a failed sample changes nothing


def test_adding_a_request_twice_is_refused():
    sampler = make_sampler(8, a=GREEDY)
    with pytest.raises(ValueError, match="request 'a' is already tracked; remove it before adding it again"):
        sampler.add_request("a", GREEDY, [1])


def test_a_request_twice_in_one_batch_is_refused():
    sampler = make_sampler(8, a=GREEDY, b=GREEDY)
    with pytest.raises(ValueError, match=re.escape("appear more than once in the batch: ['a']")):
        sampler.sample(["a", "b", "a"], torch.zeros(3, 8), None)


def test_token_ids_outside_the_vocabulary_are_refused():
    sampler = Sampler(8, "cpu")
    with pytest.raises(
        ValueError,
        match=re.escape(
            "prompt_token_ids of request 'a' hold ids outside the vocabulary [0, 8): min 0, max 8"
        ),
    ):
        sampler.add_request("a", GREEDY, [0, 8])
    with pytest.raises(
        ValueError,
        match=re.escape("output_token_ids of request 'a' hold ids outside the vocabulary [0, 8): min -1"),
    ):
        sampler.add_request("a", GREEDY, [0], [-1])
    assert "a" not in sampler
    sampler.add_request("a", GREEDY, [0])
    with pytest.raises(ValueError, match=re.escape("eos_token_id=8 is outside the vocabulary [0, 8)")):
        sampler.sample(["a"], torch.zeros(1, 8), eos_token_id=8)


def test_params_must_be_sampling_params_and_vocab_size_positive():
    sampler = Sampler(8, "cpu")
    with pytest.raises(TypeError, match="params of request 'a' must be SamplingParams, got dict"):
        sampler.add_request("a", {"temperature": 0}, [0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Sampler vocab_size=0 is invalid: it must be an integer >= 1"):
        Sampler(0, "cpu")
