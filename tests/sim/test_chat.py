"""The simulator's multi-turn chat workload: the prompts it sends (each turn the conversation so
far, the answers' own tokens included) and what the scheduler's prefix cache makes of them. Counts
of tokens only: no test here asserts a time."""

from __future__ import annotations

import json

import pytest

from nmoe_serve.cli import main
from nmoe_serve.engine.scheduler import SchedulerLimits
from nmoe_serve.sim.chat import ChatWorkload
from nmoe_serve.sim.cost_model import StepCostModel
from nmoe_serve.sim.simulator import Simulator
from nmoe_serve.sim.workload import WorkloadError


def model() -> StepCostModel:
    coefficients = {
        "decode": {"step": 0.05, "seqs": 0.0, "context_tokens": 0.0},
        "prefill": {"step": 0.2, "tokens": 0.001, "attention_pairs": 0.0, "context_tokens": 0.0},
    }
    return StepCostModel(coefficients, "test constants", "2026-12-02")


def limits(**kw) -> SchedulerLimits:
    base = dict(
        num_ranks=1, pages_per_rank=512, page_size=16, max_seq_len=2048, max_num_seqs=8,
        max_prefill_tokens=512, max_prefill_steps_in_a_row=4, watermark_pages=0,
    )  # fmt: skip
    return SchedulerLimits(**{**base, **kw})


def test_each_turn_resends_the_conversation_so_far() -> None:
    workload = ChatWorkload(
        conversations=3, turns=3, system_prompt_tokens=40, user_tokens=8, output_tokens=5,
        output_tokens_max=9, seed=1,
    )  # fmt: skip
    clients = workload.clients()
    assert clients.first_sends() == [(0.0, 0), (0.0, 1), (0.0, 2)]
    system = workload.system_prompt()
    assert len(system) == 40 and min(system) >= 2
    history = list(system)
    for turn in range(3):
        prompt, max_tokens = clients.prompt(0, turn)
        history += workload.user_message(0, turn)
        assert prompt == history
        assert 5 <= max_tokens <= 9 and max_tokens == workload.answer_tokens(0, turn)
        answer = [turn + 100] * max_tokens
        again = clients.answered(0, answer, 1.5 + turn)
        assert again == (1.5 + turn if turn < 2 else None), "the next turn at once; none after the last"
        history += answer
    other, _ = clients.prompt(1, 3)
    assert other[:40] == system, "every conversation shares the system prompt"
    assert other[40:] == workload.user_message(1, 0) != workload.user_message(0, 0)
    assert ChatWorkload(3, 3, 40, 8, 5, 9, seed=1).system_prompt() == system, "seeded"
    assert workload.requests == 9 and workload.longest_prompt == 40 + 3 * 8 + 2 * 9


def test_conversations_can_start_as_poisson_arrivals() -> None:
    starts = ChatWorkload(50, 2, 16, 8, 4, conversation_rate=10.0).clients().first_sends()
    times = [t for t, _ in starts]
    assert times == sorted(times) and times[0] > 0 and [c for _, c in starts] == list(range(50))
    assert 2.0 < times[-1] < 10.0, "50 conversations at 10/s start over about 5 s"


def test_chat_workload_refusals() -> None:
    with pytest.raises(WorkloadError, match="--turns must be at least 1"):
        ChatWorkload(2, 0, 16, 8, 4)
    with pytest.raises(WorkloadError, match="--output-tokens-max"):
        ChatWorkload(2, 2, 16, 8, 10, output_tokens_max=5)
    with pytest.raises(WorkloadError, match="--conversation-rate must be a positive"):
        ChatWorkload(2, 2, 16, 8, 4, conversation_rate=0.0)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_turn_finds_the_previous_turn_and_its_answer_cached(overlap: bool) -> None:
    """One conversation on one rank, pages of 16: turn k finds every full page the last turn
    computed (its prompt and all but its last answer token), so the decoded pages are hits too."""
    workload = ChatWorkload(
        conversations=1, turns=3, system_prompt_tokens=64, user_tokens=16, output_tokens=20
    )
    on = Simulator(limits(), model(), overlap=overlap).run(workload)
    off = Simulator(limits(prefix_caching=False), model(), overlap=overlap).run(workload)
    prompts = [80, 116, 152]  # 64 + 16, then + 20 answer + 16 user each turn
    assert off.prompt_tokens_sent == on.prompt_tokens_sent == sum(prompts)
    assert off.cached_tokens == 0 and off.prompt_tokens == sum(prompts)
    # turn 1 finds 6 pages (96 tokens: 80 of prompt, 16 decoded), turn 2 finds 8 (128)
    assert on.cached_tokens == 96 + 128
    assert on.prompt_tokens == sum(prompts) - on.cached_tokens, "prefill computes only the uncached tokens"
    assert on.summary()["prefix_cache"]["hit_rate"] == pytest.approx(224 / 348)  # type: ignore[index]


