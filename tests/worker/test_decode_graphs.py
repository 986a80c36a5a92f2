"""The decode-graph machinery without a GPU: the batch-size ladder, and the padded static-buffer
forward (what a CUDA graph replays) run eagerly against the plain eager decode.

Padded rows must not change the real rows' results: logits agree to 1e-5 in float32 (the padded
batch is computed row by row, so only association order may differ), and the KV cache's real
pages are identical; padded rows write only the scratch page.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nmoe_serve.config import ServeConfig
from nmoe_serve.engine.plan import StepKind, StepPlan
from nmoe_serve.model.args import ModelArgs
from nmoe_serve.model.attention import SdpaPrefill
from nmoe_serve.model.backend import ModelBackend, kernel_backend, reference_ops
from nmoe_serve.topology import Topology
from nmoe_serve.worker.cuda_graphs import DecodeGraphs, EagerSteps, graph_batch_sizes, graph_size_for
from nmoe_serve.worker.step_batch import PlanError, decode_inputs
from nmoe_serve.worker.worker import Worker
from tests.helpers import ManualPlans, resolve

PAGE_SIZE, NUM_PAGES, MAX_SEQ_LEN = 8, 64, 256


def test_graph_batch_sizes_ladder() -> None:
    assert graph_batch_sizes(1) == (1,)
    assert graph_batch_sizes(3) == (1, 2, 3)
    assert graph_batch_sizes(16) == (1, 2, 4, 8, 16)
    assert graph_batch_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert graph_batch_sizes(256) == (1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 224, 256)
    assert graph_batch_sizes(100)[-3:] == (64, 96, 100)
    with pytest.raises(ValueError):
        graph_batch_sizes(0)


def test_graph_size_for_pads_up_and_gives_an_idle_step_one_row() -> None:
    sizes = (1, 2, 4, 8, 16, 32, 64)
    assert graph_size_for(0, sizes) == 1  # T = 0: one padded row, so the step still runs
    assert graph_size_for(1, sizes) == 1
    assert graph_size_for(3, sizes) == 4
    assert graph_size_for(33, sizes) == 64
    assert graph_size_for(65, sizes) is None  # eager


def make_worker(path: Path, backend: ModelBackend | None) -> Worker:
    config = ServeConfig.from_dict(
        {
            "model": {"path": str(path), "dtype": "float32", "max_seq_len": MAX_SEQ_LEN},
            "cache": {"page_size": PAGE_SIZE, "num_pages": NUM_PAGES},
            "device": {"kind": "cpu"},
        }
    )
    return Worker(resolve(config), Topology(), backend=backend)


def padded(worker: Worker, sizes: tuple[int, ...]) -> DecodeGraphs:
    """The worker's decode through the padded static buffers, run eagerly (capture=False)."""
    eager = worker.steps[StepKind.PREFILL]
    assert isinstance(eager, EagerSteps)
    graphs = DecodeGraphs(
        worker.model,
        worker.kv_cache.layers,
        worker.kv_cache.scratch_page,
        worker.rope,
        PAGE_SIZE,
        MAX_SEQ_LEN // PAGE_SIZE,
        sizes,
        worker.device,
        fallback=eager,
        capture=False,
    )
    graphs.capture()  # nothing to capture on the CPU
    return graphs


