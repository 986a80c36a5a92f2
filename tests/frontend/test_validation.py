"""Request validation: one rule for the offline API and the ingress, the same rule the scheduler
applies when it queues a request."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nmoe_serve.engine.request import RequestRejected
from nmoe_serve.engine.scheduler import Scheduler, SchedulerLimits
from nmoe_serve.frontend.validation import InvalidRequest, check_request, check_token_ids
from nmoe_serve.sampling.params import SamplingParams

VOCAB, MAX_SEQ_LEN = 512, 64


def test_token_ids_must_be_ints_inside_the_vocabulary() -> None:
    assert check_token_ids([0, 5, 511], VOCAB) == [0, 5, 511]
    for bad in ([512], [-1], [True], [1.0], ["3"]):
        with pytest.raises(InvalidRequest, match=r"integers in \[0, 512\)") as e:
            check_token_ids(bad, VOCAB)
        assert e.value.param == "prompt"


def test_stop_token_ids_outside_the_vocabulary_are_refused_by_name() -> None:
    with pytest.raises(InvalidRequest) as e:
        check_request([[1, 2]], SamplingParams(stop_token_ids=(600,)), VOCAB, MAX_SEQ_LEN)
    assert e.value.param == "stop_token_ids" and "600" in str(e.value)


def test_context_refusals_name_the_field_to_change() -> None:
    with pytest.raises(InvalidRequest, match="lower max_tokens to at most 4") as e:
        check_request([[1] * 60], SamplingParams(max_tokens=10), VOCAB, MAX_SEQ_LEN)
    assert (e.value.param, e.value.code) == ("max_tokens", "context_length_exceeded")
    with pytest.raises(InvalidRequest, match="shorten the prompt") as e:
        check_request([[1] * 64], SamplingParams(max_tokens=None), VOCAB, MAX_SEQ_LEN)
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequest, match="empty") as e:
        check_request([[]], SamplingParams(), VOCAB, MAX_SEQ_LEN)
    assert e.value.param == "prompt"


@given(prompt_len=st.integers(0, 80), max_tokens=st.one_of(st.none(), st.integers(1, 80)))
def test_the_front_end_refuses_exactly_what_the_scheduler_would(
    prompt_len: int, max_tokens: int | None
) -> None:
    sampling = SamplingParams(max_tokens=max_tokens)
    limits = SchedulerLimits(1, 1000, 16, MAX_SEQ_LEN, 8, 64, 4, 0)
    try:
        check_request([[1] * prompt_len], sampling, VOCAB, MAX_SEQ_LEN)
        front_end = None
    except InvalidRequest as e:
        front_end = str(e)
    try:
        Scheduler(limits).add("r", [1] * prompt_len, sampling, frozenset())
        scheduler = None
    except RequestRejected as e:
        scheduler = str(e)
    assert front_end == scheduler
