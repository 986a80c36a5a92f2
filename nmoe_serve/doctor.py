"""`nmoe-serve doctor --config X`: preflight checks, each failure with its remedy.

Checks what the README says it checks: the config, the settings it resolves to, the model files,
the tokenizer, Ray, the device (GPUs, their count and memory, NCCL), and whether one rank's
weights plus the KV cache for the configured batch and max_seq_len fit in the memory it may use
(on GPUs and on the CPU alike). Prints one line per check and exits non-zero if any failed.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from nmoe_serve.config import ConfigError, ServeConfig
from nmoe_serve.model.args import CheckpointConfigError, ModelArgs
from nmoe_serve.model.layout import checkpoint_tensors
from nmoe_serve.settings import EngineSettings, resolve_settings

GIB = 2**30
RUNTIME_SLACK = 2 * GIB  # activations, CUDA graphs, allocator slack


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    remedy: str = ""  # empty where the detail already says what to do


def rank_weight_bytes(args: ModelArgs, ep_size: int, fp8_on_device: bool) -> int:
    """Bytes of one rank's weights: everything replicated, 1/ep_size of the routed experts."""
    per_rank = args.n_routed_experts // ep_size
    total = 0
    for spec in checkpoint_tensors(args):
        if spec.expert is not None and spec.expert >= per_rank:
            continue
        numel = math.prod(spec.shape)
        if spec.quantizable and fp8_on_device and args.fp8:
            total += numel + 4 * math.ceil(spec.shape[0] / 128) * math.ceil(spec.shape[1] / 128)
        else:
            total += numel * (4 if spec.float32 else 2)
    return total


def kv_bytes_per_token(args: ModelArgs, dtype_bytes: int = 2) -> int:
    return args.n_layers * args.kv_cache_dim * dtype_bytes


def run_checks(config_path: str) -> list[Check]:
    try:
        config = ServeConfig.from_toml(config_path)
    except ConfigError as e:
        return [Check("config", False, str(e))]
    checks = [Check("config", True, f"{config_path} parses")]
    import torch

    # device.kind = "cuda" is resolved as if the GPUs were there, so the files are checked too;
    # the GPU check below says whether they are.
    cuda = torch.cuda.is_available() or config.device.kind == "cuda"
    try:
        settings = resolve_settings(config, cuda_available=cuda)
    except (ConfigError, CheckpointConfigError) as e:
        return [*checks, Check("settings", False, str(e))]
    checks.append(
        Check(
            "settings",
            True,
            f"model {settings.model_name}: {settings.args.n_layers} layers, {settings.args.n_routed_experts} "
            f"experts, {'FP8' if settings.args.fp8 else settings.args.checkpoint_dtype}; dtype {settings.dtype}, "
            f"device {settings.device}, kernels {settings.kernels}, ep_size {settings.ep_size}",
        )
    )
    checks.append(_weights_check(settings))
    checks.append(_tokenizer_check(settings))
    checks.append(_ray_check())
    return checks + _device_checks(settings)


def _weights_check(settings: EngineSettings) -> Check:
    if settings.load_format == "dummy":
        return Check("weights", True, "load_format = dummy: no weight files needed")
    if settings.tiny is not None:
        cache = settings.model_path.parent
        if settings.model_path.is_dir():
            return Check("weights", True, f"tiny checkpoint built in {settings.model_path}")
        probe = cache if cache.exists() else Path(tempfile.gettempdir())
        writable = os.access(probe, os.W_OK)
        return Check(
            "weights",
            writable,
            f"tiny checkpoint, built on first use into {settings.model_path}",
            "" if writable else f"make {cache} writable, or set NMOE_SERVE_CACHE to a writable directory",
        )
    from nmoe_serve.model.loader import CheckpointError, checkpoint_files

    try:
        files = checkpoint_files(settings.model_path)
    except CheckpointError as e:
        return Check("weights", False, str(e), "download the complete checkpoint or use load_format = dummy")
    return Check("weights", True, f"{len(files)} tensors in {len(set(files.values()))} safetensors file(s)")


def _tokenizer_check(settings: EngineSettings) -> Check:
    from nmoe_serve.frontend.frontend import load_tokenizer

    try:
        tokenizer = load_tokenizer(settings)
    except ValueError as e:
        return Check(
            "tokenizer", False, str(e), f"fix or replace the tokenizer files in {settings.tokenizer_path}"
        )
    if tokenizer is None:
        return Check(
            "tokenizer",
            False,
            f"{settings.tokenizer_path}/tokenizer.json missing: only token-id prompts would work",
            "copy tokenizer.json next to the weights or set model.tokenizer to a directory with it",
        )
    chat = (
        "with a chat template"
        if tokenizer.chat_template
        else "no chat template (/v1/chat/completions refuses)"
    )
    return Check("tokenizer", True, f"{tokenizer.vocab_size} tokens, {chat}")


