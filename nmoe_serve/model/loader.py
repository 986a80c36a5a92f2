"""Load HF safetensors checkpoints (bf16 or FP8 block-scaled) into a DeepseekV3 rank.

A rank reads only the tensors it holds: everything except routed experts, plus the routed experts
it owns. Multi-token-prediction layers are read only by a model that holds them (`mtp_depth`,
DeepseekV3WithMTP) and skipped otherwise. Every tensor is checked before it is copied:
a missing, unexpected or misshaped tensor raises CheckpointError naming the tensor, its file and
the expected shape. Pickle checkpoints (.bin, .pt) are refused and never unpickled.

FP8 tensors go into FP8 parameters as they are, with their scales, where the model's backend
keeps FP8 weights (Fp8Linear, Fp8Experts); elsewhere they are dequantized into the compute dtype.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open

from nmoe_serve.kernels.fp8_format import FP8_DTYPE, dequantize_weight_blocks, scale_grid
from nmoe_serve.model.args import ModelArgs
from nmoe_serve.model.deepseek_v3 import DeepseekV3
from nmoe_serve.model.layout import TensorSpec, checkpoint_tensors, is_mtp_tensor, scale_name

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class CheckpointError(ValueError):
    """The checkpoint's files do not match what its config.json describes."""


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """Tensor name → safetensors file, from model.safetensors.index.json or the files' own headers."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index} is not a safetensors index with a weight_map: {e}") from None
        files = {name: path / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise CheckpointError(
                    f"{index} lists {file.name}, which is not in {path}: the download is incomplete"
                )
            with safe_open(file, framework="pt") as f:  # reads the header only
                stored = set(f.keys())
            for name in sorted(n for n, shard in files.items() if shard == file and n not in stored):
                raise CheckpointError(
                    f"{index} maps {name} to {file.name}, which does not contain it: the index is stale or "
                    "the download incomplete; download the checkpoint again"
                )
        return files
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{path} holds only pickle checkpoints ({', '.join(pickles[:3])}); nmoe_serve never unpickles "
                "weights (unpickling runs arbitrary code). Convert them to safetensors first, e.g. with "
                "transformers: model.save_pretrained(dir, safe_serialization=True)"
            )
        raise CheckpointError(f"no *.safetensors files in {path}")
    files = {}
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                files[name] = shard
    return files


def load_checkpoint(model: DeepseekV3, path: str | Path) -> None:
    """Fill `model`'s parameters from the checkpoint at `path`, showing progress in the log."""
    args = model.args
    files = checkpoint_files(path)
    wanted = _wanted_tensors(args, model.owned, model.mtp_depth)
    _check_mtp(args, files, wanted, model.mtp_depth, Path(path))
    _check_names(args, files, wanted, model.mtp_depth, Path(path))
    by_file: dict[Path, list[TensorSpec]] = defaultdict(list)
    for spec in wanted:
        by_file[files[spec.name]].append(spec)
    total = sum(_nbytes(spec, args) for spec in wanted)
    step = 0.1 if total > 1e8 else 1.0  # progress lines only where loading takes a while
    done, next_report, started = 0, step, time.monotonic()
    log.info("loading %d tensors (%.1f MB) from %s", len(wanted), total / 1e6, path)
    for file, specs in sorted(by_file.items()):
        with safe_open(file, framework="pt", device="cpu") as f:
            for spec in specs:
                _load_one(model, f, file, spec, args, files)
                done += _nbytes(spec, args)
                if done >= next_report * total:
                    log.info(
                        "loading weights: %3.0f%% (%.1f of %.1f MB) in %.1f s",
                        100 * done / total,
                        done / 1e6,
                        total / 1e6,
                        time.monotonic() - started,
                    )
                    next_report = min(1.0, done / total + step)
    model.weights_loaded()
    log.info("loaded weights in %.1f s", time.monotonic() - started)


def _wanted_tensors(args: ModelArgs, owned: range, mtp_layers: int) -> list[TensorSpec]:
    specs = checkpoint_tensors(args, mtp_layers)
    return [s for s in specs if s.expert is None or s.expert in owned]


