"""The model backends on the CPU: which layers each choice builds, FP8 weights kept as stored, and
the kernel family's layers (through the kernels' torch references, `<op>_ref`) against the torch
reference path.

What these pin, and why the tolerances:

- With the activations' FP8 quantization made exact (ops that pass activations through
  unquantized, weights still FP8 with their scales), the kernel layers compute the same function
  as the reference layers on the dequantized weights: float32 logits agree to 1e-4 (measured
  6e-7; association order only). This catches any wiring error (a wrong scale, slice, expert
  offset, mask or absorbed weight).
- With real FP8 activation quantization (1x128 groups, e4m3: 3 mantissa bits, up to 6% per
  element) each GEMM's output carries ~2.6% relative noise (measured on one random 512 x 256
  GEMM), and router top-k choices near a tie flip. On the 3-layer tiny FP8 checkpoint (random
  weights, logits of std 1) the logits then differ from the dequantized reference by a relative
  norm of 0.19 (float32 compute) and 0.18 (bf16): the bound is 0.25. Top-1 tokens agree in 90%
  (float32) and 94% (bf16) of the rows whose reference top-2 margin exceeds 0.2: the bound is 80%.
  This is the size of the FP8 path's error, not a check of its wiring (the test above is).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nmoe_serve.config import ServeConfig
from nmoe_serve.kernels.fp8_format import FP8_DTYPE, dequantize_weight_blocks
from nmoe_serve.kernels.fused_moe import fused_moe_ref
from nmoe_serve.model.args import ModelArgs
from nmoe_serve.model.attention import SdpaPrefill, TorchPrefill
from nmoe_serve.model.backend import KernelOps, ModelBackend, choose_backend, kernel_backend, reference_ops
from nmoe_serve.model.batch import StepBatch
from nmoe_serve.model.deepseek_v3 import DeepseekV3, Experts, Fp8Experts, Fp8Linear, Linear
from nmoe_serve.model.loader import fill_dummy
from nmoe_serve.model.tiny import TINY_KERNEL_OVERRIDES, make_tiny_checkpoint, tiny_hf_config
from nmoe_serve.settings import device_paths
from nmoe_serve.topology import Topology
from nmoe_serve.worker.worker import Worker
from tests.helpers import ManualPlans, resolve

CPU = torch.device("cpu")
PAGE_SIZE, NUM_PAGES = 16, 64


@pytest.fixture(scope="module")
def fp8_kernel_dims(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("fp8-kernel-dims"), seed=3, fp8=True, overrides=TINY_KERNEL_OVERRIDES
    )


@pytest.fixture(scope="module")
def fp32_kernel_dims(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("fp32-kernel-dims"),
        seed=4,
        overrides=TINY_KERNEL_OVERRIDES,
        dtype=torch.float32,
    )


def _unquantized(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An "fp8_quant" that keeps x exactly: values as they are, unit scales."""
    return x.float(), torch.ones(x.shape[0], -(-x.shape[1] // 128), device=x.device)


def _fused_moe_dequantized(x, topk_ids, topk_weights, w13, w2, expert_start=0, w13_scale=None, w2_scale=None):  # type: ignore[no-untyped-def]
    """fused_moe_ref on the dequantized weights: no activation quantization."""
    if w13_scale is not None:
        w13 = dequantize_weight_blocks(w13, w13_scale).to(x.dtype)
        w2 = dequantize_weight_blocks(w2, w2_scale).to(x.dtype)
    return fused_moe_ref(x, topk_ids, topk_weights, w13, w2, expert_start)


# The reference ops with the activations' FP8 quantization made exact.
EXACT_OPS = dataclasses.replace(
    reference_ops(), name="exact", fp8_quant=_unquantized, fused_moe=_fused_moe_dequantized
)


def make_worker(path: Path, dtype: str, backend: ModelBackend | None = None) -> Worker:
    config = ServeConfig.from_dict(
        {
            "model": {"path": str(path), "dtype": dtype, "max_seq_len": 512},
            "cache": {"page_size": PAGE_SIZE, "num_pages": NUM_PAGES},
            "device": {"kind": "cpu"},
        }
    )
    return Worker(resolve(config), Topology(), backend=backend)


def step_logits(worker: Worker) -> torch.Tensor:
    """Logits of every position of a batched prefill, a chunk continuing a cached context, and
    three decode steps."""
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 496, (n,), generator=g).tolist() for n in (40, 9, 77)]
    plans = ManualPlans(PAGE_SIZE, NUM_PAGES)
    out = [
        worker.logits_for(
            plans.prefill([("s0", seqs[0][:20]), ("s1", seqs[1][:-3]), ("s2", seqs[2][:-3])]),
            all_positions=True,
        ),
        worker.logits_for(plans.prefill([("s0", seqs[0][20:-3])]), all_positions=True),
    ]
    for k in (3, 2, 1):
        out.append(worker.logits_for(plans.decode([(f"s{i}", s[-k]) for i, s in enumerate(seqs)])))
    return torch.cat(out).float()


