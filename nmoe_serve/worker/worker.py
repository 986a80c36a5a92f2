"""Worker: one rank's model shard, KV cache and sampler; executes one StepPlan per call.

A plain class with no Ray or HTTP in it: the single-rank engine calls it in-process, and the Ray
actor of the expert-parallel engine wraps it. Everything device-related is chosen here, once, at
construction, and logged.

Two ways to run steps: `execute(plan)` runs one and returns its results; `launch(plan)` runs it on
the worker's step thread (worker/pipeline.py) and returns the previous step's results, `flush()`
the last one's. Either way the tokens a step samples stay on the device, and a decode plan whose
token id is -1 - i takes the token this rank sampled for its previous step's i-th sampled row
(the coordinator planned the step before that token reached it). A StepClock records when each
step's device work starts and ends, so the idle time between steps can be read (`idle_times`).

Speculative decoding (CoreSettings.num_draft_tokens k > 0): the model holds the checkpoint's MTP
layer (its latents in one more layer of the KV cache, on the same pages), steps run through
`execute` only, a decode plan is a verify step of 1 + k tokens per sequence (run as one decode row
per token), the sampler accepts a prefix of the drafts, and the drafter (worker/drafter.py) makes
the next k drafts of every sampled sequence; the result carries both.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from nmoe_serve.engine.plan import StepKind, StepPlan, StepResult
from nmoe_serve.model.backend import ModelBackend, choose_backend
from nmoe_serve.model.deepseek_v3 import DeepseekV3
from nmoe_serve.model.loader import fill_dummy, load_checkpoint
from nmoe_serve.model.mtp import DeepseekV3WithMTP
from nmoe_serve.model.rope import RotaryEmbedding
from nmoe_serve.model.tiny import cached_tiny_checkpoint
from nmoe_serve.model.transport import ExpertTransport, make_transport
from nmoe_serve.sampling.sampler import DeviceSample, Sampler
from nmoe_serve.settings import EngineSettings
from nmoe_serve.topology import Topology
from nmoe_serve.worker.cuda_graphs import DecodeGraphs, EagerSteps, graph_batch_sizes
from nmoe_serve.worker.drafter import MTPDrafter
from nmoe_serve.worker.kv_cache import KVCache, page_bytes
from nmoe_serve.worker.pipeline import StepPipeline
from nmoe_serve.worker.step_batch import Feed, fed_rows, to_device, token_rows
from nmoe_serve.worker.step_clock import StepClock

log = logging.getLogger(__name__)

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class _Launched:
    """A step whose tokens are sampled (on the device) but not yet returned."""

    step_id: int
    sampled_ids: tuple[str, ...]
    sample: DeviceSample


class Worker:
    """One rank. With world_size > 1, torch.distributed must be initialised before construction
    (the Ray actor does it): the MoE layers then exchange tokens with the other ranks.

    `backend` and `transport` override the layer implementations and the MoE exchange chosen
    from the settings and the topology (tests: a recording transport, the kernels' references)."""

    def __init__(
        self,
        settings: EngineSettings,
        topology: Topology,
        backend: ModelBackend | None = None,
        transport: ExpertTransport | None = None,
    ) -> None:
        self.settings, self.topology = settings, topology
        self.device = torch.device(settings.device)
        args, core = settings.args, settings.core
        dtype = TORCH_DTYPES[settings.dtype]
        fp8_kv = settings.kv_dtype == "fp8"
        kv_dtype = torch.float8_e4m3fn if fp8_kv else dtype  # the cache's storage (kernels/kv_fp8.py)
        started = time.monotonic()
        self.num_drafts = core.num_draft_tokens
        model_class = DeepseekV3WithMTP if self.num_drafts else DeepseekV3
        backend = backend or choose_backend(
            settings.kernels, args, core.page_size, dtype, self.device, kv_dtype="fp8" if fp8_kv else "auto"
        )
        self.model = model_class(
            args,
            dtype=dtype,
            device=self.device,
            owned=topology.owned_experts(args.n_routed_experts),
            backend=backend,
            transport=transport
            or make_transport(
                topology, args.n_routed_experts, core.max_decode_tokens, gather_sum=backend.ops.gather_sum
            ),
        )
        self._load_weights()
        self.model.eval()
        self.rope = RotaryEmbedding(args.rope, self.device)
        self.num_pages = self._kv_pages(kv_dtype)
        self.kv_cache = KVCache(
            args, self.num_pages, core.page_size, kv_dtype, self.device, extra_layers=self.model.mtp_depth
        )
        self.sampler = Sampler(args.vocab_size, self.device, seed=settings.seed + topology.rank)
        self.eos_token_id = args.eos_token_ids[0] if args.eos_token_ids else None
        eager = EagerSteps(self.model, self.kv_cache.layers, self.rope, core.page_size, self.device)
        self.steps: dict[StepKind, EagerSteps | DecodeGraphs] = {
            StepKind.PREFILL: eager,
            StepKind.DECODE: eager,
        }
        graph_sizes = (
            graph_batch_sizes(settings.cuda_graph_max_batch) if settings.cuda_graph_max_batch else ()
        )
        if graph_sizes:
            graphs = DecodeGraphs(
                self.model,
                self.kv_cache.layers,
                self.kv_cache.scratch_page,
                self.rope,
                core.page_size,
                -(-core.max_seq_len // core.page_size),
                graph_sizes,
                self.device,
                fallback=eager,
            )
            graphs.capture()
            self.steps[StepKind.DECODE] = graphs
        self.drafter: MTPDrafter | None = None
        if isinstance(self.model, DeepseekV3WithMTP):
            self.drafter = MTPDrafter(
                self.model.mtp,
                self.kv_cache.extra_layers[0],
                self.rope,
                core.page_size,
                self.num_drafts,
                self.device,
                self.model.backend.decode_attention.plan,
            )
        self.clock = StepClock(self.device)
        self._last_ids: tuple[str, ...] = ()  # the previous step's sampled requests ...
        self._last_tokens = torch.zeros(0, dtype=torch.int64, device=self.device)  # ... and their tokens
        self._pipeline: StepPipeline[tuple[torch.Tensor, torch.Tensor], _Launched] | None = None
        log.info(
            "rank %d/%d: experts %s, %s, transport %s, decode %s, %d KV pages of %d tokens (%.1f MB), "
            "speculative %s, ready in %.1f s",
            topology.rank,
            topology.world_size,
            self.model.owned,
            self.model.backend.describe(),
            self.model.transport.name,
            f"CUDA graphs {list(graph_sizes)}" if graph_sizes else "eager",
            self.num_pages,
            core.page_size,
            self.kv_cache.nbytes / 1e6,
            f"MTP with {self.num_drafts} draft(s)" if self.num_drafts else "off",
            time.monotonic() - started,
        )

    def _load_weights(self) -> None:
        settings = self.settings
        if settings.load_format == "dummy":
            fill_dummy(self.model, seed=settings.seed)
            return
        path = settings.model_path
        if settings.tiny is not None:  # built here, on first use, by whichever rank gets the lock
            path = cached_tiny_checkpoint(settings.tiny.seed, settings.tiny.fp8)
        load_checkpoint(self.model, path)

    def _kv_pages(self, dtype: torch.dtype) -> int:
        settings, core = self.settings, self.settings.core
        if settings.num_pages is not None:
            return settings.num_pages
        per_page = page_bytes(settings.args, core.page_size, dtype, extra_layers=self.model.mtp_depth)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            total = torch.cuda.get_device_properties(self.device).total_memory
            budget = free - (1 - settings.memory_utilization) * total
        else:
            budget = settings.cpu_kv_cache_gib * 2**30
        pages = int(budget // per_page) - 1  # one more is the scratch page
        need = -(-core.max_seq_len // core.page_size)
        if pages < need:
            raise RuntimeError(
                f"rank {self.topology.rank}: memory left for the KV cache holds {max(pages, 0)} pages but one "
                f"sequence of max_seq_len={core.max_seq_len} needs {need}: raise "
                "cache.memory_utilization (GPU) or cache.cpu_kv_cache_gib (CPU), or lower model.max_seq_len"
            )
        return pages

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step and return its results."""
        if self._pipeline is not None:
            raise RuntimeError("execute() after launch(): a worker runs its steps one way (flush() first)")
        self._admit(plan)
        if self.drafter is not None:
            return self._speculative_step(plan, self.drafter)
        return self._resolve(self._sample(plan, self._forward(plan)))

    def launch(self, plan: StepPlan) -> StepResult | None:
        """Start `plan` on the step thread; return the previous launched step's results (None if none)."""
        if self.drafter is not None:
            raise RuntimeError(
                "launch(): speculative decoding runs its steps one at a time (execute); set scheduler.overlap = false"
            )
        if self._pipeline is None:
            self._pipeline = StepPipeline(
                self._admit,
                self._forward,
                self._sample,
                self._resolve,
                forward_is_queued=self.device.type == "cuda",
                timeout_s=self.settings.step_timeout_s,
                name=f"nmoe-steps-r{self.topology.rank}",
                context=self._step_thread_context,
            )
        return self._pipeline.launch(plan)

    def flush(self) -> StepResult | None:
        """The last launched step's results (None if none is pending)."""
        return None if self._pipeline is None else self._pipeline.flush()

    def close(self) -> None:
        """Stop the step thread (the worker is being replaced)."""
        if self._pipeline is not None:
            self._pipeline.close()
            self._pipeline = None

    def idle_times(self) -> list[tuple[int, int, int, float]]:
        """(step id, kind, previous kind, seconds the device was idle before it), the last steps'."""
        return self.clock.idle_times()

    def _step_thread_context(self) -> contextlib.AbstractContextManager[None]:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device.index or 0)
        return torch.inference_mode()

    def _admit(self, plan: StepPlan) -> None:
        for request_id in plan.released:
            if request_id in self.sampler:  # a release may be repeated after an abandoned step
                self.sampler.remove_request(request_id)
        for new in plan.new_requests:
            self.sampler.add_request(new.request_id, new.sampling, new.prompt_token_ids, new.output_token_ids)

    def _forward(self, plan: StepPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden [T, H], logits_rows [B_s]): the step's forward (enqueued, on CUDA)."""
        self.clock.begin(plan.step_id, int(plan.kind))
        hidden, logits_rows = self.steps[plan.kind].run(plan, self._feed(plan))
        return hidden, logits_rows

    def _feed(self, plan: StepPlan) -> Feed | None:
        fed = fed_rows(plan, self._last_ids)
        if fed is None:
            return None
        rows, index = fed
        return to_device(rows, self.device), self._last_tokens[to_device(index, self.device)]

    def _sample(self, plan: StepPlan, forward: tuple[torch.Tensor, torch.Tensor]) -> _Launched:
        hidden, logits_rows = forward
        logits = self.model.compute_logits(hidden[logits_rows])
        sampled_ids = plan.sampled_ids
        sample = self.sampler.sample_on_device(sampled_ids, logits, self.eos_token_id)
        self._last_ids, self._last_tokens = sampled_ids, sample.token_ids
        sample.start_copy()
        self.clock.end()
        return _Launched(plan.step_id, sampled_ids, sample)

    def _speculative_step(self, plan: StepPlan, drafter: MTPDrafter) -> StepResult:
        """One step with speculative decoding: the target's forward (a verify step for a decode
        plan), its tokens, then the next drafts of every sampled sequence."""
        self.clock.begin(plan.step_id, int(plan.kind))
        sampled_ids = plan.sampled_ids
        if plan.kind == StepKind.PREFILL:
            hidden, logits_rows = self.steps[plan.kind].run(plan)
            sample = self.sampler.sample_on_device(
                sampled_ids, self.model.compute_logits(hidden[logits_rows]), self.eos_token_id
            )
            drafts = drafter.after_prefill(plan, hidden, sample.token_ids, logits_rows)
            out = sample.to_host()
            num_emitted = None
            token_ids, logprobs, top_ids, top_logprobs, num_top = (
                out.token_ids, out.logprobs, out.top_token_ids, out.top_logprobs, out.num_top,
            )  # fmt: skip
        else:
            q = 1 + self.num_drafts
            rows = token_rows(plan)
            hidden, logits_rows = self.steps[plan.kind].run(rows)
            proposed = to_device(plan.token_ids.reshape(-1, q)[:, 1:], self.device)  # [B, k] the drafts
            verify = self.sampler.verify_on_device(
                sampled_ids, self.model.compute_logits(hidden[logits_rows]), proposed, self.eos_token_id
            )
            verify.start_copy()
            checked = verify.to_host()
            num_emitted = checked.num_emitted
            self.sampler.advance(sampled_ids, num_emitted)
            drafts = drafter.after_verify(rows, q, hidden, verify.token_ids, num_emitted)
            kept = np.arange(q)[None, :] < num_emitted[:, None]  # [B, q] the emitted tokens, row-major
            token_ids = checked.token_ids[kept]
            logprobs, top_ids, top_logprobs = (
                None if a is None else a[kept]
                for a in (checked.logprobs, checked.top_token_ids, checked.top_logprobs)
            )
            num_top = None if checked.num_top is None else np.repeat(checked.num_top, num_emitted)
        drafts_host = drafts.cpu().numpy().astype(np.int64, copy=False)
        self.clock.end()
        self.clock.resolved(plan.step_id)
        return StepResult(
            step_id=plan.step_id,
            rank=self.topology.rank,
            request_ids=sampled_ids,
            token_ids=token_ids,
            logprobs=logprobs,
            top_token_ids=top_ids,
            top_logprobs=top_logprobs,
            num_top=num_top,
            num_emitted=num_emitted,
            draft_token_ids=drafts_host,
        )

    def _resolve(self, launched: _Launched) -> StepResult:
        out = launched.sample.to_host()
        self.clock.resolved(launched.step_id)
        return StepResult(
            step_id=launched.step_id,
            rank=self.topology.rank,
            request_ids=launched.sampled_ids,
            token_ids=out.token_ids,
            logprobs=out.logprobs,
            top_token_ids=out.top_token_ids,
            top_logprobs=out.top_logprobs,
            num_top=out.num_top,
        )

    def logits_for(self, plan: StepPlan, all_positions: bool = False) -> torch.Tensor:
        """Run `plan` and return float32 logits without sampling (tests and diagnostics).

        all_positions=True gives a row for every new token instead of one per sampled sequence."""
        with torch.inference_mode():
            hidden, logits_rows = self.steps[plan.kind].run(plan)
            rows = hidden if all_positions else hidden[logits_rows]
            return self.model.compute_logits(rows)

    def stats(self) -> dict[str, float]:
        return {"num_pages": float(self.num_pages), "requests": float(len(self.sampler))}

    def inventory(self) -> dict[str, object]:
        """What this rank holds: routed experts, and a checksum per replicated parameter."""
        replicated = {
            name: float(p.detach().double().sum().item())
            for name, p in self.model.named_parameters()
            if ".experts." not in name
        }
        experts = sorted(self.model.owned)
        stacked = {name: tuple(p.shape) for name, p in self.model.named_parameters() if ".experts." in name}
        return {"experts": experts, "expert_params": stacked, "replicated": replicated}
