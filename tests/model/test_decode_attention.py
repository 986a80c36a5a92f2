"""Decode attention cores (model/decode_attention.py): FlashInfer's MLA on our cache layout.

On the CPU, FlashInferDecode runs against a stand-in for the flashinfer module whose wrapper
computes attention from exactly the CSR page list and lengths it was planned with: that pins how
our page table [B, W] and context lengths become FlashInfer's plan (and that graph wrappers keep
their buffers). On a GPU with flashinfer installed, the real FA3 kernel is compared with
`mla_decode_ref` at DeepSeek-V3's dims, eagerly and replayed from a CUDA graph re-planned per step.

Shapes: the legend in docs/ARCHITECTURE.md (B, N, L, R, C, P, NP, W).
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pytest
import torch

from nmoe_serve.kernels.mla_decode import mla_decode_ref
from nmoe_serve.model.args import ModelArgs
from nmoe_serve.model.backend import choose_decode_attention, reference_ops
from nmoe_serve.model.decode_attention import FlashInferDecode, OpsDecode
from nmoe_serve.model.tiny import tiny_hf_config


class _Metadata(SimpleNamespace):
    @classmethod
    def csr(cls, qo_indptr, kv_indptr, kv_indices, kv_len_arr):
        return cls(qo_indptr=qo_indptr, kv_indptr=kv_indptr, kv_indices=kv_indices, kv_len_arr=kv_len_arr)


class _FakeWrapper:
    """FlashInfer's BatchMLAPagedAttentionWrapper as far as FlashInferDecode uses it: attention
    over the pages kv_indices[kv_indptr[b] : kv_indptr[b + 1]], the first kv_len_arr[b] tokens."""

    made: ClassVar[list[_FakeWrapper]] = []

    def __init__(self, workspace, use_cuda_graph=False, qo_indptr=None, kv_indptr=None,
                 kv_indices=None, kv_len_arr=None, backend="auto"):  # fmt: skip
        assert backend == "fa3"
        self.use_cuda_graph, self.kv_indices_buf = use_cuda_graph, kv_indices
        self.plans: list[dict] = []
        _FakeWrapper.made.append(self)

    def plan(self, *, metadata, **kw):
        assert kw["query_layout"] == kw["kv_cache_layout"] == "split" and kw["causal"] is False
        # FlashInfer 0.7's rule: exactly ceil(len / P) pages per row, indptr starting at 0.
        pages = metadata.kv_indptr[1:] - metadata.kv_indptr[:-1]
        assert metadata.kv_indptr[0] == 0
        assert torch.equal(
            pages.long(), (metadata.kv_len_arr.long() + kw["page_size"] - 1) // kw["page_size"]
        )
        assert metadata.kv_indices.numel() == int(metadata.kv_indptr[-1])
        if self.use_cuda_graph:  # staged into the buffers given at construction
            assert self.kv_indices_buf.numel() >= metadata.kv_indices.numel()
        self.plans.append(dict(kw, meta=metadata))

    def run(self, *, query, kv_cache, out):
        plan = self.plans[-1]
        meta, scale = plan["meta"], plan["sm_scale"]
        (q_nope, q_pe), (ckv, kpe) = query, kv_cache
        for b in range(q_nope.shape[0]):
            pages = meta.kv_indices[meta.kv_indptr[b] : meta.kv_indptr[b + 1]].long()
            n = int(meta.kv_len_arr[b])
            assert (pages >= 0).all()
            c = ckv[pages].flatten(0, 1)[:n].float()  # [n, L]
            k = kpe[pages].flatten(0, 1)[:n].float()  # [n, R]
            scores = (q_nope[b].float() @ c.T + q_pe[b].float() @ k.T) * scale  # [N, n]
            out[b] = (scores.softmax(-1) @ c).to(out.dtype)
        return out


FAKE_FLASHINFER = SimpleNamespace(
    BatchMLAPagedAttentionWrapper=_FakeWrapper, mla=SimpleNamespace(MLAPlanMetadata=_Metadata)
)


def _problem(B, N, L, R, P, W, device, dtype=torch.float32, generator=None):
    """Random q, cache and a shuffled page table with -1 past each row's pages, lengths >= 1."""
    lens = torch.randint(1, W * P + 1, (B,), generator=generator).int()  # [B]
    num_pages = B * W + 1
    perm = torch.randperm(num_pages, generator=generator)[: B * W].view(B, W).int()  # [B, W]
    used = torch.arange(W)[None, :] < (-(-lens // P))[:, None]
    table = torch.where(used, perm, torch.full_like(perm, -1))
    kv = torch.randn(num_pages, P, L + R, generator=generator).to(dtype)  # [NP, P, C]
    q = torch.randn(B, N, L + R, generator=generator).to(dtype).to(device)  # [B, N, C]
    return q[..., :L], q[..., L:], kv.to(device), table.to(device), lens.to(device)


def test_flashinfer_core_plans_our_page_table_as_its_csr_list():
    torch.manual_seed(0)
    q, q_pe, kv, table, lens = _problem(5, 4, 32, 16, 8, 6, "cpu")
    scale = 0.3
    core = FlashInferDecode(FAKE_FLASHINFER, 4, 32, 16, 8, scale, torch.float32, torch.device("cpu"), 64)
    core.plan(lens.numpy(), table, graph=False)
    out = core(q, q_pe, kv, None, scale)  # type: ignore[arg-type]
    ref = mla_decode_ref(q, q_pe, kv, table, lens, scale)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    meta = core.eager.plans[-1]["meta"]
    assert meta.kv_len_arr.tolist() == lens.tolist()
    assert meta.kv_indices.tolist() == table[table >= 0].tolist()  # row by row, in page order


def test_flashinfer_core_keeps_one_wrapper_per_graph_and_replans_it():
    torch.manual_seed(1)
    _FakeWrapper.made.clear()
    q, q_pe, kv, table, lens = _problem(4, 2, 32, 16, 8, 3, "cpu")
    static = torch.full((8, 3), -1, dtype=torch.int32)  # a graph's static table of 8 rows, W 3
    core = FlashInferDecode(FAKE_FLASHINFER, 2, 32, 16, 8, 0.5, torch.float32, torch.device("cpu"), 64)
    for step in range(3):
        static[:4] = table
        lens_step = (lens - step).clamp(min=1)
        core.plan(lens_step.numpy(), static[:4], graph=True)
        out = core(q, q_pe, kv, None, 0.5)  # type: ignore[arg-type]
        torch.testing.assert_close(out, mla_decode_ref(q, q_pe, kv, table, lens_step.int(), 0.5))
    core.plan(np.ones(8, np.int32), static, graph=True)  # another graph size: its own wrapper
    assert len(core.graph_wrappers) == 2 and len(_FakeWrapper.made) == 3  # + the eager one
    assert len(core.graph_wrappers[(4, static.data_ptr())].plans) == 3


def test_flashinfer_core_refuses_a_step_without_a_plan_and_a_mismatched_plan():
    core = FlashInferDecode(FAKE_FLASHINFER, 2, 32, 16, 8, 0.5, torch.float32, torch.device("cpu"), 64)
    q, q_pe, kv, table, _ = _problem(2, 2, 32, 16, 8, 2, "cpu")
    with pytest.raises(RuntimeError, match="without its plan"):
        core(q, q_pe, kv, None, 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="3 context lengths for a page table of 2 rows"):
        core.plan(np.ones(3, np.int32), table, graph=False)


def test_flashinfer_core_runs_an_empty_step_without_calling_flashinfer():
    core = FlashInferDecode(FAKE_FLASHINFER, 2, 32, 16, 8, 0.5, torch.float32, torch.device("cpu"), 64)
    core.plan(np.zeros(0, np.int32), torch.zeros(0, 3, dtype=torch.int32), graph=False)
    out = core(torch.zeros(0, 2, 32), torch.zeros(0, 2, 16), torch.zeros(4, 8, 48), None, 0.5)  # type: ignore[arg-type]
    assert out.shape == (0, 2, 32) and not core.eager.plans


def test_cpu_decode_attention_is_the_ops_mla_decode():
    args = ModelArgs.from_hf_config(tiny_hf_config())
    ops = reference_ops()
    core = choose_decode_attention(args, ops, 16, torch.float32, torch.device("cpu"))
    assert isinstance(core, OpsDecode) and core.fn is ops.mla_decode


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None, reason="flashinfer is not installed")
def test_flashinfer_fa3_matches_the_reference_eager_and_in_a_replanned_graph():
    import flashinfer
    import flashinfer.mla

    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(7)
    B, N, L, R, P, W = 12, 128, 512, 64, 64, 40
    q, q_pe, kv, table, lens = _problem(B, N, L, R, P, W, device, torch.bfloat16, gen)
    # The engine's layout: q_latent is a [N, B, L] product seen as [B, N, L], q_pe a slice of q.
    q = q.transpose(0, 1).contiguous().transpose(0, 1)
    scale = 192**-0.5
    core = FlashInferDecode(flashinfer, N, L, R, P, scale, torch.bfloat16, device)
    core.plan(lens.cpu().numpy(), table, graph=False)
    out = core(q, q_pe, kv, None, scale)  # type: ignore[arg-type]
    ref = mla_decode_ref(q, q_pe, kv, table, lens, scale)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2

    static = table.clone()  # a graph's static buffers
    core.plan(lens.cpu().numpy(), static, graph=True)
    core(q, q_pe, kv, None, scale)  # type: ignore[arg-type]  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = core(q, q_pe, kv, None, scale)  # type: ignore[arg-type]
    for _ in range(2):  # new contexts each step: re-plan, replay
        q2, q_pe2, kv2, table2, lens2 = _problem(B, N, L, R, P, W, device, torch.bfloat16, gen)
        q.copy_(q2)
        q_pe.copy_(q_pe2)
        kv.copy_(kv2)
        static.copy_(table2)
        core.plan(lens2.cpu().numpy(), static, graph=True)
        graph.replay()
        ref = mla_decode_ref(q, q_pe, kv, static, lens2, scale)
        assert ((captured.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