def kernel_layers(path: Path, ops: KernelOps) -> ModelBackend:
    return kernel_backend(ModelArgs.from_checkpoint(path), ops, SdpaPrefill())


# --- the choice ------------------------------------------------------------------------------------


def test_reference_backend_builds_the_torch_layers(fp8_kernel_dims: Path) -> None:
    backend = choose_backend("torch", ModelArgs.from_checkpoint(fp8_kernel_dims))
    assert backend.ops.name == "torch-ref" and isinstance(backend.prefill_attention, TorchPrefill)
    assert not backend.fp8_linear and not backend.fp8_experts
    model = DeepseekV3(ModelArgs.from_checkpoint(fp8_kernel_dims), torch.float32, CPU, backend=backend)
    assert isinstance(model.model.layers[0].self_attn.qkv_a_proj.fused, Linear)
    assert type(model.moe_layers()[0].experts) is Experts
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_kernel_backend_keeps_fp8_where_the_checkpoint_is_fp8(fp8_kernel_dims: Path) -> None:
    args = ModelArgs.from_checkpoint(fp8_kernel_dims)
    backend = kernel_backend(args, reference_ops())
    assert backend.fp8_linear and backend.fp8_experts
    if importlib.util.find_spec("vllm_flash_attn") is None:
        assert backend.prefill_attention.name == "sdpa"
    model = DeepseekV3(args, torch.bfloat16, CPU, backend=backend)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.kv_b_proj, Fp8Linear) and attn.kv_b_proj.dequantized is not None
    assert isinstance(attn.o_proj, Fp8Linear) and attn.o_proj.dequantized is None
    assert isinstance(model.model.layers[0].mlp.down_proj, Fp8Linear)  # dense MLP
    moe = model.moe_layers()[0]
    assert isinstance(moe.experts, Fp8Experts) and moe.experts.w13.dtype == FP8_DTYPE
    assert isinstance(moe.shared_experts.gate_up_proj.fused, Fp8Linear)
    assert model.lm_head.weight.dtype == torch.bfloat16 and moe.gate.weight.dtype == torch.bfloat16


def test_experts_are_dequantized_when_their_blocks_would_straddle_gate_and_up() -> None:
    args = ModelArgs.from_hf_config(tiny_hf_config(fp8=True))  # moe_intermediate_size 32
    backend = kernel_backend(args, reference_ops())
    assert backend.fp8_linear and not backend.fp8_experts
    experts = DeepseekV3(args, torch.bfloat16, CPU, backend=backend).moe_layers()[0].experts
    assert type(experts) is Experts and experts.w13.dtype == torch.bfloat16


