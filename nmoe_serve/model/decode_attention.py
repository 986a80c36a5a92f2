"""Decode attention cores: absorbed MLA over the paged latent cache, behind one small interface,
chosen once at start-up by the model backend (`choose_decode_attention`) and logged.

Every decode step first calls `plan` on the host, with the step's context lengths and the page
table every layer will read (before the forward, or before the replay of a CUDA graph, whose
static buffers are then the ones passed); then each layer's MLA calls the core.

- OpsDecode: the backend's `mla_decode` op (our Triton kernel on the GPU, its torch reference on
  the CPU). Nothing to plan.
- FlashInferDecode: FlashInfer's batch MLA paged attention, FA3 backend (Hopper), where the
  package imports and a trial plan at start-up accepts the model's dims (DeepSeek-V3's L 512,
  R 64 do; the tiny test models' R 32 does not). Its `plan` builds the step's work schedule on
  the host and stages it on the device; a captured graph of Bg rows keeps one FlashInfer
  wrapper whose buffers stay at the addresses the graph captured, and is re-planned before
  every replay.

Shapes: the legend in docs/ARCHITECTURE.md (B, Bg, N, L, R, C, P, NP, W).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch

from nmoe_serve.model.batch import StepBatch

log = logging.getLogger(__name__)

# FlashInfer's own guide for the float workspace of its MLA wrapper (split-K partials).
FLASHINFER_WORKSPACE_BYTES = 128 * 1024 * 1024


class DecodeAttention(Protocol):
    name: str

    def plan(self, context_lens: np.ndarray, page_table: torch.Tensor, graph: bool) -> None:
        """Host work for a decode step of B = len(context_lens) rows, before its forward or graph
        replay. page_table [B, W] int32 on the device, the very tensor the layers will read;
        graph: the rows are a captured graph's static buffers (the same tensor every step)."""
        ...

    def __call__(
        self,
        q_latent: torch.Tensor,
        q_pe: torch.Tensor,
        kv_cache: torch.Tensor,
        batch: StepBatch,
        scale: float,
    ) -> torch.Tensor:
        """q_latent [B, N, L] (q_nope · W_UK), q_pe [B, N, R], kv_cache [NP, P, C] → [B, N, L]."""
        ...


class OpsDecode:
    """The backend's `mla_decode` op (`nmoe_serve.kernels.mla_decode` or its `_ref`)."""

    def __init__(self, mla_decode: Callable[..., torch.Tensor], name: str = "mla_decode") -> None:
        self.fn, self.name = mla_decode, name

    def plan(self, context_lens: np.ndarray, page_table: torch.Tensor, graph: bool) -> None:
        return None

    def __call__(
        self,
        q_latent: torch.Tensor,
        q_pe: torch.Tensor,
        kv_cache: torch.Tensor,
        batch: StepBatch,
        scale: float,
    ) -> torch.Tensor:
        return self.fn(q_latent, q_pe, kv_cache, batch.page_table, batch.context_lens_t, scale)