def test_caching_on_hits_and_computes_fewer_prefill_tokens_at_ep_2() -> None:
    workload = ChatWorkload(
        conversations=6, turns=4, system_prompt_tokens=128, user_tokens=16, output_tokens=12
    )
    on = Simulator(limits(num_ranks=2), model()).run(workload)
    off = Simulator(limits(num_ranks=2, prefix_caching=False), model()).run(workload)
    assert on.prompt_tokens_sent == off.prompt_tokens_sent
    assert on.cached_tokens > 0 and off.cached_tokens == 0
    assert on.prompt_tokens < off.prompt_tokens == off.prompt_tokens_sent
    assert on.preemptions == 0 and on.prompt_tokens + on.cached_tokens == on.prompt_tokens_sent
    assert sum(on.admitted_by_rank) == sum(off.admitted_by_rank) == 24
    assert len(on.ttft_s) == 24 and on.output_tokens == 24 * 12


def test_unbounded_rank_choice_follows_the_cache_and_bound_0_balances() -> None:
    """Conversations arriving one by one: without a bound every one follows the system prompt's
    pages to the first rank that computed them; bound 0 spreads them over both ranks."""
    workload = ChatWorkload(
        conversations=8, turns=2, system_prompt_tokens=128, user_tokens=16, output_tokens=40,
        conversation_rate=20.0,
    )  # fmt: skip
    unbounded = Simulator(limits(num_ranks=2, max_rank_imbalance=10_000), model()).run(workload)
    balanced = Simulator(limits(num_ranks=2, max_rank_imbalance=0), model()).run(workload)
    assert sorted(unbounded.admitted_by_rank) == [0, 16]
    assert max(balanced.admitted_by_rank) - min(balanced.admitted_by_rank) <= 2
    assert unbounded.cached_tokens >= balanced.cached_tokens


def test_the_simulate_command_runs_a_chat_workload(tmp_path, capsys) -> None:
    path = tmp_path / "model.json"
    model().save(path)
    out = tmp_path / "chat.json"
    base = ["simulate", "--config", "configs/dev.toml", "--cost-model", str(path), "--workload", "chat",
            "--output-tokens", "8"]  # fmt: skip
    argv = [*base, "--conversations", "4", "--turns", "3", "--system-prompt-tokens", "64", "--user-tokens",
            "16", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(out.read_text())["summary"]
    assert summary["requests"] == 12 and summary["prefix_cache"]["cached_tokens"] > 0
    assert "prefix cache on" in capsys.readouterr().out
    assert main([*base, "--conversations", "4", "--prompt-tokens", "8"]) == 2
    assert "--prompt-tokens: not for --workload chat" in capsys.readouterr().err
    assert main([*base, "--turns", "2"]) == 2
    assert "needs --conversations" in capsys.readouterr().err
    fixed = ["simulate", "--config", "configs/dev.toml", "--cost-model", str(path), "--output-tokens", "4"]
    assert main([*fixed, "--concurrency", "2"]) == 2
    assert "needs --prompt-tokens" in capsys.readouterr().err
    assert main([*fixed, "--prompt-tokens", "8"]) == 2
    assert "exactly one of --concurrency" in capsys.readouterr().err