def _check_mtp(
    args: ModelArgs, files: dict[str, Path], wanted: list[TensorSpec], mtp_layers: int, path: Path
) -> None:
    """A model with MTP layers asked to load a checkpoint that lacks them: say so and what to do."""
    missing = [s.name for s in wanted if is_mtp_tensor(s.name, args) and s.name not in files]
    if not missing:
        return
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    raise CheckpointError(
        f"the model was built with {mtp_layers} multi-token-prediction layer(s) but checkpoint {path} lacks "
        f"{len(missing)} of their tensors: {shown}. Use a checkpoint that carries its MTP layer "
        f"(model.layers.{args.n_layers}.*, num_nextn_predict_layers >= {mtp_layers} in config.json; "
        "`nmoe-serve make-tiny-checkpoint --mtp` writes one), or build the model without MTP (DeepseekV3)"
    )


def _check_names(
    args: ModelArgs, files: dict[str, Path], wanted: list[TensorSpec], mtp_layers: int, path: Path
) -> None:
    known = set()
    for spec in checkpoint_tensors(args, mtp_layers):
        known.add(spec.name)
        if spec.quantizable:
            known.add(scale_name(spec.name))
    missing = [s for s in wanted if s.name not in files]
    if args.fp8:
        missing += [
            TensorSpec(scale_name(s.name), scale_grid(s.shape[0], s.shape[1]), False)
            for s in wanted
            if s.quantizable and scale_name(s.name) not in files
        ]
    if missing:
        shown = "; ".join(f"{s.name} {list(s.shape)}" for s in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"checkpoint {path} is missing {len(missing)} tensor(s) that its config.json implies: {shown}{more}. "
            "The files do not match config.json (wrong or incomplete download?)"
        )
    unexpected = sorted(n for n in files if n not in known and not is_mtp_tensor(n, args, mtp_layers))
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (
            f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else ""
        )
        raise CheckpointError(
            f"checkpoint {path} has {len(unexpected)} tensor(s) that a DeepSeek-V3 model with this config.json "
            f"does not have: {shown}. Check that config.json belongs to these weights"
        )


def _load_one(  # type: ignore[no-untyped-def]
    model: DeepseekV3, f, file: Path, spec: TensorSpec, args: ModelArgs, files: dict[str, Path]
) -> None:
    tensor = f.get_tensor(spec.name)
    where = f"tensor {spec.name} in {file.name}"
    if tuple(tensor.shape) != spec.shape:
        raise CheckpointError(
            f"{where} has shape {list(tensor.shape)} but config.json implies {list(spec.shape)}"
        )
    target = _target(model, spec)
    if tensor.dtype == FP8_DTYPE:
        if not (spec.quantizable and args.fp8):
            raise CheckpointError(
                f"{where} is float8 but config.json has no FP8 quantization_config for it; "
                "FP8 checkpoints need quantization_config {quant_method: fp8, weight_block_size: [128, 128]}"
            )
        scale = _read(f, file, scale_name(spec.name), files)
        grid = scale_grid(spec.shape[0], spec.shape[1])
        if tuple(scale.shape) != grid:
            raise CheckpointError(
                f"tensor {scale_name(spec.name)} has shape {list(scale.shape)} but a {list(spec.shape)} weight "
                f"with 128x128 blocks needs {list(grid)} (ceil-divided)"
            )
        if target.dtype == FP8_DTYPE:
            target.copy_(tensor)
            _scale_target(model, spec).copy_(scale)
        else:
            target.copy_(dequantize_weight_blocks(tensor, scale, target.dtype))
        return
    if tensor.dtype not in FLOAT_DTYPES:
        raise CheckpointError(
            f"{where} has dtype {tensor.dtype}; expected bfloat16, float16, float32 or float8_e4m3fn"
        )
    if args.fp8 and spec.quantizable:
        raise CheckpointError(
            f"{where} is {tensor.dtype} but config.json declares an FP8 checkpoint, where it must be float8_e4m3fn"
        )
    target.copy_(tensor.to(target.dtype))


