"""The coordinator's step loop on one in-process rank: streams, concurrency, cancellation, failure."""

from __future__ import annotations

import asyncio

import pytest

from nmoe_serve.config import ServeConfig
from nmoe_serve.engine.coordinator import Coordinator, RequestFailed
from nmoe_serve.engine.executor import StepFailed
from nmoe_serve.engine.request import RequestRejected
from nmoe_serve.llm import LLM
from nmoe_serve.parallel.executor import make_executor
from nmoe_serve.sampling.params import SamplingParams
from tests.helpers import resolve

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def coordinator(dev_config_path) -> Coordinator:
    settings = resolve(ServeConfig.from_toml(dev_config_path))
    return Coordinator(settings.core, make_executor(settings), group="test")


async def collect(
    coordinator: Coordinator, request_id: str, prompt: list[int], params=GREEDY
) -> tuple[list[int], str]:
    tokens: list[int] = []
    reason = None
    async for updates in coordinator.generate(request_id, prompt, params):
        tokens += [u.token_id for u in updates]
        reason = updates[-1].finish_reason
    return tokens, reason


def test_streams_match_the_offline_engine(coordinator, dev_config_path) -> None:
    prompts = [[5, 6, 7], [9] * 40, list(range(1, 60))]
    expected = [o.outputs[0].token_ids for o in LLM(config=dev_config_path).generate(prompts, GREEDY)]

    async def main():
        return await asyncio.gather(*(collect(coordinator, f"s{i}", p) for i, p in enumerate(prompts)))

    results = asyncio.run(main())
    assert [t for t, _ in results] == expected
    assert all(r == "length" for _, r in results)


def test_many_concurrent_streams_complete(coordinator) -> None:
    async def main():
        results = await asyncio.gather(*(collect(coordinator, f"c{i}", [1 + i] * (i + 1)) for i in range(24)))
        await coordinator.wait_idle()
        return results

    results = asyncio.run(main())
    assert all(len(t) == 12 for t, _ in results)
    assert not coordinator.engine.has_work()
    assert len(coordinator.engine.executor.worker.sampler) == 0


def test_leaving_the_stream_cancels_and_frees_pages(coordinator) -> None:
    async def main():
        stream = coordinator.generate("gone", [3] * 50, SamplingParams(max_tokens=500, ignore_eos=True))
        got = 0
        async for _ in stream:
            got += 1
            if got == 2:
                break
        await stream.aclose()
        await coordinator.wait_idle()

    asyncio.run(main())
    assert "gone" not in coordinator.engine.scheduler.requests
    assert all(p.num_used == 0 for p in coordinator.engine.scheduler.pools)
    assert len(coordinator.engine.executor.worker.sampler) == 0


def test_rejected_request_raises_before_any_token(coordinator) -> None:
    async def main():
        await collect(coordinator, "too-long", [1] * 2048)

    with pytest.raises(RequestRejected, match="context limit"):
        asyncio.run(main())


def test_failed_step_fails_the_in_flight_requests_and_serving_goes_on(
    coordinator, monkeypatch, caplog
) -> None:
    executor = coordinator.engine.executor
    method = "launch_async" if coordinator.engine.overlap else "execute_async"  # how the loop dispatches
    real = getattr(executor, method)
    calls = {"n": 0}

    async def flaky(plans):
        calls["n"] += 1
        if calls["n"] == 3:
            raise StepFailed("injected failure")
        return await real(plans)

    monkeypatch.setattr(executor, method, flaky)

    async def main():
        first = await asyncio.gather(
            *(
                collect(coordinator, f"f{i}", [2] * 10, SamplingParams(max_tokens=40, ignore_eos=True))
                for i in range(3)
            ),
            return_exceptions=True,
        )
        after = await collect(coordinator, "after", [4, 5, 6])
        return first, after

    with caplog.at_level("ERROR"):
        first, after = asyncio.run(main())
    # each client hears of its own request only; the cause and the other requests are in the log
    assert [str(r) for r in first] == [f"request f{i} failed: a rank of the engine failed" for i in range(3)]
    assert all(isinstance(r, RequestFailed) for r in first)
    assert "injected failure" in caplog.text and all(f"f{i}" in caplog.text for i in range(3))
    assert len(after[0]) == 12
    assert all(p.num_used == 0 for p in coordinator.engine.scheduler.pools)
