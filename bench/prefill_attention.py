"""Prefill attention at DeepSeek-V3 shapes: which SDPA kernel runs, and what padding V costs.

    PYTHONPATH=$PWD python bench/prefill_attention.py [--out prefill_attention.json]     # GPU host

MLA's prefill attends with q/k head dim 192 (nope 128 + rope 64) and v head dim 128. SdpaPrefill
pads V to 192 because SDPA's flash kernel wants one head dim. This times, for 128 heads and
prompts of 2048 tokens (and a chunk of 2048 continuing 6144 cached tokens), SDPA on:

- `padded`: V zero-padded to 192 (SdpaPrefill today), any backend;
- `unpadded`: V of 128 as it is, any backend SDPA accepts for it;
- each backend forced alone (flash, cuDNN, memory-efficient) on the unpadded V, where it runs;

and the pad copy itself. Device time, CUDA events, median of repeats after warm-up.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from report import cuda_time, print_table, write_json
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, QK_DIM, V_DIM = 128, 192, 128
BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def flops(n_q: int, n_k: int) -> float:
    """Causal attention FLOPs (end-aligned queries): QK^T and PV over the visible keys."""
    visible = n_q * (n_k - n_q) + n_q * (n_q + 1) / 2
    return 2 * HEADS * visible * (QK_DIM + V_DIM)


def case(n_q: int, n_k: int, reps: int) -> list[dict]:
    device = torch.device("cuda")
    q = torch.randn(1, HEADS, n_q, QK_DIM, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, HEADS, n_k, QK_DIM, device=device, dtype=torch.bfloat16)
    v = torch.randn(1, HEADS, n_k, V_DIM, device=device, dtype=torch.bfloat16)
    mask = None
    if n_q != n_k:
        mask = torch.arange(n_k, device=device)[None, :] <= torch.arange(n_q, device=device)[:, None] + (
            n_k - n_q
        )
    scale = QK_DIM**-0.5

    def sdpa(values: torch.Tensor):  # type: ignore[no-untyped-def]
        if mask is None:
            return lambda: F.scaled_dot_product_attention(q, k, values, is_causal=True, scale=scale)
        return lambda: F.scaled_dot_product_attention(q, k, values, attn_mask=mask, scale=scale)

    want = sdpa(F.pad(v, (0, QK_DIM - V_DIM)))()[..., :V_DIM].float()
    rows = []

    def timed(name: str, fn, backend: SDPBackend | None = None) -> None:  # type: ignore[no-untyped-def]
        row = {"case": f"{n_q} q / {n_k} k", "variant": name}
        try:
            if backend is None:
                out = fn()
                seconds = cuda_time(fn, reps)
            else:
                with sdpa_kernel([backend]):
                    out = fn()
                    seconds = cuda_time(fn, reps)
        except RuntimeError as e:
            row["error"] = str(e).splitlines()[0][:100]
            rows.append(row)
            return
        if out.shape == (1, HEADS, n_q, out.shape[-1]) and out.shape[-1] >= V_DIM:
            row["max_err"] = float((out[..., :V_DIM].float() - want).abs().max())
        row["us"] = seconds * 1e6
        row["tflops"] = flops(n_q, n_k) / seconds / 1e12
        rows.append(row)

    timed("pad copy alone", lambda: F.pad(v, (0, QK_DIM - V_DIM)))
    padded = F.pad(v, (0, QK_DIM - V_DIM))
    timed("padded, default", sdpa(padded))
    timed("unpadded, default", sdpa(v))
    for name, backend in BACKENDS.items():
        timed(f"padded, {name}", sdpa(padded), backend)
        timed(f"unpadded, {name}", sdpa(v), backend)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--reps", type=int, default=20)
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        print("prefill_attention: needs a CUDA GPU (SDPA's fused kernels are CUDA only)", file=sys.stderr)
        return 2
    rows = case(2048, 2048, opts.reps) + case(2048, 8192, opts.reps)
    print_table(
        f"SDPA prefill, {HEADS} heads, qk {QK_DIM}, v {V_DIM}, bf16 ({torch.cuda.get_device_name()})",
        rows,
        ["case", "variant", "us", "tflops", "max_err", "error"],
    )
    if opts.out:
        write_json(
            opts.out, {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
