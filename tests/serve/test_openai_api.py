"""`serve run deployments/dev.yaml` driven by the official openai client, plus every error status."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest

from nmoe_serve.model.tiny import cached_tiny_checkpoint
from nmoe_serve.tokenizer import Tokenizer
from tests.serve.conftest import DEFAULT_MAX_TOKENS, MAX_WAITING, REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(dev_server) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{dev_server.url}/v1", api_key=dev_server.api_key, max_retries=0, timeout=120
    )


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained(cached_tiny_checkpoint(seed=0))


def test_health_answers_at_once_while_starting(dev_server) -> None:
    """From the ingress's first answer on, /health answered every poll of the start-up (5 s
    timeout each): 503 {"status": "starting"} with Retry-After while the group started, then 200
    ok. (Before the ingress replica exists, Serve's proxy answers in plain text.)"""
    seen = dev_server.startup_health
    assert seen and seen[-1] == ("200", (None, {"status": "ok"})), seen
    ours = next(i for i, s in enumerate(seen) if isinstance(s[1], tuple) and isinstance(s[1][1], dict))
    assert all(s == ("503", ("5", {"status": "starting"})) for s in seen[ours:-1]), seen
    assert all(s[0] != "no answer" for s in seen), seen


def test_requests_without_max_tokens_take_the_defaults(dev_server) -> None:
    """Chat takes [server] default_max_tokens; completions keep OpenAI's 16."""
    chat = _post(
        dev_server,
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "ignore_eos": True},
    )
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == DEFAULT_MAX_TOKENS
    completion = _post(dev_server, "/v1/completions", {"prompt": "hi", "ignore_eos": True})
    assert completion.status_code == 200 and completion.json()["usage"]["completion_tokens"] == 16


def test_models_and_health(client, dev_server) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-seed0"]
    assert httpx.get(f"{dev_server.url}/health").json() == {"status": "ok"}


def test_completion_usage_counts_real_tokens(client, tokenizer) -> None:
    out = client.completions.create(
        model="tiny-seed0",
        prompt="The quick brown fox",
        max_tokens=12,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    assert out.usage.prompt_tokens == len(tokenizer.encode("The quick brown fox"))
    assert out.usage.completion_tokens == 12 and out.usage.total_tokens == out.usage.prompt_tokens + 12
    assert out.choices[0].finish_reason == "length"
    ids = client.completions.create(
        model="tiny-seed0",
        prompt=tokenizer.encode("The quick brown fox"),
        max_tokens=12,
        temperature=0.0,
        extra_body={"ignore_eos": True},
    )
    assert ids.choices[0].text == out.choices[0].text


def test_chat_streaming_matches_non_streaming(client, tokenizer) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    whole = client.chat.completions.create(
        model="tiny-seed0", messages=messages, max_tokens=10, temperature=0.0, extra_body={"ignore_eos": True}
    )
    stream = client.chat.completions.create(
        model="tiny-seed0",
        messages=messages,
        max_tokens=10,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    text, usage, reasons = "", None, []
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            reasons.append(choice.finish_reason)
    assert text == whole.choices[0].message.content
    prompt = tokenizer.apply_chat_template(messages)
    assert usage.prompt_tokens == whole.usage.prompt_tokens == len(prompt)
    assert usage.completion_tokens == 10
    assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])


