"""bench/rank_sim.py's modeled all-to-all: the bytes it counts and the time they give."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# bench/ on sys.path only while rank_sim imports: left there, bench/kernels.py shadows the Hub's
# `kernels` package, which transformers (5.25) then imports in place of it and fails (the oracle tests).
_BENCH = str(Path(__file__).resolve().parents[2] / "bench")
sys.path.insert(0, _BENCH)
try:
    import rank_sim
finally:
    sys.path.remove(_BENCH)


def test_bytes_are_fp8_rows_with_scales_out_and_bf16_rows_back_across_the_link():
    link = rank_sim.LinkModel(bytes_per_s=100e9, latency_s=20e-6)
    got = rank_sim.alltoall_model(hidden=7168, tokens_received=800, link=link, ep=8)
    remote = 800 * 7 / 8  # the eighth from the rank itself stays local
    assert got["dispatch_bytes"] == remote * (7168 + 4 * 56)  # e4m3 row + 56 float32 scales
    assert got["combine_bytes"] == remote * 7168 * 2
    assert got["dispatch_s"] == pytest.approx(20e-6 + remote * 7392 / 100e9)
    assert got["per_moe_layer_s"] == pytest.approx(got["dispatch_s"] + got["combine_s"])


def test_the_step_with_the_exchange_adds_it_once_per_moe_layer():
    args = rank_sim.ModelArgs.from_hf_config(rank_sim.DEEPSEEK_V3, source="DeepSeek-V3")
    link = rank_sim.LinkModel(bytes_per_s=150e9, latency_s=25e-6)
    row = {"tokens_received": 990, "scaled_step_s": 0.05}
    out = rank_sim.with_comm(row, args, link, tokens_per_rank=256)
    per_layer = rank_sim.alltoall_model(args.dim, 990, link)["per_moe_layer_s"]
    assert out["comm_step_s"] == pytest.approx(58 * per_layer)  # 61 layers, 3 dense
    assert out["node_tokens_per_s_with_comm"] == pytest.approx(8 * 256 / (0.05 + 58 * per_layer))
