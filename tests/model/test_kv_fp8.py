"""The FP8 latent KV cache ([cache] kv_dtype = "fp8") end to end on the CPU path (tiny model).

The model's torch path over the FP8 cache writes rows quantized per token (kernels/kv_fp8.py),
prefill reads its cached context dequantized, decode runs `mla_decode_fp8_ref`. The FP8 worker must
equal the float32 path over rows rounded through the format, and stay near the float32 cache;
pages are counted at their FP8 size; impossible combinations are refused.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from nmoe_serve.config import ConfigError, ServeConfig
from nmoe_serve.kernels.kv_fp8 import dequantize_kv_rows_ref, quantize_kv_rows_ref
from nmoe_serve.kernels.mla_kv_write import mla_kv_write_ref
from nmoe_serve.model.tiny import TINY_KERNEL_OVERRIDES, make_tiny_checkpoint
from nmoe_serve.settings import fp8_decode_kernel_takes
from nmoe_serve.topology import Topology
from nmoe_serve.worker.kv_cache import page_bytes
from nmoe_serve.worker.worker import Worker
from tests.helpers import ManualPlans, resolve

PAGE_SIZE = 8
NUM_PAGES = 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("kv-fp8"), seed=11, dtype=torch.float32)


def make_worker(path, kv_dtype: str) -> Worker:
    config = ServeConfig.from_dict(
        {
            "model": {"path": str(path), "dtype": "float32", "max_seq_len": 256},
            "cache": {"page_size": PAGE_SIZE, "num_pages": NUM_PAGES, "kv_dtype": kv_dtype},
            "device": {"kind": "cpu"},
        }
    )
    return Worker(resolve(config), Topology())


def run_steps(worker: Worker, seqs: list[list[int]], decode_steps: int) -> list[torch.Tensor]:
    """Logits of a chunked prefill (two chunks: the second reads the first's cached pages), then
    `decode_steps` decode steps."""
    plans = ManualPlans(worker.settings.core.page_size, worker.num_pages, seed=2)
    prompt = [s[: len(s) - decode_steps] for s in seqs]
    out = [
        worker.logits_for(plans.prefill([(f"s{i}", p[:9]) for i, p in enumerate(prompt)]), all_positions=True)
    ]
    out.append(
        worker.logits_for(plans.prefill([(f"s{i}", p[9:]) for i, p in enumerate(prompt)]), all_positions=True)
    )
    for step in range(decode_steps):
        tokens = [(f"s{i}", s[len(s) - decode_steps + step]) for i, s in enumerate(seqs)]
        out.append(worker.logits_for(plans.decode(tokens)))
    return out


def _seqs() -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 496, (n,), generator=g).tolist() for n in (30, 17, 41)]


def test_fp8_cache_is_the_float32_path_over_quantized_rows(checkpoint) -> None:
    """The FP8 worker's logits equal (1e-5) those of a float32 cache into which every written row
    went through quantize and dequantize: so the write, prefill's dequantizing read and the FP8
    decode reference read exactly what was written, at the right slots and scales."""
    emulated = make_worker(checkpoint, "auto")

    def write_rounded(kv_a, weight, eps, cos, sin, kv_cache, slot_mapping) -> None:
        rows = torch.zeros(slot_mapping.numel(), 1, kv_cache.shape[-1])  # [T, 1, C]
        mla_kv_write_ref(kv_a, weight, eps, cos, sin, rows, torch.arange(slot_mapping.numel()))
        L = weight.shape[0]
        rounded = dequantize_kv_rows_ref(quantize_kv_rows_ref(rows[:, 0], L), L, torch.float32)  # [T, C]
        kv_cache.view(-1, kv_cache.shape[-1])[slot_mapping] = rounded

    for layer in emulated.model.model.layers:
        layer.self_attn.ops = dataclasses.replace(layer.self_attn.ops, mla_kv_write=write_rounded)
    fp8 = make_worker(checkpoint, "fp8")
    assert fp8.kv_cache.storage.dtype == torch.float8_e4m3fn
    assert fp8.model.backend.decode_attention.name == "mla_decode_fp8_ref"
    for a, b in zip(run_steps(fp8, _seqs(), 6), run_steps(emulated, _seqs(), 6), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fp8_cache_logits_stay_near_the_float32_cache(checkpoint) -> None:
    """Against the float32 cache: the tiny random model amplifies KV noise (a bf16 cache already
    moves some rows' logits by 16% of their largest magnitude, through flipped expert choices), so
    the bound is on the median row: measured 4.5% mean relative error, 85% greedy agreement."""
    fp8, full = make_worker(checkpoint, "fp8"), make_worker(checkpoint, "auto")
    a, b = torch.cat(run_steps(fp8, _seqs(), 6)), torch.cat(run_steps(full, _seqs(), 6))  # [rows, V]
    rel = (a - b).abs().mean(-1) / b.abs().mean(-1)  # [rows]
    assert 0 < rel.median() < 0.1, f"median row error {rel.median():.3f}"
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75


def test_fp8_pages_take_their_packed_rows(checkpoint) -> None:
    worker = make_worker(checkpoint, "fp8")
    args = worker.settings.args
    row = args.kv_cache_dim + 16  # C e4m3 bytes + two float32 scales + padding
    assert page_bytes(args, PAGE_SIZE, torch.float8_e4m3fn) == args.n_layers * PAGE_SIZE * row
    assert page_bytes(args, PAGE_SIZE, torch.bfloat16) == args.n_layers * PAGE_SIZE * args.kv_cache_dim * 2
    assert worker.kv_cache.nbytes == (NUM_PAGES + 1) * page_bytes(args, PAGE_SIZE, torch.float8_e4m3fn)


def test_deepseek_dims_take_the_fp8_kernel_and_tiny_ones_do_not() -> None:
    assert fp8_decode_kernel_takes(512, 64, 64)
    assert fp8_decode_kernel_takes(128, 32, 32)
    assert not fp8_decode_kernel_takes(512, 64, 16)  # an e4m3 dot's K is at least 32
    assert not fp8_decode_kernel_takes(32, 8, 8)
    assert not fp8_decode_kernel_takes(512, 64, 8)


def test_refusals_name_key_value_and_fix(checkpoint) -> None:
    with pytest.raises(Exception, match="kv_dtype"):
        ServeConfig.from_dict({"model": {"path": str(checkpoint)}, "cache": {"kv_dtype": "int8"}})
    config = ServeConfig.from_dict(
        {
            "model": {"path": str(checkpoint), "dtype": "bfloat16", "max_seq_len": 256},
            "cache": {"page_size": PAGE_SIZE, "kv_dtype": "fp8"},
            "device": {"kind": "cuda", "cuda_graphs": True},
        }
    )
    from nmoe_serve.settings import resolve_settings

    with pytest.raises(ConfigError, match=r"cache.kv_dtype = 'fp8'.*device.cuda_graphs = false"):
        resolve_settings(config, cuda_available=True)
    assert (
        resolve_settings(
            config.model_copy(update={"device": config.device.model_copy(update={"cuda_graphs": False})}),
            cuda_available=True,
        ).kv_dtype
        == "fp8"
    )


def _gpu_worker(path: Path, kv_dtype: str, graphs: bool) -> Worker:
    config = ServeConfig.from_dict(
        {
            "model": {"path": str(path), "dtype": "bfloat16", "max_seq_len": 1024},
            "cache": {"page_size": 64, "num_pages": 64, "kv_dtype": kv_dtype},
            "device": {"kind": "cuda", "cuda_graphs": graphs, "cuda_graph_max_batch": 8},
        }
    )
    return Worker(resolve(config), Topology())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fp8_cache_runs_the_fp8_kernels_eager_and_in_graphs(tmp_path: Path) -> None:
    """A tiny FP8 model with the dims the kernels serve (TINY_KERNEL_OVERRIDES: L 128, R 32) on
    the GPU: decode runs `mla_decode_fp8` (eager and from CUDA graphs, which must agree), near the
    bf16 cache."""
    path = make_tiny_checkpoint(tmp_path / "tiny", seed=3, fp8=True, overrides=TINY_KERNEL_OVERRIDES)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 496, (n,), generator=g).tolist() for n in (150, 70, 300)]
    eager, graphed, bf16 = (
        _gpu_worker(path, *case) for case in (("fp8", False), ("fp8", True), ("auto", False))
    )
    from nmoe_serve.kernels.mla_decode_fp8 import gluon_available

    gluon, _ = gluon_available(torch.device("cuda"))
    expected = "mla_decode_fp8_gluon" if gluon else "mla_decode_fp8"
    assert eager.model.backend.decode_attention.name == expected
    assert eager.kv_cache.storage.dtype == torch.float8_e4m3fn
    a, b, c = (torch.cat(run_steps(w, seqs, 6)).float().cpu() for w in (eager, graphed, bf16))
    decode_rows = slice(a.shape[0] - 6 * len(seqs), None)
    # Prefill runs eagerly in both; decode from graphs of 8 rows and a 16-page table splits the
    # contexts differently from the eager 3 rows (the kernel's P rounding differs per split).
    torch.testing.assert_close(a[: decode_rows.start], b[: decode_rows.start])
    graph_rel = (a - b)[decode_rows].abs().mean(-1) / a[decode_rows].abs().mean(-1)
    assert graph_rel.median() < 0.1, f"graphs against eager: median decode row error {graph_rel.median():.3f}"
    rel = (a - c).abs().mean(-1) / c.abs().mean(-1)
    assert 0 < rel.median() < 0.1, f"median row error {rel.median():.3f}"


def test_fp8_ops_take_the_kernels_only_where_they_serve_the_dims() -> None:
    from nmoe_serve.kernels import mla_decode_fp8, mla_kv_write
    from nmoe_serve.model.args import DEEPSEEK_V3_HF_CONFIG, ModelArgs
    from nmoe_serve.model.backend import fp8_kv_ops, reference_ops
    from nmoe_serve.model.tiny import tiny_hf_config

    deepseek = ModelArgs.from_hf_config(DEEPSEEK_V3_HF_CONFIG)
    tiny = ModelArgs.from_hf_config(tiny_hf_config())
    as_triton = dataclasses.replace(reference_ops(), name="triton")  # the Triton family's choices
    ops = fp8_kv_ops(as_triton, deepseek, 64)
    assert ops.mla_decode is mla_decode_fp8.mla_decode_fp8
    assert ops.mla_kv_write is mla_kv_write.mla_kv_write_fp8
    assert fp8_kv_ops(as_triton, tiny, 64).mla_decode is mla_decode_fp8.mla_decode_fp8_ref
    assert fp8_kv_ops(as_triton, deepseek, 16).mla_decode is mla_decode_fp8.mla_decode_fp8_ref
    refs = fp8_kv_ops(reference_ops(), deepseek, 64)
    assert refs.mla_decode is mla_decode_fp8.mla_decode_fp8_ref
    assert refs.mla_kv_write is mla_kv_write.mla_kv_write_fp8_ref
