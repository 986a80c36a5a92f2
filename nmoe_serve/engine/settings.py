"""EngineSettings: a ServeConfig with every "auto" resolved against the checkpoint and the hardware.

Resolved once, at engine start, then frozen and handed to the scheduler and every worker.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from nmoe_serve.config import ConfigError, ServeConfig
from nmoe_serve.model.args import ModelArgs

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class EngineSettings:
    config: ServeConfig
    model_path: Path
    tokenizer_path: Path
    model_name: str
    args: ModelArgs
    dtype: str  # bfloat16 | float16 | float32
    device: str  # cpu | cuda
    load_format: str  # safetensors | dummy
    max_seq_len: int
    kernels: str = "torch"  # triton (FP8 weights stay FP8, fused_moe, mla_decode) | torch (reference)
    cuda_graph_max_batch: int = 0  # largest decode batch replayed from a CUDA graph; 0 = eager decode

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def ep_size(self) -> int:
        return self.config.parallel.ep_size

    @property
    def page_size(self) -> int:
        return self.config.cache.page_size


def resolve_settings(config: ServeConfig, check_device: bool = True) -> EngineSettings:
    """Resolve model path (building the tiny checkpoint if asked), dtype, device and lengths.

    check_device=False is for processes that never run the model (the HTTP ingress)."""
    model = config.model
    if model.tiny is not None:
        from nmoe_serve.model.tiny import cached_tiny_checkpoint

        path = cached_tiny_checkpoint(seed=model.tiny.seed, fp8=model.tiny.fp8)
        name = model.name or f"tiny-seed{model.tiny.seed}{'-fp8' if model.tiny.fp8 else ''}"
    else:
        assert model.path is not None
        path = Path(model.path).expanduser()
        if not path.is_dir():
            raise ConfigError(
                f"model.path = {model.path!r}: no such directory; point it at a DeepSeek-V3 checkpoint "
                "(config.json + *.safetensors)"
            )
        name = model.name or path.name
    args = ModelArgs.from_checkpoint(path)
    if args.n_routed_experts % config.parallel.ep_size:
        raise ConfigError(
            f"parallel.ep_size = {config.parallel.ep_size} does not divide the model's "
            f"{args.n_routed_experts} routed experts: choose a divisor (e.g. 1, 2, 4, 8)"
        )
    dtype = model.dtype if model.dtype != "auto" else args.checkpoint_dtype
    if config.device.kind == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        device = config.device.kind
        if check_device and device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device.kind = 'cuda' but torch sees no CUDA device: use 'cpu' or 'auto'")
    max_seq_len = model.max_seq_len or args.max_position_embeddings
    if max_seq_len > args.max_position_embeddings:
        raise ConfigError(
            f"model.max_seq_len = {max_seq_len} exceeds the checkpoint's max_position_embeddings = "
            f"{args.max_position_embeddings}: lower it"
        )
    need = -(-max_seq_len // config.cache.page_size)
    if config.cache.num_pages is not None and config.cache.num_pages < need:
        raise ConfigError(
            f"cache.num_pages = {config.cache.num_pages} is too few for one sequence of max_seq_len = "
            f"{max_seq_len} tokens ({need} pages of {config.cache.page_size}): raise cache.num_pages to at "
            f"least {need} or set a smaller model.max_seq_len"
        )
    load_format = "safetensors" if model.load_format == "auto" else model.load_format
    kernels, graph_max_batch = _device_paths(config, device, dtype)
    tokenizer = Path(model.tokenizer).expanduser() if model.tokenizer else path
    settings = EngineSettings(
        config=config,
        model_path=path,
        tokenizer_path=tokenizer,
        model_name=name,
        args=args,
        dtype=dtype,
        device=device,
        load_format=load_format,
        max_seq_len=max_seq_len,
        kernels=kernels,
        cuda_graph_max_batch=graph_max_batch,
    )
    log.info(
        "engine: model %s (%s), dtype %s, device %s, ep_size %d, max_seq_len %d, load_format %s, "
        "kernels %s, decode CUDA graphs %s",
        name,
        path,
        dtype,
        device,
        config.parallel.ep_size,
        max_seq_len,
        load_format,
        kernels,
        f"up to batch {graph_max_batch}" if graph_max_batch else "off",
    )
    return settings


def _device_paths(config: ServeConfig, device: str, dtype: str) -> tuple[str, int]:
    """(kernels, largest CUDA-graph decode batch or 0). Triton kernels on CUDA with bf16/fp16
    compute unless device.kernels = "torch" (float32 stays on the torch reference: the kernels'
    float32 dots run in TF32). Decode graphs need the kernels (the torch expert loop syncs with
    the host); the worker captures them at a ladder of sizes up to the largest."""
    use_kernels = device == "cuda" and config.device.kernels == "auto" and dtype in ("bfloat16", "float16")
    kernels = "triton" if use_kernels else "torch"
    if not (use_kernels and config.device.cuda_graphs):
        return kernels, 0
    max_seqs = config.scheduler.max_num_seqs
    return kernels, min(config.device.cuda_graph_max_batch or max_seqs, max_seqs)
