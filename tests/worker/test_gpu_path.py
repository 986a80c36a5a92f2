"""The worker on a CUDA GPU against the CPU path, on the tiny checkpoint.

Tolerances. fp32: TF32 is switched off, so GPU and CPU differ only in summation order; 2e-2
absolute on logits of magnitude ~5 leaves a wide margin over that. bf16: rounding every
activation (and the weights) to 8 mantissa bits is a different model from fp32 — on the CPU,
bf16 and fp32 logits differ by 0.05 on average and up to 2.0 at worst — so the GPU's bf16 path is
compared with the CPU's bf16 path, where only summation order differs and a rounding flips only
when a value lies within ~1e-6 of a bf16 boundary: mean absolute difference at most 0.02 (under
half of the bf16-vs-fp32 gap), no element off by more than 0.25, and the same top-1 token
wherever the top-2 margin exceeds 0.3.
"""

from __future__ import annotations

import pytest
import torch

from nmoe_serve.config import ServeConfig
from nmoe_serve.engine.settings import resolve_settings
from nmoe_serve.topology import Topology
from nmoe_serve.worker.worker import Worker
from tests.helpers import ManualPlans

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def logits_on(path, device: str, dtype: str) -> torch.Tensor:
    config = ServeConfig.from_dict(
        {
            "model": {"path": str(path), "dtype": dtype, "max_seq_len": 512},
            "cache": {"page_size": 16, "num_pages": 64},
            "device": {"kind": device},
        }
    )
    worker = Worker(resolve_settings(config), Topology())
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 496, (n,), generator=g).tolist() for n in (40, 9, 77)]
    plans = ManualPlans(16, 64)
    prefill = worker.logits_for(
        plans.prefill([(f"s{i}", s[:-1]) for i, s in enumerate(seqs)]), all_positions=True
    )
    decode = worker.logits_for(plans.decode([(f"s{i}", s[-1]) for i, s in enumerate(seqs)]))
    return torch.cat([prefill, decode]).float().cpu()


def test_gpu_fp32_matches_cpu(tiny_fp32) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    cpu = logits_on(tiny_fp32, "cpu", "float32")
    gpu = logits_on(tiny_fp32, "cuda", "float32")
    torch.testing.assert_close(gpu, cpu, atol=2e-2, rtol=0)


def test_gpu_bf16_matches_cpu_bf16(tiny_fp32) -> None:
    cpu = logits_on(tiny_fp32, "cpu", "bfloat16")
    gpu = logits_on(tiny_fp32, "cuda", "bfloat16")
    assert (gpu - cpu).abs().mean() <= 0.02
    torch.testing.assert_close(gpu, cpu, atol=0.25, rtol=0)
    top2 = cpu.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.3
    assert (gpu.argmax(-1)[clear] == cpu.argmax(-1)[clear]).all()
