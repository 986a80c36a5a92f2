"""The malformed-request suite against the dev server: every case gets the status and the message
it should, in OpenAI's error shape, and the server keeps serving. A message names the request's
field (never an internal class) and what to do."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import httpx
import pytest

pytestmark = pytest.mark.slow

C, CHAT = "/v1/completions", "/v1/chat/completions"
OK = {"prompt": "hi", "max_tokens": 2}
USER = [{"role": "user", "content": "hi"}]


@dataclass(frozen=True)
class Case:
    name: str
    status: int
    message: str  # a regex the error message must match
    body: dict | list | str | bytes | None = None
    path: str = C
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)
    param: str | None = "-"  # "-": not checked


def completion(name: str, status: int, message: str, param: str | None = "-", **fields: object) -> Case:
    return Case(name, status, message, {**OK, **fields}, param=param)


def chat(name: str, status: int, message: str, param: str | None = "-", **fields: object) -> Case:
    return Case(name, status, message, {"messages": USER, "max_tokens": 2, **fields}, CHAT, param=param)


TYPE = "Input should be a valid"
PROMPT = "prompt: must be a string, a list of strings, a list of token ids"
CASES = [
    # ---- the body as bytes ----
    Case(
        "text content type",
        415,
        "must be JSON sent with 'Content-Type: application/json'",
        json.dumps(OK),
        headers={"content-type": "text/plain"},
    ),
    Case(
        "form content type",
        415,
        "not 'application/x-www-form-urlencoded'",
        "prompt=hi",
        headers={"content-type": "application/x-www-form-urlencoded"},
    ),
    Case("no content type", 415, "not 'none'", json.dumps(OK).encode(), headers={"content-type": ""}),
    Case("multipart", 415, "not 'multipart/form-data'", "x", headers={"content-type": "multipart/form-data"}),
    Case("truncated JSON", 400, "not valid JSON", b'{"prompt": "hi"'),
    Case("trailing comma", 400, "not valid JSON", b'{"prompt": "hi",}'),
    Case("single quotes", 400, "not valid JSON", b"{'prompt': 'hi'}"),
    Case("empty body", 400, "not valid JSON", b""),
    Case("not UTF-8", 400, "not valid JSON", b'{"prompt": "\xff\xfe"}'),
    Case("top-level array", 400, "must be a JSON object", b"[1, 2]"),
    Case("top-level string", 400, "must be a JSON object", b'"hi"'),
    Case("top-level number", 400, "must be a JSON object", b"3"),
    Case("top-level null", 400, "must be a JSON object", b"null"),
    Case("nested 100000 deep", 400, "nests deeper than 32 levels", b"[" * 100_000 + b"]" * 100_000),
    Case(
        "nested 40 deep",
        400,
        "nests deeper than 32 levels",
        b'{"prompt": ' + b"[" * 40 + b"1" + b"]" * 40 + b"}",
    ),
    Case("body over the limit", 413, "exceeds the limit of", b"x" * (17 * 2**20)),
    # ---- authentication ----
    Case("no API key", 401, "no API key was given", OK, headers={"Authorization": ""}),
    Case("wrong API key", 401, "the API key is not valid", OK, headers={"Authorization": "Bearer nope"}),
    Case(
        "key without Bearer", 401, "the API key is not valid", OK, headers={"Authorization": "test-key-1234"}
    ),
    # ---- routes and methods ----
    Case("GET completions", 405, "GET is not allowed on /v1/completions", None, C, "GET"),
    Case("PUT completions", 405, "PUT is not allowed on /v1/completions", OK, C, "PUT"),
    Case("DELETE chat", 405, "DELETE is not allowed on /v1/chat/completions", None, CHAT, "DELETE"),
    Case("POST models", 405, "POST is not allowed on /v1/models", OK, "/v1/models"),
    Case("POST health", 405, "POST is not allowed on /health", OK, "/health"),
    Case("embeddings", 404, "no route /v1/embeddings: see /openapi.json", OK, "/v1/embeddings"),
    Case("v2 path", 404, "no route /v2/completions", OK, "/v2/completions"),
    Case("root", 404, "no route /", None, "/", "GET"),
    # ---- completions: the prompt ----
    Case("no prompt", 400, "prompt: Field required", {"max_tokens": 2}, param="prompt"),
    completion("prompt null", 400, PROMPT, "prompt", prompt=None),
    completion("prompt number", 400, PROMPT, "prompt", prompt=1),
    completion("prompt bool", 400, PROMPT, "prompt", prompt=True),
    completion("prompt of bools", 400, PROMPT, "prompt", prompt=[True, False]),
    completion("prompt lists with a bool", 400, PROMPT, "prompt", prompt=[[1, True]]),
    completion("prompt of floats", 400, PROMPT, "prompt", prompt=[1.5]),
    completion("prompt of objects", 400, PROMPT, "prompt", prompt=[{"a": 1}]),
    completion("prompt three deep", 400, PROMPT, "prompt", prompt=[[[1]]]),
    completion("prompt mixed lists", 400, PROMPT, "prompt", prompt=[[1], "x"]),
    completion("empty prompt list", 400, "prompt must not be an empty list", prompt=[]),
    completion("empty inner prompt", 400, "the prompt is empty", "prompt", prompt=[[1, 2], []]),
    completion(
        "negative token id", 400, r"prompt token ids must be integers in \[0, 512\)", "prompt", prompt=[-1]
    ),
    completion(
        "token id past the vocabulary",
        400,
        r"in \[0, 512\) for this model; got \[512\]",
        "prompt",
        prompt=[512],
    ),
    completion("one bad id of many", 400, r"got \[99999\]", "prompt", prompt=[[1, 2], [3, 99999]]),
    completion("prompt fills the context", 400, "leaves no room to generate", "prompt", prompt=[5] * 2048),
    completion(
        "prompt plus max_tokens too long",
        400,
        "lower max_tokens to at most 48",
        "max_tokens",
        prompt=[5] * 2000,
        max_tokens=100,
    ),
    completion(
        "text too long to fit",
        400,
        r"prompt has \d+ bytes, more than this model's context of 2048 tokens",
        "prompt",
        prompt="hello " * 100_000,
    ),
    completion(
        "257 prompts",
        400,
        r"asks for 257 completions .*at most 256 per request",
        "prompt",
        prompt=[[1]] * 257,
    ),
    completion(
        "prompts times n",
        400,
        r"asks for 300 completions \(3 prompts × n = 100\)",
        "prompt",
        prompt=[[1], [2], [3]],
        n=100,
    ),
    # ---- completions: sampling fields ----
    completion("n string", 400, f"n: {TYPE} integer", "n", n="2"),
    completion("n zero", 400, "n: Input should be greater than or equal to 1", "n", n=0),
    completion("n 129", 400, "n: Input should be less than or equal to 128", "n", n=129),
    completion("n float", 400, f"n: {TYPE} integer", "n", n=1.5),
    completion("n bool", 400, f"n: {TYPE} integer", "n", n=True),
    completion(
        "max_tokens zero",
        400,
        "max_tokens: Input should be greater than or equal to 1",
        "max_tokens",
        max_tokens=0,
    ),
    completion(
        "max_tokens negative",
        400,
        "max_tokens: Input should be greater than or equal to 1",
        "max_tokens",
        max_tokens=-1,
    ),
    completion("max_tokens string", 400, f"max_tokens: {TYPE} integer", "max_tokens", max_tokens="16"),
    completion("max_tokens huge", 400, "exceeds the context limit of 2048", "max_tokens", max_tokens=10**9),
    completion(
        "temperature negative",
        400,
        "temperature: Input should be greater than or equal to 0",
        "temperature",
        temperature=-1,
    ),
    completion(
        "temperature 101",
        400,
        "temperature: Input should be less than or equal to 100",
        "temperature",
        temperature=101,
    ),
    completion("temperature string", 400, f"temperature: {TYPE} number", "temperature", temperature="1"),
    completion("temperature bool", 400, f"temperature: {TYPE} number", "temperature", temperature=True),
    completion("top_p zero", 400, "top_p: Input should be greater than 0", "top_p", top_p=0),
    completion("top_p 1.5", 400, "top_p: Input should be less than or equal to 1", "top_p", top_p=1.5),
    completion("top_k -2", 400, "top_k: Input should be greater than or equal to -1", "top_k", top_k=-2),
    completion("min_p 2", 400, "min_p: Input should be less than or equal to 1", "min_p", min_p=2),
    completion("seed negative", 400, "seed: Input should be greater than or equal to 0", "seed", seed=-1),
    completion("seed 2**63", 400, "seed: Input should be less than 9223372036854775808", "seed", seed=2**63),
    completion("seed string", 400, f"seed: {TYPE} integer", "seed", seed="7"),
    completion("stop number", 400, "stop: must be a string or a list of strings", "stop", stop=1),
    completion("stop list of numbers", 400, "stop: must be a string or a list of strings", "stop", stop=[1]),
    completion("stop empty string", 400, "stop strings must not be empty", "stop", stop=[""]),
    completion("17 stop strings", 400, "at most 16 stop strings", "stop", stop=[str(i) for i in range(17)]),
    completion("stop null inside", 400, "stop: must be a string or a list of strings", "stop", stop=[None]),
    completion("stream string", 400, f"stream: {TYPE} boolean", "stream", stream="yes"),
    completion("stream number", 400, f"stream: {TYPE} boolean", "stream", stream=1),
    completion(
        "stream_options without stream",
        400,
        "stream_options is only allowed with stream: true",
        stream_options={"include_usage": True},
    ),
    completion(
        "include_usage string",
        400,
        f"stream_options.include_usage: {TYPE} boolean",
        "stream_options.include_usage",
        stream=True,
        stream_options={"include_usage": "yes"},
    ),
    completion(
        "stream_options unknown key",
        400,
        "stream_options.extra: unknown parameter",
        "stream_options.extra",
        stream=True,
        stream_options={"extra": 1},
    ),
    completion("echo true", 400, "echo is not supported", echo=True),
    completion("echo number", 400, f"echo: {TYPE} boolean", "echo", echo=0),
    completion("best_of 2", 400, r"best_of is not supported \(only best_of == n\)", best_of=2),
    completion("logit_bias", 400, "logit_bias is not supported", logit_bias={"1": 2.0}),
    completion("suffix", 400, "suffix is not supported", suffix="x"),
    completion(
        "logprobs 21", 400, "logprobs: Input should be less than or equal to 20", "logprobs", logprobs=21
    ),
    completion(
        "logprobs negative",
        400,
        "logprobs: Input should be greater than or equal to 0",
        "logprobs",
        logprobs=-1,
    ),
    completion("logprobs bool", 400, f"logprobs: {TYPE} integer", "logprobs", logprobs=True),
    completion(
        "presence_penalty 3",
        400,
        "presence_penalty: Input should be less than or equal to 2",
        "presence_penalty",
        presence_penalty=3,
    ),
    completion(
        "frequency_penalty -3",
        400,
        "frequency_penalty: Input should be greater than or equal to -2",
        "frequency_penalty",
        frequency_penalty=-3,
    ),
    completion(
        "repetition_penalty zero",
        400,
        "repetition_penalty: Input should be greater than 0",
        "repetition_penalty",
        repetition_penalty=0,
    ),
    completion(
        "min_tokens negative",
        400,
        "min_tokens: Input should be greater than or equal to 0",
        "min_tokens",
        min_tokens=-1,
    ),
    completion(
        "stop_token_ids past the vocabulary",
        400,
        r"stop_token_ids token ids must be integers in \[0, 512\)",
        "stop_token_ids",
        stop_token_ids=[600],
    ),
    completion(
        "stop_token_ids strings",
        400,
        f"stop_token_ids.0: {TYPE} integer",
        "stop_token_ids.0",
        stop_token_ids=["1"],
    ),
    completion(
        "stop_token_ids number", 400, f"stop_token_ids: {TYPE} list", "stop_token_ids", stop_token_ids=5
    ),
    completion(
        "skip_special_tokens string",
        400,
        f"skip_special_tokens: {TYPE} boolean",
        "skip_special_tokens",
        skip_special_tokens="no",
    ),
    completion(
        "include_stop_str_in_output number",
        400,
        f"include_stop_str_in_output: {TYPE} boolean",
        "include_stop_str_in_output",
        include_stop_str_in_output=1,
    ),
    completion("ignore_eos string", 400, f"ignore_eos: {TYPE} boolean", "ignore_eos", ignore_eos="true"),
    completion(
        "unknown model",
        404,
        "the model 'gpt-4' does not exist; this server serves 'tiny-seed0'",
        "model",
        model="gpt-4",
    ),
    completion("model number", 400, f"model: {TYPE} string", "model", model=5),
    completion("user number", 400, f"user: {TYPE} string", "user", user=5),
    completion("unknown field", 400, "foo: unknown parameter", "foo", foo=1),
    completion(
        "two unknown fields", 400, "foo: unknown parameter; bar: unknown parameter", "foo", foo=1, bar=2
    ),
    # ---- chat ----
    Case("no messages", 400, "messages: Field required", {"max_tokens": 2}, CHAT, param="messages"),
    chat("messages empty", 400, "messages: List should have at least 1 item", "messages", messages=[]),
    chat("messages string", 400, f"messages: {TYPE} list", "messages", messages="hi"),
    chat("message not an object", 400, "messages.0: must be a JSON object", "messages.0", messages=["hi"]),
    chat("message without role", 400, "messages.0.role: Field required", "messages.0.role", messages=[{}]),
    chat(
        "unknown role",
        400,
        "messages.0.role: Input should be 'system', 'developer', 'user', 'assistant'",
        "messages.0.role",
        messages=[{"role": "robot", "content": "hi"}],
    ),
    chat(
        "tool role",
        400,
        "messages with role 'tool' are not supported: this server runs no tools",
        "messages.0.role",
        messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}],
    ),
    chat(
        "role number",
        400,
        "messages.0.role: Input should be 'system'",
        "messages.0.role",
        messages=[{"role": 5, "content": "hi"}],
    ),
    chat(
        "content number",
        400,
        "messages.0.content: must be a string, null, or a list of",
        "messages.0.content",
        messages=[{"role": "user", "content": 5}],
    ),
    chat(
        "image part",
        400,
        "messages.0.content: must be a string, null, or a list of",
        "messages.0.content",
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
    ),
    chat(
        "text part without text",
        400,
        "messages.0.content: must be a string, null, or a list of",
        "messages.0.content",
        messages=[{"role": "user", "content": [{"type": "text"}]}],
    ),
    chat(
        "max_completion_tokens zero",
        400,
        "max_completion_tokens: Input should be greater than or equal to 1",
        "max_completion_tokens",
        max_completion_tokens=0,
    ),
    chat("chat max_tokens string", 400, f"max_tokens: {TYPE} integer", "max_tokens", max_tokens="5"),
    chat("logprobs string", 400, f"logprobs: {TYPE} boolean", "logprobs", logprobs="yes"),
    chat("top_logprobs without logprobs", 400, "top_logprobs needs logprobs: true", top_logprobs=2),
    chat(
        "top_logprobs 21",
        400,
        "top_logprobs: Input should be less than or equal to 20",
        "top_logprobs",
        logprobs=True,
        top_logprobs=21,
    ),
    chat("tools", 400, "tools are not supported by this server", tools=[{"type": "function"}]),
    chat("tool_choice auto", 400, "tool_choice is not supported by this server", tool_choice="auto"),
    chat(
        "response_format json",
        400,
        "response_format.type: Input should be 'text'",
        "response_format.type",
        response_format={"type": "json_object"},
    ),
    chat(
        "add_generation_prompt string",
        400,
        f"add_generation_prompt: {TYPE} boolean",
        "add_generation_prompt",
        add_generation_prompt="no",
    ),
    chat("chat n zero", 400, "n: Input should be greater than or equal to 1", "n", n=0),
    chat(
        "chat text too long",
        400,
        r"the text of messages has \d+ bytes",
        "messages",
        messages=[{"role": "user", "content": "hello " * 100_000}],
    ),
    chat(
        "chat too long for the context",
        400,
        "exceeds the context limit of 2048 tokens",
        "max_tokens",
        max_tokens=2047,
    ),
    chat("chat unknown field", 400, "functions: unknown parameter", "functions", functions=[]),
    chat("chat unknown model", 404, "the model 'other' does not exist", "model", model="other"),
]


def send(server, case: Case) -> httpx.Response:
    headers = {
        "Authorization": f"Bearer {server.api_key}",
        "content-type": "application/json",
        **case.headers,
    }
    headers = {k: v for k, v in headers.items() if v}
    body = case.body
    content = (
        body
        if isinstance(body, bytes)
        else body.encode()
        if isinstance(body, str)
        else (None if body is None else json.dumps(body).encode())
    )
    return httpx.request(
        case.method, f"{server.url}{case.path}", content=content, headers=headers, timeout=120
    )


def test_the_suite_is_large_and_its_names_unique() -> None:
    assert len(CASES) >= 100 and len({c.name for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_malformed_request(dev_server, case: Case) -> None:
    response = send(dev_server, case)
    assert response.status_code == case.status, response.text[:2000]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert re.search(case.message, error["message"]), error["message"]
    if case.param != "-":
        assert error["param"] == case.param, error
    assert not re.search(
        r"Traceback|pydantic|list\[|function-|\bstr\b|TextPart|ChatMessage", error["message"]
    )


def test_the_server_serves_after_the_suite(dev_server) -> None:
    response = send(dev_server, Case("ok", 200, "", OK))
    assert response.status_code == 200 and response.json()["choices"][0]["finish_reason"] == "length"
