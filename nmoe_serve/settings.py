"""EngineSettings: a ServeConfig with every "auto" resolved against the checkpoint and the hardware.

Resolved once, where a deployment starts, then frozen and handed to the engine core, the
executor, every worker and the front end; each reads the fields it needs, never the config.
Resolving reads the checkpoint's config.json (a tiny model's comes from code) and writes no files:
a tiny checkpoint is built by the worker that loads it (`nmoe_serve.model.tiny`). No torch here:
the caller says whether CUDA is available where the ranks run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from nmoe_serve.config import ConfigError, ServeConfig
from nmoe_serve.engine.core import CoreSettings
from nmoe_serve.model.args import ModelArgs
from nmoe_serve.model.tiny import tiny_checkpoint_dir, tiny_hf_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TinyModel:
    """A tiny random checkpoint, built on first use into the cache directory."""

    seed: int
    fp8: bool


@dataclass(frozen=True)
class EngineSettings:
    # the model
    model_name: str
    model_path: Path  # checkpoint directory (a tiny model's is in the cache, built on first load)
    tiny: TinyModel | None
    tokenizer_path: Path
    args: ModelArgs
    dtype: str  # bfloat16 | float16 | float32
    load_format: str  # safetensors | dummy
    # where and how the ranks compute
    device: str  # cpu | cuda
    kernels: str  # triton (FP8 weights stay FP8, fused_moe, mla_decode) | torch (the references)
    cuda_graph_max_batch: int  # largest decode batch replayed from a CUDA graph; 0 = eager decode
    seed: int  # sampler seed of requests without their own
    # the EP group
    ep_size: int
    step_timeout_s: float
    start_timeout_s: float
    # one rank's KV cache
    num_pages: int | None  # None: from the memory left after the weights
    memory_utilization: float
    cpu_kv_cache_gib: float
    # the engine core (scheduler limits, context length, page size, stop ids)
    core: CoreSettings
    kv_dtype: str = "bfloat16"  # the KV cache's storage: "fp8" (kernels/kv_fp8.py) or the model's dtype


def resolve_settings(config: ServeConfig, cuda_available: bool) -> EngineSettings:
    """Resolve the model source, dtype, device, kernels and lengths of `config`, checking them.

    cuda_available: whether the ranks will see a CUDA device (device.kind "auto" takes CUDA then;
    "cuda" without one is refused)."""
    model = config.model
    tiny = None
    if model.tiny is not None:
        tiny = TinyModel(model.tiny.seed, model.tiny.fp8)
        path = tiny_checkpoint_dir(tiny.seed, tiny.fp8)
        args = ModelArgs.from_hf_config(tiny_hf_config(fp8=tiny.fp8), source="the tiny model's config")
        name = model.name or f"tiny-seed{tiny.seed}{'-fp8' if tiny.fp8 else ''}"
    else:
        assert model.path is not None
        path = Path(model.path).expanduser()
        if not path.is_dir():
            raise ConfigError(
                f"model.path = {model.path!r}: no such directory; point it at a DeepSeek-V3 checkpoint "
                "(config.json + *.safetensors)"
            )
        args = ModelArgs.from_checkpoint(path)
        name = model.name or path.name
    ep_size = config.parallel.ep_size
    if args.n_routed_experts % ep_size:
        raise ConfigError(
            f"parallel.ep_size = {ep_size} does not divide the model's "
            f"{args.n_routed_experts} routed experts: choose a divisor (e.g. 1, 2, 4, 8)"
        )
    dtype = model.dtype if model.dtype != "auto" else args.checkpoint_dtype
    device = _device(config.device.kind, cuda_available)
    max_seq_len = model.max_seq_len or args.max_position_embeddings
    if max_seq_len > args.max_position_embeddings:
        raise ConfigError(
            f"model.max_seq_len = {max_seq_len} exceeds the checkpoint's max_position_embeddings = "
            f"{args.max_position_embeddings}: lower it"
        )
    page_size = config.cache.page_size
    need = -(-max_seq_len // page_size)
    if config.cache.num_pages is not None and config.cache.num_pages < need:
        raise ConfigError(
            f"cache.num_pages = {config.cache.num_pages} is too few for one sequence of max_seq_len = "
            f"{max_seq_len} tokens ({need} pages of {page_size}): raise cache.num_pages to at "
            f"least {need} or set a smaller model.max_seq_len"
        )
    scheduler = config.scheduler
    num_draft_tokens = _num_draft_tokens(config, args, path)
    kernels, graph_max_batch = device_paths(
        device, dtype, config.device.kernels, config.device.cuda_graphs, config.device.cuda_graph_max_batch,
        scheduler.max_num_seqs * (1 + num_draft_tokens),
    )  # fmt: skip
    kv_dtype = _kv_dtype(config.cache.kv_dtype, dtype, args, page_size, kernels, graph_max_batch)
    settings = EngineSettings(
        model_name=name,
        model_path=path,
        tiny=tiny,
        tokenizer_path=Path(model.tokenizer).expanduser() if model.tokenizer else path,
        args=args,
        dtype=dtype,
        load_format="safetensors" if model.load_format == "auto" else model.load_format,
        device=device,
        kernels=kernels,
        cuda_graph_max_batch=graph_max_batch,
        seed=config.device.seed,
        ep_size=ep_size,
        step_timeout_s=config.parallel.step_timeout_s,
        start_timeout_s=config.parallel.start_timeout_s,
        num_pages=config.cache.num_pages,
        memory_utilization=config.cache.memory_utilization,
        cpu_kv_cache_gib=config.cache.cpu_kv_cache_gib,
        core=CoreSettings(
            max_seq_len=max_seq_len,
            page_size=page_size,
            max_num_seqs=scheduler.max_num_seqs,
            max_prefill_tokens=scheduler.max_prefill_tokens,
            max_prefill_steps_in_a_row=scheduler.max_prefill_steps_in_a_row,
            admission_watermark=scheduler.admission_watermark,
            eos_token_ids=args.eos_token_ids,
            overlap=scheduler.overlap,
            decode_prefill_tokens=scheduler.decode_prefill_tokens,
            prefix_caching=config.cache.enable_prefix_caching,
            max_rank_imbalance=config.cache.max_rank_imbalance,
            num_draft_tokens=num_draft_tokens,
        ),
        kv_dtype=kv_dtype,
    )
    log.info(
        "engine: model %s (%s), dtype %s, device %s, ep_size %d, max_seq_len %d, load_format %s, "
        "kernels %s, decode CUDA graphs %s, KV cache %s, speculative decoding %s",
        name,
        path,
        dtype,
        device,
        ep_size,
        max_seq_len,
        settings.load_format,
        kernels,
        f"up to batch {graph_max_batch}" if graph_max_batch else "off",
        kv_dtype,
        f"mtp, {num_draft_tokens} draft token(s) per step" if num_draft_tokens else "off",
    )
    return settings


def _num_draft_tokens(config: ServeConfig, args: ModelArgs, path: Path) -> int:
    """Tokens drafted per sequence per step: 0 without speculative decoding."""
    spec = config.speculative
    if spec.method == "none":
        return 0
    if args.num_mtp_layers < 1:
        raise ConfigError(
            f"speculative.method = 'mtp' but the checkpoint at {path} has no multi-token-prediction layer "
            "(num_nextn_predict_layers = 0 in its config.json): use a checkpoint that carries it "
            "(DeepSeek-V3's does; `nmoe-serve make-tiny-checkpoint --mtp` writes a tiny one) or set "
            "speculative.method = 'none'"
        )
    return spec.num_draft_tokens


def fp8_decode_kernel_takes(latent: int, rope: int, page_size: int) -> bool:
    """Whether kernels/mla_decode_fp8.py's kernel takes these dims (its `fp8_shape_ok`, without
    torch): L / 2 and R powers of two in [16, 256], P a multiple of 32."""

    def pow2_tile(n: int) -> bool:
        return 16 <= n <= 256 and n & (n - 1) == 0

    return latent % 2 == 0 and pow2_tile(latent // 2) and pow2_tile(rope) and page_size % 32 == 0


def _kv_dtype(
    kv_dtype: str, dtype: str, args: ModelArgs, page_size: int, kernels: str, graph_max_batch: int
) -> str:
    """cache.kv_dtype resolved: "fp8", or the model's dtype for "auto"; refused where FP8 cannot run."""
    if kv_dtype == "auto":
        return dtype
    if args.kv_cache_dim % 4:
        raise ConfigError(
            f"cache.kv_dtype = 'fp8' needs the model's kv_lora_rank + qk_rope_head_dim = {args.kv_cache_dim} "
            "to be a multiple of 4 (the row's float32 scales follow it): use kv_dtype = 'auto'"
        )
    if graph_max_batch and not fp8_decode_kernel_takes(args.kv_lora_rank, args.qk_rope_head_dim, page_size):
        fixes = ["device.cuda_graphs = false", "kv_dtype = 'auto'"]
        if fp8_decode_kernel_takes(args.kv_lora_rank, args.qk_rope_head_dim, 64):
            fixes.append("cache.page_size = 64")  # the page size alone is what the kernel refuses
        raise ConfigError(
            f"cache.kv_dtype = 'fp8' with decode CUDA graphs needs the FP8 decode kernel, which does not take "
            f"kv_lora_rank {args.kv_lora_rank}, qk_rope_head_dim {args.qk_rope_head_dim}, cache.page_size "
            f"{page_size} (its torch reference syncs with the host and cannot be captured): set "
            + ", or ".join(fixes)
        )
    return "fp8"


