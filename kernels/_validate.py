"""Argument checks shared by the kernel wrappers; every error names the op, the argument and the fix."""

from collections.abc import Sequence
from typing import Literal

import torch

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_tensor(
    op: str,
    name: str,
    t: object,
    *,
    shape: Sequence[int] | None = None,
    ndim: int | None = None,
    dims: str = "",
    dtypes: Sequence[torch.dtype] | None = None,
    contiguous: bool | Literal["last"] = True,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Raise ValueError unless `t` is a tensor of the given shape (or rank), dtype, layout and device.

    `dims` is the shape in the legend's letters (e.g. "[T, H]") and is quoted in the message.
    contiguous: True (the whole tensor), "last" (only the last dimension: strided views such as
    a slice of a wider projection output pass), or False.
    """
    where = f"{op}: {name}"
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{where} must be a torch.Tensor {dims}, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{where} must be {ndim}-D {dims}, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{where} has shape {tuple(t.shape)}, expected {tuple(shape)} {dims}".rstrip())
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise ValueError(f"{where} has dtype {t.dtype}, expected one of: {allowed}")
    if contiguous == "last" and t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(
            f"{where} must have a contiguous last dimension (shape {tuple(t.shape)}, strides {t.stride()}); "
            "call .contiguous()"
        )
    if contiguous is True and not t.is_contiguous():
        raise ValueError(
            f"{where} must be contiguous (shape {tuple(t.shape)}, strides {t.stride()}); call .contiguous()"
        )
    if device is not None and t.device != device:
        raise ValueError(f"{where} is on {t.device}, expected {device} (the device of the first input)")
    return t
