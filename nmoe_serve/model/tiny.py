"""Tiny random DeepSeek-V3 checkpoints in the real HF layout, for CPU development and tests.

`make_tiny_checkpoint` writes config.json, sharded safetensors with an index, the tokenizer files
and a multi-token-prediction layer (unless num_nextn_predict_layers is overridden to 0; models
without MTP skip it), in bf16/float32 or FP8 e4m3 with
128×128 block scales. Weights are drawn with variances that keep activations and logits of order
one, so greedy decoding is not decided by rounding noise. `cached_tiny_checkpoint` builds one on
first use into the user's cache directory (`tiny_checkpoint_dir`), under a lock and atomically,
so concurrent workers can all ask for it.

Importing this module does not import torch (the settings of a tiny model are resolved from
`tiny_hf_config` in processes without torch); the writers import it when they run.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nmoe_serve.model.args import ModelArgs
from nmoe_serve.model.layout import TensorSpec, checkpoint_tensors, scale_name
from nmoe_serve.tokenizer.tiny import TINY_BOS_ID, TINY_EOS_ID, TINY_VOCAB_SIZE, write_tiny_tokenizer

if TYPE_CHECKING:
    import torch

# Bump when the files written for the same (seed, fp8) change, so caches rebuild.
TINY_FORMAT_VERSION = 1

TINY_HF_CONFIG: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": TINY_VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 4,
    "first_k_dense_replace": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "n_routed_experts": 16,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "moe_layer_freq": 1,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 1024,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "use_cache": True,
    "bos_token_id": TINY_BOS_ID,
    "eos_token_id": TINY_EOS_ID,
    "torch_dtype": "bfloat16",
}

# Overrides of TINY_HF_CONFIG with the dims the GPU kernels serve at full speed and FP8 keeps
# FP8 everywhere: multiples of 128 (moe_intermediate_size for FP8 experts; hidden, latent, LoRA
# ranks for whole 128-wide blocks), rope/nope/v dims of 32 (tl.dot wants >= 16). kv_a_proj_with_mqa
# is 160 x 256: its second row of blocks is partial, as DeepSeek-V3's 576-row one is.
TINY_KERNEL_OVERRIDES: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "q_lora_rank": 128,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 32,
    "v_head_dim": 32,
    "num_hidden_layers": 3,
}

FP8_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}


def tiny_hf_config(overrides: dict[str, Any] | None = None, fp8: bool = False) -> dict[str, Any]:
    config = json.loads(json.dumps(TINY_HF_CONFIG))
    config.update(overrides or {})
    if fp8:
        config["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    return config


def make_tiny_checkpoint(
    out: str | Path,
    seed: int = 0,
    fp8: bool = False,
    overrides: dict[str, Any] | None = None,
    shard_bytes: int = 512 * 1024,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write a complete random DeepSeek-V3 checkpoint to `out` (created if needed) and return it.

    `overrides` replace fields of the tiny config.json (e.g. `{"q_lora_rank": None}`); vocab_size
    must stay that of the tiny tokenizer. `dtype` is the dtype of the unquantized tensors
    (default bfloat16).
    """
    import torch

    dtype = dtype or torch.bfloat16
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_hf_config(overrides, fp8)
    config["torch_dtype"] = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[
        dtype
    ]
    if config["vocab_size"] != TINY_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must stay {TINY_VOCAB_SIZE}, the tiny tokenizer's; got {config['vocab_size']}"
        )
    args = ModelArgs.from_hf_config(config, source="tiny config")
    generator = torch.Generator().manual_seed(seed)
    tensors = dict(_random_tensors(args, config, generator, dtype, fp8))
    _write_shards(out, tensors, shard_bytes)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": TINY_BOS_ID, "eos_token_id": TINY_EOS_ID, "do_sample": False}, indent=2)
        + "\n"
    )
    write_tiny_tokenizer(out)
    return out


def tiny_checkpoint_dir(seed: int = 0, fp8: bool = False) -> Path:
    """Where the tiny checkpoint for (seed, fp8) lives in the cache directory (built or not)."""
    return cache_root() / f"tiny-v{TINY_FORMAT_VERSION}-seed{seed}-{'fp8' if fp8 else 'bf16'}"


def cached_tiny_checkpoint(seed: int = 0, fp8: bool = False) -> Path:
    """The tiny checkpoint for (seed, fp8) in the cache directory, built the first time it is
    asked for. One process builds it while the others wait on a lock file; the build lands in
    place by one rename, so a reader never sees half a checkpoint."""
    target = tiny_checkpoint_dir(seed, fp8)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():  # built while this process waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=target.name + ".building-", dir=target.parent))
        try:
            make_tiny_checkpoint(staging, seed=seed, fp8=fp8)
            # Another process may still have won (a file system without working locks): keep its build.
            if not (target / "config.json").is_file():
                shutil.rmtree(target, ignore_errors=True)  # a leftover without config.json
                try:
                    os.rename(staging, target)
                except OSError:
                    if not (target / "config.json").is_file():  # not a lost race: a real failure
                        raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def cache_root() -> Path:
    """$NMOE_SERVE_CACHE, else $XDG_CACHE_HOME/nmoe_serve, else ~/.cache/nmoe_serve."""
    if os.environ.get("NMOE_SERVE_CACHE"):
        return Path(os.environ["NMOE_SERVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nmoe_serve"


def _random_tensors(
    args: ModelArgs, config: dict[str, Any], generator: torch.Generator, dtype: torch.dtype, fp8: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    import torch

    from nmoe_serve.kernels.fp8_format import quantize_weight_blocks

    specs = checkpoint_tensors(args, mtp_layers=int(config.get("num_nextn_predict_layers") or 0))
    for spec in specs:
        value = _random_value(spec, generator)
        if fp8 and spec.quantizable:
            weight, scale_inv = quantize_weight_blocks(value)
            yield spec.name, weight
            yield scale_name(spec.name), scale_inv
        else:
            yield spec.name, value.to(torch.float32 if spec.float32 else dtype)


def _random_value(spec: TensorSpec, generator: torch.Generator) -> torch.Tensor:
    import torch

    name = spec.name
    if name.endswith("e_score_correction_bias"):
        return 0.05 * torch.randn(spec.shape, generator=generator)
    if len(spec.shape) == 1:  # norms
        return 1.0 + 0.1 * torch.randn(spec.shape, generator=generator)
    if name.endswith("embed_tokens.weight"):
        return torch.randn(spec.shape, generator=generator)
    fan_in = spec.shape[1]
    return torch.randn(spec.shape, generator=generator) * fan_in**-0.5


def _write_shards(out: Path, tensors: dict[str, torch.Tensor], shard_bytes: int) -> None:
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
