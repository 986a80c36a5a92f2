"""Two EP groups (Coordinator replicas, EP 1 each) behind one ingress on the CPU: requests that share
their leading tokens go to the same group, whose prefix cache serves them, and prefixes spread over
both groups; the reset route reaches each group."""

from __future__ import annotations

import random
import time

import httpx
import pytest

from tests.serve.conftest import run_dev_server

pytestmark = pytest.mark.slow

PAGE = 16  # configs/dev.toml


@pytest.fixture(scope="module")
def two_groups(tmp_path_factory: pytest.TempPathFactory, progress):
    overrides = {"ep_size": 1, "ep_groups": 2, "group_affinity_tokens": 4 * PAGE}
    work = tmp_path_factory.mktemp("g2")  # a short name: Ray's socket paths must stay under 108 bytes
    with run_dev_server(work, progress, overrides) as server:
        yield server


def cached_tokens(client: httpx.Client, prompt: list[int]) -> int:
    body = {"model": "tiny-seed0", "prompt": prompt, "max_tokens": 2, "ignore_eos": True}
    answer = client.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_a_shared_prefix_stays_in_one_group_and_prefixes_spread(two_groups) -> None:
    rng = random.Random(0)
    with two_groups.client() as client:
        deadline = time.monotonic() + 120
        while (reset := client.post("/reset_prefix_cache")).status_code == 503:  # a group still starting
            assert "of 2 EP groups are serving" in reset.text and reset.headers.get("retry-after")
            assert time.monotonic() < deadline, "the second EP group never came up"
            time.sleep(2)
        assert reset.status_code == 200 and len(reset.json()["groups"]) == 2, reset.text
        system = [rng.randrange(1, 496) for _ in range(4 * PAGE)]
        hits = [cached_tokens(client, system + [rng.randrange(1, 496) for _ in range(5)]) for _ in range(8)]
        assert hits[0] == 0 and hits[1:] == [4 * PAGE] * 7, f"a request missed its group's cache: {hits}"
        for _ in range(16):  # other prefixes, one request each
            cached_tokens(client, [rng.randrange(1, 496) for _ in range(2 * PAGE + 1)])
        dropped = client.post("/reset_prefix_cache").json()["groups"]
        assert len(dropped) == 2 and all(n > 0 for n in dropped.values()), (
            f"one group got every prefix: {dropped}"
        )
