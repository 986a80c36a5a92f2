"""How a worker runs a step's forward: eagerly, or (decode) by replaying a CUDA graph.

Decode steps have static shapes once the batch is padded: graphs are captured at start-up for a
ladder of batch sizes (after a warm-up that compiles the kernels) and a decode batch of B
sequences replays the smallest graph of size Bg >= max(B, 1). The graph reads its inputs from
static buffers that each step overwrites; rows B..Bg-1 are padding: token 0 at position 0, one
token of context, writing and reading only the KV cache's scratch page, never sampled. A T = 0
plan replays the size-1 graph with its one row padded, so an idle rank still runs every layer
and, with expert parallelism, every collective of the fixed-capacity MoE exchange (captured in
the graph). Prefill steps, and decode batches larger than the largest graph, run eagerly.
Before each decode forward or replay, the model's decode attention plans the step on the host
(a no-op for our kernel; FlashInfer's schedule of the step's work, model/decode_attention.py).

With capture=False (the CPU, tests) the padded static-buffer forward runs eagerly instead of
being replayed: the same inputs and padding, checkable without a GPU.

Shapes: the legend in docs/ARCHITECTURE.md (B, Bg the rows of a graph, W, H).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from nmoe_serve.engine.plan import StepPlan
from nmoe_serve.model.batch import StepBatch
from nmoe_serve.model.deepseek_v3 import DeepseekV3
from nmoe_serve.model.rope import RotaryEmbedding
from nmoe_serve.worker.step_batch import Feed, PlanError, build_step_batch, decode_inputs, to_device

log = logging.getLogger(__name__)


def graph_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The ladder of graph batch sizes: 1, 2, 4, 8, 16, then multiples of 32, up to and
    including max_batch (padding wastes at most 31 rows above 32)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes = {s for s in (1, 2, 4, 8, 16) if s < max_batch}
    sizes.update(range(32, max_batch, 32))
    sizes.add(max_batch)
    return tuple(sorted(sizes))


def graph_size_for(num_seqs: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest size in `sizes` holding max(num_seqs, 1) rows, or None if none does."""
    need = max(num_seqs, 1)
    return next((s for s in sizes if s >= need), None)