def test_fp8_projections_stack_only_on_whole_scale_blocks(tmp_path: Path) -> None:
    """Stacked FP8 rows must not share a 128-row scale block between two projections: with the
    default tiny dims (shared-expert intermediate 32) gate and up stay two FP8 layers whose
    outputs are concatenated, and both load as stored; q_lora_rank 128 + kv_a stack."""
    path = make_tiny_checkpoint(tmp_path / "fp8", seed=5, fp8=True, overrides={"q_lora_rank": 128})
    worker = make_worker(path, "bfloat16", kernel_layers(path, reference_ops()))
    model = worker.model
    shared = model.moe_layers()[0].shared_experts.gate_up_proj
    assert list(shared.separate) == ["gate_proj", "up_proj"] and not hasattr(shared, "fused")
    assert isinstance(model.model.layers[0].self_attn.qkv_a_proj.fused, Fp8Linear)
    stored: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        stored.update(load_file(file))
    for name in (
        "model.layers.1.mlp.shared_experts.up_proj.weight",
        "model.layers.1.mlp.shared_experts.up_proj.weight_scale_inv",
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv",
    ):
        got = model.checkpoint_tensor(name)
        assert torch.equal(got.view(torch.uint8), stored[name].view(torch.uint8)), name
    x = torch.randn(3, model.args.dim, dtype=torch.bfloat16)
    gate_up = shared(x)
    gate = shared.separate["gate_proj"](x)
    assert torch.equal(gate_up[:, : gate.shape[1]], gate)


def test_kernel_backend_without_fp8_keeps_plain_weights() -> None:
    backend = kernel_backend(ModelArgs.from_hf_config(tiny_hf_config()), reference_ops())
    assert not backend.fp8_linear and not backend.fp8_experts


def test_unknown_kernels_choice_is_refused() -> None:
    with pytest.raises(ValueError, match="'triton' or 'torch'"):
        choose_backend("cutlass", ModelArgs.from_hf_config(tiny_hf_config()))


def test_device_paths_are_resolved_once() -> None:
    def paths(
        device: str, dtype: str, kernels: str = "auto", graphs: bool = True, graph_max: int | None = None
    ):
        return device_paths(device, dtype, kernels, graphs, graph_max, max_decode_rows=100)

    assert paths("cuda", "bfloat16") == ("triton", 100)  # max_num_seqs
    assert paths("cuda", "float16") == ("triton", 100)
    assert paths("cuda", "float32") == ("torch", 0)  # kernels' fp32 dots are TF32
    assert paths("cpu", "bfloat16") == ("torch", 0)
    assert paths("cuda", "bfloat16", kernels="torch") == ("torch", 0)
    assert paths("cuda", "bfloat16", graphs=False) == ("triton", 0)
    assert paths("cuda", "bfloat16", graph_max=40) == ("triton", 40)
    assert paths("cuda", "bfloat16", graph_max=1000) == ("triton", 100)


def test_settings_on_the_cpu_take_the_reference(dev_config_path: Path) -> None:
    settings = resolve(ServeConfig.from_toml(dev_config_path))
    assert (settings.kernels, settings.cuda_graph_max_batch) == ("torch", 0)


# --- weights ---------------------------------------------------------------------------------------


def test_fp8_weights_load_as_stored(fp8_kernel_dims: Path) -> None:
    worker = make_worker(fp8_kernel_dims, "bfloat16", kernel_layers(fp8_kernel_dims, reference_ops()))
    model = worker.model
    stored: dict[str, torch.Tensor] = {}
    for file in sorted(fp8_kernel_dims.glob("*.safetensors")):
        stored.update(load_file(file))
    mtp_prefix = f"model.layers.{model.args.n_layers}."
    checked = 0
    for name, tensor in stored.items():
        if tensor.dtype != FP8_DTYPE or ".experts." in name or name.startswith(mtp_prefix):
            continue  # MTP layer tensors are not loaded
        scale_name = name.removesuffix(".weight") + ".weight_scale_inv"
        assert torch.equal(model.checkpoint_tensor(name).view(torch.uint8), tensor.view(torch.uint8)), name
        assert torch.equal(model.checkpoint_tensor(scale_name), stored[scale_name]), name
        checked += 1
    assert checked > 10
    experts = model.moe_layers()[0].experts
    assert isinstance(experts, Fp8Experts)
    p = "model.layers.1.mlp.experts.5."
    for proj in ("gate_proj", "up_proj", "down_proj"):
        got = experts.expert_weight(5, proj).view(torch.uint8)
        assert torch.equal(got, stored[p + proj + ".weight"].view(torch.uint8)), proj
        assert torch.equal(experts.expert_scale(5, proj), stored[p + proj + ".weight_scale_inv"]), proj
    kv_b = model.model.layers[2].self_attn.kv_b_proj
    assert isinstance(kv_b, Fp8Linear)
    want = dequantize_weight_blocks(kv_b.weight, kv_b.weight_scale_inv, torch.bfloat16)
    assert torch.equal(kv_b.dequantized_weight(), want)


