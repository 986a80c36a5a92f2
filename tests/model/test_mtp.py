"""The multi-token-prediction layer: its logits against an independent torch reference written
here from the DeepSeek-V3 paper's equations (§2.1 MLA and DeepSeekMoE, §2.2 MTP) on the
checkpoint's own tensors; loading it (bf16, FP8, a rank's experts) or skipping it; the error for a
checkpoint without it; `make-tiny-checkpoint --mtp / --no-mtp`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from nmoe_serve.cli import main
from nmoe_serve.engine.plan import StepKind, StepPlan
from nmoe_serve.kernels.fp8_format import FP8_DTYPE
from nmoe_serve.model.args import ModelArgs
from nmoe_serve.model.attention import SdpaPrefill
from nmoe_serve.model.backend import kernel_backend, reference_ops
from nmoe_serve.model.deepseek_v3 import DeepseekV3, Fp8Experts, Fp8Linear
from nmoe_serve.model.loader import CheckpointError, checkpoint_files, load_checkpoint
from nmoe_serve.model.mtp import DeepseekV3WithMTP
from nmoe_serve.model.rope import RotaryEmbedding
from nmoe_serve.model.tiny import TINY_KERNEL_OVERRIDES, make_tiny_checkpoint
from nmoe_serve.worker.step_batch import build_step_batch

CPU = torch.device("cpu")
PAGE_SIZE = 4
BLOCK = 128


def raw_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor, FP8 weights dequantized here (value x its 128x128 block's scale)."""
    raw: dict[str, torch.Tensor] = {}
    for file in sorted(set(checkpoint_files(path).values())):
        raw.update(load_file(file))
    out = {}
    for name, tensor in raw.items():
        if name.endswith(".weight_scale_inv"):
            continue
        if tensor.dtype == torch.float8_e4m3fn:
            scale = raw[name.removesuffix(".weight") + ".weight_scale_inv"].double()
            rows, cols = tensor.shape
            full = scale.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
            out[name] = (tensor.double() * full).float()
        else:
            out[name] = tensor.float()
    return out


# --- the reference, from the paper's equations -----------------------------------------------------


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs (x_2j, x_2j+1) of x [T, ..., R]; cos/sin [T, R/2]."""
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    c, s = cos.view(shape), sin.view(shape)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2)


def swiglu(x: torch.Tensor, w: dict[str, torch.Tensor], p: str) -> torch.Tensor:
    gate, up = x @ w[p + "gate_proj.weight"].T, x @ w[p + "up_proj.weight"].T
    return (F.silu(gate) * up) @ w[p + "down_proj.weight"].T


def reference_mla(x, w, p, args: ModelArgs, cos, sin) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """Causal MLA over one sequence x [T, H] at positions 0..T-1 (eq. 1-11)."""
    t, n = x.shape[0], args.n_heads
    nope, r, dv, lat = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim, args.kv_lora_rank
    a = p + "self_attn."
    c_q = rms(x @ w[a + "q_a_proj.weight"].T, w[a + "q_a_layernorm.weight"], args.rms_norm_eps)
    q = (c_q @ w[a + "q_b_proj.weight"].T).view(t, n, nope + r)
    q = torch.cat([q[..., :nope], rotate(q[..., nope:], cos, sin)], dim=-1)
    kv_a = x @ w[a + "kv_a_proj_with_mqa.weight"].T
    c_kv = rms(kv_a[:, :lat], w[a + "kv_a_layernorm.weight"], args.rms_norm_eps)
    k_pe = rotate(kv_a[:, lat:], cos, sin)  # [T, R], shared by the heads
    kv = (c_kv @ w[a + "kv_b_proj.weight"].T).view(t, n, nope + dv)
    k = torch.cat([kv[..., :nope], k_pe[:, None].expand(t, n, r)], dim=-1)
    scores = torch.einsum("tnd,snd->nts", q, k) * args.softmax_scale
    scores = scores.masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
    out = torch.einsum("nts,snd->tnd", scores.softmax(-1), kv[..., nope:])
    return out.reshape(t, n * dv) @ w[a + "o_proj.weight"].T


def reference_moe(x, w, p, args: ModelArgs) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """DeepSeekMoE with sigmoid affinities and node-limited, bias-adjusted top-k (eq. 12-16)."""
    m = p + "mlp."
    scores = torch.sigmoid(x @ w[m + "gate.weight"].T)  # [T, E]
    biased = scores + w[m + "gate.e_score_correction_bias"]
    groups = biased.view(x.shape[0], args.n_expert_groups, -1)
    group_score = groups.topk(2, dim=-1).values.sum(-1)  # [T, G]
    keep = torch.zeros_like(group_score).scatter(
        1, group_score.topk(args.n_limited_groups, dim=-1).indices, 1
    )
    allowed = keep.repeat_interleave(args.n_routed_experts // args.n_expert_groups, dim=1).bool()
    ids = biased.masked_fill(~allowed, float("-inf")).topk(args.n_activated_experts, dim=-1).indices
    gates = scores.gather(1, ids)
    if args.norm_topk_prob:
        gates = gates / gates.sum(-1, keepdim=True)
    gates = gates * args.route_scale
    out = swiglu(x, w, m + "shared_experts.")
    for row in range(x.shape[0]):
        for k in range(ids.shape[1]):
            expert = int(ids[row, k])
            out[row] += gates[row, k] * swiglu(x[row], w, f"{m}experts.{expert}.")
    return out


def reference_mtp_logits(w, args: ModelArgs, hidden, next_ids, cos, sin) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """§2.2: h' = M [RMSNorm(Emb(t_{i+1})) ; RMSNorm(h_i)] (the embedding first, as the
    checkpoints' eh_proj expects), a Transformer block, then the output head after its norm."""
    p, eps = f"model.layers.{args.n_layers}.", args.rms_norm_eps
    emb = w[p + "embed_tokens.weight"][next_ids]
    x = torch.cat([rms(emb, w[p + "enorm.weight"], eps), rms(hidden, w[p + "hnorm.weight"], eps)], dim=-1)
    x = x @ w[p + "eh_proj.weight"].T
    x = x + reference_mla(rms(x, w[p + "input_layernorm.weight"], eps), w, p, args, cos, sin)
    x = x + reference_moe(rms(x, w[p + "post_attention_layernorm.weight"], eps), w, p, args)
    return rms(x, w[p + "shared_head.norm.weight"], eps) @ w[p + "shared_head.head.weight"].T


