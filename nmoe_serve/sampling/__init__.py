"""Sampling: per-request parameters (plain data) and the worker-side Sampler (torch)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nmoe_serve.sampling.params import SamplingParams

__all__ = ["Sampler", "SamplerOutput", "SamplingParams", "VerifyOutput"]

if TYPE_CHECKING:
    from nmoe_serve.sampling.sampler import Sampler, SamplerOutput, VerifyOutput


def __getattr__(name: str) -> Any:
    if name in ("Sampler", "SamplerOutput", "VerifyOutput"):
        from nmoe_serve.sampling import sampler

        return getattr(sampler, name)
    raise AttributeError(f"module 'nmoe_serve.sampling' has no attribute {name!r}")