def test_fill_dummy_fills_fp8_weights_with_the_right_scale() -> None:
    args = ModelArgs.from_hf_config(tiny_hf_config(TINY_KERNEL_OVERRIDES, fp8=True))
    model = DeepseekV3(args, torch.bfloat16, CPU, backend=kernel_backend(args, reference_ops()))
    fill_dummy(model, seed=2)
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            w = dequantize_weight_blocks(module.weight, module.weight_scale_inv, torch.float32)
            assert torch.isfinite(w).all()
            assert float(w.std()) == pytest.approx(w.shape[1] ** -0.5, rel=0.25)
            if module.dequantized is not None:
                assert torch.equal(module.dequantized_weight(), w.to(torch.bfloat16))
    experts = model.moe_layers()[0].experts
    assert isinstance(experts, Fp8Experts)
    w2 = dequantize_weight_blocks(experts.w2, experts.w2_scale_inv)
    assert float(w2.std()) == pytest.approx(args.moe_inter_dim**-0.5, rel=0.25)


# --- numerics --------------------------------------------------------------------------------------


def test_kernel_layers_compute_the_reference_function(fp8_kernel_dims: Path) -> None:
    """FP8 weights kept, activations unquantized: the same function as the dequantized reference."""
    reference = step_logits(make_worker(fp8_kernel_dims, "float32"))
    kernels = step_logits(make_worker(fp8_kernel_dims, "float32", kernel_layers(fp8_kernel_dims, EXACT_OPS)))
    torch.testing.assert_close(kernels, reference, atol=1e-4, rtol=1e-4)


def test_kernel_layers_with_bf16_weights_compute_the_reference_function(fp32_kernel_dims: Path) -> None:
    reference = step_logits(make_worker(fp32_kernel_dims, "float32"))
    backend = kernel_layers(fp32_kernel_dims, reference_ops())
    assert not backend.fp8_linear
    kernels = step_logits(make_worker(fp32_kernel_dims, "float32", backend))
    torch.testing.assert_close(kernels, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp8_activations_stay_within_quantization_error(fp8_kernel_dims: Path, dtype: str) -> None:
    reference = step_logits(make_worker(fp8_kernel_dims, dtype))
    kernels = step_logits(
        make_worker(fp8_kernel_dims, dtype, kernel_layers(fp8_kernel_dims, reference_ops()))
    )
    assert torch.isfinite(kernels).all()
    assert float((kernels - reference).norm() / reference.norm()) <= 0.25
    top2 = reference.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.2
    assert clear.sum() >= 50
    assert (kernels.argmax(-1)[clear] == reference.argmax(-1)[clear]).float().mean() >= 0.8


def test_sdpa_prefill_matches_the_reference_for_chunks_and_whole_prompts() -> None:
    query_lens, context_lens = [3, 5, 1], [7, 5, 4]  # a chunk, a whole prompt, one token on a context
    n, dq, dv = 4, 24, 16
    q = torch.randn(sum(query_lens), n, dq)
    k, v = torch.randn(sum(context_lens), n, dq), torch.randn(sum(context_lens), n, dv)
    batch = StepBatch(
        is_prefill=True,
        positions=torch.zeros(0),
        slot_mapping=torch.zeros(0),
        rope_cos=torch.zeros(0),
        rope_sin=torch.zeros(0),
        query_lens=query_lens,
        context_lens=context_lens,
        cu_query_lens=torch.zeros(0),
        cu_context_lens=torch.zeros(0),
        context_lens_t=torch.zeros(0),
        page_table=torch.zeros(0),
        context_slots=torch.zeros(0),
        logits_rows=torch.zeros(0),
    )
    want = TorchPrefill()(q, k, v, batch, 0.3)
    torch.testing.assert_close(SdpaPrefill()(q, k, v, batch, 0.3), want, atol=1e-5, rtol=1e-5)
