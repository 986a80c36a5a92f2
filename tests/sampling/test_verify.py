"""Sampler.verify_on_device: greedy drafts checked against the target, rejection sampling exactly.

Shapes: B requests, J positions per request (its drafts + 1), V.
"""

import re

import numpy as np
import pytest
import torch

from nmoe_serve.sampling import Sampler, SamplingParams, VerifyOutput
from nmoe_serve.sampling.sampler import DeviceVerify

GREEDY = SamplingParams(temperature=0.0)

# The 0.999 quantile of chi-square with 24 degrees of freedom (5 x 5 cells - 1): a correct
# sampler exceeds it with probability 1e-3 (alpha), for a seed drawn at random.
CHI2_24DOF_ALPHA_1E3 = 51.179


def make_sampler(vocab_size, params_by_id, seed=0):
    sampler = Sampler(vocab_size, torch.device("cpu"), seed=seed)
    for request_id, params in params_by_id.items():
        sampler.add_request(request_id, params, [0])
    return sampler


def verify(sampler, ids, logits, drafts, eos_token_id=None):
    """verify_on_device on [B, J, V] logits and [B, J-1] drafts, then to_host and advance."""
    out = sampler.verify_on_device(ids, logits.reshape(-1, logits.shape[-1]), drafts, eos_token_id).to_host()
    sampler.advance(ids, out.num_emitted)
    return out


def emitted(out):
    return [out.token_ids[b, : out.num_emitted[b]].tolist() for b in range(len(out.num_emitted))]


def sequential(params_by_id, logits, drafts, eos_token_id=None, seed=0):
    """The tokens of non-speculative `sample` calls, one position after the other, each seeing the
    previous one's token, until a token differs from its draft (the verify's emitted tokens)."""
    reference = make_sampler(logits.shape[-1], params_by_id, seed=seed)
    tokens = []
    for b, request_id in enumerate(params_by_id):
        row = []
        for j in range(logits.shape[1]):
            token = int(reference.sample([request_id], logits[b, j][None], eos_token_id).token_ids[0])
            row.append(token)
            if j == drafts.shape[1] or token != drafts[b, j]:
                break
        tokens.append(row)
    return tokens


# Greedy


def test_right_drafts_are_all_accepted_and_wrong_ones_emit_the_targets_argmax():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 4, 20, generator=gen)  # [B, J, V]
    argmax = logits.argmax(-1)  # [B, J]
    drafts = argmax[:, :3].clone()  # [B, J-1], right by construction
    drafts[1, 0] = (argmax[1, 0] + 1) % 20  # wrong at the first draft
    drafts[2, 1] = (argmax[2, 1] + 1) % 20  # right, then wrong
    drafts[3, 2] = (argmax[3, 2] + 1) % 20  # wrong only at the last
    ids = ["all", "none", "one", "two"]
    sampler = make_sampler(20, dict.fromkeys(ids, GREEDY))
    out = verify(sampler, ids, logits, drafts)
    assert isinstance(out, VerifyOutput)
    assert out.token_ids.shape == (4, 4) and out.token_ids.dtype == np.int64
    np.testing.assert_array_equal(out.num_emitted, [4, 1, 2, 3])
    np.testing.assert_array_equal(out.token_ids, argmax.numpy())
    assert out.logprobs is None and out.top_token_ids is None and out.num_top is None
    assert [sampler.num_outputs(rid) for rid in ids] == [4, 1, 2, 3]


def test_an_all_greedy_batch_takes_the_argmax_path(monkeypatch):
    def general_path(*args):
        raise AssertionError("the all-greedy batch went through the general path")

    sampler = make_sampler(8, {"a": GREEDY, "b": GREEDY})
    monkeypatch.setattr(sampler, "_sample_rows", general_path)
    logits = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))  # [B, J, V]
    out = verify(sampler, ["a", "b"], logits, logits.argmax(-1)[:, :2])
    np.testing.assert_array_equal(out.num_emitted, [3, 3])


def test_one_draft_and_an_empty_batch():
    logits = torch.tensor([[[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]]])  # [B=1, J=2, V=3]
    sampler = make_sampler(3, {"a": GREEDY})
    out = verify(sampler, ["a"], logits, torch.tensor([[1]]))
    assert emitted(out) == [[1, 0]]
    out = verify(sampler, [], torch.zeros(0, 2, 3), torch.zeros(0, 1, dtype=torch.int64))
    assert out.token_ids.shape == (0, 2) and out.num_emitted.shape == (0,)


