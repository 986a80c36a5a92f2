"""The simulator on the real scheduler: virtual times that follow from the cost model exactly, the
closed loop and Poisson clients, overlap hiding the coordinator, the prefill budget while decoding,
and the `nmoe-serve simulate` command. Times here are simulated seconds, not measurements."""

from __future__ import annotations

import json

import pytest

from nmoe_serve.cli import main
from nmoe_serve.engine.scheduler import SchedulerLimits
from nmoe_serve.sim.cost_model import StepCostModel
from nmoe_serve.sim.simulator import Simulator, Speculation
from nmoe_serve.sim.workload import Workload, WorkloadError

DECODE_S, PREFILL_S, PER_TOKEN_S = 0.05, 0.2, 0.001


def constant_model() -> StepCostModel:
    """Decode steps take 50 ms; prefill 200 ms plus 1 ms a token (per rank, the slowest counts)."""
    coefficients = {
        "decode": {"step": DECODE_S, "seqs": 0.0, "context_tokens": 0.0},
        "prefill": {"step": PREFILL_S, "tokens": PER_TOKEN_S, "attention_pairs": 0.0, "context_tokens": 0.0},
    }
    return StepCostModel(coefficients, "test constants", "2026-12-01")


def limits(**kw) -> SchedulerLimits:
    base = dict(
        num_ranks=2, pages_per_rank=512, page_size=16, max_seq_len=1024, max_num_seqs=8,
        max_prefill_tokens=256, max_prefill_steps_in_a_row=4, watermark_pages=0,
    )  # fmt: skip
    return SchedulerLimits(**{**base, **kw})


def test_one_request_follows_the_cost_model_exactly() -> None:
    sim = Simulator(limits(), constant_model(), overlap=False)
    result = sim.run(Workload(prompt_tokens=100, output_tokens=5, requests=1, concurrency=1))
    assert result.ttft_s == [pytest.approx(PREFILL_S + 100 * PER_TOKEN_S)]
    assert result.itl_s == pytest.approx([DECODE_S] * 4)
    assert result.output_tokens == 5 and result.prompt_tokens == 100


def test_serial_steps_pay_the_coordinator_and_overlap_hides_it() -> None:
    workload = Workload(prompt_tokens=16, output_tokens=20, requests=4, concurrency=4)
    serial = Simulator(limits(), constant_model(), overlap=False, coordinator_s=0.01).run(workload)
    overlap = Simulator(limits(), constant_model(), overlap=True, coordinator_s=0.01).run(workload)
    assert serial.summary()["itl_s"]["p50"] == pytest.approx(DECODE_S + 0.01)
    assert overlap.summary()["itl_s"]["p50"] == pytest.approx(DECODE_S)
    slow = Simulator(limits(), constant_model(), overlap=True, coordinator_s=0.08).run(workload)
    assert slow.summary()["itl_s"]["p50"] == pytest.approx(0.08), (
        "a coordinator slower than a step sets the pace"
    )


def test_the_closed_loop_keeps_c_requests_in_the_system() -> None:
    result = Simulator(limits(), constant_model()).run(
        Workload(prompt_tokens=32, output_tokens=8, requests=40, concurrency=6)
    )
    in_system = [w + r for w, r in zip(result.series["waiting"], result.series["running"], strict=True)]
    assert max(in_system) <= 6
    assert len(result.ttft_s) == 40 and result.output_tokens == 40 * 8


def test_poisson_arrivals_are_reproducible_and_queue_when_overloaded() -> None:
    sim = Simulator(limits(max_num_seqs=2), constant_model())
    workload = Workload(prompt_tokens=64, output_tokens=16, requests=30, rate=50.0, seed=3)
    a, b = sim.run(workload), sim.run(workload)
    assert a.ttft_s == b.ttft_s
    assert max(a.series["waiting"]) > 5, "30 requests at 50/s outrun 4 sequence slots"


def test_a_prefill_budget_while_decoding_bounds_the_steps_that_delay_decodes() -> None:
    workload = Workload(prompt_tokens=900, output_tokens=40, requests=24, concurrency=8)
    free = Simulator(limits(max_prefill_tokens=1024), constant_model()).run(workload)
    policy = {"max_prefill_tokens": 1024, "decode_prefill_tokens": 64, "max_prefill_steps_in_a_row": 1}
    bounded = Simulator(limits(**policy), constant_model()).run(workload)
    assert free.summary()["itl_s"]["max"] > PREFILL_S + 500 * PER_TOKEN_S
    assert bounded.summary()["itl_s"]["p99"] <= PREFILL_S + 64 * PER_TOKEN_S + DECODE_S + 1e-9


def test_workload_refusals() -> None:
    with pytest.raises(WorkloadError, match="exactly one of --concurrency"):
        Workload(10, 10, 10)
    with pytest.raises(WorkloadError, match="--rate must be a positive"):
        Workload(10, 10, 10, rate=0.0)
    with pytest.raises(WorkloadError, match="--output-tokens must be at least 1"):
        Workload(10, 0, 10, concurrency=1)
    with pytest.raises(WorkloadError, match="refuses the workload"):
        Simulator(limits(), constant_model()).run(Workload(2000, 10, 1, concurrency=1))


