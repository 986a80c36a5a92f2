"""SamplingParams: defaults, normalisation, and one refusal per field."""

import math
import pickle
import re

import pytest

from nmoe_serve.sampling import SamplingParams
from nmoe_serve.sampling.params import MAX_LOGPROBS


def test_defaults_are_valid_and_sample_at_temperature_one():
    params = SamplingParams()
    assert params.temperature == 1.0
    assert not params.greedy
    assert SamplingParams(temperature=0).greedy


def test_lists_become_tuples_and_a_single_stop_string_a_tuple():
    params = SamplingParams(stop="###", stop_token_ids=[3, 4])
    assert params.stop == ("###",)
    assert params.stop_token_ids == (3, 4)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


def test_params_are_frozen_and_survive_pickling():
    params = SamplingParams(temperature=0.5, top_k=4, stop=["x"], seed=3, logprobs=2)
    with pytest.raises(AttributeError):
        params.temperature = 1.0  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(params)) == params


def test_with_seed_replaces_only_the_seed():
    params = SamplingParams(temperature=0.3, top_p=0.5)
    seeded = params.with_seed(11)
    assert seeded.seed == 11
    assert seeded.with_seed(None) == params


def test_edges_of_each_range_are_accepted():
    SamplingParams(
        n=1,
        max_tokens=1,
        min_tokens=1,
        temperature=0.0,
        top_p=1.0,
        top_k=-1,
        min_p=1.0,
        seed=2**63 - 1,
        presence_penalty=-2.0,
        frequency_penalty=2.0,
        repetition_penalty=1e-3,
        logprobs=MAX_LOGPROBS,
    )
    SamplingParams(max_tokens=None, min_tokens=10**6, top_k=0, min_p=0.0, seed=0, logprobs=0)


INVALID = [
    ("n", 0),
    ("n", 1.5),
    ("n", True),
    ("max_tokens", 0),
    ("max_tokens", 2.0),
    ("min_tokens", -1),
    ("min_tokens", 0.5),
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "1"),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("top_p", math.nan),
    ("top_k", -2),
    ("top_k", 2.0),
    ("min_p", -0.01),
    ("min_p", 1.5),
    ("seed", -1),
    ("seed", 2**63),
    ("seed", 1.0),
    ("stop", ("ok", "")),
    ("stop", (3,)),
    ("stop_token_ids", (-1,)),
    ("stop_token_ids", ("2",)),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.01),
    ("presence_penalty", math.inf),
    ("frequency_penalty", -3),
    ("frequency_penalty", math.nan),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("logprobs", -1),
    ("logprobs", MAX_LOGPROBS + 1),
    ("logprobs", 1.0),
]


@pytest.mark.parametrize(("field", "value"), INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_each_field_refuses_bad_values_naming_field_and_value(field, value):
    with pytest.raises(ValueError, match=re.escape(f"SamplingParams.{field}={value!r} is invalid: ")):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_refused_with_the_limit():
    with pytest.raises(ValueError, match=r"SamplingParams\.min_tokens=5 is invalid: .*max_tokens=4"):
        SamplingParams(max_tokens=4, min_tokens=5)
