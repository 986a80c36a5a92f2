"""OpenAI request bodies, their refusals, and how engine-side failures map to HTTP statuses."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from nmoe_serve.engine.coordinator import RequestFailed
from nmoe_serve.engine.request import RequestRejected
from nmoe_serve.serve.ingress import api_error
from nmoe_serve.serve.protocol import ChatCompletionRequest, CompletionRequest, Overloaded, validation_message


def refusal(model, body: dict) -> str:
    with pytest.raises(ValidationError) as e:
        model.model_validate(body)
    return validation_message(e.value.errors())[0]


def test_completion_maps_every_sampling_parameter() -> None:
    body = CompletionRequest.model_validate(
        {
            "prompt": "x",
            "max_tokens": 7,
            "temperature": 0.5,
            "top_p": 0.9,
            "n": 2,
            "stop": "\n",
            "seed": 3,
            "presence_penalty": 0.1,
            "frequency_penalty": 0.2,
            "logprobs": 2,
            "top_k": 5,
            "min_p": 0.1,
            "ignore_eos": True,
            "repetition_penalty": 1.1,
            "min_tokens": 1,
            "stop_token_ids": [9],
            "skip_special_tokens": False,
            "include_stop_str_in_output": True,
        }
    )
    p = body.sampling_params(body.max_tokens, body.logprobs)
    assert (p.max_tokens, p.temperature, p.top_p, p.n, p.stop, p.seed) == (7, 0.5, 0.9, 2, ("\n",), 3)
    assert (p.presence_penalty, p.frequency_penalty, p.logprobs, p.top_k, p.min_p) == (0.1, 0.2, 2, 5, 0.1)
    assert (p.ignore_eos, p.repetition_penalty, p.min_tokens, p.stop_token_ids) == (True, 1.1, 1, (9,))
    assert not p.skip_special_tokens and p.include_stop_str_in_output


def test_prompt_forms() -> None:
    assert CompletionRequest(prompt="a").prompts() == ["a"]
    assert CompletionRequest(prompt=[1, 2]).prompts() == [[1, 2]]
    assert CompletionRequest(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert CompletionRequest(prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]


@pytest.mark.parametrize(
    "body,pattern",
    [
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "n": 0}, "n:"),
        ({"prompt": "x", "extra": 1}, "extra: unknown parameter"),
        ({"prompt": "x", "echo": True}, "echo is not supported"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "logit_bias": {"1": 2.0}}, "logit_bias"),
        ({"prompt": []}, "empty list"),
        ({"prompt": "x", "stop": [""]}, "stop strings must not be empty"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "only allowed with stream"),
        ({"prompt": "x", "logprobs": 21}, "logprobs"),
        ({}, "prompt"),
    ],
)
def test_completion_refusals(body: dict, pattern: str) -> None:
    assert pattern in refusal(CompletionRequest, body)


@pytest.mark.parametrize(
    "body,pattern",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
        (
            {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            "tools are not supported",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "needs logprobs: true"),
        (
            {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
            "response_format",
        ),
    ],
)
def test_chat_refusals(body: dict, pattern: str) -> None:
    assert pattern in refusal(ChatCompletionRequest, body)


def test_chat_messages_and_limits() -> None:
    body = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "developer", "content": "d"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ],
            "max_completion_tokens": 5,
            "max_tokens": 9,
            "logprobs": True,
            "top_logprobs": 3,
        }
    )
    assert body.template_messages() == [{"role": "system", "content": "d"}, {"role": "user", "content": "ab"}]
    assert body.requested_max_tokens == 5 and body.requested_logprobs == 3


def test_engine_failures_map_to_statuses() -> None:
    from ray.serve.exceptions import BackPressureError

    assert api_error(RequestRejected("needs up to 9 KV pages"), 1).status == 400
    busy = api_error(Overloaded("12 waiting"), 2)
    assert (busy.status, busy.retry_after_s, busy.type) == (429, 2, "rate_limit_error")
    full = api_error(BackPressureError(num_queued_requests=5, max_queued_requests=5), 3)
    assert (full.status, full.retry_after_s) == (503, 3)
    failed = api_error(RequestFailed("request cmpl-7-0-0 failed: a rank of the engine failed"), 1, "cmpl-7")
    assert failed.status == 500 and failed.message == (
        "the engine failed while running request cmpl-7 and has restarted: retry the request"
    )
    internal = api_error(KeyError("secret detail"), 1, "cmpl-8")
    assert internal.status == 500 and "secret" not in internal.message and "cmpl-8" in internal.message


def test_json_depth_is_measured_without_recursion() -> None:
    from nmoe_serve.serve.ingress import json_depth

    assert json_depth({}) == 1 and json_depth({"a": [1, {"b": []}]}) == 4
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert json_depth(deep) == 100_001


def test_the_ingress_admits_the_groups_capacity_shared_among_replicas(dev_config_path) -> None:
    from nmoe_serve.config import ServeConfig
    from nmoe_serve.serve.ingress import inflight_bound
    from tests.helpers import resolve

    config = ServeConfig.from_toml(
        dev_config_path,
        overrides={"ep_size": 8, "max_waiting_requests": 4096, "ep_groups": 2, "ingress_replicas": 4},
    )
    settings = resolve(config)
    assert inflight_bound(settings, config.server) == 2 * (8 * 64 + 4096) // 4
    fixed = ServeConfig.from_toml(dev_config_path, overrides={"max_inflight_sequences": 7})
    assert inflight_bound(resolve(fixed), fixed.server) == 7


def test_the_ingress_replica_takes_refusals_beside_its_admitted_requests(dev_config_path) -> None:
    """Serve hands the replica up to 8 requests to refuse per admitted one, so refusals do not wait
    behind admitted streams, and the replica's health check tolerates a late event loop."""
    from nmoe_serve.config import ServeConfig
    from nmoe_serve.serve.ingress import Ingress
    from tests.helpers import resolve

    config = ServeConfig.from_toml(dev_config_path, overrides={"max_inflight_sequences": 100})
    options = Ingress.deployment_options(resolve(config), config.server)
    assert options["max_ongoing_requests"] == 900
    assert options["health_check_timeout_s"] >= 60


def test_admission_refuses_past_its_bound_with_retry_after() -> None:
    from nmoe_serve.serve.ingress import Admission
    from nmoe_serve.serve.protocol import APIError

    admission = Admission(bound=5, retry_after_s=3)
    assert admission.reserve(4) == 4
    admission.check(1)  # exactly at the bound: still admitted
    with pytest.raises(APIError) as refused:
        admission.reserve(2)
    assert refused.value.status == 503 and refused.value.code == "at_capacity"
    assert refused.value.retry_after_s == 3 and "4 completions in flight" in str(refused.value)
    assert admission.inflight == 4  # a refused reservation takes nothing
    admission.release(4)
    assert admission.reserve(5) == 5