def test_stop_strings_are_cut(client) -> None:
    base = (
        client.completions.create(
            model="tiny-seed0",
            prompt="stop test",
            max_tokens=24,
            temperature=0.0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .text
    )
    stop = base[6:9]
    cut = client.completions.create(
        model="tiny-seed0",
        prompt="stop test",
        max_tokens=24,
        temperature=0.0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert cut.choices[0].text == base[: base.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny-seed0",
            prompt="stop test",
            max_tokens=24,
            temperature=0.0,
            stop=[stop],
            stream=True,
            extra_body={"ignore_eos": True},
        )
        if c.choices
    )
    assert streamed == cut.choices[0].text


def test_seed_reproduces(client) -> None:
    def sample(seed: int) -> str:
        return (
            client.completions.create(
                model="tiny-seed0",
                prompt="seeded",
                max_tokens=16,
                temperature=1.0,
                seed=seed,
                extra_body={"ignore_eos": True},
            )
            .choices[0]
            .text
        )

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_n_and_logprobs(client) -> None:
    out = client.completions.create(
        model="tiny-seed0",
        prompt="n",
        max_tokens=5,
        temperature=1.0,
        n=3,
        seed=1,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert out.usage.completion_tokens == 15
    for choice in out.choices:
        assert len(choice.logprobs.tokens) == 5 and all(lp <= 0 for lp in choice.logprobs.token_logprobs)
    chat = client.chat.completions.create(
        model="tiny-seed0",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=3,
        logprobs=True,
        top_logprobs=2,
        temperature=0.0,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) <= 3 and all(len(t.top_logprobs) == 2 for t in content)


def test_32_concurrent_streams_match_their_greedy_results(dev_server) -> None:
    client = openai.AsyncOpenAI(
        base_url=f"{dev_server.url}/v1", api_key=dev_server.api_key, max_retries=0, timeout=300
    )

    async def one(i: int, stream: bool) -> str:
        kwargs = {
            "model": "tiny-seed0",
            "prompt": f"request number {i}",
            "max_tokens": 8,
            "temperature": 0.0,
            "extra_body": {"ignore_eos": True},
        }
        if not stream:
            return (await client.completions.create(**kwargs)).choices[0].text
        text = ""
        async for chunk in await client.completions.create(stream=True, **kwargs):
            text += chunk.choices[0].text if chunk.choices else ""
        return text

    async def main():
        streamed = await asyncio.gather(*(one(i, True) for i in range(32)))
        whole = [await one(i, False) for i in range(32)]
        return streamed, whole

    streamed, whole = asyncio.run(main())
    assert streamed == whole


def _post(
    dev_server, path: str, body: dict | bytes, key: str | None = "default", **headers
) -> httpx.Response:
    if key == "default":
        key = dev_server.api_key
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers.setdefault("content-type", "application/json")
    return httpx.post(f"{dev_server.url}{path}", content=content, headers=headers, timeout=120)


def _error(response: httpx.Response, status: int, pattern: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert re.search(pattern, error["message"]), error["message"]
    return error


def test_error_statuses_and_the_server_keeps_serving(dev_server) -> None:
    ok = {"prompt": "hi", "max_tokens": 2}
    _error(_post(dev_server, "/v1/completions", ok, key=None), 401, "no API key")
    _error(_post(dev_server, "/v1/completions", ok, key="wrong"), 401, "not valid")
    assert httpx.get(f"{dev_server.url}/v1/models").status_code == 401
    _error(_post(dev_server, "/v1/completions", {**ok, "model": "gpt-4"}), 404, "'gpt-4' does not exist")
    _error(_post(dev_server, "/v1/completions", {**ok, "temperature": -1}), 400, "temperature")
    _error(_post(dev_server, "/v1/completions", {**ok, "bogus": 1}), 400, "bogus: unknown parameter")
    _error(_post(dev_server, "/v1/completions", {"max_tokens": 2}), 400, "prompt")
    _error(_post(dev_server, "/v1/completions", b"{not json"), 400, "not valid JSON")
    _error(_post(dev_server, "/v1/completions", {**ok, "echo": True}), 400, "echo is not supported")
    error = _error(
        _post(dev_server, "/v1/completions", {"prompt": [5] * 2040, "max_tokens": 100}),
        400,
        r"prompt \(2040 tokens\) plus max_tokens \(100\) exceeds the context limit of 2048 tokens.*at most 8",
    )
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    _error(_post(dev_server, "/v1/completions", {"prompt": [99999], "max_tokens": 2}), 400, r"\[0, 512\)")
    _error(_post(dev_server, "/v1/chat/completions", {"messages": [], "max_tokens": 2}), 400, "messages")
    _error(_post(dev_server, "/v1/completions", b"x" * (17 * 2**20)), 413, "exceeds the limit")
    response = _post(dev_server, "/v1/completions", ok)
    assert response.status_code == 200, "the server keeps serving after every refusal"


def test_overload_answers_429_with_retry_after(dev_server) -> None:
    async def main():
        async with httpx.AsyncClient(
            base_url=dev_server.url, timeout=300, headers={"Authorization": f"Bearer {dev_server.api_key}"}
        ) as client:
            # 1000-token prompts, each its own (no prefix to share): a rank's 256 pages hold four, so
            # 32 run, MAX_WAITING wait, and the rest must be refused whatever the timing.
            def body(i: int) -> dict:
                return {"prompt": [3 + i] + [7] * 999, "max_tokens": 16, "ignore_eos": True}

            return await asyncio.gather(
                *(client.post("/v1/completions", json=body(i)) for i in range(4 * MAX_WAITING))
            )

    responses = asyncio.run(main())
    statuses = [r.status_code for r in responses]
    assert 429 in statuses and 200 in statuses, statuses
    busy = next(r for r in responses if r.status_code == 429)
    assert busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["type"] == "rate_limit_error"
    assert _post(dev_server, "/v1/completions", {"prompt": "hi", "max_tokens": 2}).status_code == 200


def _engine_idle(engine_handle, timeout: float = 60) -> tuple[dict, list]:
    deadline = time.monotonic() + timeout
    while True:
        pages = engine_handle.scheduler_pages.remote().result()
        workers = engine_handle.worker_stats.remote().result()
        if not any(pages["used"]) and not any(w["requests"] for w in workers):
            return pages, workers
        assert time.monotonic() < deadline, (pages, workers)
        time.sleep(0.2)


def test_client_disconnect_frees_the_pages(dev_server, engine_handle) -> None:
    _engine_idle(engine_handle)
    body = {"prompt": [3] * 300, "max_tokens": 1500, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {dev_server.api_key}"}
    with httpx.stream(
        "POST", f"{dev_server.url}/v1/completions", json=body, headers=headers, timeout=120
    ) as r:
        chunks = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                chunks += 1
            if chunks == 3:
                used = engine_handle.scheduler_pages.remote().result()["used"]
                assert sum(used) > 0, "the request holds pages while it streams"
                break
    _engine_idle(engine_handle)


def test_engine_fault_answers_500_and_the_group_recovers(dev_server, engine_handle) -> None:
    import ray

    async def main():
        async with httpx.AsyncClient(
            base_url=dev_server.url, timeout=300, headers={"Authorization": f"Bearer {dev_server.api_key}"}
        ) as client:
            request = asyncio.create_task(
                client.post(
                    "/v1/completions", json={"prompt": [4] * 50, "max_tokens": 1900, "ignore_eos": True}
                )
            )
            await asyncio.sleep(3)
            worker = next(
                a
                for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith("nmoe-worker-") and a["name"].endswith("-r5")
            )
            ray.kill(ray.get_actor(worker["name"], namespace=worker["namespace"]), no_restart=True)
            return await request

    response = asyncio.run(main())
    error = _error(
        response, 500, r"^the engine failed while running request cmpl-[0-9a-f-]+ and has restarted: retry"
    )
    # nothing of the server leaks: no traceback, process, address, actor or other request
    assert not re.search(r"pid|ip=|actor|ray::|Traceback|\x1b|\d+\.\d+\.\d+\.\d+", error["message"])
    _engine_idle(engine_handle, timeout=120)
    assert _post(dev_server, "/v1/completions", {"prompt": "again", "max_tokens": 3}).status_code == 200


def test_metrics_are_exported(dev_server) -> None:
    _post(dev_server, "/v1/completions", {"prompt": "metrics", "max_tokens": 4, "stream": True})
    assert _post(dev_server, "/v1/completions", {"prompt": "x", "max_tokens": 1}, key=None).status_code == 401
    names = (
        "ray_nmoe_generation_tokens_total",
        "ray_nmoe_time_to_first_token_seconds_count",
        "ray_nmoe_prompt_tokens_total",
        "ray_nmoe_step_seconds_count",
        "ray_nmoe_e2e_request_latency_seconds_count",
        "ray_nmoe_num_requests_running",
        "ray_nmoe_kv_cache_usage_perc",
        "ray_nmoe_request_errors_total",
    )
    deadline = time.monotonic() + 60
    while True:
        text = httpx.get(dev_server.metrics_url, timeout=30).text
        values = {
            n: sum(float(m.group(1)) for m in re.finditer(rf"^{n}{{[^}}]*}} (\S+)$", text, re.M))
            for n in names
        }
        if all(n in text for n in names) and values["ray_nmoe_generation_tokens_total"] > 0:
            break
        assert time.monotonic() < deadline, {n: n in text for n in names}
        time.sleep(2)
    assert values["ray_nmoe_time_to_first_token_seconds_count"] >= 1
    assert values["ray_nmoe_prompt_tokens_total"] > 0
    assert re.search(r'ray_nmoe_request_errors_total\{[^}]*status="401"[^}]*\} [1-9]', text)


def test_prefix_cache_usage_metrics_and_reset(dev_server, client) -> None:
    prompt = list(range(5, 105))  # token ids: six full pages of 16 and a partial one

    def create():
        return client.completions.create(
            model="tiny-seed0", prompt=prompt, max_tokens=4, temperature=0.0, extra_body={"ignore_eos": True}
        )

    first, again = create(), create()
    assert again.choices[0].text == first.choices[0].text
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.usage.prompt_tokens_details.cached_tokens == 96, "the rank holding the prefix took it"
    assert _post(dev_server, "/reset_prefix_cache", {}, key=None).status_code == 401
    reset = _post(dev_server, "/reset_prefix_cache", {})
    assert reset.status_code == 200 and reset.json()["dropped_pages"] >= 6, reset.text
    after = create()
    assert (
        after.usage.prompt_tokens_details.cached_tokens == 0
        and after.choices[0].text == first.choices[0].text
    )
    deadline = time.monotonic() + 60
    while True:
        text = httpx.get(dev_server.metrics_url, timeout=30).text
        values = {
            n: sum(float(m.group(1)) for m in re.finditer(rf"^{n}{{[^}}]*}} (\S+)$", text, re.M))
            for n in ("ray_nmoe_prefix_cache_queries_total", "ray_nmoe_prefix_cache_hits_total")
        }
        if values["ray_nmoe_prefix_cache_hits_total"] >= 96:
            break
        assert time.monotonic() < deadline, values
        time.sleep(2)
    assert values["ray_nmoe_prefix_cache_queries_total"] >= 3 * len(prompt)


@pytest.mark.parametrize(
    "script,args",
    [
        (
            "bench/latency.py",
            ["--concurrency", "4", "--requests", "8", "--prompt-tokens", "32", "--output-tokens", "8"],
        ),
        ("bench/long_context.py", ["--output-tokens", "8", "--concurrent", "2"]),
        (
            "bench/lmsys.py",
            [
                "--config",
                "configs/dev.toml",
                "--set",
                "ep_size=2",
                "--set",
                "num_pages=64",
                "--set",
                "max_seq_len=512",
                "--prompt-tokens",
                "64",
                "--output-tokens",
                "8",
                "--seqs-per-rank",
                "4",
                "--prefill-seqs-per-rank",
                "2",
            ],
        ),
    ],
)
def test_bench_scripts_run_as_ray_jobs(dev_server, tmp_path, script, args) -> None:
    out = tmp_path / "result.json"
    http = [] if script.endswith("lmsys.py") else ["--url", dev_server.url, "--api-key", dev_server.api_key]
    command = [
        "ray",
        "job",
        "submit",
        "--address",
        dev_server.dashboard_url,
        "--working-dir",
        ".",
        "--",
        sys.executable,
        script,
        *http,
        *args,
        "--out",
        str(out),
    ]
    # Right after the cluster starts (or under load) the dashboard may not have its job agent yet;
    # it says so and asks to try again, as a user would.
    deadline = time.monotonic() + 120
    while True:
        done = subprocess.run(
            command, env=dev_server.env, cwd=REPO, capture_output=True, text=True, timeout=600
        )
        if "No available agent to submit job" not in done.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout + done.stderr
    result = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 1000
    if script.endswith("latency.py"):
        assert result["completed"] == 8 and result["ttft_s"]["count"] == 8
    elif script.endswith("long_context.py"):
        assert result["all_ok"] and result["lengths"][-1] == 2048 - 8
    else:
        assert result["decode"]["tokens"] > 0 and result["prefill"]["tok_per_s"] > 0
