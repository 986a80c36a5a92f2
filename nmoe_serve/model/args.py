"""ModelArgs: the DeepSeek-V3 architecture, read once from a checkpoint's HF `config.json`.

Only the DeepSeek-V3 family is accepted (model_type deepseek_v3; MLA attention; sigmoid
router with correction bias and group-limited top-k). Anything else is refused with a message
that names the field, the value found and what is supported.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The fields of DeepSeek-V3's own config.json that the model reads (FP8 checkpoint): the shape
# benchmarks and memory estimates of the full-size model start from.
DEEPSEEK_V3_HF_CONFIG: dict[str, Any] = {
    "model_type": "deepseek_v3",
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "first_k_dense_replace": 3,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "max_position_embeddings": 163840,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "rms_norm_eps": 1e-6,
    "torch_dtype": "bfloat16",
    "bos_token_id": 0,
    "eos_token_id": 1,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
}


class CheckpointConfigError(ValueError):
    """config.json is missing, unreadable, or describes a model nmoe_serve does not run."""


@dataclass(frozen=True)
class RopeArgs:
    """Rotary embedding of the `qk_rope_head_dim` part of q and k (YaRN when `factor` > 1)."""

    theta: float
    dim: int
    factor: float = 1.0  # 1 = plain RoPE
    original_max_position: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0

    @property
    def yarn(self) -> bool:
        return self.factor > 1.0


@dataclass(frozen=True)
class ModelArgs:
    """The architecture of a DeepSeek-V3-family checkpoint (HF field names in comments)."""

    vocab_size: int
    dim: int  # hidden_size
    inter_dim: int  # intermediate_size (dense layers)
    moe_inter_dim: int  # moe_intermediate_size
    n_layers: int  # num_hidden_layers
    n_dense_layers: int  # first_k_dense_replace
    n_heads: int  # num_attention_heads
    q_lora_rank: int  # 0 = no q compression (q_proj)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    n_activated_experts: int  # num_experts_per_tok
    n_expert_groups: int  # n_group
    n_limited_groups: int  # topk_group
    route_scale: float  # routed_scaling_factor
    norm_topk_prob: bool
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeArgs
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    checkpoint_dtype: str = "bfloat16"  # torch_dtype of the non-quantized tensors
    fp8: bool = False  # FP8 e4m3 weights in 128x128 blocks (kernels/fp8_format.py)
    num_mtp_layers: int = 0  # num_nextn_predict_layers: multi-token-prediction layers the checkpoint holds

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Per token and layer: the normalised latent then the roped key part."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        if self.rope.yarn and self.rope.mscale_all_dim:
            m = yarn_mscale(self.rope.factor, self.rope.mscale_all_dim)
            scale *= m * m
        return scale

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.n_dense_layers

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ModelArgs:
        path = Path(path)
        file = path / "config.json"
        if not file.is_file():
            raise CheckpointConfigError(
                f"no config.json in {path}: point model.path at an HF-layout DeepSeek-V3 checkpoint directory "
                "(config.json + *.safetensors), or make one with `nmoe-serve make-tiny-checkpoint`"
            )
        try:
            hf = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointConfigError(f"{file} is not readable JSON: {e}") from e
        return cls.from_hf_config(hf, source=str(file))

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], source: str = "config.json") -> ModelArgs:
        reader = _Reader(hf, source)
        model_type = hf.get("model_type")
        if model_type != "deepseek_v3":
            raise CheckpointConfigError(
                f"{source}: model_type={model_type!r} is not supported: nmoe_serve runs DeepSeek-V3-family "
                "checkpoints (model_type 'deepseek_v3')"
            )
        scoring = hf.get("scoring_func", "sigmoid")
        topk_method = hf.get("topk_method", "noaux_tc")
        if scoring != "sigmoid" or topk_method != "noaux_tc":
            raise CheckpointConfigError(
                f"{source}: scoring_func={scoring!r}, topk_method={topk_method!r} is not supported: "
                "the DeepSeek-V3 router is scoring_func 'sigmoid' with topk_method 'noaux_tc'"
            )
        if hf.get("moe_layer_freq", 1) != 1:
            raise CheckpointConfigError(
                f"{source}: moe_layer_freq={hf['moe_layer_freq']!r} is not supported (DeepSeek-V3 uses 1)"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise CheckpointConfigError(
                f"{source}: hidden_act={hf['hidden_act']!r} is not supported (only 'silu')"
            )
        if hf.get("attention_bias", False):
            raise CheckpointConfigError(
                f"{source}: attention_bias=true is not supported (DeepSeek-V3 has none)"
            )

        n_heads = reader.int("num_attention_heads")
        kv_heads = hf.get("num_key_value_heads", n_heads)
        if kv_heads != n_heads:  # MLA has no key/value heads of its own; transformers ignores it too
            log.info(
                "%s: num_key_value_heads=%s differs from num_attention_heads=%s; MLA does not read it",
                source,
                kv_heads,
                n_heads,
            )
        n_experts = reader.int("n_routed_experts")
        n_groups = reader.int("n_group", default=1)
        limited = reader.int("topk_group", default=n_groups)
        top_k = reader.int("num_experts_per_tok")
        if n_experts % n_groups:
            raise CheckpointConfigError(
                f"{source}: n_routed_experts={n_experts} is not divisible by n_group={n_groups}"
            )
        if not 1 <= limited <= n_groups:
            raise CheckpointConfigError(f"{source}: topk_group={limited} must be in [1, n_group={n_groups}]")
        if n_experts // n_groups < 2:
            raise CheckpointConfigError(
                f"{source}: each expert group needs at least 2 experts (group scores sum the top 2); "
                f"n_routed_experts={n_experts}, n_group={n_groups}"
            )
        if top_k > limited * (n_experts // n_groups):
            raise CheckpointConfigError(
                f"{source}: num_experts_per_tok={top_k} exceeds the experts in the topk_group={limited} chosen groups"
            )
        n_layers = reader.int("num_hidden_layers")
        n_dense = reader.int("first_k_dense_replace", default=0)
        if not 0 <= n_dense <= n_layers:
            raise CheckpointConfigError(
                f"{source}: first_k_dense_replace={n_dense} must be in [0, {n_layers}]"
            )

        q_lora = hf.get("q_lora_rank") or 0
        max_pos = reader.int("max_position_embeddings")
        rope = _rope_args(hf, reader, max_pos)
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        dtype = str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16")
        if dtype not in ("bfloat16", "float16", "float32"):
            raise CheckpointConfigError(
                f"{source}: torch_dtype={dtype!r} is not supported (bfloat16, float16 or float32)"
            )
        return cls(
            vocab_size=reader.int("vocab_size"),
            dim=reader.int("hidden_size"),
            inter_dim=reader.int("intermediate_size"),
            moe_inter_dim=reader.int("moe_intermediate_size"),
            n_layers=n_layers,
            n_dense_layers=n_dense,
            n_heads=n_heads,
            q_lora_rank=int(q_lora),
            kv_lora_rank=reader.int("kv_lora_rank"),
            qk_nope_head_dim=reader.int("qk_nope_head_dim"),
            qk_rope_head_dim=reader.int("qk_rope_head_dim"),
            v_head_dim=reader.int("v_head_dim"),
            n_routed_experts=n_experts,
            n_shared_experts=reader.int("n_shared_experts", default=0, minimum=0),
            n_activated_experts=top_k,
            n_expert_groups=n_groups,
            n_limited_groups=limited,
            route_scale=float(hf.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=max_pos,
            rope=rope,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            checkpoint_dtype=dtype,
            fp8=_is_fp8(hf, source),
            num_mtp_layers=reader.int("num_nextn_predict_layers", default=0, minimum=0),
        )


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention-magnitude correction for a context stretched by `factor`."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class _Reader:
    def __init__(self, hf: dict[str, Any], source: str) -> None:
        self.hf, self.source = hf, source

    def int(self, key: str, default: int | None = None, minimum: int = 1) -> int:
        value = self.hf.get(key, default)
        if value is None:
            raise CheckpointConfigError(f"{self.source}: required field {key!r} is missing")
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise CheckpointConfigError(f"{self.source}: {key}={value!r} must be an integer >= {minimum}")
        return value


def _rope_args(hf: dict[str, Any], reader: _Reader, max_pos: int) -> RopeArgs:
    # Real DeepSeek-V3 checkpoints write `rope_theta` + `rope_scaling`; transformers 5 writes `rope_parameters`.
    scaling = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    theta = float(scaling.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    dim = reader.int("qk_rope_head_dim")
    if dim % 2:
        raise CheckpointConfigError(f"{reader.source}: qk_rope_head_dim={dim} must be even")
    if rope_type in ("default", None):
        return RopeArgs(theta=theta, dim=dim)
    if rope_type != "yarn":
        raise CheckpointConfigError(
            f"{reader.source}: rope type {rope_type!r} is not supported (DeepSeek-V3 uses 'yarn' or none)"
        )
    original = scaling.get("original_max_position_embeddings", max_pos)
    factor = scaling.get("factor")
    if factor is None:
        factor = max_pos / original
    return RopeArgs(
        theta=theta,
        dim=dim,
        factor=float(factor),
        original_max_position=int(original),
        beta_fast=float(scaling.get("beta_fast") or 32.0),
        beta_slow=float(scaling.get("beta_slow") or 1.0),
        mscale=float(scaling.get("mscale") or 0.0),
        mscale_all_dim=float(scaling.get("mscale_all_dim") or 0.0),
    )


def _is_fp8(hf: dict[str, Any], source: str) -> bool:
    """Whether config.json declares FP8 weights; refuses every quantization but DeepSeek-V3's."""
    quant = hf.get("quantization_config")
    if not quant:
        return False
    method = quant.get("quant_method")
    fmt = quant.get("fmt", "e4m3")
    block = quant.get("weight_block_size")
    if method != "fp8" or fmt != "e4m3" or list(block or ()) != [128, 128]:
        raise CheckpointConfigError(
            f"{source}: quantization_config={quant!r} is not supported: nmoe_serve reads FP8 e4m3 checkpoints "
            "with weight_block_size [128, 128] (quant_method 'fp8'), or unquantized ones"
        )
    if quant.get("activation_scheme", "dynamic") != "dynamic":
        raise CheckpointConfigError(f"{source}: only activation_scheme 'dynamic' is supported")
    return True
