"""fused_moe (local-expert MoE, bf16/fp16/fp32 and FP8 weights) and moe_align against references.

Shapes: the legend in docs/ARCHITECTURE.md (T, H, I: `inter` in code, E: here local experts, K, A = T*K pairs).
"""

import pytest
import torch

from nmoe_serve.kernels import INTERPRET
from nmoe_serve.kernels.fp8_format import quantize_weight_blocks
from nmoe_serve.kernels.fused_moe import (
    GLUON_DECODE,
    GLUON_DECODE_WIDE,
    GLUON_PREFILL,
    default_config,
    fused_moe,
    fused_moe_ref,
    fused_moe_with_config,
    kernel_tiles,
    max_aligned_blocks,
    moe_align,
    moe_align_halves,
    moe_align_ref,
    moe_gather,
    moe_gather_ref,
)


def _routing(T: int, K: int, total_experts: int, device, avoid: tuple[int, ...] = ()):
    """Distinct random global expert ids per token (never those in `avoid`) and positive weights."""
    allowed = torch.tensor([e for e in range(total_experts) if e not in avoid], device=device)
    scores = torch.rand(T, allowed.numel(), device=device)
    ids = allowed[scores.topk(K, dim=1).indices]  # [T, K]
    weights = torch.rand(T, K, device=device) + 0.1  # [T, K]
    return ids, weights


def _weights(E: int, H: int, inter: int, dtype, fp8: bool, device):
    w13 = torch.randn(E, 2 * inter, H, device=device) / H**0.5  # [E, 2I, H]
    w2 = torch.randn(E, H, inter, device=device) / inter**0.5  # [E, H, I]
    if fp8:
        (w13, w13_scale), (w2, w2_scale) = quantize_weight_blocks(w13), quantize_weight_blocks(w2)
        return dict(w13=w13, w2=w2, w13_scale=w13_scale, w2_scale=w2_scale)
    return dict(w13=w13.to(dtype), w2=w2.to(dtype))


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


def _assert_near(out: torch.Tensor, want: torch.Tensor) -> None:
    """The GPU bounds (why: test_fused_moe_gpu_deepseek_shapes): 2e-2 of the output's range at
    most, 1e-2 in norm."""
    assert _rel_err(out, want) <= 2e-2
    assert ((out.float() - want.float()).norm() / want.float().norm()).item() <= 1e-2


@pytest.mark.parametrize(
    "T, K, E, total, block_t",
    [(7, 3, 4, 10, 16), (40, 2, 3, 6, 16), (1, 8, 32, 256, 128), (150, 4, 4, 8, 128), (90, 8, 8, 16, 32)],
)
def test_moe_align_halves_lists_each_half_block_that_holds_pairs(T, K, E, total, block_t, device):
    """The half blocks of moe_align's blocks that hold a pair, in slot order, each with its
    block's expert; -1 and base 0 past the last; the blocks themselves as moe_align's. Experts
    with 1..3 halves' worth of pairs, one with none, foreign experts."""
    expert_start = 2
    ids, _ = _routing(T, K, total, device, avoid=(expert_start + 1,))
    sorted_pair_ids, block_expert, (half_expert, half_base) = moe_align_halves(ids, E, expert_start, block_t)
    want_ids, want_blocks = moe_align(ids, E, expert_start, block_t)
    assert torch.equal(sorted_pair_ids, want_ids) and torch.equal(block_expert, want_blocks)
    half, num_pairs = block_t // 2, T * K
    assert half_expert.shape == half_base.shape == (max_aligned_blocks(num_pairs, E, half),)
    want = [
        (int(block_expert[b]), 2 * b + j)
        for b in range(block_expert.numel())
        if block_expert[b] >= 0
        for j in (0, 1)
        if bool((sorted_pair_ids[(2 * b + j) * half : (2 * b + j + 1) * half] < num_pairs).any())
    ]
    n = len(want)
    assert list(zip(half_expert[:n].tolist(), half_base[:n].tolist(), strict=True)) == want
    assert torch.all(half_expert[n:] == -1) and torch.all(half_base[n:] == 0)


