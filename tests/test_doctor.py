"""`nmoe-serve doctor`: what it checks, and that every failure comes with a remedy."""

from __future__ import annotations

import json

from nmoe_serve.doctor import rank_weight_bytes, run_checks
from nmoe_serve.model.args import DEEPSEEK_V3_HF_CONFIG, ModelArgs

DEEPSEEK_V3 = DEEPSEEK_V3_HF_CONFIG


def test_deepseek_v3_rank_weights() -> None:
    args = ModelArgs.from_hf_config(DEEPSEEK_V3)
    per_rank = rank_weight_bytes(args, 8, fp8_on_device=True)
    # 654B routed-expert parameters / 8 ranks at 1 byte, plus ~17B replicated (FP8 mostly, bf16
    # embeddings and head, fp32 router): about 98 GB, so EP=8 needs 141 GB H200s, not 80 GB H100s
    assert 95e9 < per_rank < 102e9


def test_dev_config_passes_and_checks_what_the_readme_says(dev_config_path) -> None:
    checks = run_checks(str(dev_config_path))
    assert all(c.ok for c in checks), [(c.name, c.detail) for c in checks if not c.ok]
    names = [c.name for c in checks]
    assert names == ["config", "settings", "weights", "tokenizer", "ray", "device", "memory"]
    by_name = {c.name: c for c in checks}
    assert "512 tokens, with a chat template" in by_name["tokenizer"].detail
    assert "GiB free" in by_name["memory"].detail


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
    missing = tmp_path / "missing"
    absent = tmp_path / "absent.toml"
    absent.write_text(f'[model]\npath = "{missing}"\n')
    config_ok, settings = run_checks(str(absent))
    assert (
        config_ok.ok and not settings.ok and "no such directory; point it at a DeepSeek-V3" in settings.detail
    )


def test_cli_exit_codes(dev_config_path, tmp_path, capsys) -> None:
    from nmoe_serve.cli import main

    assert main(["doctor", "--config", str(dev_config_path)]) == 0
    assert "checks passed" in capsys.readouterr().out
    assert main(["doctor", "--config", str(tmp_path / "missing.toml")]) == 1
    out = capsys.readouterr().out
    assert "does not exist: pass the path of a TOML file" in out
    assert "fix: fix the keys named above" not in out  # the message says what to do itself