# Seeded sampling: verify emits the tokens of sequential sample calls


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.7),
        SamplingParams(temperature=1.3, top_k=4),
        SamplingParams(temperature=1.0, top_p=0.8),
        SamplingParams(temperature=0.9, min_p=0.2),
        SamplingParams(temperature=1.1, top_k=6, top_p=0.9, min_p=0.05),
    ],
)
def test_seeded_verify_emits_the_tokens_of_sequential_sample_calls(params):
    gen = torch.Generator().manual_seed(2)
    rows, width, vocab = 24, 4, 12
    logits = 2.0 * torch.randn(rows, width, vocab, generator=gen)  # [B, J, V]
    drafts = logits.argmax(-1)[:, :-1]  # [B, J-1]: often, not always, what the target samples
    params_by_id = {f"r{b}": params.with_seed(1000 + b) for b in range(rows)}
    ids = list(params_by_id)
    out = verify(make_sampler(vocab, params_by_id), ids, logits, drafts)
    assert emitted(out) == sequential(params_by_id, logits, drafts)
    assert 1 in out.num_emitted and (out.num_emitted > 2).any()  # both rejections and acceptances


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 3, 10, generator=gen)  # [B, J, V]
    drafts = logits.argmax(-1)[:, :-1]
    params_by_id = {"a": SamplingParams(temperature=1.0, seed=7), "b": SamplingParams(), "c": GREEDY}
    together = verify(make_sampler(10, params_by_id), list(params_by_id), logits, drafts)
    alone = verify(make_sampler(10, {"a": params_by_id["a"]}, seed=99), ["a"], logits[:1], drafts[:1])
    assert emitted(together)[0] == emitted(alone)[0]


# Penalties and min_tokens see the drafts as outputs


def test_frequency_penalty_counts_the_drafts_at_later_positions():
    # Token 2 leads token 3 by 1.0 everywhere: a penalty of 0.6 per occurrence flips it after two.
    logits = torch.tensor([0.0, 0.0, 2.0, 1.0, 0.0, 0.0]).expand(1, 4, 6)  # [B, J, V]
    drafts = torch.tensor([[2, 2, 2]])
    params_by_id = {"a": SamplingParams(temperature=0.0, frequency_penalty=0.6)}
    sampler = make_sampler(6, params_by_id)
    out = verify(sampler, ["a"], logits, drafts)
    assert emitted(out) == [[2, 2, 3]] == sequential(params_by_id, logits, drafts)
    # the device counts hold the emitted tokens only, not the sample past the rejection
    counts = sampler._tables.counts[sampler._requests["a"].slot]
    np.testing.assert_array_equal(counts.numpy(), [0, 0, 2, 1, 0, 0])


def test_penalties_at_a_temperature_match_sequential_sample_calls():
    gen = torch.Generator().manual_seed(4)
    rows, width, vocab = 16, 4, 8
    logits = 3.0 * torch.randn(rows, width, vocab, generator=gen)  # [B, J, V]
    drafts = logits.argmax(-1)[:, :-1]
    penalties = [
        {"repetition_penalty": 1.8},
        {"frequency_penalty": 0.9},
        {"presence_penalty": 1.2},
        {"repetition_penalty": 0.7, "frequency_penalty": 0.4, "presence_penalty": -0.5},
    ]
    params_by_id = {
        f"r{b}": SamplingParams(temperature=0.8, seed=b, **penalties[b % 4]) if b % 3 else GREEDY
        for b in range(rows)
    }
    out = verify(make_sampler(vocab, params_by_id), list(params_by_id), logits, drafts)
    assert emitted(out) == sequential(params_by_id, logits, drafts)


def test_min_tokens_masks_eos_and_stop_ids_until_the_position_reaches_it():
    eos, stop = 0, 1
    logits = torch.tensor([5.0, 4.0, 3.0, 0.0]).expand(2, 4, 4)  # [B, J, V]: eos, then stop, lead
    drafts = torch.tensor([[2, 2, 2], [2, 3, 3]])
    params_by_id = {
        "two": SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(stop,)),
        "hot": SamplingParams(temperature=0.5, min_tokens=3, stop_token_ids=(stop,), seed=5),
    }
    out = verify(make_sampler(4, params_by_id), list(params_by_id), logits, drafts, eos)
    assert emitted(out)[0] == [2, 2, eos]
    assert emitted(out) == sequential(params_by_id, logits, drafts, eos)


def test_min_tokens_counts_the_outputs_already_advanced():
    logits = torch.tensor([5.0, 0.0, 3.0]).expand(1, 3, 3)  # [B, J, V]
    sampler = make_sampler(3, {"a": SamplingParams(temperature=0.0, min_tokens=3)})
    assert emitted(verify(sampler, ["a"], logits, torch.tensor([[2, 2]]), eos_token_id=0)) == [[2, 2, 2]]
    assert emitted(verify(sampler, ["a"], logits, torch.tensor([[2, 2]]), eos_token_id=0)) == [[0]]


# Distribution: emitted tokens follow the target exactly (statistical, deterministic seeds)