@pytest.mark.parametrize("T, K, E, total", [(7, 3, 4, 10), (40, 2, 3, 6), (1, 8, 32, 256)])
def test_moe_align_groups_every_local_pair_once(T, K, E, total, device):
    expert_start = 2
    ids, _ = _routing(T, K, total, device, avoid=(expert_start + 1,))  # local expert 1 gets nothing
    block_t = 16
    sorted_pair_ids, block_expert = moe_align(ids, E, expert_start, block_t)
    num_pairs = T * K
    num_blocks = max_aligned_blocks(num_pairs, E, block_t)
    assert sorted_pair_ids.shape == (num_blocks * block_t,) and block_expert.shape == (num_blocks,)

    slots = sorted_pair_ids.view(num_blocks, block_t).long().cpu()  # [blocks, BT]
    experts = block_expert.long().cpu()
    local = (ids.flatten() - expert_start).cpu()  # [A]
    used = experts >= 0
    assert torch.all(used[: int(used.sum())]), "unused blocks must all come after the used ones"
    assert torch.all(experts[used].diff() >= 0), "blocks are ordered by expert"
    assert 1 not in experts.tolist(), "an expert with no pairs gets no block"
    seen = []
    for b in range(num_blocks):
        real = slots[b][slots[b] < num_pairs]
        if experts[b] < 0:
            assert real.numel() == 0
            continue
        assert real.numel() > 0, "a used block holds at least one pair"
        assert torch.all(local[real] == experts[b])
        assert torch.all(slots[b][real.numel() :] == num_pairs), "padding sits at the end of a run"
        seen += real.tolist()
    want = sorted(torch.nonzero((local >= 0) & (local < E)).flatten().tolist())
    assert sorted(seen) == want


@pytest.mark.parametrize(
    "T, K, E, total, block_t",
    [
        (7, 3, 5, 10, 16),  # E < 2^k: foreign pairs share a bin column with no expert
        (300, 8, 32, 256, 16),  # several chunks
        (4200, 8, 32, 64, 64),  # chunks of two steps (over 128 x 256 pairs), half the pairs local
        (64, 8, 8, 9, 128),  # BLOCK_T 128; local experts 2..9 of 0..8
    ],
)
def test_moe_align_matches_reference(T, K, E, total, block_t, device):
    ids, _ = _routing(T, K, total, device, avoid=(3,))
    ids = ids.to(torch.int32)
    got = moe_align(ids, E, 2, block_t)
    want = moe_align_ref(ids, E, 2, block_t)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