def test_the_simulate_command_writes_json_and_png(tmp_path, capsys) -> None:
    model = tmp_path / "model.json"
    constant_model().save(model)
    out = tmp_path / "sim.json"
    argv = [
        "simulate", "--config", "configs/dev.toml", "--cost-model", str(model), "--concurrency", "8",
        "--prompt-tokens", "64", "--output-tokens", "8", "--set", "decode_prefill_tokens=128", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    written = json.loads(out.read_text())
    assert (
        written["summary"]["requests"] == 16
        and written["settings"]["prediction"] == "simulated, not measured"
    )
    assert written["settings"]["limits"]["decode_prefill_tokens"] == 128
    assert out.with_suffix(".png").stat().st_size > 0
    assert "sim: 16/16 requests done" in capsys.readouterr().out


def test_the_simulate_command_refuses_bad_input(tmp_path, capsys) -> None:
    model = tmp_path / "model.json"
    constant_model().save(model)
    base = ["simulate", "--config", "configs/dev.toml", "--cost-model", str(model), "--prompt-tokens", "8",
            "--output-tokens", "4"]  # fmt: skip
    assert main([*base, "--rate", "2"]) == 2
    assert "--rate needs --requests" in capsys.readouterr().err
    assert main([*base, "--concurrency", "2", "--set", "num_pages=null"]) == 2
    assert "needs the KV pages per rank" in capsys.readouterr().err
    assert main([*base, "--concurrency", "2", "--cost-model", str(tmp_path / "none.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_front_end_serves_a_burst_one_request_at_a_time() -> None:
    workload = Workload(prompt_tokens=16, output_tokens=2, requests=3, concurrency=3)
    result = Simulator(limits(max_prefill_steps_in_a_row=1), constant_model(), frontend_s=0.1).run(workload)
    prefill = PREFILL_S + 16 * PER_TOKEN_S
    # the first reaches the scheduler at 0.1 s; the next two at 0.2 and 0.3 s, during its prefill and
    # its first decode step, and are prefilled together after that decode step
    later = 0.1 + prefill + DECODE_S + PREFILL_S + 32 * PER_TOKEN_S
    assert sorted(result.ttft_s) == pytest.approx([0.1 + prefill, later, later])


def test_streamed_tokens_queue_at_the_front_end() -> None:
    workload = Workload(prompt_tokens=16, output_tokens=3, requests=1, concurrency=1)
    result = Simulator(limits(), constant_model(), overlap=False, frontend_token_s=0.01).run(workload)
    assert result.ttft_s == [pytest.approx(PREFILL_S + 16 * PER_TOKEN_S + 0.01)]
    assert result.itl_s == pytest.approx([DECODE_S] * 2), "a front end that keeps up adds no gap"
    slow = Simulator(limits(), constant_model(), overlap=False, frontend_token_s=0.01).run(
        Workload(prompt_tokens=16, output_tokens=3, requests=8, concurrency=8)
    )
    assert max(slow.itl_s) >= 8 * 0.01 - 1e-9, "8 streams' tokens take 80 ms to send: more than a step"


def test_speculative_decoding_gives_each_sequence_one_to_1_plus_k_tokens_a_verify_step() -> None:
    """k = 2 drafts, each accepted with probability 0.75: a sequence gets 1 + a + a^2 = 2.3125
    tokens a verify step on average, so the output takes that many fewer decode steps; each step
    costs the decode step of its token rows plus the drafts' time."""
    workload = Workload(prompt_tokens=16, output_tokens=400, requests=8, concurrency=8)
    spec = Speculation(acceptance=0.75, draft_s=0.004, seed=1)
    result = Simulator(limits(num_draft_tokens=2), constant_model(), overlap=False, speculation=spec).run(
        workload
    )
    plain = Simulator(limits(), constant_model(), overlap=False).run(workload)
    assert result.output_tokens == plain.output_tokens == 8 * 400
    decode_steps = plain.steps - result.steps
    assert result.steps < plain.steps and decode_steps > 0
    tokens_per_step = 8 * 400 / (result.steps - 1)  # all but the first (the prefill) are verify steps
    # 8 sequences a step (4 a rank); the last steps, as sequences end, carry fewer
    assert tokens_per_step / 8 == pytest.approx(1 + 0.75 + 0.75**2, rel=0.1)
    assert result.summary()["itl_s"]["p50"] == pytest.approx(0.0, abs=1e-9), (
        "tokens of one step arrive together"
    )
    with pytest.raises(WorkloadError, match="num_draft_tokens"):
        Simulator(limits(), constant_model(), overlap=False, speculation=spec)
    with pytest.raises(WorkloadError, match="one at a time"):
        Simulator(limits(num_draft_tokens=2), constant_model(), overlap=True, speculation=spec)
    with pytest.raises(WorkloadError, match="acceptance"):
        Speculation(acceptance=1.5, draft_s=0.0)
