"""Checkpoint loading: FP8 dequantization against an independent reference, shards, MTP, expert
sharding, every refusal, dummy weights and the tiny-checkpoint cache."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import nmoe_serve.model.loader as loader
import nmoe_serve.model.tiny as tiny
from nmoe_serve.engine.plan import StepKind, StepPlan
from nmoe_serve.model.args import ModelArgs
from nmoe_serve.model.deepseek_v3 import DeepseekV3
from nmoe_serve.model.layout import is_mtp_tensor
from nmoe_serve.model.loader import CheckpointError, checkpoint_files, fill_dummy, load_checkpoint
from nmoe_serve.model.rope import RotaryEmbedding
from nmoe_serve.model.tiny import cached_tiny_checkpoint, make_tiny_checkpoint, tiny_hf_config
from nmoe_serve.topology import Topology
from nmoe_serve.worker.kv_cache import KVCache
from nmoe_serve.worker.step_batch import build_step_batch

CPU = torch.device("cpu")
BLOCK = 128

# Dims that are not multiples of 128 and span two blocks: kv_a_proj_with_mqa is (136 + 8) x 160,
# a 2 x 2 grid of scales whose last row and column of blocks are partial. Two layers and eight
# experts and no MTP layer keep the checkpoint small; vocab_size stays the tiny tokenizer's.
PARTIAL_BLOCKS = {
    "hidden_size": 160,
    "kv_lora_rank": 136,
    "q_lora_rank": 144,
    "intermediate_size": 200,
    "moe_intermediate_size": 136,
    "num_hidden_layers": 2,
    "n_routed_experts": 8,
    "num_nextn_predict_layers": 0,
}

EXPERT_NAME = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)\.weight$")


@pytest.fixture(scope="module")
def fp8_partial(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An FP8 checkpoint (shared: copy it before changing anything)."""
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("fp8-partial"), seed=7, fp8=True, overrides=PARTIAL_BLOCKS
    )


# --- helpers ---------------------------------------------------------------------------------------


