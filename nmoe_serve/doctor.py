"""`nmoe-serve doctor --config X`: preflight checks, each failure with its remedy.

Checks the config, the model files, the tokenizer, Ray, the GPUs (count, memory), NCCL, and
whether one rank's weights plus the KV cache for the configured batch and max_seq_len fit in the
memory it may use. Prints one line per check and exits non-zero if any failed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from nmoe_serve.config import ConfigError, ServeConfig
from nmoe_serve.model.args import CheckpointConfigError, ModelArgs
from nmoe_serve.model.layout import checkpoint_tensors

GIB = 2**30


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    remedy: str = ""


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
    checks: list[Check] = []
    try:
        config = ServeConfig.from_toml(config_path)
    except ConfigError as e:
        return [Check("config", False, str(e), "fix the keys named above")]
    checks.append(Check("config", True, f"{config_path} parses"))
    model = config.model
    if model.tiny is not None:
        checks.append(
            Check("model", True, f"tiny random checkpoint (seed {model.tiny.seed}), built on first use")
        )
        return checks + _runtime_checks(config, None)
    path = Path(model.path or "").expanduser()
    try:
        args = ModelArgs.from_checkpoint(path)
        checks.append(
            Check(
                "model config",
                True,
                f"{path}/config.json: {args.n_layers} layers, "
                f"{args.n_routed_experts} experts, {'FP8' if args.fp8 else args.checkpoint_dtype}",
            )
        )
    except CheckpointConfigError as e:
        return [*checks, Check("model config", False, str(e), "point model.path at a DeepSeek-V3 checkpoint")]
    if model.load_format == "dummy":
        checks.append(Check("weights", True, "load_format = dummy: no weight files needed"))
    else:
        from nmoe_serve.model.loader import CheckpointError, checkpoint_files

        try:
            files = checkpoint_files(path)
            shards = len(set(files.values()))
            checks.append(Check("weights", True, f"{len(files)} tensors in {shards} safetensors file(s)"))
        except CheckpointError as e:
            checks.append(
                Check("weights", False, str(e), "download the complete checkpoint or use load_format = dummy")
            )
    tokenizer = Path(model.tokenizer).expanduser() if model.tokenizer else path
    has_tokenizer = (tokenizer / "tokenizer.json").is_file()
    checks.append(
        Check(
            "tokenizer",
            has_tokenizer,
            f"{tokenizer}/tokenizer.json " + ("found" if has_tokenizer else "missing"),
            ""
            if has_tokenizer
            else "copy tokenizer.json next to the weights or set model.tokenizer "
            "(without it only token-id prompts work)",
        )
    )
    if args.n_routed_experts % config.parallel.ep_size:
        checks.append(
            Check(
                "ep_size",
                False,
                f"ep_size {config.parallel.ep_size} does not divide {args.n_routed_experts} experts",
                "choose a divisor, e.g. 8",
            )
        )
    return checks + _runtime_checks(config, args)


def _runtime_checks(config: ServeConfig, args: ModelArgs | None) -> list[Check]:
    import torch

    checks: list[Check] = []
    try:
        import ray

        checks.append(Check("ray", True, f"ray {ray.__version__}"))
    except ImportError:
        checks.append(Check("ray", False, "ray is not installed", "pip install 'ray[serve]'"))
    ep = config.parallel.ep_size
    want_gpu = config.device.kind == "cuda" or (config.device.kind == "auto" and torch.cuda.is_available())
    if not want_gpu:
        checks.append(Check("device", True, "CPU (gloo between ranks): no GPU needed"))
        return checks
    count = torch.cuda.device_count()
    if count < ep:
        checks.append(
            Check(
                "gpus",
                False,
                f"{count} CUDA GPU(s) visible, ep_size needs {ep}",
                "run on an 8-GPU node, check CUDA_VISIBLE_DEVICES, or lower parallel.ep_size",
            )
        )
        return checks
    props = [torch.cuda.get_device_properties(i) for i in range(count)]
    smallest = min(p.total_memory for p in props)
    checks.append(Check("gpus", True, f"{count} x {props[0].name}, {smallest / GIB:.0f} GiB each"))
    nccl = torch.distributed.is_available() and torch.distributed.is_nccl_available()
    version = ".".join(map(str, torch.cuda.nccl.version())) if nccl else "-"
    checks.append(
        Check("nccl", nccl, f"NCCL {version}", "" if nccl else "install a CUDA build of torch with NCCL")
    )
    if args is not None:
        checks.append(_fit_check(config, args, smallest))
    return checks


def _fit_check(config: ServeConfig, args: ModelArgs, gpu_bytes: int) -> Check:
    ep = config.parallel.ep_size
    weights = rank_weight_bytes(args, ep, fp8_on_device=True)
    budget = gpu_bytes * config.cache.memory_utilization
    per_token = kv_bytes_per_token(args)
    max_seq = config.model.max_seq_len or args.max_position_embeddings
    kv_room = budget - weights - 2 * GIB  # activations, CUDA graphs, allocator slack
    batch_tokens = config.scheduler.max_num_seqs * min(max_seq, 2048)
    detail = (
        f"per rank: weights {weights / GIB:.1f} GiB + KV {per_token / 1024:.1f} KiB/token; "
        f"{budget / GIB:.0f} GiB usable leaves room for {max(0, kv_room) / per_token / 1e3:.0f}k tokens"
    )
    if kv_room < per_token * max_seq:
        return Check(
            "memory",
            False,
            detail + f"; one {max_seq}-token sequence needs {per_token * max_seq / GIB:.1f} GiB",
            "use GPUs with more memory, a larger ep_size, or a smaller model.max_seq_len",
        )
    if kv_room < per_token * batch_tokens:
        return Check(
            "memory",
            False,
            detail + f"; {config.scheduler.max_num_seqs} sequences of 2k tokens need "
            f"{per_token * batch_tokens / GIB:.1f} GiB",
            "lower scheduler.max_num_seqs or raise memory_utilization",
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
