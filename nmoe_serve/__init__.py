"""nmoe_serve: expert-parallel serving of DeepSeek-V3-family MoE models on Ray Serve.

The names below load on first use, so that importing a torch-free part of the package (the
scheduler, the config) does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams", "ServeConfig"]

_LAZY = {
    "LLM": "nmoe_serve.llm",
    "SamplingParams": "nmoe_serve.sampling.params",
    "ServeConfig": "nmoe_serve.config",
    "RequestOutput": "nmoe_serve.frontend.outputs",
    "CompletionOutput": "nmoe_serve.frontend.outputs",
}

if TYPE_CHECKING:
    from nmoe_serve.config import ServeConfig
    from nmoe_serve.frontend.outputs import CompletionOutput, RequestOutput
    from nmoe_serve.llm import LLM
    from nmoe_serve.sampling.params import SamplingParams


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'nmoe_serve' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