def read_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in `path`, read without the loader."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def dequantize_reference(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """W[r, c] = weight[r, c] * scale_inv[r // 128, c // 128], block by block in float64."""
    rows, cols = weight.shape
    out = torch.empty(rows, cols, dtype=torch.float64)
    values = weight.to(torch.float64)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            r0, r1 = i * BLOCK, min((i + 1) * BLOCK, rows)
            c0, c1 = j * BLOCK, min((j + 1) * BLOCK, cols)
            out[r0:r1, c0:c1] = values[r0:r1, c0:c1] * float(scale_inv[i, j])
    return out


def expected_weights(path: Path) -> dict[str, torch.Tensor]:
    """Checkpoint tensor name → the float32 weight it should load as (FP8 ones dequantized)."""
    raw = read_all(path)
    expected = {}
    for name, tensor in raw.items():
        if name.endswith(".weight_scale_inv"):
            continue
        scale = raw.get(name.removesuffix(".weight") + ".weight_scale_inv")
        if tensor.dtype == torch.float8_e4m3fn:
            assert scale is not None, name
            # fp8 (4 significant bits) x float32 (24) is exact in float64, so rounding it to float32
            # once gives the correctly rounded product, as the loader's float32 multiply does.
            expected[name] = dequantize_reference(tensor, scale).to(torch.float32)
        else:
            expected[name] = tensor.to(torch.float32)
    return expected


def new_model(path: Path, owned: range | None = None) -> DeepseekV3:
    return DeepseekV3(ModelArgs.from_checkpoint(path), torch.float32, CPU, owned=owned)


def loaded(path: Path, owned: range | None = None) -> DeepseekV3:
    model = new_model(path, owned)
    load_checkpoint(model, path)
    return model


def assert_model_holds(model: DeepseekV3, expected: dict[str, torch.Tensor]) -> None:
    """Every checkpoint tensor this rank holds equals what the model holds for it (stacked
    projections by their rows, routed experts per expert), and together they fill every parameter."""
    filled = 0
    for name, want in expected.items():
        if is_mtp_tensor(name, model.args):
            continue
        if ".experts." in name:
            prefix, expert, proj, _ = name.rsplit(".", 3)
            if int(expert) not in model.owned:
                continue
            got = model.get_submodule(prefix).expert_weight(int(expert), proj)
        else:
            got = model.checkpoint_tensor(name)
        assert torch.equal(got, want), name
        filled += got.numel()
    assert filled == sum(p.numel() for p in model.parameters())


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def shard_of(path: Path, name: str) -> Path:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return path / json.loads(index.read_text())["weight_map"][name]
    return path / "model.safetensors"


def rewrite(path: Path, name: str, tensor: torch.Tensor | None, shard: Path | None = None) -> Path:
    """Replace (or with None delete, or add) tensor `name` in its shard and in the index; return the shard."""
    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else None
    if shard is None:
        shard = shard_of(path, name)
    tensors = load_file(shard)
    if tensor is None:
        del tensors[name]
        if index:
            del index["weight_map"][name]
    else:
        tensors[name] = tensor.contiguous()
        if index:
            index["weight_map"][name] = shard.name
    save_file(tensors, shard, metadata={"format": "pt"})
    if index:
        index_file.write_text(json.dumps(index))
    return shard


def first_shard(path: Path) -> Path:
    return sorted(path.glob("*.safetensors"))[0]


class RecordingSafeOpen:
    """Wraps safetensors.safe_open and records the name of every tensor read."""

    def __init__(self, names: list[str]) -> None:
        self.names = names

    def __call__(self, *args, **kwargs):
        outer = self

        class Handle:
            def __init__(self) -> None:
                self.inner = safe_open(*args, **kwargs)

            def __enter__(self):
                self.inner.__enter__()
                return self

            def __exit__(self, *exc):
                return self.inner.__exit__(*exc)

            def keys(self):
                return self.inner.keys()

            def get_tensor(self, name: str) -> torch.Tensor:
                outer.names.append(name)
                return self.inner.get_tensor(name)

        return Handle()


# --- FP8 with partial edge blocks ------------------------------------------------------------------


def test_fp8_scale_grids_are_ceil_divided(fp8_partial: Path):
    raw = read_all(fp8_partial)
    scales = [n for n in raw if n.endswith(".weight_scale_inv")]
    assert scales
    partial_rows = partial_cols = 0
    for scale_name in scales:
        weight = raw[scale_name.removesuffix("_scale_inv")]
        assert weight.dtype == torch.float8_e4m3fn
        rows, cols = weight.shape
        assert tuple(raw[scale_name].shape) == (-(-rows // BLOCK), -(-cols // BLOCK)), scale_name
        assert raw[scale_name].dtype == torch.float32
        partial_rows += rows % BLOCK != 0 and rows > BLOCK
        partial_cols += cols % BLOCK != 0 and cols > BLOCK
    assert partial_rows and partial_cols  # the case under test: several blocks, the last one partial
    kv_a = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert tuple(raw[kv_a].shape) == (144, 160)
    assert tuple(raw[kv_a + "_scale_inv"].shape) == (2, 2)
    expert = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert tuple(raw[expert].shape) == (160, 136)
    assert tuple(raw[expert + "_scale_inv"].shape) == (2, 2)


def test_fp8_checkpoint_with_partial_blocks_loads_as_the_reference_dequantizes(fp8_partial: Path):
    model = loaded(fp8_partial)
    assert model.args.fp8
    assert model.checkpoint_tensor("model.layers.0.self_attn.kv_a_proj_with_mqa.weight").shape == (144, 160)
    assert_model_holds(model, expected_weights(fp8_partial))


# --- shards, MTP, expert sharding ------------------------------------------------------------------


def test_sharded_and_single_file_checkpoints_load_the_same(tiny_fp32: Path, tmp_path: Path):
    single = make_tiny_checkpoint(tmp_path / "single", seed=0, dtype=torch.float32, shard_bytes=1 << 40)
    assert [p.name for p in single.glob("*.safetensors")] == ["model.safetensors"]
    assert not (single / "model.safetensors.index.json").exists()
    assert len(list(tiny_fp32.glob("*.safetensors"))) > 1
    assert (tiny_fp32 / "model.safetensors.index.json").is_file()
    assert set(checkpoint_files(single)) == set(checkpoint_files(tiny_fp32))
    a, b = loaded(tiny_fp32).state_dict(), loaded(single).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert_model_holds(loaded(single), expected_weights(single))


def test_mtp_layer_is_in_the_files_but_never_read(tiny_fp32: Path, monkeypatch: pytest.MonkeyPatch):
    n_layers = ModelArgs.from_checkpoint(tiny_fp32).n_layers
    mtp = [n for n in checkpoint_files(tiny_fp32) if n.startswith(f"model.layers.{n_layers}.")]
    assert any(".eh_proj." in n for n in mtp) and any(".mlp.experts." in n for n in mtp)
    names: list[str] = []
    monkeypatch.setattr(loader, "safe_open", RecordingSafeOpen(names))
    model = loaded(tiny_fp32)
    assert names and not [n for n in names if n.startswith(f"model.layers.{n_layers}.")]
    assert_model_holds(model, expected_weights(tiny_fp32))


def test_tensor_of_a_layer_beyond_the_mtp_layer_is_skipped_too(tiny_fp32: Path, tmp_path: Path):
    path = copy_checkpoint(tiny_fp32, tmp_path / "ckpt")
    rewrite(path, "model.layers.9.eh_proj.weight", torch.zeros(4, 4), shard=first_shard(path))
    assert "model.layers.9.eh_proj.weight" in checkpoint_files(path)
    assert_model_holds(loaded(path), expected_weights(tiny_fp32))


def test_rank_loads_and_reads_only_its_routed_experts(tiny_fp32: Path, monkeypatch: pytest.MonkeyPatch):
    owned = Topology(rank=1, world_size=4).owned_experts(16)
    assert owned == range(4, 8)
    names: list[str] = []
    monkeypatch.setattr(loader, "safe_open", RecordingSafeOpen(names))
    model = loaded(tiny_fp32, owned=owned)
    read = [EXPERT_NAME.match(n) for n in names]
    experts_read = {(int(m.group(1)), int(m.group(2)), m.group(3)) for m in read if m}
    moe_layers = [i for i in range(model.args.n_layers) if model.args.is_moe_layer(i)]
    assert experts_read == {
        (layer, e, p) for layer in moe_layers for e in owned for p in ("gate_proj", "up_proj", "down_proj")
    }
    assert len(names) == len(set(names))  # each tensor read once
    for layer in moe_layers:
        experts = model.model.layers[layer].mlp.experts
        assert tuple(experts.w13.shape) == (4, 2 * 32, 64) and tuple(experts.w2.shape) == (4, 64, 32)
    assert_model_holds(model, expected_weights(tiny_fp32))


# --- refusals --------------------------------------------------------------------------------------

O_PROJ = "model.layers.1.self_attn.o_proj.weight"


def test_missing_tensor(tiny_fp32: Path, tmp_path: Path):
    path = copy_checkpoint(tiny_fp32, tmp_path / "ckpt")
    rewrite(path, O_PROJ, None)
    with pytest.raises(
        CheckpointError,
        match=rf"checkpoint {re.escape(str(path))} is missing 1 tensor\(s\) that its config\.json implies: "
        rf"{re.escape(O_PROJ)} \[64, 64\]\. The files do not match config\.json",
    ):
        load_checkpoint(new_model(path), path)


def test_missing_tensor_of_an_expert_another_rank_owns_is_not_needed(tiny_fp32: Path, tmp_path: Path):
    path = copy_checkpoint(tiny_fp32, tmp_path / "ckpt")
    rewrite(path, "model.layers.2.mlp.experts.0.up_proj.weight", None)
    owned = Topology(rank=3, world_size=4).owned_experts(16)
    assert_model_holds(loaded(path, owned=owned), expected_weights(tiny_fp32))
    with pytest.raises(
        CheckpointError, match=r"is missing 1 tensor\(s\).*experts\.0\.up_proj\.weight \[32, 64\]"
    ):
        load_checkpoint(new_model(path), path)


def test_tensor_listed_in_the_index_but_absent_from_its_shard(tiny_fp32: Path, tmp_path: Path):
    path = copy_checkpoint(tiny_fp32, tmp_path / "ckpt")
    shard = shard_of(path, O_PROJ)
    tensors = load_file(shard)
    del tensors[O_PROJ]
    save_file(tensors, shard, metadata={"format": "pt"})  # the index still lists it
    with pytest.raises(CheckpointError, match=rf"{re.escape(O_PROJ)}.*{re.escape(shard.name)}"):
        load_checkpoint(new_model(path), path)


def test_unexpected_tensor(tiny_fp32: Path, tmp_path: Path):
    path = copy_checkpoint(tiny_fp32, tmp_path / "ckpt")
    rewrite(path, "model.layers.1.self_attn.rotary_emb.inv_freq", torch.ones(4), shard=first_shard(path))
    with pytest.raises(
        CheckpointError,
        match=r"has 1 tensor\(s\) that a DeepSeek-V3 model with this config\.json does not have: "
        r"model\.layers\.1\.self_attn\.rotary_emb\.inv_freq\. Check that config\.json belongs to these weights",
    ):
        load_checkpoint(new_model(path), path)


def test_misshaped_tensor_names_it_its_file_and_both_shapes(tiny_fp32: Path, tmp_path: Path):
    path = copy_checkpoint(tiny_fp32, tmp_path / "ckpt")
    shard = rewrite(path, O_PROJ, torch.zeros(64, 48))
    with pytest.raises(
        CheckpointError,
        match=rf"tensor {re.escape(O_PROJ)} in {re.escape(shard.name)} has shape \[64, 48\] but config\.json "
        r"implies \[64, 64\]",
    ):
        load_checkpoint(new_model(path), path)


def test_misshaped_expert_tensor(tiny_fp32: Path, tmp_path: Path):
    name = "model.layers.3.mlp.experts.15.down_proj.weight"
    path = copy_checkpoint(tiny_fp32, tmp_path / "ckpt")
    shard = rewrite(path, name, torch.zeros(32, 64))
    with pytest.raises(
        CheckpointError,
        match=rf"tensor {re.escape(name)} in {re.escape(shard.name)} has shape \[32, 64\] but config\.json "
        r"implies \[64, 32\]",
    ):
        load_checkpoint(new_model(path), path)


def test_tensor_of_a_non_float_dtype(tiny_fp32: Path, tmp_path: Path):
    path = copy_checkpoint(tiny_fp32, tmp_path / "ckpt")
    rewrite(path, O_PROJ, torch.zeros(64, 64, dtype=torch.int32))
    with pytest.raises(
        CheckpointError,
        match=rf"tensor {re.escape(O_PROJ)} in .* has dtype torch\.int32; expected bfloat16, float16, float32 "
        r"or float8_e4m3fn",
    ):
        load_checkpoint(new_model(path), path)


KV_A = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"


def test_fp8_weight_without_its_scale(fp8_partial: Path, tmp_path: Path):
    path = copy_checkpoint(fp8_partial, tmp_path / "ckpt")
    rewrite(path, KV_A + "_scale_inv", None)
    with pytest.raises(
        CheckpointError,
        match=rf"is missing 1 tensor\(s\) that its config\.json implies: {re.escape(KV_A)}_scale_inv \[2, 2\]",
    ):
        load_checkpoint(new_model(path), path)


def test_fp8_scale_of_the_wrong_grid_shape(fp8_partial: Path, tmp_path: Path):
    path = copy_checkpoint(fp8_partial, tmp_path / "ckpt")
    rewrite(path, KV_A + "_scale_inv", torch.ones(1, 2))  # floor-divided rows
    with pytest.raises(
        CheckpointError,
        match=rf"tensor {re.escape(KV_A)}_scale_inv has shape \[1, 2\] but a \[144, 160\] weight with 128x128 "
        r"blocks needs \[2, 2\] \(ceil-divided\)",
    ):
        load_checkpoint(new_model(path), path)


def test_float8_tensor_without_a_quantization_config(fp8_partial: Path, tmp_path: Path):
    path = copy_checkpoint(fp8_partial, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"tensor model\.layers\.\d+\.\S+\.weight in \S+ is float8 but config\.json has no FP8 "
        r"quantization_config for it; FP8 checkpoints need quantization_config \{quant_method: fp8, "
        r"weight_block_size: \[128, 128\]\}",
    ):
        load_checkpoint(new_model(path), path)


def test_bf16_weight_where_the_fp8_config_requires_float8(fp8_partial: Path, tmp_path: Path):
    path = copy_checkpoint(fp8_partial, tmp_path / "ckpt")
    rewrite(path, KV_A, torch.zeros(144, 160, dtype=torch.bfloat16))
    with pytest.raises(
        CheckpointError,
        match=rf"tensor {re.escape(KV_A)} in \S+ is torch\.bfloat16 but config\.json declares an FP8 checkpoint, "
        r"where it must be float8_e4m3fn",
    ):
        load_checkpoint(new_model(path), path)


class _WritesMarker:
    """Unpickling this object creates a file: proof that something unpickled it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_only_directory_is_refused_without_unpickling(tiny_fp32: Path, tmp_path: Path):
    path = tmp_path / "ckpt"
    path.mkdir()
    shutil.copy(tiny_fp32 / "config.json", path / "config.json")
    marker = tmp_path / "unpickled"
    (path / "pytorch_model.bin").write_bytes(pickle.dumps({"weight": _WritesMarker(marker)}))
    with pytest.raises(
        CheckpointError,
        match=r"holds only pickle checkpoints \(pytorch_model\.bin\); nmoe_serve never unpickles weights .*"
        r"Convert them to safetensors first",
    ):
        load_checkpoint(new_model(path), path)
    assert not marker.exists()


def test_index_listing_a_missing_shard(tiny_fp32: Path, tmp_path: Path):
    path = copy_checkpoint(tiny_fp32, tmp_path / "ckpt")
    gone = shard_of(path, O_PROJ)
    gone.unlink()
    with pytest.raises(
        CheckpointError,
        match=rf"model\.safetensors\.index\.json lists {re.escape(gone.name)}, which is not in "
        rf"{re.escape(str(path))}: the download is incomplete",
    ):
        load_checkpoint(new_model(tiny_fp32), path)


def test_index_without_a_weight_map(tiny_fp32: Path, tmp_path: Path):
    path = copy_checkpoint(tiny_fp32, tmp_path / "ckpt")
    (path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=r"index\.json is not a safetensors index with a weight_map"):
        checkpoint_files(path)


def test_empty_directory(tmp_path: Path):
    with pytest.raises(CheckpointError, match=rf"no \*\.safetensors files in {re.escape(str(tmp_path))}"):
        checkpoint_files(tmp_path)


def test_nonexistent_directory(tmp_path: Path, tiny_fp32: Path):
    absent = tmp_path / "absent"
    with pytest.raises(
        CheckpointError, match=rf"checkpoint directory {re.escape(str(absent))} does not exist"
    ):
        load_checkpoint(new_model(tiny_fp32), absent)


# --- dummy weights ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dummy_args() -> ModelArgs:
    return ModelArgs.from_hf_config(tiny_hf_config())


def dummy(args: ModelArgs, seed: int) -> DeepseekV3:
    model = DeepseekV3(args, torch.float32, CPU)
    fill_dummy(model, seed=seed)
    return model


def test_fill_dummy_gives_finite_weights_of_the_right_scale(dummy_args: ModelArgs):
    model = dummy(dummy_args, seed=1)
    for name, param in model.named_parameters():
        value = param.data
        assert torch.isfinite(value).all(), name
        assert value.abs().max() > 0, name
        if name.endswith("e_score_correction_bias"):
            assert value.abs().max() < 0.5, name
        elif value.dim() == 1:  # norms
            assert (value - 1).abs().max() < 0.6, name
            assert abs(float(value.mean()) - 1) < 0.1, name
        elif name.endswith("embed_tokens.weight"):
            assert abs(float(value.std()) - 1) < 0.1, name
        else:  # linear weights ~ N(0, 1/fan_in)
            assert float(value.std()) == pytest.approx(value.shape[-1] ** -0.5, rel=0.25), name


def test_fill_dummy_is_deterministic_per_seed(dummy_args: ModelArgs):
    a, b, c = dummy(dummy_args, seed=3), dummy(dummy_args, seed=3), dummy(dummy_args, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[n], sb[n]) for n in sa)
    assert not any(torch.equal(sa[n], sc[n]) for n in sa)


def test_dummy_model_gives_finite_logits_in_prefill_and_decode(dummy_args: ModelArgs):
    model = dummy(dummy_args, seed=0)
    page_size = 4
    kv = KVCache(dummy_args, num_pages=6, page_size=page_size, dtype=torch.float32, device=CPU)
    rope = RotaryEmbedding(dummy_args.rope, CPU)
    tokens = np.random.default_rng(0).integers(0, dummy_args.vocab_size, size=8)
    page_table = np.array([[0, 1], [2, -1]], np.int32)

    def step(step_id: int, kind: StepKind, query_lens, context_lens, token_ids) -> torch.Tensor:
        plan = StepPlan(
            step_id=step_id,
            kind=kind,
            rank=0,
            released=(),
            new_requests=(),
            request_ids=("a", "b"),
            query_lens=np.array(query_lens, np.int32),
            context_lens=np.array(context_lens, np.int32),
            token_ids=np.asarray(token_ids, np.int64),
            page_table=page_table,
            sample=np.array([True, True]),
        )
        input_ids, batch = build_step_batch(plan, page_size, rope, CPU)
        hidden = model(input_ids, batch, kv.layers)
        return model.compute_logits(hidden[batch.logits_rows])

    prefill = step(0, StepKind.PREFILL, [5, 1], [5, 1], tokens[:6])
    decode = step(1, StepKind.DECODE, [1, 1], [6, 2], tokens[6:])
    for logits in (prefill, decode):
        assert logits.shape == (2, dummy_args.vocab_size)
        assert logits.dtype == torch.float32
        assert torch.isfinite(logits).all()
        assert logits.std() > 0


# --- the tiny-checkpoint cache ---------------------------------------------------------------------


def test_cached_tiny_checkpoint_builds_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("NMOE_SERVE_CACHE", str(cache))
    first = cached_tiny_checkpoint(seed=2)
    assert first.parent == cache
    assert (first / "config.json").is_file() and (first / "tokenizer.json").is_file()
    assert ModelArgs.from_checkpoint(first).n_routed_experts == 16
    # no staging directory left behind; the lock file stays (unlinking a lock races its waiters)
    assert sorted(cache.iterdir()) == [first, cache / f"{first.name}.lock"]

    def must_not_build(*args, **kwargs):
        raise AssertionError("cached_tiny_checkpoint rebuilt a checkpoint it already had")

    monkeypatch.setattr(tiny, "make_tiny_checkpoint", must_not_build)
    assert cached_tiny_checkpoint(seed=2) == first


def test_concurrent_processes_build_the_tiny_checkpoint_once(tmp_path: Path):
    """Eight ranks asking at once (as the workers of a tiny EP group do): one builds, all load."""
    code = (
        "import sys, nmoe_serve.model.tiny as tiny\n"
        "real = tiny.make_tiny_checkpoint\n"
        "def counted(out, **kw):\n"
        "    open(sys.argv[1] + '/built-' + str(__import__('os').getpid()), 'w').close()\n"
        "    return real(out, **kw)\n"
        "tiny.make_tiny_checkpoint = counted\n"
        "print(tiny.cached_tiny_checkpoint(seed=5))\n"
    )
    env = {**os.environ, "NMOE_SERVE_CACHE": str(tmp_path / "cache")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(8)
    ]
    paths = {p.communicate(timeout=300)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(paths) == 1 and (Path(paths.pop()) / "config.json").is_file()
    assert len(list(tmp_path.glob("built-*"))) == 1


def test_cached_tiny_checkpoint_keeps_one_per_seed_and_format(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("NMOE_SERVE_CACHE", str(tmp_path))
    built: list[tuple[int, bool]] = []

    def fake(out, seed=0, fp8=False, **kwargs):
        built.append((seed, fp8))
        (Path(out) / "config.json").write_text("{}")
        return Path(out)

    monkeypatch.setattr(tiny, "make_tiny_checkpoint", fake)
    paths = {cached_tiny_checkpoint(seed=s, fp8=f) for s in (0, 1) for f in (False, True)}
    assert len(paths) == 4 and sorted(built) == [(0, False), (0, True), (1, False), (1, True)]
    cached_tiny_checkpoint(seed=1, fp8=True)
    assert len(built) == 4


def test_cached_tiny_checkpoint_accepts_losing_the_race(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NMOE_SERVE_CACHE", str(tmp_path))
    target = tmp_path / f"tiny-v{tiny.TINY_FORMAT_VERSION}-seed0-bf16"

    def build_while_another_process_finishes_first(out, seed=0, fp8=False, **kwargs):
        (Path(out) / "config.json").write_text('{"by": "us"}')
        target.mkdir()
        (target / "config.json").write_text('{"by": "them"}')
        return Path(out)

    monkeypatch.setattr(tiny, "make_tiny_checkpoint", build_while_another_process_finishes_first)
    assert cached_tiny_checkpoint() == target
    assert json.loads((target / "config.json").read_text()) == {"by": "them"}
    assert sorted(tmp_path.iterdir()) == [target, tmp_path / f"{target.name}.lock"]