CASES = [
    # T, H, I, E, K, total experts, expert_start: partial 128 blocks in H (160) and I (96), odd T
    pytest.param(7, 160, 96, 4, 3, 10, 2, id="decode-tiles"),
    pytest.param(40, 64, 48, 3, 2, 6, 0, id="two-blocks-per-expert"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T, H, inter, E, K, total, expert_start", CASES)
def test_fused_moe_matches_reference(T, H, inter, E, K, total, expert_start, dtype, device):
    x = torch.randn(T, H, device=device).to(dtype)  # [T, H]
    # Local expert 1 gets no tokens; some tokens have no local expert at all.
    ids, weights = _routing(T, K, total, device, avoid=(expert_start + 1,))
    w = _weights(E, H, inter, dtype, fp8=False, device=device)
    out = fused_moe(x, ids, weights, expert_start=expert_start, **w)  # [T, H]
    want = fused_moe_ref(x, ids, weights, expert_start=expert_start, **w)
    assert out.shape == (T, H) and out.dtype == dtype
    # fp32 on a GPU runs its dots in TF32 (10-bit mantissa).
    tol = {torch.float32: 1e-5 if INTERPRET else 5e-3, torch.float16: 5e-3}[dtype]
    assert _rel_err(out, want) <= tol


@pytest.mark.parametrize("T, H, inter, E, K, total, expert_start", CASES)
def test_fused_moe_fp8_matches_reference(T, H, inter, E, K, total, expert_start, device):
    """FP8 weights with 128x128 block scales (partial edge blocks), activations quantized per 1x128
    group before each GEMM (in the interpreter the fp8 casts run in torch, see fp8_quant)."""
    x = torch.randn(T, H, device=device)  # [T, H]
    ids, weights = _routing(T, K, total, device, avoid=(expert_start + 1,))
    w = _weights(E, H, inter, None, fp8=True, device=device)
    out = fused_moe(x, ids, weights, expert_start=expert_start, **w)
    want = fused_moe_ref(x, ids, weights, expert_start=expert_start, **w)
    # Exact products; a different summation order can flip an fp8 rounding of h now and then.
    assert _rel_err(out, want) <= (1e-4 if INTERPRET else 2e-2)


@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
@pytest.mark.parametrize("block_t, swap_ab", [(16, False), (32, True), (64, False)])
def test_fused_moe_tile_variants_match_reference(block_t, swap_ab, fp8, device):
    """Both dot orientations, and token blocks other than the small shapes pick, different per
    GEMM (as prefill's), through the launcher that takes explicit tiles."""
    T, H, inter, E, K, total, expert_start = 9, 160, 96, 4, 3, 10, 2
    x = torch.randn(T, H, device=device)
    ids, weights = _routing(T, K, total, device, avoid=(expert_start + 1,))
    w = _weights(E, H, inter, torch.float32, fp8, device)
    cfg = default_config(T * K, E, fp8)
    cfg = dict(
        gemm1=dict(cfg["gemm1"], BLOCK_T=block_t, SWAP_AB=swap_ab),
        gemm2=dict(cfg["gemm2"], BLOCK_T=max(16, block_t // 2), SWAP_AB=swap_ab, BLOCK_W=64),
    )
    out = fused_moe_with_config(
        x, ids, weights, w["w13"], w["w2"], expert_start, w.get("w13_scale"), w.get("w2_scale"), cfg
    )
    want = fused_moe_ref(x, ids, weights, expert_start=expert_start, **w)
    assert _rel_err(out, want) <= (1e-4 if INTERPRET else 2e-2)


VARIANTS = [
    # GEMM 1's merged gate/up tile, scalar weight scales, grouped launch order (0: plain grid)
    pytest.param(dict(MERGE_GU=True, SCALAR_WS=True, GROUP_T=0), id="merged-scalar"),
    pytest.param(dict(MERGE_GU=True, SCALAR_WS=False, GROUP_T=3), id="merged-vector-group3"),
    pytest.param(dict(MERGE_GU=False, SCALAR_WS=True, GROUP_T=1), id="split-scalar-group1"),
    pytest.param(dict(MERGE_GU=False, SCALAR_WS=False, GROUP_T=2), id="split-vector-group2"),
]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("swap_ab", [True, False], ids=["swap", "tokens-as-M"])
@pytest.mark.parametrize("fp8", [False, True], ids=["fp32", "fp8"])
def test_fused_moe_kernel_variants_match_reference(variant, swap_ab, fp8, device):
    """The config switches of `default_config` on a case where every one applies: H and I multiples of
    128 (scalar weight scales valid), several token blocks and weight tiles per GEMM (grouped
    order with a partial last group), an expert with no tokens."""
    T, H, inter, E, K, total, expert_start = 24, 256, 256, 3, 2, 6, 1
    x = torch.randn(T, H, device=device)
    ids, weights = _routing(T, K, total, device, avoid=(expert_start + 1,))
    w = _weights(E, H, inter, torch.float32, fp8, device)
    tiles = dict(
        BLOCK_T=16, BLOCK_K=128 if fp8 else 64, SWAP_AB=swap_ab, num_warps=4, num_stages=2, **variant
    )
    cfg = dict(gemm1=dict(tiles, BLOCK_W=128), gemm2=dict(tiles, BLOCK_W=64))
    out = fused_moe_with_config(
        x, ids, weights, w["w13"], w["w2"], expert_start, w.get("w13_scale"), w.get("w2_scale"), cfg
    )
    want = fused_moe_ref(x, ids, weights, expert_start=expert_start, **w)
    assert _rel_err(out, want) <= (1e-4 if INTERPRET else 2e-2)


@pytest.mark.parametrize(
    "gemm, H, inter, block_w, scalar",
    [(1, 256, 256, 128, True), (1, 256, 96, 128, False), (2, 256, 96, 64, True), (2, 256, 256, 256, False)],
)
def test_kernel_tiles_keep_scalar_scales_only_where_valid(gemm, H, inter, block_w, scalar):
    tiles = dict(BLOCK_T=16, BLOCK_W=block_w, BLOCK_K=128, SCALAR_WS=True, GROUP_T=8, MERGE_GU=True)
    got, group_t = kernel_tiles(tiles, gemm, H, inter, num_blocks=5)
    assert got["SCALAR_WS"] is scalar and group_t == 5 and "GROUP_T" not in got
    assert ("MERGE_GU" in got) == (gemm == 1)
    assert kernel_tiles(dict(tiles, GROUP_T=0), gemm, H, inter, num_blocks=7)[1] == 7


def test_fused_moe_token_without_local_expert_gets_zeros(device):
    x = torch.randn(3, 64, device=device)
    ids = torch.tensor([[0, 1], [5, 6], [1, 7]], dtype=torch.int32, device=device)  # local experts: 0..3
    weights = torch.rand(3, 2, device=device)
    out = fused_moe(x, ids, weights, expert_start=0, **_weights(4, 64, 32, torch.float32, False, device))
    assert torch.all(out[1] == 0) and torch.all(out[0] != 0)


@pytest.mark.parametrize("fp8", [False, True])
def test_fused_moe_empty_batch(fp8, device):
    ids = torch.empty(0, 2, dtype=torch.int64, device=device)
    out = fused_moe(
        torch.randn(0, 160, device=device),
        ids,
        torch.empty(0, 2, device=device),
        **_weights(3, 160, 96, torch.float32, fp8, device),
    )
    assert out.shape == (0, 160) and out.dtype == torch.float32


def test_fused_moe_rejects_bad_input():
    T, H, inter, E, K = 3, 64, 32, 4, 2
    x = torch.randn(T, H)
    ids, weights = _routing(T, K, 8, "cpu")
    w = _weights(E, H, inter, torch.float32, False, "cpu")
    w8 = _weights(E, H, inter, None, True, "cpu")
    cases = [
        (
            dict(x=x.half(), **w),
            r"fused_moe: w13 has dtype torch.float32, expected one of: torch.float16, torch.float8_e4m3fn",
        ),
        (dict(x=x, topk_ids=ids[:2]), r"topk_ids has shape \(2, 2\), expected \[T, K\] with T = 3"),
        (dict(x=x, topk_ids=ids.float()), r"topk_ids has dtype torch.float32"),
        (dict(x=x, topk_weights=weights.half()), r"topk_weights has dtype torch.float16"),
        (
            dict(x=x, w13=w["w13"][:, :, :32].contiguous()),
            r"w13 has shape \(4, 64, 32\), expected \[E, 2I, H\]",
        ),
        (dict(x=x, w13=w["w13"][:, :63].contiguous()), r"an even 2I"),
        (dict(x=x, w2=w["w2"][:3].contiguous()), r"w2 has shape \(3, 64, 32\), expected \(4, 64, 32\)"),
        (dict(x=x, w2=w8["w2"]), r"w2 has dtype torch.float8_e4m3fn, expected one of: torch.float32$"),
        (dict(x=x, expert_start=-1), r"expert_start is -1, expected an int >= 0"),
        (dict(x=x, w13_scale=w8["w13_scale"]), r"w13_scale / w2_scale are only for float8_e4m3fn weights"),
        (dict(x=x, **{**w8, "w13_scale": None}), r"w13_scale must be a torch.Tensor"),
        (dict(x=x, **{**w8, "w2_scale": w8["w2_scale"][:, :, :0]}), r"w2_scale has shape \(4, 1, 0\)"),
    ]
    for overrides, message in cases:
        args = dict(x=x, topk_ids=ids, topk_weights=weights, **w) | overrides
        with pytest.raises(ValueError, match=message):
            fused_moe(**args)


def _deepseek_rank_inputs(T: int, fp8: bool) -> tuple:
    """DeepSeek-V3's MoE on one of 8 EP ranks (H 7168, 2048 intermediate, 32 of 256 experts,
    top-8), every token routed to at least one local expert: (x, ids, weights, w, expert_start)."""
    H, inter, E, K, total, expert_start = 7168, 2048, 32, 8, 256, 64
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    scores = torch.rand(T, total, device="cuda")
    local = expert_start + torch.randint(0, E, (T,), device="cuda")
    scores[torch.arange(T, device="cuda"), local] = 2.0  # every token has local work
    ids = scores.topk(K, dim=1).indices.to(torch.int32)  # [T, K]
    weights = torch.rand(T, K, device="cuda") + 0.1
    return x, ids, weights, _weights(E, H, inter, torch.bfloat16, fp8, "cuda"), expert_start


@pytest.mark.gpu
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize("T", [1, 32, 256, 4096])
def test_fused_moe_gpu_deepseek_shapes(T, fp8):
    """DeepSeek-V3 on one of 8 EP ranks: H 7168, I 2048, 32 of 256 experts (rank 2), top-8.

    Tolerance 2e-2 of the output's range: the reference rounds where the kernels round (x, h and
    each expert's output to bf16, or x and h to fp8 per 1x128 group), so what is left is rounding
    of values that the two summation orders put on either side of a bf16 (2^-9) or fp8 (2^-4)
    rounding boundary, plus the FP8 tensor cores' shorter accumulator; each touches few elements.
    Measured on an H100 (docs/PERF.md) against the same pipeline in float64: FP8 kernel 0.82%
    of the range at most and 0.42% in norm, the float32 reference 0.46% and 0.17%; the kernel's
    extra error is the FP8 accumulator flipping the fp8 rounding of some h elements. The norm
    bound below catches a wrong kernel that the max bound would let through.
    """
    x, ids, weights, w, expert_start = _deepseek_rank_inputs(T, fp8)
    out = fused_moe(x, ids, weights, expert_start=expert_start, **w)
    want = fused_moe_ref(x, ids, weights, expert_start=expert_start, **w)
    _assert_near(out, want)
    assert torch.equal(out, fused_moe(x, ids, weights, expert_start=expert_start, **w)), "not deterministic"


GPU_VARIANTS = {
    "unmerged": lambda cfg, prefill: {g: dict(t, MERGE_GU=False) for g, t in cfg.items()},
    "vector-scales": lambda cfg, prefill: {g: dict(t, SCALAR_WS=False) for g, t in cfg.items()},
    "plain-grid": lambda cfg, prefill: {g: dict(t, GROUP_T=0) for g, t in cfg.items()},
    "decode-g1-bt64": lambda cfg, prefill: (
        cfg if prefill else dict(cfg, gemm1=dict(cfg["gemm1"], BLOCK_T=64, num_warps=8))
    ),
    "prefill-g2-bt128": lambda cfg, prefill: (
        dict(cfg, gemm2=dict(cfg["gemm2"], BLOCK_T=128)) if prefill else cfg
    ),
}


@pytest.mark.gpu
@pytest.mark.parametrize("variant", list(GPU_VARIANTS))
@pytest.mark.parametrize("T", [256, 4096])
def test_fused_moe_gpu_variants_deepseek_shapes(T, variant):
    """The variants bench/sweep_moe.py times, at DeepSeek-V3 shapes (FP8, rank 2 of 8): the
    same bounds as the default tiles (see test_fused_moe_gpu_deepseek_shapes)."""
    H, inter, E, K, total, expert_start = 7168, 2048, 32, 8, 256, 64
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    ids = torch.rand(T, total, device="cuda").topk(K, dim=1).indices.to(torch.int32)  # [T, K]
    weights = torch.rand(T, K, device="cuda") + 0.1
    w = _weights(E, H, inter, torch.bfloat16, True, "cuda")
    cfg = GPU_VARIANTS[variant](default_config(T * K, E, True), T * K / E > 512)
    out = fused_moe_with_config(
        x, ids, weights, w["w13"], w["w2"], expert_start, w["w13_scale"], w["w2_scale"], cfg
    )
    want = fused_moe_ref(x, ids, weights, expert_start=expert_start, **w)
    _assert_near(out, want)


@pytest.mark.parametrize(
    "T, K, E, total, block_t",
    [(7, 3, 4, 10, 4), (40, 2, 3, 6, 16), (33, 8, 32, 256, 64), (300, 8, 32, 256, 128)],
)
def test_moe_gather_matches_reference(T, K, E, total, block_t, device):
    """Rows and scales of every real block in slot order, zeros in its padding slots; the
    slots of blocks past the last run are not written (poisoned here, compared only where real)."""
    ids, _ = _routing(T, K, total, device)
    sorted_pair_ids, block_expert = moe_align(ids, E, 1, block_t)
    H = 320  # not a multiple of the kernel's 512- or 1024-byte chunk
    x = torch.randint(0, 256, (T, H), dtype=torch.uint8, device=device).view(torch.float8_e4m3fn)
    scales = torch.rand(T, 3, device=device)
    xg, xgs = moe_gather(x, scales, sorted_pair_ids, block_expert, K)
    want_xg, want_xgs = moe_gather_ref(x, scales, sorted_pair_ids, block_expert, K)
    real = (block_expert >= 0).repeat_interleave(block_t)
    assert torch.equal(xg.view(torch.uint8)[real], want_xg.view(torch.uint8)[real])
    assert torch.equal(xgs[real], want_xgs[real])


def test_default_config_chooses_gluon_for_fp8_decode_above_128_seqs_and_prefill():
    assert default_config(990 * 8, 32, True, gluon=True)["VARIANT"] == "gluon"  # 256 seqs a rank
    assert "VARIANT" not in default_config(127 * 8, 32, True, gluon=True)  # 32: Triton's is faster
    assert "VARIANT" not in default_config(990 * 8, 32, True)
    assert "VARIANT" not in default_config(990 * 8, 32, False, gluon=True)  # bf16 weights
    assert default_config(16384 * 8, 32, True, gluon=True)["VARIANT"] == "gluon_prefill"
    assert default_config(2049, 4, True, gluon=True)["VARIANT"] == "gluon_prefill"  # > 512 an expert
    assert "VARIANT" not in default_config(16384 * 8, 32, True)


def _gluon_config(tiles: dict = GLUON_DECODE) -> dict:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in tiles.items()}


def _moe_gluon_here() -> bool:
    if not torch.cuda.is_available():
        return False
    from nmoe_serve.kernels.fused_moe import gluon_available

    return gluon_available(torch.device("cuda"))[0]


@pytest.mark.gpu
@pytest.mark.skipif(not _moe_gluon_here(), reason="needs a Hopper GPU and Triton's Gluon")
@pytest.mark.parametrize(
    "T, H, inter, E, K, total, start, stages",
    [
        (3, 256, 128, 4, 2, 8, 0, 4),  # fewer items than programs; fewer K steps than stages
        (200, 512, 256, 4, 4, 12, 2, 3),  # 60-70 pairs an expert: two blocks each
        (
            500,
            768,
            384,
            8,
            8,
            16,
            4,
            2,
        ),  # 3 tiles of I, 6 (3) of H, 4 blocks an expert, more blocks than stages
    ],
)
@pytest.mark.parametrize("gemm2_rows", [128, 256])
@pytest.mark.parametrize("block_t", [64, 128])
def test_fused_moe_gluon_matches_reference(T, H, inter, E, K, total, start, stages, gemm2_rows, block_t):
    """The Gluon decode GEMMs against the reference (FP8), stage counts below and above the K
    steps, experts split over several 64- or 128-slot blocks, foreign experts on both sides; GEMM 2
    with 128- and 256-row weight tiles (per-column scales; 64-slot blocks only)."""
    if H % gemm2_rows:
        pytest.skip(f"H {H} is not a multiple of {gemm2_rows}")
    if block_t == 128 and gemm2_rows != 128:
        pytest.skip("128-slot blocks take 128-row GEMM 2 tiles (test_gluon_wide_gemm2_refuses_256_row_tiles)")
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    ids, weights = _routing(T, K, total, "cuda")
    w = _weights(E, H, inter, torch.bfloat16, True, "cuda")
    cfg = _gluon_config(GLUON_DECODE if block_t == 64 else GLUON_DECODE_WIDE)
    for tiles in cfg["gemm1"], cfg["gemm2"]:
        tiles["STAGES"] = stages
    if gemm2_rows != 128:
        cfg["gemm2"].update(BLOCK_W=gemm2_rows, num_warps=8)
    out = fused_moe_with_config(x, ids, weights, w["w13"], w["w2"], start, w["w13_scale"], w["w2_scale"], cfg)
    want = fused_moe_ref(x, ids, weights, expert_start=start, **w)
    _assert_near(out, want)


@pytest.mark.gpu
@pytest.mark.skipif(not _moe_gluon_here(), reason="needs a Hopper GPU and Triton's Gluon")
@pytest.mark.parametrize(
    "T, gemms",
    [
        (1, "decode"),
        (32, "decode"),
        (256, "decode"),
        (1000, "decode"),
        (1, "decode-wide"),
        (256, "decode-wide"),
        (1000, "decode-wide"),
        (2304, "prefill"),
        (4096, "prefill"),
    ],
)
def test_fused_moe_gluon_deepseek_shapes(T, gemms):
    """DeepSeek-V3 on one of 8 EP ranks (as test_fused_moe_gpu_deepseek_shapes, same bounds),
    deterministic: the Gluon decode GEMMs with their default tiles (64-slot blocks) and with
    128-slot blocks at every T, the prefill ones where `default_config` picks them."""
    x, ids, weights, w, expert_start = _deepseek_rank_inputs(T, fp8=True)
    if gemms == "decode":
        cfg = _gluon_config()
    elif gemms == "decode-wide":
        cfg = _gluon_config(GLUON_DECODE_WIDE)
    else:
        cfg = default_config(ids.numel(), w["w13"].shape[0], True, gluon=True)
        assert cfg["VARIANT"] == "gluon_prefill"
    args = (x, ids, weights, w["w13"], w["w2"], expert_start, w["w13_scale"], w["w2_scale"], cfg)
    out = fused_moe_with_config(*args)
    want = fused_moe_ref(x, ids, weights, expert_start=expert_start, **w)
    _assert_near(out, want)
    again = fused_moe_with_config(*args)
    assert torch.equal(out, again), "not deterministic"


@pytest.mark.gpu
@pytest.mark.skipif(not _moe_gluon_here(), reason="needs a Hopper GPU and Triton's Gluon")
@pytest.mark.parametrize(
    "T, H, inter, E, K, total, start, stages",
    [
        (3, 256, 128, 4, 2, 8, 0, 4),  # one partial block; 4 K steps over both passes = STAGES
        (300, 384, 256, 4, 4, 12, 2, 3),  # 3 K steps a pass (odd: the loop's even tail), 2 groups of h
        (700, 512, 384, 8, 8, 16, 4, 4),  # 4 K steps a pass (the odd tail), 3 groups, blocks > GROUP_T
        (1100, 768, 256, 8, 8, 16, 4, 2),  # 6 K steps a pass; 2 stages
    ],
)
def test_fused_moe_gluon_prefill_matches_reference(T, H, inter, E, K, total, start, stages):
    """The Gluon prefill GEMMs against the reference (FP8): both K-loop tails, stage counts at and
    below a pass's K steps, experts over several 128-slot blocks, foreign experts on both sides,
    more blocks than a grid group (GROUP_T 2)."""
    x = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    ids, weights = _routing(T, K, total, "cuda")
    w = _weights(E, H, inter, torch.bfloat16, True, "cuda")
    cfg = _gluon_config(GLUON_PREFILL)
    for tiles in cfg["gemm1"], cfg["gemm2"]:
        tiles.update(STAGES=stages, GROUP_T=2)
    out = fused_moe_with_config(x, ids, weights, w["w13"], w["w2"], start, w["w13_scale"], w["w2_scale"], cfg)
    want = fused_moe_ref(x, ids, weights, expert_start=start, **w)
    _assert_near(out, want)


@pytest.mark.gpu
@pytest.mark.skipif(not _moe_gluon_here(), reason="needs a Hopper GPU and Triton's Gluon")
def test_gluon_wide_gemm2_refuses_256_row_tiles():
    """128-slot blocks with 256-row GEMM 2 tiles would need 256 accumulator registers a thread:
    the wrapper says so before a launch."""
    x = torch.randn(8, 256, device="cuda").to(torch.bfloat16)
    ids, weights = _routing(8, 2, 4, "cuda")
    w = _weights(4, 256, 128, torch.bfloat16, True, "cuda")
    cfg = _gluon_config(GLUON_DECODE_WIDE)
    cfg["gemm2"].update(BLOCK_T=128, BLOCK_W=256, num_warps=8, CTAS_PER_SM=1)
    with pytest.raises(ValueError, match="128-row tiles with 128-slot blocks"):
        fused_moe_with_config(x, ids, weights, w["w13"], w["w2"], 0, w["w13_scale"], w["w2_scale"], cfg)


@pytest.mark.parametrize(
    "tiles, slots, blocks, message",
    [
        (dict(BLOCK_T=96, num_warps=8), 96, 1, r"blocks of \(64, 128\) slots, not 96"),
        (dict(BLOCK_T=128, num_warps=4), 128, 1, "need num_warps = 8"),
        (dict(BLOCK_T=128, num_warps=8), 128, 2, "aligned to 64-slot blocks, the tiles say 128"),
    ],
)
def test_gluon_decode_gemms_refuse_tiles_they_cannot_run(tiles, slots, blocks, message):
    """A block size the kernels lack, 128-slot blocks on one warpgroup, or pairs aligned to another
    block size than the tiles': a clear error before a launch, no wrong result."""
    pytest.importorskip("triton.experimental.gluon")
    from nmoe_serve.kernels import fused_moe_gluon

    with pytest.raises(ValueError, match=message):
        fused_moe_gluon.block_slots(tiles, slots, blocks)
    assert fused_moe_gluon.block_slots(dict(BLOCK_T=128, num_warps=8), 256, 2) == 128


def test_fused_moe_refuses_gluon_tiles_of_two_block_sizes():
    """GEMM 2 reads h in GEMM 1's slot order: it takes GEMM 1's block size, or (128-slot GEMM 1)
    their 64-slot halves, never larger blocks than GEMM 1's."""
    pytest.importorskip("triton.experimental.gluon")
    cfg = _gluon_config(GLUON_DECODE)
    cfg["gemm2"].update(BLOCK_T=128, num_warps=8)
    x = torch.randn(4, 256).to(torch.bfloat16)
    ids, weights = _routing(4, 2, 4, "cpu")
    w = _weights(4, 256, 128, torch.bfloat16, True, "cpu")
    with pytest.raises(ValueError, match="the same for both"):
        fused_moe_with_config(x, ids, weights, w["w13"], w["w2"], 0, w["w13_scale"], w["w2_scale"], cfg)


@pytest.mark.parametrize("group_t", [0, -1, 2.5])
def test_gluon_prefill_gemms_refuse_a_group_of_no_blocks(group_t):
    """GROUP_T 0 is the Triton GEMMs' plain grid; the Gluon prefill GEMMs divide by it, so their
    wrappers refuse it (and any non-positive or non-integer value) before a launch."""
    pytest.importorskip("triton.experimental.gluon")
    from nmoe_serve.kernels import fused_moe_gluon_prefill as gemms

    tiles = dict(GLUON_PREFILL["gemm1"], GROUP_T=group_t)
    E, H, inter = 2, 256, 256
    xg = torch.zeros(128, H).to(torch.float8_e4m3fn)
    blocks = torch.zeros(1, dtype=torch.int32)
    w13 = torch.zeros(E, 2 * inter, H).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"Gluon prefill GEMM 1 needs GROUP_T >= 1"):
        gemms.gemm1(xg, torch.ones(128, H // 128), w13, torch.ones(E, 4, 2), blocks, tiles, 448.0, 1e-10)
    w2 = torch.zeros(E, H, inter).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"Gluon prefill GEMM 2 needs GROUP_T >= 1"):
        gemms.gemm2(xg, torch.ones(128, 2), w2, torch.ones(E, 2, 2), blocks, blocks, 1, torch.bfloat16, tiles)
