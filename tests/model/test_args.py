"""ModelArgs from an HF config.json: the tiny config, YaRN in both layouts, and every refusal."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from nmoe_serve.model.args import CheckpointConfigError, ModelArgs, RopeArgs
from nmoe_serve.model.tiny import FP8_QUANTIZATION_CONFIG, tiny_hf_config

DELETE = object()


def hf(**changes: Any) -> dict[str, Any]:
    """The tiny config.json with fields replaced (DELETE removes one)."""
    config = tiny_hf_config()
    for key, value in changes.items():
        if value is DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    return config


def refuse(config: dict[str, Any], match: str) -> None:
    with pytest.raises(CheckpointConfigError, match=match):
        ModelArgs.from_hf_config(config, source="ckpt/config.json")


def test_args_from_the_tiny_checkpoint(tiny_fp32: Path):
    args = ModelArgs.from_checkpoint(tiny_fp32)
    assert (args.vocab_size, args.dim, args.inter_dim, args.moe_inter_dim) == (512, 64, 128, 32)
    assert (args.n_layers, args.n_dense_layers, args.n_heads) == (4, 1, 4)
    assert (args.q_lora_rank, args.kv_lora_rank) == (32, 32)
    assert (args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim) == (16, 8, 16)
    assert args.qk_head_dim == 24 and args.kv_cache_dim == 40
    assert (args.n_routed_experts, args.n_shared_experts, args.n_activated_experts) == (16, 1, 4)
    assert (args.n_expert_groups, args.n_limited_groups) == (4, 2)
    assert args.route_scale == 2.5 and args.norm_topk_prob
    assert args.max_position_embeddings == 4096
    assert args.checkpoint_dtype == "float32"
    assert not args.fp8
    assert not args.tie_word_embeddings
    assert args.bos_token_id == tiny_hf_config()["bos_token_id"]
    assert args.eos_token_ids == (tiny_hf_config()["eos_token_id"],)
    assert [args.is_moe_layer(i) for i in range(4)] == [False, True, True, True]
    assert args.rope == RopeArgs(
        theta=10000.0,
        dim=8,
        factor=4.0,
        original_max_position=1024,
        beta_fast=32.0,
        beta_slow=1.0,
        mscale=1.0,
        mscale_all_dim=1.0,
    )


def test_fp8_config_gives_the_block_shape():
    config = tiny_hf_config(fp8=True)
    assert ModelArgs.from_hf_config(config).fp8


def test_no_q_lora_rank_means_direct_query_projection():
    assert ModelArgs.from_hf_config(hf(q_lora_rank=None)).q_lora_rank == 0


def test_eos_token_id_list_is_kept():
    assert ModelArgs.from_hf_config(hf(eos_token_id=[1, 2])).eos_token_ids == (1, 2)


# --- YaRN ------------------------------------------------------------------------------------------

YARN = {
    "factor": 8.0,
    "original_max_position_embeddings": 512,
    "beta_fast": 24,
    "beta_slow": 2,
    "mscale": 0.9,
    "mscale_all_dim": 0.7,
}
EXPECTED_ROPE = RopeArgs(
    theta=20000.0,
    dim=8,
    factor=8.0,
    original_max_position=512,
    beta_fast=24.0,
    beta_slow=2.0,
    mscale=0.9,
    mscale_all_dim=0.7,
)


def test_yarn_from_rope_scaling_and_rope_theta():
    # The layout of DeepSeek-V3's own config.json.
    args = ModelArgs.from_hf_config(hf(rope_theta=20000.0, rope_scaling={"type": "yarn", **YARN}))
    assert args.rope == EXPECTED_ROPE
    assert args.rope.yarn


def test_yarn_from_rope_parameters():
    # The layout transformers 5 writes: theta inside, `rope_type`, no rope_scaling.
    config = hf(
        rope_theta=DELETE,
        rope_scaling=DELETE,
        rope_parameters={"rope_type": "yarn", "rope_theta": 20000.0, **YARN},
    )
    assert ModelArgs.from_hf_config(config).rope == EXPECTED_ROPE


def test_yarn_from_rope_parameters_as_transformers_writes_them():
    from transformers import DeepseekV3Config

    written = DeepseekV3Config(**hf(rope_theta=20000.0, rope_scaling={"type": "yarn", **YARN})).to_dict()
    assert "rope_parameters" in written
    assert ModelArgs.from_hf_config(written).rope == EXPECTED_ROPE


def test_yarn_factor_defaults_to_the_context_stretch():
    scaling = {k: v for k, v in YARN.items() if k != "factor"}
    args = ModelArgs.from_hf_config(
        hf(max_position_embeddings=4096, rope_scaling={"type": "yarn", **scaling})
    )
    assert args.rope.factor == 4096 / 512


@pytest.mark.parametrize("rope", [{"rope_scaling": None}, {"rope_scaling": {"rope_type": "default"}}])
def test_plain_rope_without_yarn(rope: dict[str, Any]):
    args = ModelArgs.from_hf_config(hf(rope_theta=5e5, **rope))
    assert args.rope == RopeArgs(theta=5e5, dim=8)
    assert not args.rope.yarn
    assert args.softmax_scale == 24**-0.5


def test_softmax_scale_includes_the_mscale_all_dim_correction():
    # HF DeepseekV3Attention: scaling = qk_head_dim**-0.5 * m**2, m = 0.1 * mscale_all_dim * ln(factor) + 1.
    tiny = ModelArgs.from_hf_config(hf())
    m = 0.1 * 1.0 * math.log(4.0) + 1.0
    assert tiny.softmax_scale == pytest.approx(24**-0.5 * m * m, rel=1e-12)
    other = ModelArgs.from_hf_config(hf(rope_theta=20000.0, rope_scaling={"type": "yarn", **YARN}))
    m = 0.1 * 0.7 * math.log(8.0) + 1.0
    assert other.softmax_scale == pytest.approx(24**-0.5 * m * m, rel=1e-12)
    without = ModelArgs.from_hf_config(hf(rope_scaling={"type": "yarn", **YARN, "mscale_all_dim": 0}))
    assert without.softmax_scale == pytest.approx(24**-0.5, rel=1e-12)


# --- refusals --------------------------------------------------------------------------------------


def test_directory_without_config_json(tmp_path: Path):
    with pytest.raises(
        CheckpointConfigError,
        match=r"no config\.json in .*: point model\.path at an HF-layout DeepSeek-V3 checkpoint directory.*"
        r"nmoe-serve make-tiny-checkpoint",
    ):
        ModelArgs.from_checkpoint(tmp_path)


def test_config_json_that_is_not_json(tmp_path: Path):
    (tmp_path / "config.json").write_text('{"model_type": "deepseek_v3",')
    with pytest.raises(CheckpointConfigError, match=r"config\.json is not readable JSON: "):
        ModelArgs.from_checkpoint(tmp_path)


def test_errors_from_a_directory_name_its_config_json(tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps(hf(model_type="llama")))
    with pytest.raises(CheckpointConfigError, match=rf"^{tmp_path / 'config.json'}: model_type='llama'"):
        ModelArgs.from_checkpoint(tmp_path)


@pytest.mark.parametrize("model_type", ["llama", "deepseek_v2", None])
def test_model_type_other_than_deepseek_v3(model_type: str | None):
    refuse(
        hf(model_type=model_type), rf"model_type={model_type!r} is not supported: .*model_type 'deepseek_v3'"
    )


def test_scoring_func_softmax():
    refuse(
        hf(scoring_func="softmax"),
        r"scoring_func='softmax', topk_method='noaux_tc' is not supported: .*'sigmoid'",
    )


def test_topk_method_other_than_noaux_tc():
    refuse(
        hf(topk_method="greedy"),
        r"scoring_func='sigmoid', topk_method='greedy' is not supported: .*'noaux_tc'",
    )


@pytest.mark.parametrize(
    "field", ["hidden_size", "vocab_size", "kv_lora_rank", "n_routed_experts", "num_hidden_layers"]
)
def test_missing_required_field(field: str):
    refuse(hf(**{field: DELETE}), rf"ckpt/config\.json: required field '{field}' is missing")


@pytest.mark.parametrize("value", ["64", 64.0, True, 0, -4])
def test_non_integer_or_non_positive_field(value: Any):
    refuse(hf(hidden_size=value), rf"hidden_size={value!r} must be an integer >= 1")


def test_routed_experts_not_divisible_by_groups():
    refuse(hf(n_group=3, topk_group=1), r"n_routed_experts=16 is not divisible by n_group=3")


@pytest.mark.parametrize("topk_group", [5, 0])
def test_topk_group_outside_the_groups(topk_group: int):
    match = (
        r"topk_group=5 must be in \[1, n_group=4\]" if topk_group else r"topk_group=0 must be an integer >= 1"
    )
    refuse(hf(topk_group=topk_group), match)


def test_top_k_larger_than_the_chosen_groups_hold():
    refuse(
        hf(num_experts_per_tok=9),
        r"num_experts_per_tok=9 exceeds the experts in the topk_group=2 chosen groups",
    )


def test_group_of_one_expert():
    refuse(hf(n_group=16, topk_group=4), r"each expert group needs at least 2 experts .*n_group=16")


OTHER_QUANTIZATION = [
    {"quant_method": "bitsandbytes"},
    {**FP8_QUANTIZATION_CONFIG, "quant_method": "gptq"},
    {**FP8_QUANTIZATION_CONFIG, "fmt": "e5m2"},
    {**FP8_QUANTIZATION_CONFIG, "weight_block_size": [128]},
    {k: v for k, v in FP8_QUANTIZATION_CONFIG.items() if k != "weight_block_size"},
    {**FP8_QUANTIZATION_CONFIG, "weight_block_size": [64, 64]},  # the kernels' BLOCK_K is 128
    {**FP8_QUANTIZATION_CONFIG, "weight_block_size": [128, 64]},
]


@pytest.mark.parametrize("quant", OTHER_QUANTIZATION)
def test_quantization_other_than_fp8_e4m3_blocks(quant: dict[str, Any]):
    refuse(
        hf(quantization_config=quant),
        r"quantization_config=.* is not supported: nmoe_serve reads FP8 e4m3 checkpoints with weight_block_size "
        r"\[128, 128\]",
    )


def test_static_activation_scheme():
    refuse(
        hf(quantization_config={**FP8_QUANTIZATION_CONFIG, "activation_scheme": "static"}),
        r"only activation_scheme 'dynamic' is supported",
    )


@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "longrope"])
def test_rope_type_other_than_yarn_or_default(rope_type: str):
    refuse(
        hf(rope_scaling={"type": rope_type, "factor": 2.0}),
        rf"rope type '{rope_type}' is not supported \(DeepSeek-V3 uses 'yarn' or none\)",
    )


def test_rope_type_in_rope_parameters_is_checked_too():
    refuse(
        hf(rope_scaling=DELETE, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
        r"rope type 'linear' is not supported",
    )


def test_odd_rope_head_dim():
    refuse(hf(qk_rope_head_dim=7), r"qk_rope_head_dim=7 must be even")


OTHER_FIELDS = [
    ({"moe_layer_freq": 2}, r"moe_layer_freq=2 is not supported \(DeepSeek-V3 uses 1\)"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported \(only 'silu'\)"),
    ({"attention_bias": True}, r"attention_bias=true is not supported"),
    ({"first_k_dense_replace": 5}, r"first_k_dense_replace=5 must be in \[0, 4\]"),
    (
        {"torch_dtype": "float8_e4m3fn"},
        r"torch_dtype='float8_e4m3fn' is not supported \(bfloat16, float16 or float32\)",
    ),
]


@pytest.mark.parametrize(("changes", "match"), OTHER_FIELDS)
def test_other_unsupported_fields(changes: dict[str, Any], match: str):
    refuse(hf(**changes), match)


def test_num_key_value_heads_is_ignored_for_mla_with_a_note(caplog: pytest.LogCaptureFixture) -> None:
    """MLA reads no key/value head count; a checkpoint that sets another one still loads (as in
    transformers), with a logged note."""
    config = tiny_hf_config({"num_key_value_heads": 1})
    with caplog.at_level("INFO"):
        args = ModelArgs.from_hf_config(config, source="cfg")
    assert args.n_heads == 4
    assert "num_key_value_heads=1 differs from num_attention_heads=4; MLA does not read it" in caplog.text
