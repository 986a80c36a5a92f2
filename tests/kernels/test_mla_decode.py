"""mla_decode (paged absorbed MLA decode, split-K) against its torch reference.

Legend: B sequences, N heads, L latent, R rope dim, P page size.
"""

import pytest
import torch

from kernels import INTERPRET
from kernels.mla_decode import mla_decode, mla_decode_ref


def _paged_cache(
    context_lens: list[int], P: int, N: int, L: int, R: int, dtype, device, spare_pages: int = 3
):
    """Random q and cache, each sequence's pages scattered over the cache in random order."""
    B = len(context_lens)
    pages_per_seq = [-(-n // P) for n in context_lens]
    max_pages = max(pages_per_seq) + 1  # one column of -1 padding even for the longest
    num_pages = sum(pages_per_seq) + spare_pages
    free = torch.randperm(num_pages)
    page_table = torch.full((B, max_pages), -1, dtype=torch.int32)  # [B, max_pages]
    used = 0
    for b, n in enumerate(pages_per_seq):
        page_table[b, :n] = free[used : used + n]
        used += n
    return dict(
        q_nope=torch.randn(B, N, L, device=device).to(dtype),  # [B, N, L]
        q_pe=torch.randn(B, N, R, device=device).to(dtype),  # [B, N, R]
        kv_cache=torch.randn(num_pages, P, L + R, device=device).to(dtype),  # [pages, P, L + R]
        page_table=page_table.to(device),
        context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),  # [B]
    )


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "context_lens, P, N, L, R, num_splits",
    [
        pytest.param([1, 23, 9], 4, 16, 32, 16, 1, id="one-split"),
        # 3 splits: sequence 0 (1 token) leaves two splits empty
        pytest.param([1, 23, 9], 4, 16, 32, 16, 3, id="three-splits"),
        # heads, latent and rope not powers of two, page size 5
        pytest.param([7, 40, 33], 5, 20, 48, 8, 4, id="odd-dims"),
        pytest.param([70, 5], 4, 16, 32, 16, None, id="auto-splits"),
        # P a multiple of BLOCK_N (64): one page-table entry per block, as with DeepSeek's P = 64
        pytest.param([150, 33, 1], 64, 16, 32, 16, 2, id="page-aligned"),
    ],
)
def test_mla_decode_matches_reference(context_lens, P, N, L, R, num_splits, dtype, device):
    args = _paged_cache(context_lens, P, N, L, R, dtype, device)
    scale = (L + R) ** -0.5
    out = mla_decode(**args, softmax_scale=scale, num_splits=num_splits)  # [B, N, L]
    want = mla_decode_ref(**args, softmax_scale=scale)
    assert out.shape == want.shape and out.dtype == dtype
    # fp16: p is rounded to fp16 before p @ c_kv; fp32 on a GPU runs its dots in TF32.
    tol = {torch.float32: 1e-5 if INTERPRET else 1e-2, torch.float16: 5e-3}[dtype]
    assert _rel_err(out, want) <= tol


def test_mla_decode_ignores_pages_past_the_context(device):
    """Garbage (inf) in the unused slots of a sequence's last page must not reach the output."""
    args = _paged_cache([6, 3], 4, 16, 32, 16, torch.float32, device)
    want = mla_decode_ref(**args, softmax_scale=0.1)
    last_page = args["page_table"][0, 1].long()
    args["kv_cache"][last_page, 2:] = float("inf")
    out = mla_decode(**args, softmax_scale=0.1, num_splits=2)
    assert torch.isfinite(out).all()
    assert _rel_err(out, want) <= (1e-5 if INTERPRET else 1e-2)


def test_mla_decode_reference_refuses_empty_context():
    args = _paged_cache([3, 1], 4, 16, 32, 16, torch.float32, "cpu")
    args["context_lens"][1] = 0
    with pytest.raises(ValueError, match=r"context_lens must lie in \[1, max_pages \* P = 8\], got min 0"):
        mla_decode_ref(**args, softmax_scale=0.1)


def test_mla_decode_rejects_bad_input():
    args = _paged_cache([3, 5], 4, 16, 32, 16, torch.float32, "cpu")
    cases = [
        (dict(q_nope=args["q_nope"][0]), r"mla_decode: q_nope must be 3-D \[B, N, L\], got shape \(16, 32\)"),
        (dict(q_pe=args["q_pe"].half()), r"q_pe has dtype torch.float16, expected one of: torch.float32"),
        (dict(q_pe=args["q_pe"][:, :8].contiguous()), r"q_pe has shape \(2, 8, 16\), expected \[B, N, R\]"),
        (
            dict(kv_cache=args["kv_cache"][:, :, :40].contiguous()),
            r"expected \[num_pages, P, L \+ R\] with L \+ R = 48",
        ),
        (
            dict(page_table=args["page_table"].long()),
            r"page_table has dtype torch.int64, expected one of: torch.int32",
        ),
        (
            dict(page_table=args["page_table"][:1]),
            r"page_table has shape \(1, 3\), expected \[B, max_pages\] with B = 2",
        ),
        (
            dict(context_lens=args["context_lens"][:1]),
            r"context_lens has shape \(1,\), expected \(2,\) \[B\]",
        ),
        (dict(q_nope=args["q_nope"].transpose(0, 1)), r"q_nope must be contiguous"),
        (dict(softmax_scale=0.0), r"softmax_scale is 0.0, expected a positive float"),
        (dict(num_splits=0), r"num_splits is 0, expected None \(choose from the shapes\) or an int >= 1"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            mla_decode(**(args | dict(softmax_scale=0.1) | overrides))


@pytest.mark.gpu
@pytest.mark.parametrize("context", [2000, 16000])
@pytest.mark.parametrize("B", [1, 32, 128])
def test_mla_decode_gpu_deepseek_shapes(B, context):
    """DeepSeek-V3 decode, bf16: N 128, L 512, R 64, P 64; lengths around `context`, not multiples of P.

    Tolerance 2e-2 of the output's range: bf16 output rounding is 2^-9 relative and p is rounded
    to bf16 (2^-9) before p @ c_kv; the float32 softmax statistics add far less.
    """
    lens = (context - torch.randint(0, 200, (B,))).tolist()
    args = _paged_cache(lens, 64, 128, 512, 64, torch.bfloat16, "cuda")
    scale = 192**-0.5
    out = mla_decode(**args, softmax_scale=scale)
    assert _rel_err(out, mla_decode_ref(**args, softmax_scale=scale)) <= 2e-2
    assert torch.isfinite(out).all()