def transition_matrix(vocab):
    """The test's 'target model': P[a, t], the probability of token t after token a."""
    gen = torch.Generator().manual_seed(11)
    return torch.softmax(0.8 * torch.randn(vocab, vocab, generator=gen, dtype=torch.float64), -1)


def first_two_tokens_chi_square(accept_rule_broken):
    """Chi-square of the first two output tokens after token 0 against P[0, t1] P[t1, t2].

    Each of N independent runs is one verify with two drafts d1 = f(0), d2 = f(d1) from a
    deterministic f unlike the target (so acceptance is partial). Its first output token is the
    sample at position 0; the second is the sample at position 1 when the verify emitted it, else
    a fresh draw from the target after the first (what the next step would sample). If verify is
    exact, (t1, t2) is distributed as the target's P[0, t1] P[t1, t2]: the null hypothesis.
    With `accept_rule_broken`, position 1's sample counts as emitted even after a rejection.
    """
    vocab, runs = 5, 20000
    probs = transition_matrix(vocab)  # [V, V]
    f = probs.argsort(dim=-1, descending=True)[:, 1].tolist()  # the draft model: the target's runner-up
    d1 = f[0]
    d2 = f[d1]
    logits = probs[[0, d1, d2]].log().float().expand(runs, 3, vocab)  # [B, J, V]
    drafts = torch.tensor([[d1, d2]]).expand(runs, 2)
    ids = [f"r{b}" for b in range(runs)]
    sampler = make_sampler(vocab, dict.fromkeys(ids, SamplingParams()), seed=12)
    out = verify(sampler, ids, logits, drafts)
    assert 0.1 < (out.num_emitted >= 2).mean() < 0.9  # acceptance is partial
    first = out.token_ids[:, 0]
    fresh = torch.multinomial(probs[first], 1, generator=torch.Generator().manual_seed(13))[:, 0].numpy()
    second_emitted = out.num_emitted >= 2
    if accept_rule_broken:
        second_emitted = np.ones(runs, dtype=bool)
    second = np.where(second_emitted, out.token_ids[:, 1], fresh)
    observed = np.bincount(first * vocab + second, minlength=vocab * vocab)
    expected = runs * (probs[0][:, None] * probs).reshape(-1).numpy()  # [V·V], P[0, t1] P[t1, t2]
    assert expected.min() > 5  # the chi-square approximation holds
    return float(((observed - expected) ** 2 / expected).sum())


def test_emitted_tokens_follow_the_targets_joint_distribution():
    assert first_two_tokens_chi_square(accept_rule_broken=False) < CHI2_24DOF_ALPHA_1E3


def test_the_distribution_test_detects_a_broken_acceptance_rule():
    assert first_two_tokens_chi_square(accept_rule_broken=True) > CHI2_24DOF_ALPHA_1E3


# Logprobs per position


def test_logprobs_are_of_the_raw_logits_at_every_position():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(3, 3, 10, generator=gen)  # [B, J, V]
    drafts = logits.argmax(-1)[:, :-1]
    params_by_id = {
        "a": SamplingParams(temperature=0.0, logprobs=3, repetition_penalty=1.5),
        "b": GREEDY,
        "c": SamplingParams(temperature=1.0, logprobs=1, seed=3),
    }
    out = verify(make_sampler(10, params_by_id), list(params_by_id), logits, drafts)
    raw = logits.log_softmax(-1)  # [B, J, V]
    assert out.logprobs.shape == (3, 3) and out.top_token_ids.shape == (3, 3, 3)
    np.testing.assert_array_equal(out.num_top, [3, -1, 1])
    for b in (0, 2):
        chosen = raw[b].gather(1, torch.as_tensor(out.token_ids[b])[:, None])[:, 0]
        np.testing.assert_allclose(out.logprobs[b], chosen.numpy(), rtol=1e-6)
        top_logprobs, top_ids = raw[b].topk(int(out.num_top[b]), dim=-1)
        n = int(out.num_top[b])
        np.testing.assert_array_equal(out.top_token_ids[b, :, :n], top_ids.numpy())
        np.testing.assert_allclose(out.top_logprobs[b, :, :n], top_logprobs.numpy(), rtol=1e-6)
    assert np.isnan(out.logprobs[1]).all() and (out.top_token_ids[1] == -1).all()
    assert (out.top_token_ids[2, :, 1:] == -1).all() and np.isnan(out.top_logprobs[2, :, 1:]).all()


# advance and misuse


