"""MTP speculative decoding on a CUDA GPU: the kernel path (Triton kernels, decode CUDA graphs at
the token-row ladder, bf16) on a tiny checkpoint with the kernels' dims and its MTP layer.

The CPU tests pin exactness (tests/worker/test_speculative.py). Here: a verify step's token rows
replayed from a CUDA graph give the logits the plain decode graphs give for the same positions,
row by row (the same kernels over the same cache rows; bf16 rounding may differ with the graph's
size: max abs 0.25 on logits of order 5, and the same argmax wherever the top-2 margin exceeds
0.3), and the engine serves greedy requests with MTP on the GPU, with graphs, every request to
its max_tokens, its first token (the same prefill) equal to the one without MTP.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from nmoe_serve.engine.plan import StepKind
from nmoe_serve.llm import LLM
from nmoe_serve.model.tiny import TINY_KERNEL_OVERRIDES, make_tiny_checkpoint
from nmoe_serve.sampling.params import SamplingParams
from nmoe_serve.worker.cuda_graphs import DecodeGraphs
from nmoe_serve.worker.step_batch import token_rows
from tests.helpers import ManualPlans

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

OPTIONS = {
    "dtype": "bfloat16",
    "device": "cuda",
    "max_seq_len": 512,
    "page_size": 64,
    "num_pages": 64,
    "max_num_seqs": 8,
    "overlap": False,
}


@pytest.fixture(scope="module")
def kernel_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("gpu-mtp"), seed=4, dtype=torch.bfloat16, overrides=TINY_KERNEL_OVERRIDES
    )


def test_verify_rows_from_a_graph_give_the_plain_decode_logits(kernel_tiny: Path) -> None:
    engine = LLM(kernel_tiny, speculative_method="mtp", num_draft_tokens=2, **OPTIONS)
    try:
        worker = engine.engine.executor.worker  # type: ignore[attr-defined]
        assert isinstance(worker.steps[StepKind.DECODE], DecodeGraphs)
        plans = ManualPlans(64, 64)
        rng = np.random.default_rng(0)
        prompts = {f"s{i}": rng.integers(0, 400, 40 + 9 * i).tolist() for i in range(4)}
        worker.logits_for(plans.prefill(list(prompts.items())))
        drafts = {s: rng.integers(0, 400, 3).tolist() for s in prompts}
        plain, last = [], None
        for j in range(3):  # three plain decode steps: the verify's positions one at a time
            last = plans.decode([(s, d[j]) for s, d in drafts.items()])
            plain.append(worker.logits_for(last))
        want = torch.stack(plain, dim=1).reshape(12, -1)  # [B·J, V], row b·J + j
        assert last is not None  # its context ends where the verify's does; its pages hold it
        verify = dataclasses.replace(
            last,
            query_lens=np.full(4, 3, np.int32),
            token_ids=np.array([t for s in prompts for t in drafts[s]], np.int64),
        )
        got = worker.logits_for(token_rows(verify))
        assert (got - want).abs().max() <= 0.25
        top2 = want.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.3
        assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
    finally:
        engine.shutdown()


def test_the_engine_serves_greedy_requests_with_mtp_on_the_gpu(kernel_tiny: Path) -> None:
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 400, int(rng.integers(5, 200))).tolist() for _ in range(12)]
    params = SamplingParams(max_tokens=24, ignore_eos=True, temperature=0.0)
    plain = LLM(kernel_tiny, **OPTIONS)
    spec = LLM(kernel_tiny, speculative_method="mtp", num_draft_tokens=2, **OPTIONS)
    try:
        want = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
        got = [o.outputs[0].token_ids for o in spec.generate(prompts, params)]
        assert all(len(g) == 24 for g in got)
        assert [g[0] for g in got] == [w[0] for w in want]
        scheduler = spec.engine.scheduler
        assert scheduler.num_verified_seqs > 0
        assert all(p.num_free == p.num_pages for p in scheduler.pools)
    finally:
        plain.shutdown()
        spec.shutdown()