# --- running the model's MTP layer ---------------------------------------------------------------


def plan(kind: StepKind, query_len: int, context_len: int, token_ids: np.ndarray) -> StepPlan:
    return StepPlan(
        step_id=0,
        kind=kind,
        rank=0,
        released=(),
        new_requests=(),
        request_ids=("a",),
        query_lens=np.array([query_len], np.int32),
        context_lens=np.array([context_len], np.int32),
        token_ids=token_ids.astype(np.int64),
        page_table=np.array([[0, 1, 2, 3]], np.int32),
        sample=np.array([True]),
    )


def loaded(path: Path, cls: type[DeepseekV3] = DeepseekV3WithMTP, owned: range | None = None) -> DeepseekV3:
    model = cls(ModelArgs.from_checkpoint(path), torch.float32, CPU, owned=owned)
    load_checkpoint(model, path)
    return model


@pytest.fixture(scope="module")
def tiny_bf16_no_mtp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("no-mtp"), overrides={"num_nextn_predict_layers": 0})


@pytest.fixture(scope="module")
def tiny_fp8(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("fp8-mtp"), seed=2, fp8=True)


def mtp_step_logits(model: DeepseekV3WithMTP, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
    """The MTP layer's logits for one sequence's prefill of len(next_ids) tokens."""
    args, t = model.args, next_ids.shape[0]
    kv_cache = torch.zeros(5, PAGE_SIZE, args.kv_cache_dim)
    rope = RotaryEmbedding(args.rope, CPU)
    _, batch = build_step_batch(plan(StepKind.PREFILL, t, t, next_ids.numpy()), PAGE_SIZE, rope, CPU)
    return model.mtp.compute_logits(model.mtp.predict(hidden, next_ids, batch, kv_cache))


@pytest.mark.parametrize("steps", ["prefill", "prefill then decode"])
def test_mtp_logits_match_the_papers_equations(tiny_fp32: Path, steps: str) -> None:
    model = loaded(tiny_fp32)
    assert isinstance(model, DeepseekV3WithMTP)
    args = model.args
    t = 10
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(t, args.dim, generator=gen)
    next_ids = torch.randint(0, args.vocab_size, (t,), generator=gen)
    rope = RotaryEmbedding(args.rope, CPU)
    kv_cache = torch.zeros(5, PAGE_SIZE, args.kv_cache_dim)  # the MTP layer's own pages [NP, P, C]
    ids = next_ids.numpy()
    if steps == "prefill":
        got = mtp_step_logits(model, hidden, next_ids)
    else:
        _, first = build_step_batch(plan(StepKind.PREFILL, t - 1, t - 1, ids[:-1]), PAGE_SIZE, rope, CPU)
        before = model.mtp.predict(hidden[:-1], next_ids[:-1], first, kv_cache)
        _, step = build_step_batch(plan(StepKind.DECODE, 1, t, ids[-1:]), PAGE_SIZE, rope, CPU)
        last = model.mtp.predict(hidden[-1:], next_ids[-1:], step, kv_cache)
        got = model.mtp.compute_logits(torch.cat([before, last]))
    positions = torch.arange(t)
    cos, sin = rope.cos_sin(positions)  # the positions' rotations are the layer's input, not its work
    want = reference_mtp_logits(raw_tensors(tiny_fp32), args, hidden, next_ids, cos, sin)
    assert got.shape == (t, args.vocab_size) and got.dtype == torch.float32
    assert want.std() > 0.1
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_fp8_weights_kept_in_fp8_stay_within_quantization_error_of_the_reference(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(tmp_path, seed=4, fp8=True, overrides=TINY_KERNEL_OVERRIDES)
    args = ModelArgs.from_checkpoint(path)
    backend = kernel_backend(args, reference_ops(), SdpaPrefill())
    model = DeepseekV3WithMTP(args, torch.float32, CPU, backend=backend)
    load_checkpoint(model, path)
    assert isinstance(model.mtp.eh_proj, Fp8Linear) and model.mtp.eh_proj.weight.dtype == FP8_DTYPE
    assert isinstance(model.mtp.mlp.experts, Fp8Experts)
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(8, args.dim, generator=gen)
    next_ids = torch.randint(0, args.vocab_size, (8,), generator=gen)
    got = mtp_step_logits(model, hidden, next_ids)
    cos, sin = RotaryEmbedding(args.rope, CPU).cos_sin(torch.arange(8))
    want = reference_mtp_logits(raw_tensors(path), args, hidden, next_ids, cos, sin)
    assert float((got - want).norm() / want.norm()) <= 0.1


# --- loading ---------------------------------------------------------------------------------------


def assert_mtp_layer_holds(model: DeepseekV3, path: Path) -> None:
    """Every MTP tensor of the checkpoint, as the reference reads it, is what the model holds for
    it (a rank: only its own routed experts)."""
    prefix = f"model.layers.{model.args.n_layers}."
    expected = {n: v for n, v in raw_tensors(path).items() if n.startswith(prefix)}
    assert any(".eh_proj." in n for n in expected) and any(".shared_head." in n for n in expected)
    checked = 0
    for name, want in expected.items():
        if ".experts." in name:
            layer_prefix, expert, proj, _ = name.rsplit(".", 3)
            if int(expert) not in model.owned:
                continue
            experts = model.get_submodule(model.module_name(layer_prefix))
            got = experts.expert_weight(int(expert), proj)  # type: ignore[operator]
        else:
            got = model.checkpoint_tensor(name)
        torch.testing.assert_close(got, want.to(got.dtype), atol=0, rtol=0)
        checked += got.numel()
    mtp_numel = sum(p.numel() for p in model.mtp.parameters())
    assert checked == mtp_numel


@pytest.mark.parametrize("checkpoint", ["fp32", "bf16", "fp8"])
def test_mtp_layer_loads_from_bf16_and_fp8_checkpoints(
    checkpoint: str, tiny_fp32: Path, tiny_fp8: Path, tmp_path: Path
) -> None:
    path = {"fp32": tiny_fp32, "fp8": tiny_fp8}.get(checkpoint) or make_tiny_checkpoint(tmp_path, seed=1)
    model = loaded(path)
    assert model.args.fp8 == (checkpoint == "fp8")
    assert_mtp_layer_holds(model, path)


def test_each_rank_loads_only_its_own_experts_of_the_mtp_moe(tiny_fp8: Path) -> None:
    model = loaded(tiny_fp8, owned=range(4, 8))
    assert model.mtp.mlp.experts.w13.shape[0] == 4
    assert_mtp_layer_holds(model, tiny_fp8)


def test_model_without_mtp_skips_the_layer_and_loads_a_checkpoint_without_it(
    tiny_fp32: Path, tiny_bf16_no_mtp: Path
) -> None:
    assert not hasattr(loaded(tiny_fp32, DeepseekV3), "mtp")
    n_layers = ModelArgs.from_checkpoint(tiny_bf16_no_mtp).n_layers
    assert not [n for n in checkpoint_files(tiny_bf16_no_mtp) if n.startswith(f"model.layers.{n_layers}.")]
    loaded(tiny_bf16_no_mtp, DeepseekV3)


def test_mtp_model_on_a_checkpoint_without_the_layer_says_what_is_missing(tiny_bf16_no_mtp: Path) -> None:
    with pytest.raises(CheckpointError) as raised:
        loaded(tiny_bf16_no_mtp)
    message = str(raised.value)
    assert "multi-token-prediction" in message
    assert "model.layers.4.embed_tokens.weight" in message
    assert "make-tiny-checkpoint --mtp" in message and "without MTP" in message


@pytest.mark.parametrize("flags", [["--mtp"], ["--no-mtp"], ["--fp8", "--no-mtp"]])
def test_make_tiny_checkpoint_with_and_without_mtp(flags: list[str], tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    assert main(["make-tiny-checkpoint", "--out", str(out), *flags]) == 0
    config = json.loads((out / "config.json").read_text())
    with_mtp = "--mtp" in flags
    assert config["num_nextn_predict_layers"] == (1 if with_mtp else 0)
    assert ("quantization_config" in config) == ("--fp8" in flags)
    mtp_names = [
        n for n in checkpoint_files(out) if n.startswith(f"model.layers.{config['num_hidden_layers']}.")
    ]
    assert bool(mtp_names) == with_mtp
    loaded(out, DeepseekV3WithMTP if with_mtp else DeepseekV3)
