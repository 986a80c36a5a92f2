"""The paged latent KV cache of one rank: per layer, pages of page_size tokens × (L + R).

Zero-filled at allocation so that never-written slots hold finite values (masked attention
multiplies them by zero probabilities, and 0 × NaN would be NaN).

One page more than `num_pages` is allocated: the scratch page (index num_pages), which the
scheduler never hands out. Padded rows of a CUDA-graph decode batch write their latents there
and attend to it, so they never touch a request's pages.

Shapes: the legend in docs/ARCHITECTURE.md (NP, P, C).
"""

from __future__ import annotations

import torch

from nmoe_serve.model.args import ModelArgs


def page_bytes(args: ModelArgs, page_size: int, dtype: torch.dtype, extra_layers: int = 0) -> int:
    """Bytes one page takes across all layers (the model's, and `extra_layers` more: a draft layer's)."""
    return (args.n_layers + extra_layers) * page_size * args.kv_cache_dim * torch.finfo(dtype).bits // 8


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
            args.kv_cache_dim,
            dtype=dtype,
            device=device,
        )  # [layers, NP + 1 (the scratch page), P, C]
        views = list(self.storage.unbind(0))  # per-layer views [NP + 1, P, C]
        self.layers = views[: args.n_layers]  # the model's
        self.extra_layers = views[args.n_layers :]  # the draft layer's

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()
