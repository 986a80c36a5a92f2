"""The paged latent KV cache of one rank: per layer, pages of page_size tokens × (L + R).

Zero-filled at allocation so that never-written slots hold finite values (masked attention
multiplies them by zero probabilities, and 0 × NaN would be NaN).

One page more than `num_pages` is allocated: the scratch page (index num_pages), which the
scheduler never hands out. Padded rows of a CUDA-graph decode batch write their latents there
and attend to it, so they never touch a request's pages.

dtype float8_e4m3fn is the FP8 cache ([cache] kv_dtype = "fp8"): each row packs C e4m3 entries
and its two float32 scales (kernels/kv_fp8.py).

Shapes: the legend in docs/ARCHITECTURE.md (NP, P, C).
"""

from __future__ import annotations

import torch

from nmoe_serve.kernels.kv_fp8 import kv_row_width
from nmoe_serve.model.args import ModelArgs


def page_bytes(args: ModelArgs, page_size: int, dtype: torch.dtype, extra_layers: int = 0) -> int:
    """Bytes one page takes across all layers (the model's and `extra_layers` more, a draft
    layer's; an FP8 cache's rows with their scales)."""
    row = kv_row_width(args.kv_cache_dim, dtype)
    return (args.n_layers + extra_layers) * page_size * row * torch.finfo(dtype).bits // 8


class KVCache:
    """extra_layers: layers after the model's that share its pages (speculative decoding's MTP
    draft layer): a page holds its tokens' latents in every layer, so a sequence's pages are
    accounted once for all of them."""

    def __init__(
        self,
        args: ModelArgs,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device,
        extra_layers: int = 0,
    ) -> None:
        self.num_pages, self.page_size = num_pages, page_size
        self.scratch_page = num_pages
        self.storage = torch.zeros(
            args.n_layers + extra_layers,
            num_pages + 1,
            page_size,
            kv_row_width(args.kv_cache_dim, dtype),
            dtype=dtype,
            device=device,
        )  # [layers, NP + 1 (the scratch page), P, C] (C + 16 in float8_e4m3fn: kernels/kv_fp8.py)
        views = list(self.storage.unbind(0))  # per-layer views [NP + 1, P, C]
        self.layers = views[: args.n_layers]  # the model's
        self.extra_layers = views[args.n_layers :]  # the draft layer's

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()