def _device(kind: str, cuda_available: bool) -> str:
    if kind == "auto":
        return "cuda" if cuda_available else "cpu"
    if kind == "cuda" and not cuda_available:
        raise ConfigError(
            "device.kind = 'cuda' but no CUDA device is visible to the ranks: use 'cpu' or 'auto'"
        )
    return kind


def device_paths(
    device: str,
    dtype: str,
    kernels: str,
    cuda_graphs: bool,
    cuda_graph_max_batch: int | None,
    max_decode_rows: int,
) -> tuple[str, int]:
    """(kernels, largest CUDA-graph decode batch or 0); max_decode_rows: the most token rows of a
    decode step (max_num_seqs, times 1 + the drafts with speculative decoding). Triton kernels on CUDA with bf16/fp16
    compute unless device.kernels = "torch" (float32 stays on the torch reference: the kernels'
    float32 dots run in TF32). Decode graphs need the kernels (the torch expert loop syncs with
    the host); the worker captures them at a ladder of sizes up to the largest."""
    use_kernels = device == "cuda" and kernels == "auto" and dtype in ("bfloat16", "float16")
    chosen = "triton" if use_kernels else "torch"
    if not (use_kernels and cuda_graphs):
        return chosen, 0
    return chosen, min(cuda_graph_max_batch or max_decode_rows, max_decode_rows)