class FlashInferDecode:
    """FlashInfer's `BatchMLAPagedAttentionWrapper` (backend "fa3") on our cache layout.

    The cache [NP, P, C] is passed as its two views c_kv [NP, P, L] and k_pe [NP, P, R] (strided,
    no copy); the page table [B, W] becomes FlashInfer's CSR page list, which must hold exactly
    ceil(len / P) pages per row (FlashInfer 0.7 checks it), so the -1 padding past a row's pages
    is left out. `flashinfer` is the imported module (tests pass a stand-in)."""

    name = "flashinfer-fa3"

    def __init__(
        self,
        flashinfer: Any,
        num_heads: int,
        latent: int,
        rope: int,
        page_size: int,
        softmax_scale: float,
        dtype: torch.dtype,
        device: torch.device,
        workspace_bytes: int = FLASHINFER_WORKSPACE_BYTES,
    ) -> None:
        self.fi = flashinfer
        self.num_heads, self.latent, self.rope, self.page_size = num_heads, latent, rope, page_size
        self.softmax_scale, self.dtype, self.device = softmax_scale, dtype, device
        self.workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=device)
        self.eager = flashinfer.BatchMLAPagedAttentionWrapper(self.workspace, backend="fa3")
        # One wrapper per captured graph (rows, page-table address): its buffers must keep the
        # addresses that the graph's kernels captured.
        self.graph_wrappers: dict[tuple[int, int], Any] = {}
        self.current: Any = None

    def _graph_wrapper(self, rows: int, width: int, table_ptr: int) -> Any:
        key = (rows, table_ptr)
        wrapper = self.graph_wrappers.get(key)
        if wrapper is None:
            wrapper = self.fi.BatchMLAPagedAttentionWrapper(
                self.workspace,
                use_cuda_graph=True,
                qo_indptr=torch.empty(rows + 1, dtype=torch.int32, device=self.device),  # [Bg + 1]
                kv_indptr=torch.empty(rows + 1, dtype=torch.int32, device=self.device),  # [Bg + 1]
                kv_indices=torch.empty(rows * width, dtype=torch.int32, device=self.device),  # [Bg * W]
                kv_len_arr=torch.empty(rows, dtype=torch.int32, device=self.device),  # [Bg]
                backend="fa3",
            )
            self.graph_wrappers[key] = wrapper
        return wrapper

    def plan(self, context_lens: np.ndarray, page_table: torch.Tensor, graph: bool) -> None:
        rows, width = page_table.shape
        lens = np.asarray(context_lens, dtype=np.int64)  # [B]
        if lens.shape != (rows,):
            raise ValueError(
                f"FlashInferDecode.plan: {lens.size} context lengths for a page table of {rows} rows"
            )
        if rows == 0:  # an idle rank's eager T = 0 step: nothing to plan, the call returns [0, N, L]
            self.current = self.eager
            return
        # FlashInfer's CSR list holds exactly ceil(len / P) pages per row: gather them from the
        # table (positions computed here, one gather on the device, no sync).
        pages = -(-lens // self.page_size)  # [B]
        kv_indptr = np.zeros(rows + 1, np.int32)  # [B + 1]
        np.cumsum(pages, out=kv_indptr[1:])
        first = np.repeat(kv_indptr[:-1], pages)  # [sum pages]
        cols = np.arange(int(kv_indptr[-1])) - first
        where = np.repeat(np.arange(rows) * width, pages) + cols  # flat positions in the table
        kv_indices = page_table.reshape(-1)[torch.from_numpy(where).to(page_table.device)]  # [sum pages]
        wrapper = self._graph_wrapper(rows, width, page_table.data_ptr()) if graph else self.eager
        metadata = self.fi.mla.MLAPlanMetadata.csr(
            qo_indptr=torch.arange(rows + 1, dtype=torch.int32),  # [B + 1] host: one query per row
            kv_indptr=torch.from_numpy(kv_indptr),
            kv_indices=kv_indices,
            kv_len_arr=torch.from_numpy(lens.astype(np.int32)),  # [B] host
        )
        wrapper.plan(
            metadata=metadata,
            num_heads=self.num_heads,
            head_dim_ckv=self.latent,
            head_dim_kpe=self.rope,
            page_size=self.page_size,
            causal=False,
            sm_scale=self.softmax_scale,
            q_data_type=self.dtype,
            kv_data_type=self.dtype,
            query_layout="split",
            kv_cache_layout="split",
        )
        self.current = wrapper

    def __call__(
        self,
        q_latent: torch.Tensor,
        q_pe: torch.Tensor,
        kv_cache: torch.Tensor,
        batch: StepBatch,
        scale: float,
    ) -> torch.Tensor:
        if self.current is None:
            raise RuntimeError("FlashInferDecode: a decode step ran without its plan (call plan first)")
        out = torch.empty(q_latent.shape, dtype=q_latent.dtype, device=q_latent.device)  # [B, N, L]
        if out.shape[0] == 0:
            return out
        self.current.run(
            query=(q_latent, q_pe),
            kv_cache=(kv_cache[..., : self.latent], kv_cache[..., self.latent :]),
            out=out,
        )
        return out


def flashinfer_decode(
    num_heads: int,
    latent: int,
    rope: int,
    page_size: int,
    softmax_scale: float,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[FlashInferDecode | None, str]:
    """FlashInferDecode for these dims, checked by a trial plan and run on a one-row cache; or
    None and the reason (not installed, not a CUDA device, dims or GPU it does not take)."""
    if device.type != "cuda":
        return None, f"not a CUDA device ({device})"
    try:
        import flashinfer  # type: ignore[import-not-found]
        import flashinfer.mla  # type: ignore[import-not-found]
    except Exception as e:  # ImportError, or a broken install that fails while importing
        return None, f"flashinfer does not import ({type(e).__name__}: {e})"
    try:
        core = FlashInferDecode(flashinfer, num_heads, latent, rope, page_size, softmax_scale, dtype, device)
        kv = torch.zeros(1, page_size, latent + rope, dtype=dtype, device=device)  # [1, P, C]
        table = torch.zeros(1, 1, dtype=torch.int32, device=device)  # [1, W]
        q = torch.zeros(1, num_heads, latent + rope, dtype=dtype, device=device)  # [1, N, C]
        core.plan(np.ones(1, np.int32), table, graph=False)
        core(q[..., :latent], q[..., latent:], kv, None, softmax_scale)  # type: ignore[arg-type]
        torch.cuda.synchronize(device)
    except Exception as e:
        return None, f"flashinfer's fa3 MLA refused N {num_heads}, L {latent}, R {rope}, P {page_size}: {e}"
    core.current = None
    return core, f"flashinfer {getattr(flashinfer, '__version__', '?')} fa3"
