"""The `nmoe-serve` command: make-tiny-checkpoint, generate, and its errors (exit code 2, stderr)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nmoe_serve.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_make_tiny_checkpoint_writes_an_fp8_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "tiny-fp8"
    assert main(["make-tiny-checkpoint", "--out", str(out), "--fp8", "--seed", "3"]) == 0
    assert str(out) in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3"
    assert config["quantization_config"]["quant_method"] == "fp8"
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert shards and all((out / shard).is_file() for shard in shards)
    assert any(name.endswith(".weight_scale_inv") for name in index["weight_map"])
    assert (out / "tokenizer.json").is_file()
    assert (out / "tokenizer_config.json").is_file()


def test_generate_prints_one_json_line_per_prompt(dev_config_path: Path, capsys: pytest.CaptureFixture[str]):
    argv = ["generate", "--config", str(dev_config_path), "--prompt", "hi", "--max-tokens", "4", "--json"]
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["prompt"] == "hi"
    assert result["prompt_token_ids"] and all(isinstance(t, int) for t in result["prompt_token_ids"])
    assert len(result["token_ids"]) == 4 and all(isinstance(t, int) for t in result["token_ids"])
    assert result["finish_reason"] == "length"
    assert result["index"] == 0


def run_failing(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    absent = tmp_path / "absent.toml"
    err = run_failing(["generate", "--config", str(absent), "--prompt", "x"], capsys)
    assert (
        f"nmoe-serve generate: error: config file {absent} does not exist: pass the path of a TOML file"
        in err
    )


def test_unknown_option(dev_config_path: Path, capsys: pytest.CaptureFixture[str]):
    err = run_failing(["generate", "--config", str(dev_config_path), "--option", "bogus=1"], capsys)
    assert "nmoe-serve generate: error: unknown engine option 'bogus'; valid options: " in err
    assert "num_pages" in err


def test_option_without_a_value(dev_config_path: Path, capsys: pytest.CaptureFixture[str]):
    err = run_failing(["generate", "--config", str(dev_config_path), "--option", "num_pages"], capsys)
    assert "error: --option 'num_pages': write it as KEY=VALUE, e.g. --option num_pages=256" in err


def test_option_with_an_invalid_value(dev_config_path: Path, capsys: pytest.CaptureFixture[str]):
    err = run_failing(["generate", "--config", str(dev_config_path), "--option", "page_size=24"], capsys)
    assert "cache.page_size=24 must be a power of two" in err


def test_installed_console_script_generates_from_the_repo_root():
    script = shutil.which("nmoe-serve", path=str(Path(sys.executable).parent)) or shutil.which("nmoe-serve")
    assert script, "the nmoe-serve console script is not installed: pip install -e '.[test]'"
    result = subprocess.run(
        [script, "generate", "--max-tokens", "2", "--prompt", "x"],
        cwd=REPO,
        env=os.environ.copy(),  # NMOE_SERVE_CACHE from conftest: reuse the session's tiny checkpoint
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "prompt: 'x'" in result.stdout
    assert "(2 tokens, length)" in result.stdout
