"""`nmoe-serve doctor`: what it checks, and that every failure comes with a remedy."""

from __future__ import annotations

import json

from nmoe_serve.doctor import rank_weight_bytes, run_checks
from nmoe_serve.model.args import ModelArgs

# DeepSeek-V3's own config.json (the fields the model reads)
DEEPSEEK_V3 = {
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
    "rope_theta": 10000,
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


def test_deepseek_v3_rank_weights() -> None:
    args = ModelArgs.from_hf_config(DEEPSEEK_V3)
    per_rank = rank_weight_bytes(args, 8, fp8_on_device=True)
    # 654B routed-expert parameters / 8 ranks at 1 byte, plus ~17B replicated (FP8 mostly, bf16
    # embeddings and head, fp32 router): about 98 GB, so EP=8 needs 141 GB H200s, not 80 GB H100s
    assert 95e9 < per_rank < 102e9


def test_dev_config_passes(dev_config_path) -> None:
    checks = run_checks(str(dev_config_path))
    assert all(c.ok for c in checks), [(c.name, c.detail) for c in checks if not c.ok]


def test_failures_come_with_remedies(tmp_path, monkeypatch) -> None:
    ckpt = tmp_path / "ds3"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps(DEEPSEEK_V3))
    config = tmp_path / "prod.toml"
    config.write_text(
        f'[model]\npath = "{ckpt}"\nmax_seq_len = 131072\n[parallel]\nep_size = 8\n[device]\nkind = "cuda"\n'
    )
    checks = {c.name: c for c in run_checks(str(config))}
    assert not checks["weights"].ok and "safetensors" in checks["weights"].detail
    assert "load_format = dummy" in checks["weights"].remedy
    assert not checks["tokenizer"].ok and "model.tokenizer" in checks["tokenizer"].remedy
    import torch

    if not torch.cuda.is_available():
        assert not checks["gpus"].ok and "ep_size needs 8" in checks["gpus"].detail
        assert "CUDA_VISIBLE_DEVICES" in checks["gpus"].remedy
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\npath = 1\n")
    (only,) = run_checks(str(bad))
    assert not only.ok and only.name == "config" and "model.path" in only.detail


def test_cli_exit_codes(dev_config_path, tmp_path, capsys) -> None:
    from nmoe_serve.cli import main

    assert main(["doctor", "--config", str(dev_config_path)]) == 0
    assert "checks passed" in capsys.readouterr().out
    assert main(["doctor", "--config", str(tmp_path / "missing.toml")]) == 1
    assert "does not exist" in capsys.readouterr().out
