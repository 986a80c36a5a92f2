"""The tensors of an HF-layout DeepSeek-V3 checkpoint: names, shapes, which ones are FP8.

One place lists them, so the loader's checks, the tiny-checkpoint writer and the dummy loader
agree. Routed experts are listed per expert (`mlp.experts.E.gate_proj.weight`), as real
checkpoints store them; a rank keeps only the experts it owns. Multi-token-prediction (MTP)
layers follow the last decoder layer (`model.layers.{n_layers + i}.`), each a decoder block plus
`embed_tokens`, `enorm`, `hnorm`, `eh_proj` and `shared_head` (`mtp_tensors`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nmoe_serve.model.args import ModelArgs


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    quantizable: bool  # an FP8 checkpoint stores it as float8 + weight_scale_inv
    float32: bool = False  # kept in float32 whatever the checkpoint dtype (router correction bias)
    expert: int | None = None  # routed expert index, for expert-parallel sharding


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def checkpoint_tensors(args: ModelArgs, mtp_layers: int = 0) -> list[TensorSpec]:
    """Every tensor the model reads from a checkpoint, in file order, with the first
    `mtp_layers` MTP layers (none by default)."""
    specs = [TensorSpec("model.embed_tokens.weight", (args.vocab_size, args.dim), False)]
    for layer in range(args.n_layers):
        specs += layer_tensors(args, layer)
    specs.append(TensorSpec("model.norm.weight", (args.dim,), False))
    if not args.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", (args.vocab_size, args.dim), False))
    for mtp in range(mtp_layers):
        specs += mtp_tensors(args, args.n_layers + mtp)
    return specs


def mtp_tensors(args: ModelArgs, layer: int) -> list[TensorSpec]:
    """A multi-token-prediction layer as DeepSeek-V3 stores it after the last decoder layer: its
    own copies of the embedding and the output head (equal to the main model's in DeepSeek-V3),
    the two input norms and the projection of their concatenation, a decoder block, a final norm."""
    p = f"model.layers.{layer}."
    h = args.dim
    return [
        TensorSpec(p + "embed_tokens.weight", (args.vocab_size, h), False),
        TensorSpec(p + "enorm.weight", (h,), False),
        TensorSpec(p + "hnorm.weight", (h,), False),
        TensorSpec(p + "eh_proj.weight", (h, 2 * h), True),
        *layer_tensors(args, layer),
        TensorSpec(p + "shared_head.norm.weight", (h,), False),
        TensorSpec(p + "shared_head.head.weight", (args.vocab_size, h), False),
    ]


def layer_tensors(args: ModelArgs, layer: int) -> list[TensorSpec]:
    p = f"model.layers.{layer}."
    h, n = args.dim, args.n_heads
    specs = [
        TensorSpec(p + "input_layernorm.weight", (h,), False),
        TensorSpec(p + "post_attention_layernorm.weight", (h,), False),
    ]
    a = p + "self_attn."
    if args.q_lora_rank:
        specs += [
            TensorSpec(a + "q_a_proj.weight", (args.q_lora_rank, h), True),
            TensorSpec(a + "q_a_layernorm.weight", (args.q_lora_rank,), False),
            TensorSpec(a + "q_b_proj.weight", (n * args.qk_head_dim, args.q_lora_rank), True),
        ]
    else:
        specs.append(TensorSpec(a + "q_proj.weight", (n * args.qk_head_dim, h), True))
    specs += [
        TensorSpec(a + "kv_a_proj_with_mqa.weight", (args.kv_cache_dim, h), True),
        TensorSpec(a + "kv_a_layernorm.weight", (args.kv_lora_rank,), False),
        TensorSpec(
            a + "kv_b_proj.weight", (n * (args.qk_nope_head_dim + args.v_head_dim), args.kv_lora_rank), True
        ),
        TensorSpec(a + "o_proj.weight", (h, n * args.v_head_dim), True),
    ]
    m = p + "mlp."
    if not args.is_moe_layer(layer):
        return specs + _mlp(m, h, args.inter_dim)
    specs += [
        TensorSpec(m + "gate.weight", (args.n_routed_experts, h), False),
        TensorSpec(m + "gate.e_score_correction_bias", (args.n_routed_experts,), False, float32=True),
    ]
    for e in range(args.n_routed_experts):
        specs += _mlp(f"{m}experts.{e}.", h, args.moe_inter_dim, expert=e)
    if args.n_shared_experts:
        specs += _mlp(m + "shared_experts.", h, args.moe_inter_dim * args.n_shared_experts)
    return specs


def _mlp(prefix: str, dim: int, inter: int, expert: int | None = None) -> list[TensorSpec]:
    return [
        TensorSpec(prefix + "gate_proj.weight", (inter, dim), True, expert=expert),
        TensorSpec(prefix + "up_proj.weight", (inter, dim), True, expert=expert),
        TensorSpec(prefix + "down_proj.weight", (dim, inter), True, expert=expert),
    ]


def scale_name(weight_name: str) -> str:
    return weight_name.removesuffix(".weight") + ".weight_scale_inv"


def is_mtp_tensor(name: str, args: ModelArgs, beyond: int = 0) -> bool:
    """Tensors of the multi-token-prediction layers stored after the last decoder layer (those
    of MTP layer `beyond` and later: the ones a model holding `beyond` MTP layers skips)."""
    m = _LAYER.match(name)
    return m is not None and int(m.group(1)) >= args.n_layers + beyond
