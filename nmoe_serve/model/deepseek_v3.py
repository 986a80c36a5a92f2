"""DeepSeek-V3: MLA attention and DeepSeekMoE, over a flat batch and a paged latent KV cache.

One forward runs a whole step: every sequence's new tokens concatenated ([T] tokens), with a
StepBatch saying where each token sits. Prefill expands K/V from the cached latent and runs causal
attention (so chunked prefill continues from pages written by earlier steps); decode runs absorbed
MLA over the latent cache. Module and parameter names follow the HF checkpoint, so a checkpoint
tensor maps to the parameter of the same name (routed experts are stacked, see Experts).

The layer implementations come from a ModelBackend, read only here in the constructors: every
layer calls the backend's ops (the kernels' torch references on the CPU, the Triton kernels on the
GPU, where FP8 weights run through fp8_quant + fp8_gemm), and the MoE layers reach their experts
through the transport the model is built with. The forward passes have no configuration branches.

Shapes: the legend in docs/ARCHITECTURE.md (T, H, N, D, R, Dv, L, C, E, E_loc, K, G, I, S, P).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nmoe_serve.kernels.fp8_format import FP8_BLOCK, FP8_DTYPE, dequantize_weight_blocks, scale_grid
from nmoe_serve.model.args import ModelArgs
from nmoe_serve.model.backend import KernelOps, ModelBackend, reference_backend
from nmoe_serve.model.batch import StepBatch
from nmoe_serve.model.transport import ExpertTransport, SingleRankTransport


def _param(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T, no bias (DeepSeek-V3 has none)."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.weight = _param((out_features, in_features), dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def dequantized_weight(self) -> torch.Tensor:
        """W [out, in] in the compute dtype (absorbed MLA decode multiplies by it directly)."""
        return self.weight


class Fp8Linear(nn.Module):
    """y = x W^T with W kept as FP8 e4m3 128x128 blocks (`weight`, `weight_scale_inv`, as the
    checkpoint stores them); x is quantized per token and 128-group (`fp8_quant`) and the
    block-scaled GEMM (`fp8_gemm`) accumulates in fp32 and returns x's dtype.

    keep_dequantized: also hold W dequantized to `dtype` (refreshed by `refresh_dequantized`
    after loading), for kv_b_proj, whose decode form multiplies by W's slices directly."""

    dequantized: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ops: KernelOps,
        dtype: torch.dtype,
        device: torch.device,
        keep_dequantized: bool = False,
    ) -> None:
        super().__init__()
        self.ops, self.dtype = ops, dtype
        self.weight = _param((out_features, in_features), FP8_DTYPE, device)
        grid = scale_grid(out_features, in_features)
        self.weight_scale_inv = _param(grid, torch.float32, device)
        dense = (
            torch.empty(out_features, in_features, dtype=dtype, device=device) if keep_dequantized else None
        )
        self.register_buffer("dequantized", dense, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [T, Din]
        x_fp8, x_scales = self.ops.fp8_quant(x2)  # [T, Din] fp8, [T, G_in]
        y = self.ops.fp8_gemm(x_fp8, x_scales, self.weight, self.weight_scale_inv, x.dtype)  # [T, Dout]
        return y.view(*x.shape[:-1], y.shape[-1])

    def refresh_dequantized(self) -> None:
        if self.dequantized is not None:
            self.dequantized.copy_(dequantize_weight_blocks(self.weight, self.weight_scale_inv, self.dtype))

    def dequantized_weight(self) -> torch.Tensor:
        if self.dequantized is None:
            raise RuntimeError("this Fp8Linear was built without keep_dequantized=True")
        return self.dequantized


def make_linear(
    in_features: int,
    out_features: int,
    backend: ModelBackend,
    dtype: torch.dtype,
    device: torch.device,
    keep_dequantized: bool = False,
) -> Linear | Fp8Linear:
    """A quantizable projection (one that FP8 checkpoints store as FP8) for `backend`."""
    if backend.fp8_linear:
        return Fp8Linear(in_features, out_features, backend.ops, dtype, device, keep_dequantized)
    return Linear(in_features, out_features, dtype, device)


class StackedLinear(nn.Module):
    """Projections of the same input stacked into one GEMM (one activation quantization, one
    launch): `parts` maps each checkpoint projection name to its rows, in order, and checkpoint
    tensors `<part>.weight` (and `.weight_scale_inv`) fill row slices of the stacked weight
    (`checkpoint_tensor`). forward(x) → [T, sum of rows]; `split` cuts it into the parts.

    FP8 weights stay stacked only when every part but the last has whole 128-row scale blocks;
    otherwise the parts stay separate layers and forward concatenates their outputs."""

    def __init__(
        self,
        in_features: int,
        parts: dict[str, int],
        backend: ModelBackend,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.parts = dict(parts)
        self.rows = list(parts.values())
        self.starts = dict(zip(parts, [sum(self.rows[:i]) for i in range(len(self.rows))], strict=True))
        stackable = not backend.fp8_linear or all(r % FP8_BLOCK == 0 for r in self.rows[:-1])
        self.separate = nn.ModuleDict()
        self.run: Callable[[torch.Tensor], torch.Tensor]
        if stackable:
            self.fused = make_linear(in_features, sum(self.rows), backend, dtype, device)
            self.run = self._stacked
        else:
            for name, rows in parts.items():
                self.separate[name] = make_linear(in_features, rows, backend, dtype, device)
            self.run = self._concatenated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)

    def _stacked(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused(x)

    def _concatenated(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(x) for layer in self.separate.values()], dim=-1)

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return y.split(self.rows, dim=-1)

    def checkpoint_tensor(self, part: str, param: str) -> torch.Tensor:
        """The tensor that checkpoint tensor `<part>.<param>` fills (param: weight or weight_scale_inv)."""
        if part in self.separate:
            return self.separate[part].get_parameter(param).data
        start, rows = self.starts[part], self.parts[part]
        if param == "weight":
            return self.fused.weight.data[start : start + rows]
        if param == "weight_scale_inv" and isinstance(self.fused, Fp8Linear):
            first, end = start // FP8_BLOCK, -(-(start + rows) // FP8_BLOCK)
            return self.fused.weight_scale_inv.data[first:end]
        raise KeyError(f"{part}.{param} is not a tensor of this stacked projection")


class RMSNorm(nn.Module):
    """RMSNorm through the backend's `rms_norm` / `add_rms_norm` (one launch each); x is [T, dim]."""

    def __init__(
        self, dim: int, eps: float, ops: KernelOps, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.eps, self.ops = eps, ops
        self.weight = _param((dim,), dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual stream's add fused with the next norm."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


def make_norm(
    dim: int, eps: float, backend: ModelBackend, dtype: torch.dtype, device: torch.device
) -> RMSNorm:
    return RMSNorm(dim, eps, backend.ops, dtype, device)


class MLA(nn.Module):
    """Multi-head latent attention. The cache holds, per token, the normalised latent [L] and the
    roped shared key [R]; prefill expands them through kv_b_proj, decode absorbs kv_b_proj into the
    query (W_UK) and the output (W_UV) instead."""

    def __init__(
        self, args: ModelArgs, backend: ModelBackend, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.n_heads, self.nope, self.rope_dim = args.n_heads, args.qk_nope_head_dim, args.qk_rope_head_dim
        self.latent, self.v_dim = args.kv_lora_rank, args.v_head_dim
        self.scale = args.softmax_scale
        qk = args.n_heads * args.qk_head_dim
        # q_a_proj (or q_proj) and kv_a_proj_with_mqa read the same x: one stacked GEMM.
        q_part = ("q_a_proj", args.q_lora_rank) if args.q_lora_rank else ("q_proj", qk)
        self.qkv_a_proj = StackedLinear(
            args.dim, dict([q_part, ("kv_a_proj_with_mqa", args.kv_cache_dim)]), backend, dtype, device
        )
        self.query: Callable[[torch.Tensor], torch.Tensor]
        if args.q_lora_rank:
            self.q_a_layernorm = make_norm(args.q_lora_rank, args.rms_norm_eps, backend, dtype, device)
            self.q_b_proj = make_linear(args.q_lora_rank, qk, backend, dtype, device)
            self.query = self._query_lora
        else:
            self.query = self._query_direct
        self.kv_a_layernorm = make_norm(args.kv_lora_rank, args.rms_norm_eps, backend, dtype, device)
        self.kv_b_proj = make_linear(
            args.kv_lora_rank,
            args.n_heads * (args.qk_nope_head_dim + args.v_head_dim),
            backend,
            dtype,
            device,
            keep_dequantized=True,
        )
        self.o_proj = make_linear(args.n_heads * args.v_head_dim, args.dim, backend, dtype, device)
        self.ops, self.prefill_attention = backend.ops, backend.prefill_attention
        self.decode_attention = backend.decode_attention

    def _query_lora(self, q_a: torch.Tensor) -> torch.Tensor:
        return self.q_b_proj(self.q_a_layernorm(q_a))

    def _query_direct(self, q: torch.Tensor) -> torch.Tensor:
        return q

    def _write_kv(self, kv_a: torch.Tensor, batch: StepBatch, kv_cache: torch.Tensor) -> None:
        """Normalise the latent, rope the shared key, write both to the step's cache slots."""
        norm = self.kv_a_layernorm
        self.ops.mla_kv_write(
            kv_a, norm.weight, norm.eps, batch.rope_cos, batch.rope_sin, kv_cache, batch.slot_mapping
        )

    def forward(self, x: torch.Tensor, batch: StepBatch, kv_cache: torch.Tensor) -> torch.Tensor:
        t = x.shape[0]
        q_in, kv_a = self.qkv_a_proj.split(self.qkv_a_proj(x))  # [T, q_lora or N*(D+R)], [T, C]
        q = self.query(q_in).view(t, self.n_heads, self.nope + self.rope_dim)  # [T, N, D+R]
        self.ops.rope_(q[..., self.nope :], batch.rope_cos, batch.rope_sin)
        self._write_kv(kv_a, batch, kv_cache)
        if batch.is_prefill:
            out = self._prefill(q, kv_cache, batch)
        else:
            out = self._decode(q[..., : self.nope], q[..., self.nope :], kv_cache, batch)
        return self.o_proj(out.flatten(1))  # [T, N*Dv] -> [T, H]

    def _prefill(self, q: torch.Tensor, kv_cache: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        cached = self.ops.mla_kv_read(kv_cache, batch.context_slots, self.latent, q.dtype)  # [S, C]
        s = cached.shape[0]
        kv = self.kv_b_proj(cached[:, : self.latent]).view(s, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # [S, N, D], [S, N, Dv]
        k = self.ops.mla_prefill_keys(k_nope, cached[:, self.latent :])  # [S, N, D+R]
        return self.prefill_attention(q, k, v, batch, self.scale)  # [T, N, Dv]

    def _decode(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, batch: StepBatch
    ) -> torch.Tensor:
        w = self.kv_b_proj.dequantized_weight().view(self.n_heads, self.nope + self.v_dim, self.latent)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]  # [N, D, L], [N, Dv, L]
        # Batched over heads; q_latent stays the [N, T, L] product seen as [T, N, L] (no copy).
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [T, N, L]
        out_latent = self.decode_attention(q_latent, q_pe, kv_cache, batch, self.scale)  # [T, N, L]
        return torch.bmm(out_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [T, N, Dv]


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared experts."""

    def __init__(
        self, dim: int, inter_dim: int, backend: ModelBackend, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        parts = {"gate_proj": inter_dim, "up_proj": inter_dim}
        self.gate_up_proj = StackedLinear(dim, parts, backend, dtype, device)  # one GEMM, [T, 2I]
        self.down_proj = make_linear(inter_dim, dim, backend, dtype, device)
        self.silu_mul = backend.ops.silu_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.silu_mul(self.gate_up_proj(x)))


class Gate(nn.Module):
    """noaux_tc router: logits from the gate weight (in the compute dtype, as DeepSeek-V3 stores it
    in bf16; accumulated and returned in float32 by `router_logits`), then sigmoid scores; the
    correction bias picks the top `G_lim` groups (each scored by its two best experts) and the
    top-k experts inside them; the weights are the unbiased scores of the chosen experts,
    normalised and multiplied by route_scale (`grouped_topk`)."""

    def __init__(self, args: ModelArgs, ops: KernelOps, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.ops = ops
        self.top_k = args.n_activated_experts
        self.groups, self.limited = args.n_expert_groups, args.n_limited_groups
        self.normalize, self.route_scale = args.norm_topk_prob, args.route_scale
        self.weight = _param((args.n_routed_experts, args.dim), dtype, device)
        self.e_score_correction_bias = _param((args.n_routed_experts,), torch.float32, device)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] → (weights [T, K] float32, ids [T, K])."""
        logits = self.ops.router_logits(x, self.weight)  # [T, E] float32
        return self.ops.grouped_topk(
            logits,
            self.e_score_correction_bias,
            self.groups,
            self.limited,
            self.top_k,
            self.normalize,
            self.route_scale,
        )


class Experts(nn.Module):
    """The routed experts this rank owns, stacked (w13 holds gate rows then up rows), run by the
    backend's `fused_moe` (grouped GEMMs on the GPU, no host sync: graph-capturable).

    Checkpoint tensors `experts.E.{gate,up,down}_proj.weight` load into slot E - first_expert."""

    def __init__(
        self,
        args: ModelArgs,
        owned: range,
        ops: KernelOps,
        dtype: torch.dtype,
        device: torch.device,
        weight_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.owned, self.ops = owned, ops
        self.inter = args.moe_inter_dim
        wdtype = weight_dtype or dtype
        self.w13 = _param((len(owned), 2 * args.moe_inter_dim, args.dim), wdtype, device)  # [E_loc, 2I, H]
        self.w2 = _param((len(owned), args.dim, args.moe_inter_dim), wdtype, device)  # [E_loc, H, I]

    def expert_weight(self, expert: int, proj: str) -> torch.Tensor:
        """The slice of the stacked weights that checkpoint tensor `experts.<expert>.<proj>.weight` fills."""
        slot = self.owned.index(expert)
        if proj == "gate_proj":
            return self.w13[slot, : self.inter]
        if proj == "up_proj":
            return self.w13[slot, self.inter :]
        if proj == "down_proj":
            return self.w2[slot]
        raise KeyError(f"expert projection {proj!r} is not one of gate_proj, up_proj, down_proj")

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return self.ops.fused_moe(x.contiguous(), topk_ids, topk_weights, self.w13, self.w2, self.owned.start)


class Fp8Experts(Experts):
    """Stacked experts with FP8 e4m3 weights and 128x128 block scales, run by `fused_moe`:
    w13_scale_inv [E_loc, 2I/128, ceil(H/128)] (gate blocks, then up blocks: I % 128 == 0) and
    w2_scale_inv [E_loc, ceil(H/128), I/128]."""

    def __init__(
        self, args: ModelArgs, owned: range, ops: KernelOps, dtype: torch.dtype, device: torch.device
    ) -> None:
        if args.moe_inter_dim % FP8_BLOCK:
            raise ValueError(
                f"FP8 experts need moe_intermediate_size to be a multiple of {FP8_BLOCK}, got {args.moe_inter_dim}"
            )
        super().__init__(args, owned, ops, dtype, device, weight_dtype=FP8_DTYPE)
        g13 = scale_grid(2 * args.moe_inter_dim, args.dim)
        g2 = scale_grid(args.dim, args.moe_inter_dim)
        self.w13_scale_inv = _param((len(owned), *g13), torch.float32, device)
        self.w2_scale_inv = _param((len(owned), *g2), torch.float32, device)

    def expert_scale(self, expert: int, proj: str) -> torch.Tensor:
        """The slice of the stacked scales that `experts.<expert>.<proj>.weight_scale_inv` fills."""
        slot = self.owned.index(expert)
        gate_blocks = self.inter // FP8_BLOCK
        if proj == "gate_proj":
            return self.w13_scale_inv[slot, :gate_blocks]
        if proj == "up_proj":
            return self.w13_scale_inv[slot, gate_blocks:]
        if proj == "down_proj":
            return self.w2_scale_inv[slot]
        raise KeyError(f"expert projection {proj!r} is not one of gate_proj, up_proj, down_proj")

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return self.ops.fused_moe(
            x.contiguous(),
            topk_ids,
            topk_weights,
            self.w13,
            self.w2,
            self.owned.start,
            self.w13_scale_inv,
            self.w2_scale_inv,
        )


def make_experts(
    args: ModelArgs, owned: range, backend: ModelBackend, dtype: torch.dtype, device: torch.device
) -> Experts:
    if backend.fp8_experts:
        return Fp8Experts(args, owned, backend.ops, dtype, device)
    return Experts(args, owned, backend.ops, dtype, device)


class MoE(nn.Module):
    def __init__(
        self,
        args: ModelArgs,
        owned: range,
        backend: ModelBackend,
        transport: ExpertTransport,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.gate = Gate(args, backend.ops, dtype, device)
        self.experts = make_experts(args, owned, backend, dtype, device)
        self.shared_experts = MLP(
            args.dim, args.moe_inter_dim * args.n_shared_experts, backend, dtype, device
        )
        self.transport = transport

    def forward(self, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        weights, topk_ids = self.gate(x)  # [T, K], [T, K]
        routed = self.transport.exchange(x, topk_ids, weights, self.experts, not batch.is_prefill)  # [T, H]
        return routed + self.shared_experts(x)


class Block(nn.Module):
    """One decoder layer over the residual stream. forward takes the layer's normalised input
    and the stream, and returns the feed-forward's output and the stream with the attention
    output added: the caller adds that output in the next norm (`RMSNorm.add`), one fused launch."""

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
        super().__init__()
        self.input_layernorm = make_norm(args.dim, args.rms_norm_eps, backend, dtype, device)
        self.self_attn = MLA(args, backend, dtype, device)
        self.post_attention_layernorm = make_norm(args.dim, args.rms_norm_eps, backend, dtype, device)
        self.mlp: nn.Module
        self.feed_forward: Callable[[torch.Tensor, StepBatch], torch.Tensor]
        if args.is_moe_layer(layer):
            self.mlp = MoE(args, owned, backend, transport, dtype, device)
            self.feed_forward = self._moe
        else:
            self.mlp = MLP(args.dim, args.inter_dim, backend, dtype, device)
            self.feed_forward = self._dense

    def _moe(self, h: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        return self.mlp(h, batch)

    def _dense(self, h: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        return self.mlp(h)

    def forward(
        self, h: torch.Tensor, residual: torch.Tensor, batch: StepBatch, kv_cache: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h = input_layernorm(residual) [T, H] → (feed-forward output [T, H], residual + attention output)."""
        h, residual = self.post_attention_layernorm.add(self.self_attn(h, batch, kv_cache), residual)
        return self.feed_forward(h, batch), residual


class Decoder(nn.Module):
    def __init__(
        self,
        args: ModelArgs,
        owned: range,
        backend: ModelBackend,
        transport: ExpertTransport,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim, dtype=dtype, device=device)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            Block(args, i, owned, backend, transport, dtype, device) for i in range(args.n_layers)
        )
        self.norm = make_norm(args.dim, args.rms_norm_eps, backend, dtype, device)

    def next_norms(self) -> list[RMSNorm]:
        """The norm after each layer: the next layer's input_layernorm, the final norm last."""
        blocks: list[Block] = list(self.layers)  # type: ignore[arg-type]
        return [block.input_layernorm for block in blocks[1:]] + [self.norm]


class DeepseekV3(nn.Module):
    """The causal LM. `owned` is the range of routed experts this rank holds (all of them with one
    rank); `backend` picks the layer implementations (default: the torch reference); `transport`
    carries the MoE layers' tokens to their experts (default: all experts on this rank).
    It holds no multi-token-prediction layer (`mtp_depth` 0): DeepseekV3WithMTP (model/mtp.py) does."""

    mtp_depth = 0  # MTP layers held, the checkpoint's layers n_layers .. n_layers + mtp_depth - 1

    def __init__(
        self,
        args: ModelArgs,
        dtype: torch.dtype,
        device: torch.device,
        owned: range | None = None,
        backend: ModelBackend | None = None,
        transport: ExpertTransport | None = None,
    ) -> None:
        super().__init__()
        self.args = args
        self.owned = owned if owned is not None else range(args.n_routed_experts)
        self.backend = backend or reference_backend()
        self.transport = transport or SingleRankTransport()
        self.model = Decoder(args, self.owned, self.backend, self.transport, dtype, device)
        self.lm_head = Linear(args.dim, args.vocab_size, dtype, device)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # type: ignore[assignment]

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    def module_name(self, name: str) -> str:
        """The name in this module of checkpoint tensor (or submodule) `name`: the same name."""
        return name

    def checkpoint_tensor(self, name: str) -> torch.Tensor:
        """The tensor that the (non-expert) checkpoint tensor `name` fills: the parameter of the
        same name (`module_name`), or rows of a StackedLinear for the projections it stacks."""
        name = self.module_name(name)
        parent, _, leaf = name.rpartition(".")
        owner, _, proj = parent.rpartition(".")
        if owner:
            module = self.get_submodule(owner)
            for child in module.children():
                if isinstance(child, StackedLinear) and proj in child.parts:
                    return child.checkpoint_tensor(proj, leaf)
        return self.get_parameter(name).data

    def weights_loaded(self) -> None:
        """Derive what is computed from the weights (kv_b_proj's dequantized copy); the loaders
        call this after filling the parameters."""
        for module in self.modules():
            if isinstance(module, Fp8Linear):
                module.refresh_dequantized()

    def forward(
        self, input_ids: torch.Tensor, batch: StepBatch, kv_caches: list[torch.Tensor]
    ) -> torch.Tensor:
        """input_ids [T] → final normalised hidden states [T, H]; writes the step's latents to the cache."""
        residual = self.model.embed_tokens(input_ids)  # [T, H]
        first: Block = self.model.layers[0]  # type: ignore[assignment]
        h = first.input_layernorm(residual)
        for layer, next_norm, kv_cache in zip(
            self.model.layers, self.model.next_norms(), kv_caches, strict=True
        ):
            out, residual = layer(h, residual, batch, kv_cache)
            h, residual = next_norm.add(out, residual)
        return h

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, H] → float32 logits [B, vocab]."""
        return self.lm_head(hidden).float()