BACKENDS = {
    "reference": lambda args: None,
    "kernel-refs": lambda args: kernel_backend(args, reference_ops(), SdpaPrefill()),
}


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_padded_decode_matches_eager_decode(tiny_fp32: Path, backend: str) -> None:
    args = ModelArgs.from_checkpoint(tiny_fp32)
    eager, graphed = (
        make_worker(tiny_fp32, BACKENDS[backend](args)),
        make_worker(tiny_fp32, BACKENDS[backend](args)),
    )
    graphed.steps[StepKind.DECODE] = padded(graphed, (1, 2, 4, 8))
    g = torch.Generator().manual_seed(5)
    seqs = {f"s{i}": torch.randint(0, 496, (n,), generator=g).tolist() for i, n in enumerate((13, 30, 6))}
    plans = ManualPlans(PAGE_SIZE, NUM_PAGES, seed=5)
    steps = [plans.prefill([(s, t[:-4]) for s, t in seqs.items()])]
    steps += [plans.decode([(s, t[-k]) for s, t in seqs.items()]) for k in (4, 3)]  # 3 rows -> 4
    steps.append(plans.decode([]))  # T = 0 -> 1 padded row
    steps.append(plans.decode([("s1", seqs["s1"][-2])]))  # 1 row, no padding
    steps.append(plans.decode([(s, t[-1]) for s, t in seqs.items() if s != "s1"]))  # 2 rows
    for plan in steps:
        want = eager.logits_for(plan, all_positions=plan.kind == StepKind.PREFILL)
        got = graphed.logits_for(plan, all_positions=plan.kind == StepKind.PREFILL)
        assert (
            got.shape
            == want.shape
            == (plan.num_tokens if plan.kind == StepKind.PREFILL else plan.num_seqs, 512)
        )
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    scratch = eager.kv_cache.scratch_page
    real_eager, real_graphed = eager.kv_cache.storage[:, :scratch], graphed.kv_cache.storage[:, :scratch]
    torch.testing.assert_close(real_graphed, real_eager, atol=1e-5, rtol=1e-5)
    assert not eager.kv_cache.storage[:, scratch].any()  # eager decode never touches the scratch page
    assert graphed.kv_cache.storage[:, scratch].any()


def test_decode_batches_beyond_the_largest_graph_run_eagerly(tiny_fp32: Path) -> None:
    eager, graphed = make_worker(tiny_fp32, None), make_worker(tiny_fp32, None)
    graphed.steps[StepKind.DECODE] = padded(graphed, (1, 2))
    plans = ManualPlans(PAGE_SIZE, NUM_PAGES)
    prefill = plans.prefill([("a", [5, 6, 7]), ("b", [8, 9]), ("c", [10])])
    decode = plans.decode([("a", 1), ("b", 2), ("c", 3)])
    for worker in (eager, graphed):
        worker.logits_for(prefill)
    torch.testing.assert_close(graphed.logits_for(decode), eager.logits_for(decode), atol=1e-5, rtol=1e-5)
    assert not graphed.kv_cache.storage[:, graphed.kv_cache.scratch_page].any()


def test_graphs_need_cuda_and_sorted_sizes(tiny_fp32: Path) -> None:
    worker = make_worker(tiny_fp32, None)
    with pytest.raises(ValueError, match="CUDA device"):
        DecodeGraphs(
            worker.model,
            worker.kv_cache.layers,
            0,
            worker.rope,
            PAGE_SIZE,
            4,
            (1, 2),
            worker.device,
            None,
            True,  # type: ignore[arg-type]
        )
    with pytest.raises(ValueError, match="increasing"):
        DecodeGraphs(
            worker.model,
            worker.kv_cache.layers,
            0,
            worker.rope,
            PAGE_SIZE,
            4,
            (2, 1),
            worker.device,
            None,
            False,  # type: ignore[arg-type]
        )


def test_plans_the_graphs_cannot_take_are_refused(tiny_fp32: Path) -> None:
    worker = make_worker(tiny_fp32, None)
    plans = ManualPlans(PAGE_SIZE, NUM_PAGES)
    with pytest.raises(PlanError, match="not a decode plan"):
        decode_inputs(plans.prefill([("a", [1, 2])]), PAGE_SIZE)
    graphs = padded(worker, (1, 2))
    wide = StepPlan(
        step_id=9,
        kind=StepKind.DECODE,
        rank=0,
        released=(),
        new_requests=(),
        request_ids=("a",),
        query_lens=np.ones(1, np.int32),
        context_lens=np.ones(1, np.int32),
        token_ids=np.zeros(1, np.int64),
        page_table=np.zeros((1, MAX_SEQ_LEN // PAGE_SIZE + 1), np.int32),
        sample=np.ones(1, bool),
    )
    with pytest.raises(PlanError, match="decode graphs hold"):
        graphs.run(wide)
