"""How far the FP8 KV cache ([cache] kv_dtype = "fp8") moves a model's outputs from its own-dtype cache.

Two measurements on a tiny random checkpoint, each run twice (kv_dtype "auto" and "fp8"):

- logits: a chunked prefill (the second chunk reads the first's cached pages) and decode steps
  of a few sequences through one Worker: the largest and the median per-row error (absolute,
  and relative to the row's mean magnitude), and how often the argmax agrees;
- greedy: `--prompts` random prompts through the offline engine (LLM), `--max-tokens` greedy
  tokens each: the fraction of identical generations and of tokens before the first difference.

CPU (the torch references, float32 model, the tiny model's dims):

    PYTHONPATH=. python bench/kv_fp8_accuracy.py

GPU (bf16 model; `--tiny-fp8` takes the tiny FP8 checkpoint whose dims, L 128 and R 32, the
Triton FP8 decode kernel serves, so decode runs `mla_decode_fp8` and the write `mla_kv_write_fp8`):

    PYTHONPATH=. python bench/kv_fp8_accuracy.py --device cuda --dtype bfloat16 --tiny-fp8 --page-size 64

GPU, DeepSeek-V3's own dims with dummy weights (`--deepseek-layers N`: N layers, the first
N - 1 dense and one MoE layer of all 256 experts, FP8 weights; logits only, no tokenizer; about
30 GB of weights for N = 4):

    PYTHONPATH=. python bench/kv_fp8_accuracy.py --device cuda --dtype bfloat16 --deepseek-layers 4 --page-size 64

Writes the numbers as JSON (`--out`). A tiny random model amplifies KV noise far more than a
trained one (its expert choices flip on small changes: a bf16 cache under a float32 model already
moves some rows' logits by ~16%), so these numbers bound the effect from above.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import print_table, write_json
from nmoe_serve.config import ServeConfig
from nmoe_serve.llm import LLM
from nmoe_serve.model.args import DEEPSEEK_V3_HF_CONFIG
from nmoe_serve.model.tiny import TINY_KERNEL_OVERRIDES, make_tiny_checkpoint
from nmoe_serve.sampling.params import SamplingParams
from nmoe_serve.settings import resolve_settings
from nmoe_serve.topology import Topology
from nmoe_serve.worker.worker import Worker
from tests.helpers import ManualPlans

NUM_PAGES = 512


def engine_options(args: argparse.Namespace, kv_dtype: str, dtype: str | None = None) -> dict:
    return dict(
        dtype=dtype or args.dtype,
        device=args.device,
        page_size=args.page_size,
        num_pages=NUM_PAGES,
        max_seq_len=512,
        kv_dtype=kv_dtype,
        cuda_graphs=False,
    )


def worker_logits(
    path: Path, args: argparse.Namespace, kv_dtype: str, seqs: list[list[int]], dtype: str | None = None
) -> torch.Tensor:
    options = engine_options(args, kv_dtype, dtype)
    if args.deepseek_layers:
        options["load_format"] = "dummy"
    config = ServeConfig.from_dict({"model": {"path": str(path)}}, overrides=options)
    worker = Worker(resolve_settings(config, cuda_available=torch.cuda.is_available()), Topology())
    plans = ManualPlans(args.page_size, NUM_PAGES, seed=1)
    steps, out = args.decode_steps, []
    prompts = [s[: len(s) - steps] for s in seqs]
    half = min(len(p) for p in prompts) // 2
    out.append(
        worker.logits_for(
            plans.prefill([(f"s{i}", p[:half]) for i, p in enumerate(prompts)]), all_positions=True
        )
    )
    out.append(
        worker.logits_for(
            plans.prefill([(f"s{i}", p[half:]) for i, p in enumerate(prompts)]), all_positions=True
        )
    )
    for step in range(steps):
        out.append(
            worker.logits_for(plans.decode([(f"s{i}", s[len(s) - steps + step]) for i, s in enumerate(seqs)]))
        )
    return torch.cat(out).float().cpu()  # [rows, V]


def greedy(
    path: Path, args: argparse.Namespace, kv_dtype: str, prompts: list[list[int]], dtype: str | None = None
) -> list[list[int]]:
    llm = LLM(path, **engine_options(args, kv_dtype, dtype))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tiny-fp8", action="store_true", help="the tiny FP8 checkpoint (L 128, R 32)")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument(
        "--deepseek-layers",
        type=int,
        default=0,
        help="DeepSeek-V3's dims with dummy weights, this many layers (logits only)",
    )
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-noise-reference",
        dest="noise_reference",
        action="store_false",
        help="skip the bf16-model row (float32 runs only)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/kv_fp8_accuracy.json"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    if args.deepseek_layers:
        path = Path(tempfile.mkdtemp())
        n = args.deepseek_layers
        hf = dict(DEEPSEEK_V3_HF_CONFIG, num_hidden_layers=n, first_k_dense_replace=max(0, n - 1))
        (path / "config.json").write_text(json.dumps(hf))
    else:
        path = make_tiny_checkpoint(  # --tiny-fp8: FP8 weights and the dims the kernels take
            Path(tempfile.mkdtemp()),
            seed=args.seed,
            fp8=args.tiny_fp8,
            dtype=torch.float32,
            overrides=TINY_KERNEL_OVERRIDES if args.tiny_fp8 else None,
        )
    vocab = 496 if not args.deepseek_layers else DEEPSEEK_V3_HF_CONFIG["vocab_size"]
    g = torch.Generator().manual_seed(args.seed)
    seqs = [
        torch.randint(0, vocab, (int(n),), generator=g).tolist()
        for n in torch.randint(40, 200, (6,), generator=g)
    ]
    prompts = [
        torch.randint(0, 496, (int(n),), generator=g).tolist()
        for n in torch.randint(8, 120, (args.prompts,), generator=g)
    ]
    base = worker_logits(path, args, "auto", seqs)
    with_greedy = not args.deepseek_layers  # dummy weights come without a tokenizer
    base_tokens = greedy(path, args, "auto", prompts) if with_greedy else []
    # The FP8 cache, and (noise scale of this model) the whole model in bf16 with its bf16 cache.
    variants = [("fp8 KV cache", "fp8", None)]
    if args.dtype == "float32" and args.noise_reference:
        variants.append(("bf16 model + bf16 KV (reference noise)", "auto", "bfloat16"))
    rows = []
    for label, kv_dtype, dtype in variants:
        other = worker_logits(path, args, kv_dtype, seqs, dtype)
        err = (other - base).abs()  # [rows, V]
        rel = err.mean(-1) / base.abs().mean(-1)  # [rows]
        row = dict(
            variant=label,
            logit_rows=base.shape[0],
            max_abs_error=err.max().item(),
            max_abs_logit=base.abs().max().item(),
            median_row_rel_error=rel.median().item(),
            mean_row_rel_error=rel.mean().item(),
            argmax_agreement=(other.argmax(-1) == base.argmax(-1)).float().mean().item(),
        )
        if with_greedy:
            tokens = greedy(path, args, kv_dtype, prompts, dtype)
            same_prefix = []
            for x, y in zip(base_tokens, tokens, strict=True):
                n = next((i for i, (u, v) in enumerate(zip(x, y, strict=True)) if u != v), len(x))
                same_prefix.append(n / len(x))
            identical = sum(x == y for x, y in zip(base_tokens, tokens, strict=True))
            row |= dict(
                prompts=len(prompts),
                identical_generations=identical / len(prompts),
                tokens_before_first_difference=sum(same_prefix) / len(same_prefix),
            )
        rows.append(row)
    print_table(
        f"against a {args.dtype} model with its {args.dtype} KV cache ({args.max_tokens} greedy tokens)",
        rows,
        list(rows[0]),
    )
    setup = dict(
        device=args.device,
        dtype=args.dtype,
        tiny_fp8=args.tiny_fp8,
        deepseek_layers=args.deepseek_layers,
        page_size=args.page_size,
        seed=args.seed,
    )
    write_json(args.out, dict(setup=setup, rows=rows))


if __name__ == "__main__":
    main()
