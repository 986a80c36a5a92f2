"""mla_decode (paged absorbed MLA decode, split-K) against its torch reference.

Shapes: the legend in docs/ARCHITECTURE.md (B, N, L, R, P).
"""

import pytest
import torch

from nmoe_serve.kernels import INTERPRET
from nmoe_serve.kernels.mla_decode import (
    VARIANTS,
    default_config,
    gluon_available,
    mla_decode,
    mla_decode_ref,
    mla_decode_with_config,
    variant_config,
)


def scattered_page_table(context_lens: list[int], P: int, spare_pages: int) -> tuple[torch.Tensor, int]:
    """(page table [B, max_pages] int32 on the CPU, pages in all): each sequence's pages in random
    order over a cache of their total plus `spare_pages`, one column of -1 padding even for the longest."""
    pages_per_seq = [-(-n // P) for n in context_lens]
    num_pages = sum(pages_per_seq) + spare_pages
    free = torch.randperm(num_pages)
    page_table = torch.full((len(context_lens), max(pages_per_seq) + 1), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(pages_per_seq):
        page_table[b, :n] = free[used : used + n]
        used += n
    return page_table, num_pages


def _paged_cache(
    context_lens: list[int], P: int, N: int, L: int, R: int, dtype, device, spare_pages: int = 3
):
    """Random q and cache, each sequence's pages scattered over the cache in random order."""
    B = len(context_lens)
    page_table, num_pages = scattered_page_table(context_lens, P, spare_pages)
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


# The paged kernel's paths at tiny dims (L / 2 and R powers of two >= 16, P a multiple of BLOCK_N):
# TMA descriptors or plain loads, scores with or without SPLIT_SCORES, full tiles and a masked tail.
PAGED = [
    dict(VARIANT="paged", TMA=True, SPLIT_SCORES=True),
    dict(VARIANT="paged", TMA=True, SPLIT_SCORES=False),
    dict(VARIANT="paged", TMA=False, SPLIT_SCORES=True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("variant", PAGED, ids=lambda v: f"tma{int(v['TMA'])}-split{int(v['SPLIT_SCORES'])}")
@pytest.mark.parametrize(
    "context_lens, P, L, R, block_n, num_splits",
    [
        # 2 pages a tile-multiple, a partial tail, one 1-token sequence, empty splits
        pytest.param([1, 40, 32], 16, 32, 16, 16, 3, id="tails"),
        pytest.param([70, 5, 33], 32, 64, 32, 16, 2, id="two-tiles-a-page"),
        pytest.param([96, 17], 32, 32, 16, 32, 1, id="one-split"),
    ],
)
def test_mla_decode_paged_kernel_matches_reference(
    context_lens, P, L, R, block_n, num_splits, variant, dtype, device
):
    args = _paged_cache(context_lens, P, 16, L, R, dtype, device)
    scale = (L + R) ** -0.5
    cfg = dict(BLOCK_H=16, BLOCK_N=block_n, NUM_SPLITS=num_splits, num_warps=4, num_stages=2, **variant)
    out = mla_decode_with_config(**args, softmax_scale=scale, cfg=cfg)  # [B, N, L]
    want = mla_decode_ref(**args, softmax_scale=scale)
    tol = {torch.float32: 1e-5 if INTERPRET else 1e-2, torch.float16: 5e-3}[dtype]
    assert _rel_err(out, want) <= tol


def test_mla_decode_config_picks_the_paged_kernel_where_it_fits():
    deepseek = default_config(128, 128, 512, 64, 64, 2, 16384, num_sms=132)
    assert deepseek["VARIANT"] == "paged" and deepseek["TMA"] and deepseek["num_stages"] == 2
    assert default_config(4, 16, 32, 16, 16, 4, 64, num_sms=4)["VARIANT"] == "paged"  # tiny test model
    assert default_config(4, 20, 48, 8, 5, 4, 64, num_sms=4)["VARIANT"] == "generic"  # odd dims
    assert variant_config(deepseek, "generic-64x1") == dict(
        VARIANT="generic", BLOCK_H=64, BLOCK_N=64, NUM_SPLITS=1, num_warps=8, num_stages=1
    )


def test_mla_decode_paged_kernel_refuses_dims_it_does_not_take():
    args = _paged_cache([3, 5], 5, 16, 48, 8, torch.float32, "cpu")
    cfg = dict(BLOCK_H=16, BLOCK_N=16, NUM_SPLITS=1, num_warps=4, num_stages=1, **PAGED[0])
    with pytest.raises(ValueError, match=r"paged kernel needs L / 2 and R powers of two in \[16, 256\]"):
        mla_decode_with_config(**args, softmax_scale=0.1, cfg=cfg)


def test_mla_decode_gluon_flag_falls_back_where_the_kernel_cannot_run(device):
    """gluon=True off a CUDA device (or under the interpreter), or at dims the Gluon kernel does
    not take (fp32, L 32), runs the Triton kernels: same results as without the flag."""
    args = _paged_cache([22, 5], 16, 16, 32, 16, torch.float32, device)
    want = mla_decode(**args, softmax_scale=0.1)
    assert torch.equal(mla_decode(**args, softmax_scale=0.1, gluon=True), want)


def test_mla_decode_gluon_config_refuses_dims_it_does_not_take():
    args = _paged_cache([3, 5], 16, 16, 32, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"the Gluon kernel needs bf16/fp16, L / 2 in \(64, 128, 256\)"):
        mla_decode_with_config(**args, softmax_scale=0.1, cfg=dict(VARIANT="gluon", NUM_SPLITS=1))


def test_mla_decode_ignores_pages_past_the_context(device):
    """Garbage (inf) in the unused slots of a sequence's last page must not reach the output,
    with the generic kernel (P = 4) and the paged one (P = 16, which `default_config` picks)."""
    for P, lens in ((4, [6, 3]), (16, [22, 3])):
        args = _paged_cache(lens, P, 16, 32, 16, torch.float32, device)
        want = mla_decode_ref(**args, softmax_scale=0.1)
        last_page = args["page_table"][0, 1].long()
        args["kv_cache"][last_page, lens[0] - P :] = float("inf")
        out = mla_decode(**args, softmax_scale=0.1, num_splits=2)
        assert torch.isfinite(out).all()
        assert _rel_err(out, want) <= (1e-5 if INTERPRET else 1e-2)


def test_mla_decode_takes_a_pass_of_no_rows(device):
    """A rank's T = 0 pass (an idle eager decode): no rows in, none out, no launch."""
    args = _paged_cache([5], 16, 16, 32, 16, torch.float32, device)
    empty = {
        k: v[:0] if k in ("q_nope", "q_pe", "page_table", "context_lens") else v for k, v in args.items()
    }
    assert mla_decode(**empty, softmax_scale=0.1).shape == (0, 16, 32)


@pytest.mark.parametrize("P", [4, 16])  # the generic kernel, the paged one
def test_mla_decode_takes_strided_queries(P, device):
    """q_nope as the model computes it (a [N, B, L] product seen as [B, N, L]) and q_pe as the
    rope columns of a wider query, without copies."""
    args = _paged_cache([22, 5, 40], P, 16, 32, 16, torch.float32, device)
    want = mla_decode_ref(**args, softmax_scale=0.1)
    q_nope = args["q_nope"].transpose(0, 1).contiguous().transpose(0, 1)  # strides (L, B * L, 1)
    wide = torch.cat([torch.randn_like(args["q_pe"]), args["q_pe"]], dim=-1)  # [B, N, 2R]
    out = mla_decode(**(args | dict(q_nope=q_nope, q_pe=wide[..., 16:])), softmax_scale=0.1)
    assert _rel_err(out, want) <= (1e-5 if INTERPRET else 1e-2)


def test_mla_decode_reference_never_reads_slots_past_the_context():
    """The oracle itself: inf and NaN in every slot past each context (the rest of the last page,
    and pages the table lists past it) leave its output unchanged and finite. It masked scores
    before and then multiplied their zero weights by those slots (NaN)."""
    lens, P = [1, 6, 9], 4
    args = _paged_cache(lens, P, 16, 32, 16, torch.float32, "cpu")
    want = mla_decode_ref(**args, softmax_scale=0.1)
    table = args["page_table"]
    spare = next(page for page in range(args["kv_cache"].shape[0]) if page not in table)
    table[:, -1] = spare  # a page listed past every context
    args["kv_cache"][spare] = float("inf")
    for b, n in enumerate(lens):
        if n % P:
            args["kv_cache"][table[b, n // P].long(), n % P :] = float("inf") if b % 2 else float("nan")
    got = mla_decode_ref(**args, softmax_scale=0.1)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=0, atol=0)


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
        (
            dict(q_nope=args["q_nope"].transpose(1, 2).contiguous().transpose(1, 2)),
            r"q_nope must have a contiguous last dimension",
        ),
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


@pytest.mark.gpu
@pytest.mark.parametrize("context", [2000, 16000])
@pytest.mark.parametrize("B", [1, 32])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_mla_decode_gpu_variants(name, B, context):
    """Each sweep variant at DeepSeek-V3 shapes (bf16, N 128, L 512, R 64, P 64), with inf in the
    slots past each context; tolerance as in test_mla_decode_gpu_deepseek_shapes."""
    lens = (context - torch.randint(0, 200, (B,))).tolist()
    args = _paged_cache(lens, 64, 128, 512, 64, torch.bfloat16, "cuda")
    scale = 192**-0.5
    want = mla_decode_ref(**args, softmax_scale=scale)
    for b, n in enumerate(lens):
        args["kv_cache"][args["page_table"][b, (n - 1) // 64].long(), (n - 1) % 64 + 1 :] = float("inf")
    max_context = args["page_table"].shape[1] * 64
    cfg = variant_config(default_config(B, 128, 512, 64, 64, 2, max_context, num_sms=132), name)
    out = mla_decode_with_config(**args, softmax_scale=scale, cfg=cfg)
    assert torch.isfinite(out).all()
    assert _rel_err(out, want) <= 2e-2


def _gluon_or_skip() -> None:
    ok, why = gluon_available(torch.device("cuda"))
    if not ok:
        pytest.skip(f"the Gluon MLA kernel cannot run here: {why}")


def _poison_past_context(args: dict, lens: list[int], P: int) -> None:
    """inf in every slot of each sequence's last page past its context (the kernels must mask them)."""
    for b, n in enumerate(lens):
        args["kv_cache"][args["page_table"][b, (n - 1) // P].long(), (n - 1) % P + 1 :] = float("inf")


@pytest.mark.gpu
@pytest.mark.parametrize("context", [2000, 16000])
@pytest.mark.parametrize("B", [1, 32, 128])
def test_mla_decode_gluon_gpu_deepseek_shapes(B, context):
    """kernels/mla_decode_gluon.py at DeepSeek-V3 shapes (bf16, N 128, L 512, R 64, P 64), inf past
    each context; tolerance as in test_mla_decode_gpu_deepseek_shapes."""
    _gluon_or_skip()
    lens = (context - torch.randint(0, 200, (B,))).tolist()
    args = _paged_cache(lens, 64, 128, 512, 64, torch.bfloat16, "cuda")
    scale = 192**-0.5
    want = mla_decode_ref(**args, softmax_scale=scale)
    _poison_past_context(args, lens, 64)
    out = mla_decode(**args, softmax_scale=scale, gluon=True)
    assert torch.isfinite(out).all()
    assert _rel_err(out, want) <= 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "lens, P, N, L, R, num_splits",
    [
        # a partial tile alone, one whole tile, a tile and one token, two tiles and a tail; 3 splits
        # leave splits of the short sequences empty
        pytest.param([1, 63, 64, 65, 150], 64, 128, 512, 64, 3, id="tile-edges"),
        pytest.param([1, 63, 64, 65, 150], 64, 128, 512, 64, 1, id="tile-edges-one-split"),
        # heads not a multiple of 64 (masked rows), two tiles a page, the smallest dims it takes
        pytest.param([200, 5, 64, 129], 128, 20, 128, 32, 2, id="small-dims"),
        pytest.param([300, 7], 64, 16, 256, 128, None, id="wide-rope"),
    ],
)
def test_mla_decode_gluon_gpu_matches_reference(lens, P, N, L, R, num_splits, dtype):
    _gluon_or_skip()
    args = _paged_cache(lens, P, N, L, R, dtype, "cuda")
    scale = (L + R) ** -0.5
    want = mla_decode_ref(**args, softmax_scale=scale)
    _poison_past_context(args, lens, P)
    out = mla_decode(**args, softmax_scale=scale, num_splits=num_splits, gluon=True)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert _rel_err(out, want) <= 2e-2


@pytest.mark.gpu
def test_mla_decode_gluon_gpu_takes_strided_queries_and_no_rows():
    """q_nope as a [N, B, L] product seen as [B, N, L], q_pe as the rope columns of a wider query;
    and a T = 0 pass."""
    _gluon_or_skip()
    lens = [700, 64, 3]
    args = _paged_cache(lens, 64, 128, 512, 64, torch.bfloat16, "cuda")
    want = mla_decode_ref(**args, softmax_scale=0.07)
    q_nope = args["q_nope"].transpose(0, 1).contiguous().transpose(0, 1)  # strides (L, B * L, 1)
    wide = torch.cat([torch.randn_like(args["q_pe"]), args["q_pe"]], dim=-1)  # [B, N, 2R]
    out = mla_decode(**(args | dict(q_nope=q_nope, q_pe=wide[..., 64:])), softmax_scale=0.07, gluon=True)
    assert _rel_err(out, want) <= 2e-2
    empty = {
        k: v[:0] if k in ("q_nope", "q_pe", "page_table", "context_lens") else v for k, v in args.items()
    }
    assert mla_decode(**empty, softmax_scale=0.07, gluon=True).shape == (0, 128, 512)
