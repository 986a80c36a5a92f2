"""Rotary embedding with YaRN for the `qk_rope_head_dim` part of MLA's queries and keys.

DeepSeek checkpoints lay the rotary dimensions out as interleaved pairs (x0, x1), (x2, x3), ...,
each pair rotated by one frequency (the rotation itself is the `rope_` op: kernels/rope.py and its
torch reference). YaRN (when the checkpoint's rope_scaling says so) blends
interpolated and original frequencies with a linear ramp over the dimensions and scales cos/sin
by an attention factor; the softmax-scale part of YaRN lives in ModelArgs.softmax_scale.
Shapes: the legend in docs/ARCHITECTURE.md (T, R).
"""

from __future__ import annotations

import math

import torch

from nmoe_serve.model.args import RopeArgs, yarn_mscale


def inverse_frequencies(rope: RopeArgs) -> torch.Tensor:
    """[R/2] float32 inverse frequencies, YaRN-corrected when rope.yarn."""
    exponents = torch.arange(0, rope.dim, 2, dtype=torch.float32) / rope.dim
    base = rope.theta**exponents
    inv_freq = 1.0 / base
    if not rope.yarn:
        return inv_freq

    def correction_dim(rotations: float) -> float:
        return (
            rope.dim
            * math.log(rope.original_max_position / (rotations * 2 * math.pi))
            / (2 * math.log(rope.theta))
        )

    low = float(max(math.floor(correction_dim(rope.beta_fast)), 0))
    high = float(min(math.ceil(correction_dim(rope.beta_slow)), rope.dim - 1))
    if low == high:
        high += 0.001
    ramp = ((torch.arange(rope.dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep_original = 1 - ramp  # 1 for fast-rotating dims (kept), 0 for slow ones (interpolated)
    return inv_freq / rope.factor * (1 - keep_original) + inv_freq * keep_original


def attention_factor(rope: RopeArgs) -> float:
    """Multiplier of cos/sin: YaRN's magnitude correction (1 without YaRN)."""
    if not rope.yarn:
        return 1.0
    if rope.mscale and rope.mscale_all_dim:
        return yarn_mscale(rope.factor, rope.mscale) / yarn_mscale(rope.factor, rope.mscale_all_dim)
    return yarn_mscale(rope.factor)


class RotaryEmbedding:
    """cos/sin of the positions of a step, computed once per step and shared by all layers."""

    def __init__(self, rope: RopeArgs, device: torch.device) -> None:
        self.inv_freq = inverse_frequencies(rope).to(device)
        self.factor = attention_factor(rope)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]  # [T, R/2]
        return angles.cos() * self.factor, angles.sin() * self.factor