class EagerSteps:
    """Runs any plan eagerly: builds the StepBatch and calls the model."""

    def __init__(
        self,
        model: DeepseekV3,
        kv_layers: list[torch.Tensor],
        rope: RotaryEmbedding,
        page_size: int,
        device: torch.device,
    ) -> None:
        self.model, self.kv_layers, self.rope = model, kv_layers, rope
        self.page_size, self.device = page_size, device

    def run(self, plan: StepPlan, feed: Feed | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [T, H], logits_rows [B_sampled]) for `plan`, the `feed` tokens in their rows."""
        input_ids, batch = build_step_batch(plan, self.page_size, self.rope, self.device, feed)
        if not batch.is_prefill:
            self.model.backend.decode_attention.plan(plan.context_lens, batch.page_table, graph=False)
        return self.model(input_ids, batch, self.kv_layers), batch.logits_rows


class DecodeGraphs:
    """Decode steps from CUDA graphs at `sizes` (see the module docstring); `fallback` runs
    decode batches larger than sizes[-1]."""

    def __init__(
        self,
        model: DeepseekV3,
        kv_layers: list[torch.Tensor],
        scratch_page: int,
        rope: RotaryEmbedding,
        page_size: int,
        max_pages_per_seq: int,
        sizes: tuple[int, ...],
        device: torch.device,
        fallback: EagerSteps,
        capture: bool = True,
    ) -> None:
        if not sizes or list(sizes) != sorted(set(sizes)) or sizes[0] < 1:
            raise ValueError(f"graph sizes must be increasing positive batch sizes, got {sizes}")
        if capture and device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
        self.model, self.kv_layers, self.rope = model, kv_layers, rope
        self.page_size, self.sizes, self.device = page_size, sizes, device
        self.fallback, self.capture_graphs = fallback, capture
        self.scratch_page = scratch_page
        self.scratch_slot = scratch_page * page_size
        self.width = max_pages_per_seq
        rows = sizes[-1]
        with torch.inference_mode():
            self.input_ids = torch.zeros(rows, dtype=torch.int64, device=device)  # [Bg]
            self.positions = torch.zeros(rows, dtype=torch.int64, device=device)  # [Bg]
            self.slot_mapping = torch.full(
                (rows,), self.scratch_slot, dtype=torch.int64, device=device
            )  # [Bg]
            self.context_lens = torch.ones(rows, dtype=torch.int32, device=device)  # [Bg]
            self.page_table = torch.full((rows, self.width), -1, dtype=torch.int32, device=device)  # [Bg, W]
            self.page_table[:, 0] = scratch_page
            self.row_index = torch.arange(rows + 1, dtype=torch.int64, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _batch(self, size: int) -> tuple[torch.Tensor, StepBatch]:
        """The model's inputs for a graph of `size` rows: views of the static buffers. The host
        lists (query_lens, context_lens) are placeholders: decode reads only the tensors."""
        positions = self.positions[:size]
        cos, sin = self.rope.cos_sin(positions)  # inside the graph: recomputed at every replay
        cu = self.row_index[: size + 1].int()
        batch = StepBatch(
            is_prefill=False,
            positions=positions,
            slot_mapping=self.slot_mapping[:size],
            rope_cos=cos,
            rope_sin=sin,
            query_lens=[1] * size,
            context_lens=[1] * size,
            cu_query_lens=cu,
            cu_context_lens=cu,
            context_lens_t=self.context_lens[:size],
            page_table=self.page_table[:size],
            context_slots=self.slot_mapping[:0],
            logits_rows=self.row_index[:size],
        )
        return self.input_ids[:size], batch

    def _forward(self, size: int) -> torch.Tensor:
        input_ids, batch = self._batch(size)
        return self.model(input_ids, batch, self.kv_layers)  # [Bg, H]

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture one graph per size, largest first, sharing one memory pool."""
        if not self.capture_graphs:
            return
        started = time.monotonic()
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            self._plan(size, np.ones(size, np.int32))  # the padding rows' one token of context
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):  # compiles the kernels for this shape, settles the allocator
                    self._forward(size)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self._forward(size)
            self._graphs[size] = (graph, hidden)
        torch.cuda.synchronize(self.device)
        log.info(
            "captured decode CUDA graphs at batch sizes %s in %.1f s",
            list(self.sizes),
            time.monotonic() - started,
        )

    def run(self, plan: StepPlan, feed: Feed | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [B, H], logits_rows [B_sampled]) of a decode plan, the `feed` tokens in their rows."""
        b = plan.num_seqs
        size = graph_size_for(b, self.sizes)
        if size is None:
            return self.fallback.run(plan, feed)
        inputs = decode_inputs(plan, self.page_size)
        context_lens = self._write_inputs(size, b, inputs, plan)
        self._plan(size, context_lens)
        if feed is not None:
            self.input_ids[feed[0]] = feed[1]
        if self.capture_graphs:
            graph, hidden = self._graphs[size]
            graph.replay()
        else:
            hidden = self._forward(size)
        return hidden[:b], to_device(inputs["logits_rows"], self.device)

    def _plan(self, size: int, context_lens: np.ndarray) -> None:
        self.model.backend.decode_attention.plan(context_lens, self.page_table[:size], graph=True)

    def _write_inputs(self, size: int, b: int, inputs: dict[str, np.ndarray], plan: StepPlan) -> np.ndarray:
        """Writes the static buffers of a graph of `size` rows; returns the rows' context lengths."""
        width = plan.page_table.shape[1]
        if width > self.width:
            raise PlanError(
                f"step {plan.step_id}: page table has {width} columns but the decode graphs hold "
                f"{self.width} (one max_seq_len sequence)"
            )
        token_ids = np.zeros(size, np.int64)
        positions = np.zeros(size, np.int64)
        slots = np.full(size, self.scratch_slot, np.int64)
        context_lens = np.ones(size, np.int32)
        table = np.full((size, width), -1, np.int32)
        token_ids[:b] = inputs["token_ids"]
        positions[:b] = inputs["positions"]
        slots[:b] = inputs["slot_mapping"]
        context_lens[:b] = inputs["context_lens"]
        table[:b] = plan.page_table
        table[b:, 0] = self.scratch_page
        # Columns past `width` keep earlier steps' entries: they lie beyond every row's context
        # and are never read.
        # Enqueued behind the step still running (on CUDA through pinned memory, no host wait).
        self.input_ids[:size].copy_(to_device(token_ids, self.device))
        self.positions[:size].copy_(to_device(positions, self.device))
        self.slot_mapping[:size].copy_(to_device(slots, self.device))
        self.context_lens[:size].copy_(to_device(context_lens, self.device))
        self.page_table[:size, :width].copy_(to_device(table, self.device))
        return context_lens
