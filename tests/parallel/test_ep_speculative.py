"""MTP speculative decoding over Ray worker actors on the CPU (gloo): at EP 2 and 8 the greedy tokens
equal those of EP 1 without MTP (chunked prefill and preemption forced), and every rank runs the
same collectives (idle ranks included: the MTP layer's MoE exchanges too).

The tiny random model's MTP layer rarely guesses right, so the ranks' drafts are replaced on their
way back to the scheduler by drafts right by construction (the reference continuation), two in
three positions, the third wrong: the verify steps on the ranks then accept, reject and accept in
part."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from nmoe_serve.config import ServeConfig
from nmoe_serve.llm import LLM
from nmoe_serve.parallel.executor import RayExecutor
from tests.helpers import resolve
from tests.parallel.test_ep_engine import OPTIONS, tokens, workload
from tests.recording import RecordingWorkerActor

ray = pytest.importorskip("ray")

MTP = {"speculative_method": "mtp", "num_draft_tokens": 2, "overlap": False}


def with_known_drafts(llm: LLM, prompts, want: list[list[int]]) -> None:
    """Replace the drafts the ranks return by the reference continuation (every third one wrong)."""
    core = llm.engine
    reference = {tuple(p): w for p, w in zip(prompts, want, strict=True)}
    execute = core.executor.execute

    def drafting(plans):
        results = execute(plans)
        fixed = []
        for result in results:
            if result.draft_token_ids is None or not len(result.request_ids):
                fixed.append(result)
                continue
            emitted = (
                result.num_emitted if result.num_emitted is not None else np.ones(len(result.request_ids))
            )
            drafts = result.draft_token_ids.copy()
            for i, rid in enumerate(result.request_ids):
                request = core.scheduler.requests.get(rid)
                if request is None:
                    continue
                out = reference[tuple(request.prompt_token_ids.tolist())]
                at = request.num_outputs + int(emitted[i])
                for j in range(drafts.shape[1]):
                    right = out[at + j] if at + j < len(out) else 0
                    drafts[i, j] = right if (at + j) % 3 else (right + 1) % 496
            fixed.append(dataclasses.replace(result, draft_token_ids=drafts))
        return fixed

    core.executor.execute = drafting  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def expected(dev_config_path):
    llm = LLM(config=dev_config_path, num_pages=10, **OPTIONS)
    try:
        return tokens(llm, *workload())
    finally:
        llm.shutdown()


def check_speculation(llm: LLM) -> None:
    scheduler = llm.engine.scheduler
    assert scheduler.num_preemptions > 0, "the workload is meant to preempt"
    assert 0 < scheduler.num_accepted < scheduler.num_drafted
    assert all(p.num_free == p.num_pages for p in scheduler.pools), "pages leaked"


def test_mtp_at_ep_2_gives_the_greedy_tokens_of_ep_1_without_it(dev_config_path, expected) -> None:
    ep2 = LLM(config=dev_config_path, ep_size=2, num_pages=10, **OPTIONS, **MTP)
    prompts, params = workload()
    with_known_drafts(ep2, prompts, expected)
    try:
        assert tokens(ep2, prompts, params) == expected
        check_speculation(ep2)
    finally:
        ep2.shutdown()


def test_mtp_at_ep_8_gives_the_greedy_tokens_and_every_rank_runs_the_same_collectives(
    dev_config_path, expected, progress
) -> None:
    progress("starting 8 Ray worker ranks with MTP (about a minute)")
    settings = resolve(
        ServeConfig.from_toml(dev_config_path, overrides={"ep_size": 8, "num_pages": 9, **OPTIONS, **MTP})
    )
    ep8 = LLM.from_executor(settings, RayExecutor(settings, "ep8-mtp-test", actor_class=RecordingWorkerActor))
    prompts, params = workload()
    with_known_drafts(ep8, prompts, expected)
    try:
        assert tokens(ep8, prompts, params) == expected
        check_speculation(ep8)
        ep8.engine.executor.call_all("collective_log")  # drain
        assert tokens(ep8, prompts[3:4], params[3:4]) == expected[3:4]  # one request, seven idle ranks
        logs = ep8.engine.executor.call_all("collective_log")
        assert logs[0] and all(log == logs[0] for log in logs), "idle ranks must run every collective"
        assert all(int(s["requests"]) == 0 for s in ep8.engine.executor.call_all("stats"))
    finally:
        ep8.shutdown()
        ray.shutdown()