def test_advance_moves_num_outputs_by_num_emitted_and_sample_goes_on_from_there():
    logits = torch.tensor([0.0, 1.0, 0.0]).expand(2, 3, 3)  # [B, J, V]
    sampler = make_sampler(3, {"a": GREEDY, "b": GREEDY})
    device_verify = sampler.verify_on_device(
        ["a", "b"], logits.reshape(-1, 3), torch.tensor([[1, 1], [0, 1]]), None
    )
    assert isinstance(device_verify, DeviceVerify)
    assert sampler.num_outputs("a") == 0  # not before advance
    out = device_verify.to_host()
    sampler.advance(["a", "b"], out.num_emitted)
    assert (sampler.num_outputs("a"), sampler.num_outputs("b")) == (3, 1)
    sampler.sample(["a", "b"], logits[:, 0], None)
    assert (sampler.num_outputs("a"), sampler.num_outputs("b")) == (4, 2)


def test_a_request_is_refused_until_its_verify_is_advanced():
    logits = torch.zeros(2, 4)
    sampler = make_sampler(4, {"a": GREEDY, "b": GREEDY})
    sampler.verify_on_device(["a"], logits, torch.tensor([[1]]), None)
    not_advanced = re.escape("request 'a' has a verify not yet advanced; call Sampler.advance")
    with pytest.raises(ValueError, match=r"Sampler\.sample: " + not_advanced):
        sampler.sample(["a"], logits[:1], None)
    with pytest.raises(ValueError, match=r"Sampler\.verify_on_device: " + not_advanced):
        sampler.verify_on_device(["a"], logits, torch.tensor([[1]]), None)
    with pytest.raises(ValueError, match=re.escape("num_emitted=3 of request 'a' is outside [1, 2]")):
        sampler.advance(["a"], np.array([3]))
    with pytest.raises(ValueError, match=re.escape("num_emitted must be [1] integers")):
        sampler.advance(["a"], np.array([1.0]))
    with pytest.raises(ValueError, match="request 'b' has no verify to advance"):
        sampler.advance(["a", "b"], np.array([1, 1]))
    assert sampler.num_outputs("a") == 0  # a refused advance changes nothing
    sampler.advance(["a"], np.array([2]))
    with pytest.raises(ValueError, match="request 'a' has no verify to advance"):
        sampler.advance(["a"], np.array([1]))
    sampler.remove_request("a")  # a request can leave with a verify pending, too
    sampler.verify_on_device(["b"], logits, torch.tensor([[1]]), None)
    sampler.remove_request("b")
    assert len(sampler) == 0


def test_malformed_inputs_are_refused_with_what_was_expected():
    sampler = make_sampler(4, {"a": GREEDY, "b": GREEDY})
    logits = torch.zeros(4, 4)
    with pytest.raises(ValueError, match=re.escape("draft_token_ids have shape (2, 0), expected (2, J-1)")):
        sampler.verify_on_device(["a", "b"], torch.zeros(2, 4), torch.zeros(2, 0, dtype=torch.int64), None)
    with pytest.raises(ValueError, match=re.escape("draft_token_ids have shape (2,), expected (2, J-1)")):
        sampler.verify_on_device(["a", "b"], logits, torch.zeros(2, dtype=torch.int64), None)
    with pytest.raises(
        ValueError,
        match=re.escape("draft_token_ids must be int64 on the logits' device cpu, got torch.int32"),
    ):
        sampler.verify_on_device(["a", "b"], logits, torch.zeros(2, 1, dtype=torch.int32), None)
    with pytest.raises(
        ValueError, match=re.escape("logits have shape (4, 4), expected (6, 4) (J=3 rows per")
    ):
        sampler.verify_on_device(["a", "b"], logits, torch.zeros(2, 2, dtype=torch.int64), None)
    with pytest.raises(ValueError, match=re.escape("appear more than once in the batch: ['a']")):
        sampler.verify_on_device(["a", "a"], logits, torch.zeros(2, 1, dtype=torch.int64), None)
    with pytest.raises(ValueError, match=re.escape("eos_token_id=4 is outside the vocabulary [0, 4)")):
        sampler.verify_on_device(["a", "b"], logits, torch.zeros(2, 1, dtype=torch.int64), 4)
    with pytest.raises(KeyError, match=r"Sampler\.verify_on_device: unknown request 'ghost'"):
        sampler.verify_on_device(["ghost"], logits[:2], torch.zeros(1, 1, dtype=torch.int64), None)
    assert sampler.num_outputs("a") == 0 and sampler._requests["a"].verify_width is None


@pytest.mark.parametrize(
    "params", [GREEDY, SamplingParams(temperature=1.0, frequency_penalty=0.5, logprobs=1)]
)
def test_draft_ids_outside_the_vocabulary_are_refused_when_the_tokens_reach_the_host(params):
    sampler = make_sampler(4, {"a": params, "b": params})
    device_verify = sampler.verify_on_device(
        ["a", "b"], torch.zeros(6, 4), torch.tensor([[0, 1], [2, 4]]), None
    )
    with pytest.raises(
        ValueError, match=re.escape("draft_token_ids of batch rows [1] hold ids outside the vocabulary")
    ):
        device_verify.to_host()
