"""resolve_settings: a ServeConfig's "auto" values resolved once against the checkpoint and the
hardware, every refusal, and no files written and no torch needed while resolving."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nmoe_serve.config import ConfigError, ServeConfig
from nmoe_serve.settings import resolve_settings
from tests.helpers import resolve


def on(tiny_fp32: Path, **sections: dict[str, Any]) -> ServeConfig:
    model = {"path": str(tiny_fp32), **sections.pop("model", {})}
    return ServeConfig.from_dict({"model": model, "device": {"kind": "cpu"}, **sections})


def test_resolve_settings_takes_auto_values_from_the_checkpoint(tiny_fp32: Path):
    settings = resolve(on(tiny_fp32))
    assert settings.model_path == tiny_fp32
    assert settings.tokenizer_path == tiny_fp32
    assert settings.model_name == tiny_fp32.name
    assert settings.dtype == "float32"
    assert settings.core.max_seq_len == 4096
    assert settings.device == "cpu"
    assert settings.load_format == "safetensors"
    assert settings.args.n_routed_experts == 16


def test_ep_size_must_divide_the_routed_experts(tiny_fp32: Path):
    with pytest.raises(
        ConfigError,
        match=r"parallel\.ep_size = 3 does not divide the model's 16 routed experts: choose a divisor",
    ):
        resolve(on(tiny_fp32, parallel={"ep_size": 3}))
    assert resolve(on(tiny_fp32, parallel={"ep_size": 4})).ep_size == 4


def test_max_seq_len_above_max_position_embeddings_is_refused(tiny_fp32: Path):
    with pytest.raises(
        ConfigError,
        match=r"model\.max_seq_len = 4097 exceeds the checkpoint's max_position_embeddings = 4096: lower it",
    ):
        resolve(on(tiny_fp32, model={"max_seq_len": 4097}))
    assert resolve(on(tiny_fp32, model={"max_seq_len": 4096})).core.max_seq_len == 4096


def test_num_pages_too_few_for_the_models_max_seq_len(tiny_fp32: Path):
    # max_seq_len is not set: it comes from the checkpoint (4096), which needs 4096 / 16 = 256 pages.
    config = on(tiny_fp32, cache={"page_size": 16, "num_pages": 255})
    with pytest.raises(
        ConfigError,
        match=r"cache\.num_pages = 255 is too few for one sequence of max_seq_len = 4096 tokens "
        r"\(256 pages of 16\): raise cache\.num_pages to at least 256 or set a smaller model\.max_seq_len",
    ):
        resolve(config)
    assert resolve(on(tiny_fp32, cache={"page_size": 16, "num_pages": 256})).core.max_seq_len == 4096


def test_model_path_that_does_not_exist(tmp_path: Path):
    absent = tmp_path / "no-such-checkpoint"
    config = ServeConfig.from_dict({"model": {"path": str(absent)}, "device": {"kind": "cpu"}})
    with pytest.raises(
        ConfigError,
        match=rf"model\.path = '{re.escape(str(absent))}': no such directory; point it at a DeepSeek-V3",
    ):
        resolve(config)


def test_cuda_device_without_cuda_is_refused(tiny_fp32: Path):
    with pytest.raises(
        ConfigError,
        match=r"device\.kind = 'cuda' but no CUDA device is visible to the ranks: use 'cpu' or 'auto'",
    ):
        resolve_settings(on(tiny_fp32, device={"kind": "cuda"}), cuda_available=False)


def test_auto_device_follows_where_the_ranks_run(tiny_fp32: Path):
    config = on(tiny_fp32, device={"kind": "auto"}, model={"dtype": "bfloat16"})
    on_gpu = resolve_settings(config, cuda_available=True)
    assert on_gpu.device == "cuda" and on_gpu.kernels == "triton"
    assert resolve_settings(config, cuda_available=False).device == "cpu"


def test_settings_of_a_tiny_model_write_no_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NMOE_SERVE_CACHE", str(tmp_path / "cache"))
    config = ServeConfig.from_dict({"model": {"tiny": {"seed": 7, "fp8": True}}, "device": {"kind": "cpu"}})
    settings = resolve_settings(config, cuda_available=False)
    assert settings.tiny is not None and settings.tiny.seed == 7 and settings.args.fp8
    assert settings.model_name == "tiny-seed7-fp8"
    assert not (tmp_path / "cache").exists()


def test_resolving_settings_needs_no_torch():
    """The HTTP replica resolves settings and builds its front end without torch."""
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from nmoe_serve.config import ServeConfig\n"
        "from nmoe_serve.settings import resolve_settings\n"
        "from nmoe_serve.frontend.frontend import Frontend\n"
        "config = ServeConfig.from_dict({'model': {'tiny': {'seed': 0}}})\n"
        "frontend = Frontend(resolve_settings(config, cuda_available=False))\n"
        "assert frontend.encode('hello')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
