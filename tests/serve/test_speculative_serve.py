"""The Serve application with MTP speculative decoding (EP 2, two draft tokens, steps one at a time)
on the CPU: completions, streamed and not, give the greedy text of the server without MTP, usage
counts every token, and the spec_decode metrics reach Ray's Prometheus endpoint."""

from __future__ import annotations

import json
import re
import time

import httpx
import pytest

from tests.serve.conftest import run_dev_server

pytestmark = pytest.mark.slow

MTP = {"ep_size": 2, "speculative_method": "mtp", "num_draft_tokens": 2, "overlap": False}


@pytest.fixture(scope="module")
def mtp_server(tmp_path_factory: pytest.TempPathFactory, progress):
    with run_dev_server(
        tmp_path_factory.mktemp("mtp"), progress, MTP
    ) as server:  # a short path: Ray's sockets
        yield server


def complete(client: httpx.Client, prompt: list[int], stream: bool) -> tuple[str, int]:
    """(text, completion tokens) of a greedy completion of 20 tokens."""
    body = {
        "model": "tiny-seed0", "prompt": prompt, "max_tokens": 20, "temperature": 0.0, "ignore_eos": True,
        "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {}),
    }  # fmt: skip
    if not stream:
        answer = client.post("/v1/completions", json=body)
        assert answer.status_code == 200, answer.text
        return answer.json()["choices"][0]["text"], answer.json()["usage"]["completion_tokens"]
    text, usage = "", 0
    with client.stream("POST", "/v1/completions", json=body) as answer:
        assert answer.status_code == 200
        for line in answer.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            text += "".join(c["text"] for c in chunk["choices"])
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
    return text, usage


def test_mtp_server_answers_with_the_greedy_text_of_the_server_without_it(mtp_server, dev_server) -> None:
    prompts = [[(7 * i + j) % 490 + 3 for j in range(10 + 13 * i)] for i in range(4)]
    with mtp_server.client() as spec, dev_server.client() as plain:
        for prompt in prompts:
            want, _ = complete(plain, prompt, stream=False)
            for stream in (False, True):
                text, tokens = complete(spec, prompt, stream)
                assert text == want and tokens == 20, (stream, text, want)
    deadline = time.monotonic() + 60
    name = "ray_nmoe_spec_decode_num_draft_tokens_total"
    while True:
        text = httpx.get(mtp_server.metrics_url, timeout=30).text
        drafted = sum(float(m.group(1)) for m in re.finditer(rf"^{name}{{[^}}]*}} (\S+)$", text, re.M))
        if drafted > 0:
            break
        assert time.monotonic() < deadline, "no speculative-decoding metrics exported"
        time.sleep(2)
    # the tiny random model's drafts are seldom accepted: its counter may not exist yet, the gauges do
    assert "ray_nmoe_spec_decode_num_drafts_total" in text
    assert (
        "ray_nmoe_spec_decode_acceptance_rate" in text and "ray_nmoe_spec_decode_mean_accepted_length" in text
    )