def _ray_check() -> Check:
    try:
        import ray
    except ImportError:
        return Check("ray", False, "ray is not installed", "pip install 'ray[serve]'")
    return Check("ray", True, f"ray {ray.__version__}")


def _device_checks(settings: EngineSettings) -> list[Check]:
    import torch

    ep = settings.ep_size
    if settings.device == "cpu":
        return [
            Check("device", True, f"CPU: {ep} rank(s) over gloo, no GPU needed"),
            _cpu_fit_check(settings),
        ]
    count = torch.cuda.device_count()
    if count < ep:
        return [
            Check(
                "gpus",
                False,
                f"{count} CUDA GPU(s) visible, ep_size needs {ep}",
                f"run on a node with {ep} GPUs, check CUDA_VISIBLE_DEVICES, or lower parallel.ep_size",
            )
        ]
    props = [torch.cuda.get_device_properties(i) for i in range(count)]
    smallest = min(p.total_memory for p in props)
    nccl = torch.distributed.is_available() and torch.distributed.is_nccl_available()
    version = ".".join(map(str, torch.cuda.nccl.version())) if nccl else "-"
    return [
        Check("gpus", True, f"{count} x {props[0].name}, {smallest / GIB:.0f} GiB each"),
        Check("nccl", nccl, f"NCCL {version}", "" if nccl else "install a CUDA build of torch with NCCL"),
        _gpu_fit_check(settings, smallest),
    ]


def _gpu_fit_check(settings: EngineSettings, gpu_bytes: int) -> Check:
    args, core = settings.args, settings.core
    weights = rank_weight_bytes(args, settings.ep_size, fp8_on_device=settings.kernels == "triton")
    budget = gpu_bytes * settings.memory_utilization
    per_token = kv_bytes_per_token(args)
    kv_room = budget - weights - RUNTIME_SLACK
    batch_tokens = core.max_num_seqs * min(core.max_seq_len, 2048)
    detail = (
        f"per rank: weights {weights / GIB:.1f} GiB + KV {per_token / 1024:.1f} KiB/token; "
        f"{budget / GIB:.0f} GiB usable leaves room for {max(0, kv_room) / per_token / 1e3:.0f}k tokens"
    )
    if kv_room < per_token * core.max_seq_len:
        return Check(
            "memory",
            False,
            detail
            + f"; one {core.max_seq_len}-token sequence needs {per_token * core.max_seq_len / GIB:.1f} GiB",
            "use GPUs with more memory, a larger ep_size, or a smaller model.max_seq_len",
        )
    if kv_room < per_token * batch_tokens:
        return Check(
            "memory",
            False,
            detail
            + f"; {core.max_num_seqs} sequences of 2k tokens need {per_token * batch_tokens / GIB:.1f} GiB",
            "lower scheduler.max_num_seqs or raise cache.memory_utilization",
        )
    return Check("memory", True, detail)


def _cpu_fit_check(settings: EngineSettings) -> Check:
    """The CPU ranks: weights (dequantized to the compute dtype) plus each rank's KV cache in RAM."""
    args, core = settings.args, settings.core
    dtype_bytes = 4 if settings.dtype == "float32" else 2
    weights = rank_weight_bytes(args, settings.ep_size, fp8_on_device=False) * dtype_bytes // 2
    page = core.page_size * kv_bytes_per_token(args, dtype_bytes)
    kv = (
        (settings.num_pages + 1) * page if settings.num_pages is not None else settings.cpu_kv_cache_gib * GIB
    )
    need = settings.ep_size * (weights + kv)
    available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    detail = (
        f"{settings.ep_size} rank(s) x (weights {weights / GIB:.2f} GiB + KV {kv / GIB:.2f} GiB) = "
        f"{need / GIB:.2f} GiB of {available / GIB:.1f} GiB free"
    )
    if need > available:
        return Check(
            "memory", False, detail, "lower cache.num_pages or cache.cpu_kv_cache_gib, or use a smaller model"
        )
    return Check("memory", True, detail)


def main(config_path: str) -> int:
    checks = run_checks(config_path)
    for c in checks:
        print(f"[{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}")
        if not c.ok and c.remedy:
            print(f"       fix: {c.remedy}")
    failed = [c for c in checks if not c.ok]
    print(f"{len(checks) - len(failed)}/{len(checks)} checks passed")
    return 1 if failed else 0
