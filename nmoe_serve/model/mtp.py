"""DeepSeek-V3's multi-token-prediction (MTP) layer (paper §2.2), the draft model of MTP
speculative decoding.

For token i, given the hidden state h_i of the model one depth below and the embedding of the
next token t_{i+1}, the MTP layer predicts t_{i+2}:

    h'_i = eh_proj([enorm(Emb(t_{i+1})) ; hnorm(h_i)])       # [T, 2H] -> [T, H]
    h''_i = Block(h'_i)                                      # MLA + MoE, a full decoder layer
    P_{i+2} = softmax(shared_head.head(shared_head.norm(h''_i)))

Concatenation order: the paper's equation 21 writes [RMSNorm(h) ; RMSNorm(Emb)], but the
released checkpoints' eh_proj columns follow DeepSeek's public inference code and the HF layout,
which concatenate the normalised embedding first and the normalised hidden state second
([enorm(emb) ; hnorm(h)]); the weights decide, so this follows the code.

DeepSeek-V3 stores the layer after the last decoder layer, as `model.layers.{n_layers}.` with
`embed_tokens`, `enorm`, `hnorm`, `eh_proj`, the decoder block's own tensors and `shared_head`
(`layout.mtp_tensors`). Its embedding and head equal the main model's in DeepSeek-V3, but the
checkpoint stores them separately and this layer loads its own copies.

The draft step (worker/drafter.py) passes as h the main model's final hidden state after its
final norm (what DeepseekV3.forward returns, as vLLM and SGLang pass it) and, for further drafts,
this layer's own output stream before shared_head's norm (`draft`).

Shapes: the legend in docs/ARCHITECTURE.md (T, H, C).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from nmoe_serve.model.args import ModelArgs
from nmoe_serve.model.backend import ModelBackend
from nmoe_serve.model.batch import StepBatch
from nmoe_serve.model.deepseek_v3 import Block, DeepseekV3, Linear, make_linear, make_norm
from nmoe_serve.model.transport import ExpertTransport

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


class SharedHead(nn.Module):
    """The MTP layer's output: final norm and vocabulary projection."""

    def __init__(
        self, args: ModelArgs, backend: ModelBackend, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.norm = make_norm(args.dim, args.rms_norm_eps, backend, dtype, device)
        self.head = Linear(args.dim, args.vocab_size, dtype, device)


class MTPLayer(Block):
    """One MTP layer: a decoder Block (the model's own class: MLA writing its own paged latent
    KV cache, MoE over this rank's experts through the model's transport) with the MTP inputs
    and output around it. Parameter names follow the checkpoint's, below `model.layers.{layer}.`."""

    def __init__(
        self,
        args: ModelArgs,
        layer: int,
        owned: range,
        backend: ModelBackend,
        transport: ExpertTransport,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__(args, layer, owned, backend, transport, dtype, device)
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim, dtype=dtype, device=device)
        self.embed_tokens.weight.requires_grad_(False)
        self.enorm = make_norm(args.dim, args.rms_norm_eps, backend, dtype, device)
        self.hnorm = make_norm(args.dim, args.rms_norm_eps, backend, dtype, device)
        self.eh_proj = make_linear(2 * args.dim, args.dim, backend, dtype, device)
        self.shared_head = SharedHead(args, backend, dtype, device)

    def predict(
        self, hidden: torch.Tensor, next_ids: torch.Tensor, batch: StepBatch, kv_cache: torch.Tensor
    ) -> torch.Tensor:
        """hidden [T, H] (h_i) and next_ids [T] (t_{i+1}) → normalised hidden states [T, H] of the
        prediction of t_{i+2}; writes the step's latents to this layer's kv_cache [pages, P, C]."""
        return self.draft(hidden, next_ids, batch, kv_cache)[0]

    def draft(
        self, hidden: torch.Tensor, next_ids: torch.Tensor, batch: StepBatch, kv_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`predict`, with the layer's output stream as well: (normalised hidden states [T, H],
        for `compute_logits`; the residual stream before shared_head's norm [T, H], the h of the
        layer's next autoregressive use when it drafts more than one token, as vLLM and SGLang
        feed it)."""
        emb = self.enorm(self.embed_tokens(next_ids))  # [T, H]
        x = self.eh_proj(torch.cat([emb, self.hnorm(hidden)], dim=-1))  # [T, 2H] -> [T, H]
        out, residual = self(self.input_layernorm(x), x, batch, kv_cache)  # Block.forward
        return self.shared_head.norm.add(out, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """predict's hidden states [B, H] → float32 logits [B, vocab]."""
        return self.shared_head.head(hidden).float()


class DeepseekV3WithMTP(DeepseekV3):
    """DeepseekV3 plus the checkpoint's first MTP layer (`mtp`, the one DeepSeek-V3 has); the
    loader reads its tensors (`mtp_depth` 1), each rank its own experts of its MoE. The main
    model's forward is unchanged; `mtp.predict` runs the MTP layer."""

    mtp_depth = 1

    def __init__(
        self,
        args: ModelArgs,
        dtype: torch.dtype,
        device: torch.device,
        owned: range | None = None,
        backend: ModelBackend | None = None,
        transport: ExpertTransport | None = None,
    ) -> None:
        super().__init__(args, dtype, device, owned, backend, transport)
        self.mtp = MTPLayer(args, args.n_layers, self.owned, self.backend, self.transport, dtype, device)

    def module_name(self, name: str) -> str:
        """Checkpoint names under `model.layers.{n_layers}.` live under `mtp.`."""
        m = _LAYER.match(name)
        if m is not None and int(m.group(1)) == self.args.n_layers:
            return "mtp." + name[m.end() :]
        return name