def _read(f, file: Path, name: str, files: dict[str, Path]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    if files[name] == file:
        return f.get_tensor(name)
    with safe_open(files[name], framework="pt", device="cpu") as other:  # a scale in another shard
        return other.get_tensor(name)


def _target(model: DeepseekV3, spec: TensorSpec) -> torch.Tensor:
    if spec.expert is None:
        return model.checkpoint_tensor(spec.name)
    experts = model.get_submodule(model.module_name(_experts_name(spec)))
    proj = spec.name.split(".")[-2]
    return experts.expert_weight(spec.expert, proj)  # type: ignore[operator]


def _scale_target(model: DeepseekV3, spec: TensorSpec) -> torch.Tensor:
    """The parameter (or stacked slice) that an FP8 weight's weight_scale_inv fills."""
    if spec.expert is None:
        return model.checkpoint_tensor(scale_name(spec.name))
    experts = model.get_submodule(model.module_name(_experts_name(spec)))
    return experts.expert_scale(spec.expert, spec.name.split(".")[-2])  # type: ignore[operator]


def _experts_name(spec: TensorSpec) -> str:
    """model.layers.N.mlp.experts.E.proj.weight → model.layers.N.mlp.experts."""
    return spec.name.split(".experts.")[0] + ".experts"


def _nbytes(spec: TensorSpec, args: ModelArgs) -> int:
    numel = 1
    for d in spec.shape:
        numel *= d
    return numel * (1 if (args.fp8 and spec.quantizable) else 2)


DUMMY_CHUNK = 1 << 26  # elements drawn at a time for large parameters (bounds the float32 scratch)


def fill_dummy(model: DeepseekV3, seed: int = 0) -> None:
    """load_format "dummy": random weights of the right shapes, no files read.

    Linear weights ~ N(0, 1/fan_in), norms ~ 1, embeddings ~ N(0, 1): activations stay finite
    and of order one through all layers, so timings and numerics are representative. FP8 weights
    hold N(0, 1) values in e4m3 and their block scales are ~ 1/sqrt(fan_in) (± 10%), so the
    dequantized weights have the same statistics."""
    params = dict(model.named_parameters())
    for i, (name, param) in enumerate(params.items()):
        generator = torch.Generator(device=param.device).manual_seed(seed * 1_000_003 + i)
        if name.endswith("_scale_inv"):  # Fp8Linear.weight_scale_inv, Fp8Experts.w13_scale_inv, ...
            fan_in = params[name.removesuffix("_scale_inv")].shape[-1]
            _fill(param, generator, lambda v, f=fan_in: (1.0 + 0.1 * v) * f**-0.5)
        elif param.dtype == FP8_DTYPE:
            _fill(param, generator, lambda v: v)
        elif name.endswith("e_score_correction_bias"):
            _fill(param, generator, lambda v: v * 0.05)
        elif param.dim() == 1:
            _fill(param, generator, lambda v: v * 0.1 + 1.0)
        elif name.endswith("embed_tokens.weight"):
            _fill(param, generator, lambda v: v)
        else:
            _fill(param, generator, lambda v, f=param.shape[-1]: v * f**-0.5)
    model.weights_loaded()


def _fill(param: torch.Tensor, generator: torch.Generator, transform) -> None:  # type: ignore[no-untyped-def]
    """param ← transform(N(0, 1) draws), drawn in chunks along dim 0 for large parameters."""
    data = param.data
    if data.numel() <= DUMMY_CHUNK or data.dim() == 0:
        value = torch.randn(data.shape, generator=generator, device=data.device)
        data.copy_(transform(value))
        return
    rows = max(1, DUMMY_CHUNK // (data.numel() // data.shape[0]))
    for start in range(0, data.shape[0], rows):
        part = data[start : start + rows]
        part.copy_(transform(torch.randn(part.shape, generator=generator, device=data.device)))
